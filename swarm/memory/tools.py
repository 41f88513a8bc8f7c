"""The built-in `memory` tool server: `remember`, `recall` and `forget` for agents.

Granted like any tool server (`tools: [memory]`, or `memory.recall` for one tool). Who is asking
comes from the runtime (`ToolContext.user` and `.agent`), never from the model's arguments, so a
model can't read or write another user's namespace by naming it; the namespaces an agent may use
are its `agents.X.memory.write` and `.read`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from swarm.errors import UserError
from swarm.memory.service import MemoryUnavailable, memory_service
from swarm.tools.interface import ToolContext, ToolResult, ToolSource, ToolSpec

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

SERVER = "memory"

_SPECS = [
    ToolSpec(
        name="remember",
        description="Store a fact, preference or lesson in long-term memory, to be recalled "
        "by meaning in later tasks. A near duplicate of a stored memory updates it.",
        parameters={
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "the memory, one self-contained "
                         "statement"},
                "metadata": {"type": "object", "description": "optional tags (JSON object)"},
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        source=SERVER, read_only=False, destructive=False, idempotent=True,
    ),
    ToolSpec(
        name="recall",
        description="Search long-term memory by meaning; returns the closest memories with "
        "their ids and similarity scores.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "what to look for"},
                "k": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5},
                "scope": {"type": "string", "enum": ["user", "swarm", "shared"],
                          "description": "search one namespace only"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        source=SERVER, read_only=True, destructive=False, idempotent=True,
    ),
    ToolSpec(
        name="forget",
        description="Delete one memory by its id (from recall).",
        parameters={
            "type": "object",
            "properties": {"memory_id": {"type": "string"}},
            "required": ["memory_id"],
            "additionalProperties": False,
        },
        source=SERVER, read_only=False, destructive=True, idempotent=True,
    ),
]


class MemoryToolSource(ToolSource):
    """Serves remember / recall / forget from the process's `MemoryService`."""

    def __init__(self, cfg: SwarmConfig) -> None:
        self.name = SERVER
        self.cfg = cfg

    async def aclose(self) -> None:
        """Close the memory clients (they reopen if another role still uses them)."""
        await memory_service(self.cfg).aclose()

    async def list_tools(self) -> list[ToolSpec]:
        """The three memory tools."""
        return list(_SPECS)

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Run one memory tool; bad input and an unavailable backend are tool errors."""
        svc = memory_service(self.cfg)
        args = arguments or {}
        role, user = ctx.agent, ctx.user
        try:
            if tool == "remember":
                meta = args.get("metadata")
                if meta is not None and not isinstance(meta, dict):
                    raise UserError("metadata must be a JSON object")
                mid, action = await svc.remember(args.get("text"), role=role, user=user,
                                                 task_id=ctx.task_id, metadata=meta)
                return ToolResult(json.dumps({"id": mid, "action": action}),
                                  structured={"id": mid, "action": action})
            if tool == "recall":
                k = args.get("k", 5)
                if not isinstance(k, int) or isinstance(k, bool):
                    raise UserError("k must be an integer")
                hits = await svc.recall(args.get("query"), role=role, user=user, k=k,
                                        scope=args.get("scope"), task_id=ctx.task_id)
                found = [h.public() for h in hits]
                return ToolResult(json.dumps(found, ensure_ascii=False), structured=found)
            if tool == "forget":
                mid = args.get("memory_id")
                if not isinstance(mid, str) or not mid:
                    raise UserError("memory_id must be a non-empty string")
                await svc.forget(mid, role=role, user=user)
                return ToolResult(json.dumps({"deleted": mid}))
        except UserError as exc:
            return ToolResult(str(exc), is_error=True)
        except (MemoryUnavailable, ImportError) as exc:
            return ToolResult(f"memory unavailable: {exc}", is_error=True)
        except Exception as exc:  # a store error reaches the model, not the agent's loop
            return ToolResult(f"memory error: {type(exc).__name__}: {exc}", is_error=True)
        return ToolResult(f"unknown tool {tool!r} in memory; known: forget, recall, remember",
                          is_error=True)
