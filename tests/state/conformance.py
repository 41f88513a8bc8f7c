"""The `Checkpointer` conformance suite: the behaviour every backend must have.

Subclass `CheckpointerConformance` in a `test_*.py` module and provide a `backend` fixture that
yields a `Backend`: a fresh, started store plus a `corrupt(task_id, what, data)` hook that
overwrites one stored record's bytes (`what` is `entry:<seq>` or `snapshot:<seq>`), or None if
the backend can't (its corruption tests are then skipped). `tests/state/conftest.py` has the
fixture for memory, Redis and Arrow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest

from swarm.state import codec
from swarm.state.interface import (
    Checkpointer,
    CorruptRecord,
    Fenced,
    LedgerRecord,
    LogEntry,
    Snapshot,
    TaskRow,
)
from swarm.state.replay import read_after, restore

Corrupt = Callable[[str, str, bytes], None]


@dataclass
class Backend:
    """A store under test and the hook that damages its stored bytes."""

    store: Checkpointer
    corrupt: Corrupt | None


def entry(step: int, text: str = "x", kind: str = "tool") -> LogEntry:
    """A log entry like the journal writes for a tool result."""
    return LogEntry(kind=kind, agent="a", step=step, ts=1.0,
                    data={"message": {"role": "tool", "content": text}, "index": 0})


def record(key: str, state: str = "started", result: str | None = None) -> LedgerRecord:
    """A ledger record of one tool call."""
    return LedgerRecord(key=key, state=state, tool="pay", args_hash="h", result=result)  # type: ignore[arg-type]


def _hook(backend: Backend) -> Corrupt:
    if backend.corrupt is None:
        pytest.skip(f"{backend.store.name} backend has no hook to damage stored bytes")
    return backend.corrupt


class CheckpointerConformance:
    """Tests every `Checkpointer` backend passes (needs a `backend` fixture)."""

    async def test_append_assigns_consecutive_seqs_from_zero(self, backend: Backend) -> None:
        store = backend.store
        first = [entry(1), entry(2)]
        assert await store.append("t", first) == 1
        assert [e.seq for e in first] == [0, 1]
        assert await store.append("t", [entry(3)]) == 2
        assert await store.append("t", []) == -1
        got = await store.read("t")
        assert [e.seq for e in got] == [0, 1, 2] and [e.step for e in got] == [1, 2, 3]
        assert got[0].data == {"message": {"role": "tool", "content": "x"}, "index": 0}

    async def test_read_ranges(self, backend: Backend) -> None:
        store = backend.store
        await store.append("t", [entry(i) for i in range(10)])
        assert [e.seq for e in await store.read("t", after=6)] == [7, 8, 9]
        assert [e.seq for e in await store.read("t", upto=2)] == [0, 1, 2]
        assert [e.seq for e in await store.read("t", after=2, upto=4)] == [3, 4]
        assert [e.seq for e in await store.read("t", after=8, upto=50)] == [9]
        assert await store.read("t", after=4, upto=4) == []
        assert await store.read("t", after=9) == []
        assert await store.read("unknown") == []

    async def test_many_entries_in_one_append_and_long_ranges(self, backend: Backend) -> None:
        store = backend.store
        assert await store.append("t", [entry(i) for i in range(2500)]) == 2499
        got = await store.read("t", after=999, upto=2200)
        assert [e.seq for e in got] == list(range(1000, 2201))
        assert [e.step for e in got] == list(range(1000, 2201))
        assert len(await store.read("t")) == 2500

    async def test_ledger_is_written_with_the_entries(self, backend: Backend) -> None:
        store = backend.store
        assert await store.ledger("t") == {}
        await store.append("t", [entry(1)], [record("t:a:1:0"), record("t:a:1:1")])
        book = await store.ledger("t")
        assert sorted(book) == ["t:a:1:0", "t:a:1:1"] and book["t:a:1:0"].state == "started"
        await store.append("t", [entry(2)], [record("t:a:1:0", "finished", "ok")])
        book = await store.ledger("t")
        assert book["t:a:1:0"].state == "finished" and book["t:a:1:0"].result == "ok"
        assert book["t:a:1:1"].state == "started" and len(await store.read("t")) == 2
        assert await store.append("t", [], [record("t:a:1:1", "finished", "done")]) == -1
        assert (await store.ledger("t"))["t:a:1:1"].result == "done"
        assert len(await store.read("t")) == 2

    async def test_a_superseded_writer_can_no_longer_append(self, backend: Backend) -> None:
        store = backend.store
        old = await store.claim("t")
        assert await store.append("t", [entry(1)], [record("t:a:1:0")], fence=old) == 0
        new = await store.claim("t")
        assert new > old
        with pytest.raises(Fenced, match="task t: writer token"):
            await store.append("t", [entry(2)], [record("t:a:2:0")], fence=old)
        # The refused append changed nothing: no entry, no ledger record.
        assert [e.step for e in await store.read("t")] == [1]
        assert sorted(await store.ledger("t")) == ["t:a:1:0"]
        assert await store.append("t", [entry(2)], fence=new) == 1
        assert await store.append("t", [entry(3)]) == 2  # unfenced writers (the supervisor)
        assert await store.claim("other") == 1  # tokens are per task
        await store.delete("t")
        assert await store.claim("t") >= 1

    async def test_concurrent_appenders_get_distinct_seqs_and_lose_nothing(
        self, backend: Backend
    ) -> None:
        store = backend.store
        batches = [[entry(i, f"{i}.0"), entry(i, f"{i}.1")] for i in range(100)]
        lasts = await asyncio.gather(*(store.append("t", b, [record(f"k{i}")])
                                       for i, b in enumerate(batches)))
        assert sorted(lasts) == list(range(1, 200, 2))
        got = await store.read("t")
        assert [e.seq for e in got] == list(range(200))
        # Each call's entries are adjacent, in order, at the seqs the call was told.
        for i, b in enumerate(batches):
            assert [e.seq for e in b] == [lasts[i] - 1, lasts[i]]
            assert [got[e.seq].data["message"]["content"] for e in b] == [f"{i}.0", f"{i}.1"]
        assert len(await store.ledger("t")) == 100

    async def test_tasks_are_isolated(self, backend: Backend) -> None:
        store = backend.store
        await store.append("t1", [entry(1, "one")], [record("t1:k")])
        await store.append("t2", [entry(1, "two"), entry(2, "two")], [record("t2:k")])
        await store.put_snapshot(Snapshot(task_id="t1", seq=0, step=1, data={"a": 1}))
        assert [e.data["message"]["content"] for e in await store.read("t1")] == ["one"]
        assert [e.seq for e in await store.read("t2")] == [0, 1]
        assert list(await store.ledger("t2")) == ["t2:k"]
        assert await store.snapshots("t2") == []

    async def test_snapshots(self, backend: Backend) -> None:
        store = backend.store
        assert await store.snapshots("t") == [] and await store.get_snapshot("t", 0) is None
        for seq in (20, 5, 10):
            await store.put_snapshot(Snapshot(task_id="t", seq=seq, step=seq, ts=2.0,
                                              data={"n": seq, "blob": b"\x00\xff"}))
        assert await store.snapshots("t") == [5, 10, 20]
        snap = await store.get_snapshot("t", 10)
        assert snap == Snapshot(task_id="t", seq=10, step=10, ts=2.0,
                                data={"n": 10, "blob": b"\x00\xff"})
        assert await store.get_snapshot("t", 11) is None
        await store.put_snapshot(Snapshot(task_id="t", seq=10, step=99, data={}))
        assert (await store.get_snapshot("t", 10)).step == 99  # type: ignore[union-attr]

    async def test_snapshots_keep_the_newest(self, backend: Backend) -> None:
        store = backend.store
        for seq in (9, 19, 29, 39):
            await store.put_snapshot(Snapshot(task_id="t", seq=seq, step=seq, data={"n": seq}),
                                     keep=3)
        assert await store.snapshots("t") == [19, 29, 39]
        assert await store.get_snapshot("t", 9) is None
        for seq in (49, 59):
            await store.put_snapshot(Snapshot(task_id="t", seq=seq, step=seq, data={}))
        assert await store.snapshots("t") == [39, 49, 59]  # the default keeps 3
        await store.put_snapshot(Snapshot(task_id="t", seq=69, step=69, data={}), keep=1)
        assert await store.snapshots("t") == [69]

    async def test_restore_refuses_a_log_that_ends_before_its_snapshot(
        self, backend: Backend
    ) -> None:
        store = backend.store
        await store.append("t", [entry(i) for i in range(4)])
        await store.put_snapshot(Snapshot(task_id="t", seq=3, step=3, data={}))
        assert (await restore(store, "t"))[0].seq == 3  # a snapshot at the log's last entry
        await store.append("t", [entry(4)])
        assert (await restore(store, "t"))[0].seq == 4
        # A snapshot the log doesn't reach: the log lost entries it had acknowledged (a lost
        # file, a store that lost writes), which resuming from the snapshot would run again.
        await store.put_snapshot(Snapshot(task_id="t", seq=7, step=7, data={}))
        with pytest.raises(CorruptRecord, match=(
                r"task t: entry 7 is unusable: it is missing: the log ends before it \(its "
                r"last entry is 4\), but the task's snapshot at entry 7")) as err:
            await restore(store, "t")
        assert (err.value.task_id, err.value.what) == ("t", "entry 7")
        with pytest.raises(CorruptRecord, match="entry 7"):
            await read_after(store, "t", await store.get_snapshot("t", 7))
        assert (await restore(store, "t", upto=5))[0].seq == 4  # the older snapshot is held
        await store.put_snapshot(Snapshot(task_id="u", seq=2, step=2, data={}))
        with pytest.raises(CorruptRecord, match=r"task u: entry 2 .*\(it holds no entries\)"):
            await restore(store, "u")

    async def test_task_rows_by_swarm(self, backend: Backend) -> None:
        store = backend.store
        assert await store.get_task("a") is None and await store.list_tasks("s1") == []
        await store.put_task(TaskRow(task_id="a", swarm="s1", state="working",
                                     data={"x": b"\x00"}, updated=1.5))
        await store.put_task(TaskRow(task_id="b", swarm="s1", state="submitted"))
        await store.put_task(TaskRow(task_id="c", swarm="s2", state="completed"))
        await store.put_task(TaskRow(task_id="a", swarm="s1", state="completed"))
        row = await store.get_task("a")
        assert row == TaskRow(task_id="a", swarm="s1", state="completed")
        assert sorted(r.task_id for r in await store.list_tasks("s1")) == ["a", "b"]
        assert [r.task_id for r in await store.list_tasks("s2")] == ["c"]
        # A row put under another swarm moves there.
        await store.put_task(TaskRow(task_id="b", swarm="s2", state="working"))
        assert [r.task_id for r in await store.list_tasks("s1")] == ["a"]
        assert sorted(r.task_id for r in await store.list_tasks("s2")) == ["b", "c"]
        assert (await store.get_task("b")).swarm == "s2"  # type: ignore[union-attr]

    async def test_put_tasks_stores_each_row_and_reports_each_failure(self, backend: Backend
                                                                      ) -> None:
        store = backend.store
        rows = [TaskRow(task_id=f"r{i}", swarm="s", state="submitted", data={"i": i})
                for i in range(5)]
        rows[2] = TaskRow(task_id="r2", swarm="s", state="submitted", data={"x": object()})
        out = await store.put_tasks(rows)
        assert [x is None for x in out] == [True, True, False, True, True]
        assert isinstance(out[2], Exception)
        assert await store.get_task("r2") is None
        assert sorted(r.task_id for r in await store.list_tasks("s")) == ["r0", "r1", "r3", "r4"]
        assert (await store.get_task("r3")).data == {"i": 3}  # type: ignore[union-attr]
        assert await store.put_tasks([]) == []

    async def test_delete_removes_everything_of_one_task(self, backend: Backend) -> None:
        store = backend.store
        for task in ("t1", "t2"):
            await store.append(task, [entry(1)], [record(f"{task}:k")])
            await store.put_snapshot(Snapshot(task_id=task, seq=0, step=1, data={"a": 1}))
            await store.put_task(TaskRow(task_id=task, swarm="s", state="working"))
        await store.delete("t1")
        assert await store.read("t1") == [] and await store.ledger("t1") == {}
        assert await store.snapshots("t1") == [] and await store.get_task("t1") is None
        assert [r.task_id for r in await store.list_tasks("s")] == ["t2"]
        assert len(await store.read("t2")) == 1 and await store.snapshots("t2") == [0]
        assert list(await store.ledger("t2")) == ["t2:k"]
        assert await store.get_task("t2") is not None
        await store.delete("t1")  # deleting twice, or an unknown task, is fine
        await store.delete("never-existed")
        assert await store.append("t1", [entry(5)]) == 0  # the id starts afresh

    async def test_large_payloads_round_trip(self, backend: Backend) -> None:
        store = backend.store
        big = "y" * 1_000_000
        assert await store.append("t", [entry(1, big), entry(2)]) == 1
        got = await store.read("t")
        assert got[0].data["message"]["content"] == big and got[1].step == 2
        await store.put_snapshot(Snapshot(task_id="t", seq=1, step=2, data={"t": big}))
        assert (await store.get_snapshot("t", 1)).data["t"] == big  # type: ignore[union-attr]

    async def test_corrupt_entry_is_named(self, backend: Backend) -> None:
        store, corrupt = backend.store, _hook(backend)
        await store.append("t", [entry(0), entry(1), entry(2)])
        corrupt("t", "entry:1", b"\xc1\x00garbage")
        with pytest.raises(CorruptRecord, match="task t: entry 1 is unusable") as err:
            await store.read("t")
        assert err.value.task_id == "t" and err.value.what == "entry 1"
        assert [e.seq for e in await store.read("t", upto=0)] == [0]
        assert [e.seq for e in await store.read("t", after=1)] == [2]

    async def test_truncated_entry_is_named(self, backend: Backend) -> None:
        store, corrupt = backend.store, _hook(backend)
        await store.append("t", [entry(0), entry(1, "z" * 100), entry(2)])
        corrupt("t", "entry:1", codec.encode(entry(1, "z" * 100))[:-7])
        with pytest.raises(CorruptRecord, match="task t: entry 1 is unusable"):
            await store.read("t")

    async def test_unknown_entry_version_is_refused(self, backend: Backend) -> None:
        store, corrupt = backend.store, _hook(backend)
        await store.append("t", [entry(0), entry(1)])
        alien = LogEntry(kind="tool", step=1, v=99)
        corrupt("t", "entry:1", msgspec.msgpack.encode(alien))
        with pytest.raises(CorruptRecord, match=r"task t: entry 1 .*format version 99"):
            await store.read("t")

    async def test_corrupt_and_unknown_version_snapshots_are_named(
        self, backend: Backend
    ) -> None:
        store, corrupt = backend.store, _hook(backend)
        for seq in (1, 2):
            await store.put_snapshot(Snapshot(task_id="t", seq=seq, step=seq, data={}))
        corrupt("t", "snapshot:2", b"\x85\xa7task_id")
        with pytest.raises(CorruptRecord, match="task t: snapshot at entry 2 is unusable"):
            await store.get_snapshot("t", 2)
        corrupt("t", "snapshot:1", msgspec.msgpack.encode(
            Snapshot(task_id="t", seq=1, step=1, data={}, v=99)))
        with pytest.raises(CorruptRecord, match=r"snapshot at entry 1.*format version 99"):
            await store.get_snapshot("t", 1)
        assert await store.snapshots("t") == [1, 2]  # listing still works
