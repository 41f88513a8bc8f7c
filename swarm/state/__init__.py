"""Durable state: the `Checkpointer` interface, its backends, and log replay."""

from __future__ import annotations

from pathlib import Path

from swarm.state.interface import (
    Checkpointer,
    CorruptRecord,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)

__all__ = [
    "Checkpointer",
    "CorruptRecord",
    "LedgerRecord",
    "LogEntry",
    "Snapshot",
    "StoreUnavailable",
    "TaskRow",
    "open_checkpointer",
]


def open_checkpointer(spec: str, *, run_dir: Path) -> Checkpointer:
    """The checkpointer a store spec names (not yet started).

    `memory`; `embedded` (a private redis-server under `run_dir`, started if needed);
    `redis://`, `rediss://` or `unix://` URLs; any other `scheme://` URI is a pyarrow
    filesystem for `ArrowCheckpointer` (`file://`, `s3://`, ...).
    """
    spec = spec.strip()
    if spec == "memory":
        from swarm.state.memory import MemoryCheckpointer

        return MemoryCheckpointer()
    if spec == "embedded":
        from swarm.state.embedded import EmbeddedRedis

        server = EmbeddedRedis.for_run_dir(run_dir)
        server.start()
        spec = server.url
    scheme, sep, rest = spec.partition("://")
    if sep and scheme.lower() in ("redis", "rediss", "unix"):
        from swarm.state.redis import RedisCheckpointer

        return RedisCheckpointer(spec)
    if sep and scheme and rest and scheme.replace("+", "").replace("-", "").isalnum():
        from swarm.state.arrow import ArrowCheckpointer

        return ArrowCheckpointer(spec)
    raise ValueError(
        f"unknown state store {spec!r}: expected 'memory', 'embedded', a redis://, rediss:// "
        "or unix:// URL, or a pyarrow filesystem URI such as file:///path or s3://bucket/path"
    )
