"""Binary encoding of state records (msgpack via msgspec), with version and integrity checks."""

from __future__ import annotations

import struct
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


# A snapshot holds a whole transcript, so it is stored compressed (zstd, through pyarrow):
# this marker, the uncompressed size, then the frame. msgpack never starts a record with 0x00
# (records are maps or arrays), so older uncompressed snapshots still read.
_ZSTD = b"\x00zs1"
_SIZE = struct.Struct("<Q")
_COMPRESS_FROM = 4096  # bytes; smaller snapshots aren't worth it


def encode(record: LogEntry | Snapshot | LedgerRecord | TaskRow) -> bytes:
    """msgpack bytes of a record (a large snapshot's compressed)."""
    data = _encoder.encode(record)
    if type(record) is Snapshot and len(data) >= _COMPRESS_FROM:
        import pyarrow as pa

        return _ZSTD + _SIZE.pack(len(data)) + pa.compress(data, codec="zstd", asbytes=True)
    return data


def _expand(data: bytes) -> bytes:
    import pyarrow as pa

    (size,) = _SIZE.unpack_from(data, len(_ZSTD))
    return pa.decompress(data[len(_ZSTD) + _SIZE.size:], decompressed_size=size,
                         codec="zstd", asbytes=True)


def decode(cls: type[T], data: bytes, *, task_id: str, what: str) -> T:
    """Decode one record; raise `CorruptRecord` naming the task and `what` if it is unusable."""
    try:
        if data[:len(_ZSTD)] == _ZSTD:
            data = _expand(data)
        record = _decoders[cls].decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, OSError, ValueError, struct.error) as e:
        raise CorruptRecord(task_id, what, f"can't decode ({e})") from None
    if record.v != FORMAT_VERSION:
        raise CorruptRecord(
            task_id, what, f"format version {record.v}, this swarm reads {FORMAT_VERSION}"
        )
    return record
