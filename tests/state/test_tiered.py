"""Retention: archiving Redis log segments into an Arrow archive, compaction, reads across both.

Every test runs a real redis-server (`EmbeddedRedis`, see conftest.py) and an archive in a
temporary directory; none starts Ray.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from conformance import entry, record

from swarm.config import StateConfig
from swarm.errors import CheckpointError
from swarm.protocol import a2a
from swarm.state import open_checkpointer, with_archive
from swarm.state.arrow import ArrowCheckpointer
from swarm.state.embedded import EmbeddedRedis
from swarm.state.interface import CorruptRecord, Snapshot, TaskRow
from swarm.state.redis import RedisCheckpointer
from swarm.state.replay import TaskState, apply, restore, to_snapshot
from swarm.state.tiered import FINISHED, TieredCheckpointer


class Tiers:
    """A tiered store under test, a way to open more over the same data, and a raw Redis."""

    def __init__(self, url: str, prefix: str, root: Path) -> None:
        self.url, self.prefix, self.root = url, prefix, root
        self.raw = redis.Redis.from_url(url)
        self.opened: list[TieredCheckpointer] = []

    async def open(self, **kw) -> TieredCheckpointer:
        """Another process's view: a new store on the same Redis keys and archive directory."""
        kw.setdefault("archive_after", 0)
        store = TieredCheckpointer(RedisCheckpointer(self.url, prefix=self.prefix),
                                   ArrowCheckpointer(self.root.as_uri()), **kw)
        await store.start()
        self.opened.append(store)
        return store

    def key(self, task_id: str, what: str) -> str:
        return f"{self.prefix}:t:{task_id}:{what}"

    def llen(self, task_id: str) -> int:
        return self.raw.llen(self.key(task_id, "log"))

    def segments(self, task_id: str) -> list[str]:
        d = self.root / "tasks" / task_id
        return sorted(p.name for p in d.glob("log-*.arrows")) if d.exists() else []


@pytest.fixture
async def tiers(redis_server: EmbeddedRedis, tmp_path: Path) -> AsyncIterator[Tiers]:
    t = Tiers(redis_server.url, f"test{uuid.uuid4().hex[:12]}", tmp_path / "archive")
    yield t
    for store in t.opened:
        await store.close()
    t.raw.close()


@pytest.fixture
async def store(tiers: Tiers) -> TieredCheckpointer:
    return await tiers.open()


async def fill(store, task: str, n: int, *, every: int = 0, first: int = 0) -> TaskState:
    """Append `n` entries one by one (with a ledger record each), snapshotting every `every`."""
    state = TaskState()
    for i in range(first, first + n):
        e = entry(i, f"step {i}")
        await store.append(task, [e], [record(f"{task}:a:{i}:0", "finished", f"r{i}")])
        apply(state, e)
        if every and (i + 1) % every == 0:
            await store.put_snapshot(to_snapshot(task, state, 1.0))
    return state


def steps(entries) -> list[int]:
    return [e.step for e in entries]


async def test_archive_then_read_everything(store: TieredCheckpointer, tiers: Tiers) -> None:
    await fill(store, "t", 250, every=100)  # snapshots at 99 and 199
    before = await store.read("t")
    assert await store.archive_log("t", 199) == 200
    assert tiers.llen("t") == 50 and tiers.segments("t") == ["log-000000000000.arrows"]
    got = await store.read("t")
    assert [e.seq for e in got] == list(range(250)) and got == before
    # The archive alone holds the archived part; Redis alone refuses it rather than skip it.
    assert steps(await store.archive.read("t")) == list(range(200))
    with pytest.raises(CheckpointError, match=r"task t: entries 0\.\.199 were moved"):
        await store.hot.read("t")
    assert steps(await store.hot.read("t", after=199)) == list(range(200, 250))
    state, problems = await restore(store, "t")
    assert problems == [] and state.seq == 249 and len(state.transcript) == 250
    assert await store.snapshots("t") == [99, 199]  # Redis's, the archived one among them
    assert len(await store.ledger("t")) == 250  # an unfinished task's ledger stays whole


async def test_archive_twice_is_idempotent(store: TieredCheckpointer, tiers: Tiers) -> None:
    await fill(store, "t", 120)
    assert await store.archive_log("t", 59) == 60
    files = {p.name: p.read_bytes() for p in (tiers.root / "tasks" / "t").iterdir()}
    assert await store.archive_log("t", 59) == 60
    assert await store.archive_log("t", 30) == 60  # an older point: nothing to do either
    assert {p.name: p.read_bytes() for p in (tiers.root / "tasks" / "t").iterdir()} == files
    assert await store.archive_log("t", 99) == 100  # further: only the new part is written
    assert tiers.segments("t") == ["log-000000000000.arrows", "log-000000000060.arrows"]
    assert steps(await store.read("t")) == list(range(120))


async def test_a_crash_between_archive_write_and_trim_loses_and_duplicates_nothing(
    store: TieredCheckpointer, tiers: Tiers
) -> None:
    await fill(store, "t", 80, every=40)
    token = await store.hot.lease("t", 0.2)
    assert token is not None
    plan = await store.write_archive("t", 39)
    # The process dies here: its lease runs out, Redis still holds every entry.
    assert tiers.llen("t") == 80 and steps(await store.archive.read("t")) == list(range(40))
    other = await tiers.open()
    assert [e.seq for e in await other.read("t")] == list(range(80))
    assert [e.seq for e in await other.read("t", after=20, upto=50)] == list(range(21, 51))
    assert await other.archive_log("t", 39) is None  # the dead archiver's lease still holds
    with pytest.raises(CheckpointError, match="lease expired"):
        await asyncio.sleep(0.25)
        await store.compact(plan, lease=token)  # the stale half can't trim any more
    assert tiers.llen("t") == 80
    assert await other.archive_log("t", 39) == 40  # writes nothing again, trims
    assert tiers.segments("t") == ["log-000000000000.arrows"] and tiers.llen("t") == 40
    assert [e.seq for e in await other.read("t")] == list(range(80))


async def test_trimming_refuses_what_the_archive_lacks(store: TieredCheckpointer,
                                                       tiers: Tiers) -> None:
    await fill(store, "t", 30)
    token = await store.hot.lease("t", 10)
    assert token is not None
    plan = await store.write_archive("t", 9)
    with pytest.raises(CheckpointError, match="archive ends at entry 9; not trimming"):
        await store.compact(plan._replace(upto=19), lease=token)
    # Taking the archive's end from the plan (as `archive_log` does) refuses the same way.
    assert plan.archived_end == 10
    with pytest.raises(CheckpointError, match="archive ends at entry 9; not trimming"):
        await store.compact(plan._replace(upto=19), lease=token, verified=True)
    assert tiers.llen("t") == 30
    assert await store.compact(plan, lease=token) == 10
    with pytest.raises(CheckpointError, match="log is shorter"):
        await store.hot.compact("t", 99, lease=token)


async def test_appends_after_compaction_get_the_next_seq(store: TieredCheckpointer,
                                                         tiers: Tiers) -> None:
    await fill(store, "t", 10)
    assert await store.archive_log("t") == 10 and tiers.llen("t") == 0  # all of it
    batch = [entry(10), entry(11)]
    assert await store.append("t", batch) == 11 and [e.seq for e in batch] == [10, 11]
    assert await store.append("t", [], [record("t:a:12:0")]) == -1
    assert await store.append("t", [entry(12)]) == 12
    assert steps(await store.read("t")) == list(range(13))
    # Concurrent appends while a segment is archived: none lost, none out of order.
    results = await asyncio.gather(store.archive_log("t", 11),
                                   *(store.append("t", [entry(13 + i)]) for i in range(50)))
    assert results[0] == 12 and sorted(results[1:]) == list(range(13, 63))
    assert [e.seq for e in await store.read("t")] == list(range(63))


async def test_fork_style_reads_into_the_archived_range(store: TieredCheckpointer) -> None:
    state = await fill(store, "t", 300, every=100)
    await store.archive_log("t", 199)
    assert steps(await store.read("t", upto=42)) == list(range(43))
    assert steps(await store.read("t", after=150, upto=210)) == list(range(151, 211))
    assert steps(await store.read("t", after=199, upto=199)) == []
    assert steps(await store.read("t", after=198, upto=200)) == [199, 200]
    # A restore to a point in the archive folds exactly what a never-archived log would.
    for upto in (42, 150, 199, 250):
        got, _ = await restore(store, "t", upto)
        want = TaskState()
        for e in (await store.read("t"))[: upto + 1]:
            apply(want, e)
        assert got.seq == upto and got.transcript == want.transcript
    full, _ = await restore(store, "t")
    assert full.transcript == state.transcript


async def test_a_finished_task_moves_ledger_and_snapshots_to_the_archive(
    store: TieredCheckpointer, tiers: Tiers
) -> None:
    state = await fill(store, "t", 150, every=50)
    book = await store.ledger("t")
    await store.hot.put_task(TaskRow(task_id="t", swarm="s", state="working"))
    await store.archive_task("t")  # unfinished: the log moves, ledger and snapshots stay
    assert tiers.llen("t") == 0 and tiers.raw.hlen(tiers.key("t", "ledger")) == 150
    assert tiers.raw.hlen(tiers.key("t", "snap")) == 3
    await store.hot.put_task(TaskRow(task_id="t", swarm="s", state="completed"))
    assert await store.archive_task("t") == {"t": 150}
    assert not tiers.raw.exists(tiers.key("t", "ledger"), tiers.key("t", "snap"))
    assert await store.ledger("t") == book
    assert await store.snapshots("t") == [149]
    got, problems = await restore(store, "t")
    assert problems == [] and got.transcript == state.transcript
    # A late ledger update in Redis still wins over the archived record.
    await store.append("t", [], [record("t:a:3:0", "finished", "late")])
    assert (await store.ledger("t"))["t:a:3:0"].result == "late"


async def test_a_finished_task_archived_again_after_a_run_cut_short_keeps_its_ledger(
    store: TieredCheckpointer, tiers: Tiers
) -> None:
    # The first run copies the ledger records and dies before trimming; Redis has no mark of
    # them, so the next run copies them again (a key's last row wins) and trims.
    await fill(store, "t", 20)
    book = await store.ledger("t")
    await store.hot.put_task(TaskRow(task_id="t", swarm="s", state="completed"))
    token = await store.hot.lease("t", 10)
    assert token is not None
    await store.write_archive("t", finished=True)
    await store.hot.release("t", token)
    assert tiers.raw.hlen(tiers.key("t", "ledger")) == 20
    assert await store.archive_log("t", finished=True) == 20
    assert not tiers.raw.exists(tiers.key("t", "ledger")) and tiers.llen("t") == 0
    assert await store.ledger("t") == book
    assert [e.seq for e in await store.read("t")] == list(range(20))


async def test_a_terminal_row_archives_the_task_and_its_agents_logs(tiers: Tiers) -> None:
    store = await tiers.open(archive_after=0)
    await fill(store, "t", 20)
    await fill(store, "t/writer", 30)
    await fill(store, "t/join", 5)
    await store.put_task(TaskRow(task_id="t", swarm="s", state="working"))
    await store.drain()
    assert tiers.llen("t") == 20  # nothing happens while it runs
    await store.put_task(TaskRow(task_id="t", swarm="s", state="completed"))
    await store.drain()
    assert [tiers.llen(t) for t in ("t", "t/writer", "t/join")] == [0, 0, 0]
    assert steps(await store.read("t/writer")) == list(range(30))
    assert len(await store.ledger("t/join")) == 5


async def test_a_snapshot_archives_up_to_the_previous_one(tiers: Tiers) -> None:
    store = await tiers.open(archive_after=100)
    await fill(store, "t", 150, every=50)  # snapshots at 49, 99, 149
    await store.drain()
    # At 99, only 50 entries preceded the snapshot before (49); at 149, 100 preceded 99.
    assert (await store.hot.bounds("t")).base == 100 and tiers.llen("t") == 50
    assert (await store.hot.bounds("t")).snapshot == 99
    await fill(store, "t", 100, every=50, first=150)  # snapshots at 199, 249
    await store.drain()
    assert (await store.hot.bounds("t")).base == 200
    assert steps(await store.read("t")) == list(range(250))
    assert len(await store.ledger("t")) == 250


async def test_delete_removes_both_tiers(store: TieredCheckpointer, tiers: Tiers) -> None:
    await fill(store, "t", 60, every=20)
    await fill(store, "t/writer", 10)
    await store.put_task(TaskRow(task_id="t", swarm="s", state="working"))
    await store.archive_log("t", 39)
    await store.archive_log("t/writer")
    assert tiers.segments("t") and tiers.segments("t%2Fwriter")
    await store.delete("t")
    assert not (tiers.root / "tasks" / "t").exists()
    assert not (tiers.root / "tasks" / "t%2Fwriter").exists()
    assert tiers.raw.keys(f"{tiers.prefix}:t:t*") == []
    assert await store.read("t") == [] and await store.snapshots("t") == []
    assert await store.get_task("t") is None and await store.list_tasks("s") == []
    assert await store.append("t", [entry(0)]) == 0  # the id starts afresh
    await store.delete("t")


async def test_compaction_frees_redis_memory(store: TieredCheckpointer, tiers: Tiers) -> None:
    await fill(store, "t", 400, every=100)
    before = tiers.raw.memory_usage(tiers.key("t", "log"), samples=0)
    await store.archive_log("t", 299)
    after = tiers.raw.memory_usage(tiers.key("t", "log"), samples=0)
    assert after < before / 3, (before, after)
    keys = tiers.raw.dbsize()
    await store.hot.put_task(TaskRow(task_id="t", swarm="s", state="completed"))
    await store.archive_task("t")
    assert tiers.raw.memory_usage(tiers.key("t", "log")) is None  # the list is gone
    assert tiers.raw.dbsize() < keys  # so are the ledger and snapshot hashes


async def test_a_missing_archive_is_an_error_not_a_shorter_log(store: TieredCheckpointer,
                                                               tiers: Tiers) -> None:
    await fill(store, "t", 20)
    await store.archive_log("t", 9)
    for p in (tiers.root / "tasks" / "t").glob("log-*"):
        p.unlink()
    with pytest.raises(CorruptRecord, match="task t: entry 0 is unusable: it is missing"):
        await store.read("t")
    assert steps(await store.read("t", after=9)) == list(range(10, 20))
    with pytest.raises(CorruptRecord, match="entry 0"):
        await store.archive_log("t")
    assert tiers.llen("t") == 10


async def test_one_archiver_at_a_time(tiers: Tiers) -> None:
    a, b = await tiers.open(), await tiers.open()
    await fill(a, "t", 500)
    results = await asyncio.gather(a.archive_log("t", 249), b.archive_log("t", 499))
    assert None in results  # the second found the lease taken and did nothing
    assert [e.seq for e in await b.read("t")] == list(range(500))
    assert await b.archive_log("t") == 500
    assert [e.seq for e in await a.read("t")] == list(range(500))


async def test_open_checkpointer_with_an_archive(redis_server: EmbeddedRedis,
                                                 tmp_path: Path) -> None:
    uri = (tmp_path / "archive").as_uri()
    for store in (open_checkpointer(redis_server.url, run_dir=tmp_path, archive=uri,
                                    archive_after=7),
                  open_checkpointer(f"{redis_server.url}|{uri}|7", run_dir=tmp_path)):
        assert isinstance(store, TieredCheckpointer) and store.archive_after == 7
        assert store.archive.uri == uri
    assert isinstance(open_checkpointer(redis_server.url, run_dir=tmp_path), RedisCheckpointer)
    with pytest.raises(ValueError, match="an archive needs a redis store"):
        open_checkpointer("memory", run_dir=tmp_path, archive=uri)


def test_state_config_archive() -> None:
    cfg = StateConfig(store="redis://h:6379/0", archive="s3://bucket/swarm", archive_after=500)
    assert cfg.archive == "s3://bucket/swarm" and cfg.archive_after == 500
    assert StateConfig().archive is None
    with pytest.raises(ValueError, match="archive"):
        StateConfig(store="memory", archive="file:///tmp/a")
    with pytest.raises(ValueError, match="archive"):
        StateConfig(archive="not a uri")


def test_finished_states_are_a2a_terminal_states() -> None:
    assert FINISHED == a2a.TERMINAL


async def test_snapshot_archived_with_the_segment(store: TieredCheckpointer) -> None:
    await store.append("t", [entry(i) for i in range(10)])
    await store.put_snapshot(Snapshot(task_id="t", seq=4, step=4, data={"n": 4}))
    await store.archive_log("t", 6)
    assert await store.archive.snapshots("t") == [4]
    assert (await store.get_snapshot("t", 4)).data == {"n": 4}  # type: ignore[union-attr]


async def test_a_corrupt_entry_after_compaction_is_named_by_its_seq(
    store: TieredCheckpointer, tiers: Tiers
) -> None:
    await fill(store, "t", 30)
    await store.archive_log("t", 19)
    tiers.raw.lset(tiers.key("t", "log"), 3, b"\xc1\x00garbage")  # seq 23: base 20 + index 3
    with pytest.raises(CorruptRecord, match="task t: entry 23 is unusable"):
        await store.read("t")
    assert steps(await store.read("t", upto=22)) == list(range(23))


async def test_archiving_a_corrupt_entry_names_it_and_trims_nothing(
    store: TieredCheckpointer, tiers: Tiers
) -> None:
    # Entries are copied to the archive as stored, not decoded and encoded again: one that
    # doesn't read as an entry is still found and named before anything is written.
    await fill(store, "t", 10)
    tiers.raw.lset(tiers.key("t", "log"), 4, b"\xc1\x00garbage")
    with pytest.raises(CorruptRecord, match="task t: entry 4 is unusable"):
        await store.archive_log("t", 9)
    assert tiers.llen("t") == 10 and tiers.segments("t") == []


def test_with_archive_round_trips_through_one_spec(tmp_path: Path) -> None:
    assert with_archive("redis://h:1/0", None) == "redis://h:1/0"
    spec = with_archive("redis://h:1/0", "file:///a", 50)
    store = open_checkpointer(spec, run_dir=tmp_path)
    assert isinstance(store, TieredCheckpointer) and store.archive_after == 50
    assert store.hot.url == "redis://h:1/0" and store.archive.uri == "file:///a"
    with pytest.raises(ValueError, match="archive_after"):
        open_checkpointer("redis://h:1/0|file:///a|soon", run_dir=tmp_path)


async def test_a_sweep_archives_finished_tasks_left_in_redis(tiers: Tiers) -> None:
    plain = await tiers.open(on_finish=False)  # as if the archive came later, or a run failed
    for task, state in (("done", "completed"), ("dead", "failed"), ("live", "working")):
        await fill(plain, task, 10)
        await plain.put_task(TaskRow(task_id=task, swarm="s", state=state))
    await fill(plain, "done/writer", 5)
    await plain.drain()
    assert [tiers.llen(t) for t in ("done", "dead", "live")] == [10, 10, 10]
    assert await plain.archive_finished("s") == 2
    assert [tiers.llen(t) for t in ("done", "done/writer", "dead", "live")] == [0, 0, 0, 10]
    assert not tiers.raw.exists(tiers.key("done", "ledger"))
    assert len(await plain.ledger("done")) == 10 and len(await plain.read("dead")) == 10
    assert await plain.archive_finished("s") == 0  # nothing left to do


async def test_a_sweep_goes_on_past_a_task_it_cannot_archive(
        tiers: Tiers, monkeypatch: pytest.MonkeyPatch) -> None:
    # It runs at every supervisor start: one task it can't archive must not keep the others
    # in Redis for good.
    plain = await tiers.open(on_finish=False)
    for task in ("a", "b", "c"):
        await fill(plain, task, 5)
        await plain.put_task(TaskRow(task_id=task, swarm="s", state="completed"))
    real = plain.archive_task

    async def flaky(task_id: str, **kw: object) -> object:
        if task_id == "b":
            raise CheckpointError("task b: entry 3 is unusable")
        return await real(task_id, **kw)

    monkeypatch.setattr(plain, "archive_task", flaky)
    assert await plain.archive_finished("s") == 2
    assert [tiers.llen(t) for t in ("a", "b", "c")] == [0, 5, 0]


def test_a_deployed_swarm_opens_its_store_with_the_archive(
        redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # resolve_store hands every actor one spec string: the archive must be in it, with a
    # relative file:// archive made absolute (actors run elsewhere).
    from swarm.config import parse_config
    from swarm.runtime.deploy import resolve_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWARM_STATE_STORE", raising=False)
    cfg = parse_config({
        "name": "arch",
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "x"}},
        "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"},
        "state": {"store": redis_server.url, "archive": "file://archive", "archive_after": 500},
    })
    spec, server = resolve_store(cfg)
    assert server is None
    assert spec == f"{redis_server.url}|{(tmp_path / 'archive').as_uri()}|500"
    store = open_checkpointer(spec, run_dir=tmp_path)
    assert isinstance(store, TieredCheckpointer)
