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
    "with_archive",
]

DEFAULT_ARCHIVE_AFTER = 1000


def with_archive(spec: str, archive: str | None, archive_after: int = DEFAULT_ARCHIVE_AFTER,
                 ) -> str:
    """One spec string naming a store and its archive (`store|archive|archive_after`), for
    `open_checkpointer` in processes that get only the spec (`SWARM_STATE_STORE`, actors)."""
    return spec if not archive else f"{spec}|{archive}|{archive_after}"


def open_checkpointer(spec: str, *, run_dir: Path, archive: str | None = None,
                      archive_after: int = DEFAULT_ARCHIVE_AFTER,
                      outage_timeout_s: float | None = None) -> Checkpointer:
    """The checkpointer a store spec names (not yet started).

    `memory`; `embedded` (a private redis-server under `run_dir`, started if needed);
    `redis://`, `rediss://` or `unix://` URLs; any other `scheme://` URI is a pyarrow
    filesystem for `ArrowCheckpointer` (`file://`, `s3://`, ...).

    With `archive` (a pyarrow filesystem URI; or in the spec, as `with_archive` writes it) the
    Redis store gets an Arrow archive behind it: a `TieredCheckpointer` that moves a task's
    older log segments there once `archive_after` entries precede its previous snapshot, and
    the whole task once it finishes.

    `outage_timeout_s` (`state.outage_timeout_s`; None: the store's default) is how long an
    operation on a Redis store waits for an unreachable server before it raises
    `StoreUnavailable`.
    """
    spec, _, rest = (part.strip() for part in spec.strip().partition("|"))
    if rest:
        archive, _, after = (part.strip() for part in rest.partition("|"))
        if after and not after.isdigit():
            raise ValueError(f"state store spec: {after!r} after the archive should be the "
                             "number of entries to archive after (archive_after)")
        archive_after = int(after) if after else archive_after
    if archive and spec != "embedded" and \
            spec.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
        raise ValueError(f"an archive needs a redis store (embedded, redis://...), not {spec!r}")
    store = _open(spec, run_dir, outage_timeout_s)
    if not archive:
        return store
    from swarm.state.arrow import ArrowCheckpointer
    from swarm.state.tiered import TieredCheckpointer

    return TieredCheckpointer(store, ArrowCheckpointer(archive),  # type: ignore[arg-type]
                              archive_after=archive_after)


def _open(spec: str, run_dir: Path, outage_timeout_s: float | None = None) -> Checkpointer:
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
        from swarm._urls import redis_url_problem
        from swarm.state.redis import RedisCheckpointer

        problem = redis_url_problem(spec)
        if problem is not None:
            raise ValueError(f"state store: {problem}")

        if outage_timeout_s is None:
            return RedisCheckpointer(spec)
        return RedisCheckpointer(spec, outage_timeout_s=outage_timeout_s)
    if sep and scheme and rest and scheme.replace("+", "").replace("-", "").isalnum():
        from swarm.state.arrow import ArrowCheckpointer

        return ArrowCheckpointer(spec)
    raise ValueError(
        f"unknown state store {spec!r}: expected 'memory', 'embedded', a redis://, rediss:// "
        "or unix:// URL, or a pyarrow filesystem URI such as file:///path or s3://bucket/path"
    )
