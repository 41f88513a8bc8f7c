"""How the A2A server reaches a swarm: a link to its supervisor, the swarm's events as A2A events,
and a follow-up message read as the answer to a pending question.

`SwarmLink` is the one interface: `call(method, *args)` with the supervisor actor's method names.
`RayLink` calls the named supervisor actor of a deployed swarm (riding out its restarts);
`LocalLink` calls an in-process `Supervisor` (`swarm.testing.LocalSwarm`), so the whole HTTP
surface runs in unit tests without Ray. Everything else here is plain functions.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from a2a.types import (
    Message,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp

from swarm import events as ev
from swarm._text import check_chars
from swarm.errors import SwarmError, SwarmNotFound, TaskNotFound, UserError
from swarm.protocol import a2a

_POLL_S = 10.0  # one long-poll of the supervisor's event list
_RESTART_WAIT_S = 120.0  # how long a call waits for a restarting supervisor

StreamEvent = TaskStatusUpdateEvent | TaskArtifactUpdateEvent


# ---- the link ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A task as the supervisor holds it: the A2A `Task`, its table row (gates, question, ...),
    and how many swarm events it has produced so far."""

    task: Task
    row: dict[str, Any]
    events: int

    @property
    def state(self) -> str:
        """The task's state as a short name (`working`, `input_required`, ...)."""
        return a2a.state_of(self.task)


class SwarmLink(ABC):
    """The supervisor as the A2A server sees it; swarm errors (`TaskNotFound`, `UserError`)
    come out as themselves."""

    @abstractmethod
    async def call(self, method: str, *args: Any) -> Any:
        """Call the supervisor method `method` (the supervisor actor's API) with `args`."""

    async def snapshot(self, task_id: str) -> Snapshot | None:
        """The task now, or None if the swarm has no such task."""
        try:
            row = await self.call("get_task", task_id)
        except TaskNotFound:
            return None
        return Snapshot(a2a.loads_task(row.pop("a2a")), row, int(row.pop("events", 0)))


class RayLink(SwarmLink):
    """The named supervisor actor of the swarm deployed as `deployment`."""

    def __init__(self, deployment: str, namespace: str | None = None) -> None:
        from swarm.runtime.deploy import NAMESPACE

        self.deployment = deployment
        self.namespace = namespace or NAMESPACE
        self._actor: Any = None

    def _handle(self) -> Any:
        import ray

        from swarm.runtime.supervisor_actor import supervisor_actor_name

        if self._actor is None:
            try:
                self._actor = ray.get_actor(supervisor_actor_name(self.deployment),
                                            namespace=self.namespace)
            except ValueError:
                raise SwarmNotFound(f"swarm {self.deployment!r} is not running") from None
        return self._actor

    async def call(self, method: str, *args: Any) -> Any:
        """Call the actor; a restarting supervisor is waited for (every supervisor method is
        safe to repeat), a dead one looked up again once (the swarm was redeployed)."""
        import ray

        deadline = time.monotonic() + _RESTART_WAIT_S
        delay, looked_again = 0.1, False
        while True:
            try:
                return await getattr(self._handle(), method).remote(*args)
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise SwarmError(f"the supervisor of swarm {self.deployment!r} stayed "
                                     f"unavailable for {_RESTART_WAIT_S:.0f} s") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SwarmError):
                    raise cause from None
                raise
            except ray.exceptions.RayActorError:
                self._actor = None
                if looked_again:
                    raise SwarmNotFound(f"swarm {self.deployment!r} is not running") from None
                looked_again = True


class LocalLink(SwarmLink):
    """An in-process `Supervisor` (tests, debugging), answering the actor's method names."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor

    async def call(self, method: str, *args: Any) -> Any:
        """Run the supervisor method in this process."""
        sup = self.sup
        if method == "get_task":
            rec = await sup.find(args[0])
            return {**rec.summary(), "a2a": rec.wire(), "events": rec.event_count}
        if method == "list_a2a":
            from swarm.protocol.a2a_server.listing import page

            tasks, total, more = page((r.task for r in sup.tasks.values()), args[0])
            return [a2a.dumps(t) for t in tasks], total, more
        if method == "submit":
            text, user, metadata, context_id, task_id, message_id = args
            return await sup.submit(text, user=user, metadata=metadata, context_id=context_id,
                                    task_id=task_id, message_id=message_id)
        if method == "approve":
            task_id, gate, approver, edited = args
            return await sup.approve(task_id, gate, approver=approver, args=edited)
        if method == "deny":
            task_id, gate, approver, reason = args
            return await sup.deny(task_id, gate, approver=approver, reason=reason)
        if method in ("events", "respond", "cancel", "forget"):
            return await getattr(sup, method)(*args)
        raise ValueError(f"LocalLink has no method {method!r}")


# ---- swarm events as A2A events ----------------------------------------------------------------

_QUIET = (ev.StepStarted, ev.StepFinished)  # too fine-grained to be worth a status update


def _timestamp(ts: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(ts * 1e9))
    return out


def describe(event: ev.Event) -> str:
    """One line about a swarm event, for a status update's message."""
    who = event.agent or "swarm"
    if isinstance(event, ev.ModelCalled):
        if event.error:
            return f"{who}, step {event.step}: model {event.model} failed: {event.error}"
        asked = f", asked for {event.tool_calls} tool call(s)" if event.tool_calls else ""
        return (f"{who}, step {event.step}: model {event.model} answered "
                f"({event.input_tokens} → {event.output_tokens} tokens{asked})")
    if isinstance(event, ev.ToolCalled):
        detail = f": {event.detail}" if event.outcome != "ok" and event.detail else ""
        return (f"{who}, step {event.step}: tool {event.tool} {event.outcome} in "
                f"{event.duration_ms:.0f} ms{detail}")
    if isinstance(event, ev.Handoff):
        return f"{who} handed the task to {event.to_agent}"
    if isinstance(event, ev.Alert):
        return f"{event.alert} ({event.action}){': ' + event.detail if event.detail else ''}"
    if isinstance(event, ev.TurnResumed):
        return f"{who} resumed its turn at step {event.step} (from the {event.source} checkpoint)"
    fields = ev.to_dict(event)
    said = " ".join(str(fields[k]) for k in ("state", "text", "detail") if fields.get(k))
    return f"{who}: {fields.get('kind', type(event).__name__)}{' ' + said if said else ''}"


def _status(task_id: str, context_id: str, state: int, text: str, ts: float,
            metadata: dict[str, Any] | None = None) -> TaskStatusUpdateEvent:
    status = TaskStatus(state=state, timestamp=_timestamp(ts))  # type: ignore[arg-type]
    if text:
        status.message.CopyFrom(a2a.text_message(text, role="agent", task_id=task_id,
                                                 context_id=context_id, metadata=metadata))
    return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)


def status_of(task: Task) -> TaskStatusUpdateEvent:
    """A status update carrying the task's current status, as the supervisor recorded it."""
    return TaskStatusUpdateEvent(task_id=task.id, context_id=task.context_id,
                                 status=task.status)


def final_events(task: Task) -> list[StreamEvent]:
    """The events that end a task's stream: its artifacts (the answer), then its final status."""
    out: list[StreamEvent] = [
        TaskArtifactUpdateEvent(task_id=task.id, context_id=task.context_id, artifact=art,
                                last_chunk=True)
        for art in task.artifacts
    ]
    out.append(status_of(task))
    return out


def is_final(event: StreamEvent) -> bool:
    """Whether an event moves its task to a terminal state."""
    return isinstance(event, TaskStatusUpdateEvent) and \
        a2a.STATE_NAMES.get(event.status.state) in a2a.TERMINAL


async def follow(link: SwarmLink, task_id: str, context_id: str, cursor: int
                 ) -> AsyncIterator[StreamEvent]:
    """The task's A2A events from its `cursor`-th swarm event on, until it ends (artifacts, then
    the final status) or waits for input (the INPUT_REQUIRED status with its question).

    State changes become status updates; model and tool calls, handoffs and alerts become
    WORKING status updates whose message says what happened (the event itself rides in the
    message metadata under `swarm_event`). SUBMITTED is left out: the task's first event says so.
    """
    while True:
        batch, done = await link.call("events", task_id, cursor, _POLL_S)
        if not batch and not done:
            snap = await link.snapshot(task_id)
            if snap is not None and snap.events < cursor:
                # The supervisor restarted: its event list began again, and a task it reloaded
                # waiting for input asks again without a new event.
                cursor = 0
                if snap.state == "input_required":
                    yield status_of(snap.task)
                    return
            continue
        cursor += len(batch)
        for event in batch:
            if isinstance(event, ev.TaskStateChanged):
                if event.state == "working":
                    yield _status(task_id, context_id, TaskState.TASK_STATE_WORKING,
                                  event.detail, event.ts)
                elif event.state == "input_required":
                    snap = await link.snapshot(task_id)
                    # Answered already (from the CLI, say): carry on with what follows.
                    if snap is not None and snap.state == "input_required":
                        yield status_of(snap.task)
                        return
            elif isinstance(event, ev.TaskFinished):
                for out in await _end(link, task_id, context_id, event):
                    yield out
                return
            elif not isinstance(event, _QUIET):
                yield _status(task_id, context_id, TaskState.TASK_STATE_WORKING,
                              describe(event), event.ts,
                              {"swarm_event": ev.to_dict(event)})
        if done:  # ended without a TaskFinished in reach (its events were capped)
            for out in await _end(link, task_id, context_id, None):
                yield out
            return


async def _end(link: SwarmLink, task_id: str, context_id: str,
               finished: ev.TaskFinished | None) -> list[StreamEvent]:
    snap = await link.snapshot(task_id)
    if snap is not None and snap.state in a2a.TERMINAL:
        return final_events(snap.task)
    # Dropped from the table in the meantime: say what the last event said.
    state = finished.state if finished is not None else "failed"
    text = (finished.answer or finished.error or "") if finished is not None else ""
    return [_status(task_id, context_id, a2a.STATES[state], text, time.time())]


# ---- reading messages ---------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A protobuf Struct value as plain JSON data, with whole numbers as ints again (protobuf
    keeps every number as a double)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _data_parts(msg: Message) -> list[Any]:
    return [plain(MessageToDict(p.data)) for p in msg.parts if p.HasField("data")]


def request_text(msg: Message, max_chars: int) -> str:
    """The task text of a new message: its text parts, else its data parts as JSON.

    Raises the A2A error a client should get: ContentTypeNotSupported for a message with
    neither, InvalidParams for an empty or too long one, or one with a character the
    supervisor refuses (`swarm._text`; checked here too, so that no task is started for it).
    """
    text = a2a.message_text(msg)
    if not text:
        data = _data_parts(msg)
        if not data:
            raise ContentTypeNotSupportedError(
                message="this agent reads text and data parts; the message has neither")
        text = "\n".join(json.dumps(d, ensure_ascii=False) for d in data)
    if not text.strip():
        raise InvalidParamsError(message="the message has no text")
    if len(text) > max_chars:
        raise InvalidParamsError(
            message=f"the message is {len(text)} characters; this swarm accepts at most "
            f"{max_chars} (limits.max_task_chars)")
    try:
        check_chars(text, "task text")
    except UserError as exc:
        raise InvalidParamsError(message=str(exc)) from None
    return text


@dataclass(frozen=True)
class Answer:
    """A follow-up message read as a decision: `approve` or `deny` a gate, or `respond` to a
    question; `cursor` is where the task's events stood when it was read."""

    kind: str
    cursor: int
    gate: str | None = None
    args: dict[str, Any] | None = None
    reason: str | None = None
    text: str = ""


_APPROVE = frozenset({"approve", "approved", "yes", "y", "ok"})
_DENY = frozenset({"deny", "denied", "no", "n", "reject"})

HOW_TO_ANSWER = (
    'answer a pending approval with the text "approve [GATE]" or "deny [GATE] [reason]", or a '
    'data part {"approve": GATE, "args": {...}} / {"deny": GATE, "reason": "..."} (GATE may be '
    "left out while one gate is open); answer a question with one of its choices")

# The shape of a gate id (`approvals.gate_id`: agent name, step, call index). In a text answer,
# a first word of this shape names a gate (and must be an open one); after "deny", any other
# first word begins the reason.
_GATE_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*-\d+-\d+")


def _pick(named: Any, open_gates: list[str]) -> str:
    if isinstance(named, str) and named:
        if named not in open_gates:
            raise InvalidParamsError(message=f"no open gate {named!r}; open: "
                                     f"{', '.join(open_gates)}")
        return named
    # `named is True`, not `==`: 1 == True, and a number (a gate's index, say) must not
    # decide a gate.
    if not (named is True or named is None or named == ""):
        raise InvalidParamsError(message=f"a gate is named by its id (a string), got {named!r}")
    if len(open_gates) > 1:
        raise InvalidParamsError(message=f"{len(open_gates)} gates are open "
                                 f"({', '.join(open_gates)}); name the one you decide")
    return open_gates[0]


def _choices(task: Task) -> list[str]:
    for d in _data_parts(task.status.message):
        if isinstance(d, dict) and isinstance(d.get("choices"), list):
            return [str(c) for c in d["choices"]]
    return []


def read_answer(msg: Message, snap: Snapshot) -> Answer:
    """Read a follow-up message to a task in INPUT_REQUIRED as its answer (see HOW_TO_ANSWER);
    InvalidParams if it is none."""
    open_gates = [str(g["gate"]) for g in snap.row.get("gates") or () if g.get("gate")]
    data = next((d for d in _data_parts(msg) if isinstance(d, dict)), None)
    text = a2a.message_text(msg).strip()
    if open_gates:
        if data is not None and ("approve" in data or "deny" in data):
            if "approve" in data:
                args = data.get("args")
                if args is not None and not isinstance(args, dict):
                    raise InvalidParamsError(message="args must be a JSON object")
                return Answer("approve", snap.events, _pick(data["approve"], open_gates), args)
            reason = data.get("reason")
            return Answer("deny", snap.events, _pick(data["deny"], open_gates),
                          reason=None if reason is None else str(reason))
        verb, _, rest = text.partition(" ")
        verb = verb.strip(".,;:!").lower()
        if verb not in _APPROVE | _DENY:
            raise InvalidParamsError(message=f"task {snap.task.id} waits for approval of "
                                     f"{', '.join(open_gates)}: {HOW_TO_ANSWER}")
        first, _, tail = rest.strip().partition(" ")
        first = first.rstrip(".,;:!")
        # "approve" takes a gate id or nothing; "deny" a gate id, a reason, or both. A word
        # shaped like a gate id is one: an unknown one is refused, never read as the open gate.
        named = first if first in open_gates or _GATE_SHAPE.fullmatch(first) or (
            first and verb in _APPROVE) else None
        if verb in _APPROVE and tail.strip():
            raise InvalidParamsError(message=f'"{verb} {first} {tail.strip()}": approve takes '
                                     f"one gate id at most (open: {', '.join(open_gates)})")
        gate = _pick(named, open_gates)
        if verb in _APPROVE:
            return Answer("approve", snap.events, gate)
        reason = (tail if named else rest).strip()
        return Answer("deny", snap.events, gate, reason=reason or None)
    choices = _choices(snap.task)
    said = data.get("answer") if data is not None else None
    words = (said if isinstance(said, str) else text).split()
    word = words[0].strip(".,;:!").lower() if words else ""
    if not word or (choices and word not in choices):
        raise InvalidParamsError(message=f"task {snap.task.id} asks: "
                                 f"{a2a.message_text(snap.task.status.message)} "
                                 f"(answer {' or '.join(choices) or 'with text'})")
    return Answer("respond", snap.events, text=word)


async def apply_answer(link: SwarmLink, task_id: str, answer: Answer, who: str) -> None:
    """Send a decision to the supervisor."""
    if answer.kind == "approve":
        await link.call("approve", task_id, answer.gate, who, answer.args)
    elif answer.kind == "deny":
        await link.call("deny", task_id, answer.gate, who, answer.reason)
    else:
        await link.call("respond", task_id, answer.text)

