"""Checkpoint policies: fewer writes, yet no side effect is ever repeated after a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import ConfigError
from swarm.events import StepFinished
from swarm.models.interface import ToolCall, Usage
from swarm.runtime.journal import Journal
from swarm.state.interface import LedgerRecord, LogEntry, StoreUnavailable
from swarm.state.memory import MemoryCheckpointer
from swarm.state.replay import fold
from swarm.testing import LocalSwarm
from tests.unit import durable_tools as dt

LOOKUP = {"name": "lookup", "arguments": {"key": "{{ task }}-{{ step }}"}}
PAY = {"name": "pay", "arguments": {"key": "{{ task }}-pay"}}

# One agent, eight steps: four lookups, a payment, two lookups, the answer.
LONG = [
    {"when": {"agent": "a", "called": {"lookup": {"max": 3}, "pay": 0}}, "tool_calls": [LOOKUP]},
    {"when": {"agent": "a", "called": {"lookup": 4, "pay": 0}}, "tool_calls": [PAY]},
    {"when": {"agent": "a", "called": {"lookup": {"max": 5}, "pay": 1}}, "tool_calls": [LOOKUP]},
    {"when": {"agent": "a"}, "content": "done: {{ results.pay }}"},
]

# Two lookups, then a handoff to b, which answers.
HANDOFF = [
    {"when": {"agent": "a", "called": {"lookup": {"max": 1}}}, "tool_calls": [LOOKUP]},
    {"when": {"agent": "a"},
     "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "{{ last }}"}}]},
    {"when": {"agent": "b"}, "content": "done: {{ last_user }}"},
]

# Two lookups, a payment, the answer.
PAY_THIRD = [
    {"when": {"agent": "a", "called": {"lookup": {"max": 1}}}, "tool_calls": [LOOKUP]},
    {"when": {"agent": "a", "called": {"pay": 0}}, "tool_calls": [PAY]},
    {"when": {"agent": "a"}, "content": "done: {{ results.pay }}"},
]


class CountingCheckpointer(MemoryCheckpointer):
    """The memory store, remembering what each append carried."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[tuple[list[str], list[tuple[str, str]]]] = []

    async def append(self, task_id: str, entries: list[LogEntry],
                     ledger: list[LedgerRecord] | None = None, *,
                     fence: int | None = None) -> int:
        self.appends.append(([e.kind for e in entries],
                             [(r.tool, r.state) for r in ledger or ()]))
        return await super().append(task_id, entries, ledger, fence=fence)


def make_cfg(tmp_path: Path, rules: list[dict[str, Any]], **state: Any) -> Any:
    return dt.swarm_config(tmp_path, rules, name="ckpt",
                           state={"snapshot_every": 0, **state})


@pytest.fixture(autouse=True)
def _reset() -> None:
    dt.reset()


async def _crash_while(cfg: Any, store: MemoryCheckpointer, text: str, key: str,
                       inspect: Callable[[], Awaitable[None]] | None = None) -> str:
    """Submit `text`; while the tool call `key` runs, `inspect`, then die. Returns the task id."""
    dt.HOLD[key] = asyncio.Event()
    dt.ENTERED[key] = asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit(text)
        await asyncio.wait_for(dt.ENTERED[key].wait(), 10)
        if inspect is not None:
            await inspect()
        await sw.crash()
    dt.HOLD.clear()
    return task_id


async def _wait_state(rec: Any, state: str) -> None:
    while rec.state != state:
        await rec.watch().wait()


async def test_every_n_writes_fewer_appends_for_the_same_answer(tmp_path: Path) -> None:
    each = CountingCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path, LONG, checkpoint="every_call"), store=each) as sw:
        row_each = await sw.run("x")
    batched = CountingCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path, LONG, checkpoint="every_n", checkpoint_every=3),
                          store=batched) as sw:
        row_batched = await sw.run("x")
    assert row_each["answer"] == row_batched["answer"] == "done: paid x-pay"
    assert row_each["steps"] == row_batched["steps"] == 8
    # every_call: the turn's start and end, and per step a model answer and a tool result.
    assert len(each.appends) == 2 + 8 + 7
    assert [kinds for kinds, _ in batched.appends] == [
        ["turn_start"],
        ["model", "tool", "model", "tool", "model", "tool"],  # steps 1-3
        ["model", "tool", "model"],  # step 4, and step 5's answer before `pay` runs
        ["tool"],  # pay's result, at once
        ["model", "tool", "model", "tool", "model", "turn_end"],  # steps 6-8, the turn's end
    ]
    # Lookups' ledger records travel with the log; a lookup's started and finished records
    # collapse into one. Pay's are written on their own, before and after it runs.
    assert batched.appends[2][1] == [("lookup", "finished"), ("pay", "started")]
    assert batched.appends[3][1] == [("pay", "finished")]
    # The log reads the same either way, seq by seq.
    tid_each, tid_batched = row_each["task_id"], row_batched["task_id"]
    log_each, log_batched = await each.read(tid_each), await batched.read(tid_batched)
    assert [(e.seq, e.kind, e.step) for e in log_each] == \
        [(e.seq, e.kind, e.step) for e in log_batched]
    ledger = await batched.ledger(tid_batched)
    assert len(ledger) == 7 and {r.state for r in ledger.values()} == {"finished"}


async def test_every_step_writes_one_append_per_tool_call_cycle(tmp_path: Path) -> None:
    store = CountingCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path, LONG), store=store) as sw:
        row = await sw.run("x")
    assert row["state"] == "completed" and row["answer"] == "done: paid x-pay"
    assert [kinds for kinds, _ in store.appends] == [
        ["turn_start"],
        ["model", "tool"], ["model", "tool"], ["model", "tool"], ["model", "tool"],  # 1-4
        ["model"],  # step 5's answer, durable before `pay` runs
        ["tool"],  # pay's result, at once
        ["model", "tool"], ["model", "tool"],  # steps 6-7
        ["model", "turn_end"],  # step 8, the final answer, with the turn's end
    ]
    # A read-only call's started and finished ledger records collapse into one write.
    assert store.appends[1][1] == [("lookup", "finished")]
    assert store.appends[5][1] == [("pay", "started")]


class EndWatching(CountingCheckpointer):
    """Notes the steps a client following the task has seen finished (`StepFinished`) when
    the turn's end is written."""

    sw: Any = None
    done_at_end: list[int] | None = None

    async def append(self, task_id: str, entries: list[LogEntry],
                     ledger: list[LedgerRecord] | None = None, *,
                     fence: int | None = None) -> int:
        if any(e.kind == "turn_end" for e in entries):
            self.done_at_end = [e.step for e in self.sw.events(task_id)
                                if isinstance(e, StepFinished)]
        return await super().append(task_id, entries, ledger, fence=fence)


async def test_the_last_step_is_reported_done_only_once_durable_with_the_turns_end(
        tmp_path: Path) -> None:
    store = EndWatching()
    async with LocalSwarm(make_cfg(tmp_path, LONG), store=store) as sw:
        store.sw = sw
        row = await sw.run("x")
        finished = [e.step for e in sw.events(row["task_id"]) if isinstance(e, StepFinished)]
    assert row["state"] == "completed" and row["steps"] == 8
    assert store.appends[-1][0] == ["model", "turn_end"]
    assert store.done_at_end == list(range(1, 8))  # step 8 was not reported done yet
    assert finished == list(range(1, 9))  # and was once it was durable


async def test_phase_writes_at_turn_boundaries_only(tmp_path: Path) -> None:
    store = CountingCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path, HANDOFF, checkpoint="phase"), store=store) as sw:
        row = await sw.run("h")
    assert row["state"] == "completed" and row["answer"].startswith("done: ")
    assert [kinds for kinds, _ in store.appends] == [
        ["turn_start"],
        ["model", "tool", "model", "tool", "model", "tool", "turn_end"],  # a, to the handoff
        ["turn_start"],
        ["model", "turn_end"],  # b
    ]
    assert dt.RUNS == {"h-1": 1, "h-2": 1}


async def test_a_side_effect_is_durable_as_started_before_it_happens(tmp_path: Path) -> None:
    store = CountingCheckpointer()
    cfg = make_cfg(tmp_path, PAY_THIRD, checkpoint="phase")
    seen: dict[str, Any] = {}

    async def inspect() -> None:
        # `pay` is running now (its side effect under way) and the turn is far from its end.
        tid = next(iter(store.logs))
        seen["ledger"] = {r.tool: r.state for r in (await store.ledger(tid)).values()}
        seen["log"] = [e.kind for e in await store.read(tid)]

    task_id = await _crash_while(cfg, store, "p", "p-pay", inspect)
    assert seen["ledger"] == {"lookup": "finished", "pay": "started"}
    assert seen["log"] == ["turn_start", "model", "tool", "model", "tool", "model"]
    assert len(store.appends) == 2  # the turn start, then one flush forced by `pay`
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        rec = sw2.supervisor.get(task_id)
        await asyncio.wait_for(_wait_state(rec, "input_required"), 10)
        assert "pay" in rec.question
        await sw2.supervisor.respond(task_id, "skip")
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"
    # The lookups were durable with pay's intent, so nothing ran twice.
    assert dt.RUNS == {"p-1": 1, "p-2": 1, "p-pay": 1}


async def test_resume_under_every_n_redoes_lost_steps_but_not_side_effects(
        tmp_path: Path) -> None:
    store = CountingCheckpointer()
    cfg = make_cfg(tmp_path, LONG, checkpoint="every_n", checkpoint_every=3)
    # Step 7's lookup is running: step 6 is buffered, steps 1-5 (with pay) are durable.
    task_id = await _crash_while(cfg, store, "r", "r-7")
    assert [e.step for e in await store.read(task_id) if e.kind == "model"] == [1, 2, 3, 4, 5]
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == "done: paid r-pay"
    assert row["steps"] == 8  # as in an undisturbed run
    assert dt.RUNS["r-pay"] == 1  # the side effect happened once
    assert dt.RUNS["r-6"] == 2 and dt.RUNS["r-7"] == 2  # lost steps ran again
    assert all(dt.RUNS[f"r-{i}"] == 1 for i in range(1, 5))
    steps = [e.step for e in await store.read(task_id) if e.kind == "model"]
    assert steps == list(range(1, 9))  # the log holds each step once


async def test_snapshots_hold_only_durable_state(tmp_path: Path) -> None:
    store = CountingCheckpointer()
    cfg = make_cfg(tmp_path, LONG, checkpoint="every_n", checkpoint_every=3, snapshot_every=2)
    async with LocalSwarm(cfg, store=store) as sw:
        row = await sw.run("s")
    tid = row["task_id"]
    seqs = await store.snapshots(tid)
    assert seqs
    for seq in seqs:
        snap = await store.get_snapshot(tid, seq)
        from_log = fold(None, await store.read(tid, upto=seq))
        assert fold(snap, []).transcript == from_log.transcript
        assert snap is not None and snap.step == from_log.step


async def test_flush_writes_what_is_buffered() -> None:
    store = MemoryCheckpointer()
    journal = Journal(store, "t", "a", turn="0", checkpoint="phase")
    await journal.turn_start("hi", 0)
    call = ToolCall(id="c", name="lookup", arguments="{}")
    await journal.model(1, {"role": "assistant", "content": None}, Usage(), [call])
    assert len(await store.read("t")) == 1 and journal.buffered == 1 and journal.seq == 0
    await journal.flush()
    assert [e.kind for e in await store.read("t")] == ["turn_start", "model"]
    assert journal.buffered == 0 and journal.seq == 1
    assert [r.state for r in (await store.ledger("t")).values()] == ["started"]


@pytest.mark.parametrize(("state", "message"), [
    ({"checkpoint": "every_n"}, "needs checkpoint_every"),
    ({"checkpoint": "every_n", "checkpoint_every": 0}, "an integer >= 1"),
    ({"checkpoint": "phase", "checkpoint_every": 3}, "only used with checkpoint: every_n"),
    ({"checkpoint_every": 3}, "only used with checkpoint: every_n"),
])
def test_checkpoint_every_is_checked(tmp_path: Path, state: dict[str, Any], message: str
                                     ) -> None:
    with pytest.raises(ConfigError) as ei:
        make_cfg(tmp_path, LONG, **state)
    assert message in dict(ei.value.problems)["state.checkpoint_every"]


def test_unknown_checkpoint_policy_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        make_cfg(tmp_path, LONG, checkpoint="sometimes")
    assert "every_n" in dict(ei.value.problems)["state.checkpoint"]


def test_checkpoint_defaults_to_every_step(tmp_path: Path) -> None:
    state = make_cfg(tmp_path, LONG).state
    assert state.checkpoint == "every_step" and state.checkpoint_every is None
    assert state.write_behind is True
    assert make_cfg(tmp_path, LONG, write_behind=False).state.write_behind is False
    assert make_cfg(tmp_path, LONG, checkpoint="every_n",
                    checkpoint_every=5).state.checkpoint_every == 5


class GatedCheckpointer(MemoryCheckpointer):
    """The memory store, whose appends of a step (a `model` entry) wait for `gate`; it notes
    when each append began and ended, and can fail the next gated one."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = asyncio.Event()  # set once a gated append waits at the gate
        self.order: list[str] = []
        self.fail_next = False

    async def append(self, task_id: str, entries: list[LogEntry],
                     ledger: list[LedgerRecord] | None = None, *,
                     fence: int | None = None) -> int:
        name = "+".join(f"{e.kind}{e.step}" for e in entries)
        self.order.append(f"begin {name}")
        if any(e.kind == "model" for e in entries):
            self.held.set()
            await self.gate.wait()
            if self.fail_next:
                self.fail_next = False
                self.order.append(f"failed {name}")
                raise StoreUnavailable("the store went away")
        seq = await super().append(task_id, entries, ledger, fence=fence)
        self.order.append(f"end {name}")
        return seq


async def _step(journal: Journal, step: int) -> None:
    call = ToolCall(id=f"c{step}", name="lookup", arguments="{}")
    await journal.model(step, {"role": "assistant", "content": None}, Usage(), [call])
    await journal.tool(step, 0, call, {"role": "tool", "content": "r"}, False)


async def _first_step_behind(store: GatedCheckpointer) -> tuple[Journal, list[str]]:
    """A write-behind journal whose turn started and whose step 1 ended (its append sent, not
    waited for); the list gets "step 1" once that append is durable."""
    journal = Journal(store, "t", "a", turn="0", snapshot_every=0, write_behind=True)
    await journal.turn_start("hi", 0)
    await _step(journal, 1)
    done: list[str] = []
    await asyncio.wait_for(journal.end_step(1), 10)
    journal.when_durable(lambda: done.append("step 1"))
    return journal, done


async def test_write_behind_goes_on_while_a_steps_append_is_in_flight() -> None:
    store = GatedCheckpointer()
    # The step ends without waiting for its append, which waits at the gate.
    journal, done = await _first_step_behind(store)
    await asyncio.wait_for(store.held.wait(), 10)
    assert [e.kind for e in await store.read("t")] == ["turn_start"]
    assert journal.buffered == 2 and journal.seq == 0 and done == []
    # The next step is buffered meanwhile; its append waits for the one in flight.
    await _step(journal, 2)
    second = asyncio.ensure_future(journal.end_step(2))
    store.gate.set()
    await asyncio.wait_for(second, 10)
    await asyncio.wait_for(journal.flush(), 10)
    assert store.order == ["begin turn_start0", "end turn_start0",
                           "begin model1+tool1", "end model1+tool1",
                           "begin model2+tool2", "end model2+tool2"]
    assert done == ["step 1"] and journal.buffered == 0 and journal.seq == 4
    assert [(e.seq, e.kind, e.step) for e in await store.read("t")] == [
        (0, "turn_start", 0), (1, "model", 1), (2, "tool", 1), (3, "model", 2), (4, "tool", 2)]


async def test_write_behind_waits_for_the_step_in_flight_before_a_side_effect() -> None:
    store = GatedCheckpointer()
    journal, _ = await _first_step_behind(store)
    pay = ToolCall(id="p", name="pay", arguments="{}")
    await journal.model(2, {"role": "assistant", "content": None}, Usage(), [pay])
    # What the step loop does before a tool with side effects runs.
    before_pay = asyncio.ensure_future(journal.checkpoint())
    await asyncio.wait_for(store.held.wait(), 10)
    assert not before_pay.done()
    store.gate.set()
    await asyncio.wait_for(before_pay, 10)
    assert [e.kind for e in await store.read("t")] == ["turn_start", "model", "tool", "model"]
    assert {r.tool: r.state for r in (await store.ledger("t")).values()} == {
        "lookup": "finished", "pay": "started"}


async def test_a_failed_write_behind_append_stops_the_turn_at_its_next_write() -> None:
    store = GatedCheckpointer()
    store.fail_next = True
    journal, done = await _first_step_behind(store)
    await _step(journal, 2)
    store.gate.set()
    with pytest.raises(StoreUnavailable, match="went away"):
        await asyncio.wait_for(journal.end_step(2), 10)
    assert "failed model1+tool1" in store.order
    assert not any(o.startswith("begin model2") for o in store.order)  # not written after it
    assert done == []  # never reported durable
    late: list[str] = []
    journal.when_durable(lambda: late.append("after the failure"))
    assert late == []
    # Nothing else is written after it (a gate's middleware may have taken the error for its
    # tool's), but the turn's end goes, alone: the log never holds step 2 without step 1.
    with pytest.raises(StoreUnavailable, match="went away"):
        await _step(journal, 3)
    await asyncio.wait_for(journal.turn_end(2, {"outcome": "failed"}), 10)
    assert [e.kind for e in await store.read("t")] == ["turn_start", "turn_end"]
    assert (await store.ledger("t")) == {}


async def test_without_write_behind_a_step_waits_for_its_append() -> None:
    store = GatedCheckpointer()
    journal = Journal(store, "t", "a", turn="0", snapshot_every=0, write_behind=False)
    await journal.turn_start("hi", 0)
    await _step(journal, 1)
    ending = asyncio.ensure_future(journal.end_step(1))
    await asyncio.wait_for(store.held.wait(), 10)
    assert not ending.done()
    store.gate.set()
    await asyncio.wait_for(ending, 10)
    assert journal.buffered == 0 and journal.seq == 2


async def test_write_behind_reports_each_step_done_once_durable(tmp_path: Path) -> None:
    class Watching(CountingCheckpointer):
        sw: Any = None
        seen: list[tuple[int, list[int]]] = []

        async def append(self, task_id: str, entries: list[LogEntry],
                         ledger: list[LedgerRecord] | None = None, *,
                         fence: int | None = None) -> int:
            # The steps a follower has seen finished when each step's append is written.
            step = max(e.step for e in entries)
            self.seen.append((step, [e.step for e in self.sw.events(task_id)
                                     if isinstance(e, StepFinished)]))
            return await super().append(task_id, entries, ledger, fence=fence)

    store = Watching()
    async with LocalSwarm(make_cfg(tmp_path, LONG, write_behind=True), store=store) as sw:
        store.sw = sw
        row = await sw.run("w")
        finished = [e.step for e in sw.events(row["task_id"]) if isinstance(e, StepFinished)]
    assert row["state"] == "completed" and row["answer"] == "done: paid w-pay"
    # The same appends as waiting for each, in the same order.
    assert [kinds for kinds, _ in store.appends][1:5] == [["model", "tool"]] * 4
    for step, reported in store.seen:
        assert all(s < step for s in reported), (step, reported)
    assert finished == list(range(1, 9))
    assert dt.RUNS["w-pay"] == 1


async def test_a_turn_cancelled_while_it_waits_for_an_append_keeps_its_steps() -> None:
    store = GatedCheckpointer()
    journal, done = await _first_step_behind(store)
    await asyncio.wait_for(store.held.wait(), 10)
    await _step(journal, 2)
    ending = asyncio.ensure_future(journal.end_step(2))  # waits for step 1's append
    await asyncio.sleep(0)  # let it start waiting
    ending.cancel()  # the task is cancelled meanwhile
    with pytest.raises(asyncio.CancelledError):
        await ending
    # The append itself goes on, and the cancelled turn's checkpoint (`AgentHost._run_turn`)
    # waits for it, then keeps step 2.
    store.gate.set()
    await asyncio.wait_for(journal.checkpoint(), 10)
    assert [(e.kind, e.step) for e in await store.read("t")] == [
        ("turn_start", 0), ("model", 1), ("tool", 1), ("model", 2), ("tool", 2)]
    assert done == ["step 1"]


async def test_under_phase_steps_are_reported_as_they_end(tmp_path: Path) -> None:
    store = EndWatching()
    # write_behind is on by default; it has nothing to do under phase, which writes at the
    # turn's boundaries (and around `pay`): steps are reported as they end, as before.
    async with LocalSwarm(make_cfg(tmp_path, LONG, checkpoint="phase"), store=store) as sw:
        store.sw = sw
        row = await sw.run("q")
    assert row["state"] == "completed" and row["steps"] == 8
    assert store.done_at_end == list(range(1, 8))
