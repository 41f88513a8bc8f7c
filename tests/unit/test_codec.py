"""State record encoding: snapshots are stored compressed and read back whole."""

from __future__ import annotations

import msgspec
import pytest

from swarm.state import codec
from swarm.state.interface import CorruptRecord, LogEntry, Snapshot


def _snapshot(n: int) -> Snapshot:
    transcript = [{"role": "tool", "content": f"result {i}: " + "order shipped " * 8}
                  for i in range(n)]
    return Snapshot(task_id="t", seq=n, step=n, data={"transcript": transcript})


def test_a_large_snapshot_is_compressed_and_reads_back_equal() -> None:
    snap = _snapshot(500)
    raw = msgspec.msgpack.encode(snap)
    data = codec.encode(snap)
    assert len(data) < len(raw) / 3
    assert codec.decode(Snapshot, data, task_id="t", what="snapshot") == snap


def test_small_records_and_older_uncompressed_snapshots_still_read() -> None:
    small = _snapshot(1)
    assert codec.encode(small) == msgspec.msgpack.encode(small)
    old = msgspec.msgpack.encode(_snapshot(500))  # as stored before compression
    assert codec.decode(Snapshot, old, task_id="t", what="snapshot") == _snapshot(500)
    entry = LogEntry(kind="model", agent="a", step=1, data={"x": "y" * 10_000})
    assert codec.encode(entry) == msgspec.msgpack.encode(entry)  # log entries aren't


def test_a_damaged_compressed_snapshot_is_a_corrupt_record() -> None:
    data = codec.encode(_snapshot(500))
    with pytest.raises(CorruptRecord, match="snapshot"):
        codec.decode(Snapshot, data[:-40], task_id="t", what="snapshot")
    with pytest.raises(CorruptRecord, match="snapshot"):
        codec.decode(Snapshot, data[:12], task_id="t", what="snapshot")
