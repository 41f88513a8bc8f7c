"""The supervisor: owns the task table (A2A `Task`s), routes turns between agents, streams events.

`Supervisor` is plain asyncio code over an `AgentPool`, so it runs the same over Ray actors
(`RayAgentPool`) and over in-process hosts (`LocalAgentPool`, for tests and debugging).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import msgspec

from swarm.config import SwarmConfig
from swarm.errors import RunError, TaskNotFound, UserError
from swarm.events import Event, TaskFinished, TaskStateChanged
from swarm.models.interface import Model, ModelRequest
from swarm.protocol import a2a
from swarm.runtime.agent import AgentHost, TurnRequest, TurnResult

log = logging.getLogger(__name__)

_MAX_EVENTS_PER_TASK = 20_000


class AgentPool(ABC):
    """How the supervisor reaches agent roles; a session sticks to one replica of a role."""

    @abstractmethod
    async def turn(self, role: str, key: str, req: TurnRequest) -> TurnResult:
        """Run one turn on the replica that `key` maps to."""

    @abstractmethod
    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Cancel a task's running turn on that replica."""


def replica_for(key: str, replicas: int) -> int:
    """The replica a session key sticks to (stable across processes and restarts)."""
    return zlib.crc32(key.encode()) % replicas if replicas > 1 else 0


class LocalAgentPool(AgentPool):
    """Agent hosts in this process, one per role (no Ray)."""

    def __init__(self, hosts: dict[str, AgentHost]) -> None:
        self.hosts = hosts

    async def turn(self, role: str, key: str, req: TurnRequest) -> TurnResult:
        """Run the turn in-process."""
        return await self.hosts[role].run_turn(req)

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Cancel the in-process turn."""
        self.hosts[role].cancel(task_id)


class RayAgentPool(AgentPool):
    """Agent roles as Ray actor replicas."""

    def __init__(self, handles: dict[str, list[Any]]) -> None:
        self.handles = handles

    def _pick(self, role: str, key: str) -> Any:
        replicas = self.handles[role]
        return replicas[replica_for(key, len(replicas))]

    async def turn(self, role: str, key: str, req: TurnRequest) -> TurnResult:
        """Call `run_turn` on the sticky replica; a dead actor is an orchestration error."""
        import ray

        try:
            result: TurnResult = await self._pick(role, key).run_turn.remote(req)
        except ray.exceptions.RayActorError as exc:
            raise _ActorLost(f"agent {role} replica died during the turn: {exc}") from None
        return result

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Ask the replica to cancel; a replica that is gone has nothing to cancel."""
        try:
            await self._pick(role, key).cancel.remote(task_id)
        except Exception:
            log.debug("cancel of %s on %s failed", task_id, role, exc_info=True)


class _ActorLost(RunError):
    error_class = "orchestration"


@dataclass
class TaskRecord:
    """One row of the task table: the A2A task plus what the runtime tracks about it."""

    task: Any  # a2a.types.Task
    user: str
    created: float
    transcript: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    driver: asyncio.Task[None] | None = None
    active: set[str] = field(default_factory=set)
    agent: str | None = None
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    updated: float = 0.0
    answer: str | None = None
    error_class: str | None = None
    error: str | None = None

    @property
    def id(self) -> str:
        return str(self.task.id)

    @property
    def state(self) -> str:
        return a2a.state_of(self.task)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready row for listings and the client."""
        return {
            "task_id": self.id,
            "context_id": self.task.context_id,
            "state": self.state,
            "user": self.user,
            "agent": self.agent,
            "steps": self.steps,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "created": self.created,
            "updated": self.updated,
            "answer": self.answer,
            "error_class": self.error_class,
            "error": self.error,
            "metadata": dict(self.task.metadata),
        }


class Supervisor:
    """Owns the task table of one swarm and drives each task through its agents."""

    def __init__(
        self,
        cfg: SwarmConfig,
        pool: AgentPool,
        router_model: Model | None = None,
        clock: Any = time.time,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.router_model = router_model
        self.clock = clock
        self.tasks: dict[str, TaskRecord] = {}

    # ---- API -------------------------------------------------------------------------------

    def submit(
        self,
        text: str,
        *,
        user: str = "anonymous",
        metadata: dict[str, Any] | None = None,
        context_id: str | None = None,
        task_id: str | None = None,
    ) -> str:
        """Create a task and start driving it; returns its id at once."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("task text must be a non-empty string")
        limit = self.cfg.limits.max_task_chars
        if len(text) > limit:
            raise UserError(
                f"task text is {len(text)} characters; this swarm accepts at most "
                f"{limit} (limits.max_task_chars)"
            )
        if not isinstance(user, str) or not user:
            raise UserError("user must be a non-empty string")
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise UserError(f"metadata must be JSON-serialisable: {e}") from None
        task_id = task_id or a2a.new_id()
        if task_id in self.tasks:
            raise UserError(f"task {task_id} already exists")
        context_id = context_id or a2a.new_id()
        first = a2a.text_message(
            text, role="user", task_id=task_id, context_id=context_id, metadata={"user": user}
        )
        meta.setdefault("user", user)
        rec = TaskRecord(
            task=a2a.new_task(task_id, context_id, first, meta), user=user, created=self.clock()
        )
        rec.updated = rec.created
        self._evict()
        self.tasks[task_id] = rec
        self._emit(rec, TaskStateChanged(task_id=task_id, ts=rec.created, state="submitted"))
        rec.driver = asyncio.create_task(self._drive(rec, text), name=f"task-{task_id}")
        return task_id

    def get(self, task_id: str) -> TaskRecord:
        """The record of a task, or `TaskNotFound`."""
        rec = self.tasks.get(task_id)
        if rec is None:
            raise TaskNotFound(f"no task {task_id!r} in swarm {self.cfg.name}")
        return rec

    def list(self, state: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """Summaries of tasks, newest first, optionally filtered."""
        if state is not None and state not in a2a.STATES:
            raise UserError(f"unknown state {state!r}; one of {sorted(a2a.STATES)}")
        rows = [
            r.summary()
            for r in self.tasks.values()
            if (state is None or r.state == state) and (user is None or r.user == user)
        ]
        return sorted(rows, key=lambda r: r["created"], reverse=True)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task that hasn't finished; a finished task is left as it is."""
        rec = self.get(task_id)
        if rec.state in a2a.TERMINAL:
            return rec.summary()
        if rec.driver is not None:
            rec.driver.cancel()
        for role in list(rec.active):
            await self.pool.cancel(role, rec.task.context_id, task_id)
        if rec.state not in a2a.TERMINAL:
            self._finish(rec, "canceled", error_class=None, error="canceled by request")
        return rec.summary()

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """Wait until the task is terminal (or the timeout passes) and return its summary."""
        rec = self.get(task_id)
        if not rec.done.is_set():
            try:
                await asyncio.wait_for(rec.done.wait(), timeout)
            except TimeoutError:
                pass
        return rec.summary()

    async def events(self, task_id: str, cursor: int, timeout: float) -> tuple[list[Event], bool]:
        """Events from `cursor` on, waiting up to `timeout` s for new ones; and whether it ended."""
        rec = self.get(task_id)
        if cursor >= len(rec.events) and not rec.done.is_set():
            waiter = rec.changed
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except TimeoutError:
                pass
        return rec.events[cursor:], rec.done.is_set()

    def push_events(self, batch: list[Event]) -> None:
        """Events flushed by agents during their turns."""
        for ev in batch:
            rec = self.tasks.get(ev.task_id)
            if rec is not None:
                self._emit(rec, ev)

    # ---- driving -----------------------------------------------------------------------------

    async def _drive(self, rec: TaskRecord, text: str) -> None:
        budget = self.cfg.budgets.task
        try:
            self._set_state(rec, "working")
            strategy = self.cfg.supervisor.strategy
            if strategy == "parallel":
                coro = self._parallel(rec, text)
            elif strategy == "router":
                coro = self._route(rec, text)
            else:
                coro = self._chain(rec, self.cfg.supervisor.entry or "", text, rec.transcript)
            remaining = rec.created + budget.max_wall_s - self.clock()
            try:
                result = await asyncio.wait_for(coro, max(remaining, 0.001))
            except TimeoutError:
                for role in list(rec.active):
                    await self.pool.cancel(role, rec.task.context_id, rec.id)
                self._finish(
                    rec, "failed", "budget", f"wall-clock limit reached ({budget.max_wall_s} s)"
                )
                return
            if result.kind == "final":
                self._finish(rec, "completed", answer=result.text)
            elif result.kind == "canceled":
                self._finish(rec, "canceled", None, "canceled")
            else:
                self._finish(
                    rec,
                    "failed",
                    result.error_class or "orchestration",
                    result.error or "turn failed",
                )
        except asyncio.CancelledError:
            if rec.state not in a2a.TERMINAL:
                self._finish(rec, "canceled", None, "canceled by request")
        except RunError as exc:
            self._finish(rec, "failed", exc.error_class, str(exc))
        except Exception as exc:  # one task's bug must never take the supervisor down
            log.exception("task %s crashed in the supervisor", rec.id)
            self._finish(rec, "failed", "orchestration", f"{type(exc).__name__}: {exc}")

    async def _chain(
        self, rec: TaskRecord, agent: str, text: str, transcript: list[dict[str, Any]]
    ) -> TurnResult:
        """Run turns from `agent`, following handoffs, until one ends the task."""
        handoffs = 0
        while True:
            result = await self._turn(rec, agent, text, transcript)
            if result.kind != "handoff":
                return result
            handoffs += 1
            if handoffs > self.cfg.supervisor.max_handoffs:
                return _failed(
                    rec.id,
                    agent,
                    "orchestration",
                    f"too many handoffs ({self.cfg.supervisor.max_handoffs} allowed)",
                )
            assert result.target is not None
            agent = result.target
            text = result.text or f"Continue the task (handed over by {result.agent})."

    async def _turn(
        self, rec: TaskRecord, agent: str, text: str, transcript: list[dict[str, Any]]
    ) -> TurnResult:
        budget = self.cfg.budgets.task
        remaining = budget.max_steps - rec.steps
        if remaining <= 0:
            return _failed(rec.id, agent, "budget", f"task step limit reached ({budget.max_steps})")
        max_steps = min(remaining, self.cfg.agents[agent].max_steps_per_turn)
        context_id = rec.task.context_id
        msg = a2a.text_message(
            text, role="user", task_id=rec.id, context_id=context_id, metadata={"to_agent": agent}
        )
        rec.task.history.append(msg)
        rec.agent = agent
        rec.active.add(agent)
        req = TurnRequest(
            task_id=rec.id,
            context_id=context_id,
            message=a2a.dumps(msg),
            transcript=transcript,
            step_offset=rec.steps,
            max_steps=max_steps,
            deadline=rec.created + budget.max_wall_s,
        )
        try:
            result = await self.pool.turn(agent, context_id, req)
        finally:
            rec.active.discard(agent)
        rec.task.history.append(a2a.loads_message(result.message))
        transcript.extend(result.added)
        rec.steps += result.steps
        rec.input_tokens += result.input_tokens
        rec.output_tokens += result.output_tokens
        for ev in result.events:
            self._emit(rec, ev)
        return result

    async def _parallel(self, rec: TaskRecord, text: str) -> TurnResult:
        """Fan the task out to every configured agent, then join the answers."""
        sup = self.cfg.supervisor
        branches = [list(rec.transcript) for _ in sup.agents]
        results = await asyncio.gather(
            *(self._chain(rec, a, text, t) for a, t in zip(sup.agents, branches, strict=True)),
            return_exceptions=True,
        )
        parts, failures = [], []
        for agent, res in zip(sup.agents, results, strict=True):
            if isinstance(res, BaseException):
                failures.append(f"{agent}: {res}")
            elif res.kind != "final":
                failures.append(f"{agent}: {res.error or res.kind}")
            else:
                parts.append((agent, res.text))
        if sup.join is None:
            if failures:
                return _failed(
                    rec.id, None, "orchestration", "parallel branch failed: " + "; ".join(failures)
                )
            return _final(rec.id, "\n\n".join(f"[{a}] {t}" for a, t in parts))
        if not parts:
            return _failed(
                rec.id,
                None,
                "orchestration",
                "every parallel branch failed: " + "; ".join(failures),
            )
        joined = "\n\n".join(
            [
                f"Task: {text}",
                *(f"## Result from {a}\n{t}" for a, t in parts),
                *(f"## Branch failed\n{f}" for f in failures),
            ]
        )
        return await self._chain(rec, sup.join, joined, rec.transcript)

    async def _route(self, rec: TaskRecord, text: str) -> TurnResult:
        """Ask the router model which agent should take the task, then run from there."""
        candidates = list(self.cfg.supervisor.agents)
        if self.router_model is None:
            return _failed(rec.id, None, "orchestration", "router strategy has no router model")
        tool = {
            "type": "function",
            "function": {
                "name": "route_to",
                "description": "Choose the agent that should handle the task.",
                "parameters": {
                    "type": "object",
                    "properties": {"agent": {"type": "string", "enum": candidates}},
                    "required": ["agent"],
                },
            },
        }
        desc = "\n".join(f"- {a}: {self.cfg.agents[a].instructions or a}" for a in candidates)
        resp = await self.router_model.complete(
            ModelRequest(
                messages=[
                    {"role": "system", "content": f"Route the task to one of:\n{desc}"},
                    {"role": "user", "content": text},
                ],
                tools=[tool],
                session_id=rec.task.context_id,
                agent="router",
            )
        )
        rec.input_tokens += resp.usage.input_tokens
        rec.output_tokens += resp.usage.output_tokens
        chosen = None
        for call in resp.tool_calls:
            if call.name == "route_to":
                try:
                    chosen = json.loads(call.arguments or "{}").get("agent")
                except (json.JSONDecodeError, AttributeError):
                    chosen = None
                break
        if chosen not in candidates:
            return _failed(
                rec.id, None, "model", f"router chose {chosen!r}, which is not one of {candidates}"
            )
        return await self._chain(rec, chosen, text, rec.transcript)

    # ---- table bookkeeping -------------------------------------------------------------------

    def _emit(self, rec: TaskRecord, ev: Event) -> None:
        events = rec.events
        if len(events) >= _MAX_EVENTS_PER_TASK and not isinstance(ev, TaskFinished):
            return
        if rec.done.is_set() and events and isinstance(events[-1], TaskFinished):
            # A late batch from an agent: keep TaskFinished last.
            last = events.pop()
            events.append(msgspec.structs.replace(ev, seq=len(events)))
            events.append(msgspec.structs.replace(last, seq=len(events)))
        else:
            events.append(msgspec.structs.replace(ev, seq=len(events)))
        rec.changed.set()
        rec.changed = asyncio.Event()

    def _set_state(self, rec: TaskRecord, state: str, detail: str = "") -> None:
        a2a.set_state(rec.task, state)
        rec.updated = self.clock()
        self._emit(
            rec, TaskStateChanged(task_id=rec.id, ts=rec.updated, state=state, detail=detail)
        )

    def _finish(
        self,
        rec: TaskRecord,
        state: str,
        error_class: str | None = None,
        error: str | None = None,
        answer: str | None = None,
    ) -> None:
        if rec.state in a2a.TERMINAL:
            return
        reply = a2a.text_message(
            answer if answer is not None else (error or ""),
            role="agent",
            task_id=rec.id,
            context_id=rec.task.context_id,
        )
        a2a.set_state(rec.task, state, reply)
        if answer is not None:
            a2a.add_answer(rec.task, answer)
        rec.answer, rec.error_class, rec.error = answer, error_class, error
        rec.updated = self.clock()
        self._emit(
            rec, TaskStateChanged(task_id=rec.id, ts=rec.updated, state=state, detail=error or "")
        )
        self._emit(
            rec,
            TaskFinished(
                task_id=rec.id,
                ts=rec.updated,
                agent=rec.agent,
                state=state,
                answer=answer,
                error_class=error_class,
                error=error,
                steps=rec.steps,
                input_tokens=rec.input_tokens,
                output_tokens=rec.output_tokens,
            ),
        )
        rec.done.set()

    def _evict(self) -> None:
        """Drop the oldest finished tasks once the table is full."""
        limit = self.cfg.limits.max_tasks
        if len(self.tasks) < limit:
            return
        for tid in [t for t, r in self.tasks.items() if r.done.is_set()]:
            if len(self.tasks) < limit:
                break
            del self.tasks[tid]
        if len(self.tasks) >= limit:
            raise UserError(
                f"swarm {self.cfg.name} has {len(self.tasks)} unfinished tasks; "
                f"limits.max_tasks is {limit}"
            )


def _failed(task_id: str, agent: str | None, error_class: str, error: str) -> TurnResult:
    return TurnResult(
        task_id=task_id,
        agent=agent or "",
        kind="failed",
        message=a2a.dumps(a2a.text_message(error, role="agent", task_id=task_id)),
        error_class=error_class,
        error=error,
    )


def _final(task_id: str, text: str) -> TurnResult:
    return TurnResult(
        task_id=task_id,
        agent="",
        kind="final",
        text=text,
        message=a2a.dumps(a2a.text_message(text, role="agent", task_id=task_id)),
    )


class SupervisorActor:
    """Ray actor wrapper of `Supervisor`: creates the agent replicas and serves the client API."""

    def __init__(
        self,
        cfg: SwarmConfig,
        endpoints: dict[str, str],
        deployment: str,
        namespace: str,
        detached: bool,
    ) -> None:
        import ray

        from swarm.models import build_model
        from swarm.runtime.agent import AgentActor

        self.deployment = deployment
        self.endpoints = endpoints
        me = ray.get_runtime_context().current_actor
        remote_cls = ray.remote(AgentActor)
        handles: dict[str, list[Any]] = {}
        for role, acfg in cfg.agents.items():
            handles[role] = [
                remote_cls.options(
                    name=agent_actor_name(deployment, role, i),
                    namespace=namespace,
                    lifetime="detached" if detached else None,
                    get_if_exists=True,
                    max_restarts=-1,
                    max_concurrency=acfg.max_sessions + 64,
                    num_cpus=acfg.num_cpus,
                ).remote(cfg, role, endpoints, me, i)
                for i in range(acfg.replicas)
            ]
        self.handles = handles
        router = None
        if cfg.supervisor.router_model is not None:
            name = cfg.supervisor.router_model
            router = build_model(name, cfg.models[name], endpoints)
        self.sup = Supervisor(cfg, RayAgentPool(handles), router)

    async def ready(self) -> list[dict[str, Any]]:
        """Wait for every agent replica to start; report their tools and start-up problems."""
        return list(
            await asyncio.gather(*(h.ready.remote() for hs in self.handles.values() for h in hs))
        )

    async def info(self) -> dict[str, Any]:
        """Name, agents and replicas, models and their endpoints, and task counts."""
        counts: dict[str, int] = {}
        for rec in self.sup.tasks.values():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        cfg = self.sup.cfg
        return {
            "name": cfg.name,
            "deployment": self.deployment,
            "agents": {r: len(h) for r, h in self.handles.items()},
            "entry": cfg.supervisor.entry,
            "strategy": cfg.supervisor.strategy,
            "endpoints": self.endpoints,
            "tasks": counts,
            "max_task_chars": cfg.limits.max_task_chars,
        }

    async def submit(
        self,
        text: str,
        user: str = "anonymous",
        metadata: dict[str, Any] | None = None,
        context_id: str | None = None,
    ) -> str:
        """Create a task; see `Supervisor.submit`."""
        return self.sup.submit(text, user=user, metadata=metadata, context_id=context_id)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """A task's summary plus its A2A `Task` as wire bytes under `a2a`."""
        rec = self.sup.get(task_id)
        return {**rec.summary(), "a2a": a2a.dumps(rec.task)}

    async def list_tasks(
        self, state: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        """Task summaries, newest first."""
        return self.sup.list(state, user)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task."""
        return await self.sup.cancel(task_id)

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a task to end (bounded by `timeout`)."""
        return await self.sup.wait(task_id, timeout)

    async def events(
        self, task_id: str, cursor: int = 0, timeout: float = 10.0
    ) -> tuple[list[Event], bool]:
        """Long-poll a task's events from `cursor`."""
        return await self.sup.events(task_id, cursor, min(max(timeout, 0.0), 60.0))

    async def push_events(self, batch: list[Event]) -> None:
        """Receive a batch of live events from an agent replica."""
        self.sup.push_events(batch)

    async def shutdown(self) -> None:
        """Cancel running tasks and close the agents' connections."""
        for rec in self.sup.tasks.values():
            if rec.driver is not None and not rec.driver.done():
                rec.driver.cancel()
        await asyncio.gather(
            *(h.shutdown.remote() for hs in self.handles.values() for h in hs),
            return_exceptions=True,
        )


def supervisor_actor_name(deployment: str) -> str:
    """The Ray actor name of a deployed swarm's supervisor."""
    return f"{deployment}.supervisor"


def agent_actor_name(deployment: str, role: str, replica: int) -> str:
    """The Ray actor name of one agent replica."""
    return f"{deployment}.{role}.{replica}"
