"""The memory layer: puts session history and recalled memories into an agent turn's context.

Before the first model call of each turn (not on every call: a flag in the session's scratch),
the layer reads the session's history under the agent's `SessionPolicy` and, with `recall: k`,
the k memories nearest the turn's input, and puts both after the agent's instructions in the
turn's system message (replacing that message for this session only, so message indexes, the
journal and the transcript are untouched). Later calls of the turn cost one dict lookup.

Memory never fails a turn: a backend that is down (Redis, the embedder, LanceDB) leaves that part
out, logs a warning and emits an `Alert` (`memory.unavailable`, action `continue`); the task
carries on. A summary policy whose session has outgrown it starts a background model call that
folds the older exchanges into the summary, off the turn.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from swarm.events import Alert
from swarm.memory.service import MemoryService, agent_memory, memory_service, uses_memory
from swarm.runtime.middleware import Middleware, ModelCall, NextModel

if TYPE_CHECKING:
    from swarm.memory.session import History, SessionPolicy
    from swarm.models.interface import ModelResponse
    from swarm.runtime.step import Session

log = logging.getLogger(__name__)

_FLAG = "memory.primed"


class MemoryLayer(Middleware):
    """Primes each turn's system message with session history and recalled memories."""

    def __init__(self, svc: MemoryService, role: str, *, host: Any = None,
                 emit: Callable[[Any], None] | None = None) -> None:
        self.svc = svc
        self.role = role
        self.mem = agent_memory(svc.cfg, role)
        self.host = host
        self.emit = emit
        self._summary_model: Any = None

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Prime the turn's context before its first model call."""
        scratch = call.session.scratch
        if _FLAG not in scratch:
            scratch[_FLAG] = True
            await self.prime(call.session)
            # The call's record (swarm.runtime.step) times the call from here, not the priming.
            call.extra["start_ns"] = time.time_ns()
        return await nxt(call)

    async def prime(self, session: Session) -> None:
        """Add the history and recalled memories to the session's system message."""
        parts: list[str] = []
        if self.mem.session is not None:
            text = await self._history(session, self.mem.session)
            if text:
                parts.append(text)
        if self.mem.recall > 0:
            text = await self._recalled(session)
            if text:
                parts.append(text)
        if parts and session.messages and session.messages[0].get("role") == "system":
            base = session.messages[0]
            session.messages[0] = {**base, "content": "\n\n".join([base["content"], *parts])}

    async def _history(self, session: Session, policy: SessionPolicy) -> str:
        from swarm.memory.session import needs_summary, render, select

        sessions = self.svc.sessions()
        if sessions is None or not session.user:
            return ""
        # A task without a context id is its own session: session_id is then the task id.
        context = session.session_id
        last = None
        if policy.policy == "last_n":
            last = policy.turns
        t0 = time.perf_counter()
        try:
            history = await asyncio.wait_for(
                sessions.history(self.svc.swarm, session.user, context, last),
                self.svc.settings.session.timeout_s * 2)
        except Exception as exc:
            self._unavailable(session, f"session history unavailable: {exc}")
            self._count("session_read", "error", t0)
            return ""
        self._count("session_read", "ok", t0)
        summary, chosen = select(history, policy)
        fold = needs_summary(history, policy)
        if fold:
            self.svc.background(self._summarize(session.user, context, history, fold, policy))
        return render(summary, chosen)

    async def _recalled(self, session: Session) -> str:
        query = ""
        for msg in reversed(session.messages):
            if msg.get("role") == "user" and isinstance(msg.get("content"), str):
                query = msg["content"]
                break
        if not query.strip():
            return ""
        query = query[: self.svc.settings.long_term.max_chars]
        try:
            hits = await self.svc.recall(query, role=self.role, user=session.user,
                                         k=self.mem.recall, min_score=self.mem.min_score,
                                         task_id=session.task_id)
        except Exception as exc:
            self._unavailable(session, f"long-term memory unavailable: {exc}")
            return ""
        if not hits:
            return ""
        lines = ["Things you remember that may be relevant (long-term memory, best first):"]
        lines.extend(f"- {h.text}" for h in hits)
        return "\n".join(lines)

    async def aclose(self) -> None:
        """Finish background summaries; close the memory clients."""
        await self.svc.aclose()

    def _count(self, operation: str, outcome: str, t0: float) -> None:
        meter = self.svc.meter
        if meter is not None:
            from swarm.memory.service import MEMORY_LATENCY, MEMORY_OPS

            meter.add(MEMORY_OPS, self.svc.swarm, self.role, operation, outcome)
            meter.observe(MEMORY_LATENCY, self.svc.swarm, self.role, operation,
                          value=(time.perf_counter() - t0) * 1e3)

    def _unavailable(self, session: Session, detail: str) -> None:
        log.warning("agent %s, task %s: %s; continuing without it", self.role, session.task_id,
                    detail)
        if self.emit is not None:
            self.emit(Alert(task_id=session.task_id, ts=time.time(), agent=self.role,
                            alert="memory.unavailable", action="continue", detail=detail[:500]))

    def _model(self, policy: SessionPolicy) -> Any:
        if self._summary_model is None:
            own = self.svc.cfg.agents[self.role].model
            name = policy.model or own
            if name == own and self.host is not None:
                self._summary_model = self.host.model
            else:
                from swarm.models import build_model

                endpoints = getattr(self.host, "endpoints", None) or self.svc.endpoints
                self._summary_model = build_model(name, self.svc.cfg.models[name], endpoints)
        return self._summary_model

    async def _summarize(self, user: str, context: str, history: History, fold: list[Any],
                         policy: SessionPolicy) -> None:
        """Fold `fold` into the session's summary with the policy's model (in the background;
        a concurrent writer that got there first wins)."""
        from swarm.memory.session import summary_prompt
        from swarm.models.interface import ModelRequest

        sessions = self.svc.sessions()
        if sessions is None:
            return
        try:
            resp = await self._model(policy).complete(ModelRequest(
                messages=summary_prompt(history.summary, fold, policy.max_tokens),
                agent=self.role, session_id=context))
            text = (resp.content or "").strip()
            if text:
                await sessions.set_summary(self.svc.swarm, user, context, text,
                                           upto=fold[-1].n, expect_upto=history.summary_upto)
        except Exception as exc:
            log.warning("agent %s: rolling summary of a session failed: %s", self.role, exc)


def memory_layer(cfg: Any, role: str, *, store: Any = None, host: Any = None,
                 emit: Callable[[Any], None] | None = None, ledger: Any = None
                 ) -> MemoryLayer | None:
    """The role's memory layer, or None when it needs none; binds the process's memory
    service to the store, endpoints and usage ledger either way."""
    if not uses_memory(cfg, role):
        return None
    svc = memory_service(cfg)
    svc.bind(store=store, endpoints=getattr(host, "endpoints", None), ledger=ledger)
    mem = agent_memory(cfg, role)
    if mem.session is None and mem.recall == 0:
        return None  # tools only: nothing to put in the context
    return MemoryLayer(svc, role, host=host, emit=emit)
