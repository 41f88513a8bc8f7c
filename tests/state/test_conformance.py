"""The `Checkpointer` conformance suite: every backend runs these same tests.

Backends: memory, and Redis on a real redis-server process (no Ray here).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from swarm.state.interface import (
    Checkpointer,
    CorruptRecord,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("conformance"))
    server.start()
    yield server.url
    server.stop()


Corrupt = Callable[[str, str, bytes], None]


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Checkpointer, Corrupt]]:
    """A fresh store, and a hook that overwrites a stored record's bytes (for corruption)."""
    if request.param == "memory":
        from swarm.state.memory import MemoryCheckpointer

        mem = MemoryCheckpointer()

        def corrupt_mem(task_id: str, what: str, data: bytes) -> None:
            kind, _, index = what.partition(":")
            if kind == "entry":
                mem.logs[task_id][int(index)] = data
            else:
                mem.snaps[task_id][int(index)] = data

        yield mem, corrupt_mem
        return
    import redis as sync_redis

    from swarm.state.redis import RedisCheckpointer

    url = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisCheckpointer(url, prefix=prefix)
    await store.start()
    raw = sync_redis.Redis.from_url(url)

    def corrupt_redis(task_id: str, what: str, data: bytes) -> None:
        kind, _, index = what.partition(":")
        if kind == "entry":
            raw.lset(f"{prefix}:t:{task_id}:log", int(index), data)
        else:
            raw.hset(f"{prefix}:t:{task_id}:snap", index, data)

    yield store, corrupt_redis
    await store.close()


def entry(step: int, text: str = "x") -> LogEntry:
    return LogEntry(kind="tool", agent="a", step=step, ts=1.0,
                    data={"message": {"role": "tool", "content": text}, "index": 0})


async def test_append_assigns_consecutive_seqs(backend) -> None:
    store, _ = backend
    assert await store.append("t", [entry(1), entry(2)]) == 1
    assert await store.append("t", [entry(3)]) == 2
    assert await store.append("t", []) == -1
    got = await store.read("t")
    assert [e.seq for e in got] == [0, 1, 2] and [e.step for e in got] == [1, 2, 3]
    assert [e.step for e in await store.read("t", after=0)] == [2, 3]
    assert [e.step for e in await store.read("t", after=-1, upto=1)] == [1, 2]
    assert await store.read("t", after=5) == []
    assert await store.read("unknown") == []


async def test_ledger_is_written_with_the_entries(backend) -> None:
    store, _ = backend
    started = LedgerRecord(key="t:a:1:0", state="started", tool="pay", args_hash="h")
    await store.append("t", [entry(1)], [started])
    assert (await store.ledger("t"))["t:a:1:0"].state == "started"
    done = LedgerRecord(key="t:a:1:0", state="finished", tool="pay", result="ok")
    await store.append("t", [entry(2)], [done])
    book = await store.ledger("t")
    assert list(book) == ["t:a:1:0"] and book["t:a:1:0"].result == "ok"
    assert len(await store.read("t")) == 2


async def test_concurrent_appenders_lose_nothing(backend) -> None:
    store, _ = backend
    seqs = await asyncio.gather(*(store.append("t", [entry(i, str(i))]) for i in range(100)))
    assert sorted(seqs) == list(range(100))
    texts = sorted(int(e.data["message"]["content"]) for e in await store.read("t"))
    assert texts == list(range(100))


async def test_tasks_are_isolated_and_delete_removes_one(backend) -> None:
    store, _ = backend
    for task in ("t1", "t2"):
        await store.append(task, [entry(1)], [LedgerRecord(key=f"{task}:k", state="started",
                                                           tool="x")])
        await store.put_snapshot(Snapshot(task_id=task, seq=0, step=1, data={"a": 1}))
        await store.put_task(TaskRow(task_id=task, swarm="s", state="working"))
    await store.delete("t1")
    assert await store.read("t1") == [] and await store.ledger("t1") == {}
    assert await store.snapshots("t1") == [] and await store.get_task("t1") is None
    assert len(await store.read("t2")) == 1 and await store.snapshots("t2") == [0]
    assert [r.task_id for r in await store.list_tasks("s")] == ["t2"]


async def test_snapshots_keep_the_newest(backend) -> None:
    store, _ = backend
    for seq in (9, 19, 29, 39):
        await store.put_snapshot(Snapshot(task_id="t", seq=seq, step=seq, data={"n": seq}),
                                 keep=3)
    assert await store.snapshots("t") == [19, 29, 39]
    snap = await store.get_snapshot("t", 29)
    assert snap is not None and snap.data == {"n": 29}
    assert await store.get_snapshot("t", 9) is None


async def test_task_rows_by_swarm(backend) -> None:
    store, _ = backend
    await store.put_task(TaskRow(task_id="a", swarm="s1", state="working", data={"x": b"\x00"}))
    await store.put_task(TaskRow(task_id="b", swarm="s2", state="completed"))
    await store.put_task(TaskRow(task_id="a", swarm="s1", state="completed"))
    row = await store.get_task("a")
    assert row is not None and row.state == "completed"
    assert [r.task_id for r in await store.list_tasks("s1")] == ["a"]
    assert await store.list_tasks("nobody") == []


async def test_large_payload_round_trips(backend) -> None:
    store, _ = backend
    big = "y" * 1_000_000
    await store.append("t", [entry(1, big)])
    (got,) = await store.read("t")
    assert got.data["message"]["content"] == big


async def test_corrupt_and_unknown_version_records_are_named(backend) -> None:
    import msgspec

    store, corrupt = backend
    await store.append("t", [entry(1), entry(2)])
    await store.put_snapshot(Snapshot(task_id="t", seq=1, step=2, data={}))
    corrupt("t", "entry:1", b"\xc1\x00")
    with pytest.raises(CorruptRecord, match="task t: entry 1 is unusable"):
        await store.read("t")
    assert len(await store.read("t", upto=0)) == 1
    corrupt("t", "snap:1", msgspec.msgpack.encode(
        Snapshot(task_id="t", seq=1, step=2, data={}, v=99)))
    with pytest.raises(CorruptRecord, match=r"snapshot at entry 1.*format version 99"):
        await store.get_snapshot("t", 1)


async def test_unreachable_redis_is_a_clear_error() -> None:
    from swarm.state.redis import RedisCheckpointer

    store = RedisCheckpointer("redis://:secret@127.0.0.1:9/0", outage_timeout_s=0.2,
                              socket_timeout_s=0.5)
    with pytest.raises(StoreUnavailable) as ei:
        await store.start()
    assert "127.0.0.1:9" in str(ei.value) and "secret" not in str(ei.value)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.append("t", [entry(1)])
    await store.close()


async def test_redis_outage_waits_and_loses_nothing(tmp_path: Path, caplog) -> None:
    """Redis goes away mid-run: appends wait (with one alert) and land once it is back."""
    from swarm.state.embedded import EmbeddedRedis
    from swarm.state.redis import RedisCheckpointer

    server = EmbeddedRedis(tmp_path)
    server.start()
    port = server.port
    store = RedisCheckpointer(server.url, outage_timeout_s=30)
    await store.append("t", [entry(1)])
    server.stop()
    pending = asyncio.create_task(store.append("t", [entry(2)]))
    await asyncio.sleep(0)  # let the append hit the dead server before it comes back
    assert not pending.done()
    # Same directory: the append-only file brings entry 1 back; same port: same URL.
    (tmp_path / "redis" / "redis.port").unlink(missing_ok=True)
    restarted = EmbeddedRedis(tmp_path)
    import swarm.state.embedded as emb

    real_free_port = emb._free_port
    emb._free_port = lambda: port  # type: ignore[assignment]
    try:
        await asyncio.to_thread(restarted.start)
    finally:
        emb._free_port = real_free_port  # type: ignore[assignment]
    assert await asyncio.wait_for(pending, 30) == 1
    assert [e.step for e in await store.read("t")] == [1, 2]
    assert any("unreachable" in r.message for r in caplog.records)
    await store.close()
    restarted.stop()
