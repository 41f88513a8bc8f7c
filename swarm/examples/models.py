"""Models written in Python for demos, tests and benchmarks (`provider: python`).

A config names one by import path, with its keyword arguments::

    models:
      fake:
        provider: python
        factory: swarm.examples.models:RepeatTool
        options: {tool: echo, arguments: {text: hello}, times: 3, answer: done}

Any `swarm.models.Model` subclass (or a function returning one) can stand there: a wrapper
around a vendor SDK, a local model, a rules engine.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage
from swarm.models.tokens import PromptCounter


class RepeatTool(Model):
    """Calls `tool` with `arguments` until a turn holds `times` tool results, then answers
    `answer`; `latency_s` is slept on every call.

    It decides from the messages after the latest user message, looking at no more than it
    needs (about 2 x `times` of them), so a call costs the same however long the task's
    history is. Usage: the prompt's tokens as the scripted engine counts them, and the reply's
    at about 4 characters a token.
    """

    def __init__(self, tool: str, arguments: dict[str, Any] | None = None, times: int = 1,
                 answer: str = "done", latency_s: float = 0.0, name: str = "repeat-tool"
                 ) -> None:
        if not tool:
            raise ValueError("tool must be a tool name")
        if times < 0:
            raise ValueError(f"times must be 0 or more, not {times}")
        if latency_s < 0:
            raise ValueError(f"latency_s must be 0 or more, not {latency_s}")
        self.tool = tool
        self.arguments = json.dumps(arguments or {})
        self.times = times
        self.answer = answer
        self.latency_s = latency_s
        self.name = name
        self._count = PromptCounter()
        self._call_tokens = math.ceil((len(tool) + len(self.arguments)) / 4)
        self._answer_tokens = math.ceil(len(answer) / 4)

    def _results(self, messages: list[dict[str, Any]]) -> int:
        """Tool results since the latest user message, counted up to `times`."""
        n = 0
        for m in reversed(messages):
            role = m.get("role")
            if role == "user":
                break
            if role == "tool":
                n += 1
                if n >= self.times:
                    break
        return n

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """The tool call, or the answer once the turn has `times` results."""
        messages = request.messages
        usage = Usage(input_tokens=self._count(messages, request.tools))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self._results(messages) < self.times:
            usage.output_tokens = self._call_tokens
            call = ToolCall(id=f"call_{len(messages)}_0", name=self.tool,
                            arguments=self.arguments)
            return ModelResponse(content=None, tool_calls=[call], usage=usage,
                                 finish_reason="tool_calls", model=self.name)
        usage.output_tokens = self._answer_tokens
        return ModelResponse(content=self.answer, tool_calls=[], usage=usage, model=self.name)
