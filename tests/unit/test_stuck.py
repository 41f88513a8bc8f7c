"""Stuck detection: repeated calls, no progress, handoff ping-pong, waiting too long, deadlock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from swarm.config import parse_config
from swarm.events import Alert, Handoff, ToolCalled
from swarm.governance import stuck
from swarm.runtime.middleware import Middleware, NextTool, StopTurn, ToolInvocation
from swarm.runtime.step import Outcome
from swarm.testing import LocalSwarm
from swarm.tools.interface import ToolResult
from tests.unit import stuck_tools
from tests.unit.test_runtime_local import make_cfg

SAME = {"when": {}, "tool_calls": [{"name": "echo", "arguments": {"text": "again"}}]}


def _with_tool(tmp_path: Path, rules: list[dict[str, Any]], agents: dict[str, Any],
               name: str, fn: str, **extra: Any) -> Any:
    """make_cfg plus one more python tool server `name` with the function `fn`."""
    plain = {a: {k: v for k, v in spec.items() if k != "tools"} for a, spec in agents.items()}
    base = make_cfg(tmp_path, rules, plain, **extra).model_dump(exclude_none=True)
    base["tools"][name] = {"python": [fn]}
    for a, spec in agents.items():
        base["agents"][a]["tools"] = spec.get("tools", [])
    for m in base["models"].values():
        m.pop("policy_spec", None)
    return parse_config(base, base_dir=tmp_path)


def _alerts(sw: LocalSwarm, task_id: str) -> list[Alert]:
    return [e for e in sw.events(task_id) if isinstance(e, Alert)]


async def _until(sw: LocalSwarm, task_id: str, state: str, alerts: int = 1) -> None:
    """Wait (on the task's event stream, not a timer) until the task is in `state` after its
    `alerts`-th alert."""
    cursor = 0
    while sw.supervisor.get(task_id).state != state or len(_alerts(sw, task_id)) < alerts:
        evs, done = await sw.supervisor.events(task_id, cursor, 5.0)
        cursor += len(evs)
        assert not done, sw.supervisor.get(task_id).summary()


async def test_same_call_is_stopped_before_it_runs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, [SAME], {"a": {"model": "m", "tools": ["fn"]}},
                   stuck={"same_call": 3, "no_progress": None})
    before = stuck.counts().get(("t", "same_call"), 0)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed" and row["error_class"] == "policy"
        assert row["stuck"] == "same_call"
        assert row["error"].startswith("stuck (same_call): echo called 3 times")
        # Two identical calls ran; the third was refused; the model was asked three times.
        assert row["tool_calls"] == 2 and row["model_calls"] == 3
        (alert,) = _alerts(sw, row["task_id"])
        assert alert.alert == "stuck.same_call" and alert.action == "stop"
    assert stuck.counts()[("t", "same_call")] == before + 1


async def test_no_progress_counts_steps_that_learn_nothing(tmp_path: Path) -> None:
    # Different arguments each step, the same result ("2") every time.
    rules = [{"when": {}, "tool_calls": [
        {"name": "word_count", "arguments": {"text": "a {{ messages | length }}"}}]}]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["other"]}},
                   stuck={"same_call": None, "no_progress": 3})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed" and row["stuck"] == "no_progress", row
        # Step 1 learned "2"; steps 2-4 learned nothing new; the fifth model call was refused.
        assert row["model_calls"] == 4 and row["tool_calls"] == 4
        assert "the last 3 steps brought no new information" in row["error"]


async def test_handoff_ping_pong_is_stopped(tmp_path: Path) -> None:
    rules = [
        {"when": {"agent": "a"}, "tool_calls": [{"name": "transfer_to_b",
                                                 "arguments": {"message": "you do it"}}]},
        {"when": {"agent": "b"}, "tool_calls": [{"name": "transfer_to_a",
                                                 "arguments": {"message": "no, you"}}]},
    ]
    agents = {"a": {"model": "m", "handoffs": ["b"]}, "b": {"model": "m", "handoffs": ["a"]}}
    cfg = make_cfg(tmp_path, rules, agents, stuck={"ping_pong": 4})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed" and row["error_class"] == "policy"
        assert row["stuck"] == "ping_pong"
        assert "4 handoffs in a row between b and a" in row["error"]
        evs = sw.events(row["task_id"])
        # Turns a, b, a, b: four handoffs asked for, the last one not followed.
        assert len([e for e in evs if isinstance(e, Handoff)]) == 4
        assert row["model_calls"] == 4
        assert [a.alert for a in _alerts(sw, row["task_id"])] == ["stuck.ping_pong"]


async def test_escalate_parks_the_task_for_an_operator(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, [SAME], {"a": {"model": "m", "tools": ["fn"]}},
                   stuck={"same_call": 3, "no_progress": None, "action": "escalate"})
    async with LocalSwarm(cfg) as sw:
        task_id = await sw.supervisor.submit("go")
        await _until(sw, task_id, "input_required")
        rec = sw.supervisor.get(task_id)
        assert "echo called 3 times" in (rec.question or "") and rec.stuck == "same_call"
        # Continue: detection starts afresh, so two more calls run before it is stuck again.
        await sw.supervisor.respond(task_id, "continue")
        await _until(sw, task_id, "input_required", alerts=2)
        assert rec.tool_calls == 4
        await sw.supervisor.respond(task_id, "stop")
        row = await sw.supervisor.wait(task_id, 30)
        assert row["state"] == "failed" and row["stuck"] == "same_call"
        assert [a.action for a in _alerts(sw, task_id)] == ["escalate", "escalate"]


class AskOnce(Middleware):
    """Parks the turn in INPUT_REQUIRED at the first tool call (as a gate would)."""

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        raise StopTurn(Outcome("input_required", text="may I?"))


async def test_waiting_for_input_past_the_timeout_fails(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, [SAME], {"a": {"model": "m", "tools": ["fn"]}},
                   stuck={"input_timeout_s": 0.05})
    async with LocalSwarm(cfg) as sw:
        loop: Any = sw.hosts["a"]._loop
        loop.use([AskOnce()])
        row = await sw.run("go")
        assert row["state"] == "failed" and row["error_class"] == "orchestration"
        assert row["stuck"] == "input_timeout"
        assert "no answer in 0.05 s" in row["error"] and "may I?" in row["error"]
        assert [a.alert for a in _alerts(sw, row["task_id"])] == ["stuck.input_timeout"]


async def test_waiting_for_a_session_slot_past_the_timeout_fails(tmp_path: Path) -> None:
    rules = [{"when": {"last_role": "user"}, "tool_calls": [
                 {"name": "hold", "arguments": {"key": "{{ task }}"}}]},
             {"when": {}, "content": "done"}]
    cfg = _with_tool(tmp_path, rules, {"a": {"model": "m", "tools": ["held"], "max_sessions": 1}},
                     "held", "tests.unit.stuck_tools:hold", stuck={"queue_timeout_s": 0.05})
    stuck_tools.HOLD["first"] = asyncio.Event()
    stuck_tools.ENTERED["first"] = asyncio.Event()
    try:
        async with LocalSwarm(cfg) as sw:
            first = await sw.supervisor.submit("first")
            await stuck_tools.ENTERED["first"].wait()  # it holds the only slot
            second = await sw.run("second")
            assert second["state"] == "failed" and second["stuck"] == "queue_timeout"
            assert "for a session slot on agent a" in second["error"]
            stuck_tools.HOLD["first"].set()
            row = await sw.supervisor.wait(first, 30)
            assert row["state"] == "completed" and row["answer"] == "done"
    finally:
        stuck_tools.HOLD.clear()
        stuck_tools.ENTERED.clear()


async def test_a_deadlock_is_broken_at_the_task_that_closes_the_cycle(tmp_path: Path) -> None:
    # The parent's tool delegates a sub-task to the same agent, whose only slot the parent
    # holds while it waits: the sub-task can never run.
    rules = [{"when": {"task_matches": "^parent", "last_role": "user"}, "tool_calls": [
                 {"name": "delegate", "arguments": {"text": "child of {{ task }}"}}]},
             {"when": {"last_role": "tool"}, "content": "parent saw: {{ last }}"},
             {"when": {}, "content": "child done"}]
    cfg = _with_tool(tmp_path, rules, {"a": {"model": "m", "tools": ["deleg"], "max_sessions": 1}},
                     "deleg", "tests.unit.stuck_tools:delegate")
    async with LocalSwarm(cfg) as sw:
        stuck_tools.SUPERVISOR[:] = [sw.supervisor]
        try:
            row = await sw.run("parent task")
        finally:
            stuck_tools.SUPERVISOR.clear()
        assert row["state"] == "completed", row
        assert row["answer"].startswith("parent saw: sub-task failed: stuck (deadlock)")
        (child,) = [r for r in sw.supervisor.list() if r["task_id"] != row["task_id"]]
        assert child["state"] == "failed" and child["error_class"] == "orchestration"
        assert child["stuck"] == "deadlock" and child["model_calls"] == 0
        assert row["task_id"] in child["error"]
        (tool,) = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        assert tool.outcome == "ok"


def test_bounces_counts_alternating_handoffs() -> None:
    assert [stuck.bounces(list(t)) for t in ["A", "AB", "ABA", "ABAB", "CABAB", "ABB", "ABCB"]
            ] == [0, 1, 2, 3, 3, 0, 2]


# A payment repeated with the same arguments: stuck at its third call (same_call 3), which
# doesn't run.
_PAY_AGAIN = [
    {"when": {"agent": "a"}, "tool_calls": [{"name": "pay", "arguments": {"key": "same"}}]},
]


async def test_a_call_a_stopped_turn_never_ran_does_not_count_when_read_back(
        tmp_path: Path) -> None:
    """The call a detector refused is answered in the log ("not run"), so the transcript
    stays valid, but it was no call: a task read back from its log counts what it counted
    live (a restarted supervisor, a resumed turn)."""
    from swarm.state.memory import MemoryCheckpointer
    from swarm.state.replay import restore
    from tests.unit import durable_tools as dt

    dt.reset()
    cfg = dt.swarm_config(tmp_path, _PAY_AGAIN, name="stop",
                          stuck={"same_call": 3, "no_progress": None})
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        row = await sw.run("pay")
    assert row["state"] == "failed" and row["stuck"] == "same_call"
    assert (row["tool_calls"], row["model_calls"]) == (2, 3) and dt.RUNS == {"same": 2}
    state, _ = await restore(store, row["task_id"])
    assert (state.tool_calls, state.model_calls, state.step) == (2, 3, 3)
    (refused,) = [e for e in await store.read(row["task_id"])
                  if e.kind == "tool" and e.data.get("not_run")]
    assert refused.data["message"]["content"].startswith("ERROR: not run: stuck (same_call)")
