"""The usage and cost ledger: one row per model call and per tool call, as Parquet.

The agent's metering layer (swarm.observability.metering) records each call; a `UsageLedger`
pulls the records (`extend_calls`: the layer turns them into Arrow columns itself, at write time)
or takes rows (`add`: tuples in `COLUMNS` order, the memory service's embedding calls), and a
background task writes them in batches, every `usage.flush_interval_s`, soon after a turn ends
and at shutdown, never on the step path. A batch becomes one Parquet file per day,
`<usage.dir>/day=YYYY-MM-DD/part-*.parquet` (hive partitioning), on the local disk or any
pyarrow filesystem URI (`s3://bucket/usage`). With a Redis state store the same batch adds to
running totals in Redis, one pipeline of HINCRBYFLOAT per batch: hash
`<prefix>:usage:<swarm>:<dim>:<value>` (dim: swarm, role, user, model) with fields cost_usd,
input_tokens, output_tokens, cached_tokens, model_calls, tool_calls, errors.

`usage_table` reads the dataset back with pyarrow.dataset, the day and time filters pushed down to
the files, and sums it by role, user, swarm or model (`swarm usage`, `SwarmClient.usage`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from swarm.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)
# Call records buffered before they become Arrow columns, when they arrive off the event loop
# (from the tracing sink's thread): a record's tuple and its numbers take about twice the
# memory of its columns, and converting a few thousand at a time spares the writer one large
# conversion at the end of a busy period.
CONVERT_EVERY = 4096
# Rows per Parquet row group: the writer holds a whole group's encoded pages until it ends.
ROW_GROUP = 8192
_WARMED = False  # pyarrow warmed up in this process (`UsageLedger.warm_up_once`)
_WARM_LOCK = threading.Lock()

# A row's fields, in order (the metering layer builds the tuples).
COLUMNS = ("ts", "task_id", "user", "swarm", "role", "kind", "model", "tool", "step",
           "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "latency_ms", "outcome",
           "error_class")
BY = ("role", "user", "swarm", "model")
SUMS = ("model_calls", "tool_calls", "input_tokens", "output_tokens", "cached_tokens",
        "cost_usd", "errors")


def schema() -> pa.Schema:
    """The Parquet schema of ledger files (`day` is the partition, not a column)."""
    import pyarrow as pa

    return pa.schema([
        ("ts", pa.timestamp("us", tz="UTC")), ("task_id", pa.string()), ("user", pa.string()),
        ("swarm", pa.string()), ("role", pa.string()),
        ("kind", pa.string()),  # model | tool
        ("model", pa.string()),  # the model's config name; null on tool rows
        ("tool", pa.string()),  # null on model rows
        ("step", pa.int32()), ("input_tokens", pa.int64()), ("output_tokens", pa.int64()),
        ("cached_tokens", pa.int64()), ("cost_usd", pa.float64()), ("latency_ms", pa.float64()),
        ("outcome", pa.string()),  # ok | error | canceled
        ("error_class", pa.string()),  # null unless outcome is error
    ])


def default_location(cfg: Any) -> str:
    """Where a swarm's ledger goes: `usage.dir`, else `<state.run_dir>/usage`, a local path made
    absolute against the working directory (so every actor writes to the same place)."""
    loc = cfg.usage.dir or str(Path(cfg.state.run_dir) / "usage")
    return loc if "://" in loc else str(Path(loc).resolve())


def pin_location(cfg: Any) -> Any:
    """The config with `usage.dir` resolved (done where a swarm is deployed)."""
    if not cfg.usage.enabled:
        return cfg
    return cfg.model_copy(update={"usage": cfg.usage.model_copy(
        update={"dir": default_location(cfg)})})


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    import pyarrow.fs as pafs

    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:
            raise UserError(f"usage.dir {location!r} is not a usable filesystem URI: {exc}"
                            ) from None
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def _redis_url(store: Any) -> tuple[str, str] | None:
    """(URL, key prefix) of a Redis state store (also the hot tier of a tiered one)."""
    for candidate in (store, getattr(store, "hot", None)):
        url = getattr(candidate, "url", None)
        if isinstance(url, str) and url.split("://", 1)[0].lower() in ("redis", "rediss", "unix"):
            return url, str(getattr(candidate, "prefix", "swarm"))
    return None


def _wait_for(lock: threading.Lock) -> None:
    with lock:
        pass


def _by_source(calls: list[tuple[CallSource, list[tuple[Any, ...]], list[float]]]
               ) -> list[tuple[CallSource, list[tuple[Any, ...]], list[float]]]:
    """Each source's batches of records as one (source, records, costs): new lists where a
    source has several, so the batches stay as they are should a conversion fail."""
    by_source: dict[int, list[Any]] = {}
    for call in calls:
        by_source.setdefault(id(call[0]), []).append(call)
    out = []
    for batches in by_source.values():
        if len(batches) == 1:
            out.append(batches[0])
        else:
            out.append((batches[0][0], [r for b in batches for r in b[1]],
                        [c for b in batches for c in b[2]]))
    return out


class UsageLedger:
    """Buffers ledger rows and writes them in batches from a background task."""

    def __init__(self, location: str, *, flush_interval_s: float = 10.0,
                 max_buffered_rows: int = 50_000, redis: tuple[str, str] | None = None) -> None:
        self.location = location
        self.fs, self.root = _filesystem(location)
        # Now, at start-up, rather than in the first flush (under the GIL, beside the steps).
        import pyarrow.compute
        import pyarrow.parquet  # noqa: F401
        self.flush_interval_s = flush_interval_s
        self.max_buffered_rows = max_buffered_rows
        # Flushes asked for by turn ends coalesce: at most one per this many seconds.
        self.min_gap_s = min(1.0, flush_interval_s)
        self.rows: list[tuple[Any, ...]] = []
        # (source, records, costs) from `extend_calls`: converted by the source when written,
        # or earlier, CONVERT_EVERY at a time, into `tables`.
        self.calls: list[tuple[CallSource, list[tuple[Any, ...]], list[float]]] = []
        self._in_calls = 0  # records in `calls`
        self.tables: list[pa.Table] = []  # converted call records waiting to be written
        self.convert_every = CONVERT_EVERY
        self._early = True  # off after an early conversion failed, until the next flush
        self._converting = threading.Lock()  # held while records are out being converted
        self._queued = False  # a conversion is queued on the converter thread
        self._converter: Any = None  # that thread (a one-worker executor), made when needed
        self._buffered = 0  # rows plus records
        self._rows_lock = threading.Lock()  # rows come from the event loop and drain threads
        # Called before each flush to pull rows recorded elsewhere (the metering layers').
        self.sources: list[Callable[[], None]] = []
        self.files_written = 0
        self.rows_written = 0
        self.rows_dropped = 0
        self._redis_spec = redis
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._seq = 0

    @staticmethod
    def warm_up_once(source: CallSource | None = None,
                     sample: list[tuple[Any, ...]] | None = None) -> None:
        """`warm_up`, in a thread of its own, the first time it is asked for in this process
        (a process's agent hosts share pyarrow)."""
        global _WARMED
        with _WARM_LOCK:
            if _WARMED:
                return
            _WARMED = True
        threading.Thread(target=UsageLedger.warm_up, args=(source, sample),
                         name="usage-warm-up", daemon=True).start()

    @staticmethod
    def warm_up(source: CallSource | None = None,
                sample: list[tuple[Any, ...]] | None = None) -> None:
        """Convert and write a one-row batch to memory, as a flush would (`source`'s records
        too, given a `sample` of them): pyarrow sets up its compute kernels and Parquet
        writer on first use, about 10 MB and tens of milliseconds once per process, which a
        replica then pays at start-up, not in its first flush beside busy sessions. Nothing
        is written to the ledger; a failure is logged, and the real flush meets it again."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parts = [to_table([(time.time(), "warm-up", None, "swarm", "role", "model", "m",
                                None, 0, 1, 1, 0, 0.0, 0.0, "ok", None)])]
            if source is not None and sample:
                parts.append(source.ledger_table(sample, [0.0] * len(sample)))
            table = pa.concat_tables(parts)
            _combos(table)
            pq.write_table(table, pa.BufferOutputStream(), **_PARQUET)
        except Exception:
            log.warning("usage ledger: warming up pyarrow failed", exc_info=True)

    # -- hot path --------------------------------------------------------------------------

    def add(self, row: tuple[Any, ...]) -> None:
        """Buffer one row (an append; the writer task starts on the first one)."""
        with self._rows_lock:
            self.rows.append(row)
            self._buffered += 1
            full = self._buffered >= self.max_buffered_rows
        if self._task is None or self._task.done():
            self._start()
        if full:
            self.kick()

    def extend_calls(self, source: CallSource, records: list[tuple[Any, ...]],
                     costs: list[float]) -> None:
        """Buffer a source's call records as they are, from any thread; when they are written,
        `source.ledger_table(records, costs)` makes their rows as Arrow columns (a source's
        batches written together are converted in one call). Cheap: see `convert_soon`."""
        with self._rows_lock:
            self.calls.append((source, records, costs))
            self._buffered += len(records)
            self._in_calls += len(records)

    def convert_soon(self) -> None:
        """Once `convert_every` records are buffered, have the ledger's converter thread make
        them Arrow tables (the caller never waits for it)."""
        with self._rows_lock:
            due = self._early and not self._queued and self._in_calls >= self.convert_every
            if due:
                self._queued = True
        if due:
            if self._converter is None:
                from concurrent.futures import ThreadPoolExecutor

                self._converter = ThreadPoolExecutor(1, thread_name_prefix="usage-convert")
            try:
                self._converter.submit(self._convert)
            except RuntimeError:  # the interpreter is shutting down: the writer converts
                with self._rows_lock:
                    self._queued = False

    def _convert(self) -> None:
        """Turn the buffered call records into Arrow tables now (the converter thread); on
        failure they stay records, for the writer to try."""
        with self._converting:
            with self._rows_lock:
                self._queued = False
                calls, self.calls, self._in_calls = self.calls, [], 0
            if not calls:
                return
            try:
                tables = [source.ledger_table(records, costs)
                          for source, records, costs in _by_source(calls)]
            except Exception:
                log.warning("usage ledger: converting %d call records early failed; the "
                            "writer will try", sum(len(c[1]) for c in calls), exc_info=True)
                with self._rows_lock:
                    self._early = False
                    self.calls[:0] = calls
                    self._in_calls += sum(len(c[1]) for c in calls)
                return
            converted = sum(t.num_rows for t in tables)
            with self._rows_lock:
                self.tables.extend(tables)
                # Rows a source left out (calls stopped before they ran) are not waiting.
                self._buffered -= sum(len(c[1]) for c in calls) - converted

    def kick(self) -> None:
        """Ask the writer to flush soon (at a turn's end), without waiting for it."""
        if self._wake is not None and (self.rows or self.calls or self.tables or self.sources):
            self._wake.set()

    # -- background ------------------------------------------------------------------------

    def _start(self) -> None:
        self._wake = asyncio.Event()
        if self._lock is None:  # one lock for the ledger's life: flushes never overlap
            self._lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        # Until `aclose` lets go of this writer (or a restart replaces it).
        while self._task is asyncio.current_task():
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns normally when
            # the wake-up and a cancel land together, and the cancel (from `aclose`) is lost.
            try:
                async with asyncio.timeout(self.flush_interval_s):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            await self.flush()
            await asyncio.sleep(self.min_gap_s)

    async def flush(self) -> int:
        """Write the buffered rows now (Parquet in a thread, then the Redis totals); returns
        how many were written. A failed write keeps the rows for the next flush, up to
        `max_buffered_rows` more; beyond that the oldest are dropped and counted."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            for drain in list(self.sources):
                drain()
            # Records out being converted are waited for, in a thread (the loop never blocks
            # on a conversion; a cancelled wait leaves nothing held). One that starts after
            # this takes what is buffered now and leaves its tables to the next flush.
            while self._converting.locked():
                await asyncio.to_thread(_wait_for, self._converting)
            with self._rows_lock:
                self._early = True
                rows, self.rows = self.rows, []
                calls, self.calls, self._in_calls = self.calls, [], 0
                tables, self.tables = self.tables, []
                self._buffered = 0
            if not rows and not calls and not tables:
                return 0
            try:
                n, files, combos = await asyncio.to_thread(self._write, rows, calls, tables)
            except Exception:
                log.warning("usage ledger: writing %d rows under %s failed; will retry",
                            len(rows) + sum(len(c[1]) for c in calls)
                            + sum(t.num_rows for t in tables), self.location, exc_info=True)
                self._keep(rows, calls, tables)
                return 0
            self.files_written += files
            self.rows_written += n
            if combos:
                try:
                    await self._add_totals(combos)
                except Exception:
                    log.warning("usage ledger: Redis totals for %d rows failed", n,
                                exc_info=True)
            return n

    def _keep(self, rows: list[tuple[Any, ...]],
              calls: list[tuple[CallSource, list[tuple[Any, ...]], list[float]]],
              tables: Sequence[pa.Table] = ()) -> None:
        """Put a batch that failed back in front of what came since, keeping at most
        `max_buffered_rows` rows and call records: the newest rows (few: the memory service's)
        first, then the newest whole batches of records that fit, then the newest converted
        tables that fit; the rest are dropped and counted (as records: a stopped call's would
        not have become a row)."""
        room = self.max_buffered_rows
        keep = rows[len(rows) - room:] if room < len(rows) else rows
        room -= len(keep)
        kept_calls: list[tuple[CallSource, list[tuple[Any, ...]], list[float]]] = []
        for call in reversed(calls):
            if len(call[1]) <= room:
                kept_calls.append(call)
                room -= len(call[1])
        kept_calls.reverse()
        kept_tables = []
        for table in reversed(tables):
            if table.num_rows <= room:
                kept_tables.append(table)
                room -= table.num_rows
        kept_tables.reverse()
        kept = self.max_buffered_rows - room
        self.rows_dropped += (len(rows) + sum(len(c[1]) for c in calls)
                              + sum(t.num_rows for t in tables) - kept)
        with self._rows_lock:
            self.rows[:0] = keep
            self.calls[:0] = kept_calls
            self._in_calls += sum(len(c[1]) for c in kept_calls)
            self.tables[:0] = kept_tables
            self._buffered += kept

    def _write(self, rows: list[tuple[Any, ...]],
               calls: list[tuple[CallSource, list[tuple[Any, ...]], list[float]]],
               tables: Sequence[pa.Table] = ()
               ) -> tuple[int, int, dict[tuple[Any, ...], list[float]]]:
        """Write the rows, call records and converted tables (one Parquet file per day);
        return the rows and files written and, with Redis totals on, the rows' sums per
        (swarm, role, user, model) in `SUMS` order, made by pyarrow from the same table (on
        this thread, not the event loop)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        # One table, split by UTC day only when the batch spans midnight (in pyarrow: the
        # rows are never looped over in Python). Each source's records become columns in one
        # call; the file holds them source by source.
        # Rows that can't be converted would fail every retry too: they are dropped and
        # counted, and the rest is written.
        parts: list[pa.Table] = list(tables)
        bad = 0
        if rows:
            try:
                parts.append(to_table(rows))
            except Exception:
                log.error("usage ledger: %d rows are not ledger rows; dropped", len(rows),
                          exc_info=True)
                bad += len(rows)
        for source, records, costs in _by_source(calls):
            try:
                parts.append(source.ledger_table(records, costs))
            except Exception:
                log.error("usage ledger: %d call records of agent %s could not be converted; "
                          "dropped", len(records), getattr(source, "role", source),
                          exc_info=True)
                bad += len(records)
        self.rows_dropped += bad
        whole = parts[0] if len(parts) == 1 else pa.concat_tables(parts) if parts else None
        if whole is None or not whole.num_rows:
            return 0, 0, {}
        days = pc.divide(pc.cast(whole["ts"], pa.int64()), 86_400_000_000)  # µs to days
        first, last = (int(v.as_py()) for v in pc.min_max(days).values())
        tables = {first: whole} if first == last else {
            day: whole.filter(pc.equal(days, day)) for day in range(first, last + 1)}
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        written = 0
        for day, table in tables.items():
            if not table.num_rows:
                continue
            folder = f"{self.root}/day={time.strftime('%Y-%m-%d', time.gmtime(day * 86400))}"
            self.fs.create_dir(folder, recursive=True)
            self._seq += 1
            name = f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{self._seq}.parquet"
            written += 1
            pq.write_table(table, f"{folder}/{name}", filesystem=self.fs, **_PARQUET)
        combos: dict[tuple[Any, ...], list[float]] = {}
        if self._redis_spec is not None:
            try:
                combos = _combos(whole)
            except Exception:  # the files are written: a retry would write the rows twice
                log.warning("usage ledger: summing %d rows for the Redis totals failed",
                            whole.num_rows, exc_info=True)
        return whole.num_rows, written, combos

    async def _add_totals(self, combos: dict[tuple[Any, ...], list[float]]) -> None:
        """Add sums per (swarm, role, user, model) to the running totals: each combination
        spread over the four dimensions, one pipeline of HINCRBYFLOAT."""
        assert self._redis_spec is not None
        url, prefix = self._redis_spec
        if self._redis is None:
            import redis.asyncio as aredis

            self._redis = aredis.Redis.from_url(url)
        sums: dict[str, list[float]] = {}
        members: dict[str, set[str]] = {}
        for (swarm, role, user, model), acc in combos.items():
            for dim, value in (("swarm", swarm), ("role", role), ("user", user), ("model", model)):
                if value is None:
                    continue
                members.setdefault(f"{prefix}:usage:{swarm}:{dim}", set()).add(value)
                total = sums.setdefault(f"{prefix}:usage:{swarm}:{dim}:{value}",
                                        [0.0] * len(SUMS))
                for i, v in enumerate(acc):
                    total[i] += v
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, total in sums.items():
                for name, v in zip(SUMS, total, strict=True):
                    if v:
                        pipe.hincrbyfloat(key, name, v)
            for key, values in members.items():
                pipe.sadd(key, *values)
            await pipe.execute()

    async def aclose(self) -> None:
        """Stop the writer and flush what is left."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        # Under the lock a flush in progress finishes first (cancelling it could lose its
        # batch); the writer is then waiting, and safe to cancel. It is awaited with the lock
        # released: should it flush once more all the same, it can, and then it stops.
        async with self._lock:
            task, self._task = self._task, None
            if task is not None and not task.done():
                task.cancel()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await self.flush()
        converter, self._converter = self._converter, None
        if converter is not None:  # a conversion queued meanwhile: its tables are flushed
            await asyncio.to_thread(converter.shutdown, True)
        if self.tables or self.calls:
            await self.flush()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


class CallSource(Protocol):
    """What buffers call records in a ledger (`UsageLedger.extend_calls`): the metering
    layer."""

    def ledger_table(self, records: list[tuple[Any, ...]], costs: list[float]) -> pa.Table:
        """The ledger rows of these records (the calls that ran), as a table with
        `schema()`."""


# The columns Parquet dictionary-encodes (few distinct values in a file).
_DICTIONARY = ["task_id", "user", "swarm", "role", "kind", "model", "tool", "outcome",
               "error_class"]
# How ledger files are written (and the warm-up writes to memory): statistics only where
# readers filter (time, swarm), dictionaries only for the columns of few values, LZ4 (a third
# less CPU than the defaults, smaller files).
_PARQUET: dict[str, Any] = {"write_statistics": ["ts", "swarm"], "use_dictionary": _DICTIONARY,
                            "compression": "lz4", "row_group_size": ROW_GROUP}


def column(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    """An Arrow column of Python values; one value all the way down (a replica's swarm and
    role; no user; all ok) is made from the value, not converted one by one."""
    import pyarrow as pa

    if values and values.count(values[0]) == len(values):
        return pa.nulls(len(values), kind) if values[0] is None else \
            pa.repeat(pa.scalar(values[0], kind), len(values))
    return pa.array(values, kind)


def to_table(rows: list[tuple[Any, ...]]) -> pa.Table:
    """Ledger rows (tuples in `COLUMNS` order) as an Arrow table with `schema()`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sch = schema()
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in COLUMNS]
    micros = pc.multiply(pa.array(cols[0], pa.float64()), 1e6)
    arrays = [micros.cast(pa.int64(), safe=False).cast(sch.field(0).type)]
    for i, c in enumerate(cols[1:], 1):
        kind = sch.field(i).type
        arrays.append(column(list(c), kind) if i in _OFTEN_ONE_VALUE else pa.array(c, kind))
    return pa.Table.from_arrays(arrays, schema=sch)


# Columns (by index) that usually hold one value in a whole batch.
_OFTEN_ONE_VALUE = frozenset(COLUMNS.index(c) for c in (
    "user", "swarm", "role", "outcome", "error_class"))


def _combos(table: pa.Table) -> dict[tuple[Any, ...], list[float]]:
    """A ledger table's sums per (swarm, role, user, model), in `SUMS` order: model calls,
    tool calls, input, output and cached tokens, cost, errors. One group-by in pyarrow, by
    those four and the kind and outcome, so that calls and errors are the groups' counts; the
    few groups are then folded in Python."""
    keys = ["swarm", "role", "user", "model", "kind", "outcome"]
    grouped = table.group_by(keys, use_threads=False).aggregate([
        ("input_tokens", "sum"), ("output_tokens", "sum"), ("cached_tokens", "sum"),
        ("cost_usd", "sum"), ([], "count_all")]).to_pydict()
    out: dict[tuple[Any, ...], list[float]] = {}
    columns = [grouped[k] for k in keys] + [grouped[f"{c}_sum"] for c in (
        "input_tokens", "output_tokens", "cached_tokens", "cost_usd")] + [grouped["count_all"]]
    for swarm, role, user, model, kind, outcome, tin, tout, tc, usd, n in zip(
            *columns, strict=True):
        acc = out.get((swarm, role, user, model))
        if acc is None:
            acc = out[(swarm, role, user, model)] = [0.0] * len(SUMS)
        if kind == "model":
            acc[0] += n
        elif kind == "tool":
            acc[1] += n
        acc[2] += tin or 0
        acc[3] += tout or 0
        acc[4] += tc or 0
        acc[5] += usd or 0.0
        if outcome == "error":
            acc[6] += n
    return out


# ---- reading ------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A `--since` value: relative (`30m`, `24h`, `7d`, `2w`) or an ISO date or date-time
    (UTC unless it names a zone); returns an aware UTC datetime."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text or "")
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise UserError(
            f"--since {text!r} is neither a relative time (30m, 24h, 7d, 2w) nor an ISO date "
            "or date-time (2026-11-01, 2026-11-01T12:00:00Z)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def read_usage(location: str, *, since: datetime | None = None,
               swarm: str | None = None) -> pa.Table:
    """The ledger rows under `location` from `since` on (optionally of one swarm)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    fs, root = _filesystem(location)
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return schema().empty_table()
    part = ds.partitioning(pa.schema([("day", pa.string())]), flavor="hive")
    dataset = ds.dataset(root, filesystem=fs, format="parquet", partitioning=part,
                         schema=schema().append(pa.field("day", pa.string())),
                         exclude_invalid_files=True)
    cond = None
    if since is not None:
        since = since.astimezone(UTC)
        cond = (ds.field("day") >= since.strftime("%Y-%m-%d")) & \
            (ds.field("ts") >= pa.scalar(since, pa.timestamp("us", tz="UTC")))
    if swarm is not None:
        eq = ds.field("swarm") == swarm
        cond = eq if cond is None else cond & eq
    return dataset.to_table(filter=cond, columns=list(COLUMNS))


def summarize(table: pa.Table, by: str) -> pa.Table:
    """Sum ledger rows by `by` (role, user, swarm or model): calls, tokens, cost, errors;
    the most expensive first."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if by not in BY:
        raise UserError(f"--by must be one of {', '.join(BY)} (got {by!r})")
    key = pc.fill_null(table[by], "-")
    t = pa.table({
        by: key,
        "model_calls": pc.cast(pc.equal(table["kind"], "model"), pa.int64()),
        "tool_calls": pc.cast(pc.equal(table["kind"], "tool"), pa.int64()),
        "input_tokens": table["input_tokens"], "output_tokens": table["output_tokens"],
        "cached_tokens": table["cached_tokens"], "cost_usd": table["cost_usd"],
        "errors": pc.cast(pc.equal(table["outcome"], "error"), pa.int64()),
    })
    out = t.group_by(by).aggregate([(c, "sum") for c in SUMS])
    out = out.rename_columns([c.removesuffix("_sum") for c in out.column_names])
    out = out.select([by, *SUMS])
    if out.num_rows:
        out = out.sort_by([("cost_usd", "descending"), (by, "ascending")])
    return out


def usage_table(location: str, by: str, since: str | datetime | None = "24h",
                swarm: str | None = None) -> pa.Table:
    """The ledger under `location` summed by `by` since `since` (see `parse_since`)."""
    if by not in BY:
        raise UserError(f"--by must be one of {', '.join(BY)} (got {by!r})")
    when = parse_since(since) if isinstance(since, str) else since
    return summarize(read_usage(location, since=when, swarm=swarm), by)


async def redis_totals(url: str, swarm: str, by: str, *, prefix: str = "swarm"
                       ) -> dict[str, dict[str, float]]:
    """The running totals kept in Redis for one swarm, by role, user, swarm or model."""
    import redis.asyncio as aredis

    if by not in BY:
        raise UserError(f"by must be one of {', '.join(BY)} (got {by!r})")
    client = aredis.Redis.from_url(url, decode_responses=True)
    try:
        values = sorted(await client.smembers(f"{prefix}:usage:{swarm}:{by}"))
        out: dict[str, dict[str, float]] = {}
        for v in values:
            raw = await client.hgetall(f"{prefix}:usage:{swarm}:{by}:{v}")
            out[v] = {k: float(x) for k, x in raw.items()}
        return out
    finally:
        await client.aclose()
