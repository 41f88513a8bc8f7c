"""Test support for `ArrowCheckpointer`: damage its stored bytes like a bad disk or a bad writer.

`corrupter(store)` is the conformance suite's `corrupt(task_id, what, data)` hook for the Arrow
backend: `what` is `entry:<seq>` (the entry's payload in its segment is replaced, the segment
is rewritten whole) or `snapshot:<seq>` (the snapshot file is overwritten).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.ipc as ipc

from swarm.state.arrow import LOG_SCHEMA, ArrowCheckpointer


def segments(store: ArrowCheckpointer, task_id: str) -> list[str]:
    """Paths of a task's log segments, in seq order."""
    return [s.path for s in store._segments(task_id)]


def corrupter(store: ArrowCheckpointer) -> Callable[[str, str, bytes], None]:
    """The conformance hook that overwrites one stored record of `store` with `data`."""

    def corrupt(task_id: str, what: str, data: bytes) -> None:
        kind, _, number = what.partition(":")
        seq = int(number)
        if kind == "snapshot":
            with store.fs.open_output_stream(
                    f"{store.task_dir(task_id)}/snap-{seq:012d}.msgpack") as f:
                f.write(data)
            return
        for path in segments(store, task_id):
            with store.fs.open_input_file(path) as f:
                batches = list(ipc.open_stream(f.read_buffer()))
            seqs = [b.column(0).to_pylist() for b in batches]
            if any(seq in s for s in seqs):
                break
        else:
            raise KeyError(f"task {task_id} has no entry {seq}")
        out = [LOG_SCHEMA.serialize().to_pybytes()]
        for batch, batch_seqs in zip(batches, seqs, strict=True):
            if seq in batch_seqs:
                payload = batch.column(6).to_pylist()
                payload[batch_seqs.index(seq)] = data
                batch = batch.set_column(6, "payload", pa.array(payload, pa.binary()))
            out.append(batch.serialize().to_pybytes())
        # Rewritten in place (same file), as a writer still holding it open would see it.
        with store.fs.open_output_stream(path) as f:
            f.write(b"".join(out))

    return corrupt
