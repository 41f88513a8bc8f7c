"""The A2A values the runtime builds (swarm.protocol.a2a): what a2a-sdk clients read."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf.struct_pb2 import Struct

from swarm.protocol import a2a


def test_metadata_is_set_as_struct_update_sets_it() -> None:
    values = {"s": "x", "t": True, "f": False, "i": 3, "x": 2.5, "n": None,
              "d": {"g": [1, "h", None]}, "l": [1, {"k": "v"}]}
    expected, got = Struct(), Struct()
    expected.update(values)
    a2a.set_metadata(got, values)
    assert got == expected
    # Keys already there are replaced, whatever their kind was.
    a2a.set_metadata(got, {"s": 1, "d": "now text"})
    expected.update({"s": 1, "d": "now text"})
    assert got == expected


def test_a_text_message_round_trips() -> None:
    msg = a2a.text_message("hello", role="agent", task_id="t" * 32, context_id="c" * 32,
                           metadata={"agent": "a", "outcome": "final", "n": 2})
    back = a2a.loads_message(a2a.dumps(msg))
    assert a2a.message_text(back) == "hello" and back.task_id == "t" * 32
    assert back.context_id == "c" * 32 and back.role == a2a.Role.ROLE_AGENT
    assert dict(back.metadata) == {"agent": "a", "outcome": "final", "n": 2.0}
    assert uuid.UUID(back.message_id).version == 4
    assert a2a.text_message("q").role == a2a.Role.ROLE_USER


def test_set_state_replaces_the_status_and_refuses_illegal_moves() -> None:
    first = a2a.text_message("task")
    task = a2a.new_task("t" * 32, "c" * 32, first, {"user": "u"})
    assert a2a.state_of(task) == "submitted" and task.metadata["user"] == "u"
    a2a.set_state(task, "working", a2a.text_message("on it", role="agent"))
    assert task.status.message.parts[0].text == "on it"
    a2a.set_state(task, "completed")
    # The whole status was replaced: no message left over from the last state.
    assert a2a.state_of(task) == "completed" and not task.status.HasField("message")
    assert task.status.timestamp.seconds > 0
    with pytest.raises(ValueError, match="illegal transition completed"):
        a2a.set_state(task, "working")
