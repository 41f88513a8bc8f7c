"""A Redis store that goes away mid-task for longer than `state.outage_timeout_s`.

Each test runs a real redis-server (`EmbeddedRedis`: append-only file, so a restart on the same
directory and port brings the data back), stops it while a tool is held, and starts it again.
The turn that hit the outage stops without logging its end; the supervisor waits for the store
(`state.outage_wait_s`) and resumes the turn from its log, so finished side effects happen once.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import RunError, UserError
from swarm.events import Alert, Event, TaskStateChanged, TurnResumed
from swarm.runtime.agent import TurnRequest, TurnResult
from swarm.runtime.supervisor import AgentPool, Supervisor
from swarm.state import open_checkpointer
from swarm.state.embedded import EmbeddedRedis
from swarm.state.interface import StoreUnavailable, TaskRow
from swarm.state.memory import MemoryCheckpointer
from swarm.state.redis import RedisCheckpointer
from swarm.state.replay import restore
from swarm.testing import LocalSwarm
from tests.unit import durable_tools as dt

PAY_FIRST = {"name": "pay", "arguments": {"key": "{{ task }}-1"}}
LOOKUP = {"name": "lookup", "arguments": {"key": "{{ task }}-2"}}
PAY_LAST = {"name": "pay", "arguments": {"key": "{{ task }}-3"}}
# A payment, a lookup (read-only: safe to run again), a second payment, the answer.
RULES = [
    {"when": {"agent": "a", "called": {"pay": 0}}, "tool_calls": [PAY_FIRST]},
    {"when": {"agent": "a", "called": {"pay": 1, "lookup": 0}}, "tool_calls": [LOOKUP]},
    {"when": {"agent": "a", "called": {"pay": 1}}, "tool_calls": [PAY_LAST]},
    {"when": {"agent": "a"}, "content": "done: {{ results.pay }}"},
]


@pytest.fixture(name="_reset", autouse=True)
def reset_tools() -> None:
    """Each test starts with the durable tools' counts at zero (test_store_outage_edges too)."""
    dt.reset()


@pytest.fixture(name="server")
def store_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """The store's own redis-server under tmp_path (test_store_outage_edges too)."""
    server = EmbeddedRedis(tmp_path / "store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_cfg(tmp_path: Path, outage_wait_s: float = 60.0, *,
             state: dict[str, Any] | None = None, **sections: Any) -> Any:
    return dt.swarm_config(tmp_path, RULES, name="outage",
                           agents={"a": {"model": "m", "tools": ["t"]}},
                           state={"outage_timeout_s": 1, "outage_wait_s": outage_wait_s,
                                  **(state or {})}, **sections)


def open_store(cfg: Any, server: EmbeddedRedis, tmp_path: Path) -> RedisCheckpointer:
    # As a deployed swarm opens it: the outage wait from the config (1 s here).
    store = open_checkpointer(server.url, run_dir=tmp_path,
                              outage_timeout_s=cfg.state.outage_timeout_s)
    assert isinstance(store, RedisCheckpointer) and store.outage_timeout_s == 1
    return store


async def until_event(sup: Supervisor, task_id: str, wanted: Callable[[Event], bool],
                      timeout: float = 30.0) -> Event:
    """The task's first event that `wanted` holds for, waiting for new ones as they come."""
    cursor = 0
    async with asyncio.timeout(timeout):
        while True:
            events, done = await sup.events(task_id, cursor, timeout)
            for ev in events:
                if wanted(ev):
                    return ev
            cursor += len(events)
            if done and not events:
                raise AssertionError(f"task {task_id} ended without the event: "
                                     f"{sup.get(task_id).summary()}")


def store_alert(action: str) -> Callable[[Event], bool]:
    return lambda ev: isinstance(ev, Alert) and ev.alert == "store_unavailable" \
        and ev.action == action


async def stop_during(sup: Supervisor, server: EmbeddedRedis, text: str, key: str) -> str:
    """Submit `text`; stop the store while the tool call `key` runs, then let the call return:
    the turn's next write finds the store gone. Returns the task id once the supervisor says
    it waits for the store."""
    dt.HOLD[key], dt.ENTERED[key] = asyncio.Event(), asyncio.Event()
    task_id = await sup.submit(text)
    await asyncio.wait_for(dt.ENTERED[key].wait(), 30)
    await asyncio.to_thread(server.stop)  # SHUTDOWN: the append-only file keeps the data
    dt.HOLD[key].set()
    await until_event(sup, task_id, store_alert("wait"))
    return task_id


def wipe(server: EmbeddedRedis) -> None:
    """Delete a stopped store's data: its append-only file, one file (Redis 6) or a directory
    of parts (Valkey, Redis 7+)."""
    for f in server.dir.glob("appendonly*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def restart(server: EmbeddedRedis) -> None:
    """Start the store again: same directory (its data), same port (its URL)."""
    url = server.url
    server.start()
    assert server.url == url


async def stored_row(sup: Supervisor, store: RedisCheckpointer, task_id: str,
                     state: str) -> TaskRow:
    """The task's stored row, once the supervisor's background row writer, if one is under
    way, has written what it held; it must be in `state`."""
    writer = sup._row_writer
    if writer is not None and not writer.done():
        await asyncio.wait_for(asyncio.shield(writer), 30)
    row = await store.get_task(task_id)
    assert row is not None and row.state == state, f"row of {task_id}: {row and row.state}"
    return row


async def test_a_turn_that_outlasts_the_store_outage_resumes_and_completes(
        tmp_path: Path, server: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path)
    store = open_store(cfg, server, tmp_path)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "x", "x-2")
            # The turn stopped without running the second payment, and the task waits.
            assert sup.get(task_id).state == "working"
            assert dt.RUNS == {"x-1": 1, "x-2": 1}
            await asyncio.to_thread(restart, server)
            row = await sup.wait(task_id, 60)
            assert (row["state"], row["answer"]) == ("completed", "done: paid x-3"), row
            events = sw.events(task_id)
        # Each payment once. The lookup's result was never durable, so the resumed turn ran
        # it again: it is declared idempotent, and that is what idempotent allows.
        assert dt.RUNS == {"x-1": 1, "x-2": 2, "x-3": 1}
        assert any(isinstance(ev, TurnResumed) for ev in events)
        state, problems = await restore(store, task_id)
        assert problems == [] and state.open_turn is None and state.turns == 1
        ledger = await store.ledger(task_id)
        assert sorted(r.tool for r in ledger.values()) == ["lookup", "pay", "pay"]
        assert {r.state for r in ledger.values()} == {"finished"}
        assert (await stored_row(sup, store, task_id, "completed")).task_id == task_id
        waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and r.name == "swarm.runtime.supervisor" and "waiting up to" in r.getMessage()]
        assert len(waits) == 1 and task_id in waits[0] and server.url in waits[0]
    finally:
        await store.close()


async def test_a_side_effect_whose_result_was_lost_in_the_outage_is_logged_not_run_again(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """The store goes away while a payment runs: the payment happens, its result can't be
    logged. The agent holds the result; the resumed turn logs it and goes on, without running
    the payment again and without asking an operator."""
    cfg = make_cfg(tmp_path)
    store = open_store(cfg, server, tmp_path)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "y", "y-1")
            assert len(sw.hosts["a"]._loop.held) == 1
            await asyncio.to_thread(restart, server)
            row = await sup.wait(task_id, 60)
            assert (row["state"], row["answer"]) == ("completed", "done: paid y-3"), row
            assert dt.RUNS == {"y-1": 1, "y-2": 1, "y-3": 1}  # each payment once
            assert len(sw.hosts["a"]._loop.held) == 0
            states = [ev.state for ev in sup.get(task_id).events
                      if isinstance(ev, TaskStateChanged)]
            assert "input_required" not in states
            # The log holds the first payment's result as the tool returned it.
            state, _ = await restore(store, task_id)
            results = [m["content"] for m in state.transcript if m.get("role") == "tool"]
            assert results[0] == "paid y-1", results
    finally:
        await store.close()


class _FlappingStore(RedisCheckpointer):
    """The Redis store, refusing once (as if it went away again) the append that logs the
    result `flap` names."""

    flap: str | None = None

    async def append(self, task_id: str, entries: list[Any], ledger: Any = None, *,
                     fence: int | None = None) -> int:
        if self.flap is not None and any(
                e.kind == "tool" and e.data.get("message", {}).get("content") == self.flap
                for e in entries):
            self.flap = None
            raise StoreUnavailable("redis went away again")
        return await super().append(task_id, entries, ledger, fence=fence)


async def test_a_held_result_outlives_a_resume_that_meets_the_outage_again(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """The store answers again, the turn resumes, and the write of the held result fails (the
    store went away again): the result stays held, and the next resume logs it."""
    cfg = make_cfg(tmp_path)
    store = _FlappingStore(server.url, outage_timeout_s=cfg.state.outage_timeout_s)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "f", "f-1")
            store.flap = "paid f-1"
            await asyncio.to_thread(restart, server)
            row = await sup.wait(task_id, 60)
            assert store.flap is None  # the resume did meet it
        assert (row["state"], row["answer"]) == ("completed", "done: paid f-3"), row
        assert dt.RUNS == {"f-1": 1, "f-2": 1, "f-3": 1}
    finally:
        await store.close()


async def test_a_side_effect_whose_held_result_is_gone_asks_an_operator(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """As above, but the agent's process lost what it held (it was replaced during the
    outage): the resumed turn can't know whether the payment happened, so it asks, as after
    a crash, and `skip` goes on without running it again."""
    cfg = make_cfg(tmp_path)
    store = open_store(cfg, server, tmp_path)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "v", "v-1")
            sw.hosts["a"]._loop.held = type(sw.hosts["a"]._loop.held)()  # a new process's
            await asyncio.to_thread(restart, server)
            await until_event(sup, task_id, lambda ev: isinstance(ev, TaskStateChanged)
                              and ev.state == "input_required")
            rec = sup.get(task_id)
            assert "pay" in (rec.question or "") and "rerun" in (rec.question or "")
            assert dt.RUNS == {"v-1": 1}
            await sup.respond(task_id, "skip")
            row = await sup.wait(task_id, 60)
        assert row["state"] == "completed", row
        assert dt.RUNS == {"v-1": 1, "v-2": 1, "v-3": 1}  # the first payment never again
    finally:
        await store.close()


async def test_a_store_that_stays_down_fails_the_task_naming_it(
        tmp_path: Path, server: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path, outage_wait_s=1)
    store = open_store(cfg, server, tmp_path)
    url = server.url
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "z", "z-2")
            row = await sup.wait(task_id, 60)
            assert (row["state"], row["error_class"]) == ("failed", "checkpoint"), row
            assert f"the durable store {url} was unreachable" in row["error"]
            assert "state.outage_wait_s is 1 s" in row["error"]
            await until_event(sup, task_id, store_alert("fail"))
            failures = [r.getMessage() for r in caplog.records
                        if r.levelno == logging.WARNING and "fails:" in r.getMessage()]
            assert len(failures) == 1 and task_id in failures[0] and url in failures[0]
            assert dt.RUNS == {"z-1": 1, "z-2": 1}
            # Its row couldn't be stored; the supervisor keeps the task and writes the row
            # once the store is back. Meanwhile the swarm answers, and afterwards takes new
            # work.
            assert sup.list(state="failed")[0]["task_id"] == task_id
            await asyncio.to_thread(restart, server)
            assert (await stored_row(sup, store, task_id, "failed")).task_id == task_id
            again = await sw.run("w", timeout=60)
            assert (again["state"], again["answer"]) == ("completed", "done: paid w-3")
    finally:
        await store.close()


class _HeldFinalRow(RedisCheckpointer):
    """The Redis store, holding the write of the first completed row until `go` is set."""

    held: asyncio.Event
    go: asyncio.Event

    async def put_task(self, row: TaskRow) -> None:
        if row.state == "completed" and not self.go.is_set():
            self.held.set()
            await self.go.wait()
        await super().put_task(row)


def held_final_row(cfg: Any, server: EmbeddedRedis) -> _HeldFinalRow:
    """The store of `server`, opened as `open_store` does, holding the first completed row."""
    store = _HeldFinalRow(server.url, outage_timeout_s=cfg.state.outage_timeout_s)
    store.held, store.go = asyncio.Event(), asyncio.Event()
    return store


async def end_in_outage(sup: Supervisor, store: _HeldFinalRow, server: EmbeddedRedis,
                        text: str) -> str:
    """Submit `text`; stop the store while the supervisor is about to store the task's
    completed row, then let that write go on (it finds the store gone). The task's id."""
    task_id = await sup.submit(text)
    await asyncio.wait_for(store.held.wait(), 30)
    await asyncio.to_thread(server.stop)
    store.go.set()
    return task_id


async def test_a_completed_task_whose_row_hits_the_outage_stays_completed(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """The agent's turn ended (logged) and the store went away before the supervisor stored
    the task's final row: the task completes, and its row is written once the store is back."""
    cfg = make_cfg(tmp_path)
    store = held_final_row(cfg, server)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await end_in_outage(sup, store, server, "v")
            row = await sup.wait(task_id, 60)
            assert (row["state"], row["answer"]) == ("completed", "done: paid v-3"), row
            assert (await sup.find(task_id)).state == "completed"
            await asyncio.to_thread(restart, server)
            assert (await stored_row(sup, store, task_id, "completed")).data
        assert dt.RUNS == {"v-1": 1, "v-2": 1, "v-3": 1}
    finally:
        await store.close()


@pytest.mark.parametrize("checkpoint", ["phase", "every_step"])
async def test_a_store_back_without_its_data_fails_the_task_instead_of_paying_again(
        tmp_path: Path, server: EmbeddedRedis, checkpoint: str) -> None:
    """The store comes back empty (its append-only file gone: a Redis run without
    `appendonly`). Resumed from the empty log, the turn would pay again; the store's epoch
    tells the supervisor the data is gone, and the task fails instead, naming the store. Under
    `phase` nothing else catches it: no step was reported durable, so the resume's
    durable-step check has nothing to compare."""
    cfg = make_cfg(tmp_path, state={"checkpoint": checkpoint})
    store = open_store(cfg, server, tmp_path)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await stop_during(sup, server, "w", "w-2")
            wipe(server)
            await asyncio.to_thread(restart, server)
            row = await sup.wait(task_id, 60)
            assert (row["state"], row["error_class"]) == ("failed", "checkpoint"), row
            assert f"the durable store {server.url} lost its data" in row["error"]
            await until_event(sup, task_id, store_alert("fail"))
        assert dt.RUNS == {"w-1": 1, "w-2": 1}  # the payment never again
    finally:
        await store.close()


async def test_a_full_table_says_which_tasks_wait_for_their_rows(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """A finished task whose row isn't stored yet stays in the table; a submission that finds
    the table full says so, rather than counting it as unfinished."""
    cfg = make_cfg(tmp_path, limits={"max_tasks": 1})
    store = held_final_row(cfg, server)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            task_id = await end_in_outage(sup, store, server, "f")
            assert (await sup.wait(task_id, 60))["state"] == "completed"
            with pytest.raises(UserError, match=re.escape(
                    "has 1 tasks it can't drop yet (1 of them finished, their rows not stored "
                    "while the store is unreachable); limits.max_tasks is 1")):
                await sup.submit("g")
            await asyncio.to_thread(restart, server)
            assert (await stored_row(sup, store, task_id, "completed")).task_id == task_id
    finally:
        await store.close()


class _HeldMemory:
    """A session memory whose `record_exchange` waits for the test's `go`."""

    def __init__(self) -> None:
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def record_exchange(self, *args: Any) -> None:
        self.entered.set()
        await self.go.wait()


async def test_a_row_stored_while_the_task_ends_lets_the_task_leave_memory(
        tmp_path: Path, server: EmbeddedRedis) -> None:
    """The final row is deferred (the store down), and the writer stores it while `_finish`
    still awaits the session memory: the finished task may leave memory like any other."""
    cfg = make_cfg(tmp_path)
    store = held_final_row(cfg, server)
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            sup = sw.supervisor
            memory = sup.session_memory = _HeldMemory()  # type: ignore[assignment]
            task_id = await end_in_outage(sup, store, server, "m")
            await asyncio.wait_for(memory.entered.wait(), 30)  # the row was deferred
            await asyncio.to_thread(restart, server)
            await stored_row(sup, store, task_id, "completed")
            memory.go.set()
            assert (await sup.wait(task_id, 30))["state"] == "completed"
            assert task_id in sup._finished and task_id not in sup._unstored
    finally:
        await store.close()


class Wrapped(AgentPool):
    """The in-process pool, with `before(req, n)` run ahead of the `n`-th turn sent (it may
    raise, as a Ray replica's refusal or death would), and every request kept."""

    def __init__(self, inner: AgentPool, before: Any) -> None:
        self.inner, self.before = inner, before
        self.requests: list[TurnRequest] = []

    async def turn(self, role: str, key: str, req: TurnRequest, attempt: int = 0) -> TurnResult:
        self.requests.append(copy.copy(req))
        await self.before(req, len(self.requests))
        return await self.inner.turn(role, key, req, attempt)

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        await self.inner.cancel(role, key, task_id)


async def _refuse_first(req: TurnRequest, n: int) -> None:
    # As a Ray replica refuses a turn when it can't reach the store to start
    # (`RayAgentPool` raises `StoreUnavailable` then).
    if n == 1:
        raise StoreUnavailable("agent a could not start a turn: redis unreachable")


async def test_a_turn_a_replica_could_not_start_for_the_store_is_sent_again(
        tmp_path: Path) -> None:
    async with LocalSwarm(make_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        sup = sw.supervisor
        pool = sup.pool = Wrapped(sup.pool, _refuse_first)
        row = await sw.run("u", timeout=60)
        assert (row["state"], row["answer"]) == ("completed", "done: paid u-3"), row
        events = sw.events(row["task_id"])
    assert [(r.resume, r.turn_id) for r in pool.requests] == [(False, "0"), (True, "0")]
    assert [ev.action for ev in events if isinstance(ev, Alert)] == ["wait"]
    assert dt.RUNS == {"u-1": 1, "u-2": 1, "u-3": 1}


async def test_the_ray_pool_fails_a_post_the_replica_refused_for_the_store_as_such() -> None:
    """A replica that can't reach the store when it starts refuses the posted turns: the
    supervisor must see `StoreUnavailable` (and wait for the store), not a turn failure."""
    from ray.exceptions import RayTaskError

    from swarm.runtime.supervisor import RayAgentPool, _Post, _Replica

    pool = RayAgentPool({})
    rep = _Replica("a", handle=None)
    post = pool._posts["p0"] = _Post(rep, asyncio.get_running_loop().create_future())
    refused = RayTaskError("post_turns", "traceback", StoreUnavailable(
        "can't reach redis at redis://127.0.0.1:1/0")).as_instanceof_cause()
    await pool._posted(rep, [("p0", None)], refused)  # type: ignore[list-item]
    with pytest.raises(StoreUnavailable) as down:
        post.future.result()
    assert str(down.value) == \
        "agent a could not start a turn: can't reach redis at redis://127.0.0.1:1/0"
    other = pool._posts["p1"] = _Post(rep, asyncio.get_running_loop().create_future())
    await pool._posted(rep, [("p1", None)], RuntimeError("boom"))  # type: ignore[list-item]
    with pytest.raises(RunError, match="posting a turn to agent a failed: boom") as err:
        other.future.result()
    assert not isinstance(err.value, StoreUnavailable)


async def test_a_result_posted_to_a_supervisor_before_it_restarted_reaches_no_other_task(
        ) -> None:
    """Replicas deliver results of turns the supervisor posted before it restarted to the new
    one. Post ids are each pool's own (a counter from 0 made the old `p17` the new `p17`: 38
    of 100 tasks completed with another task's answer after a supervisor kill), and a result
    whose task isn't the post's is dropped."""
    from swarm.runtime.agent import TurnResult
    from swarm.runtime.supervisor import RayAgentPool, _Post, _Replica

    before, after = RayAgentPool({}), RayAgentPool({})
    assert before._prefix != after._prefix
    rep = _Replica("a", handle=None)
    loop = asyncio.get_running_loop()
    mine = after._posts[f"{after._prefix}-0"] = _Post(rep, loop.create_future(), "task-b")

    def result(task_id: str) -> TurnResult:
        return TurnResult(task_id=task_id, agent="a", kind="final", message=b"",
                          text=f"answer of {task_id}")

    after.deliver([(f"{before._prefix}-0", result("task-a"))])  # the old pool's post id
    after.deliver([(f"{after._prefix}-0", result("task-a"))])  # another task's result
    assert not mine.future.done()
    after.deliver([(f"{after._prefix}-0", result("task-b"))])
    assert mine.future.result().text == "answer of task-b"
