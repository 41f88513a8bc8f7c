"""The model interface every backend implements: one OpenAI-shaped chat call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolCall:
    """A tool call the model asked for; `arguments` is the raw JSON text the model produced."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Usage:
    """Token counts of one model call."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0


@dataclass(slots=True)
class ModelRequest:
    """One chat-completions request: OpenAI-format messages and tool schemas."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    session_id: str = ""
    agent: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    # The step's wall-clock deadline (time.time()); a client's retries stop there.
    deadline: float | None = None


@dataclass(slots=True)
class ModelResponse:
    """What the model answered: text, tool calls, or both, with usage."""

    content: str | None
    tool_calls: list[ToolCall]
    usage: Usage
    finish_reason: str = "stop"
    model: str = ""
    time_to_first_token_s: float | None = None


class Model(ABC):
    """A chat model reachable through the OpenAI chat-completions shape.

    Backends raise `swarm.errors.ModelError` for failures after their own retries.
    """

    name: str = "model"

    @abstractmethod
    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Run one chat completion."""

    async def prepare(self) -> None:  # noqa: B027 - documented no-op hook
        """Get ready for calls (an agent host runs it in the background when it starts, so
        the first calls needn't pay for it); the default does nothing."""

    async def aclose(self) -> None:  # noqa: B027 - documented no-op hook
        """Release clients and connections; the default does nothing."""
