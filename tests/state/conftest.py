"""Fixtures for the state tests: every `Checkpointer` backend, with a hook to damage its bytes.

The Redis backend runs on a real redis-server (one per session, started by `EmbeddedRedis` in a
temporary directory) with a fresh key prefix per test; the tiered one is that Redis with an
Arrow archive in a temporary directory. Nothing here starts Ray.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conformance import Backend

from swarm.state.embedded import EmbeddedRedis
from swarm.state.interface import Checkpointer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A redis-server for the whole session, stopped at the end."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def _memory() -> AsyncIterator[Backend]:
    from swarm.state.memory import MemoryCheckpointer

    store = MemoryCheckpointer()

    def corrupt(task_id: str, what: str, data: bytes) -> None:
        kind, _, seq = what.partition(":")
        table = store.logs if kind == "entry" else store.snaps
        table[task_id][int(seq)] = data

    yield Backend(store, corrupt)


async def _redis(server: EmbeddedRedis) -> AsyncIterator[Backend]:
    import redis

    from swarm.state.redis import RedisCheckpointer

    prefix = f"test{uuid.uuid4().hex[:12]}"
    store = RedisCheckpointer(server.url, prefix=prefix)
    await store.start()
    raw = redis.Redis.from_url(server.url)

    def corrupt(task_id: str, what: str, data: bytes) -> None:
        kind, _, seq = what.partition(":")
        if kind == "entry":
            raw.lset(f"{prefix}:t:{task_id}:log", int(seq), data)
        else:
            raw.hset(f"{prefix}:t:{task_id}:snap", seq, data)

    try:
        yield Backend(store, corrupt)
    finally:
        await store.close()
        raw.close()


async def _tiered(server: EmbeddedRedis, root: Path) -> AsyncIterator[Backend]:
    """Redis with an Arrow archive; the hook damages the Redis copy (nothing is archived in
    the conformance tests, so every record is there)."""
    from swarm.state.arrow import ArrowCheckpointer
    from swarm.state.tiered import TieredCheckpointer

    async for hot in _redis(server):
        store = TieredCheckpointer(hot.store, ArrowCheckpointer(root.as_uri()))  # type: ignore[arg-type]
        await store.start()
        try:
            yield Backend(store, hot.corrupt)
        finally:
            await store.close()


async def _arrow(root: Path) -> AsyncIterator[Backend]:
    from swarm.state.arrow import ArrowCheckpointer

    store = ArrowCheckpointer(root.as_uri())
    await store.start()
    # The arrow backend owns its file layout, so it damages its own bytes if it can.
    from arrow_support import corrupter
    damage = corrupter(store)
    try:
        yield Backend(store, damage)
    finally:
        await store.close()


def _arrow_missing() -> bool:
    try:
        return importlib.util.find_spec("swarm.state.arrow") is None
    except ImportError:
        return True


@pytest.fixture(params=[
    "memory",
    "redis",
    pytest.param("arrow", marks=pytest.mark.skipif(
        _arrow_missing(), reason="swarm.state.arrow (ArrowCheckpointer) is not written yet")),
    "tiered",
])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh, started store of each backend, with its corruption hook."""
    if request.param == "memory":
        gen = _memory()
    elif request.param == "redis":
        gen = _redis(request.getfixturevalue("redis_server"))
    elif request.param == "tiered":
        gen = _tiered(request.getfixturevalue("redis_server"), tmp_path / "archive")
    else:
        gen = _arrow(tmp_path / "arrow")
    async for b in gen:
        yield b


@pytest.fixture
def checkpointer(backend: Backend) -> Checkpointer:
    """The backend's store."""
    return backend.store
