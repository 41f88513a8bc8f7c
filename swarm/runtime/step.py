"""The step loop, as plain code: (session, model, tools, limits) → outcome plus events.

One step is: budget check → model call → for each tool call: resolve, parse, execute with a
timeout → append results → step hook → termination check. No Ray in here, so the loop runs the
same in unit tests, in one process for debugging, and inside an agent actor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from time import time_ns
from typing import TYPE_CHECKING, Any, Literal

from swarm.errors import ModelError, RateLimited, RunError, ToolError, classify
from swarm.events import Event, Handoff, ModelCalled, StepFinished, StepStarted, ToolCalled
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall
from swarm.runtime.middleware import (
    Middleware,
    ModelCall,
    StopTurn,
    ToolInvocation,
    compose_model,
    compose_tool,
)
from swarm.runtime.toolbox import Toolbox
from swarm.state.interface import StoreUnavailable, ledger_key
from swarm.tools.interface import ToolContext, ToolResult

if TYPE_CHECKING:
    from swarm.runtime.journal import Journal

Emit = Callable[[Event], None]
Record = Callable[[tuple[Any, ...]], None]

# A call record: what a metering layer (swarm.observability.metering) keeps of each model and
# tool call that went through the middleware, one flat tuple of plain values built here, from
# the fields the loop reads for its own events anyway (fields by index):
#  0 kind (MODEL | TOOL)   1 task id   2 conversation id   3 user   4 step
#  5 the parent span's (trace id, span id) in hex: `Session.scratch` "span_ids", or None
#  6 span id (0: drawn when drained)
#  7 start ns   8 end ns   9 outcome: ok | error | canceled | stopped   10 error class
# 11 error text (raw: redacted when drained)   12 stopped: the StopTurn outcome's kind, or REFUSED
# 13 captured content (input or arguments)   14 captured content (output or result)
# model calls:  15 request model  16 response model  17 finish reason  18 tool calls
#               19 input tokens   20 output tokens   21 cached tokens   22 wrap-up
# tool calls:   15 tool name      16 call id         17 server name
# A layer that wraps the calls too (to capture content, or to pass an MCP call its span) leaves
# (13, 14) of a model call, or (6, 13, 14) of a tool call, in the call's `extra` "meter"; one
# that spends time of its own before a model call (memory priming) leaves the time the call
# starts from, in ns, in `extra` "start_ns".
MODEL, TOOL = 0, 1
# The stop kind of a call a rate limit refused before it ran (a record's `stopped`): the one
# stop the error metric still counts (swarm.observability.metering).
REFUSED = "refused"

# Tool errors reach the model as tool messages starting with this marker, so policies (and
# people reading transcripts) can tell them from results.
ERROR_PREFIX = "ERROR: "
_DETAIL_CHARS = 160


@dataclass(slots=True)
class Session:
    """Working memory of one agent turn on one task.

    `messages` is the OpenAI-format conversation the model sees: the agent's system message, then
    the task transcript. The loop only appends to it, so a step's work is proportional to what
    the step added.
    """

    task_id: str
    agent: str
    session_id: str
    messages: list[dict[str, Any]]
    step: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    model_calls: int = 0
    traceparent: str | None = None
    journal: Journal | None = None
    log_id: str = ""
    user: str = ""  # who submitted the task
    # Per-turn state of middleware layers (the turn's budget allowance, stuck detection).
    scratch: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TurnLimits:
    """How far one turn may go: model calls, and a wall-clock deadline (time.time()).

    With a wrap-up instruction the deadline also cuts a model or tool call still running when
    it passes, so the wrap-up call has the grace time the supervisor gives it
    (budgets.wrap_up_grace_s) before its hard stop."""

    max_steps: int
    deadline: float | None = None
    tool_timeout_s: float | None = None
    # What runs out when max_steps or the deadline is reached, and the wrap-up instruction
    # (None: the turn fails with class budget instead; see swarm.governance.budget).
    steps_why: str = ""
    deadline_why: str = "wall-clock limit"
    wrap_up: str | None = None


@dataclass(slots=True)
class Outcome:
    """How a turn ended: a final answer, a handoff, or a classified failure."""

    kind: Literal["final", "handoff", "failed", "input_required"]
    text: str = ""
    target: str | None = None
    error_class: str | None = None
    error: str | None = None
    steps: int = 0
    # Set when a budget ran out (the limit) or a stuck detector fired (its name).
    budget_exhausted: str | None = None
    stuck: str | None = None
    # input_required by an approval gate: the gate (swarm.governance.approvals.Gate.public(),
    # plus the tool's "input_schema" that edited arguments are checked against).
    gate: dict[str, Any] | None = None


def budget_stop(reason: str, wrap_up: str | None) -> StopTurn:
    """The stop for an exhausted budget: `reason` names the limit; `wrap_up` is the wrap-up
    instruction template (with `{reason}`), or None to fail with class budget."""
    outcome = Outcome("failed", error_class="budget", error=f"budget exhausted: {reason}",
                      budget_exhausted=reason)
    return StopTurn(outcome, None if wrap_up is None else wrap_up.replace("{reason}", reason))


@dataclass(slots=True)
class _Clock:
    now: Callable[[], float] = time.time
    perf: Callable[[], float] = time.perf_counter


log = logging.getLogger(__name__)

# Results held through a store outage, at most (the oldest go first).
_HELD_RESULTS = 1024


class HeldResults:
    """The results of tool calls with side effects that ran but could not be logged, because
    the store was unreachable when their result was written. The turn stops there (the
    supervisor resumes it once the store answers); as long as this process lives, the resume
    logs the held result instead of treating the call as interrupted (asking an operator
    whether to run it again), so the side effect happens once. Keyed by the log, step and call
    index; taken only by the same call (id, tool and arguments)."""

    def __init__(self, limit: int = _HELD_RESULTS) -> None:
        self.limit = limit
        self._held: OrderedDict[tuple[str, int, int],
                                tuple[ToolCall, dict[str, Any], bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def keep(self, log_id: str, step: int, index: int, call: ToolCall,
             message: dict[str, Any], is_error: bool) -> None:
        self._held[(log_id, step, index)] = (call, message, is_error)
        self._held.move_to_end((log_id, step, index))
        while len(self._held) > self.limit:
            self._held.popitem(last=False)

    def take(self, log_id: str, step: int, index: int, call: ToolCall
             ) -> tuple[dict[str, Any], bool] | None:
        """The held result of this call (its message and whether it was an error), once."""
        held = self._held.get((log_id, step, index))
        if held is None:
            return None
        ran, message, is_error = held
        if (ran.id, ran.name, ran.arguments) != (call.id, call.name, call.arguments):
            return None  # not the call the log holds: it stays until evicted
        del self._held[(log_id, step, index)]
        return message, is_error


@dataclass(slots=True)
class StepLoop:
    """Runs turns of one agent role; holds what is the same for every session of the role."""

    agent: str
    model: Model
    toolbox: Toolbox
    emit: Emit
    model_name: str = ""
    clock: _Clock = field(default_factory=_Clock)
    # Layers around every model and tool call (swarm.runtime.middleware), outermost first.
    middleware: list[Middleware] = field(default_factory=list)
    # Where a call record of each call through the layers goes (a layer's `records`).
    record: Record | None = field(default=None, init=False, repr=False)
    _model_fn: Any = field(default=None, init=False, repr=False)
    _tool_fn: Any = field(default=None, init=False, repr=False)
    # Results of calls with side effects whose logging met a store outage (`HeldResults`).
    held: HeldResults = field(default_factory=HeldResults, init=False, repr=False)

    def __post_init__(self) -> None:
        self.use(self.middleware)

    def use(self, layers: list[Middleware]) -> None:
        """Set the middleware layers (composed once here, not per call)."""
        self.middleware = list(layers)
        self._model_fn = compose_model(self.middleware, self._complete) if layers else None
        self._tool_fn = compose_tool(self.middleware, _invoke_tool) if layers else None
        self.record = next((x.records for x in layers if x.records is not None), None)

    async def _complete(self, call: ModelCall) -> ModelResponse:
        return await self.model.complete(call.request)

    def _cut(self, session: Session, limits: TurnLimits) -> _Cut | None:
        """What bounds a model or tool call: the turn's deadline when it ends in a wrap-up (a
        call still running then is cut, so the wrap-up has its grace time), else None. One
        timer for the turn, armed at its first call (`_Cut`), not one a call."""
        if limits.wrap_up is None or limits.deadline is None:
            return None
        cut = session.scratch.get("cut")
        if cut is None:
            cut = session.scratch["cut"] = _Cut(max(limits.deadline - self.clock.now(), 0.0))
        return cut

    @staticmethod
    def end_turn(session: Session) -> None:
        """Disarm the turn's deadline timer, if it has one (`_cut`)."""
        cut = session.scratch.pop("cut", None)
        if cut is not None:
            cut.handle.cancel()

    async def run_turn(self, session: Session, limits: TurnLimits) -> Outcome:
        """Run steps until a final answer, a handoff, a failure or a limit."""
        try:
            return await self._run_turn(session, limits)
        finally:
            self.end_turn(session)

    async def _run_turn(self, session: Session, limits: TurnLimits) -> Outcome:
        taken = 0
        while True:
            stop: StopTurn | None = None
            outcome: Outcome | None = None
            if taken >= limits.max_steps:
                stop = budget_stop(
                    limits.steps_why or f"step limit ({limits.max_steps} steps in this turn)",
                    limits.wrap_up)
            elif limits.deadline is not None and self.clock.now() >= limits.deadline:
                stop = budget_stop(limits.deadline_why, limits.wrap_up)
            else:
                try:
                    outcome = await self.step(session, limits)
                except StopTurn as exc:
                    stop = exc
                taken += 1
            if stop is not None:
                if stop.wrap_up is not None:
                    taken += 1
                outcome = await self.stopped(session, stop)
            if outcome is not None:
                outcome.steps = taken
                return outcome

    async def stopped(self, session: Session, stop: StopTurn) -> Outcome:
        """End a turn that a limit or a layer stopped: answer the tool calls that won't run
        (so the transcript stays valid for any model), then make the wrap-up call if asked."""
        outcome = stop.outcome
        if outcome.kind == "input_required":
            return outcome  # it resumes where it stopped: its pending calls stay pending
        await self._close_pending(session, outcome.error or "the turn was stopped")
        if stop.wrap_up is None:
            return outcome
        return await self._wrap_up(session, stop)

    async def _close_pending(self, session: Session, reason: str) -> None:
        messages = session.messages
        i = len(messages) - 1
        while i >= 0 and messages[i].get("role") == "tool":
            i -= 1
        if i < 0 or messages[i].get("role") != "assistant" or not messages[i].get("tool_calls"):
            return
        answered = {m.get("tool_call_id") for m in messages[i + 1:]}
        for index, raw in enumerate(messages[i]["tool_calls"]):
            if raw.get("id") in answered:
                continue
            msg = {"role": "tool", "tool_call_id": raw.get("id"),
                   "content": f"{ERROR_PREFIX}not run: {reason}"}
            messages.append(msg)
            if session.journal is not None:
                fn = raw.get("function") or {}
                call = ToolCall(id=raw.get("id", ""), name=fn.get("name", ""),
                                arguments=fn.get("arguments", ""))
                await session.journal.not_run(session.step, index, call, msg)

    async def _wrap_up(self, session: Session, stop: StopTurn) -> Outcome:
        """One final model call with no tools and the wrap-up instruction."""
        cut = stop.outcome
        step = session.step + 1
        now, perf, agent = self.clock.now, self.clock.perf, self.agent
        self.emit(StepStarted(task_id=session.task_id, ts=now(), agent=agent, step=step))
        t0 = perf()
        # The instruction is not logged: a restored transcript shows the answer without it.
        session.messages.append({"role": "user", "content": stop.wrap_up})
        request = ModelRequest(messages=session.messages, tools=[],
                               session_id=session.session_id, agent=agent)
        record = self.record
        call = None
        n0 = time_ns()
        try:
            if self._model_fn is None:
                resp = await self.model.complete(request)
            else:
                call = ModelCall(session, step, agent, self.model_name, request, final=True)
                resp = await self._model_fn(call)
        except BaseException as exc:
            if record is not None and call is not None:
                record(_model_failed(session, call, n0, exc))
            if not isinstance(exc, Exception):
                raise
            session.step = step
            self.emit(ModelCalled(task_id=session.task_id, ts=now(), agent=agent, step=step,
                                  model=self.model_name, latency_ms=(perf() - t0) * 1e3,
                                  error=str(exc), error_class=classify(exc)
                                  if isinstance(exc, RunError) else "model"))
            cut.error = f"{cut.error}; the wrap-up call failed: {exc}"
            return cut
        session.step = step
        session.model_calls += 1
        usage = resp.usage
        session.input_tokens += usage.input_tokens
        session.output_tokens += usage.output_tokens
        session.cached_tokens += usage.cached_input_tokens
        if record is not None and call is not None:
            record(_model_ok(session, call, n0, resp))
        self.emit(ModelCalled(
            task_id=session.task_id, ts=now(), agent=agent, step=step,
            model=resp.model or self.model_name, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cached_tokens=usage.cached_input_tokens,
            latency_ms=(perf() - t0) * 1e3, finish_reason=resp.finish_reason))
        # Tool calls in a wrap-up answer are dropped: it was offered none.
        assistant = {"role": "assistant", "name": agent, "content": resp.content}
        session.messages.append(assistant)
        if session.journal is not None:
            await session.journal.model(step, assistant, usage, [])
        await self._after_step(session, step, t0)
        text = resp.content or ""
        if not text.strip():
            cut.error = f"{cut.error}; the wrap-up call gave no answer"
            return cut
        return Outcome("final", text=text, budget_exhausted=cut.budget_exhausted,
                       stuck=cut.stuck)

    async def step(self, session: Session, limits: TurnLimits) -> Outcome | None:
        """One model call and its tool calls; returns an outcome if the turn ends here."""
        step = session.step + 1
        now, perf = self.clock.now, self.clock.perf
        emit, task_id, agent = self.emit, session.task_id, self.agent
        emit(StepStarted(task_id=task_id, ts=now(), agent=agent, step=step))
        t0 = perf()
        request = ModelRequest(
            messages=session.messages,
            tools=self.toolbox.schemas,
            session_id=session.session_id,
            agent=agent,
            deadline=limits.deadline,  # the client's retries stop at the turn's deadline
        )
        record = self.record
        cut = self._cut(session, limits)
        if cut is not None:
            if cut.fired:  # the deadline passed before the call: the turn wraps up
                raise budget_stop(limits.deadline_why, limits.wrap_up)
            cut.enter()
        try:
            try:
                if self._model_fn is None:
                    resp = await self.model.complete(request)
                else:
                    call = ModelCall(session, step, agent, self.model_name, request)
                    if record is None:
                        resp = await self._model_fn(call)
                    else:
                        n0 = time_ns()
                        try:
                            resp = await self._model_fn(call)
                        except BaseException as exc:
                            record(_model_failed(session, call, n0, exc))
                            raise
                        if call.extra:  # what a layer left for the record (content, start)
                            record(_model_ok(session, call, n0, resp))
                        else:  # `_model_ok` inlined, the common case: one frame less a call
                            usage = resp.usage
                            record((MODEL, task_id, session.session_id, session.user, step,
                                    session.scratch.get("span_ids"), 0, n0, time_ns(), "ok",
                                    None, None, None, None, None, call.model,
                                    resp.model or call.model, resp.finish_reason,
                                    len(resp.tool_calls), usage.input_tokens,
                                    usage.output_tokens, usage.cached_input_tokens, False))
            finally:
                if cut is not None:
                    cut.leave()
        except StopTurn:
            raise
        except asyncio.CancelledError:
            if cut is None or not cut.took():
                raise
            # Cut at the deadline: the turn wraps up (`run_turn`).
            raise budget_stop(limits.deadline_why, limits.wrap_up) from None
        except Exception as exc:
            err = exc if isinstance(exc, RunError) else ModelError(f"{type(exc).__name__}: {exc}")
            emit(
                ModelCalled(
                    task_id=task_id,
                    ts=now(),
                    agent=agent,
                    step=step,
                    model=self.model_name,
                    latency_ms=(perf() - t0) * 1e3,
                    error=str(err),
                    error_class=classify(err),
                )
            )
            session.step = step
            return Outcome("failed", error_class=classify(err), error=str(err))
        t1 = perf()
        session.step = step
        session.model_calls += 1
        usage = resp.usage
        session.input_tokens += usage.input_tokens
        session.output_tokens += usage.output_tokens
        session.cached_tokens += usage.cached_input_tokens
        emit(
            ModelCalled(
                task_id=task_id,
                ts=now(),
                agent=agent,
                step=step,
                model=resp.model or self.model_name,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_input_tokens,
                latency_ms=(t1 - t0) * 1e3,
                ttft_ms=None
                if resp.time_to_first_token_s is None
                else resp.time_to_first_token_s * 1e3,
                finish_reason=resp.finish_reason,
                tool_calls=len(resp.tool_calls),
            )
        )
        assistant = _assistant_message(resp, agent)
        session.messages.append(assistant)
        journal = session.journal
        if journal is not None:
            # The intent, logged before any tool runs and durable before one with side effects
            # does (see swarm.runtime.journal).
            await journal.model(step, assistant, usage, resp.tool_calls)
        if not resp.tool_calls:
            # The turn ends here: the host logs its end at once, and this step with it.
            await self._after_step(session, step, t0, last=True)
            return Outcome("final", text=resp.content or "")
        handoff = await self._run_calls(session, step, list(enumerate(resp.tool_calls)), limits)
        await self._after_step(session, step, t0)
        return handoff

    async def _run_calls(self, session: Session, step: int, calls: list[tuple[int, ToolCall]],
                         limits: TurnLimits) -> Outcome | None:
        """Run a step's tool calls in order, logging each result; return a handoff if any."""
        handoff: Outcome | None = None
        journal = session.journal
        for index, call in calls:
            target = self.toolbox.handoff_target(call.name)
            if target is not None:
                outcome = self._handoff(session, step, call, target)
                handoff = handoff or outcome
                is_error, effects = outcome is None, False
            else:
                effects = not self.toolbox.safe_to_repeat(call.name)
                if journal is not None and effects:
                    # Whatever the checkpoint policy, this call's `started` record (and all
                    # before it) is durable before the side effect can happen.
                    await journal.checkpoint()
                result = await self._call_tool(session, step, index, call, limits)
                session.messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": result.content}
                )
                is_error = result.is_error
            if journal is not None:
                try:
                    await journal.tool(step, index, call, session.messages[-1], is_error,
                                       handoff=target is not None)
                    if effects:
                        # And its result at once: after a crash it must not look unfinished.
                        await journal.checkpoint()
                except Exception as exc:
                    if effects and (isinstance(exc, StoreUnavailable)
                                    or isinstance(journal.failure, StoreUnavailable)):
                        # The call took effect but the store is unreachable: held here for
                        # the turn's resume to log (`resume`), not run again.
                        self.held.keep(journal.log_id, step, index, call,
                                       session.messages[-1], is_error)
                    raise
            if limits.wrap_up is not None and limits.deadline is not None and \
                    self.clock.now() >= limits.deadline:
                # The deadline passed while the call ran (it was cut there): the calls left
                # are not run, and the turn wraps up.
                raise budget_stop(limits.deadline_why, limits.wrap_up)
        return handoff

    async def resume(self, session: Session, pending: dict[int, dict[str, Any]],
                     decision: str | None, limits: TurnLimits, turn_start: int = 0
                     ) -> Outcome | None:
        """Finish a step that a crash interrupted, then say whether the turn already ended.

        `pending` are the calls of the last logged model answer with no logged result: they
        started and may or may not have finished. An idempotent (or read-only) tool runs again;
        any other waits for an operator's `decision` ("rerun" or "skip"), and without one the
        turn ends as `input_required` with the question.
        """
        step = session.step
        todo: list[tuple[int, ToolCall]] = []
        # Calls an approval gate stopped before they ran: sent on, through their gate again.
        held: set[int] = set()
        if session.journal is not None and session.journal.base.questions:
            from swarm.governance.approvals import held_calls

            held = held_calls(session.journal.base.questions, self.agent, step, pending)
        for index in sorted(pending):
            raw = pending[index]
            fn = raw.get("function") or {}
            call = ToolCall(id=raw.get("id", ""), name=fn.get("name", ""),
                            arguments=fn.get("arguments", ""))
            kept = None if session.journal is None else \
                self.held.take(session.journal.log_id, step, index, call)
            if kept is not None:
                # It ran, and only its logging met a store outage: its result is logged now.
                message, is_error = kept
                log.info("task %s: the result of %s (step %d, call %d), held while the store "
                         "was unreachable, is logged now", session.task_id, call.name, step,
                         index)
                session.messages.append(message)
                try:
                    await session.journal.tool(step, index, call, message, is_error)
                    await session.journal.checkpoint()
                except Exception:
                    # Not logged after all (the store went away again): held for the next
                    # resume, as before.
                    self.held.keep(session.journal.log_id, step, index, call, message,
                                   is_error)
                    raise
                continue
            if index in held or self.toolbox.safe_to_repeat(call.name) or decision == "rerun":
                todo.append((index, call))
            elif decision == "skip":
                session.messages.append({"role": "tool", "tool_call_id": call.id, "content": (
                    f"{ERROR_PREFIX}the call to {call.name!r} was interrupted before its result "
                    "was logged and an operator chose not to run it again; it may or may not "
                    "have taken effect")})
                if session.journal is not None:
                    await session.journal.tool(step, index, call, session.messages[-1], True)
                    await session.journal.checkpoint()  # the operator's decision, at once
            else:
                if session.journal is not None:
                    await session.journal.checkpoint()  # a phase boundary
                return Outcome("input_required", text=(
                    f"Agent {self.agent} was running tool {call.name!r} (step {step}, call "
                    f"{index}, arguments {call.arguments[:200]}) when its turn was cut short "
                    "before the call's result was logged (its process died, the swarm was "
                    "taken down, or the store could not be written). The tool is not declared "
                    "idempotent, so it may or may not have taken effect. Answer 'rerun' to run "
                    "it again or 'skip' to continue without it."))
        try:
            handoff = await self._run_calls(session, step, todo, limits) if todo else None
        except StopTurn as stop:
            return await self.stopped(session, stop)
        if handoff is not None:
            return handoff
        # Only this turn's own answers count (the transcript before it is other agents').
        turn = session.messages[turn_start:]
        last = next((m for m in reversed(turn) if m.get("role") == "assistant"), None)
        if last is None:
            return None
        for raw in last.get("tool_calls") or ():
            target = self.toolbox.handoff_target((raw.get("function") or {}).get("name", ""))
            if target is not None:
                message, problem = _handoff_message(
                    (raw.get("function") or {}).get("arguments", ""))
                if problem is None:  # else it was refused, and the turn goes on
                    return Outcome("handoff", text=message, target=target)
        if not last.get("tool_calls") and session.messages[-1] is last:
            return Outcome("final", text=last.get("content") or "")
        return None

    async def _after_step(self, session: Session, step: int, t0: float, *,
                          last: bool = False) -> None:
        journal = session.journal
        if journal is not None:
            await journal.end_step(step, last=last)
            if not journal.buffered:
                # A snapshot holds only durable state: its seq is the last durable entry's.
                journal.maybe_snapshot(session.messages, step, {
                    "input_tokens": session.input_tokens, "output_tokens": session.output_tokens,
                    "model_calls": session.model_calls, "tool_calls": session.tool_calls})
        done = StepFinished(task_id=session.task_id, ts=self.clock.now(), agent=self.agent,
                            step=step, duration_ms=(self.clock.perf() - t0) * 1e3)
        if journal is not None and (last or journal.sent_behind):
            # Made durable with the turn's end (`Journal.end_step`), or by the append written
            # behind it: reported done only then.
            journal.when_durable(lambda: self.emit(done))
        else:
            self.emit(done)

    def _handoff(self, session: Session, step: int, call: ToolCall, target: str
                 ) -> Outcome | None:
        """Hand the task to `target`; or, if the call's arguments don't fit the handoff tool's
        schema, answer it with a tool error the model sees (None: no handoff)."""
        message, problem = _handoff_message(call.arguments)
        if problem is not None:
            content = f"{ERROR_PREFIX}no handoff to {target}: {problem}"
            session.messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": content})
            self.emit(ToolCalled(
                task_id=session.task_id, ts=self.clock.now(), agent=self.agent, step=step,
                tool=call.name, call_id=call.id, duration_ms=0.0, outcome="error",
                error_class="model", detail=content[:_DETAIL_CHARS]))
            return None
        session.messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": f"Transferred to {target}."})
        self.emit(
            Handoff(
                task_id=session.task_id,
                ts=self.clock.now(),
                agent=self.agent,
                to_agent=target,
                message=message[:_DETAIL_CHARS],
            )
        )
        return Outcome("handoff", text=message, target=target)

    async def _call_tool(
        self, session: Session, step: int, index: int, call: ToolCall, limits: TurnLimits
    ) -> ToolResult:
        perf = self.clock.perf
        t0 = perf()
        error_class: str | None = None
        entry = self.toolbox.resolve(call.name)
        if entry is None:
            refusal = self.toolbox.refusal(call.name)
            if refusal is not None:
                # A real tool this agent isn't granted: refused by policy, not a model slip.
                error_class = "policy"
                result = ToolResult(f"{ERROR_PREFIX}{refusal}", is_error=True)
            elif self.toolbox.unlisted:
                # It may be a tool of a server that could not list its tools yet: a tool
                # error (the server is asked again now), not the model's slip.
                error_class = "tool"
                self.toolbox.poke()
                result = ToolResult(
                    f"{ERROR_PREFIX}unknown tool {call.name!r}: tool server "
                    f"{self.toolbox.why_unlisted()} could not list its tools yet; "
                    f"available tools: {', '.join(self.toolbox.names) or 'none'}",
                    is_error=True,
                )
            else:
                error_class = "model"
                result = ToolResult(
                    f"{ERROR_PREFIX}unknown tool {call.name!r}; available tools: "
                    f"{', '.join(self.toolbox.names) or 'none'}",
                    is_error=True,
                )
        else:
            args, problem = _parse_arguments(call.arguments)
            if args is None:
                error_class = "model"
                result = ToolResult(
                    f"{ERROR_PREFIX}arguments for {call.name!r} are not a JSON object: {problem}",
                    is_error=True,
                )
            else:
                session.tool_calls += 1
                ctx = ToolContext(
                    task_id=session.task_id, agent=self.agent, session_id=session.session_id,
                    call_id=call.id, step=step, traceparent=session.traceparent,
                    idempotency_key=ledger_key(session.log_id or session.task_id, self.agent,
                                               step, index),
                    user=session.user, emit=self.emit,
                )
                inv, cut = None, None
                n0 = time_ns()
                try:
                    if self._tool_fn is None:
                        coro = entry.source.call(entry.spec.name, args, ctx)
                    else:
                        inv = ToolInvocation(
                            session, step, index, self.agent, call, entry, args, ctx)
                        coro = self._tool_fn(inv)
                    # Cut at the turn's deadline if it ends in a wrap-up (`_run_calls`).
                    cut = self._cut(session, limits)
                    if cut is not None:
                        if cut.fired:  # the deadline passed before the call: not run
                            coro.close()
                            raise budget_stop(limits.deadline_why, limits.wrap_up)
                        cut.enter()
                    try:
                        if limits.tool_timeout_s is not None:
                            result = await asyncio.wait_for(coro, limits.tool_timeout_s)
                        else:
                            result = await coro
                    finally:
                        if cut is not None:
                            cut.leave()
                except asyncio.CancelledError as exc:
                    if cut is not None and cut.took():
                        error_class = "budget"
                        result = ToolResult(
                            f"{ERROR_PREFIX}tool {call.name!r} was stopped after "
                            f"{perf() - t0:.3g} s: the {limits.deadline_why} ran out while it "
                            "ran; it may or may not have taken effect",
                            is_error=True,
                        )
                        if inv is not None and self.record is not None:
                            self.record(_tool_record(inv, n0, "error", error_class,
                                                     result.content))
                    else:
                        if inv is not None and self.record is not None:
                            self.record(_tool_record(inv, n0, "canceled", getattr(
                                exc, "error_class", None) or "tool", _text(exc)))
                        raise
                except StopTurn as exc:
                    session.tool_calls -= 1  # stopped before it ran: not a call
                    if inv is not None and self.record is not None:
                        self.record(_tool_record(inv, n0, "stopped", *_stopped(exc)))
                    raise
                except (Exception, SystemExit, KeyboardInterrupt) as exc:
                    # SystemExit and KeyboardInterrupt too (a tool source that let one out):
                    # past here either would stop the replica's loop, with every session on it.
                    if not isinstance(exc, Exception):
                        exc = ToolError(f"{type(exc).__name__}: {exc}")
                    if isinstance(exc, TimeoutError) and limits.tool_timeout_s is not None:
                        error_class = "tool"
                        result = ToolResult(
                            f"{ERROR_PREFIX}tool {call.name!r} timed out after "
                            f"{limits.tool_timeout_s} s",
                            is_error=True,
                        )
                        text = result.content
                    else:  # a tool's own TimeoutError without a limit is its error
                        error_class = classify(exc) if isinstance(exc, RunError) else "tool"
                        result = ToolResult(f"{ERROR_PREFIX}{exc}", is_error=True)
                        text = _text(exc)
                    refused = isinstance(exc, RateLimited)
                    if refused:
                        session.tool_calls -= 1  # refused before it ran: not a call
                    if inv is not None and self.record is not None:
                        # Refused by a rate limit before it ran: recorded as stopped (no
                        # ledger row, not billed), as a budget's or a gate's stop is.
                        self.record(_tool_record(inv, n0, "stopped", error_class, text, REFUSED)
                                    if refused else
                                    _tool_record(inv, n0, "error", error_class, text))
                else:
                    if result.is_error:
                        error_class = "tool"
                        if not result.content.startswith(ERROR_PREFIX):
                            result.content = ERROR_PREFIX + result.content
                    if inv is None or (record := self.record) is None:
                        pass
                    elif result.is_error or inv.extra:
                        record(_tool_record(inv, n0, "error", "tool", result.content)
                               if result.is_error else _tool_record(inv, n0, "ok", None, None))
                    else:  # `_tool_record` inlined, the common case: one frame less a call
                        record((TOOL, session.task_id, session.session_id, session.user, step,
                                session.scratch.get("span_ids"), 0, n0, time_ns(), "ok", None,
                                None, None, None, None, call.name, call.id, entry.source.name))
        self.emit(
            ToolCalled(
                task_id=session.task_id,
                ts=self.clock.now(),
                agent=self.agent,
                step=step,
                tool=call.name,
                call_id=call.id,
                duration_ms=(perf() - t0) * 1e3,
                outcome="error" if result.is_error else "ok",
                error_class=error_class,
                detail=result.content[:_DETAIL_CHARS] if result.is_error else "",
            )
        )
        return result


_NO_CONTENT = (None, None)
_NO_TOOL_CONTENT = (0, None, None)


class _Cut:
    """A turn's deadline, when the turn ends in a wrap-up: one timer for the whole turn. If it
    fires while a model or tool call runs (between `enter` and `leave`), it cancels the turn's
    task there, and the call site, seeing the cancel was this (`took`), stops the call as the
    deadline's; if it fired between calls, the next call isn't made (`fired`). As
    `asyncio.timeout` does it for one block, without a timer for each call."""

    __slots__ = ("cancelled", "cancelling", "fired", "handle", "inside", "task")

    def __init__(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.fired = self.inside = self.cancelled = False
        self.cancelling = 0
        self.handle = loop.call_at(loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self.fired = True
        if self.inside and self.task is not None and not self.task.done():
            self.cancelled = True
            self.task.cancel()

    def enter(self) -> None:
        self.inside = True
        if self.task is not None:
            self.cancelling = self.task.cancelling()

    def leave(self) -> None:
        self.inside = False

    def took(self) -> bool:
        """Whether the cancel being raised is this deadline's alone (not also a request's):
        then it is taken back."""
        if not self.cancelled or self.task is None:
            return False
        self.cancelled = False
        return self.task.uncancel() <= self.cancelling


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _stopped(exc: StopTurn) -> tuple[str | None, str | None, str]:
    """(error class, error text, kind) of a call a layer stopped before it ran."""
    o = exc.outcome
    if o.kind == "failed":
        return o.error_class, o.error or o.error_class or "error", o.kind
    return None, None, o.kind


def _model_failed(session: Session, call: ModelCall, n0: int,
                  exc: BaseException) -> tuple[Any, ...]:
    """The record of a model call that raised: a layer stopped the turn (a budget, an approval
    gate, stuck detection), it was cancelled, or it failed."""
    stopped = None
    if isinstance(exc, StopTurn):
        outcome = "stopped"
        error_class, text, stopped = _stopped(exc)
    elif isinstance(exc, RateLimited):  # refused before it ran: not billed
        outcome, error_class, text, stopped = "stopped", "policy", _text(exc), REFUSED
    elif isinstance(exc, asyncio.CancelledError):
        outcome, error_class, text = (
            "canceled", getattr(exc, "error_class", None) or "model", _text(exc))
    else:
        outcome, error_class, text = (
            "error", classify(exc) if isinstance(exc, RunError) else "model", _text(exc))
    x = call.extra
    return (MODEL, session.task_id, session.session_id, session.user, call.step,
            session.scratch.get("span_ids"), 0, x.get("start_ns", n0), time_ns(), outcome,
            error_class, text, stopped, *(x.get("meter") or _NO_CONTENT), call.model, None,
            None, 0, 0, 0, 0, call.final)


def _model_ok(session: Session, call: ModelCall, n0: int, resp: ModelResponse
              ) -> tuple[Any, ...]:
    """The record of a model call that answered (the fields the step's event reads too)."""
    usage = resp.usage
    x = call.extra
    return (MODEL, session.task_id, session.session_id, session.user, call.step,
            session.scratch.get("span_ids"), 0, x.get("start_ns", n0), time_ns(), "ok", None,
            None, None, *(x.get("meter") or _NO_CONTENT), call.model, resp.model or call.model,
            resp.finish_reason, len(resp.tool_calls), usage.input_tokens, usage.output_tokens,
            usage.cached_input_tokens, call.final)


def _tool_record(inv: ToolInvocation, n0: int, outcome: str, error_class: str | None,
                 text: str | None, stopped: str | None = None) -> tuple[Any, ...]:
    """The record of a tool call that went through the layers."""
    session = inv.session
    x = inv.extra.get("meter") or _NO_TOOL_CONTENT
    return (TOOL, session.task_id, session.session_id, session.user, inv.step,
            session.scratch.get("span_ids"), x[0], n0, time_ns(), outcome, error_class, text,
            stopped, x[1], x[2], inv.call.name, inv.call.id, inv.entry.source.name)


async def _invoke_tool(inv: ToolInvocation) -> ToolResult:
    return await inv.entry.source.call(inv.entry.spec.name, inv.args, inv.ctx)


def _assistant_message(resp: ModelResponse, agent: str) -> dict[str, Any]:
    # `name` says which agent spoke once the transcript passes to another agent.
    msg: dict[str, Any] = {"role": "assistant", "name": agent, "content": resp.content}
    if resp.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in resp.tool_calls
        ]
    return msg


def _parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a model's tool-call arguments; an empty string means no arguments."""
    if not raw or not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at position {e.pos})"
    if not isinstance(value, dict):
        return None, f"expected an object, got {_json_type(value)}"
    return value, None


def _handoff_message(raw: str) -> tuple[str, str | None]:
    """The message of a handoff tool call, or what is wrong with its arguments for the handoff
    tool's schema (`message`, a string, and nothing else: swarm.runtime.toolbox)."""
    args, problem = _parse_arguments(raw)
    if args is None:
        return "", f"the arguments are not a JSON object: {problem}"
    if "message" not in args:
        return "", ("missing required argument 'message' (what the next agent should do); "
                    "give it as {\"message\": \"...\"}")
    message = args["message"]
    if not isinstance(message, str):
        return "", f"argument 'message' must be a string, got {_json_type(message)}"
    extra = sorted(set(args) - {"message"})
    if extra:
        return "", (f"unexpected argument{'s' if len(extra) > 1 else ''} "
                    f"{', '.join(map(repr, extra))}; a handoff takes only 'message'")
    return message, None


def _json_type(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words (null, not NoneType)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "an array"
