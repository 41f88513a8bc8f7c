"""Typed step events: the stream a task produces, which the console, client and tracing read.

Events are msgspec structs: cheap to build on the hot path, picklable across Ray, and encodable
to JSON or msgpack with their `kind` tag.
"""

from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every event: which task, when (unix seconds), and which agent if any."""

    task_id: str
    ts: float
    agent: str | None = None
    seq: int = 0


class TaskStateChanged(Event, tag="task_state"):
    """The task moved to a new A2A state (`submitted`, `working`, `completed`, ...)."""

    state: str
    detail: str = ""


class StepStarted(Event, tag="step_started"):
    """An agent began a step (one model call and its tool calls)."""

    step: int


class ModelCalled(Event, tag="model_call"):
    """A model call finished (or failed, with `error`)."""

    step: int
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    finish_reason: str = ""
    tool_calls: int = 0
    error: str | None = None
    error_class: str | None = None  # with `error`: model, tool, orchestration, budget, policy


class ToolCalled(Event, tag="tool_call"):
    """A tool call finished; `outcome` is `ok` or `error` with its class and a short detail."""

    step: int
    tool: str
    call_id: str
    duration_ms: float
    outcome: str
    error_class: str | None = None
    detail: str = ""


class ToolProgress(Event, tag="tool_progress"):
    """A running tool reported progress (an MCP progress notification): `progress` so far, of
    `total` if the tool knows it, with its message."""

    step: int
    tool: str
    call_id: str
    progress: float
    total: float | None = None
    message: str = ""


class Handoff(Event, tag="handoff"):
    """Control passed from one agent to another."""

    to_agent: str
    message: str = ""


class StepFinished(Event, tag="step_finished"):
    """An agent finished a step."""

    step: int
    duration_ms: float


class TaskFinished(Event, tag="task_finished"):
    """The task reached a terminal state; the last event of every task."""

    state: str
    answer: str | None = None
    error_class: str | None = None
    error: str | None = None
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    budget_exhausted: str | None = None  # the limit that ran out, if the task was cut short


class Alert(Event, tag="alert"):
    """A governance detection: a budget ran out, or the task looks stuck (same call repeated,
    no progress, handoff ping-pong, waiting too long, deadlock); or the durable store is
    unreachable (`store_unavailable`: the task waits for it, or fails once it waited
    state.outage_wait_s); `action` is what was done."""

    alert: str  # "budget_exhausted", "stuck.same_call", "stuck.deadlock", "store_unavailable"...
    action: str  # "wrap_up", "fail", "stop", "escalate", "wait"
    detail: str = ""


class TurnResumed(Event, tag="turn_resumed"):
    """An agent resumed a turn that a crash interrupted: from where, and what it cost."""

    step: int
    source: str  # "hot" (the object-store snapshot), "durable" (the store's), or "log"
    entries_replayed: int = 0
    restore_ms: float = 0.0


class RemoteUpdate(Event, tag="remote_update"):
    """A remote A2A member reported progress: its task's `state` (submitted, working,
    completed, ...; `retrying` when swarm sends the message again) and the status text."""

    state: str
    text: str = ""
    remote_task_id: str = ""


AnyEvent = (
    TaskStateChanged
    | StepStarted
    | ModelCalled
    | ToolCalled
    | ToolProgress
    | Handoff
    | StepFinished
    | TaskFinished
    | Alert
    | TurnResumed
    | RemoteUpdate
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def to_json(event: Event) -> bytes:
    """Encode an event as JSON with its `kind` tag."""
    return _encoder.encode(event)


def from_json(data: bytes | str) -> AnyEvent:
    """Decode an event from JSON."""
    return _decoder.decode(data)


_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(list[AnyEvent])  # type: ignore[valid-type]


def pack(events: list[Event]) -> bytes:
    """A batch of events as msgpack bytes: what agent replicas send the supervisor (one encode
    of the batch instead of pickling every struct)."""
    return _packer.encode(events)


def unpack(data: bytes) -> list[AnyEvent]:
    """The events of a `pack`ed batch."""
    return _unpacker.decode(data)


# Kinds the supervisor files one by one, as its task meter counts them (the others it needs
# only the agent of): an agent's run holding one travels decoded (`pack_runs`).
FILED_ONE_BY_ONE = frozenset({TaskStateChanged, TaskFinished, Alert})
# A run of events (`pack_runs`): its task, agent, count, failed calls by error class, the
# events packed, and what they say the agent's turn has done (`progress`).
Run = tuple[str, str | None, int, dict[str, int] | None, bytes, list[int] | None]
_runs_unpacker = msgspec.msgpack.Decoder(tuple[list[Run], bytes])


# Tool calls the step loop doesn't count as calls: the model's slips (an unknown tool, arguments
# that aren't an object) and what policy refused before it ran.
_UNCOUNTED_TOOL_CLASSES = frozenset({"model", "policy"})


def progress(events: list[Event]) -> list[int] | None:
    """What events say a turn has done, counted as the step loop counts its report: [steps,
    model calls, tool calls, input tokens, output tokens, cached tokens] (None if nothing):
    what a listing shows of a turn still running, and what a turn cut short counts."""
    steps = models = tools = tokens_in = tokens_out = cached = 0
    for ev in events:
        kind = type(ev)
        if kind is StepFinished:
            steps += 1
        elif kind is ModelCalled:
            if ev.error is None:  # type: ignore[attr-defined]  # a failed call is no call
                models += 1
                tokens_in += ev.input_tokens  # type: ignore[attr-defined]
                tokens_out += ev.output_tokens  # type: ignore[attr-defined]
                cached += ev.cached_tokens or 0  # type: ignore[attr-defined]
        elif kind is ToolCalled:
            if ev.error_class not in _UNCOUNTED_TOOL_CLASSES:  # type: ignore[attr-defined]
                tools += 1
    if not (steps or models or tools):
        return None
    return [steps, models, tools, tokens_in, tokens_out, cached]


def pack_runs(by_task: dict[str, list[Event]]) -> bytes:
    """Agents' events, one run a task, for the supervisor: each run packed on its own, with
    its task, agent, count, failed calls by error class and progress, so the supervisor files
    it without decoding it (`unpack_runs`); the events of runs it must look at go decoded."""
    runs: list[Run] = []
    loose: list[Event] = []
    for task_id, events in by_task.items():
        if not events:
            continue
        errors: dict[str, int] | None = None
        for ev in events:
            kind = type(ev)
            if kind in FILED_ONE_BY_ONE:
                errors = None
                break
            if (kind is ModelCalled or kind is ToolCalled) and ev.error_class:  # type: ignore[attr-defined]
                cls = ev.error_class  # type: ignore[attr-defined]
                errors = errors or {}
                errors[cls] = errors.get(cls, 0) + 1
        else:
            runs.append((task_id, events[-1].agent, len(events), errors, _packer.encode(events),
                         progress(events)))
            continue
        loose += events
    return _packer.encode((runs, _packer.encode(loose)))


def unpack_runs(data: bytes) -> tuple[list[Run], list[AnyEvent]]:
    """The runs and the decoded events of a `pack_runs` batch."""
    runs, loose = _runs_unpacker.decode(data)
    return runs, _unpacker.decode(loose)


def concat_packed(parts: list[Event | bytes]) -> bytes:
    """One `pack`ed list of events from events and `pack`ed lists, in order, without decoding
    the packed ones (their items are copied as they are)."""
    count, bodies = 0, []
    for part in parts:
        if isinstance(part, bytes):
            n, start = _array_header(part)
            count += n
            bodies.append(part[start:])
        else:
            count += 1
            bodies.append(_packer.encode(part))
    head = bytes([0x90 | count]) if count < 16 else \
        b"\xdc" + count.to_bytes(2, "big") if count < 65536 else b"\xdd" + count.to_bytes(4, "big")
    return head + b"".join(bodies)


def _array_header(data: bytes) -> tuple[int, int]:
    """(item count, offset of the first item) of a msgpack array."""
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F, 1
    if first == 0xDC:
        return int.from_bytes(data[1:3], "big"), 3
    if first == 0xDD:
        return int.from_bytes(data[1:5], "big"), 5
    raise ValueError(f"not a msgpack array (first byte {first:#x})")


def to_dict(event: Event) -> dict[str, object]:
    """An event as a plain dict with its `kind`."""
    return msgspec.to_builtins(event)  # type: ignore[no-any-return]
