"""Agent roles: `AgentHost` runs many concurrent sessions of one role; `AgentActor` wraps it in Ray.

A role's step loop, model client and tool connections are built once per replica and shared by
all its sessions (DESIGN decision 1). Ray is touched only at turn boundaries: the supervisor calls
`run_turn`, and events are flushed to the supervisor in batches off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from swarm import events
from swarm.config import MCPStdioConfig, SwarmConfig
from swarm.errors import classify
from swarm.events import Event, TurnResumed
from swarm.governance.stuck import StuckError
from swarm.models.interface import Model
from swarm.protocol import a2a
from swarm.runtime.journal import Journal
from swarm.runtime.middleware import build_middleware
from swarm.runtime.step import Outcome, Session, StepLoop, TurnLimits
from swarm.runtime.toolbox import Toolbox, note_unlisted
from swarm.state import codec
from swarm.state.interface import Checkpointer, Fenced, LostWrites, Snapshot, StoreUnavailable
from swarm.state.replay import TaskState, agent_usage, fold, latest_snapshot, read_after
from swarm.tools.access import function_tool_names, granted_servers
from swarm.tools.interface import ToolSource

log = logging.getLogger(__name__)

# Live events go to the supervisor every 50 ms, or, while a replica makes more than
# `_FLUSH_BUSY_RATE` events a second, less often: up to every 250 ms, as the rate grows. A push
# is a Ray call, which costs about a millisecond of CPU over the processes it passes through
# whatever it carries; at thousands of steps a second, pushes of a few hundred events each
# cost about a tenth of the step's CPU (scripts/bench_suite.py's concurrency workload).
_FLUSH_INTERVAL_S = 0.05
_FLUSH_MAX_INTERVAL_S = 0.25
_FLUSH_BUSY_RATE = 2000.0  # events a second
_REPORT_RETRY_S = 60.0  # how long turn results are re-sent to a supervisor that is unreachable
_HOT_TIMEOUT_S = 2.0


def flush_interval(flushed: int, interval: float) -> float:
    """The wait before the next push of live events, after `flushed` events came in the last
    `interval` seconds: the base interval up to `_FLUSH_BUSY_RATE` events a second, then in
    proportion to the rate, up to `_FLUSH_MAX_INTERVAL_S`."""
    rate = flushed / max(interval, 1e-3)
    return min(max(_FLUSH_INTERVAL_S * rate / _FLUSH_BUSY_RATE, _FLUSH_INTERVAL_S),
               _FLUSH_MAX_INTERVAL_S)


@dataclass(slots=True)
class TurnRequest:
    """The supervisor asks an agent to take a turn on a task (an A2A message plus context)."""

    task_id: str
    context_id: str
    message: bytes  # A2A Message wire bytes: the input for this turn
    transcript: list[dict[str, Any]]
    step_offset: int
    max_steps: int
    deadline: float | None = None
    traceparent: str | None = None
    # Durable state: which log, which turn, whether to resume it, and the task's counters so
    # far (handoffs, turns, tokens, calls) for the snapshots this turn writes.
    log_id: str = ""
    turn_id: str = ""
    resume: bool = False
    decision: str | None = None
    totals: dict[str, int] = field(default_factory=dict)
    # On a resume: [ObjectRef] of the task's latest snapshot in the object store, if any.
    hot: list[Any] | None = None
    # On a resume: the last step of this turn its events reported finished where that means
    # durable (`state.checkpoint` every_step or every_call), 0 if none: the log must reach it.
    durable_step: int = 0
    # Governance for this turn (swarm.governance): "budget" (an Allowance), "steps_why",
    # "stuck_from" (transcript index stuck detection counts from).
    guard: dict[str, Any] | None = None
    user: str = ""  # who submitted the task (per-user rate limits, audit)
    # Whether the result should carry the messages the turn added (`TurnResult.added`) even
    # when the turn ends the task: a supervisor with a durable store drops a finished task's
    # transcript (the log has it), so it asks for them only for turns that go on (handoffs,
    # questions, a stuck turn an operator may continue).
    added_at_end: bool = True
    # What each agent's ended turns in this task used (`replay.AgentUsage` fields by agent),
    # so the log's snapshots carry it for a restarted supervisor's per-agent budgets.
    by_agent: dict[str, dict[str, float]] = field(default_factory=dict)


class _TurnKeys(NamedTuple):
    """The fields of a `TurnRequest` a turn reads at its end."""

    task_id: str
    context_id: str
    turn_id: str
    step_offset: int
    added_at_end: bool


@dataclass(slots=True)
class TurnResult:
    """What a turn produced: an A2A reply, the transcript it added, usage and its last events."""

    task_id: str
    agent: str
    kind: Literal["final", "handoff", "failed", "canceled", "input_required"]
    message: bytes  # A2A Message wire bytes: the agent's reply
    text: str = ""
    target: str | None = None
    error_class: str | None = None
    error: str | None = None
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    # The messages the turn added; left empty for a turn that ended the task (final or
    # failed, not stuck) when the request's `added_at_end` is False.
    added: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    budget_exhausted: str | None = None  # the limit that ran out, if a budget ended the turn
    stuck: str | None = None  # the stuck detector that ended the turn, if one did
    gate: dict[str, Any] | None = None  # the approval gate an input_required turn waits on
    # The turn failed because the durable store could not be reached (`StoreUnavailable`,
    # after the store's own wait, state.outage_timeout_s). Its end is not logged: once the
    # store answers again the supervisor resumes it from the log (state.outage_wait_s).
    store_unavailable: bool = False


class EventBuffer:
    """Collects events per task; the actor flushes them in batches, a turn takes its own rest."""

    def __init__(self, forward: Callable[[list[Event]], None] | None = None) -> None:
        self._by_task: dict[str, list[Event]] = {}
        self._forward = forward

    def emit(self, event: Event) -> None:
        """Buffer one event (called on the hot path: an append), or forward it at once."""
        if self._forward is not None:
            self._forward([event])
            return
        buf = self._by_task.get(event.task_id)
        if buf is None:
            self._by_task[event.task_id] = [event]
        else:
            buf.append(event)

    def take(self, task_id: str) -> list[Event]:
        """Remove and return one task's buffered events."""
        return self._by_task.pop(task_id, [])

    def drain_runs(self) -> dict[str, list[Event]]:
        """Remove and return every buffered event, by task."""
        out, self._by_task = self._by_task, {}
        return out


def build_sources(cfg: SwarmConfig, names: set[str]) -> dict[str, ToolSource]:
    """Tool sources for the named servers of a config (not yet started)."""
    sources: dict[str, ToolSource] = {}
    for name in sorted(names):
        if name == "memory" and name not in cfg.tools:  # the built-in memory tools
            from swarm.memory.tools import MemoryToolSource

            sources[name] = MemoryToolSource(cfg)
            continue
        tcfg = cfg.tools[name]
        if tcfg.python is not None:
            from swarm.tools.function import FunctionToolSource

            sources[name] = FunctionToolSource.from_config(name, tcfg)
        else:
            from swarm.tools.mcp import MCPToolSource

            assert tcfg.mcp is not None
            mcp_cfg = tcfg.mcp
            if isinstance(mcp_cfg, MCPStdioConfig) and mcp_cfg.command in ("python", "python3"):
                # `python` in a config means the interpreter running swarm, so a server from
                # the same venv starts whether or not the venv is on PATH.
                mcp_cfg = mcp_cfg.model_copy(update={"command": sys.executable})
            sources[name] = MCPToolSource.from_config(name, tcfg, server=mcp_cfg)
    return sources


def default_instructions(swarm: str, role: str) -> str:
    """The system message of an agent whose config gives no instructions."""
    return f"You are the {role} agent of the {swarm} swarm."


class AgentHost:
    """Hosts the sessions of one agent role in one process; no Ray in here."""

    def __init__(
        self,
        cfg: SwarmConfig,
        role: str,
        model: Model,
        sources: dict[str, ToolSource],
        buffer: EventBuffer | None = None,
        store: Checkpointer | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.role = role
        self.agent_cfg = cfg.agents[role]
        self.model = model
        self.sources = sources
        self.buffer = buffer or EventBuffer()
        self._system = {
            "role": "system",
            "content": self.agent_cfg.instructions or default_instructions(cfg.name, role),
        }
        self._slots = asyncio.Semaphore(self.agent_cfg.max_sessions)
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._turns: dict[str, asyncio.Future[TurnResult]] = {}
        self._loop: StepLoop | None = None
        self._start_lock = asyncio.Lock()
        self._preparing: asyncio.Future[None] | None = None
        self.start_problems: list[str] = []
        # Called with each durable snapshot (the actor publishes it to the object store).
        self.publish_snapshot: Callable[[Snapshot], None] | None = None
        # Called with the seconds each journal append took (the metering layer sets it).
        self.on_checkpoint: Callable[[float], None] | None = None
        self._tracer: Any = None  # swarm.observability.tracing.SwarmTracer when tracing is on

    async def start(self) -> None:
        """Connect tool sources and resolve the toolbox; idempotent."""
        async with self._start_lock:
            if self._loop is not None:
                return
            # Together: N servers that don't answer cost one connect timeout, not N.
            started = await asyncio.gather(*(s.start() for s in self.sources.values()),
                                           return_exceptions=True)
            for source, exc in zip(self.sources.values(), started, strict=True):
                if isinstance(exc, asyncio.CancelledError):
                    raise exc
                if isinstance(exc, BaseException):
                    # A tool server that is down costs only the calls that touch it.
                    self.start_problems.append(f"{source.name}: {exc}")
                    note_unlisted(source, exc)
                    log.warning(
                        "agent %s: tool source %s did not start: %s", self.role, source.name, exc
                    )
            toolbox = await Toolbox.build(
                self.role, self.agent_cfg.tools, self.sources, self.agent_cfg.handoffs,
                deny=self.agent_cfg.deny_tools,
                others=function_tool_names(self.cfg.tools, exclude=self.sources),
                down={s.name for s, exc in zip(self.sources.values(), started, strict=True)
                      if isinstance(exc, BaseException)},
            )
            for problem in toolbox.problems:
                self.start_problems.append(problem)
                log.warning("agent %s: %s", self.role, problem)
            model_cfg = self.cfg.models[self.agent_cfg.model]
            from swarm.observability.tracing import swarm_tracer

            self._tracer = swarm_tracer(self.cfg)
            # In the background: a turn may start before it is done (the model copes).
            self._preparing = asyncio.ensure_future(self.model.prepare())
            self._preparing.add_done_callback(self._prepared)
            self._loop = StepLoop(
                agent=self.role,
                model=self.model,
                toolbox=toolbox,
                emit=self.buffer.emit,
                model_name=getattr(model_cfg, "model", self.agent_cfg.model),
                middleware=build_middleware(self.cfg, self.role, store=self.store,
                                            emit=self.buffer.emit, host=self),
            )

    def _prepared(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("agent %s: preparing the model failed: %s", self.role, fut.exception())

    @property
    def toolbox(self) -> Toolbox:
        """The resolved toolbox (after `start`)."""
        if self._loop is None:
            raise RuntimeError("agent not started")
        return self._loop.toolbox

    def sessions(self) -> int:
        """Sessions running now."""
        return len(self._running)

    async def run_turn(self, req: TurnRequest) -> TurnResult:
        """Run (or resume) one turn of a task; never raises for a task's own failure.

        A resume of a turn that is still running here (its supervisor restarted, this replica
        didn't) joins that turn instead of starting a second copy of it.
        """
        # Shielded: a caller that goes away (a supervisor dying) doesn't cancel the turn;
        # `cancel` does.
        return await asyncio.shield(self.start_turn(req))

    def start_turn(self, req: TurnRequest) -> asyncio.Future[TurnResult]:
        """Start a turn, or join it (`run_turn`), and return its Task without waiting for it.
        Posted turns start here: the turn's one Task, with no second Task and shield around
        it per session. Raises if the task has a turn running here and this is no resume."""
        current = self._turns.get(req.task_id)
        if current is not None and not current.done():
            if req.resume:
                return current
            raise RuntimeError(f"task {req.task_id} already has a turn running on {self.role}")
        turn = asyncio.ensure_future(self._run_turn(req))
        self._turns[req.task_id] = turn
        turn.add_done_callback(functools.partial(self._forget_turn, req.task_id))
        return turn

    def _forget_turn(self, task_id: str, done: asyncio.Future[TurnResult]) -> None:
        if self._turns.get(task_id) is done:
            del self._turns[task_id]

    async def _run_turn(self, req: TurnRequest) -> TurnResult:
        if self._loop is None:
            await self.start()
        loop = self._loop
        assert loop is not None
        text = a2a.message_text(a2a.loads_message(req.message))
        keys = _TurnKeys(req.task_id, req.context_id, req.turn_id, req.step_offset,
                         req.added_at_end)
        async with self._slot():
            self._running[req.task_id] = asyncio.current_task()  # type: ignore[assignment]
            session = Session(
                task_id=req.task_id, agent=self.role, session_id=req.context_id or req.task_id,
                messages=[self._system, *req.transcript, {"role": "user", "content": text}],
                step=req.step_offset, traceparent=req.traceparent, user=req.user,
            )
            trace = None if self._tracer is None else \
                self._tracer.start_agent(req, self.role, loop.model_name)
            if trace is not None:
                # The parent of the turn's chat and execute_tool spans, looked up once (the
                # metering layer puts its ids in `span_ids` for the calls' records).
                session.scratch["span"] = trace[0].get_span_context()
            for layer in loop.middleware:
                layer.on_turn_start(session)
            first = 1 + len(req.transcript)  # index of this turn's first message
            limits = TurnLimits(max_steps=req.max_steps, deadline=req.deadline)
            session.scratch["deadline"] = req.deadline  # rate limits wait no longer than this
            if req.guard:
                session.scratch.update(req.guard)
                limits.steps_why = req.guard.get("steps_why", "")
                budget = req.guard.get("budget")
                if budget is not None:
                    limits.deadline_why = budget.why.get("wall_s", limits.deadline_why)
                    if budget.deadline is not None and (
                            limits.deadline is None or budget.deadline < limits.deadline):
                        limits.deadline = budget.deadline  # the agent's max_wall_s, the nearer
            if self.cfg.budgets.on_exhausted == "wrap_up":
                limits.wrap_up = self.cfg.budgets.wrap_up_message
            marks: tuple[str | None, str | None] = (None, None)
            gate: dict[str, Any] | None = None
            superseded = False
            down: BaseException | None = None  # the StoreUnavailable that stopped the turn
            try:
                outcome: Outcome | None = None
                if self.store is not None:
                    outcome, first = await self._open(req, session, text, limits)
                # From here on the turn reads `keys`: the request (its message bytes, counters
                # and guard, a kilobyte or so) can go for the turn's length where nothing else
                # holds it, as for a replica's posted turn.
                del req
                if outcome is None:
                    outcome = await loop.run_turn(session, limits)
                kind, reply = outcome.kind, outcome.text
                marks = (outcome.budget_exhausted, outcome.stuck)
                gate = outcome.gate
                error_class, error, target = outcome.error_class, outcome.error, outcome.target
            except asyncio.CancelledError:
                kind, reply, error_class, error, target = "canceled", "", None, "canceled", None
            except Fenced as exc:
                # Another copy of this turn took the task over; it reports the outcome.
                log.warning("agent %s: %s", self.role, exc)
                kind, reply, target = "canceled", "", None
                error_class, error = "orchestration", str(exc)
                superseded = True
            except StoreUnavailable as exc:
                down = exc
            except Exception as exc:  # a bug in the loop must not take the role down
                log.exception("agent %s: turn of task %s crashed", self.role, keys.task_id)
                kind, reply, target = "failed", "", None
                error_class, error = classify(exc), f"{type(exc).__name__}: {exc}"
            finally:
                self._running.pop(keys.task_id, None)
                loop.end_turn(session)  # its deadline timer, if a resume ended the turn
            for layer in loop.middleware:
                layer.on_turn_end(session)
            if down is None and session.journal is not None and kind != "canceled" and \
                    isinstance(session.journal.failure, StoreUnavailable):
                down = session.journal.failure  # taken for a tool's error on its way up
            if superseded or down is not None:
                pass
            elif session.journal is not None and kind not in ("canceled", "input_required"):
                # Logged after the turn, so a crash before this resumes the turn instead. A
                # turn waiting for an operator hasn't ended: it resumes with the answer.
                end = {"outcome": kind, "text": reply, "target": target,
                       "error_class": error_class, "error": error, "turn": keys.turn_id}
                if marks[1] is not None:
                    # A stuck detector ended it: with stuck.action escalate, the task waits
                    # for an operator, which a restarted supervisor reads from here.
                    end["stuck"] = marks[1]
                try:
                    await session.journal.turn_end(session.step, end)
                except Fenced as exc:
                    # Taken over while its last step waited to be written with the turn's end
                    # (`Journal.end_step`): the copy that took over reports the outcome.
                    log.warning("agent %s: %s", self.role, exc)
                    kind, reply, target = "canceled", "", None
                    error_class, error = "orchestration", str(exc)
                except StoreUnavailable as exc:  # the end, or the last step written with it
                    down = exc
            elif session.journal is not None and kind == "canceled" and self.store is not None:
                # Under every_n / phase, steps a cancel cut short are still buffered: keep them
                # in the log (history and fork see them); a failing store doesn't hide the cancel.
                try:
                    await session.journal.checkpoint()
                except Exception:
                    log.warning("task %s: buffered steps lost at cancel", keys.task_id,
                                exc_info=True)
        if down is not None:
            # Not the turn's end: nothing is logged for it, so the log keeps the turn open up
            # to its last durable step, and the supervisor resumes it from there once the
            # store answers again (finished tool calls are not run again).
            log.warning("agent %s: turn of task %s stopped, the store is unreachable: %s",
                        self.role, keys.task_id, down)
            kind, reply, target = "failed", "", None
            error_class, error = "checkpoint", f"{type(down).__name__}: {down}"
        if trace is not None:
            self._tracer.end_agent(trace, kind, error_class, error, session, target,
                                   session.step - keys.step_offset)
        out = a2a.text_message(
            reply or (error or ""), role="agent", task_id=keys.task_id,
            context_id=keys.context_id, metadata={"agent": self.role, "outcome": kind},
        )
        return TurnResult(
            task_id=keys.task_id, agent=self.role, kind=kind,  # type: ignore[arg-type]
            message=a2a.dumps(out), text=reply, target=target if kind == "handoff" else None,
            error_class=error_class, error=error, steps=session.step - keys.step_offset,
            input_tokens=session.input_tokens, output_tokens=session.output_tokens,
            cached_tokens=session.cached_tokens, model_calls=session.model_calls,
            tool_calls=session.tool_calls,
            added=session.messages[first:] if keys.added_at_end or marks[1] is not None
            or kind not in ("final", "failed") else [],
            budget_exhausted=marks[0], stuck=marks[1], gate=gate,
            events=self.buffer.take(keys.task_id), store_unavailable=down is not None,
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """A session slot of this replica; waiting longer than stuck.queue_timeout_s for one
        raises `StuckError` (the supervisor stops the task)."""
        timeout = self.cfg.stuck.queue_timeout_s
        if timeout is None or not self._slots.locked():
            async with self._slots:
                yield
            return
        try:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for loses a cancel that lands
            # as the slot is granted, and a cancelled turn would run anyway.
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise StuckError("queue_timeout", (
                f"waited {timeout:g} s (stuck.queue_timeout_s) for a session slot on agent "
                f"{self.role}: all {self.agent_cfg.max_sessions} (max_sessions) are busy"
            )) from None
        try:
            yield
        finally:
            self._slots.release()

    async def _open(self, req: TurnRequest, session: Session, text: str, limits: TurnLimits
                    ) -> tuple[Outcome | None, int]:
        """Attach a journal; on resume, rebuild the session from the log and finish what a
        crash interrupted. Returns an outcome if the turn had already ended, and the index of
        the turn's first message in the session."""
        assert self.store is not None and self._loop is not None
        log_id = req.log_id or req.task_id
        session.log_id = log_id
        snapshot_every = self.cfg.state.snapshot_every
        first = 1 + len(req.transcript)
        # Every copy of a turn claims the task's log: a copy still running elsewhere (cut off,
        # not dead) can't write, or start a tool call, from now on.
        fence = await self.store.claim(log_id)
        if req.resume:
            t0 = time.perf_counter()
            # The hot snapshot if the supervisor holds one, else the store's newest.
            snapshot = await self._hot_snapshot(req, log_id)
            source, problems = "hot", []
            if snapshot is None:
                snapshot, problems = await latest_snapshot(self.store, log_id)
                source = "durable" if snapshot is not None else "log"
            for problem in problems:
                log.warning("agent %s: %s", self.role, problem)
            entries = await read_after(self.store, log_id, snapshot)
            state = fold(snapshot, entries)
            turn, done = state.open_turn, state.last_outcome
            # This turn in the log: still open, or ended with its result never delivered.
            open_here = turn is not None and turn.agent == self.role
            ended_here = turn is None and done is not None and \
                done.get("turn") == req.turn_id and done.get("agent") == self.role
            self._check_durable(req, log_id, state, open_here or ended_here)
            if open_here:
                assert turn is not None
                self.buffer.emit(TurnResumed(
                    task_id=req.task_id, ts=time.time(), agent=self.role, step=state.step,
                    source=source, restore_ms=(time.perf_counter() - t0) * 1e3,
                    entries_replayed=len(entries)))
                session.messages = [self._system, *state.transcript]
                session.step = state.step
                # Where its stuck detection counted from, as the turn's start says (a
                # restarted supervisor doesn't know it).
                session.scratch["stuck_from"] = turn.stuck_from
                self._own_counters(session, state, turn.base)
                session.journal = Journal(self.store, log_id, self.role, turn=turn.turn,
                                          snapshot_every=snapshot_every, base=state,
                                          checkpoint=self.cfg.state.checkpoint,
                                          checkpoint_every=self.cfg.state.checkpoint_every,
                                          fence=fence, write_behind=self.cfg.state.write_behind)
                session.journal.on_snapshot = self.publish_snapshot
                session.journal.on_append = self.on_checkpoint
                outcome = await self._loop.resume(session, state.pending, req.decision, limits,
                                                  turn_start=1 + turn.start)
                return outcome, 1 + turn.start
            ended = state.last_turn
            if ended_here:
                assert done is not None
                # The turn ended but its result never reached the supervisor: report it as it
                # was, its messages and usage rebuilt from the log.
                if ended is not None:
                    session.messages = [self._system, *state.transcript]
                    session.step = state.step
                    self._own_counters(session, state, ended.base)
                    first = 1 + ended.start
                return Outcome(done["outcome"], text=done.get("text") or "",
                               target=done.get("target"), error_class=done.get("error_class"),
                               error=done.get("error"), stuck=done.get("stuck")), first
        totals = req.totals
        base = TaskState(
            step=req.step_offset, handoffs=totals.get("handoffs", 0),
            turns=totals.get("turns", 0), input_tokens=totals.get("input_tokens", 0),
            output_tokens=totals.get("output_tokens", 0),
            model_calls=totals.get("model_calls", 0), tool_calls=totals.get("tool_calls", 0),
            transcript=[], by_agent=agent_usage(req.by_agent),
        )
        session.journal = Journal(self.store, log_id, self.role, turn=req.turn_id,
                                  snapshot_every=snapshot_every, base=base,
                                  checkpoint=self.cfg.state.checkpoint,
                                  checkpoint_every=self.cfg.state.checkpoint_every,
                                  fence=fence, write_behind=self.cfg.state.write_behind)
        session.journal.on_snapshot = self.publish_snapshot
        session.journal.on_append = self.on_checkpoint
        await session.journal.turn_start(text, len(req.transcript),
                                         int(session.scratch.get("stuck_from", 0)))
        return None, first

    def _check_durable(self, req: TurnRequest, log_id: str, state: TaskState,
                       found: bool) -> None:
        """Refuse to resume a turn from a log that lost steps the turn had reported durable
        (the store restarted without its data, say): started over from there, the turn would
        run finished tool calls again. `found`: whether the log has the turn at all."""
        if req.durable_step <= req.step_offset:
            return
        if not found or state.step < req.durable_step:
            reached = f"ends at step {state.step}" if found else "has nothing of the turn"
            raise LostWrites(log_id, req.durable_step, state.step, self.store, what=(
                f"step {req.durable_step} of turn {req.turn_id} of agent {self.role} was "
                f"reported durable, but its log {reached}"))

    async def _hot_snapshot(self, req: TurnRequest, log_id: str) -> Snapshot | None:
        """The task's latest snapshot from the Ray object store, if the supervisor holds one
        and it is still there (its owner may have died: then the durable copy serves)."""
        if not req.hot:
            return None
        try:
            data = await asyncio.wait_for(req.hot[0], _HOT_TIMEOUT_S)
            snap = codec.decode(Snapshot, data, task_id=log_id, what="hot snapshot")
        except Exception as exc:
            log.info("agent %s: hot snapshot of %s unusable (%s); using the store",
                     self.role, log_id, exc)
            return None
        return snap if snap.task_id == log_id else None

    @staticmethod
    def _own_counters(session: Session, state: TaskState, base: dict[str, int]) -> None:
        # Session counters are the turn's own: the task's totals less the turn's base.
        session.input_tokens = state.input_tokens - base.get("input_tokens", 0)
        session.output_tokens = state.output_tokens - base.get("output_tokens", 0)
        session.model_calls = state.model_calls - base.get("model_calls", 0)
        session.tool_calls = state.tool_calls - base.get("tool_calls", 0)

    def cancel(self, task_id: str) -> bool:
        """Cancel the running turn of a task, if this host has one."""
        task = self._running.get(task_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def stop_turns(self, timeout: float = 10.0) -> int:
        """Cancel every turn this host runs or has waiting for a session slot, and wait for
        them (at most `timeout` s); returns how many there were. A cancelled turn writes no
        end to its log, so the task's next supervisor resumes it (the swarm going down)."""
        turns = [t for t in self._turns.values() if not t.done()]
        for t in turns:
            t.cancel()
        if turns:
            await asyncio.wait(turns, timeout=timeout)
        return len(turns)

    async def aclose(self) -> None:
        """Flush the middleware layers; close the model client and tool connections."""
        if self._preparing is not None and not self._preparing.done():
            self._preparing.cancel()
        if self._loop is not None:
            self._loop.toolbox.close()
        for layer in self._loop.middleware if self._loop is not None else ():
            try:
                await layer.aclose()
            except Exception:
                log.warning("agent %s: closing layer %s failed", self.role,
                            type(layer).__name__, exc_info=True)
        for source in self.sources.values():
            try:
                await source.aclose()
            except Exception:
                log.debug("closing %s failed", source.name, exc_info=True)
        await self.model.aclose()


class AgentActor:
    """Ray actor wrapper of `AgentHost`; created with `ray.remote(AgentActor).options(...)`.

    The supervisor posts turns (`post_turns` returns at once) and each turn's result comes back
    in a call of this replica's own (`SupervisorActor.turns_done`), so a running turn holds no
    Ray call open (Ray keeps tens of KB for each call in flight); one long-lived `watch` call
    tells the supervisor when this replica dies. Posts and reports are batched: while one is in
    flight, the next ones gather.

    After a crash Ray restarts it and the constructor runs again with nothing in memory (and a
    new `incarnation`); the supervisor then re-sends the interrupted turns with `resume=True`,
    and the host rebuilds each session from the durable log.
    """

    def __init__(self, cfg: SwarmConfig, role: str, endpoints: dict[str, str], supervisor: Any,
                 replica: int = 0, store_spec: str | None = None) -> None:
        """`supervisor`: its handle, or its `ActorName`, looked up when the replica starts."""
        from swarm.models.agent import build_agent_model
        from swarm.observability.tracing import configure
        from swarm.runtime.supervisor_actor import open_store
        from swarm.runtime.tuning import tune_process

        # This actor's process traces into the swarm's trace store (and exporter).
        configure(cfg, store_spec, {"swarm.process": f"agent {role}.{replica}"})
        agent_cfg = cfg.agents[role]
        model = build_agent_model(cfg, role, endpoints)  # with fallbacks and context limit
        sources = build_sources(cfg, granted_servers(agent_cfg.tools, cfg.tools))
        self.replica = replica
        self.host = AgentHost(cfg, role, model, sources, store=open_store(store_spec, cfg))
        self.host.endpoints = endpoints  # type: ignore[attr-defined]  # memory: the embedder
        self.supervisor = supervisor
        if supervisor is not None:
            self.host.publish_snapshot = self._publish_snapshot
        self._flusher: asyncio.Task[None] | None = None
        self._started: asyncio.Task[None] | None = None
        # This instance: a restarted replica has another, so the supervisor can tell which
        # posted turns died with the previous one.
        self.incarnation = uuid.uuid4().hex
        self._outbox: list[tuple[str, TurnResult | str]] = []
        # Post calls taken, the turns in them and the most in one (see `stats`).
        self._posts = self._turns_posted = self._largest_post = 0
        self._reporter: asyncio.Task[None] | None = None  # sends the outbox while it isn't empty
        self._closing: asyncio.Event | None = None
        tune_process(cfg.process)  # last: what the constructor built is long-lived

    async def _ensure(self) -> None:
        started = self._started
        if started is None or (started.done() and (started.cancelled()
                                                   or started.exception() is not None)):
            # A start that failed (the store unreachable as the replica came up, say) is made
            # again by the next call, not kept as every later call's answer.
            started = self._started = asyncio.create_task(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        from swarm.runtime.supervisor_actor import ActorName

        if isinstance(self.supervisor, ActorName):
            # Created by `start_swarm` before the supervisor: that runs by now, since only it
            # calls this replica.
            self.supervisor = await asyncio.to_thread(self.supervisor.resolve)
        if self.host.store is not None:
            await self.host.store.start()
        await self.host.start()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    def _publish_snapshot(self, snap: Snapshot) -> None:
        # The supervisor puts it in the object store, so the object's owner outlives agent
        # replicas (Ray 2.56 dropped `ray.put(_owner=...)`): a resume on any replica reads it
        # from there instead of the durable store. Fire and forget, off the step path.
        self.supervisor.put_hot.remote(snap.task_id, snap.seq, codec.encode(snap))

    async def ready(self) -> dict[str, Any]:
        """Start the host (tools connected) and the event flusher; report what was found."""
        await self._ensure()
        box = self.host.toolbox
        return {
            "role": self.host.role, "replica": self.replica, "tools": box.names,
            "problems": self.host.start_problems, "granted": box.qualified,
            "unlisted": box.unlisted,
        }

    async def post_turns(self, posts: list[tuple[str, TurnRequest]]) -> str:
        """Start turns and return this instance's incarnation at once; each turn's result goes
        to the supervisor's `turns_done` under its post id when the turn ends."""
        await self._ensure()
        self._posts += 1
        self._turns_posted += len(posts)
        self._largest_post = max(self._largest_post, len(posts))
        for post_id, req in posts:
            try:
                turn = self.host.start_turn(req)
            except Exception as exc:  # reported as the turn's outcome, as a failed turn is
                turn = asyncio.get_running_loop().create_future()
                turn.set_exception(exc)
            turn.add_done_callback(functools.partial(self._turn_done, post_id, req.task_id))
        return self.incarnation

    def _turn_done(self, post_id: str, task_id: str, turn: asyncio.Future[TurnResult]) -> None:
        if turn.cancelled():
            outcome: TurnResult | str = f"turn of task {task_id} was cancelled on {self.host.role}"
        elif turn.exception() is not None:
            exc = turn.exception()
            # As text: the exception may not pickle, and the supervisor only reports it.
            outcome = f"agent {self.host.role}: {type(exc).__name__}: {exc}"
        else:
            outcome = turn.result()
        self._outbox.append((post_id, outcome))
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        # One report in flight at a time; results that end meanwhile go in the next one.
        while self._outbox:
            batch, self._outbox = self._outbox, []
            await self._deliver(batch)

    async def _deliver(self, batch: list[tuple[str, TurnResult | str]]) -> None:
        import ray

        delay, deadline = 0.1, time.monotonic() + _REPORT_RETRY_S
        while True:
            try:
                await self.supervisor.turns_done.remote(batch)
                return
            except ray.exceptions.ActorUnavailableError as exc:
                # Unreachable for now (a network blip, or restarting): the turns' callers
                # wait for these results, so try again for a while.
                if time.monotonic() > deadline:
                    log.warning("agent %s: %d turn results not delivered in %g s: %s",
                                self.host.role, len(batch), _REPORT_RETRY_S, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception as exc:
                # A supervisor that died rebuilds these from the durable log when it restarts
                # (a turn whose end is logged is reported as it was when it is resumed).
                log.warning("agent %s: %d turn results not delivered: %s", self.host.role,
                            len(batch), exc)
                return

    async def watch(self, incarnation: str) -> str | None:
        """Returns at once with this instance's incarnation if it isn't `incarnation` (the
        replica restarted); otherwise stays open while this instance lives (the supervisor
        learns of its death from this call failing), and returns None when it shuts down."""
        if incarnation != self.incarnation:
            return self.incarnation
        if self._closing is None:
            self._closing = asyncio.Event()
        await self._closing.wait()
        return None

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task's running turn."""
        return self.host.cancel(task_id)

    async def stats(self) -> dict[str, Any]:
        """Sessions running on this replica, and the post calls it took: how many, the turns
        in them, and the most turns in one."""
        return {"role": self.host.role, "replica": self.replica, "sessions": self.host.sessions(),
                "posts": self._posts, "turns_posted": self._turns_posted,
                "largest_post": self._largest_post}

    async def shutdown(self) -> None:
        """Stop the turns (their tasks resume at the swarm's next deployment) and close
        connections, before the actor is killed. The turns stop before the tools and the
        model close: a turn that met a closed tool could end, and log its end, as failed."""
        await self.host.stop_turns()
        if self._closing is not None:
            self._closing.set()
        if self._flusher is not None:
            self._flusher.cancel()
        await self.host.aclose()
        if self.host.store is not None:
            await self.host.store.close()

    async def _flush_loop(self) -> None:
        # Batches live events to the supervisor so clients see progress during long turns,
        # without a Ray call per step.
        interval, last = _FLUSH_INTERVAL_S, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            runs = self.host.buffer.drain_runs()
            now = time.monotonic()  # a busy loop wakes late: the rate is over the real gap
            interval, last = flush_interval(sum(map(len, runs.values())), now - last), now
            if runs and self.supervisor is not None:
                try:
                    self.supervisor.push_events.remote(events.pack_runs(runs))
                except Exception:
                    log.debug("event flush failed", exc_info=True)
