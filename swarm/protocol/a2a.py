"""A2A values as swarm uses them: building messages and tasks, and moving them across Ray.

a2a-sdk 1.x types are protobuf messages, which don't pickle; across actor boundaries they travel
as their wire bytes (`dumps` / `loads_*`), which is also the cheapest encoding.
"""

from __future__ import annotations

import os
import time
from typing import Any

from a2a.types import Message, Part, Role, Task, TaskState
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import ListValue, Struct

# Short names used in events, the CLI and the client; the values are a2a-sdk's enum members.
STATES: dict[str, int] = {
    "submitted": TaskState.TASK_STATE_SUBMITTED,
    "working": TaskState.TASK_STATE_WORKING,
    "input_required": TaskState.TASK_STATE_INPUT_REQUIRED,
    "completed": TaskState.TASK_STATE_COMPLETED,
    "failed": TaskState.TASK_STATE_FAILED,
    "canceled": TaskState.TASK_STATE_CANCELED,
    "rejected": TaskState.TASK_STATE_REJECTED,
}
STATE_NAMES: dict[int, str] = {v: k for k, v in STATES.items()}
TERMINAL = frozenset({"completed", "failed", "canceled", "rejected"})

# Allowed transitions of the task table; anything else is an orchestration bug and is refused.
TRANSITIONS: dict[str, frozenset[str]] = {
    "submitted": frozenset({"working", "canceled", "rejected", "failed"}),
    "working": frozenset({"working", "input_required", "completed", "failed", "canceled"}),
    # input_required → input_required: a new question (a second gate, or the same one asked
    # again by a restarted supervisor).
    "input_required": frozenset({"working", "input_required", "canceled", "failed"}),
}


# Random bytes for ids, drawn from the OS a few kilobytes at a time: `os.urandom` is a system
# call, and under load one for 16 bytes took about 10 µs (cProfile, the supervisor of the
# concurrency benchmark), more than the rest of making an id; a task takes about seven. A
# forked child starts on fresh bytes, so it never repeats its parent's ids.
_POOL_BYTES = 4096
_pool = b""
_at = 0


def _fresh_pool() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_fresh_pool)


def new_id() -> str:
    """A fresh id for tasks, contexts and messages: a random (version 4) UUID as 32 hex
    digits, what `uuid.uuid4().hex` gives, made without the UUID object (a task takes
    several, and this is a third of the time)."""
    global _pool, _at
    at = _at
    if at + 16 > len(_pool):
        _pool, at = os.urandom(_POOL_BYTES), 0
    b = bytearray(_pool[at:at + 16])
    _at = at + 16
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return b.hex()


def text_message(
    text: str,
    *,
    role: str = "user",
    task_id: str = "",
    context_id: str = "",
    metadata: dict[str, Any] | None = None,
) -> Message:
    """An A2A message with one text part."""
    # Fields set one by one: a third of the time of the keyword constructor (upb), which a
    # task pays for several messages.
    msg = Message()
    msg.message_id = new_id()
    msg.role = Role.ROLE_USER if role == "user" else Role.ROLE_AGENT
    msg.parts.add().text = text
    msg.task_id = task_id
    msg.context_id = context_id
    if metadata:
        set_metadata(msg.metadata, metadata)
    return msg


def set_metadata(struct: Any, values: dict[str, Any]) -> None:
    """Set keys of a `google.protobuf.Struct`: as `Struct.update` does, with strings, numbers,
    booleans and None set on the field directly (`update` goes through Python code for each)."""
    fields, rest = struct.fields, None
    for key, value in values.items():
        kind = type(value)
        if kind is str:
            fields[key].string_value = value
        elif kind is bool:
            fields[key].bool_value = value
        elif kind is int or kind is float:
            fields[key].number_value = value
        elif value is None:
            fields[key].null_value = 0
        else:
            if rest is None:
                rest = {}
            rest[key] = value
    if rest:
        struct.update(rest)


def json_data(value: Any) -> Any:
    """A value read from a `google.protobuf.Struct` (`struct[key]`, or the Struct itself) as
    plain JSON data: a nested Struct or ListValue as a dict or list, all the way down. Numbers
    are what the Struct holds, doubles (an int set on it comes back a float)."""
    if isinstance(value, Struct):
        return {k: json_data(v) for k, v in value.items()}
    if isinstance(value, ListValue):
        return [json_data(v) for v in value]
    return value


def data_part(value: dict[str, Any]) -> Part:
    """A structured (JSON) message part."""
    part = Part()
    part.data.struct_value.update(value)
    return part


def message_text(msg: Message) -> str:
    """The text parts of a message, joined by newlines."""
    return "\n".join(p.text for p in msg.parts if p.HasField("text"))


def new_task(task_id: str, context_id: str, first: Message, metadata: dict[str, Any]) -> Task:
    """A SUBMITTED task holding its first message."""
    # Fields set one by one, as in `text_message`: the keyword constructor, with its nested
    # status and timestamp, takes half as long again.
    task = Task()
    task.id = task_id
    task.context_id = context_id
    status = task.status
    status.state = TaskState.TASK_STATE_SUBMITTED
    status.timestamp.FromNanoseconds(time.time_ns())
    task.history.append(first)
    if metadata:
        set_metadata(task.metadata, metadata)
    return task


def set_state(task: Task, state: str, message: Message | None = None) -> None:
    """Move a task to `state`, refusing transitions the A2A lifecycle doesn't allow."""
    current = STATE_NAMES.get(task.status.state, "submitted")
    if state not in TRANSITIONS.get(current, frozenset()):
        raise ValueError(f"task {task.id}: illegal transition {current} → {state}")
    status = task.status
    status.Clear()
    status.state = STATES[state]
    status.timestamp.FromNanoseconds(time.time_ns())
    if message is not None:
        status.message.CopyFrom(message)


def state_of(task: Task) -> str:
    """The task's state as a short name."""
    return STATE_NAMES.get(task.status.state, "unknown")


def add_answer(task: Task, text: str) -> None:
    """Attach the final answer as the task's artifact."""
    # Fields set one by one, as in `text_message` (the keyword constructor is the slow path).
    art = task.artifacts.add()
    art.artifact_id = new_id()
    art.name = "answer"
    art.parts.add().text = text


def dumps(value: Message | Task) -> bytes:
    """Wire bytes of an A2A value."""
    return value.SerializeToString()


def loads_message(data: bytes) -> Message:
    """A `Message` from wire bytes."""
    msg = Message()
    msg.ParseFromString(data)
    return msg


def loads_task(data: bytes) -> Task:
    """A `Task` from wire bytes."""
    task = Task()
    task.ParseFromString(data)
    return task


def to_dict(value: Message | Task) -> dict[str, Any]:
    """An A2A value as JSON-ready dict (protobuf JSON mapping)."""
    return MessageToDict(value)
