"""Stuck detection: repeated calls, no progress, handoff ping-pong, waiting too long, deadlock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from swarm.config import parse_config
from swarm.errors import UserError
from swarm.events import Alert, Handoff, TaskStateChanged, ToolCalled
from swarm.governance import stuck
from swarm.protocol import a2a
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


async def test_a_second_answer_to_an_escalation_is_refused(tmp_path: Path) -> None:
    """Two answers in a row to one question: the first is taken, the second refused, naming
    the first. (The second was taken silently and dropped, while the task had yet to move on
    from the first.)"""
    cfg = make_cfg(tmp_path, [SAME], {"a": {"model": "m", "tools": ["fn"]}},
                   stuck={"same_call": 3, "no_progress": None, "action": "escalate"})
    async with LocalSwarm(cfg) as sw:
        task_id = await sw.supervisor.submit("go")
        await _until(sw, task_id, "input_required")
        await sw.supervisor.respond(task_id, "stop")
        with pytest.raises(UserError, match="answered already \\('stop'\\); one answer is "
                                            "taken"):
            await sw.supervisor.respond(task_id, "continue")
        row = await sw.supervisor.wait(task_id, 30)
        assert row["state"] == "failed" and row["stuck"] == "same_call", row


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
# doesn't run. `_CARRY_ON`: told by an operator to go on, the agent answers instead.
_PAY_AGAIN = [
    {"when": {"agent": "a"}, "tool_calls": [{"name": "pay", "arguments": {"key": "same"}}]},
]
_CARRY_ON = [
    {"when": {"agent": "a", "last_role": "user", "last_matches": "^An operator reviewed"},
     "content": "carried on after {{ counts.called.pay }} payment calls"},
    *_PAY_AGAIN,
]


async def _escalated(sw: LocalSwarm, task_id: str, n: int = 1) -> Any:
    """The task's record once it waits for an operator's answer to its `n`-th question (as
    this supervisor counts them)."""
    rec = sw.supervisor.get(task_id)
    while sum(isinstance(e, TaskStateChanged) and e.state == "input_required"
              for e in sw.events(task_id)) < n:
        assert not rec.done.is_set(), rec.summary()
        await asyncio.wait_for(rec.watch().wait(), 10)
    await asyncio.wait_for(rec.asking.wait(), 10)
    return rec


async def _restarted(sw: LocalSwarm, cfg: Any, store: Any) -> LocalSwarm:
    """The swarm crashed and started again on the same store, its one task resumed."""
    await sw.crash()
    await sw.__aexit__(None, None, None)
    sw = LocalSwarm(cfg, store=store)
    await sw.__aenter__()
    assert await sw.supervisor.load() == 1
    return sw


async def _stuck_escalation(tmp_path: Path, answers: list[str], *, restart: bool
                            ) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """Run a task that gets stuck, answering each escalation in turn (told to continue, it
    gets stuck again, unless its last answer is continue: then it finishes); with `restart`,
    the supervisor dies while the first question waits and a new one on the same store takes
    the task over. The task's last row, the payments made, and the questions asked."""
    from swarm.state.memory import MemoryCheckpointer
    from tests.unit import durable_tools as dt

    dt.reset()
    rules = _PAY_AGAIN if answers[-1] == "stop" else _CARRY_ON
    cfg = dt.swarm_config(tmp_path, rules, name="esc",
                          stuck={"same_call": 3, "no_progress": None, "action": "escalate"})
    store = MemoryCheckpointer()
    questions: list[str] = []
    sw = LocalSwarm(cfg, store=store)
    await sw.__aenter__()
    try:
        task_id = await sw.supervisor.submit("pay")
        rec = await _escalated(sw, task_id)
        questions.append(str(rec.question))
        assert rec.choices == ("continue", "stop") and rec.stuck == "same_call"
        if restart:
            sw = await _restarted(sw, cfg, store)
            rec = await _escalated(sw, task_id)
            questions.append(str(rec.question))
            assert rec.choices == ("continue", "stop") and rec.stuck == "same_call"
            # The question a program reads (the A2A status) offers the same choices.
            status = rec.task.status.message
            assert {"choices": ["continue", "stop"]} in [
                a2a.to_dict(p)["data"] for p in status.parts if p.HasField("data")]
            with pytest.raises(UserError, match="'continue' or 'stop'"):
                await sw.supervisor.respond(task_id, "rerun")
        for i, answer in enumerate(answers):
            if i:
                rec = await _escalated(sw, task_id, 1 + i)
                questions.append(str(rec.question))
            await sw.supervisor.respond(task_id, answer)
        row = await sw.supervisor.wait(task_id, 30)
        assert row["state"] in ("completed", "failed"), row
    finally:
        await sw.__aexit__(None, None, None)
    return row, dict(dt.RUNS), questions


_COUNTED = ("state", "answer", "error_class", "error", "stuck", "steps", "model_calls",
            "tool_calls", "input_tokens", "output_tokens", "cost_usd", "question")


@pytest.mark.parametrize("answers", [["stop"], ["continue"], ["continue", "stop"]])
async def test_a_stuck_escalation_is_asked_again_after_a_supervisor_restart(
        tmp_path: Path, answers: list[str]) -> None:
    """The supervisor restarts while a stuck task waits for an operator: the new one asks the
    same question (same choices), and the answer continues or stops the task as it would have
    without the restart: the same outcome and counters, no payment made again."""
    before, runs, _ = await _stuck_escalation(tmp_path, answers, restart=False)
    after, runs_after, questions = await _stuck_escalation(tmp_path, answers, restart=True)
    assert {k: after[k] for k in _COUNTED} == {k: before[k] for k in _COUNTED}
    assert runs_after == runs == {"same": 2 * len(answers)}
    assert questions[0] == questions[1] and "pay called 3 times" in questions[0]
    if answers[-1] == "stop":
        assert after["state"] == "failed" and after["stuck"] == "same_call"
        assert after["error"].startswith("stuck (same_call): pay called 3 times")
    else:
        assert after["state"] == "completed" and after["stuck"] is None
        assert after["answer"] == "carried on after 3 payment calls"
    assert after["tool_calls"] == 2 * len(answers)


async def test_a_stuck_turn_reads_back_from_its_log_as_stuck(tmp_path: Path) -> None:
    """A turn a stuck detector ended, read back from the log (its result lost with a replica,
    or a supervisor that restarted): it is still stuck, so the operator is asked; and the
    refused call, which never ran, doesn't count as a tool call."""
    from swarm.runtime.agent import TurnRequest
    from swarm.state.memory import MemoryCheckpointer
    from swarm.state.replay import restore
    from tests.unit import durable_tools as dt

    dt.reset()
    cfg = dt.swarm_config(tmp_path, _PAY_AGAIN, name="esc",
                          stuck={"same_call": 3, "no_progress": None, "action": "escalate"})
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("pay")
        await _escalated(sw, task_id)
        state, _ = await restore(store, task_id)
        assert state.open_turn is None and state.last_outcome is not None
        assert state.last_outcome["stuck"] == "same_call"
        assert (state.tool_calls, state.model_calls) == (2, 3)
        msg = a2a.dumps(a2a.text_message("pay", role="user", task_id=task_id))
        again = await sw.hosts["a"].run_turn(TurnRequest(
            task_id=task_id, context_id=task_id, message=msg, transcript=[], step_offset=0,
            max_steps=10, log_id=task_id, turn_id="0", resume=True))
    assert again.kind == "failed" and again.stuck == "same_call"
    assert again.error_class == "policy" and (again.tool_calls, again.model_calls) == (2, 3)
    assert dt.RUNS == {"same": 2}  # reading it back ran nothing again


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


# Told to go on, the agent looks something up (a call that may run again), then pays again.
_LOOK_THEN_PAY = [
    {"when": {"agent": "a", "last_role": "user", "last_matches": "^An operator reviewed"},
     "tool_calls": [{"name": "lookup", "arguments": {"key": "held"}}]},
    *_PAY_AGAIN,
]


async def _continued(tmp_path: Path, *, restart: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """A task stuck, told to continue, stuck again and stopped; with `restart`, the
    supervisor dies during the lookup after the answer, and a new one resumes the turn. The
    task's last row and the calls made."""
    from swarm.state.memory import MemoryCheckpointer
    from tests.unit import durable_tools as dt

    dt.reset()
    cfg = dt.swarm_config(tmp_path, _LOOK_THEN_PAY, name="esc",
                          stuck={"same_call": 3, "no_progress": None, "action": "escalate"})
    store = MemoryCheckpointer()
    if restart:
        dt.HOLD["held"], dt.ENTERED["held"] = asyncio.Event(), asyncio.Event()
    sw = LocalSwarm(cfg, store=store)
    await sw.__aenter__()
    try:
        task_id = await sw.supervisor.submit("pay")
        await _escalated(sw, task_id)
        await sw.supervisor.respond(task_id, "continue")
        asked = 2
        if restart:
            await asyncio.wait_for(dt.ENTERED["held"].wait(), 10)
            dt.HOLD.clear()  # the held call waits on its event already; the resumed one won't
            sw = await _restarted(sw, cfg, store)
            asked = 1  # this supervisor's first question
        rec = await _escalated(sw, task_id, asked)
        assert rec.stuck == "same_call"
        await sw.supervisor.respond(task_id, "stop")
        row = await sw.supervisor.wait(task_id, 30)
    finally:
        await sw.__aexit__(None, None, None)
    return row, dict(dt.RUNS)


async def test_after_an_operator_said_continue_a_restart_keeps_counting_from_the_answer(
        tmp_path: Path) -> None:
    """Told to continue, a stuck task's detectors count afresh from the answer; a turn resumed
    after a restart counts from there too (the turn's start in the log says where), not from
    the task's start, which would find it stuck again at once."""
    before, runs = await _continued(tmp_path, restart=False)
    after, runs_after = await _continued(tmp_path, restart=True)
    assert {k: after[k] for k in _COUNTED} == {k: before[k] for k in _COUNTED}
    assert after["state"] == "failed" and after["stuck"] == "same_call"
    # Two payments before the first question, two after the answer; the lookup, which may
    # run again, ran again after the restart.
    assert runs == {"same": 4, "held": 1} and runs_after == {"same": 4, "held": 2}


_BOUNCE = [
    {"when": {"agent": "a"}, "tool_calls": [{"name": "transfer_to_b",
                                             "arguments": {"message": "you do it"}}]},
    {"when": {"agent": "b"}, "tool_calls": [{"name": "transfer_to_a",
                                             "arguments": {"message": "no, you"}}]},
]


async def _ping_pong(tmp_path: Path, answers: list[str], *, restart: bool
                     ) -> tuple[dict[str, Any], list[str]]:
    """Agents that hand the task back and forth (ping_pong 4, escalated), each question
    answered in turn; with `restart`, the supervisor dies while the first one waits. The
    task's last row and the questions asked."""
    from swarm.state.memory import MemoryCheckpointer

    agents = {"a": {"model": "m", "handoffs": ["b"]}, "b": {"model": "m", "handoffs": ["a"]}}
    cfg = make_cfg(tmp_path, _BOUNCE, agents, stuck={"ping_pong": 4, "action": "escalate"})
    store = MemoryCheckpointer()
    sw = LocalSwarm(cfg, store=store)
    await sw.__aenter__()
    try:
        task_id = await sw.supervisor.submit("go")
        questions = [str((await _escalated(sw, task_id)).question)]
        if restart:
            sw = await _restarted(sw, cfg, store)
            rec = await _escalated(sw, task_id)
            assert rec.choices == ("continue", "stop") and rec.stuck == "ping_pong"
            questions.append(str(rec.question))
        for i, answer in enumerate(answers):
            if i:
                questions.append(str((await _escalated(sw, task_id, 1 + i)).question))
            await sw.supervisor.respond(task_id, answer)
        row = await sw.supervisor.wait(task_id, 30)
    finally:
        await sw.__aexit__(None, None, None)
    return row, questions


@pytest.mark.parametrize("answers", [["stop"], ["continue", "stop"]])
async def test_a_ping_pong_escalation_is_asked_again_after_a_supervisor_restart(
        tmp_path: Path, answers: list[str]) -> None:
    """Handoff ping-pong, escalated: the restarted supervisor asks again rather than follow
    the last handoff as if an operator had said continue."""
    before, _ = await _ping_pong(tmp_path, answers, restart=False)
    after, questions = await _ping_pong(tmp_path, answers, restart=True)
    assert {k: after[k] for k in _COUNTED} == {k: before[k] for k in _COUNTED}
    assert after["state"] == "failed" and after["stuck"] == "ping_pong"
    assert "4 handoffs in a row between b and a" in after["error"]
    assert questions[0] == questions[1] and "4 handoffs in a row" in questions[0]
