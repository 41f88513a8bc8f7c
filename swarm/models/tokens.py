"""Cheap prompt-size estimates: four characters a token plus a per-message overhead.

One estimator serves the scripted engine's usage (so its token counts are deterministic) and
the client's context limit (swarm.models.context), so both sides agree on a prompt's size.
It is not a tokenizer: real counts differ by model, typically within ±25% for English text
and JSON; leave headroom in `max_context_tokens` for that.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MESSAGE_OVERHEAD_CHARS", "PromptCounter", "count_prompt_tokens", "message_chars",
           "message_text"]

# Role markers and separators a chat template adds around each message: about four tokens.
MESSAGE_OVERHEAD_CHARS = 16


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or the text of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def message_chars(m: dict[str, Any]) -> int:
    """Characters of one message's text and tool calls (names and arguments)."""
    content = m.get("content")
    chars = len(content) if type(content) is str else len(message_text(content))
    calls = m.get("tool_calls")
    if calls:
        for c in calls:
            fn = c.get("function") or {}
            chars += len(fn.get("name") or "") + len(fn.get("arguments") or "")
    return chars


def tools_chars(tools: list[dict[str, Any]]) -> int:
    """Characters of the tool schemas as compact JSON."""
    return len(json.dumps(tools, separators=(",", ":"))) if tools else 0


def count_prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """Approximate prompt tokens: message text and tool calls, 4 per message, tool schemas."""
    chars = sum(MESSAGE_OVERHEAD_CHARS + message_chars(m) for m in messages)
    return math.ceil((chars + tools_chars(tools)) / 4)


class PromptCounter:
    """`count_prompt_tokens` in time proportional to what a conversation added since last call.

    The runtime only appends to a session's message list, so the count for a list seen before
    is extended from where it stopped. A list is recognised by its id plus the identity of the
    last message counted (so a new list that happens to reuse an id is counted afresh). Tool
    schema lists are long-lived per agent; their size is cached by identity.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self._seen: dict[int, tuple[int, Any, int]] = {}
        self._tools: dict[int, tuple[Any, int]] = {}
        self._max = max_entries

    def __call__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        """Approximate prompt tokens, as `count_prompt_tokens` would count them."""
        n = len(messages)
        start, chars = 0, 0
        seen = self._seen.get(id(messages))
        if seen is not None and seen[0] <= n and seen[0] and messages[seen[0] - 1] is seen[1]:
            start, chars = seen[0], seen[2]
        for m in messages[start:] if start else messages:
            chars += MESSAGE_OVERHEAD_CHARS + message_chars(m)
        if n:
            if len(self._seen) >= self._max:
                del self._seen[next(iter(self._seen))]
            self._seen[id(messages)] = (n, messages[-1], chars)
        if tools:
            cached = self._tools.get(id(tools))
            if cached is None or cached[0] is not tools:
                if len(self._tools) >= 1024:
                    self._tools.clear()
                cached = (tools, tools_chars(tools))
                self._tools[id(tools)] = cached
            chars += cached[1]
        return math.ceil(chars / 4)
