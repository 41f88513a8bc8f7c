"""`ArrowCheckpointer`: task logs as Arrow IPC segments on any pyarrow filesystem.

Layout under the root of the URI (`file:///var/swarm`, `s3://bucket/prefix`, ...):

- `tasks/<task>/log-<first_seq:012d>.arrows`  Arrow IPC stream, one record batch per append
- `tasks/<task>/snap-<seq:012d>.msgpack`      a snapshot (codec bytes); the newest `keep` stay
- `tasks/<task>/swarm`                         the swarm whose row the task has
- `swarms/<swarm>/tasks/<task>.msgpack`        the task's row (codec bytes)

A batch has a row per entry (`seq`, `kind`, `agent`, `step`, `ts`, `payload` = codec bytes) and
a row per ledger record (`key` set, `seq` null; a key's last row wins), and is written with one
`write` call: an append's entries and ledger records are durable together or not at all.

On a local disk a segment is a stream kept open and flushed after each append, which survives a
killed process but not a machine crash; `fsync=True` also syncs each append to disk (~0.1-0.5 ms
on an SSD-backed VM, milliseconds on spinning disks; in a thread, so other tasks go on). A new
segment starts after `segment_entries` entries. Segments have no end-of-stream marker, so one
whose writer is open or was killed reads as the batches written so far; a torn last batch raises
`CorruptRecord` naming the entry it would have held (appends to the task refuse too: the batch
may have been acknowledged). Object stores (S3, GCS, ...) can't append and show an object only
once whole, so there each append is its own object, `log-<first_seq:012d>-<n>.arrows` (`n`
orders ledger-only appends at one seq), and I/O runs in threads; on a local disk it runs on the
event loop (an append costs ~30 µs, less than a hop to a thread). A task's next seq is kept in
memory, recovered on first use from its last segment; a lock per task orders its appenders.

Other processes (the agents of a handoff, the supervisor logging an approval) append to the same
log, so a kept tail can go stale. On a local disk each append first checks what it writes to:
its segment must still be the size it left it (a stat, ~2 µs), and a segment it starts must not
exist yet. On an object store, where that is a lookup as slow as the write, only an unfenced
append looks (whether its object's name is taken); a fenced one relies on `claim`. `claim` (a
turn starting) picks up the stored end if the log moved; an unfenced append goes on after it.
A fenced append that finds the log moved since its writer claimed it writes nothing: `Fenced`
if the stored token is newer (a later copy of the turn), else `CheckpointError` naming the
segment and both seqs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from swarm.errors import CheckpointError
from swarm.state import codec
from swarm.state.interface import (
    FORMAT_VERSION,
    Checkpointer,
    CorruptRecord,
    Fenced,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)

T = TypeVar("T")

LOG_SCHEMA = pa.schema(
    [("seq", pa.int64()), ("kind", pa.string()), ("agent", pa.string()), ("step", pa.int64()),
     ("ts", pa.float64()), ("key", pa.string()), ("payload", pa.binary())],
    metadata={"swarm.format": str(FORMAT_VERSION)})
_ROW = pa.struct(list(LOG_SCHEMA))
_SCHEMA_MESSAGE = LOG_SCHEMA.serialize().to_pybytes()
_SEGMENT = re.compile(r"log-(\d{12,})(?:-(\d+))?\.arrows")
_SNAP = re.compile(r"snap-(-?\d+)\.msgpack")
_BROKEN = (pa.ArrowException, OSError, ValueError)
_EMPTY = pa.py_buffer(b"")


def path_name(ident: str) -> str:
    """A task or swarm id as one safe path component (anything but [A-Za-z0-9_.-] %-escaped)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]|^\.",
                  lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), ident)
    return safe or "%"


class _Segment(NamedTuple):
    first: int
    part: int
    path: str


@dataclass(slots=True)
class _Tail:
    """Where a task's next append goes."""

    next_seq: int
    path: str | None = None  # local: the segment appended to (None: start one)
    entries: int = 0  # local: entries in that segment
    size: int = 0  # local: its bytes, to cut a failed write back off
    parts: int = 0  # object stores: objects already named after next_seq
    stream: Any = None
    sync_fd: int | None = None


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and root path of a URI (`file://./dir` is relative to the cwd)."""
    if uri.startswith(("file://./", "file://../")):
        uri = "file://" + os.path.abspath(uri.removeprefix("file://"))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as e:
        why = str(e).splitlines()[0]
        raise ValueError(f"can't open {uri!r} as a pyarrow filesystem: {why}") from None


class ArrowCheckpointer(Checkpointer):
    """The `Checkpointer` on a pyarrow filesystem URI (or a root path in `filesystem`).

    `segment_entries`: entries per local segment file. `fsync`: sync each append to disk, so
    it survives a machine crash, not only a killed process, at ~0.1-0.5 ms an append (more on
    spinning disks); object stores are durable per write anyway. `max_open`: segment files
    kept open for appends, the least recently used closed beyond it.
    """

    name = "arrow"

    def __init__(self, uri: str, *, segment_entries: int = 1000, fsync: bool = False,
                 max_open: int = 256, filesystem: pafs.FileSystem | None = None) -> None:
        filesystem, root = (filesystem, uri) if filesystem is not None else open_filesystem(uri)
        self.uri, self.fs = uri, filesystem
        self.local = isinstance(filesystem, pafs.LocalFileSystem)
        self.segment_entries = max(1, segment_entries)
        self.fsync = fsync and self.local
        self.max_open = max(1, max_open)
        self._base = root.rstrip("/") + "/" if root else ""
        self._tails: dict[str, _Tail] = {}
        self._fences: dict[str, int] = {}
        self._open: OrderedDict[str, _Tail] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        """Check the root can be reached (and, on a local disk, made); `StoreUnavailable` if not."""
        root = self._base.rstrip("/") or "/"
        await self._io(self.fs.create_dir if self.local else self.fs.get_file_info, root)

    def task_dir(self, task_id: str) -> str:
        """The directory holding a task's segments and snapshots."""
        return f"{self._base}tasks/{path_name(task_id)}"

    def _row_path(self, swarm: str, task_id: str) -> str:
        return f"{self._base}swarms/{path_name(swarm)}/tasks/{path_name(task_id)}.msgpack"

    def _lock(self, task_id: str) -> asyncio.Lock:
        lock = self._locks.get(task_id)
        if lock is None:
            lock = self._locks[task_id] = asyncio.Lock()
        return lock

    async def _io(self, fn: Callable[..., T], *args: Any, thread: bool = False) -> T:
        """Run blocking filesystem calls: inline on a local disk, in a thread on object stores."""
        try:
            if self.local and not thread:
                return fn(*args)
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            raise StoreUnavailable(f"arrow store {self.uri}: {e}") from e

    # -- files -------------------------------------------------------------------------------

    def _ls(self, path: str) -> list[str]:
        """The names in a directory (none if it doesn't exist). On a local disk through
        `os.listdir`: pyarrow's selector costs ~150 µs a call against ~10, and archiving a
        finished task lists its directory several times."""
        if self.local:
            try:
                return os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return [i.base_name for i in
                self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]

    def _read(self, path: str) -> pa.Buffer | None:
        try:
            with self.fs.open_input_file(path) as f:
                return f.read_buffer()
        except FileNotFoundError:
            return None

    async def _read_many(self, paths: list[str]) -> list[pa.Buffer]:
        if self.local:
            found = [await self._io(self._read, p) for p in paths]
        else:
            found = await asyncio.gather(*(self._io(self._read, p) for p in paths))
        return [_EMPTY if b is None else b for b in found]

    def _open_out(self, path: str, append: bool = False) -> Any:
        opener = self.fs.open_append_stream if append else self.fs.open_output_stream
        try:
            return opener(path)
        except FileNotFoundError:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            return opener(path)

    def _put(self, path: str, data: bytes, sync: bool = False) -> None:
        """Write a whole file; on a local disk through a rename, so readers see old or new
        (and synced to disk with `fsync`, or `sync`)."""
        if not self.local:
            with self._open_out(path) as f:
                f.write(data)
            return
        # Local: Python's own file calls (pyarrow's output stream and move cost ~100 µs more a
        # file, and archiving writes a file a finished task).
        tmp, where = f"{path}.{os.urandom(6).hex()}.tmp", posixpath.dirname(path)
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:
            os.makedirs(where, exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                f.write(data)
                if sync or self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if sync or self.fsync:
            _fsync(where)

    def _remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    # -- segments ----------------------------------------------------------------------------

    def _segments(self, task_id: str) -> list[_Segment]:
        where = self.task_dir(task_id)
        found = ((_SEGMENT.fullmatch(name), f"{where}/{name}") for name in self._ls(where))
        return sorted(_Segment(int(m[1]), int(m[2] or 0), p) for m, p in found if m)

    def _recover(self, task_id: str) -> _Tail:
        """The tail of a task's log, from its last segment."""
        segs = self._segments(task_id)
        if not segs:
            return _Tail(0)
        last = segs[-1]
        data = self._read(last.path) or _EMPTY
        batches = _Batches(task_id, last, data)
        batches.check()
        end = batches.end()
        if self.local:
            return _Tail(end, last.path, end - last.first, data.size)
        return _Tail(end, parts=sum(s.first == end for s in segs))

    def _write_local(self, task_id: str, tail: _Tail, batch: pa.Buffer, n: int) -> bool:
        """Append a batch to the task's segment (starting one if due); True if it is new."""
        if tail.path is None or tail.entries >= self.segment_entries:
            self._close(task_id, tail)
            tail.path, tail.entries, tail.size = (
                f"{self.task_dir(task_id)}/log-{tail.next_seq:012d}.arrows", 0, 0)
        new = tail.size == 0
        data = _SCHEMA_MESSAGE + batch.to_pybytes() if new else batch
        try:
            if tail.stream is None:
                tail.stream = self._open_out(tail.path, append=True)
                tail.sync_fd = os.open(tail.path, os.O_RDONLY) if self.fsync else None
                self._open[task_id] = tail
                self._evict()
            self._open.move_to_end(task_id)
            tail.stream.write(data)
            tail.stream.flush()
        except OSError:
            self._close(task_id, tail)
            if os.path.exists(tail.path):  # cut a partial batch off so the segment stays whole
                os.truncate(tail.path, tail.size)
            raise
        tail.size += len(data)
        tail.entries += n
        return new

    def _close(self, task_id: str, tail: _Tail | None) -> None:
        self._open.pop(task_id, None)
        if tail is None:
            return
        stream, fd, tail.stream, tail.sync_fd = tail.stream, tail.sync_fd, None, None
        if stream is not None:
            stream.close()
        if fd is not None:
            os.close(fd)

    def _evict(self) -> None:
        """Close the least recently used streams beyond `max_open` (not ones mid-append)."""
        for task_id in list(self._open):
            if len(self._open) <= self.max_open:
                break
            if not self._lock(task_id).locked():
                self._close(task_id, self._open[task_id])

    # -- the Checkpointer ----------------------------------------------------------------------

    async def claim(self, task_id: str) -> int:
        """A new writer token, kept in the task's `fence` file; the claimer's appends go on
        from the log's stored end, whoever wrote it last.

        Fencing holds among the writers of this process. Across processes an append finds a
        newer token only once its writer has appended (on a local disk; see the module
        docstring); writers running at once in several processes need the Redis store."""
        async with self._lock(task_id):
            token = await self._stored_fence(task_id) + 1
            await self._io(self._put, f"{self.task_dir(task_id)}/fence", str(token).encode())
            self._fences[task_id] = token
            tail = self._tails.get(task_id)
            if tail is not None and await self._io(self._moved, task_id, tail):
                # Another process appended since this one last did: recover on next use.
                self._close(task_id, self._tails.pop(task_id))
            return token

    async def _stored_fence(self, task_id: str) -> int:
        """The newest writer token claimed for the task (its `fence` file), 0 if none."""
        data = await self._io(self._read, f"{self.task_dir(task_id)}/fence")
        return int(data.to_pybytes()) if data is not None else 0

    def _moved(self, task_id: str, tail: _Tail) -> str | None:
        """The file showing that the log changed since `tail` was read (another writer
        appended), or None: a stat or two on a local disk, a lookup on an object store."""
        if not self.local:
            name = f"{self.task_dir(task_id)}/log-{tail.next_seq:012d}-{tail.parts}.arrows"
            return name if self.fs.get_file_info(name).type != pafs.FileType.NotFound else None
        if tail.path is not None and _size(tail.path) != tail.size:
            return tail.path
        if tail.path is None or tail.entries >= self.segment_entries:
            # This append starts a segment, which another writer may have started already.
            # (One that isn't due is appended to by every writer of the log, as they rotate
            # at the same `segment_entries`: the default, which nothing configures.)
            path = f"{self.task_dir(task_id)}/log-{tail.next_seq:012d}.arrows"
            if _size(path) > 0:
                return path
        return None

    async def _refresh(self, task_id: str, tail: _Tail, fence: int | None, moved: str) -> _Tail:
        """The tail to append at, now that `moved` shows another writer appended since `tail`
        was read: for an unfenced append, the log's stored end; a fenced one raises (see the
        module docstring)."""
        self._close(task_id, self._tails.pop(task_id))
        found = self._tails[task_id] = await self._io(self._recover, task_id)
        if fence is None:
            return found
        stored = await self._stored_fence(task_id)
        if stored > fence:
            self._fences[task_id] = max(self._fences.get(task_id, 0), stored)
            raise Fenced(task_id, fence, stored)
        raise CheckpointError(
            f"task {task_id}: another writer appended to the log after this writer (token "
            f"{fence}) claimed it, without claiming it: {moved} changed; this writer's next "
            f"entry was {tail.next_seq}, the stored log's is {found.next_seq}. Nothing was "
            "written (a turn that claims the log anew goes on from its stored end)")

    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
        *, fence: int | None = None,
    ) -> int:
        """Append entries and upsert ledger records as one record batch, in one write."""
        async with self._lock(task_id):
            current = self._fences.get(task_id, 0)
            if fence is not None and fence < current:
                raise Fenced(task_id, fence, current)
            tail = self._tails.get(task_id)
            if tail is None:
                tail = self._tails[task_id] = await self._io(self._recover, task_id)
            if not entries and not ledger:
                return -1
            if self.local or fence is None:  # has another writer appended since?
                moved = await self._io(self._moved, task_id, tail)
                if moved is not None:
                    tail = await self._refresh(task_id, tail, fence, moved)
            first = tail.next_seq
            try:
                rows = []
                for i, e in enumerate(entries):
                    e.seq = first + i
                    rows.append((e.seq, e.kind, e.agent, e.step, e.ts, None, codec.encode(e)))
                rows += [(None, None, None, None, r.ts, r.key, codec.encode(r))
                         for r in ledger or ()]
                batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=_ROW)).serialize()
                if self.local:
                    new = await self._io(self._write_local, task_id, tail, batch, len(entries))
                    if self.fsync:  # a disk wait: the loop runs other tasks meanwhile
                        await self._io(os.fsync, tail.sync_fd, thread=True)
                    if self.fsync and new:  # the new file's name, too
                        await self._io(_fsync, posixpath.dirname(tail.path), thread=True)
                else:
                    name = f"{self.task_dir(task_id)}/log-{first:012d}-{tail.parts}.arrows"
                    await self._io(self._put, name, _SCHEMA_MESSAGE + batch.to_pybytes())
                    tail.parts = 0 if entries else tail.parts + 1
            except BaseException:
                for e in entries:
                    e.seq = -1
                # The batch may have landed (a failed fsync, a lost reply): the next append
                # recovers the tail from what is stored.
                self._close(task_id, self._tails.pop(task_id, None))
                raise
            tail.next_seq += len(entries)
            return tail.next_seq - 1 if entries else -1

    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with after < seq <= upto, from the segments that hold them."""
        start = max(after + 1, 0)
        if upto is not None and upto < start:
            return []
        segs = await self._io(self._segments, task_id)
        # A segment holds the seqs from its first up to the next segment's first. The first
        # segment after `upto` is looked at too (not read), to tell a hole from the log's end.
        segs = [s for i, s in enumerate(segs) if i + 1 == len(segs) or segs[i + 1].first > start]
        wanted = [s for s in segs if upto is None or s.first <= upto]
        datas: list[pa.Buffer | None] = [*await self._read_many([s.path for s in wanted]), None]
        out: list[LogEntry] = []
        for seg, data in zip(segs, datas, strict=False):
            if seg.first > start + len(out) and (upto is None or start + len(out) <= upto):
                raise CorruptRecord(task_id, f"entry {start + len(out)}",
                                    f"it is missing: the log goes on at {seg.first}")
            if data is None:
                break
            batches = _Batches(task_id, seg, data)
            batches.check(upto)
            for seqs, batch in batches.holding(start):
                for i, s in enumerate(seqs):
                    if s is None or s < start:
                        continue
                    if s != start + len(out):  # what the log promises is there, or an error
                        raise CorruptRecord(task_id, f"entry {start + len(out)}",
                                            f"it is missing: {batches.name} has {s} next")
                    if upto is not None and s > upto:
                        return out
                    e = codec.decode(LogEntry, batch.column(6)[i].as_py(), task_id=task_id,
                                     what=f"entry {s}")
                    e.seq = s
                    out.append(e)
        return out

    async def next_seq(self, task_id: str) -> int:
        """The seq after the task's last stored entry (0 if none), read from storage."""
        if self.local and not await self._io(self._segments, task_id):
            return 0  # a listing, on the loop: no hop to a thread for a task with no log here
        tail = await self._io(self._recover, task_id, thread=True)
        return tail.next_seq

    async def write_segment(self, task_id: str, entries: list[Any],
                            ledger: list[LedgerRecord] | None = None, *,
                            payloads: list[bytes] | None = None) -> int:
        """Store entries that already have their seqs (another store's), with ledger records,
        as one new segment file, written whole (and synced, on a local disk); read it back and
        return the seq after the log's last entry. This is how `TieredCheckpointer` archives.

        Entries the store already holds are skipped, so a repeated call writes nothing new
        (ledger records are written again if given again); entries that would leave a gap
        after the last stored one raise `CheckpointError`, and so does finding the segment's
        name taken (another writer got there first).

        `payloads`: each entry's bytes as another store holds them (`codec.encode` of it), to
        be stored as they are; the entries then need only their `seq`, `kind`, `agent`, `step`
        and `ts` (`redis.EntryHead`).
        """
        async with self._lock(task_id):
            # Appends of this instance would go on from a stale tail: recover it on next use.
            self._close(task_id, self._tails.pop(task_id, None))
            return await self._io(self._write_segment, task_id, entries, ledger or [],
                                  payloads, thread=True)

    def _write_segment(self, task_id: str, entries: list[Any], ledger: list[LedgerRecord],
                       payloads: list[bytes] | None = None) -> int:
        end = self._recover(task_id).next_seq
        if payloads is None:
            payloads = [codec.encode(e) for e in entries]
        kept = [(e, p) for e, p in zip(entries, payloads, strict=True) if e.seq >= end]
        new = [e for e, _ in kept]
        if [e.seq for e in new] != list(range(end, end + len(new))):
            raise CheckpointError(
                f"task {task_id}: can't archive entries {new[0].seq}..{new[-1].seq}: they must "
                f"be consecutive and start at {end}, the archived log's end")
        if not new and not ledger:
            return end
        part = sum(s.first == end for s in self._segments(task_id))
        path = f"{self.task_dir(task_id)}/log-{end:012d}{f'-{part}' if part else ''}.arrows"
        if (os.path.exists(path) if self.local else
                self.fs.get_file_info(path).type != pafs.FileType.NotFound):
            raise CheckpointError(f"task {task_id}: {path} exists: another writer is archiving")
        rows = [(e.seq, e.kind, e.agent, e.step, e.ts, None, p) for e, p in kept]
        rows += [(None, None, None, None, r.ts, r.key, codec.encode(r)) for r in ledger]
        batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=_ROW)).serialize()
        self._put(path, _SCHEMA_MESSAGE + batch.to_pybytes(), sync=True)
        # Read back what landed before anyone relies on it (the caller trims its copy next).
        batches = _Batches(task_id, _Segment(end, part, path), self._read(path) or _EMPTY)
        batches.check()
        seqs = [s for i in range(len(batches.messages)) for s in batches.get(i)[0]]
        if [s for s in seqs if s is not None] != [e.seq for e in new] or \
                seqs.count(None) != len(ledger):
            raise CheckpointError(f"task {task_id}: {path} doesn't read back as written")
        # The log's end, as read back: the new segment holds the last entries (under the
        # lock: nothing else of this instance writes the task meanwhile).
        return new[-1].seq + 1 if new else end

    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot and drop all but the newest `keep` (all kept if `keep` <= 0)."""
        data = codec.encode(snapshot)
        # A snapshot grows with the task (~1 MB at 2,000 steps): writing it would hold up the
        # loop for milliseconds, so it goes to a thread even on a local disk.
        await self._io(self._put_snapshot, snapshot.task_id, snapshot.seq, data, keep,
                       thread=True)

    def _put_snapshot(self, task_id: str, seq: int, data: bytes, keep: int) -> None:
        self._put(f"{self.task_dir(task_id)}/snap-{seq:012d}.msgpack", data)
        for old in self._snapshot_seqs(task_id)[:-keep] if keep > 0 else []:
            self._remove(f"{self.task_dir(task_id)}/snap-{old:012d}.msgpack")

    def _snapshot_seqs(self, task_id: str) -> list[int]:
        found = (_SNAP.fullmatch(name) for name in self._ls(self.task_dir(task_id)))
        return sorted(int(m[1]) for m in found if m)

    async def snapshots(self, task_id: str) -> list[int]:
        """Snapshot seqs, ascending."""
        return await self._io(self._snapshot_seqs, task_id)

    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot at `seq`, or None."""
        data = await self._io(self._read, f"{self.task_dir(task_id)}/snap-{seq:012d}.msgpack")
        if data is None:
            return None
        return codec.decode(Snapshot, data.to_pybytes(), task_id=task_id,
                            what=f"snapshot at entry {seq}")

    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Ledger records by key: the last row of each key in the task's log."""
        segs = await self._io(self._segments, task_id)
        latest: dict[str, bytes] = {}
        for seg, data in zip(segs, await self._read_many([s.path for s in segs]), strict=True):
            batches = _Batches(task_id, seg, data)
            batches.check()
            for seqs, batch in batches.holding(-1):
                if None in seqs:
                    keys, payload = batch.column(5).to_pylist(), batch.column(6)
                    latest.update((keys[i], payload[i].as_py())
                                  for i, s in enumerate(seqs) if s is None)
        return {k: codec.decode(LedgerRecord, v, task_id=task_id, what=f"ledger record {k}")
                for k, v in latest.items()}

    async def put_task(self, row: TaskRow) -> None:
        """Create or replace a task row (moving it if its swarm changed)."""
        async with self._lock(row.task_id):
            await self._io(self._put_task, row.task_id, row.swarm, codec.encode(row))

    def _put_task(self, task_id: str, swarm: str, data: bytes) -> None:
        pointer = f"{self.task_dir(task_id)}/swarm"
        found = self._read(pointer)
        old = None if found is None else found.to_pybytes().decode()
        self._put(self._row_path(swarm, task_id), data)
        if old != swarm:
            self._put(pointer, swarm.encode())
            if old is not None:
                self._remove(self._row_path(old, task_id))

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task row, or None."""
        swarm = await self._io(self._read, f"{self.task_dir(task_id)}/swarm")
        if swarm is None:
            return None
        data = await self._io(self._read, self._row_path(swarm.to_pybytes().decode(), task_id))
        return None if data is None else codec.decode(TaskRow, data.to_pybytes(),
                                                      task_id=task_id, what="row")

    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Every row of a swarm."""
        where = f"{self._base}swarms/{path_name(swarm)}/tasks"
        names = [n for n in await self._io(self._ls, where) if n.endswith(".msgpack")]
        datas = await self._read_many([f"{where}/{n}" for n in names])
        return [codec.decode(TaskRow, d.to_pybytes(), what="row",
                             task_id=unquote(n.removesuffix(".msgpack")))
                for n, d in zip(names, datas, strict=True) if d.size]

    async def delete(self, task_id: str) -> None:
        """Remove a task's log, snapshots, ledger and row."""
        async with self._lock(task_id):
            self._close(task_id, self._tails.pop(task_id, None))
            self._fences.pop(task_id, None)
            await self._io(self._delete, task_id)

    def _delete(self, task_id: str) -> None:
        swarm = self._read(f"{self.task_dir(task_id)}/swarm")
        if swarm is not None:
            self._remove(self._row_path(swarm.to_pybytes().decode(), task_id))
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self.task_dir(task_id))

    async def close(self) -> None:
        """Close open segments; a task's next use recovers its tail again."""
        for task_id, tail in list(self._tails.items()):
            self._close(task_id, tail)
        self._tails.clear()


class _Batches:
    """The record batches of one segment, decoded as needed (an IPC batch costs ~10 µs)."""

    def __init__(self, task_id: str, seg: _Segment, data: pa.Buffer) -> None:
        self.task_id, self.seg, self.name = task_id, seg, posixpath.basename(seg.path)
        self.messages: list[ipc.Message] = []
        self.torn: str | None = None  # why the segment's end can't be read
        self._decoded: dict[int, tuple[list[int | None], pa.RecordBatch]] = {}
        if data.size == 0:  # created, then its writer died before the first write
            return
        reader = ipc.MessageReader.open_stream(pa.BufferReader(data))
        try:
            if not ipc.read_schema(reader.read_next_message()).equals(LOG_SCHEMA):
                raise CorruptRecord(task_id, f"entry {seg.first}",
                                    f"{self.name} is not a log segment of this format version")
            for message in reader:  # framing only: ~1 µs a batch
                self.messages.append(message)
        except _BROKEN as e:
            self.torn = str(e)

    def get(self, i: int) -> tuple[list[int | None], pa.RecordBatch]:
        """Batch `i` and its seq column (None on ledger rows)."""
        if i not in self._decoded:
            try:
                batch = ipc.read_record_batch(self.messages[i], LOG_SCHEMA)
            except _BROKEN as e:
                raise CorruptRecord(self.task_id, f"record batch {i} of {self.name}",
                                    str(e)) from None
            self._decoded[i] = (batch.column(0).to_pylist(), batch)
        return self._decoded[i]

    def first(self, i: int) -> float:
        """The first seq in batch `i` or a later one (inf if none): ascending in `i`."""
        for j in range(i, len(self.messages)):
            found = [s for s in self.get(j)[0] if s is not None]
            if found:
                return found[0]
        return math.inf

    def end(self) -> int:
        """The seq after the segment's last entry."""
        for j in reversed(range(len(self.messages))):
            found = [s for s in self.get(j)[0] if s is not None]
            if found:
                return found[-1] + 1
        return self.seg.first

    def check(self, upto: int | None = None) -> None:
        """Raise if the segment is torn before `upto` (anywhere, if None)."""
        if self.torn is not None and (upto is None or upto >= self.end()):
            raise CorruptRecord(
                self.task_id, f"entry {self.end()}", f"{self.name} can't be read past its "
                "complete batches (a torn last batch: its writer died mid-write, or the file "
                f"is damaged): {self.torn}")

    def holding(self, seq: int) -> Iterator[tuple[list[int | None], pa.RecordBatch]]:
        """The batches from the one holding `seq` on, found by bisection."""
        i = bisect.bisect_right(range(len(self.messages)), seq, key=self.first)
        return (self.get(j) for j in range(max(i - 1, 0), len(self.messages)))


def _size(path: str) -> int:
    """A local file's size in bytes, -1 if there is none."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _fsync(path: str) -> None:
    """Put a file's data, or a directory's names, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(task_id: str, entries: list[LogEntry], uri: str,
                  filesystem: pafs.FileSystem | None = None) -> str:
    """Archive a task's log as one zstd Parquet file, `<uri>/<task>.parquet`; returns its path.

    Its columns are a log segment's without the ledger's `key`: `seq`, `kind`, `agent`, `step`
    and `ts` to query by, and `payload`, the codec bytes of each whole entry.
    """
    filesystem, root = (filesystem, uri) if filesystem is not None else open_filesystem(uri)
    path = f"{root.rstrip('/')}/{path_name(task_id)}.parquet"
    schema = LOG_SCHEMA.remove(LOG_SCHEMA.get_field_index("key")).with_metadata(
        {"swarm.format": str(FORMAT_VERSION), "swarm.task_id": task_id})
    columns = {"seq": [e.seq for e in entries], "kind": [e.kind for e in entries],
               "agent": [e.agent for e in entries], "step": [e.step for e in entries],
               "ts": [e.ts for e in entries], "payload": [codec.encode(e) for e in entries]}
    table = pa.table(columns, schema=schema)
    try:
        pq.write_table(table, path, filesystem=filesystem, compression="zstd")
    except FileNotFoundError:
        filesystem.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=filesystem, compression="zstd")
    return path
