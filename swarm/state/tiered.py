"""`TieredCheckpointer`: recent task state in Redis, older log segments in an Arrow archive.

Redis holds what running tasks need fast; an `ArrowCheckpointer` on any pyarrow filesystem
(`file://`, `s3://`, ...) holds the rest, so Redis memory stays bounded however long tasks run
and however many finish. Reads span both tiers: `read` and `restore` see every entry, in order,
wherever it lives.

Archiving a segment of a task's log (`archive`) runs in two halves under a per-task lease in
Redis (one archiver at a time, across processes):

1. `write_archive` copies the entries from where the archive ends up to `upto` into one new
   segment file (written whole, synced, read back), and the newest snapshot at or before
   `upto`. For a finished task it copies the ledger records too.
2. `compact` checks the archive again (its last seq, the ledger records, the snapshot) and only
   then trims the copied entries from the Redis log; seqs stay as they were, so appends go on
   at the next one. The idempotency ledger of an unfinished task stays in Redis whole, since
   exactly-once tool calls depend on it; a finished task's ledger records move to the archive,
   and its snapshots leave Redis once the archive holds the newest.

A crash between the halves leaves the entries in both tiers: reads take each once (Redis from
its base, the archive below it), and the next archive run writes nothing and trims.

When it happens, with no help from the runtime:

- a snapshot is stored (`put_snapshot`) and at least `archive_after` entries precede the
  task's previous snapshot in Redis: everything up to that previous snapshot is archived in the
  background (the newest snapshot and the entries after it stay hot for a resume);
- a task's row becomes terminal (`put_task` with completed / failed / canceled / rejected):
  the whole task is archived in the background (`archive_task`), with the logs of its agents
  (`task/agent`, linked to the task on their first append).

`delete` removes a task from both tiers, its agents' logs included. A failed background run is
logged and tried again at the task's next snapshot, on `archive_task`, or by the sweep
`archive_finished(swarm)`; nothing is trimmed that the archive doesn't hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple

from swarm.errors import CheckpointError
from swarm.state import codec
from swarm.state.arrow import ArrowCheckpointer
from swarm.state.interface import (
    Checkpointer,
    CorruptRecord,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)
from swarm.state.redis import EntryHead, RedisCheckpointer

log = logging.getLogger(__name__)

# A2A's terminal task states (swarm.protocol.a2a.TERMINAL; not imported, to keep the state
# layer free of the protocol's dependencies).
FINISHED = frozenset({"completed", "failed", "canceled", "rejected"})
_ARCHIVED_SNAPSHOTS = 2  # the newest archived one, and the one before while it is replaced
_SWEEP_CHUNK = 64  # finished tasks `archive_finished` looks at together


class ArchivePlan(NamedTuple):
    """What `write_archive` copied, for `compact` to check and trim: the entries up to `upto`,
    the snapshot at `snapshot` (None: none copied) and, for a `finished` task, the ledger
    records as Redis held them."""

    task_id: str
    upto: int
    snapshot: int | None
    ledger: dict[str, bytes]
    finished: bool
    # What `write_archive` read back or found: the archive's end (the seq after its last
    # entry) and the snapshot Redis recorded as archived. `archive_log`, which runs both
    # halves under one lease, has `compact` take them instead of reading them again.
    archived_end: int | None = None
    held_snapshot: int | None = None


class TieredCheckpointer(Checkpointer):
    """The `Checkpointer` on Redis (`hot`) with an Arrow archive (`archive`) behind it.

    `archive_after`: entries in Redis before the task's previous snapshot that make a new
    snapshot archive them (0: only finished tasks are archived). `on_finish`: archive a task
    when its row becomes terminal. `lease_s`: how long one archiving run may hold a task.
    """

    name = "tiered"

    def __init__(self, hot: RedisCheckpointer, archive: ArrowCheckpointer, *,
                 archive_after: int = 1000, on_finish: bool = True, lease_s: float = 60.0,
                 close_timeout_s: float = 10.0) -> None:
        self.hot, self.archive = hot, archive
        self.archive_after = max(0, archive_after)
        self.on_finish = on_finish
        self.lease_s = lease_s
        self.close_timeout_s = close_timeout_s
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = \
            weakref.WeakValueDictionary()
        self._linked: set[str] = set()

    def _lock(self, task_id: str) -> asyncio.Lock:
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = asyncio.Lock()
        return lock

    async def start(self) -> None:
        """Start both tiers; `StoreUnavailable` if either can't be reached."""
        await self.hot.start()
        await self.archive.start()

    # -- the Checkpointer ----------------------------------------------------------------------

    async def claim(self, task_id: str) -> int:
        """A new writer token (kept in Redis)."""
        return await self.hot.claim(task_id)

    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
        *, fence: int | None = None,
    ) -> int:
        """Append to the Redis log; an agent's log (`task/agent`) is linked to its task first,
        so retention finds it."""
        root, sep, _ = task_id.partition("/")
        if sep and task_id not in self._linked:
            await self.hot.link(root, task_id)
            if len(self._linked) > 100_000:
                self._linked.clear()
            self._linked.add(task_id)
        return await self.hot.append(task_id, entries, ledger, fence=fence)

    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with after < seq <= upto: Redis's part first, then what the archive holds
        below Redis's base (a compaction in between only moves entries the archive has)."""
        base, hot = await self.hot.read_tail(task_id, after, upto)
        start = max(after + 1, 0)
        if start >= base or (upto is not None and upto < start):
            return hot
        last = base - 1 if upto is None else min(upto, base - 1)
        cold = await self.archive.read(task_id, after, last)
        if len(cold) != last - start + 1:
            raise CorruptRecord(task_id, f"entry {start + len(cold)}",
                                f"it is missing: redis holds the log from entry {base} on and "
                                f"the archive ({self.archive.uri}) ends before it")
        return cold + hot

    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot in Redis; maybe archive up to the previous one, in the background."""
        await self.hot.put_snapshot(snapshot, keep)
        if self.archive_after > 0:
            task_id, seq = snapshot.task_id, snapshot.seq
            self._spawn(task_id, lambda: self._after_snapshot(task_id, seq), busy="skip")

    async def snapshots(self, task_id: str) -> list[int]:
        """Snapshot seqs in Redis, and the one the archive holds."""
        seqs = set(await self.hot.snapshots(task_id))
        archived = (await self.hot.bounds(task_id)).snapshot
        if archived is not None:
            seqs.add(archived)
        return sorted(seqs)

    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot at `seq`, from Redis or else the archive."""
        snap = await self.hot.get_snapshot(task_id, seq)
        if snap is None and (await self.hot.bounds(task_id)).snapshot == seq:
            snap = await self.archive.get_snapshot(task_id, seq)
        return snap

    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Ledger records by key; a finished task's archived ones under Redis's."""
        # Redis first: a compaction after it only removes records the archive already has.
        book = await self.hot.ledger(task_id)
        if (await self.hot.bounds(task_id)).ledger_archived:
            book = {**await self.archive.ledger(task_id), **book}
        return book

    async def put_task(self, row: TaskRow) -> None:
        """Store the row in Redis; a terminal one archives the task in the background."""
        await self.hot.put_task(row)
        self._archive_if_finished(row)

    async def put_tasks(self, rows: list[TaskRow]) -> list[BaseException | None]:
        """`put_task` for several rows, written to Redis together."""
        out = await self.hot.put_tasks(rows)
        for row, failed in zip(rows, out, strict=True):
            if failed is None:
                self._archive_if_finished(row)
        return out

    def _archive_if_finished(self, row: TaskRow) -> None:
        """Archive a task in the background once its stored row is terminal (`on_finish`)."""
        if self.on_finish and row.state in FINISHED:
            task_id = row.task_id
            self._spawn(task_id, lambda: self.archive_task(task_id, finished=True),
                        busy="after")

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task row (rows stay in Redis)."""
        return await self.hot.get_task(task_id)

    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Every row of a swarm."""
        return await self.hot.list_tasks(swarm)

    async def epoch(self) -> str | None:
        """Redis's (`Checkpointer.epoch`): an unfinished task's log is there."""
        return await self.hot.epoch()

    async def delete(self, task_id: str) -> None:
        """Remove a task, and its agents' linked logs, from both tiers: the archive first, so
        a failure leaves the task readable and a retry finishes the job. Waits (at most
        `lease_s`) for an archiving run elsewhere to end, so it can't write after this."""
        ids = [*await self.hot.linked(task_id), task_id]
        for job in [self._jobs.get(i) for i in ids]:
            if job is not None:
                job.cancel()
                with contextlib.suppress(BaseException):
                    await job
        for log_id in ids:
            async with self._lock(log_id):
                await self._take_lease(log_id, wait_s=self.lease_s)
                await self.archive.delete(log_id)
                await self.hot.delete(log_id)  # the lease with the rest
            self._linked.discard(log_id)

    async def _take_lease(self, task_id: str, wait_s: float) -> str | None:
        """The task's archive lease, waiting up to `wait_s` for its holder; None if not had."""
        deadline = time.monotonic() + wait_s
        while True:
            token = await self.hot.lease(task_id, self.lease_s)
            if token is not None or time.monotonic() >= deadline:
                return token
            await asyncio.sleep(0.05)

    async def info(self) -> dict[str, Any]:
        """Redis's counts, and where the archive is."""
        return {**await self.hot.info(), "store": "tiered", "archive": self.archive.uri}

    async def close(self) -> None:
        """Let background archiving finish (at most `close_timeout_s`), then close both tiers.
        A run cut short is safe: the next one picks up where the archive ends."""
        jobs = list(self._jobs.values())
        if jobs:
            _, late = await asyncio.wait(jobs, timeout=self.close_timeout_s)
            for job in late:
                job.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.hot.close()
        await self.archive.close()

    # -- archiving -----------------------------------------------------------------------------

    async def archive_task(self, task_id: str, *, finished: bool | None = None
                           ) -> dict[str, int | None]:
        """Archive all of a task and its agents' linked logs; for a finished task (its row is
        terminal) with its ledger and snapshots. Returns each log's new base in Redis (None:
        another process is archiving it). `finished`: whether the row is terminal, if the
        caller has just stored it (else the row is read)."""
        if finished is None:
            row = await self.hot.get_task(task_id.partition("/")[0])
            finished = row is not None and row.state in FINISHED
        return {log_id: await self.archive_log(log_id, finished=finished)
                for log_id in [*await self.hot.linked(task_id), task_id]}

    async def archive_finished(self, swarm: str, rows: list[TaskRow] | None = None) -> int:
        """Archive every finished task of a swarm that Redis still holds entries or ledger
        records of (one whose background run failed or was lost with its process, or that
        finished before the archive was configured); how many were archived. `rows`: the
        swarm's rows, if the caller has just read them. The tasks are looked at
        `_SWEEP_CHUNK` at a time, their reads group-committed together."""

        async def left(task_id: str) -> bool:
            for log_id in [*await self.hot.linked(task_id), task_id]:
                bounds = await self.hot.bounds(log_id)
                if bounds.end > bounds.base or await self.hot.ledger_raw(log_id):
                    return True
            return False

        ended = [r.task_id for r in (await self.hot.list_tasks(swarm) if rows is None else rows)
                 if r.state in FINISHED]
        count = 0
        for i in range(0, len(ended), _SWEEP_CHUNK):
            chunk = ended[i:i + _SWEEP_CHUNK]
            found = await asyncio.gather(*map(left, chunk), return_exceptions=True)
            for task_id, held in zip(chunk, found, strict=True):
                try:
                    if isinstance(held, BaseException):
                        raise held
                    if held:
                        await self.archive_task(task_id, finished=True)
                        count += 1
                except (StoreUnavailable, asyncio.CancelledError):
                    raise  # the store is gone (the next sweep tries them all again), or stop
                except Exception:  # one task's problem (a corrupt record, ...) stops only it
                    log.warning("archiving finished task %s failed; it stays in redis",
                                task_id, exc_info=True)
        return count

    async def archive_log(self, task_id: str, upto: int | None = None, *,
                          finished: bool = False) -> int | None:
        """Archive one log's entries up to `upto` (all if None), then trim them from Redis;
        return the new base, or None if another process holds the task's archive lease."""
        async with self._lock(task_id):
            token = await self.hot.lease(task_id, self.lease_s)
            if token is None:
                log.info("task %s is being archived elsewhere; skipped", task_id)
                return None
            try:
                plan = await self.write_archive(task_id, upto, finished=finished)
                return await self.compact(plan, lease=token, verified=True)
            finally:
                try:
                    await self.hot.release(task_id, token)
                except Exception:  # it expires on its own
                    log.debug("releasing the archive lease of %s failed", task_id, exc_info=True)

    async def write_archive(self, task_id: str, upto: int | None = None, *,
                            finished: bool = False) -> ArchivePlan:
        """The first half of `archive_log`: copy (entries, snapshot, a finished task's ledger)
        into the archive and check it landed; Redis is not changed."""
        bounds = await self.hot.bounds(task_id)
        last = bounds.end - 1 if upto is None else min(upto, bounds.end - 1)
        done = await self.archive.next_seq(task_id)
        if done < bounds.base:
            raise CorruptRecord(task_id, f"entry {done}", f"it is missing: redis holds the log "
                                f"from entry {bounds.base} on and the archive ends before it")
        if done > bounds.end:
            raise CheckpointError(
                f"task {task_id}: the archive ({self.archive.uri}) holds entries up to "
                f"{done - 1}, past the end of the log in redis ({bounds.end - 1}); it is not "
                "this task's archive (a task of the same id deleted from redis only?)")
        entries: list[EntryHead] = []
        if done <= last:
            # As stored: each entry's head for the segment's columns and its bytes unchanged.
            _, entries = await self.hot.read_tail_raw(task_id, done - 1, last)
            if [e.seq for e in entries] != list(range(done, last + 1)):
                raise CheckpointError(f"task {task_id}: entries {done}..{last} changed in "
                                      "redis while being archived (another archiver?)")
        raw: dict[str, bytes] = {}
        records: list[LedgerRecord] = []
        if finished:
            raw = await self.hot.ledger_raw(task_id)
            # Records an earlier run archived are not written again. If Redis has no mark of
            # one (the common case: a task archived once, when it finishes), the archive is
            # not read for them: at worst, after a run cut short between its halves, a record
            # is written twice, and a key's last row wins.
            have = await self.archive.ledger(task_id) if raw and bounds.ledger_archived else {}
            for key, data in raw.items():
                rec = codec.decode(LedgerRecord, data, task_id=task_id, what=f"ledger record {key}")
                if have.get(key) != rec:
                    records.append(rec)
        end = done
        if entries or records:
            end = await self.archive.write_segment(task_id, entries, records,
                                                   payloads=[e.raw for e in entries])
            if end <= last:
                raise CheckpointError(f"task {task_id}: the archive ends at entry {end - 1} "
                                      f"after writing entries up to {last}")
        snapshot = await self._archive_snapshot(task_id, last, bounds.snapshot)
        return ArchivePlan(task_id, last, snapshot, raw, finished, end, bounds.snapshot)

    async def _archive_snapshot(self, task_id: str, last: int, held: int | None) -> int | None:
        """Copy the newest snapshot at or before `last` (unless the archive holds it); its seq."""
        seqs = [s for s in await self.hot.snapshots(task_id) if s <= last]
        if not seqs or seqs[-1] == held:
            return None
        try:
            snap = await self.hot.get_snapshot(task_id, seqs[-1])
        except CorruptRecord as e:
            log.warning("not archiving a snapshot of %s: %s", task_id, e)
            return None
        if snap is None:  # replaced by a newer one meanwhile
            return None
        await self.archive.put_snapshot(snap, keep=_ARCHIVED_SNAPSHOTS)
        return snap.seq

    async def compact(self, plan: ArchivePlan, *, lease: str, verified: bool = False) -> int:
        """The second half of `archive_log`: check the archive holds what `plan` says, then
        trim it from Redis (while `lease` is current); the new base. `verified`: `plan` was
        made under this lease by `write_archive`, which read back what it wrote, so the
        archive's end and ledger records are taken from it instead of being read again."""
        task_id = plan.task_id
        end = plan.archived_end if verified and plan.archived_end is not None else \
            await self.archive.next_seq(task_id)
        if end <= plan.upto:
            raise CheckpointError(f"task {task_id}: the archive ends at entry {end - 1}; not "
                                  f"trimming redis through entry {plan.upto}")
        if plan.ledger and not verified:
            have = await self.archive.ledger(task_id)
            for key, data in plan.ledger.items():
                if have.get(key) != codec.decode(LedgerRecord, data, task_id=task_id,
                                                 what=f"ledger record {key}"):
                    raise CheckpointError(f"task {task_id}: the archive lacks ledger record "
                                          f"{key}; not trimming")
        if plan.snapshot is not None and plan.snapshot not in await self.archive.snapshots(
                task_id):
            raise CheckpointError(f"task {task_id}: the archive lacks the snapshot at entry "
                                  f"{plan.snapshot}; not trimming")
        drop = False
        if plan.finished:  # its snapshots leave Redis if the archive holds the newest
            held = plan.snapshot if plan.snapshot is not None else \
                plan.held_snapshot if verified else (await self.hot.bounds(task_id)).snapshot
            hot = await self.hot.snapshots(task_id)
            drop = not hot or (held is not None and held >= hot[-1])
        return await self.hot.compact(task_id, plan.upto, lease=lease, snapshot=plan.snapshot,
                                      ledger=plan.ledger if plan.finished else None,
                                      drop_snapshots=drop)

    async def _after_snapshot(self, task_id: str, seq: int) -> None:
        """The snapshot policy: archive up to the previous snapshot once it is far enough."""
        older = [s for s in await self.hot.snapshots(task_id) if s < seq]
        if older and older[-1] + 1 - (await self.hot.bounds(task_id)).base >= self.archive_after:
            await self.archive_log(task_id, older[-1])

    async def drain(self) -> None:
        """Wait for the background archiving started so far (for tests and shutdown)."""
        while self._jobs:
            await asyncio.gather(*list(self._jobs.values()), return_exceptions=True)

    def _spawn(self, key: str, run: Callable[[], Awaitable[Any]],
               busy: Literal["skip", "after"]) -> None:
        """Run `run()` in the background; if a run for `key` is going, `busy` says whether to
        skip this one or run it after."""
        prev = self._jobs.get(key)
        if prev is not None and prev.done():
            prev = None
        if prev is not None and busy == "skip":
            return

        async def job() -> None:
            if prev is not None:
                await asyncio.wait([prev])
            try:
                await run()
            except Exception:
                log.warning("archiving %s failed; it stays in redis and is tried again later",
                            key, exc_info=True)

        task = asyncio.create_task(job(), name=f"archive {key}")
        self._jobs[key] = task
        task.add_done_callback(lambda t: self._jobs.pop(key) if self._jobs.get(key) is t else None)
