"""Event batches as agents send them to the supervisor: msgpack, every kind kept exactly."""

from __future__ import annotations

import msgspec
import pytest

from swarm import events as ev


def _all_kinds() -> list[ev.Event]:
    return [
        ev.TaskStateChanged(task_id="t1", ts=1.5, state="working", detail="d"),
        ev.StepStarted(task_id="t1", ts=2.0, agent="a", step=1),
        ev.ModelCalled(task_id="t1", ts=2.1, agent="a", step=1, model="m", input_tokens=7,
                       output_tokens=3, cached_tokens=2, latency_ms=1.25, ttft_ms=None,
                       finish_reason="tool_calls", tool_calls=1),
        ev.ToolCalled(task_id="t1", ts=2.2, agent="a", step=1, tool="echo", call_id="c1",
                      duration_ms=0.5, outcome="error", error_class="tool", detail="boom"),
        ev.ToolProgress(task_id="t1", ts=2.3, step=1, tool="echo", call_id="c1",
                        progress=0.5, total=None, message="half"),
        ev.Handoff(task_id="t1", ts=2.4, agent="a", to_agent="b", message="over"),
        ev.StepFinished(task_id="t1", ts=2.5, agent="a", step=1, duration_ms=3.0),
        ev.TaskFinished(task_id="t1", ts=3.0, state="completed", answer="42", steps=1),
        ev.Alert(task_id="t2", ts=3.1, alert="stuck.same_call", action="stop", detail="x"),
        ev.TurnResumed(task_id="t2", ts=3.2, agent="a", step=4, source="hot",
                       entries_replayed=2, restore_ms=1.5),
        ev.RemoteUpdate(task_id="t2", ts=3.3, state="working", text="…", remote_task_id="r"),
    ]


def test_a_packed_batch_unpacks_to_the_same_events_of_every_kind():
    batch = _all_kinds()
    kinds = {type(e) for e in batch}
    assert len(kinds) == len(ev.AnyEvent.__args__)  # every kind is in the batch
    out = ev.unpack(ev.pack(batch))
    assert out == batch
    assert [type(e) for e in out] == [type(e) for e in batch]


def test_an_empty_batch_and_a_corrupt_one():
    assert ev.unpack(ev.pack([])) == []
    with pytest.raises(msgspec.DecodeError):
        ev.unpack(b"\x91\x81\xa4kind\xa4nope")


def test_live_events_are_pushed_less_often_only_while_a_replica_is_busy():
    from swarm.runtime.agent import (
        _FLUSH_INTERVAL_S,
        _FLUSH_MAX_INTERVAL_S,
        flush_interval,
    )

    assert flush_interval(0, _FLUSH_INTERVAL_S) == _FLUSH_INTERVAL_S
    assert flush_interval(50, _FLUSH_INTERVAL_S) == _FLUSH_INTERVAL_S  # 1,000 a second
    busy = flush_interval(400, _FLUSH_INTERVAL_S)  # 8,000 a second
    assert _FLUSH_INTERVAL_S < busy < _FLUSH_MAX_INTERVAL_S
    # A steady rate keeps its interval.
    assert flush_interval(int(8000 * busy), busy) == pytest.approx(busy)
    assert flush_interval(10**6, busy) == _FLUSH_MAX_INTERVAL_S
    assert flush_interval(10, busy) == _FLUSH_INTERVAL_S  # back at once when it quietens


def test_progress_counts_as_the_step_loop_reports() -> None:
    """A running turn's progress (listings, and what a turn cut short counts) counts as the
    step loop's report does: a failed model call is no call, a tool call the model slipped on
    or policy refused is no call, and cached tokens are carried (for the cost)."""
    from swarm.events import ModelCalled, StepFinished, ToolCalled, progress

    t = {"task_id": "t", "ts": 1.0, "agent": "a"}
    events = [
        ModelCalled(**t, step=1, model="m", input_tokens=100, output_tokens=10,
                    cached_tokens=40),
        ModelCalled(**t, step=2, model="m", error="HTTP 503", error_class="model"),
        ToolCalled(**t, step=1, tool="echo", call_id="c1", duration_ms=1, outcome="ok"),
        ToolCalled(**t, step=1, tool="nope", call_id="c2", duration_ms=1, outcome="error",
                   error_class="model"),
        ToolCalled(**t, step=1, tool="echo", call_id="c3", duration_ms=1, outcome="error",
                   error_class="policy"),
        ToolCalled(**t, step=1, tool="fail", call_id="c4", duration_ms=1, outcome="error",
                   error_class="tool"),
        StepFinished(**t, step=1, duration_ms=2.0),
    ]
    assert progress(events) == [1, 1, 2, 100, 10, 40]
    assert progress([events[1]]) is None  # nothing that counts
