"""`ArrowCheckpointer` behaviour beyond the conformance suite: segments, torn writes, recovery.

The object-store code path (an object per append, I/O in threads) runs the whole conformance
suite on pyarrow's in-memory `mock://` filesystem, the only one it can build without a network;
an `s3://` URI is only checked to construct. Nothing here starts Ray.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from arrow_support import corrupter, segments
from conformance import Backend, CheckpointerConformance, entry, record

from swarm.errors import CheckpointError
from swarm.state import arrow as arrow_mod
from swarm.state import codec
from swarm.state.arrow import ArrowCheckpointer, write_parquet
from swarm.state.interface import (
    CorruptRecord,
    Fenced,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)


class TestObjectStoreConformance(CheckpointerConformance):
    """The suite on a filesystem that can't append (every append its own object)."""

    @pytest.fixture
    async def backend(self) -> AsyncIterator[Backend]:
        store = ArrowCheckpointer("mock:///swarm")
        assert not store.local
        await store.start()
        yield Backend(store, corrupter(store))
        await store.close()

def seqs(entries: list[LogEntry]) -> list[int]:
    return [e.seq for e in entries]


def size(path: str) -> int:
    return os.path.getsize(path)


def tear(path: str, keep: int) -> None:
    """Cut a file to its first `keep` bytes, as a writer killed mid-write leaves it."""
    os.truncate(path, keep)


def touch(path: str) -> None:
    Path(path).parent.mkdir(parents=True)
    Path(path).touch()


@pytest.mark.parametrize("cut", ["header", "body", "last byte"])
async def test_torn_trailing_batch_is_named_not_dropped(tmp_path: Path, cut: str) -> None:
    writer = ArrowCheckpointer(tmp_path.as_uri())
    await writer.append("t", [entry(0), entry(1)], [record("t:a:0:0")])
    [path] = segments(writer, "t")
    before = size(path)
    await writer.append("t", [entry(2, "z" * 300)], [record("t:a:2:0")])
    after = size(path)
    # The writer is killed mid-write: part of its last batch reached the file.
    tear(path, {"header": before + 6, "body": (before + after) // 2, "last byte": after - 1}[cut])

    reader = ArrowCheckpointer(tmp_path.as_uri())
    with pytest.raises(CorruptRecord, match=r"task t: entry 2 is unusable.*torn") as err:
        await reader.read("t")
    assert (err.value.task_id, err.value.what) == ("t", "entry 2")
    assert seqs(await reader.read("t", upto=1)) == [0, 1]  # what is before it still reads
    with pytest.raises(CorruptRecord, match="entry 2"):
        await reader.ledger("t")
    with pytest.raises(CorruptRecord, match="entry 2"):  # no append lands after a hole
        await reader.append("t", [entry(3)])
    await writer.close()


async def test_open_or_killed_writer_leaves_a_readable_segment(tmp_path: Path) -> None:
    writer = ArrowCheckpointer(tmp_path.as_uri())
    await writer.append("t", [entry(0)])
    await writer.append("t", [entry(1)], [record("t:a:1:0", "finished", "ok")])
    # Still open (or killed without closing): no end-of-stream marker after the last batch.
    reader = ArrowCheckpointer(tmp_path.as_uri())
    assert seqs(await reader.read("t")) == [0, 1]
    assert (await reader.ledger("t"))["t:a:1:0"].result == "ok"
    # A file created by a writer that died before its first write holds nothing, not garbage.
    touch(f"{reader.task_dir('u')}/log-000000000000.arrows")
    assert await reader.read("u") == []
    assert await reader.append("u", [entry(0)]) == 0 and seqs(await reader.read("u")) == [0]
    await writer.close()


async def test_rotation_keeps_seqs_consecutive_across_segments(tmp_path: Path) -> None:
    store = ArrowCheckpointer(tmp_path.as_uri(), segment_entries=3)
    for i in range(4):
        assert await store.append("t", [entry(i)]) == i
    assert await store.append("t", [entry(i) for i in range(4, 9)]) == 8  # one batch, not split
    assert await store.append("t", [], [record("t:k", "finished", "ok")]) == -1
    assert await store.append("t", [entry(9)]) == 9
    names = [os.path.basename(p) for p in segments(store, "t")]
    assert names == ["log-000000000000.arrows", "log-000000000003.arrows",
                     "log-000000000009.arrows"]
    assert seqs(await store.read("t")) == list(range(10))
    assert [e.step for e in await store.read("t")] == list(range(10))
    assert seqs(await store.read("t", after=1, upto=4)) == [2, 3, 4]
    assert seqs(await store.read("t", after=8)) == [9]
    assert seqs(await store.read("t", after=2, upto=3)) == [3]
    assert (await store.ledger("t"))["t:k"].state == "finished"
    # A lost middle segment is a hole in the log, named, not skipped.
    os.remove(segments(store, "t")[1])
    with pytest.raises(CorruptRecord, match=r"task t: entry 3 is unusable.*missing"):
        await store.read("t")
    with pytest.raises(CorruptRecord, match="entry 3"):
        await store.read("t", after=1, upto=5)
    assert seqs(await store.read("t", upto=2)) == [0, 1, 2]
    await store.close()


@pytest.mark.parametrize("uri", ["file", "mock"])
async def test_every_range_reads_right_over_mixed_batches(tmp_path: Path, uri: str) -> None:
    # Batches of 0-3 entries, with and without ledger rows, over several segments: reads find
    # their first batch by bisection, so check every range against the plain answer.
    store = ArrowCheckpointer(tmp_path.as_uri() if uri == "file" else "mock:///r",
                              segment_entries=7)
    rng = random.Random(7)
    total = 0
    for _ in range(40):
        n = rng.choice([0, 1, 1, 2, 3])
        book = [record(f"k{total}")] if n == 0 or rng.random() < 0.3 else []
        await store.append("t", [entry(total + i) for i in range(n)], book)
        total += n
    assert seqs(await store.read("t")) == list(range(total))
    for after in range(-1, total + 1):
        for upto in (*range(after, total + 2, 3), None):
            want = list(range(after + 1, total if upto is None else min(upto + 1, total)))
            assert seqs(await store.read("t", after=after, upto=upto)) == want, (after, upto)
    await store.close()


async def test_a_second_instance_recovers_the_next_seq(tmp_path: Path) -> None:
    first = ArrowCheckpointer(tmp_path.as_uri(), segment_entries=2)
    await first.append("t", [entry(i) for i in range(3)])
    await first.append("t", [entry(3)], [record("t:a:3:0")])
    await first.close()
    second = ArrowCheckpointer(tmp_path.as_uri(), segment_entries=2)
    assert await second.append("t", [entry(4)], [record("t:a:3:0", "finished", "ok")]) == 4
    assert await second.append("t", [entry(5)]) == 5
    third = ArrowCheckpointer(tmp_path.as_uri())  # the second one is still open
    assert seqs(await third.read("t")) == list(range(6))
    assert (await third.ledger("t"))["t:a:3:0"].result == "ok"
    await second.close()
    await third.close()


async def test_object_store_recovers_seqs_and_ledger_order() -> None:
    fs, root = pafs.FileSystem.from_uri("mock:///swarm")
    first = ArrowCheckpointer(root, filesystem=fs)
    await first.append("t", [entry(0), entry(1)])
    await first.append("t", [], [record("t:k", "started")])
    await first.append("t", [], [record("t:k", "finished", "one")])
    second = ArrowCheckpointer(root, filesystem=fs)
    await second.append("t", [], [record("t:k", "finished", "two")])
    assert await second.append("t", [entry(2)]) == 2
    assert (await second.ledger("t"))["t:k"].result == "two"  # the last write wins
    assert seqs(await second.read("t", after=0)) == [1, 2]
    # One whole object per append: nothing half-written is ever visible.
    names = [os.path.basename(p) for p in segments(second, "t")]
    assert names == ["log-000000000000-0.arrows", "log-000000000002-0.arrows",
                     "log-000000000002-1.arrows", "log-000000000002-2.arrows",
                     "log-000000000002-3.arrows"]


def writers(tmp_path: Path, uri: str, segment_entries: int, n: int = 2
            ) -> list[ArrowCheckpointer]:
    """Stores on one root, as several processes (the agents of a handoff) have them."""
    if uri == "file":
        return [ArrowCheckpointer(tmp_path.as_uri(), segment_entries=segment_entries)
                for _ in range(n)]
    fs, root = pafs.FileSystem.from_uri("mock:///swarm")
    return [ArrowCheckpointer(root, filesystem=fs) for _ in range(n)]


@pytest.mark.parametrize(("uri", "segment_entries"), [("file", 1000), ("file", 3), ("mock", 0)])
async def test_writers_taking_turns_on_one_log_go_on_from_its_stored_end(
    tmp_path: Path, uri: str, segment_entries: int
) -> None:
    # A handoff a -> b -> a -> b with a and b in different processes: each turn claims the
    # log, then appends; each writer's kept tail is stale when its next turn starts.
    a, b, reader = writers(tmp_path, uri, segment_entries, 3)
    for turn in range(4):
        writer = (a, b)[turn % 2]
        fence = await writer.claim("t")
        first = await writer.append("t", [entry(turn, f"{turn}.0")], [record(f"t:{turn}")],
                                    fence=fence)
        last = await writer.append("t", [entry(turn, f"{turn}.1"), entry(turn, f"{turn}.2")],
                                   fence=fence)
        assert (first, last) == (3 * turn, 3 * turn + 2)
    got = await reader.read("t")
    assert seqs(got) == list(range(12))
    assert [e.data["message"]["content"] for e in got] == [
        f"{turn}.{i}" for turn in range(4) for i in range(3)]
    assert sorted(await reader.ledger("t")) == [f"t:{turn}" for turn in range(4)]
    for store in (a, b, reader):
        await store.close()


@pytest.mark.parametrize(("uri", "segment_entries"), [("file", 1000), ("file", 2), ("mock", 0)])
async def test_an_unfenced_append_goes_on_after_another_writers_entries(
    tmp_path: Path, uri: str, segment_entries: int
) -> None:
    # The supervisor logs approval decisions (unfenced, without a claim) between the turns
    # of an agent in another process.
    agent, supervisor = writers(tmp_path, uri, segment_entries)
    for round_ in range(3):
        fence = await agent.claim("t")
        await agent.append("t", [entry(round_, f"agent {round_}")], fence=fence)
        await agent.append("t", [], [record(f"t:{round_}", "finished", "ok")], fence=fence)
        assert await supervisor.append("t", [entry(round_, f"sup {round_}")]) == 2 * round_ + 1
    got = await agent.read("t")
    assert seqs(got) == list(range(6))
    assert [e.data["message"]["content"] for e in got] == [
        f"{who} {r}" for r in range(3) for who in ("agent", "sup")]
    await agent.close()
    await supervisor.close()


@pytest.mark.parametrize("segment_entries", [1000, 1])
async def test_a_fenced_append_after_another_writers_is_refused(
    tmp_path: Path, segment_entries: int
) -> None:
    a, b = writers(tmp_path, "file", segment_entries)
    old = await a.claim("t")
    assert await a.append("t", [entry(0)], fence=old) == 0
    # Another process claims the log and writes: the first writer is superseded.
    new = await b.claim("t")
    assert await b.append("t", [entry(1)], fence=new) == 1
    with pytest.raises(Fenced, match=f"writer token {old} was superseded by {new}"):
        await a.append("t", [entry(2)], fence=old)
    # An unfenced writer appending while a writer holds its claim: the claimer's view of
    # the log is stale, so its append is refused, naming what changed.
    mine = await a.claim("t")
    assert await a.append("t", [entry(2)], fence=mine) == 2
    assert await b.append("t", [entry(3)]) == 3
    with pytest.raises(CheckpointError, match=(
            r"task t: another writer appended .* \(token 3\).*log-0000000000\d\d\.arrows "
            r"changed; this writer's next entry was 3, the stored log's is 4")):
        await a.append("t", [entry(4, "lost")], fence=mine)
    got = await b.read("t")
    assert seqs(got) == [0, 1, 2, 3] and "lost" not in str(got)
    # A new claim goes on from the stored end.
    assert await a.append("t", [entry(4)], fence=await a.claim("t")) == 4
    await a.close()
    await b.close()


async def test_fsync_option_syncs_each_append_on_local_disks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(arrow_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    store = ArrowCheckpointer(tmp_path.as_uri(), fsync=True)
    await store.append("t", [entry(0)])  # a new segment: the file and its directory
    await store.append("t", [entry(1)])
    assert len(synced) == 3
    await store.put_snapshot(Snapshot(task_id="t", seq=1, step=1, data={}))
    assert len(synced) == 5 and seqs(await store.read("t")) == [0, 1]
    await store.close()
    assert not ArrowCheckpointer("mock:///x", fsync=True).fsync  # object stores: put is durable


async def test_a_failed_sync_never_reuses_a_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArrowCheckpointer(tmp_path.as_uri(), fsync=True)
    await store.append("t", [entry(0)])

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(arrow_mod.os, "fsync", broken)
    lost = entry(1)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        await store.append("t", [lost])
    assert lost.seq == -1  # not reported durable
    monkeypatch.undo()
    # The batch reached the file before its sync failed: it stays, and seqs go on after it.
    assert await store.append("t", [entry(2)]) == 2
    assert [e.step for e in await store.read("t")] == [0, 1, 2]
    await store.close()


async def test_many_tasks_keep_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    store = ArrowCheckpointer(tmp_path.as_uri(), max_open=2)
    for round_ in range(3):
        for t in range(5):
            await store.append(f"t{t}", [entry(round_, f"{t}.{round_}")])
            assert len(store._open) <= 2
    for t in range(5):
        got = await store.read(f"t{t}")
        assert [e.data["message"]["content"] for e in got] == [f"{t}.{r}" for r in range(3)]
    await store.close()


async def test_odd_ids_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = ArrowCheckpointer(root.as_uri())
    for task in ("../escape", "a/b", ".", ""):
        await store.append(task, [entry(1, task)])
        await store.put_task(TaskRow(task_id=task, swarm="../s", state="working"))
        assert [e.data["message"]["content"] for e in await store.read(task)] == [task]
    assert os.listdir(tmp_path) == ["root"]
    assert sorted(r.task_id for r in await store.list_tasks("../s")) == ["", ".", "../escape",
                                                                         "a/b"]
    await store.close()


async def test_write_parquet_round_trip(tmp_path: Path) -> None:
    store = ArrowCheckpointer((tmp_path / "log").as_uri())
    await store.append("task/1", [entry(i, f"m{i}", kind="tool" if i else "model")
                                  for i in range(5)])
    entries = await store.read("task/1")
    path = write_parquet("task/1", entries, (tmp_path / "archive").as_uri())
    assert path == str(tmp_path / "archive" / "task%2F1.parquet")
    table = pq.read_table(path)
    assert table.column_names == ["seq", "kind", "agent", "step", "ts", "payload"]
    assert table.column("seq").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("kind").to_pylist() == ["model", "tool", "tool", "tool", "tool"]
    assert table.schema.metadata[b"swarm.task_id"] == b"task/1"
    back = [codec.decode(LogEntry, p, task_id="task/1", what="archived entry")
            for p in table.column("payload").to_pylist()]
    assert back == entries
    assert pq.ParquetFile(path).metadata.row_group(0).column(5).compression == "ZSTD"
    await store.close()


def test_filesystem_uris_are_accepted_without_a_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = ArrowCheckpointer("s3://bucket/prefix?region=us-east-1")
    assert isinstance(s3.fs, pafs.S3FileSystem) and not s3.local
    assert s3.task_dir("t1") == "bucket/prefix/tasks/t1"
    assert ArrowCheckpointer("mock:///").task_dir("t1") == "tasks/t1"
    monkeypatch.chdir(tmp_path)  # pyarrow refuses relative file URIs; the docs' examples use them
    assert ArrowCheckpointer("file://./runs").task_dir("t1") == f"{tmp_path}/runs/tasks/t1"
    with pytest.raises(ValueError, match="can't open 'nope://x' as a pyarrow filesystem"):
        ArrowCheckpointer("nope://x")


async def test_an_unreachable_store_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = ArrowCheckpointer(blocker.as_uri())
    with pytest.raises(StoreUnavailable, match="arrow store"):
        await store.start()
    with pytest.raises(StoreUnavailable, match="arrow store"):
        await store.append("t", [entry(0)])
    assert store.name == "arrow"
