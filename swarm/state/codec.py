"""Binary encoding of state records (msgpack via msgspec), with version and integrity checks."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from swarm.state.interface import (
    FORMAT_VERSION,
    CorruptRecord,
    LedgerRecord,
    LogEntry,
    Snapshot,
    TaskRow,
)

T = TypeVar("T", LogEntry, Snapshot, LedgerRecord, TaskRow)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {
    cls: msgspec.msgpack.Decoder(cls) for cls in (LogEntry, Snapshot, LedgerRecord, TaskRow)
}


def encode(record: LogEntry | Snapshot | LedgerRecord | TaskRow) -> bytes:
    """msgpack bytes of a record."""
    return _encoder.encode(record)


def decode(cls: type[T], data: bytes, *, task_id: str, what: str) -> T:
    """Decode one record; raise `CorruptRecord` naming the task and `what` if it is unusable."""
    try:
        record = _decoders[cls].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CorruptRecord(task_id, what, f"can't decode ({e})") from None
    if record.v != FORMAT_VERSION:
        raise CorruptRecord(
            task_id, what, f"format version {record.v}, this swarm reads {FORMAT_VERSION}"
        )
    return record
