"""An agent's toolbox: the tools its config grants, plus synthesized handoff tools."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarm.errors import ConfigError
from swarm.tools.interface import ToolSource, ToolSpec

HANDOFF_PREFIX = "transfer_to_"


def handoff_tool_name(agent: str) -> str:
    """The name of the tool that hands a task to `agent`."""
    return f"{HANDOFF_PREFIX}{agent}"


def _handoff_schema(agent: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": handoff_tool_name(agent),
            "description": f"Hand the task to the {agent} agent, with a message saying what it "
            "should do next.",
            "parameters": {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "what to do next"}},
                "required": ["message"],
                "additionalProperties": False,
            },
        },
    }


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """A granted tool and the source that serves it."""

    spec: ToolSpec
    source: ToolSource


class Toolbox:
    """The tools one agent may see and call, resolved once when the agent starts.

    Only granted tools are in `schemas` and only they resolve, so access control holds in the step
    loop itself, not just in the prompt.
    """

    def __init__(self, entries: dict[str, ToolEntry], handoffs: list[str]) -> None:
        self._entries = entries
        self._handoffs = {handoff_tool_name(a): a for a in handoffs}
        self.schemas: list[dict[str, Any]] = [e.spec.openai_schema() for e in entries.values()]
        self.schemas.extend(_handoff_schema(a) for a in handoffs)

    @property
    def names(self) -> list[str]:
        """Names the model can call, tools first, then handoffs."""
        return [*self._entries, *self._handoffs]

    def resolve(self, name: str) -> ToolEntry | None:
        """The granted tool of this name, or None."""
        return self._entries.get(name)

    def safe_to_repeat(self, name: str) -> bool:
        """Whether a call of `name` may run again with no further effect.

        True for tools declared read-only or idempotent, for handoffs, and for names that
        resolve to no tool (their calls fail before reaching one). A tool that declares nothing
        is taken to have side effects.
        """
        entry = self._entries.get(name)
        return entry is None or entry.spec.read_only or entry.spec.idempotent

    def handoff_target(self, name: str) -> str | None:
        """The agent a handoff tool names, or None if `name` is not a handoff tool."""
        return self._handoffs.get(name)

    @classmethod
    async def build(
        cls, agent: str, grants: list[str], sources: dict[str, ToolSource], handoffs: list[str]
    ) -> Toolbox:
        """Resolve grants (`server` for all its tools, `server.tool` for one) against live sources.

        A source that can't list its tools contributes none; its calls will fail as tool errors,
        which is the agent's signal, rather than failing the whole agent.
        """
        entries: dict[str, ToolEntry] = {}
        listed: dict[str, list[ToolSpec]] = {}
        for grant in grants:
            server, _, only = grant.partition(".")
            source = sources[server]
            if server not in listed:
                try:
                    listed[server] = await source.list_tools()
                except Exception:
                    listed[server] = []
            specs = listed[server]
            if only and not specs:
                # The server didn't list its tools (it is down). Keep the granted name so the
                # model's calls reach the source, which reconnects or reports a tool error.
                specs = [
                    ToolSpec(
                        name=only,
                        description=f"{only} (server {server} unavailable)",
                        parameters={"type": "object"},
                        source=server,
                    )
                ]
            elif only:
                specs = [s for s in specs if s.name == only]
                if not specs and listed[server]:
                    raise ConfigError(
                        [
                            (
                                f"agents.{agent}.tools",
                                f"server {server!r} has no tool {only!r}; it has "
                                f"{sorted(s.name for s in listed[server])}",
                            )
                        ]
                    )
            for spec in specs:
                other = entries.get(spec.name)
                if other is not None and other.source is not source:
                    raise ConfigError(
                        [
                            (
                                f"agents.{agent}.tools",
                                f"tool name {spec.name!r} is served by both "
                                f"{other.source.name!r} and {server!r}; grant one as server.tool",
                            )
                        ]
                    )
                if spec.name.startswith(HANDOFF_PREFIX):
                    raise ConfigError(
                        [
                            (
                                f"agents.{agent}.tools",
                                f"tool {spec.name!r} of {server!r} clashes with "
                                "the handoff tool prefix",
                            )
                        ]
                    )
                entries[spec.name] = ToolEntry(spec, source)
        return cls(entries, handoffs)
