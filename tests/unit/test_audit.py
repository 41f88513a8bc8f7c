"""The audit log: entries for submissions, tool calls, approvals and task ends; the Redis stream,
its Parquet archive and `swarm audit`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from typer.testing import CliRunner

from swarm.config import parse_config
from swarm.governance.audit import RedisAuditLog, parse_since
from swarm.runtime.journal import args_hash
from swarm.state.embedded import EmbeddedRedis
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.unit import durable_tools as dt
from tests.unit.test_approvals import RULES


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("audit-redis"))
    server.start()
    yield server.url
    server.stop()


def make_cfg(tmp_path: Path, name: str = "audited") -> Any:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"rules": RULES}))
    return parse_config({
        "name": name,
        "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
        "tools": {"t": {"python": ["tests.unit.durable_tools:pay",
                                   "tests.unit.durable_tools:lookup"]}},
        "agents": {"a": {"model": "m", "tools": ["t"], "handoffs": ["b"]},
                   "b": {"model": "m"}},
        "supervisor": {"entry": "a"},
        "approvals": {"require": "listed", "tools": ["pay"]},
        "state": {"run_dir": str(tmp_path / "run")},
    }, base_dir=tmp_path)


async def test_a_gated_task_leaves_a_complete_trail(tmp_path: Path) -> None:
    dt.RUNS.clear()
    store = MemoryCheckpointer()
    async with LocalSwarm(make_cfg(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit("x", user="carol")
        rec = sw.supervisor.get(task_id)
        while not rec.gates:
            await asyncio.wait_for(rec.watch().wait(), 10)
        gid = next(iter(rec.gates))
        await sw.supervisor.approve(task_id, gid, approver="alice", args={"key": "edited"})
        await sw.supervisor.wait(task_id, 10)
        audit = sw.supervisor.audit
        assert audit is not None
        rows = await audit.read(task_id=task_id)
    trail = [(r["kind"], r.get("tool"), r.get("outcome")) for r in rows]
    assert trail == [
        ("task.submitted", None, None),
        ("tool", "lookup", "ok"),
        ("tool", "pay", "gated"),
        ("approval.requested", "pay", None),
        ("approval.approved", "pay", None),
        ("tool", "pay", "ok"),
        ("task.completed", None, None),
    ]
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["task.submitted"]["user"] == "carol"
    assert by_kind["approval.approved"]["by"] == "alice"
    assert by_kind["approval.approved"]["args_hash"] == args_hash(json.dumps({"key": "edited"}))
    assert rows[-2]["args_hash"] == args_hash(json.dumps({"key": "edited"}))  # what ran
    assert rows[1]["args_hash"] == args_hash(json.dumps({"key": "x-1"}))
    # The same trail after archiving to Parquet (the live log is then empty).
    path = await audit.archive()
    assert path is not None and path.suffix == ".parquet"
    assert path.parent == tmp_path / "run" / "audit" / "audited"
    assert await audit._live() == []
    again = await audit.read(task_id=task_id)
    assert [(r["kind"], r.get("tool"), r.get("outcome")) for r in again] == trail
    assert [r["kind"] for r in await audit.read(kind="approval")] == [
        "approval.requested", "approval.approved"]


async def test_the_stream_batches_caps_archives_and_trims(redis_url: str, tmp_path: Path
                                                          ) -> None:
    log = RedisAuditLog(redis_url, "streamed", tmp_path, max_len=100, flush_interval_s=0.01)
    raw = redis.Redis.from_url(redis_url)
    try:
        for i in range(5):
            log.record("tool", task_id=f"t{i % 2}", tool="pay", outcome="ok")
        assert raw.xlen(log.key) == 0  # recording does no I/O: entries wait for a flush
        await log.flush()
        assert raw.xlen(log.key) == 5
        assert [r["task_id"] for r in await log.read(task_id="t1")] == ["t1", "t1"]
        path = await log.archive()
        assert path is not None and raw.xlen(log.key) == 0
        log.record("task.failed", task_id="t0", error_class="budget", detail="budget exhausted")
        rows = await log.read(task_id="t0")
        assert [r["kind"] for r in rows] == ["tool", "tool", "tool", "task.failed"]
        assert rows[-1]["error_class"] == "budget"
        for _ in range(500):
            log.record("tool", task_id="many", tool="x", outcome="ok")
        await log.flush()
        assert raw.xlen(log.key) < 400  # MAXLEN ~ 100 keeps the stream bounded
    finally:
        await log.aclose()
        raw.close()


async def test_a_large_batch_is_written_whole_and_in_order_after_a_script_flush(
        redis_url: str, tmp_path: Path) -> None:
    """More entries than one script call takes, to a server that has forgotten its scripts (as
    a restarted one has): every entry once, in order."""
    from swarm.governance.audit import _PER_SCRIPT

    log = RedisAuditLog(redis_url, "big", tmp_path, max_len=10_000)
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.script_flush()
        n = 2 * _PER_SCRIPT + 34
        for i in range(n):
            log.record("tool", task_id="big", tool="x", outcome="ok", detail=str(i))
        await log.flush()
        assert raw.xlen(log.key) == n
        assert [r["detail"] for r in await log.read(task_id="big")] == [str(i) for i in range(n)]
    finally:
        await log.aclose()
        raw.close()


class _HeldReplies:
    """A TCP proxy on loopback in front of a Redis server whose replies can be held back
    (`hold`): the server has done the work, the client hears nothing, as when a reply is lost
    in a stall or a dropped connection."""

    def __init__(self, target: str) -> None:
        self.host, port = target.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        self.port = int(port)
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(self.host, self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool
                       ) -> None:
            try:
                while data := await src.read(65536):
                    if gated:
                        await self.open.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))

    async def close(self) -> None:
        self.open.set()
        if self.server is not None:
            self.server.close()


async def test_a_batch_whose_reply_was_lost_is_not_written_twice(redis_url: str,
                                                                 tmp_path: Path) -> None:
    """The server wrote the batch but its reply never came (the client timed out): the next
    flush sends the batch again, and the stream still holds each entry once."""
    from swarm.governance._redis import FastRedis

    proxy = _HeldReplies(redis_url)
    log = RedisAuditLog(await proxy.start(), "lost-reply", tmp_path, flush_interval_s=60)
    log.redis = FastRedis(log.redis.url, timeout_s=0.3)
    raw = redis.Redis.from_url(redis_url)
    try:
        log.record("task.submitted", task_id="t0")
        await log.flush()  # loads the script
        assert raw.xlen(log.key) == 1
        log.record("tool", task_id="t1", tool="pay", outcome="ok")
        proxy.open.clear()
        await log.flush()  # written, but the reply is held: the client gives up, keeps it
        assert raw.xlen(log.key) == 2
        proxy.open.set()
        await log.flush()  # sent again, with the same mark
        assert raw.xlen(log.key) == 2
        assert [(r["kind"], r["task_id"]) for r in await log.read()] == [
            ("task.submitted", "t0"), ("tool", "t1")]
        log.record("tool", task_id="t2", tool="pay", outcome="ok")
        await log.flush()  # and the next batch is written as usual
        assert raw.xlen(log.key) == 3
    finally:
        await log.aclose()
        await proxy.close()
        raw.close()


async def test_refused_batches_are_kept_while_the_server_cant_write_and_dropped_if_for_good(
        redis_url: str, tmp_path: Path) -> None:
    """A server that can't take writes for now (a replica during a failover) keeps the batch
    for the next flush, bounded; one refused for good (the key holds something else) is
    dropped and counted, not sent again at every flush ahead of the ones after it."""
    import socket

    log = RedisAuditLog(redis_url, "refused", tmp_path, max_len=3, flush_interval_s=60)
    raw = redis.Redis.from_url(redis_url)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nobody = s.getsockname()[1]
        raw.execute_command("REPLICAOF", "127.0.0.1", nobody)
        try:
            for i in range(5):
                log.record("tool", task_id=f"r{i}", tool="x", outcome="ok")
                await log.flush()  # READONLY: kept (the oldest beyond max_len dropped)
        finally:
            raw.execute_command("REPLICAOF", "NO", "ONE")
        assert log.dropped == 2 and raw.xlen(log.key) == 0
        await log.flush()
        assert [r["task_id"] for r in await log.read()] == ["r2", "r3", "r4"]
        raw.delete(log.key)
        raw.set(log.key, "not a stream")
        log.record("tool", task_id="w", tool="x", outcome="ok")
        await log.flush()  # WRONGTYPE: dropped, counted, no error
        assert log.dropped == 3
        raw.delete(log.key)
        log.record("tool", task_id="after", tool="x", outcome="ok")
        await log.flush()
        assert [r["task_id"] for r in await log.read()] == ["after"]
    finally:
        await log.aclose()
        raw.close()


def test_swarm_audit_prints_the_log(redis_url: str, tmp_path: Path) -> None:
    from swarm.cli import app

    async def write() -> None:
        log = RedisAuditLog(redis_url, "printed", tmp_path)
        log.record("task.submitted", task_id="task-aaa", user="carol", detail="pay bob")
        log.record("approval.denied", task_id="task-aaa", gate="a-2-0", tool="pay", by="alice")
        log.record("task.submitted", task_id="task-bbb", user="dave")
        await log.aclose()

    asyncio.run(write())
    runner = CliRunner()
    res = runner.invoke(app, ["audit", "printed", "--store", redis_url, "--archive-dir",
                              str(tmp_path), "--task", "task-aaa", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["kind"] for r in rows] == ["task.submitted", "approval.denied"]
    assert rows[1]["by"] == "alice"
    res = runner.invoke(app, ["audit", "printed", "--store", redis_url, "--archive-dir",
                              str(tmp_path), "--archive", "--kind", "task", "--json"])
    assert res.exit_code == 0, res.output
    assert [r["task_id"] for r in json.loads(res.output)] == ["task-aaa", "task-bbb"]
    assert list((tmp_path / "printed").glob("*.parquet"))  # archived, and still read
    res = runner.invoke(app, ["audit", "printed", "--store", redis_url, "--archive-dir",
                              str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "audit log of printed" in res.output
    assert "approval.denied" in res.output and "by alice" in res.output
    res = runner.invoke(app, ["audit", "printed", "--store", redis_url, "--since", "yesterday"])
    assert res.exit_code == 2 and "expected an age such as 30m" in res.output


def test_since_accepts_ages_and_iso_times() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("30m", now=10_000.0) == 10_000.0 - 1800
    assert parse_since("2026-01-01T00:00:00+00:00") == 1767225600.0


def test_an_entry_msgspec_refuses_is_still_written_as_json() -> None:
    """Entries are encoded with msgspec; a lone surrogate (undecodable bytes carried in an error
    text) or an odd value goes through json.dumps instead of losing the batch."""
    import json

    from swarm.governance.audit import _entry

    plain = {"ts": 1.5, "kind": "tool", "detail": "ok"}
    assert json.loads(_entry(plain)) == plain
    odd = {"ts": 1.5, "kind": "tool", "detail": "bad \udcff byte", "extra": object()}
    back = json.loads(_entry(odd))
    assert back["detail"] == "bad \udcff byte" and back["extra"].startswith("<object")
