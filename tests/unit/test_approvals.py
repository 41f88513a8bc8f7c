"""Approval gates, in one process: a gated call waits for a decision that survives restarts."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.config import parse_config
from swarm.errors import ConfigError, UserError
from swarm.runtime.journal import args_hash
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.unit import durable_tools as dt

RULES = [
    {"when": {"agent": "a", "last_role": "user"},
     "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-1"}}]},
    {"when": {"agent": "a", "last_tool": "lookup", "called": {"pay": 0}},
     "tool_calls": [{"name": "pay", "arguments": {"key": "{{ task }}-2"}}]},
    {"when": {"agent": "a", "last_tool": "pay"},
     "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "{{ last }}"}}]},
    {"when": {"agent": "b"}, "content": "done: {{ last_user }}"},
]


def make_cfg(tmp_path: Path, **approvals: Any) -> Any:
    return dt.swarm_config(
        tmp_path, RULES, name="gated",
        approvals=approvals or {"require": "destructive", "exempt": ["lookup"]})


@pytest.fixture(autouse=True)
def _reset() -> None:
    dt.reset()


async def _gate(sw: LocalSwarm, task_id: str) -> dict[str, Any]:
    """Wait until the task waits on an approval gate; return the gate."""
    rec = sw.supervisor.get(task_id)
    while not (rec.state == "input_required" and rec.gates):
        await asyncio.wait_for(rec.watch().wait(), 10)
    return next(iter(rec.gates.values()))


async def test_a_destructive_call_waits_and_runs_once_with_the_edited_arguments(
        tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit("x", user="carol")
        gate = await _gate(sw, task_id)
        assert gate["tool"] == "pay" and json.loads(gate["arguments"]) == {"key": "x-2"}
        assert gate["agent"] == "a" and "destructive" in gate["reason"]
        summary = sw.supervisor.get(task_id).summary()
        assert summary["state"] == "input_required"
        assert summary["gates"][0]["gate"] == gate["gate"]
        # The question gives the commands that answer it: the swarm's name and the task id.
        assert f"`swarm approve gated {task_id} {gate['gate']}`" in summary["question"]
        assert f"`swarm deny gated {task_id} {gate['gate']}`" in summary["question"]
        assert dt.RUNS == {"x-1": 1}  # the lookup ran, the payment waits
        await sw.supervisor.approve(task_id, gate["gate"], approver="alice",
                                    args={"key": "edited"})
        row = await sw.supervisor.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == "done: paid edited"
    assert row["gates"] == [] and row["question"] is None
    assert dt.RUNS == {"x-1": 1, "edited": 1}
    # The ledger and the log show what ran: the edited arguments, approved by alice.
    ledger = await store.ledger(task_id)
    pay = next(r for r in ledger.values() if r.tool == "pay")
    assert pay.state == "finished" and pay.args_hash == args_hash(json.dumps({"key": "edited"}))
    approvals = [e.data for e in await store.read(task_id) if e.kind == "approval"]
    assert [a["event"] for a in approvals] == ["requested", "approved", "ran"]
    assert approvals[1]["by"] == "alice" and json.loads(approvals[1]["arguments"]) == {
        "key": "edited"}


async def test_a_denied_call_reaches_the_model_and_the_task_goes_on(tmp_path: Path) -> None:
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("y")
        gate = await _gate(sw, task_id)
        await sw.supervisor.deny(task_id, gate["gate"], approver="bob", reason="too risky")
        row = await sw.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert row["answer"] == "done: ERROR: denied by bob: too risky"
    assert "y-2" not in dt.RUNS


async def test_the_gate_and_its_decision_survive_a_restart(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("z")
        gid = (await _gate(sw, task_id))["gate"]
        await sw.crash()
    # The restarted swarm finds the open gate in the log and waits on it again; its request
    # was audited by the supervisor it was made to, not again by this one (the process's
    # audit log of the swarm is the one both wrote to).
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        assert (await _gate(sw2, task_id))["gate"] == gid
        audit = sw2.supervisor.audit
        assert audit is not None
        assert len(await audit.read(task_id=task_id, kind="approval.requested")) == 1
        await sw2.supervisor.approve(task_id, gid, approver="alice")
        dt.HOLD["z-2"], dt.ENTERED["z-2"] = asyncio.Event(), asyncio.Event()
        await asyncio.wait_for(dt.ENTERED["z-2"].wait(), 10)
        await sw2.crash()  # dies while the approved payment runs
    dt.HOLD.clear()
    async with LocalSwarm(cfg, store=store) as sw3:
        await sw3.supervisor.load()
        rec = sw3.supervisor.get(task_id)
        while rec.state != "input_required":
            await asyncio.wait_for(rec.watch().wait(), 10)
        # Not a new gate: the approved call may have taken effect, as after any crash.
        assert rec.gates == {} and "rerun" in (rec.question or "")
        with pytest.raises(UserError, match="already approved by alice"):
            await sw3.supervisor.approve(task_id, gid, approver="alice")
        await sw3.supervisor.respond(task_id, "skip")
        row = await sw3.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert dt.RUNS == {"z-1": 1, "z-2": 1}  # approved once, ran once


async def test_an_unanswered_gate_is_denied_by_timeout(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, require="listed", tools=["t.pay"], timeout_s=0.05)
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        row = await sw.run("w")
    assert row["state"] == "completed"
    assert row["answer"].startswith("done: ERROR: denied by timeout: no decision within")
    assert "w-2" not in dt.RUNS


async def test_the_timeout_counts_from_the_gate_not_from_a_restart(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path, require="destructive", exempt=["lookup"], timeout_s=60)
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("v")
        await _gate(sw, task_id)
        await sw.crash()
    async with LocalSwarm(cfg, store=store) as sw2:
        # The supervisor comes back two minutes after the gate was raised (within the task's
        # wall-clock budget of 600 s, past the gate's 60 s).
        sw2.supervisor.clock = lambda: time.time() + 120
        await sw2.supervisor.load()
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["answer"].startswith("done: ERROR: denied by timeout")


async def test_bad_decisions_are_clear_errors(tmp_path: Path) -> None:
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("u")
        gid = (await _gate(sw, task_id))["gate"]
        with pytest.raises(UserError, match=f"task {task_id} has no gate 'nope'; open gates: "
                                            f"{gid}"):
            await sw.supervisor.approve(task_id, "nope", approver="alice")
        with pytest.raises(UserError, match="arguments must be a JSON object"):
            await sw.supervisor.approve(task_id, gid, approver="alice", args="[1]")
        with pytest.raises(UserError, match="the arguments are not valid JSON"):
            await sw.supervisor.approve(task_id, gid, approver="alice", args="{nope")
        with pytest.raises(UserError, match="approver's name"):
            await sw.supervisor.approve(task_id, gid, approver=" ")
        with pytest.raises(UserError, match="waits for approval of gate"):
            await sw.supervisor.respond(task_id, "rerun")
        await sw.supervisor.deny(task_id, gid, approver="alice")
        with pytest.raises(UserError, match=f"gate {gid} of task {task_id} was already denied "
                                            "by alice"):
            await sw.supervisor.approve(task_id, gid, approver="bob")
        await sw.supervisor.wait(task_id, 10)
        with pytest.raises(UserError, match="no task"):
            await sw.supervisor.approve("missing-task", gid, approver="bob")


async def test_edited_arguments_must_fit_the_tool_schema(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit("s")
        gid = (await _gate(sw, task_id))["gate"]
        for bad, why in [({"nosuchparam": 1}, "'key' is a required property"),
                         ({"key": "k", "nosuchparam": 1}, "Additional properties"),
                         ({"key": 3}, "3 is not of type 'string' (at key)")]:
            with pytest.raises(UserError, match=rf"the arguments don't fit the input schema of "
                                                rf"pay: .*{re.escape(why)}.*; gate {gid} of "
                                                rf"task {task_id} stays open"):
                await sw.supervisor.approve(task_id, gid, approver="alice", args=bad)
        rec = sw.supervisor.get(task_id)
        assert rec.state == "input_required" and list(rec.gates) == [gid]
        assert "input_schema" not in rec.gates[gid]  # the task's row keeps the gate only
        await sw.supervisor.approve(task_id, gid, approver="alice", args={"key": "fine"})
        row = await sw.supervisor.wait(task_id, 10)
    assert row["answer"] == "done: paid fine" and dt.RUNS == {"s-1": 1, "fine": 1}


async def test_edited_arguments_approved_unchecked_are_refused_where_the_call_resumes(
        tmp_path: Path) -> None:
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("r")
        gid = (await _gate(sw, task_id))["gate"]
        sw.supervisor.approvals.open[(task_id, gid)].schema = None  # as an older supervisor
        await sw.supervisor.approve(task_id, gid, approver="alice", args={"nosuchparam": 1})
        row = await sw.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert row["answer"] == (
        "done: ERROR: the arguments alice approved for pay don't fit its input schema, so the call "
        "did not run: Additional properties are not allowed ('nosuchparam' was unexpected); "
        "'key' is a required property")
    assert dt.RUNS == {"r-1": 1}


def test_bad_approval_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"rules": RULES}))
    base = {"name": "g", "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
            "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"}}
    for approvals, where, what in [
        ({"require": "sometimes"}, "approvals.require", "Input should be"),
        ({"require": "none", "tools": ["x"]}, "approvals", "require is none"),
        ({"require": "all", "agents": {"ghost": "none"}}, "approvals.agents.ghost",
         "unknown agent"),
        ({"timeout_s": 0}, "approvals.timeout_s", "greater than 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config({**base, "approvals": approvals}, base_dir=tmp_path)
        assert (where, ) == tuple(p for p, _ in e.value.problems if p == where)
        assert what in str(e.value)
    with pytest.raises(ConfigError, match="approval gates need durable state"):
        parse_config({**base, "approvals": {"require": "all"}, "state": {"store": "none"}},
                     base_dir=tmp_path)


async def test_decisions_kept_for_errors_are_bounded_and_older_ones_are_read_from_the_log(
        tmp_path: Path) -> None:
    cfg = dt.swarm_config(tmp_path, RULES, name="gated", limits={"finished_in_memory": 100},
                          approvals={"require": "destructive", "exempt": ["lookup"]})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("v")
        gid = (await _gate(sw, task_id))["gate"]
        await sw.supervisor.approve(task_id, gid, approver="alice")
        row = await sw.supervisor.wait(task_id, 10)
        assert row["state"] == "completed"
        desk = sw.supervisor.approvals
        assert (task_id, gid) in desk.done
        # Many more decisions since (as a long-running swarm makes them).
        for i in range(150):
            desk.done[(f"other-{i}", "g")] = {"event": "approved", "by": "x", "tool": "pay"}
        task2 = await sw.supervisor.submit("u")
        gid2 = (await _gate(sw, task2))["gate"]
        await sw.supervisor.deny(task2, gid2, approver="bob")
        assert len(desk.done) == 100 and (task2, gid2) in desk.done
        assert (task_id, gid) not in desk.done
        # The dropped decision still gives its clear error, from the task's log.
        with pytest.raises(UserError, match="already approved by alice"):
            await sw.supervisor.approve(task_id, gid, approver="alice")
        with pytest.raises(UserError, match="already denied by bob"):
            await sw.supervisor.approve(task2, gid2, approver="alice")


async def test_an_approvals_entry_that_names_no_tool_stops_the_swarm_from_starting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A typo in approvals.tools would leave the tool it meant ungated: refused at start, as
    # a grant of a tool that doesn't exist is.
    for typo in ("t.pya", "paay", "nosrv.pay"):
        with pytest.raises(ConfigError, match=f"approvals.tools: '{typo}' matches no tool"):
            async with LocalSwarm(make_cfg(tmp_path, require="listed", tools=[typo]),
                                  store=MemoryCheckpointer()):
                pass
    # The right names, bare or with their server, and a glob that matches, start; a glob or
    # an exempt entry that matches nothing is a warning.
    async with LocalSwarm(make_cfg(tmp_path, require="listed", tools=["pay", "t.pay", "t.l*"]),
                          store=MemoryCheckpointer()):
        pass
    with caplog.at_level("WARNING"):
        async with LocalSwarm(make_cfg(tmp_path, require="listed", tools=["pay", "files.*"],
                                       exempt=["lookpu"]), store=MemoryCheckpointer()):
            pass
    assert "approvals.tools: 'files.*' matches no tool any agent is granted" in caplog.text
    assert "approvals.exempt: 'lookpu' matches no tool any agent is granted" in caplog.text


async def test_stuck_input_timeout_applies_to_a_gate_when_shorter(tmp_path: Path) -> None:
    # stuck.input_timeout_s is the longest wait in INPUT_REQUIRED, a gate's too: shorter than
    # approvals.timeout_s, it fails the task (as an unanswered question does), the call unrun.
    cfg = dt.swarm_config(tmp_path, RULES, name="gated",
                          approvals={"require": "destructive", "exempt": ["lookup"],
                                     "timeout_s": 3600},
                          stuck={"input_timeout_s": 0.2})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("x")
        row = await sw.supervisor.wait(task_id, 30)
    assert row["state"] == "failed" and row["stuck"] == "input_timeout"
    assert "stuck.input_timeout_s" in row["error"] and "gate" in row["error"]
    assert row["gates"] == [] and dt.RUNS == {"x-1": 1}


COUNTERS = ("steps", "input_tokens", "output_tokens", "model_calls", "tool_calls", "cost_usd")


def _counters(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in COUNTERS}


def _priced(tmp_path: Path) -> Any:
    cfg = make_cfg(tmp_path)
    model = cfg.models["m"]
    price = model.price.model_validate({"input_per_mtok": 1000.0, "output_per_mtok": 4000.0})
    return cfg.model_copy(update={"models": {"m": model.model_copy(update={"price": price})}})


async def test_a_task_waiting_at_a_gate_lists_what_its_turn_ran_also_after_a_restart(
        tmp_path: Path) -> None:
    """The turn stopped at the gate ran two steps (the lookup, the model call that asked to
    pay): the listing and the stored row count them while the task waits, a supervisor rebuilt
    from the store lists the same before and after the resumed turn asks again, and once it
    goes on the resumed turn's report (the whole turn) is not added on top of them."""
    from swarm.runtime.supervisor import TaskRecord

    cfg = _priced(tmp_path)
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("x")
        await sw.supervisor.approve(task_id, (await _gate(sw, task_id))["gate"],
                                    approver="alice")
        undisturbed = _counters(await sw.supervisor.wait(task_id, 10))
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("x")
        await _gate(sw, task_id)
        waiting = _counters(sw.supervisor.get(task_id).summary())
        assert waiting["steps"] == 2 and waiting["model_calls"] == 2
        assert waiting["input_tokens"] > 0 and waiting["output_tokens"] > 0
        assert waiting["cost_usd"] > 0
        stored = await store.get_task(task_id)
        assert stored is not None
        assert _counters(TaskRecord.from_row(stored).summary()) == waiting
        await sw.crash()
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        (listed,) = sw2.supervisor.list()  # as loaded, before the task is resumed
        assert listed["state"] == "input_required" and _counters(listed) == waiting
        gid = (await _gate(sw2, task_id))["gate"]  # asked again by the resumed turn
        assert _counters(sw2.supervisor.get(task_id).summary()) == waiting
        await sw2.supervisor.approve(task_id, gid, approver="alice")
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert _counters(row) == pytest.approx(undisturbed)
    assert row["steps"] == 4


async def test_a_task_canceled_while_it_waits_keeps_what_its_turn_ran(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(_priced(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit("c")
        await _gate(sw, task_id)
        waiting = _counters(sw.supervisor.get(task_id).summary())
        row = await sw.supervisor.cancel(task_id)
        assert row["state"] == "canceled" and _counters(row) == waiting
        assert (await sw.supervisor.events(task_id, 0, 0))[0][-1].steps == 2
    stored = await store.get_task(task_id)
    assert stored is not None and stored.data["steps"] == 2


async def test_step_events_that_arrive_after_the_gate_count_once(tmp_path: Path) -> None:
    """An agent's last step events can reach the supervisor after the report of a turn that
    stopped at a gate; they are not progress to add again when the task is then canceled."""
    from swarm.events import ModelCalled, StepFinished

    async with LocalSwarm(_priced(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("c")
        await _gate(sw, task_id)
        waiting = _counters(sw.supervisor.get(task_id).summary())
        now = time.time()
        sw.supervisor.push_events([
            ModelCalled(task_id=task_id, ts=now, agent="a", step=2, model="m",
                        input_tokens=50, output_tokens=5),
            StepFinished(task_id=task_id, ts=now, agent="a", step=2, duration_ms=1.0)])
        assert _counters(sw.supervisor.get(task_id).summary()) == waiting
        row = await sw.supervisor.cancel(task_id)
    assert row["state"] == "canceled" and _counters(row) == waiting, (row, waiting)
    assert row["question"] is None  # its gate closed with it, and its question


async def test_a_gate_of_a_canceled_task_is_closed(tmp_path: Path) -> None:
    """Canceled while it waits at a gate: a decision right after the cancel (before its turn
    has unwound) is refused, and the task lists no open gate."""
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("c")
        gid = (await _gate(sw, task_id))["gate"]
        row = await sw.supervisor.cancel(task_id)
        assert row["state"] == "canceled" and row["gates"] == [], row
        with pytest.raises(UserError, match=f"task {task_id} is canceled: its gates closed "
                                            f"with it \\(gate {gid} was not decided\\)"):
            await sw.supervisor.approve(task_id, gid, approver="alice")
        with pytest.raises(UserError, match="is canceled and has no gate 'nope' that was "
                                            "decided"):
            await sw.supervisor.deny(task_id, "nope", approver="alice")
        assert sw.supervisor.get(task_id).summary()["gates"] == []
    assert dt.RUNS.get("c-2", 0) == 0  # the gated call never ran


async def test_a_turn_that_waited_and_ended_before_a_restart_is_counted_once(
        tmp_path: Path) -> None:
    """The gate was approved and the turn ended (handing off to b) after the task's row was
    last stored, which still counts a's turn as waiting: the restarted supervisor reads a's
    whole turn from the log and drops the row's count of it, not adds both."""
    rules = [*RULES[:3],
             {"when": {"agent": "b", "last_role": "user"},
              "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-b"}}]},
             {"when": {"agent": "b"}, "content": "done: {{ last }}"}]
    cfg = dt.swarm_config(tmp_path, rules, name="gated", agents={
        "a": {"model": "m", "tools": ["t"], "handoffs": ["b"]},
        "b": {"model": "m", "tools": ["t"]}},
        approvals={"require": "destructive", "exempt": ["lookup"]})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("h")
        await sw.supervisor.approve(task_id, (await _gate(sw, task_id))["gate"],
                                    approver="alice")
        undisturbed = _counters(await sw.supervisor.wait(task_id, 10))
    assert undisturbed["steps"] == 5  # a: lookup, pay, handoff; b: lookup, answer
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("h")
        gid = (await _gate(sw, task_id))["gate"]
        dt.HOLD["h-b"], dt.ENTERED["h-b"] = asyncio.Event(), asyncio.Event()
        await sw.supervisor.approve(task_id, gid, approver="alice")
        await asyncio.wait_for(dt.ENTERED["h-b"].wait(), 10)  # b's turn has started
        await sw.crash()
    stored = await store.get_task(task_id)
    assert stored is not None and stored.state == "working" and stored.data["waiting"]
    dt.ENTERED["h-b"] = asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        await asyncio.wait_for(dt.ENTERED["h-b"].wait(), 10)  # b's turn resumed
        assert sw2.supervisor.get(task_id).summary()["steps"] == 3  # a's turn, once
        dt.HOLD["h-b"].set()
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert _counters(row) == pytest.approx(undisturbed)
