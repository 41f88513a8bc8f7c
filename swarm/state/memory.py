"""`MemoryCheckpointer`: the `Checkpointer` in one process, for unit tests and `LocalSwarm`.

It stores encoded bytes, like a real store, so codec problems show up here too, and tests can
damage a stored record (`logs[task][seq]`, `snaps[task][seq]`) to see how corruption is handled.
Every method finishes without awaiting, so each call is atomic in its event loop.
"""

from __future__ import annotations

from typing import Any

from swarm.state import codec
from swarm.state.interface import (
    Checkpointer,
    Fenced,
    LedgerRecord,
    LogEntry,
    Snapshot,
    TaskRow,
)


class MemoryCheckpointer(Checkpointer):
    """Task logs, snapshots, ledger and rows in dicts of encoded records."""

    name = "memory"

    def __init__(self) -> None:
        self.logs: dict[str, list[bytes]] = {}
        self.snaps: dict[str, dict[int, bytes]] = {}
        self.ledgers: dict[str, dict[str, bytes]] = {}
        self.rows: dict[str, bytes] = {}
        self.row_swarm: dict[str, str] = {}
        self.fences: dict[str, int] = {}

    async def claim(self, task_id: str) -> int:
        """A new writer token for the task."""
        token = self.fences.get(task_id, 0) + 1
        self.fences[task_id] = token
        return token

    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
        *, fence: int | None = None,
    ) -> int:
        """Append entries and upsert ledger records (atomic: nothing is awaited)."""
        current = self.fences.get(task_id, 0)
        if fence is not None and fence < current:
            raise Fenced(task_id, fence, current)
        encoded = [codec.encode(e) for e in entries]  # fail before changing anything
        records = [(rec.key, codec.encode(rec)) for rec in ledger or ()]
        log = self.logs.setdefault(task_id, [])
        first = len(log)
        log += encoded
        for i, e in enumerate(entries):
            e.seq = first + i
        if records:
            self.ledgers.setdefault(task_id, {}).update(records)
        return len(log) - 1 if entries else -1

    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with after < seq <= upto."""
        log = self.logs.get(task_id, [])
        end = len(log) if upto is None else min(len(log), upto + 1)
        out = []
        for i in range(max(after + 1, 0), end):
            entry = codec.decode(LogEntry, log[i], task_id=task_id, what=f"entry {i}")
            entry.seq = i
            out.append(entry)
        return out

    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot, keeping the newest `keep` (all of them if `keep` <= 0)."""
        snaps = self.snaps.setdefault(snapshot.task_id, {})
        snaps[snapshot.seq] = codec.encode(snapshot)
        for seq in sorted(snaps)[:-keep] if keep > 0 else []:
            del snaps[seq]

    async def snapshots(self, task_id: str) -> list[int]:
        """Snapshot seqs, ascending."""
        return sorted(self.snaps.get(task_id, {}))

    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot at `seq`, or None."""
        data = self.snaps.get(task_id, {}).get(seq)
        if data is None:
            return None
        return codec.decode(Snapshot, data, task_id=task_id, what=f"snapshot at entry {seq}")

    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Ledger records by key."""
        return {
            k: codec.decode(LedgerRecord, v, task_id=task_id, what=f"ledger record {k}")
            for k, v in self.ledgers.get(task_id, {}).items()
        }

    async def put_task(self, row: TaskRow) -> None:
        """Create or replace a task row."""
        self.rows[row.task_id] = codec.encode(row)
        self.row_swarm[row.task_id] = row.swarm

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task row, or None."""
        data = self.rows.get(task_id)
        return None if data is None else codec.decode(TaskRow, data, task_id=task_id, what="row")

    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Rows of one swarm."""
        return [
            codec.decode(TaskRow, self.rows[t], task_id=t, what="row")
            for t, s in self.row_swarm.items() if s == swarm
        ]

    async def delete(self, task_id: str) -> None:
        """Remove everything of one task."""
        for table in (self.logs, self.snaps, self.ledgers, self.rows, self.row_swarm,
                      self.fences):
            table.pop(task_id, None)  # type: ignore[attr-defined]

    async def info(self) -> dict[str, Any]:
        """Counts for status displays: swarms, task rows, logs and stored bytes."""
        stored = sum(len(b) for log in self.logs.values() for b in log)
        stored += sum(len(b) for t in (self.snaps, self.ledgers) for d in t.values()
                      for b in d.values())
        stored += sum(len(b) for b in self.rows.values())
        return {"store": "memory", "swarms": len(set(self.row_swarm.values())),
                "tasks": len(self.rows), "logs": len(self.logs), "stored_bytes": stored}
