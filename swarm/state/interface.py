"""Durable state: the `Checkpointer` interface and the records it stores.

A task's state is an append-only log of entries plus occasional snapshots (DESIGN decision 6):

- `LogEntry` records what happened, in order: a turn started, the model answered (with its tool
  calls: the intent, logged before any tool runs), a tool call finished (its result), a turn
  ended, the task changed state. Each step appends only what it added.
- `Snapshot` is the state folded up to some entry (`seq`), so a restore reads the latest snapshot
  plus the entries after it, and cost stays flat however long the task grows.
- `LedgerRecord` is the idempotency ledger: one record per tool call, keyed by
  `task:agent:step:index`, saying whether it started or finished and with what result. A log
  entry and its ledger records are written atomically in one round trip.
- `TaskRow` is the supervisor's row of a task, so the task table survives restarts.

Every record carries the format version it was written with. Backends raise `CorruptRecord` (a
`CheckpointError`) naming the task and the entry when a stored record can't be decoded, is
truncated, or has a version this code doesn't know; they never skip one silently.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, Literal

import msgspec

from swarm._urls import redact_url
from swarm.errors import CheckpointError

FORMAT_VERSION = 1

def _version() -> int:
    # A factory rather than a plain default: with omit_defaults, msgspec leaves out fields
    # equal to their default, and the version must be written into every record.
    return FORMAT_VERSION


EntryKind = Literal["turn_start", "model", "tool", "turn_end", "task", "approval"]


class LogEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One fact in a task's log; `seq` is assigned by the store on append (0, 1, 2, ...)."""

    kind: str
    agent: str = ""
    step: int = 0
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ts: float = 0.0
    seq: int = -1
    v: int = msgspec.field(default_factory=_version)


class Snapshot(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task's state folded up to and including entry `seq`."""

    task_id: str
    seq: int
    step: int
    data: dict[str, Any]
    ts: float = 0.0
    v: int = msgspec.field(default_factory=_version)


class LedgerRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The idempotency record of one tool call."""

    key: str
    state: Literal["started", "finished"]
    tool: str
    args_hash: str = ""
    result: str | None = None
    is_error: bool = False
    ts: float = 0.0
    v: int = msgspec.field(default_factory=_version)


class TaskRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The supervisor's durable row of a task (its summary and A2A task bytes)."""

    task_id: str
    swarm: str
    state: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    updated: float = 0.0
    v: int = msgspec.field(default_factory=_version)


class CorruptRecord(CheckpointError):
    """A stored record can't be used: undecodable, truncated, or of an unknown version."""

    def __init__(self, task_id: str, what: str, reason: str) -> None:
        self.task_id = task_id
        self.what = what
        super().__init__(f"task {task_id}: {what} is unusable: {reason}")


class Fenced(CheckpointError):
    """An append carried an older writer token than the task's current one: another writer
    (a resumed copy of the turn) has taken the task over, so this one must stop."""

    def __init__(self, task_id: str, token: int, current: int) -> None:
        self.task_id, self.token, self.current = task_id, token, current
        super().__init__(f"task {task_id}: writer token {token} was superseded by {current}; "
                         "another copy of this turn took over")


class LostWrites(CheckpointError):
    """An append landed somewhere other than right after this writer's previous one: entries
    the store had acknowledged as durable are gone from the task's log (a Redis server that
    restarted without its data, or a log file replaced behind the writer's back). The turn
    stops rather than go on from a log that no longer holds what it did: resumed from there,
    finished tool calls would run again."""

    def __init__(self, task_id: str, expected: int, got: int, store: Any = None, *,
                 what: str | None = None) -> None:
        """`store`: the checkpointer, named in the message by its URL (credentials hidden)."""
        self.task_id, self.expected, self.got = task_id, expected, got
        url = getattr(store, "url", None)
        where = f" ({redact_url(str(url))})" if url else ""
        what = what or (f"the log should have continued at seq {expected}, but the append "
                        f"landed at seq {got}")
        super().__init__(
            f"task {task_id}: the durable store{where} lost entries it had acknowledged: "
            f"{what}. Was the store restarted without its data (Redis needs appendonly yes, "
            "as the embedded one has)? The turn stops here; entries before the loss can't be "
            "recovered from this store")


class StoreUnavailable(CheckpointError):
    """The durable store can't be reached (after the backend's own bounded retries)."""


class TableNotLoaded(StoreUnavailable):
    """A restarted supervisor can't load its task table yet (its store can't be reached): it
    keeps trying by itself, so a client's call may be sent again."""


class Checkpointer(ABC):
    """Durable storage of task logs, snapshots, the idempotency ledger and task rows.

    Every write is durable when its coroutine returns: the runtime never reports a step done
    before its checkpoint is. Implementations must be safe for concurrent use by many tasks in
    one event loop. The conformance suite in `tests/state/conformance.py` pins the behaviour.
    """

    name: str = "checkpointer"

    async def start(self) -> None:  # noqa: B027 - documented no-op hook
        """Connect; raise `StoreUnavailable` with a clear message if the store can't be reached."""

    @abstractmethod
    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
        *, fence: int | None = None,
    ) -> int:
        """Append entries (assigning their seq) and upsert ledger records, atomically, in one
        round trip; return the seq of the last entry appended (-1 if none).

        With `fence` (a token from `claim`), the append happens only if no newer token was
        claimed for the task since; otherwise it raises `Fenced` and changes nothing.
        """

    @abstractmethod
    async def claim(self, task_id: str) -> int:
        """Become the task's writer: a token greater than every token claimed before for it.

        A turn claims one when it starts or resumes; appends fenced with an older token then
        fail, so a copy of a turn that is still running somewhere (a replica cut off rather
        than dead) can't write, and can't start a tool call, once another copy took over.
        """

    @abstractmethod
    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with `after < seq <= upto` (all after `after` when `upto` is None), in order."""

    @abstractmethod
    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot and drop all but the newest `keep` of the task's snapshots.

        Older ones are only a faster start: the log is complete, so a fallback or a fork
        before the oldest kept snapshot replays from the beginning.
        """

    @abstractmethod
    async def snapshots(self, task_id: str) -> list[int]:
        """The seqs of the task's stored snapshots, ascending."""

    @abstractmethod
    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot taken at `seq`, or None; `CorruptRecord` if it can't be decoded."""

    @abstractmethod
    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Every ledger record of a task, by key."""

    @abstractmethod
    async def put_task(self, row: TaskRow) -> None:
        """Create or replace a task's row."""

    async def put_tasks(self, rows: list[TaskRow]) -> list[BaseException | None]:
        """`put_task` for several rows at once; what each failed with, or None (one row's
        failure doesn't stop the others). The default writes them concurrently; a store that
        can batch the writes (Redis: one round trip) does."""
        done = await asyncio.gather(*(self.put_task(r) for r in rows), return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in done]

    @abstractmethod
    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task's row, or None."""

    @abstractmethod
    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Every task row of a swarm."""

    @abstractmethod
    async def delete(self, task_id: str) -> None:
        """Remove everything stored for a task (log, snapshots, ledger, row)."""

    async def epoch(self) -> str | None:
        """A token the store keeps for as long as it keeps its data, made by the first call
        that finds none: a store that lost everything (a Redis server restarted without its
        append-only file, its database flushed) answers another one from then on. A process
        that remembers the token from before can tell that a resume would read an empty log
        and run finished tool calls again. None where the store can't tell (the default)."""
        return None

    async def close(self) -> None:  # noqa: B027 - documented no-op hook
        """Release connections; the default does nothing."""


def ledger_key(task_id: str, agent: str, step: int, index: int) -> str:
    """The idempotency key of a tool call: the same logical call always gets the same key."""
    return f"{task_id}:{agent}:{step}:{index}"
