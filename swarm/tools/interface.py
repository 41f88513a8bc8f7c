"""The tool interface: a `ToolSource` serves named tools (an MCP server, a set of functions)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from swarm.events import Event, ToolProgress


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool's name, description, JSON schema and behaviour hints.

    Hints default to the MCP spec's conservative reading: a tool that says nothing is treated as
    destructive and not idempotent.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    source: str
    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False

    def openai_schema(self) -> dict[str, Any]:
        """The tool as an OpenAI chat-completions `tools` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}},
            },
        }


@dataclass(slots=True)
class ToolResult:
    """The outcome of a tool call; `is_error` marks an error the tool itself reported."""

    content: str
    is_error: bool = False
    structured: Any = None


@dataclass(slots=True)
class ToolContext:
    """Who is calling a tool, for logging, tracing and idempotency."""

    task_id: str = ""
    agent: str = ""
    session_id: str = ""
    call_id: str = ""
    step: int = 0
    traceparent: str | None = None
    # Same for every attempt of one logical call (task:agent:step:index), so a tool with side
    # effects can deduplicate a call that a resumed task sends again.
    idempotency_key: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    user: str = ""  # who submitted the task (memory namespaces, per-user limits)
    # The task's event stream (the step loop's emitter), for progress a tool reports while it runs.
    emit: Callable[[Event], None] | None = None

    def report_progress(self, tool: str, progress: float, total: float | None = None,
                        message: str | None = None) -> None:
        """Publish a running tool's progress as a `ToolProgress` step event (a no-op outside a
        task's step loop)."""
        if self.emit is not None:
            self.emit(ToolProgress(
                task_id=self.task_id, ts=time.time(), agent=self.agent or None, step=self.step,
                tool=tool, call_id=self.call_id, progress=progress, total=total,
                message=message or ""))


class ToolSource(ABC):
    """A named provider of tools.

    `call` returns a `ToolResult` for anything the tool itself reports (including its errors) and
    raises `swarm.errors.ToolError` when the source can't be reached; the step loop turns both
    into a tool message for the model, so a tool never crashes an agent.
    """

    name: str

    async def start(self) -> None:  # noqa: B027 - documented no-op hook
        """Connect or spawn what the source needs; the default does nothing."""

    @abstractmethod
    async def list_tools(self) -> list[ToolSpec]:
        """The tools this source serves."""

    @abstractmethod
    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Run one tool with already-parsed arguments."""

    def on_tools_changed(self, callback: Callable[[], None]) -> None:  # noqa: B027
        """Have `callback` called whenever `list_tools` would answer differently (an MCP server
        announced a new tool list); the default never calls it: the tools are fixed."""

    async def aclose(self) -> None:  # noqa: B027 - documented no-op hook
        """Stop subprocesses and close connections; the default does nothing."""
