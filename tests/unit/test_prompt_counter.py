"""The scripted model's incremental prompt-token count equals a full recount."""

from __future__ import annotations

import random

from swarm.models.scripted.model import PromptCounter, count_prompt_tokens


def test_incremental_count_matches_full_count() -> None:
    rng = random.Random(7)
    counter = PromptCounter(max_entries=3)
    tools = [{"type": "function", "function": {"name": "echo", "parameters": {}}}]
    conversations: list[list[dict]] = [[{"role": "system", "content": "s"}] for _ in range(5)]
    for i in range(400):
        msgs = rng.choice(conversations)
        if i % 3:
            msgs.append({"role": "tool", "tool_call_id": "c", "content": "r" * rng.randint(0, 99)})
        else:
            msgs.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function",
                 "function": {"name": "echo", "arguments": f'{{"t": {i}}}'}}]})
        assert counter(msgs, tools) == count_prompt_tokens(msgs, tools)
        # A copy shares the message objects but is a new list: still counted right.
        copy = [*msgs, {"role": "user", "content": "more"}]
        assert counter(copy, tools) == count_prompt_tokens(copy, tools)
    # A list that shrank (or was rebuilt) is recounted, not extended.
    msgs = conversations[0]
    del msgs[1:]
    assert counter(msgs, []) == count_prompt_tokens(msgs, [])
