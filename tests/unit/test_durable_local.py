"""Durable state in one process: crash mid-task, restart on the same store, finish exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from a2a.types import TaskState, TaskStatus

from swarm.errors import UserError
from swarm.protocol import a2a
from swarm.state.interface import TaskRow
from swarm.state.memory import MemoryCheckpointer
from swarm.state.replay import restore
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


def make_cfg(tmp_path: Path) -> Any:
    return dt.swarm_config(tmp_path, RULES, name="dur", state={"snapshot_every": 2})


@pytest.fixture(autouse=True)
def _reset() -> None:
    dt.reset()


async def _crash_during(cfg: Any, store: MemoryCheckpointer, text: str, key: str) -> str:
    """Submit `text`, let the process die while the tool call `key` runs; return the task id."""
    dt.HOLD[key] = asyncio.Event()
    dt.ENTERED[key] = asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit(text)
        await asyncio.wait_for(dt.ENTERED[key].wait(), 10)
        await sw.crash()
    dt.HOLD.clear()
    return task_id


async def test_undisturbed_run_writes_a_replayable_log(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        row = await sw.run("x")
    assert row["state"] == "completed" and row["answer"] == "done: paid x-2"
    assert dt.RUNS == {"x-1": 1, "x-2": 1}
    state, problems = await restore(store, row["task_id"])
    assert problems == []
    assert state.turns == 2 and state.handoffs == 1 and state.open_turn is None
    assert state.step == row["steps"] == 4
    ledger = await store.ledger(row["task_id"])
    assert {r.state for r in ledger.values()} == {"finished"}
    assert {r.tool for r in ledger.values()} == {"lookup", "pay", "transfer_to_b"}
    assert len(await store.snapshots(row["task_id"])) >= 1
    persisted = await store.get_task(row["task_id"])
    assert persisted is not None and persisted.state == "completed"


async def test_a_turn_whose_result_was_lost_is_reported_in_full(tmp_path: Path) -> None:
    # The agent logged the end of its turn, then died before the supervisor got the result:
    # the resent turn must report what the turn did (messages, steps, usage), not an empty turn.
    from swarm.runtime.agent import TurnRequest

    first = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=first) as sw:
        task_id = (await sw.run("x"))["task_id"]
    # The store as the crash left it: the log ends with agent a's turn_end.
    entries = await first.read(task_id)
    end = next(i for i, e in enumerate(entries) if e.kind == "turn_end")
    entries = entries[: end + 1]
    store = MemoryCheckpointer()
    await store.append(task_id, [msgspec.structs.replace(e, seq=-1) for e in entries])
    mine = [e for e in entries if e.kind in ("model", "tool")]
    dt.RUNS.clear()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        msg = a2a.dumps(a2a.text_message("x", role="user", task_id=task_id))
        again = await sw.hosts["a"].run_turn(TurnRequest(
            task_id=task_id, context_id=task_id, message=msg, transcript=[], step_offset=0,
            max_steps=10, log_id=task_id, turn_id="0", resume=True))
    assert again.kind == "handoff" and again.target == "b"
    assert again.steps == 3
    assert again.model_calls == sum(e.kind == "model" for e in mine) == 3
    tools = sum(e.kind == "tool" and not e.data.get("handoff") for e in mine)
    assert again.tool_calls == tools == 2
    assert again.input_tokens > 0 and again.output_tokens > 0
    assert again.added[0] == {"role": "user", "content": "x"}
    assert len(again.added) == 1 + len(mine)
    assert dt.RUNS == {}  # reporting it again ran nothing again
    assert len(await store.read(task_id)) == len(entries)  # and wrote nothing


async def test_a_resume_refuses_a_log_that_lost_steps_reported_durable(tmp_path: Path) -> None:
    """The store lost the task's log (a Redis that restarted without its data) after the turn
    reported steps 1 and 2 durable, and the replica died: the resumed turn must not start over
    from the empty log (its finished tool calls would run again), but fail, naming the loss.
    A log that holds those steps resumes as before."""
    from swarm.runtime.agent import TurnRequest

    first = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=first) as sw:
        task_id = (await sw.run("x"))["task_id"]
    msg = a2a.dumps(a2a.text_message("x", role="user", task_id=task_id))

    def resume(durable_step: int) -> TurnRequest:
        return TurnRequest(task_id=task_id, context_id=task_id, message=msg, transcript=[],
                           step_offset=0, max_steps=10, log_id=task_id, turn_id="0",
                           resume=True, durable_step=durable_step)

    dt.RUNS.clear()
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        lost = await sw.hosts["a"].run_turn(resume(2))
    assert lost.kind == "failed" and lost.error_class == "checkpoint"
    assert "step 2 of turn 0 of agent a was reported durable, but its log has nothing of the " \
        "turn" in (lost.error or "")
    assert dt.RUNS == {}  # nothing ran again
    # The same request on a log that has the turn, up to its end: reported as it was.
    entries = await first.read(task_id)
    end = next(i for i, e in enumerate(entries) if e.kind == "turn_end")
    store = MemoryCheckpointer()
    await store.append(task_id, [msgspec.structs.replace(e, seq=-1) for e in entries[:end + 1]])
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        kept = await sw.hosts["a"].run_turn(resume(2))
    assert kept.kind == "handoff" and kept.steps == 3 and dt.RUNS == {}


async def test_the_supervisor_tells_a_resumed_turn_the_last_step_it_saw_durable(
        tmp_path: Path) -> None:
    """What a resend after a replica died carries (`TurnRequest.durable_step`): the last step
    of that agent after the turn's start that its events reported finished, which under
    every_step means durable; nothing under a policy that reports steps before they are."""
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        row = await sw.run("x")
        rec = sw.supervisor.get(row["task_id"])
        assert sw.supervisor._durable_step(rec, "a", 0) == 3
        assert sw.supervisor._durable_step(rec, "b", 3) == 4
        assert sw.supervisor._durable_step(rec, "a", 3) == 0
    cfg = dt.swarm_config(tmp_path, RULES, name="dur", state={"checkpoint": "phase"})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        row = await sw.run("x")
        assert sw.supervisor._durable_step(sw.supervisor.get(row["task_id"]), "a", 0) == 0


async def test_a_store_that_lost_the_log_under_a_running_turn_fails_the_task(
        tmp_path: Path) -> None:
    """The store forgets the task's log while a tool call runs (as a Redis restarted without its
    data does): the turn's next append lands at seq 0, and the task fails with a checkpoint
    error saying so, instead of going on; the call after it never runs."""
    store = MemoryCheckpointer()
    dt.HOLD["w-2"] = asyncio.Event()
    dt.ENTERED["w-2"] = asyncio.Event()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit("w")
        await asyncio.wait_for(dt.ENTERED["w-2"].wait(), 10)
        store.logs[task_id].clear()
        dt.HOLD["w-2"].set()
        row = await sw.supervisor.wait(task_id, 10)
    assert row["state"] == "failed" and row["error_class"] == "checkpoint"
    assert "lost entries it had acknowledged" in row["error"]
    assert dt.RUNS == {"w-1": 1, "w-2": 1}  # and b's turn never started


async def test_crash_during_a_non_idempotent_call_asks_an_operator(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    task_id = await _crash_during(cfg, store, "y", "y-2")
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(_wait_state(rec, "input_required"), 10)
        assert "pay" in rec.question and "rerun" in rec.question
        assert "before the call's result was logged" in rec.question
        assert dt.RUNS["y-1"] == 1  # the finished lookup was not run again
        await sw2.supervisor.respond(task_id, "skip")
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert dt.RUNS == {"y-1": 1, "y-2": 1}  # pay ran once, before the crash, never again
    assert "interrupted before its result was logged" in row["answer"]


async def test_rerun_decision_runs_the_call_again(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    task_id = await _crash_during(cfg, store, "z", "z-2")
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(_wait_state(rec, "input_required"), 10)
        with pytest.raises(Exception, match="rerun' or 'skip"):
            await sw2.supervisor.respond(task_id, "maybe")
        await sw2.supervisor.respond(task_id, "rerun")
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["answer"] == "done: paid z-2"
    assert dt.RUNS["z-2"] == 2  # the operator chose to run it again


async def test_crash_during_an_idempotent_call_resumes_by_itself(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    task_id = await _crash_during(cfg, store, "w", "w-1")
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == "done: paid w-2"
    assert dt.RUNS == {"w-1": 2, "w-2": 1}
    assert row["steps"] == 4  # same as an undisturbed run: no step lost or repeated


async def test_a_cut_off_copy_of_a_turn_is_fenced_out(tmp_path: Path) -> None:
    # Replica A's turn hangs in an idempotent lookup (cut off, not dead). The supervisor gives
    # up on it and resumes the turn on replica B, which runs it to the end. When A wakes up,
    # it must not write, nor go on to the payment: B owns the task now.
    from swarm.runtime.agent import TurnRequest

    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    dt.HOLD["f-1"], dt.ENTERED["f-1"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=store) as a, LocalSwarm(cfg, store=store) as b:
        task_id = "fenced-task"
        msg = a2a.dumps(a2a.text_message("f", role="user", task_id=task_id))

        def req(resume: bool) -> TurnRequest:
            return TurnRequest(task_id=task_id, context_id=task_id, message=msg, transcript=[],
                               step_offset=0, max_steps=10, log_id=task_id, turn_id="0",
                               resume=resume)

        first = asyncio.create_task(a.hosts["a"].run_turn(req(False)))
        await asyncio.wait_for(dt.ENTERED["f-1"].wait(), 10)
        hold = dt.HOLD.pop("f-1")  # the copy on B doesn't hang
        second = await b.hosts["a"].run_turn(req(True))
        assert second.kind == "handoff" and second.target == "b"
        written = len(await store.read(task_id))
        hold.set()  # A wakes up
        stale = await asyncio.wait_for(first, 10)
    assert stale.kind == "canceled" and "took over" in (stale.error or "")
    assert len(await store.read(task_id)) == written  # A wrote nothing after B took over
    assert dt.RUNS == {"f-1": 2, "f-2": 1}  # the lookup twice (idempotent), the payment once


async def test_crash_between_turns_continues_with_the_next_agent(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("v")
        row = await sw.supervisor.wait(task_id, 10)
    # Roll the durable row back to "working", as if the process died right after the last
    # turn was logged but before the supervisor stored the outcome.
    persisted = await store.get_task(task_id)
    assert persisted is not None
    task = a2a.loads_task(persisted.data["a2a"])
    task.status.CopyFrom(TaskStatus(state=TaskState.TASK_STATE_WORKING))
    del task.artifacts[:]
    data = {**persisted.data, "a2a": a2a.dumps(task)}
    await store.put_task(TaskRow(task_id=task_id, swarm=persisted.swarm, state="working",
                                 data=data))
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        again = await sw2.supervisor.wait(task_id, 10)
    assert again["state"] == "completed" and again["answer"] == row["answer"]
    assert dt.RUNS == {"v-1": 1, "v-2": 1}  # nothing re-ran: the log said it was all done


def _remove_log_files(task_dir: str) -> int:
    """Delete an Arrow store's log segments of one task, keeping its snapshots."""
    segs = list(Path(task_dir).glob("log-*.arrows"))
    for seg in segs:
        seg.unlink()
    return len(segs)


async def test_a_log_file_lost_behind_its_snapshot_fails_the_task_instead_of_redoing_it(
    tmp_path: Path
) -> None:
    from swarm.state.arrow import ArrowCheckpointer

    store = ArrowCheckpointer((tmp_path / "store").as_uri())
    cfg = make_cfg(tmp_path)
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("s")
        await sw.supervisor.wait(task_id, 10)
    assert dt.RUNS == {"s-1": 1, "s-2": 1}
    snaps = await store.snapshots(task_id)
    assert snaps  # agent a's turn took one at step 2 (its turn end waits for it)
    # The process died before the supervisor stored the outcome, and the task's log segment
    # is lost (deleted, a bad disk); its snapshots are kept.
    persisted = await store.get_task(task_id)
    assert persisted is not None
    task = a2a.loads_task(persisted.data["a2a"])
    task.status.CopyFrom(TaskStatus(state=TaskState.TASK_STATE_WORKING))
    del task.artifacts[:]
    await store.put_task(TaskRow(task_id=task_id, swarm=persisted.swarm, state="working",
                                 data={**persisted.data, "a2a": a2a.dumps(task)}))
    await store.close()
    assert _remove_log_files(store.task_dir(task_id)) == 1
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "failed" and row["error_class"] == "checkpoint"
    assert f"task {task_id}: entry {snaps[-1]} is unusable: it is missing" in row["error"]
    assert dt.RUNS == {"s-1": 1, "s-2": 1}  # nothing ran again


async def _wait_state(rec: Any, state: str) -> None:
    while rec.state != state:
        await rec.watch().wait()


async def test_fork_continues_from_a_step_without_redoing_it(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        row = await sw.run("f")
        assert dt.RUNS == {"f-1": 1, "f-2": 1}
        history = await sw.supervisor.history(row["task_id"])
        kinds = [h["kind"] for h in history]
        assert kinds[:3] == ["turn_start", "model", "tool"] and kinds[-1] == "turn_end"
        assert any(h["snapshot"] for h in history)
        assert "lookup" in history[1]["summary"]
        # Fork after step 1 (the lookup): the fork pays again in its own logical call, and
        # does not look up again.
        new_id = await sw.supervisor.fork(row["task_id"], 1)
        forked = await sw.supervisor.wait(new_id, 10)
        assert forked["state"] == "completed" and forked["answer"] == row["answer"]
        assert dt.RUNS == {"f-1": 1, "f-2": 2}
        assert forked["metadata"]["forked_from"] == row["task_id"]
        with pytest.raises(Exception, match="can't fork at step 99"):
            await sw.supervisor.fork(row["task_id"], 99)
        with pytest.raises(UserError, match="fork: step must be an integer, not str"):
            await sw.supervisor.fork(row["task_id"], "1")  # type: ignore[arg-type]
        # Deleting a finished task's state leaves the fork alone.
        await sw.supervisor.forget(row["task_id"])
        assert await store.read(row["task_id"]) == []
        assert len(await store.read(new_id)) > 0


async def test_corrupt_records_are_named_and_never_skipped(tmp_path: Path) -> None:
    import msgspec

    from swarm.state.interface import CorruptRecord, Snapshot

    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        row = await sw.run("c")
    tid = row["task_id"]
    good, _ = await restore(store, tid)
    seqs = await store.snapshots(tid)
    assert seqs
    # A truncated newest snapshot: restore says which, falls back, and loses nothing.
    newest = seqs[-1]
    store.snaps[tid][newest] = store.snaps[tid][newest][:-5]
    state, problems = await restore(store, tid)
    assert len(problems) == 1 and f"task {tid}" in problems[0]
    assert f"snapshot at entry {newest}" in problems[0]
    assert state.transcript == good.transcript and state.step == good.step
    # A snapshot of a format version this code doesn't know is refused the same way.
    alien = Snapshot(task_id=tid, seq=newest, step=1, data={}, v=99)
    store.snaps[tid][newest] = msgspec.msgpack.encode(alien)
    state, problems = await restore(store, tid)
    assert "format version 99" in problems[0] and state.step == good.step
    # A corrupt log entry can't be skipped: the error names the task and the entry.
    store.logs[tid][2] = b"\xc1garbage"
    with pytest.raises(CorruptRecord, match=f"task {tid}: entry 2 is unusable"):
        await restore(store, tid, upto=3)


def test_every_record_carries_its_format_version() -> None:
    import msgspec

    from swarm.state import codec
    from swarm.state.interface import FORMAT_VERSION, LedgerRecord, LogEntry, Snapshot, TaskRow

    for record in (LogEntry(kind="x"), Snapshot(task_id="t", seq=0, step=0, data={}),
                   LedgerRecord(key="k", state="started", tool="t"),
                   TaskRow(task_id="t", swarm="s", state="working")):
        assert msgspec.msgpack.decode(codec.encode(record))["v"] == FORMAT_VERSION


PARALLEL_RULES = [
    {"when": {"agent": "x", "last_role": "user"},
     "tool_calls": [{"name": "pay", "arguments": {"key": "{{ task }}-x"}}]},
    {"when": {"agent": "x", "last_tool": "pay"}, "content": "x paid"},
    {"when": {"agent": "y", "last_role": "user"},
     "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-y"}}]},
    {"when": {"agent": "y", "last_tool": "lookup"}, "content": "y found"},
    {"when": {"agent": "j"}, "content": "joined: {{ last_user | replace('\n', ' ') }}"},
]


async def test_parallel_branches_resume_after_a_crash_without_rerunning_ended_ones(
        tmp_path: Path) -> None:
    cfg = dt.swarm_config(
        tmp_path, PARALLEL_RULES, name="par",
        agents={"x": {"model": "m", "tools": ["t"]}, "y": {"model": "m", "tools": ["t"]},
                "j": {"model": "m"}},
        supervisor={"strategy": "parallel", "agents": ["x", "y"], "join": "j"})
    store = MemoryCheckpointer()
    dt.HOLD["p-y"], dt.ENTERED["p-y"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("p")
        await asyncio.wait_for(dt.ENTERED["p-y"].wait(), 10)
        for _ in range(10_000):  # branch x has no hold: let it finish (bounded)
            if any(e.kind == "turn_end" for e in await store.read(f"{task_id}/x")):
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("branch x did not finish")
        await sw.crash()
    dt.HOLD.clear()
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed", row
    assert "x paid" in row["answer"] and "y found" in row["answer"]
    # x had ended: not run again; y's idempotent lookup ran again after the crash.
    assert dt.RUNS == {"p-x": 1, "p-y": 2}
    x_log = await store.read(f"{task_id}/x")
    assert sum(e.kind == "turn_start" for e in x_log) == 1


async def test_a_task_waiting_for_an_operator_waits_again_after_a_restart(
        tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = make_cfg(tmp_path)
    task_id = await _crash_during(cfg, store, "q", "q-2")
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        await asyncio.wait_for(_wait_state(sw2.supervisor.get(task_id), "input_required"), 10)
        await sw2.crash()  # the supervisor dies while the task waits for the answer
    async with LocalSwarm(cfg, store=store) as sw3:
        assert await sw3.supervisor.load() == 1
        rec = sw3.supervisor.get(task_id)
        await asyncio.wait_for(_wait_state(rec, "input_required"), 10)
        assert rec.question is not None and "pay" in rec.question
        await sw3.supervisor.respond(task_id, "skip")
        row = await sw3.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    assert dt.RUNS == {"q-1": 1, "q-2": 1}


def test_a_task_row_restores_every_field_a_listing_shows() -> None:
    from swarm.runtime.supervisor import TaskRecord

    first = a2a.text_message("hi", role="user", task_id="task-0001", context_id="ctx-1",
                             metadata={"user": "ana"})
    rec = TaskRecord(_task=a2a.new_task("task-0001", "ctx-1", first, {"user": "ana", "k": [1]}),
                     user="ana", created=100.0)
    rec.text, rec.agent, rec.updated = "hi", "writer", 105.0
    rec.steps, rec.input_tokens, rec.output_tokens, rec.model_calls = 3, 30, 12, 3
    rec.tool_calls, rec.turns, rec.handoffs, rec.cost_usd = 2, 1, 1, 0.125
    rec.errors, rec.stuck, rec.question = {"tool": 1}, "same_call", "go on?"
    rec.budget_exhausted = "task max_steps (3)"
    rec.live().metadata["budget_exhausted"] = rec.budget_exhausted
    # The open turn that asked: it ran 2 steps so far, counted while it waits.
    rec.waiting = {"task-0001": {"steps": 2, "input_tokens": 20, "output_tokens": 8,
                                 "model_calls": 2, "tool_calls": 1, "cost_usd": 0.25}}
    a2a.set_state(rec.live(), "working", None)
    a2a.set_state(rec.live(), "input_required", None)
    row = rec.to_row("s1")
    assert (row.task_id, row.swarm, row.state, row.updated) == \
        ("task-0001", "s1", "input_required", 105.0)
    back = TaskRecord.from_row(row)
    assert back.summary() == rec.summary()
    assert (rec.summary()["steps"], rec.summary()["cost_usd"]) == (5, 0.375)
    assert back.summary()["metadata"] == {"user": "ana", "k": [1],
                                          "budget_exhausted": "task max_steps (3)"}
    assert back.totals() == rec.totals() and back.text == "hi"


def test_a_parked_a2a_task_reads_the_same_and_comes_back_to_be_changed() -> None:
    """A record keeps its A2A task as wire bytes while nothing changes it (`park`): reads,
    its state, its row and its summary are what they were; `live()` brings it back, and
    changes made then are kept."""
    from swarm.runtime.supervisor import TaskRecord

    first = a2a.text_message("hi", role="user", task_id="task-0002", context_id="ctx-2",
                             metadata={"user": "ana"})
    rec = TaskRecord(_task=a2a.new_task("task-0002", "ctx-2", first, {"user": "ana"}),
                     user="ana", created=100.0)
    a2a.set_state(rec.live(), "working")
    summary, row = rec.summary(), rec.to_row("s1")
    rec.park()
    assert rec._task is None and rec._wire is not None
    assert rec.state == "working" and rec.context_id == "ctx-2" and rec.id == "task-0002"
    assert rec.summary() == summary and rec.to_row("s1") == row
    assert rec.task.history[0].message_id == first.message_id  # read: still parked
    assert rec._task is None and rec.wire() == row.data["a2a"]
    rec.live().history.append(a2a.text_message("more", role="user", task_id=rec.id,
                                               context_id=rec.context_id))
    a2a.set_state(rec.live(), "completed")
    rec.park()
    assert rec.state == "completed" and [a2a.message_text(m) for m in rec.task.history] == \
        ["hi", "more"]
    back = TaskRecord.from_row(rec.to_row("s1"))  # finished: loaded parked
    assert back._task is None and back.done.is_set()
    assert back.state == "completed" and len(back.task.history) == 2


async def test_finished_tasks_beyond_the_limit_leave_memory_and_are_read_back_by_id(
        tmp_path: Path) -> None:
    from swarm.errors import TaskNotFound, UserError

    cfg = dt.swarm_config(tmp_path, [{"when": {}, "content": "done: {{ last_user }}"}],
                          name="fin", agents={"b": {"model": "m"}}, supervisor={"entry": "b"},
                          limits={"finished_in_memory": 100})
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        first = await sup.submit("first", task_id="first-task")
        assert (await sup.wait(first, 30))["answer"] == "done: first"
        ids = await sup.submit_many([f"t{i}" for i in range(120)])
        assert {r["state"] for r in await sup.wait_many(ids, 60)} == {"completed"}
        # 100 finished tasks stay in memory; the 21 that finished first were dropped from it.
        assert len(sup.tasks) == 100 and first not in sup.tasks
        # By id they are still there, from their stored rows: summary, answer, history.
        row = await sup.wait(first, 1)
        assert (row["state"], row["answer"], row["user"]) == ("completed", "done: first",
                                                              "anonymous")
        assert [h["kind"] for h in await sup.history(first)] == ["turn_start", "model",
                                                                 "turn_end"]
        # Its live events leave with it, all but its end; a follower from before sees none.
        events, done = await sup.events(first, 0, 0.1)
        assert done and [type(e).__name__ for e in events] == ["TaskFinished"]
        assert (events[0].state, events[0].answer, events[0].steps) == (
            "completed", "done: first", row["steps"])
        assert await sup.events(first, 7, 0.1) == ([], True)
        assert (await sup.cancel(ids[0]))["state"] == "completed"
        # A retried submission with its id is known (not run again); another text is refused.
        assert await sup.submit("first", task_id="first-task") == first
        assert first in sup.tasks and len(sup.tasks) == 100
        with pytest.raises(UserError, match="already exists"):
            await sup.submit_many(["not t1"], task_ids=[ids[1]])
        await sup.forget(ids[2])
        with pytest.raises(TaskNotFound):
            await sup.find(ids[2])
        with pytest.raises(TaskNotFound):
            await sup.wait("no-such-task", 1)
    # A restarted supervisor keeps only the newest 100 finished tasks in memory too.
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        assert await sup.load() == 0  # nothing to resume
        assert len(sup.tasks) == 100 and first not in sup.tasks
        assert (await sup.wait(first, 1))["answer"] == "done: first"
        # A retried batch with more dropped ids than the limit: every one is known, none runs
        # again or is written over.
        more = await sup.submit_many([f"u{i}" for i in range(150)])
        await sup.wait_many(more, 60)
        old = [(t, f"t{i}") for i, t in enumerate(ids) if i != 2]  # ids[2] was forgotten
        old += [(t, f"u{i}") for i, t in enumerate(more)]
        before = {t: (await store.get_task(t)).updated for t, _ in old}
        again = await sup.submit_many([text for _, text in old], task_ids=[t for t, _ in old])
        assert again == [t for t, _ in old]
        assert {t: (await store.get_task(t)).updated for t, _ in old} == before
        assert len(sup.tasks) == 100
        rows = await sup.wait_many([ids[0], more[0], ids[0]], 1)
        assert [r["answer"] for r in rows] == ["done: t0", "done: u0", "done: t0"]
    # Without a durable store nothing is dropped (it is the only copy).
    async with LocalSwarm(cfg) as sw:
        ids = await sw.supervisor.submit_many([f"t{i}" for i in range(120)])
        await sw.supervisor.wait_many(ids, 60)
        assert len(sw.supervisor.tasks) == 120


async def test_a_submission_naming_a_task_being_deleted_is_refused(tmp_path: Path) -> None:
    import uuid

    from swarm.errors import TaskNotFound, UserError
    from swarm.state.embedded import EmbeddedRedis
    from swarm.state.redis import RedisCheckpointer

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    store = RedisCheckpointer(server.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    cfg = dt.swarm_config(tmp_path, [{"when": {}, "content": "done: {{ last_user }}"}],
                          name="forget", agents={"b": {"model": "m"}}, supervisor={"entry": "b"})
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            tid = await sup.submit("first", task_id="the-task")
            assert (await sup.wait(tid, 30))["state"] == "completed"
            deleting = asyncio.create_task(sup.forget(tid))
            for _ in range(1000):  # until it waits on the store's delete
                if tid in getattr(sup, "_forgetting", ()):
                    break
                await asyncio.sleep(0)
            # A retry of its submission now would be taken for the deleted task, and a new
            # task's row could be deleted with it: refused, clearly.
            with pytest.raises(UserError, match="task the-task is being deleted"):
                await sup.submit("first", task_id=tid)
            with pytest.raises(UserError, match="being deleted"):
                await sup.submit_many(["x", "first"], task_ids=["other", tid])
            # A second deletion meanwhile returns once the first is done.
            again = asyncio.create_task(sup.forget(tid))
            await asyncio.wait_for(again, 10)
            assert deleting.done() and await store.get_task(tid) is None
            await asyncio.wait_for(deleting, 10)
            with pytest.raises(TaskNotFound):
                await sup.find(tid)
            # Once deleted, the id is free: a new task, run and stored.
            assert await sup.submit("again", task_id=tid) == tid
            row = await sup.wait(tid, 30)
            assert (row["state"], row["answer"]) == ("completed", "done: again")
            assert (await store.get_task(tid)).state == "completed"
    finally:
        await store.close()
        server.stop()


async def test_a_task_asking_an_operator_lists_what_its_turn_ran_across_restarts(
        tmp_path: Path) -> None:
    """A resumed turn that asks (rerun or skip) had run two steps: the task waiting for the
    answer lists them, as does a supervisor rebuilt from the store, before and after the turn
    asks again; the answered turn's report (the whole turn) then replaces them, not adds."""
    cfg = make_cfg(tmp_path)
    keys = ("steps", "input_tokens", "output_tokens", "model_calls", "tool_calls")
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        undisturbed = await sw.run("q")
    dt.reset()
    store = MemoryCheckpointer()
    task_id = await _crash_during(cfg, store, "q", "q-2")
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(_wait_state(rec, "input_required"), 10)
        waiting = {k: rec.summary()[k] for k in keys}
        assert waiting["steps"] == 2 and waiting["model_calls"] == 2
        assert waiting["input_tokens"] > 0 and waiting["tool_calls"] == 1  # the lookup ran
        await sw2.crash()
    async with LocalSwarm(cfg, store=store) as sw3:
        await sw3.supervisor.load()
        (listed,) = sw3.supervisor.list()
        assert {k: listed[k] for k in keys} == waiting
        rec = sw3.supervisor.get(task_id)
        while rec.answer_waiter is None:  # asked again by the resumed turn
            await asyncio.wait_for(rec.watch().wait(), 10)
        assert {k: rec.summary()[k] for k in keys} == waiting
        await sw3.supervisor.respond(task_id, "rerun")
        row = await sw3.supervisor.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == undisturbed["answer"]
    assert {k: row[k] for k in keys} == {k: undisturbed[k] for k in keys}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


async def test_a_restarted_supervisor_archives_the_finished_tasks_left_in_redis(
        tmp_path: Path, redis_url: str) -> None:
    # The process that finished the task died before archiving it (here: it never does,
    # on_finish=False): the next supervisor's load moves it to the archive in the background.
    import uuid

    from swarm.state.arrow import ArrowCheckpointer
    from swarm.state.redis import RedisCheckpointer
    from swarm.state.tiered import TieredCheckpointer

    prefix, archive = f"t{uuid.uuid4().hex[:10]}", (tmp_path / "archive").as_uri()

    def open_store(**kw: Any) -> TieredCheckpointer:
        return TieredCheckpointer(RedisCheckpointer(redis_url, prefix=prefix),
                                  ArrowCheckpointer(archive), **kw)

    first = open_store(on_finish=False)
    await first.start()
    async with LocalSwarm(make_cfg(tmp_path), store=first) as sw:
        task_id = (await sw.run("x"))["task_id"]
    held = await first.hot.bounds(task_id)
    assert held.end > held.base and not held.archived  # still all in Redis
    entries = await first.read(task_id)
    await first.close()

    store = open_store()
    await store.start()
    try:
        async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
            await sw.supervisor.load()
            sweep = sw.supervisor._sweep
            assert sweep is not None
            await asyncio.wait_for(sweep, 30)
            now = await store.hot.bounds(task_id)
            assert now.archived and now.end == now.base == held.end  # nothing left in Redis
            assert await store.read(task_id) == entries  # read back from the archive
            row = await sw.supervisor.wait(task_id, 5)
            assert row["state"] == "completed"
    finally:
        await store.close()


# Agent a looks a key up, then hands the task to b (the per-agent usage tests).
_A_LOOKS_UP_THEN_HANDS_OFF = [
        {"when": {"agent": "a", "last_role": "user"},
         "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-1"}}]},
        {"when": {"agent": "a", "last_tool": "lookup"},
         "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "{{ last }}"}}]},
]


async def test_a_restarted_supervisor_keeps_what_each_agent_used(tmp_path: Path) -> None:
    # Per-agent budgets count an agent's turns in a task: after a restart the ended turns'
    # usage comes back from the log (here agent a's), and the turn that was open when the
    # process died (b's) counts once its resume ends, as the task's counters do.
    rules = [
        *_A_LOOKS_UP_THEN_HANDS_OFF,
        {"when": {"agent": "b", "last_role": "user"},
         "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-3"}}]},
        {"when": {"agent": "b"}, "content": "done: {{ last }}"},
    ]
    cfg = dt.swarm_config(tmp_path, rules, name="per-agent", agents={
        "a": {"model": "m", "tools": ["t"], "handoffs": ["b"]},
        "b": {"model": "m", "tools": ["t"]}})
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        whole = await sw.run("w")
        used = {k: (u.steps, u.model_calls, u.tool_calls)
                for k, u in sw.supervisor.get(whole["task_id"]).by_agent.items()}
    assert used == {"a": (2, 2, 1), "b": (2, 2, 1)}
    task_id = await _crash_during(cfg, store, "v", "v-3")
    dt.HOLD["v-3"], dt.ENTERED["v-3"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(dt.ENTERED["v-3"].wait(), 10)  # b's turn, resumed, runs again
        a = rec.by_agent["a"]
        assert (a.steps, a.model_calls, a.tool_calls) == used["a"]
        assert a.input_tokens > 0 and a.output_tokens > 0 and a.wall_s >= 0
        assert rec.by_agent["b"].model_calls == 0  # open at the crash: counted at its end
        dt.HOLD["v-3"].set()
        row = await sw2.supervisor.wait(task_id, 10)
        assert row["state"] == "completed"
        again = {k: (u.steps, u.model_calls, u.tool_calls) for k, u in rec.by_agent.items()}
    assert again == used


def test_per_agent_usage_is_folded_from_ended_turns_and_kept_in_snapshots() -> None:
    from swarm.state.interface import LogEntry, Snapshot
    from swarm.state.replay import AgentUsage, TaskState, apply, fold, to_snapshot

    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    log = [
        LogEntry(kind="turn_start", agent="a", ts=10.0, data={"input": "x", "turn": "0"}),
        LogEntry(kind="model", agent="a", step=1, data={
            "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            "usage": {"input_tokens": 5, "output_tokens": 2}}),
        LogEntry(kind="tool", agent="a", step=1, data={
            "message": {"role": "tool", "tool_call_id": "c1", "content": "r"}, "index": 0}),
        LogEntry(kind="turn_end", agent="a", ts=12.5, data={"outcome": "handoff"}),
        LogEntry(kind="turn_start", agent="b", ts=13.0, data={"input": "y", "turn": "1"}),
        LogEntry(kind="model", agent="b", step=2, data={
            "message": {"role": "assistant", "content": "hm"},
            "usage": {"input_tokens": 7, "output_tokens": 1}}),
    ]
    state = TaskState()
    for seq, entry in enumerate(log):
        entry.seq = seq
        apply(state, entry)
    assert state.by_agent == {"a": AgentUsage(steps=1, model_calls=1, tool_calls=1,
                                              input_tokens=5, output_tokens=2, wall_s=2.5)}
    snap = to_snapshot("t", state, 1.0)
    assert fold(snap, []).by_agent == state.by_agent
    older = Snapshot(task_id="t", seq=snap.seq, step=snap.step,
                     data={k: v for k, v in snap.data.items() if k != "by_agent"})
    assert fold(older, []).by_agent == {}  # a snapshot from before the field: none known


async def test_per_agent_usage_before_a_snapshot_survives_a_restart(tmp_path: Path) -> None:
    # A snapshot taken inside b's turn must carry a's ended turn: a restart that restores
    # from that snapshot (not from the whole log) still knows what a used.
    rules = [
        *_A_LOOKS_UP_THEN_HANDS_OFF,
        {"when": {"agent": "b", "called": {"lookup": {"max": 1}}},
         "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-b"}}]},
        {"when": {"agent": "b", "called": {"lookup": {"max": 2}}},
         "tool_calls": [{"name": "lookup", "arguments": {"key": "{{ task }}-3"}}]},
        {"when": {"agent": "b"}, "content": "done: {{ last }}"},
    ]
    cfg = dt.swarm_config(tmp_path, rules, name="per-agent-snap", agents={
        "a": {"model": "m", "tools": ["t"], "handoffs": ["b"]},
        "b": {"model": "m", "tools": ["t"]}}, state={"snapshot_every": 3})
    store = MemoryCheckpointer()
    task_id = await _crash_during(cfg, store, "s", "s-3")
    snaps = await store.snapshots(task_id)
    assert snaps, "a snapshot was due at step 3, in b's turn"
    snap = await store.get_snapshot(task_id, snaps[-1])
    assert snap is not None and snap.data["open_turn"]["agent"] == "b"
    assert snap.data["by_agent"]["a"]["model_calls"] == 2  # a's ended turn, in the snapshot
    dt.HOLD["s-3"], dt.ENTERED["s-3"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(dt.ENTERED["s-3"].wait(), 10)
        assert (rec.by_agent["a"].model_calls, rec.by_agent["a"].tool_calls) == (2, 1)
        dt.HOLD["s-3"].set()
        assert (await sw2.supervisor.wait(task_id, 10))["state"] == "completed"
