"""Checkpoint cost as a session grows: bytes and µs per checkpoint, snapshots, restore time.

One session of 2,000 steps; the per-checkpoint figure at step N is the median of the appends
of steps N-49..N. Each step checkpoints what it added, as the journal does for a
tool step: one append of a log entry holding a ~400-byte tool message, plus its ledger record,
in one round trip. A compacted snapshot (the folded state: every message so far) is written
every K steps, in the background as the journal does; its cost is reported on its own.
Restore = the newest snapshot at or before the step + the entries after it, decoded and folded.

    python scripts/bench_checkpoint.py                     # memory and Redis (private server)
    python scripts/bench_checkpoint.py --backends redis --steps 2000 --snapshot-every 100

Recovery after an actor kill or a node loss needs Ray: scripts/recovery_scenarios.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.state import codec
from swarm.state.interface import Checkpointer, LedgerRecord, LogEntry
from swarm.state.replay import fold, restore, to_snapshot

MARKS = (10, 100, 500, 2000)


def step_records(step: int) -> tuple[LogEntry, LedgerRecord]:
    """What one tool step adds: its ~400-byte tool message and the call's ledger record."""
    content = f"result of step {step}: " + "r" * 370
    message = {"role": "tool", "tool_call_id": f"call_{step}_0", "content": content}
    entry = LogEntry(kind="tool", agent="bench", step=step, ts=time.time(),
                     data={"message": message, "index": 0})
    ledger = LedgerRecord(key=f"bench-task:bench:{step}:0", state="finished", tool="echo",
                          args_hash="0123456789abcdef", result=content[:64], ts=time.time())
    return entry, ledger


async def run(store: Checkpointer, steps: int, snapshot_every: int) -> dict[str, Any]:
    task = f"bench-{time.time_ns()}"
    append_us: list[float] = []
    append_bytes: list[int] = []
    snap_rows: list[tuple[int, float, int]] = []
    entries: list[LogEntry] = []
    seq_at: dict[int, int] = {}
    message_bytes = 0
    for step in range(1, steps + 1):
        entry, ledger = step_records(step)
        message_bytes += len(entry.data["message"]["content"])
        size = len(codec.encode(entry)) + len(codec.encode(ledger))
        t0 = time.perf_counter()
        seq_at[step] = await store.append(task, [entry], [ledger])
        append_us.append((time.perf_counter() - t0) * 1e6)
        append_bytes.append(size)
        entries.append(entry)
        if snapshot_every and step % snapshot_every == 0:
            snap = to_snapshot(task, fold(None, entries), time.time())
            t0 = time.perf_counter()
            await store.put_snapshot(snap)
            snap_rows.append((step, (time.perf_counter() - t0) * 1e6, len(codec.encode(snap))))
    rows = []
    for mark in MARKS:
        if mark > steps:
            continue
        window = append_us[max(0, mark - 50):mark]
        restores = []
        for _ in range(5):
            t0 = time.perf_counter()
            state, _ = await restore(store, task, upto=seq_at[mark])
            restores.append((time.perf_counter() - t0) * 1e3)
        assert len(state.transcript) == mark, (mark, len(state.transcript))
        snap = max((r for r in snap_rows if r[0] <= mark), default=None)
        rows.append({
            "step": mark, "append_us": statistics.median(window),
            "bytes": append_bytes[mark - 1], "restore_ms": statistics.median(restores),
            "snapshot_us": snap[1] if snap else None, "snapshot_bytes": snap[2] if snap else None,
        })
    await store.delete(task)
    return {"rows": rows, "message_bytes": message_bytes,
            # What stays stored: the log and the snapshots a store keeps (the newest 3).
            "stored_bytes": sum(append_bytes) + sum(r[2] for r in snap_rows[-3:]),
            "log_bytes": sum(append_bytes)}


def report(name: str, result: dict[str, Any], snapshot_every: int) -> None:
    rows = result["rows"]
    print(f"\n== {name}")
    print(f"{'step':>6} {'checkpoint µs':>14} {'bytes':>7} {'restore ms':>11} "
          f"{'last snapshot':>15}")
    for r in rows:
        snap = "-" if r["snapshot_us"] is None else \
            f"{r['snapshot_us'] / 1e3:.1f} ms/{r['snapshot_bytes'] // 1024} KB"
        print(f"{r['step']:>6} {r['append_us']:>14.0f} {r['bytes']:>7} "
              f"{r['restore_ms']:>11.2f} {snap:>15}")
    first, last = rows[0], rows[-1]
    ratio = last["append_us"] / first["append_us"]
    print(f"checkpoint cost at step {last['step']} / step {first['step']}: {ratio:.2f}x "
          f"(target <= 1.2x)")
    print(f"restore at step {last['step']}: {last['restore_ms']:.1f} ms (target <= 50 ms)")
    print(f"log bytes / message bytes: {result['log_bytes'] / result['message_bytes']:.2f}; "
          f"with the 3 newest snapshots kept: "
          f"{result['stored_bytes'] / result['message_bytes']:.2f}")


async def bench_backend(name: str, steps: int, snapshot_every: int) -> None:
    if name == "memory":
        from swarm.state.memory import MemoryCheckpointer

        report("memory (in-process baseline)",
               await run(MemoryCheckpointer(), steps, snapshot_every), snapshot_every)
    elif name == "redis":
        from swarm.state.embedded import EmbeddedRedis
        from swarm.state.redis import RedisCheckpointer

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="swarm-bench-")))
        server.start()
        url = server.url
        try:
            store = RedisCheckpointer(server.url)
            await store.start()
            result = await run(store, steps, snapshot_every)
            await store.close()
        finally:
            server.stop()
        report(f"redis (private redis-server on loopback, AOF everysec) {url}", result,
               snapshot_every)
    elif name == "arrow":
        try:
            from swarm.state.arrow import ArrowCheckpointer
        except ImportError:
            print("\n== arrow: not available (swarm.state.arrow is not implemented yet)")
            return
        root = Path(tempfile.mkdtemp(prefix="swarm-bench-arrow-"))
        store = ArrowCheckpointer(f"file://{root}")
        await store.start()
        report(f"arrow (IPC segments, {root})", await run(store, steps, snapshot_every),
               snapshot_every)
        await store.close()
    else:
        raise SystemExit(f"unknown backend {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--snapshot-every", type=int, default=100)
    ap.add_argument("--backends", default="memory,redis,arrow")
    args = ap.parse_args()
    if args.steps < 10:
        ap.error("--steps must be at least 10")
    for name in args.backends.split(","):
        asyncio.run(bench_backend(name.strip(), args.steps, args.snapshot_every))


if __name__ == "__main__":
    main()
