"""`ContextWindow`: keeps an agent's prompts within its context limit before they are sent.

Before each call the prompt's size is estimated (swarm.models.tokens: four characters a token
plus four tokens a message and the tool schemas; counted incrementally, so the check costs
time proportional to what the conversation added since the last call). Above the limit the
agent's `context_strategy` applies to a copy of the request; the session's own message list,
which the durable log mirrors, is never changed:

- `drop_oldest_tool_results`: the oldest tool results get a short placeholder instead of their
  content until the prompt fits (the current step's results are kept);
- `summarize`: the messages between the leading system prompt and a recent tail are replaced by
  one summary written by `summarize_model`. The summary is kept in memory per session and
  reused while the prompt with it still fits, so a long session pays one summary call every
  so often, not one per step; its tokens are added to the answering call's usage. After an
  actor restart the first call over the limit summarises again;
- `fail`: a `ContextLimitError` naming the sizes.

A server that still rejects the prompt as too long (its tokenizer counts more than the
estimate) raises `ContextLimitError` from the client; unless the strategy is `fail`, the
strategy then applies once more with a quarter of headroom and the call is retried once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from swarm.errors import ContextLimitError
from swarm.models.interface import Model, ModelRequest, ModelResponse, Usage
from swarm.models.tokens import (
    MESSAGE_OVERHEAD_CHARS,
    PromptCounter,
    count_prompt_tokens,
    message_chars,
    message_text,
)

__all__ = ["SUMMARY_PREFIX", "ContextStrategy", "ContextWindow", "dropped_placeholder"]

ContextStrategy = Literal["drop_oldest_tool_results", "summarize", "fail"]
SUMMARY_PREFIX = "Summary of the earlier conversation (shortened to fit the context window):\n"
_SUMMARY_INSTRUCTIONS = (
    "You compress a conversation between a user, an AI agent and its tools so the agent can "
    "continue the task from the summary alone. Keep the task, every fact, number, name and "
    "identifier found so far, decisions made, tool results still needed, and what remains to "
    "do. Write plain prose or bullet points, no preamble."
)
_TRANSCRIPT_CHARS = 4000  # of one message in the summariser's transcript
_MAX_SUMMARIES = 10_000


def dropped_placeholder(chars: int) -> str:
    """The content a dropped tool result is replaced with."""
    return f"[tool result removed to fit the context window; it had {chars} characters]"


@dataclass(slots=True)
class _Summary:
    upto: int  # messages[head:upto] are summarised
    last: dict[str, Any]  # messages[upto - 1], to recognise the same conversation
    text: str


class ContextWindow(Model):
    """Wraps a model so no prompt above `max_tokens` (estimated) reaches it."""

    def __init__(self, inner: Model, max_tokens: int, strategy: ContextStrategy = "fail", *,
                 summarizer: Model | None = None, source: str = "max_context_tokens") -> None:
        if strategy == "summarize" and summarizer is None:
            raise ValueError("context_strategy summarize needs a summarizer model")
        self.inner = inner
        self.name = inner.name
        self.max_tokens = max_tokens
        self.strategy = strategy
        self.summarizer = summarizer
        self.source = source  # the config field the limit came from, for error messages
        self._count = PromptCounter()
        self._summaries: dict[str, _Summary] = {}

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Send the request, shortened by the strategy first if it is above the limit."""
        size = self._count(request.messages, request.tools)
        if size <= self.max_tokens:
            try:
                return await self.inner.complete(request)
            except ContextLimitError as e:
                if self.strategy == "fail":
                    raise ContextLimitError(
                        f"{e} (estimated {size} tokens; {self.source} = {self.max_tokens})"
                    ) from e
                target = size * 3 // 4
        else:
            target = self.max_tokens
        fitted, extra = await self._fit(request, size, target)
        resp = await self.inner.complete(fitted)
        if extra is not None:
            u = resp.usage
            resp.usage = Usage(u.input_tokens + extra.input_tokens,
                               u.output_tokens + extra.output_tokens,
                               u.cached_input_tokens + extra.cached_input_tokens)
        return resp

    async def _fit(self, request: ModelRequest, size: int,
                   target: int) -> tuple[ModelRequest, Usage | None]:
        if self.strategy == "drop_oldest_tool_results":
            return self._drop(request, size, target), None
        if self.strategy == "summarize":
            return await self._summarize(request, target)
        raise self._too_big(request, size, target, "context_strategy: fail")

    def _too_big(self, request: ModelRequest, size: int, target: int,
                 why: str) -> ContextLimitError:
        return ContextLimitError(
            f"agent {request.agent!r}: the prompt is about {size} tokens ({len(request.messages)}"
            f" messages, estimated at 4 characters a token), above the limit of {target} "
            f"({self.source} = {self.max_tokens}); {why}")

    # ---- drop_oldest_tool_results -----------------------------------------------------------

    def _drop(self, request: ModelRequest, size: int, target: int) -> ModelRequest:
        messages = list(request.messages)
        # The results of the latest step are what the model is about to read: keep them.
        keep_from = len(messages)
        while keep_from and messages[keep_from - 1].get("role") == "tool":
            keep_from -= 1
        chars = size * 4
        for i in range(keep_from):
            if math.ceil(chars / 4) <= target:
                break
            m = messages[i]
            if m.get("role") != "tool":
                continue
            old = message_chars(m)
            placeholder = dropped_placeholder(old)
            if len(placeholder) >= old:
                continue
            messages[i] = {**m, "content": placeholder}
            chars -= old - len(placeholder)
        fitted = replace(request, messages=messages)
        now = count_prompt_tokens(messages, request.tools)
        if now > target:
            raise self._too_big(request, size, target,
                                f"still about {now} tokens with every older tool result removed "
                                "(context_strategy: drop_oldest_tool_results)")
        return fitted

    # ---- summarize --------------------------------------------------------------------------

    async def _summarize(self, request: ModelRequest,
                         target: int) -> tuple[ModelRequest, Usage | None]:
        messages, tools = request.messages, request.tools
        head = 0
        while head < len(messages) and messages[head].get("role") in ("system", "developer"):
            head += 1
        fixed = count_prompt_tokens(messages[:head], tools)
        prior = self._summaries.get(request.session_id) if request.session_id else None
        if prior is not None and not (head < prior.upto <= len(messages)
                                      and messages[prior.upto - 1] is prior.last):
            prior = None
        if prior is not None:
            candidate = self._with_summary(messages, head, prior.upto, prior.text)
            if count_prompt_tokens(candidate, tools) <= target:
                return replace(request, messages=candidate), None
        # Keep a recent tail of about a third of the room, starting at a user or assistant
        # message (a tool result without the call that asked for it is rejected by servers).
        room = max(target - fixed, 0) // 3
        cut, tail = len(messages), 0
        while cut > head + 1:
            m = messages[cut - 1]
            t = (MESSAGE_OVERHEAD_CHARS + message_chars(m)) / 4
            if tail + t > room:
                break
            tail += t
            cut -= 1
        while cut < len(messages) and messages[cut].get("role") == "tool":
            cut += 1
        start = prior.upto if prior is not None and prior.upto <= cut else head
        if cut <= start:
            raise self._too_big(request, count_prompt_tokens(messages, tools), target,
                                "the system prompt and the latest messages alone are too big "
                                "to summarise the rest (context_strategy: summarize)")
        text, usage = await self._summary(request, prior.text if prior and start > head else "",
                                          messages[start:cut], max(target // 4, 64))
        candidate = self._with_summary(messages, head, cut, text)
        now = count_prompt_tokens(candidate, tools)
        if now > target:
            raise self._too_big(request, now, target, "still too big after summarising older "
                                "messages (context_strategy: summarize)")
        if request.session_id:
            if len(self._summaries) >= _MAX_SUMMARIES:
                del self._summaries[next(iter(self._summaries))]
            self._summaries[request.session_id] = _Summary(cut, messages[cut - 1], text)
        return replace(request, messages=candidate), usage

    @staticmethod
    def _with_summary(messages: list[dict[str, Any]], head: int, upto: int,
                      text: str) -> list[dict[str, Any]]:
        return [*messages[:head], {"role": "user", "content": SUMMARY_PREFIX + text},
                *messages[upto:]]

    async def _summary(self, request: ModelRequest, prior: str, part: list[dict[str, Any]],
                       max_tokens: int) -> tuple[str, Usage]:
        assert self.summarizer is not None
        lines = [f"Summary so far:\n{prior}\n"] if prior else []
        for m in part:
            who = m.get("role", "?") + (f" ({m['name']})" if m.get("name") else "")
            text = message_text(m.get("content"))
            for c in m.get("tool_calls") or ():
                fn = c.get("function") or {}
                text += f"\n[calls {fn.get('name')}({fn.get('arguments', '')})]"
            if len(text) > _TRANSCRIPT_CHARS:
                text = text[:_TRANSCRIPT_CHARS] + " [...]"
            lines.append(f"{who}: {text}")
        ask = ModelRequest(
            messages=[{"role": "system", "content": _SUMMARY_INSTRUCTIONS},
                      {"role": "user", "content": "\n\n".join(lines)}],
            session_id=request.session_id, agent=request.agent, max_tokens=max_tokens,
            deadline=request.deadline)
        try:
            resp = await self.summarizer.complete(ask)
        except ContextLimitError:
            raise
        except Exception as e:
            raise ContextLimitError(
                f"agent {request.agent!r}: the prompt is above {self.source} = "
                f"{self.max_tokens} and summarising it with {self.summarizer.name!r} failed: "
                f"{e}") from e
        if not (resp.content or "").strip():
            raise ContextLimitError(f"agent {request.agent!r}: summarize_model "
                                    f"{self.summarizer.name!r} returned an empty summary")
        return resp.content or "", resp.usage

    async def prepare(self) -> None:
        """Prepare the model (and the summarizer)."""
        await self.inner.prepare()
        if self.summarizer is not None:
            await self.summarizer.prepare()

    async def aclose(self) -> None:
        """Close the wrapped model and the summariser."""
        await self.inner.aclose()
        if self.summarizer is not None:
            await self.summarizer.aclose()
