"""Checkpoint cost as a session grows: µs and bytes per checkpoint, snapshots, restore time.

One session of 2,000 steps per backend: memory (the in-process baseline), Redis (a private
redis-server started by `EmbeddedRedis`), Arrow IPC files, Arrow with `fsync=True`, and tiered
(that Redis with an Arrow archive behind it, archiving as a snapshot passes 1,000 entries). A step
checkpoints what a tool step adds, as the journal does: one `append` of a log entry holding a
~400-byte tool message plus the call's ledger record. Every K steps a compacted snapshot (the
folded state: a dict with every message so far) is written; its cost is reported on its own.

At steps 10, 100, 500 and 2,000:

- ckpt µs: the median of the appends of steps N-9..N
- bytes/ckpt: how much what the store holds for the log and ledger grew per step over those
  steps (Redis: MEMORY USAGE of the task's keys; Arrow: segment file sizes; memory: bytes)
- snapshot: µs and bytes of the snapshot written at step N (when N is a multiple of K)
- restore ms: the newest snapshot plus the entries after it, read, decoded and folded, taken
  right after step N (median of 5)

    python scripts/bench_checkpoint.py
    python scripts/bench_checkpoint.py --backends redis,arrow --steps 2000 --snapshot-every 100

With the tiered backend it prints one more line: the Redis bytes of a session before compaction,
after archiving up to its previous snapshot, and after archiving it as a finished task.

`--finished N` measures instead what archiving finished tasks costs under a steady load: N
tasks shaped like the concurrency workload's in `scripts/bench_suite.py` (12 appends: the turn's
start, ten steps of a model call and a tool result with its ledger record, the answer and the
turn's end), all written to Redis, then their rows stored as completed together so the tiered
store archives them all in its background; the CPU of the whole process (every thread, the
filesystem's kernel work included) and the wall time until the last one is archived, per task.

    python scripts/bench_checkpoint.py --finished 2000

With the Redis backend it then runs `scripts/recovery_scenarios.py actor-kill` and `node-loss`
(each in its own process with its own local Ray cluster, ~1 minute each) and prints the time
from an agent actor kill, and from a worker node removal, to the next completed step of a task
that was running there. `--no-recovery` skips them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.state import codec
from swarm.state.interface import Checkpointer, LedgerRecord, LogEntry
from swarm.state.replay import TaskState, apply, restore, to_snapshot
from swarm.state.tiered import TieredCheckpointer

MARKS = (10, 100, 500, 2000)
WINDOW = 10  # appends per per-checkpoint median
TARGET_GROWTH = 1.2  # per-checkpoint cost at step 2,000 within 1.2x of step 10
TARGET_RESTORE_MS = 50.0  # restore of a 2,000-step session


class Backend(NamedTuple):
    """A store under test and how to weigh what it holds for a task."""

    label: str
    store: Checkpointer
    log_bytes: Callable[[str], int]  # the task's log and ledger
    snapshot_bytes: Callable[[str], int]  # the task's kept snapshots


def step_records(task: str, step: int) -> tuple[LogEntry, LedgerRecord]:
    """What one tool step adds: its ~400-byte tool message and the call's ledger record."""
    content = f"result of step {step}: " + "r" * 370
    message = {"role": "tool", "tool_call_id": f"call_{step}_0", "content": content}
    entry = LogEntry(kind="tool", agent="bench", step=step, ts=time.time(),
                     data={"message": message, "index": 0})
    ledger = LedgerRecord(key=f"{task}:bench:{step}:0", state="finished", tool="echo",
                          args_hash="0123456789abcdef", result=content[:64], ts=time.time())
    return entry, ledger


async def run(b: Backend, steps: int, every: int) -> dict[str, Any]:
    """One session; a row of figures per mark, and the stored and raw byte totals."""
    store, task = b.store, f"bench-{time.time_ns()}"
    marks = [m for m in MARKS if m <= steps] or [steps]
    state = TaskState()
    append_us: list[float] = []
    before: dict[int, int] = {}
    rows: list[dict[str, Any]] = []
    snapshot: dict[int, tuple[float, int]] = {}
    raw = 0
    for step in range(1, steps + 1):
        if step - 1 + WINDOW in marks:
            before[step - 1 + WINDOW] = b.log_bytes(task)
        entry, ledger = step_records(task, step)
        raw += len(entry.data["message"]["content"])
        t0 = time.perf_counter()
        await store.append(task, [entry], [ledger])
        append_us.append((time.perf_counter() - t0) * 1e6)
        apply(state, entry)
        if every and step % every == 0:
            snap = to_snapshot(task, state, time.time())
            t0 = time.perf_counter()
            await store.put_snapshot(snap)
            snapshot[step] = ((time.perf_counter() - t0) * 1e6, len(codec.encode(snap)))
        if step in marks:
            restores = []
            for _ in range(5):
                t0 = time.perf_counter()
                restored, _ = await restore(store, task)
                restores.append((time.perf_counter() - t0) * 1e3)
                assert len(restored.transcript) == step and restored.seq == state.seq
            rows.append({"step": step, "append_us": statistics.median(append_us[-WINDOW:]),
                         "bytes": (b.log_bytes(task) - before[step]) / WINDOW,
                         "snapshot": snapshot.get(step),
                         "restore_ms": statistics.median(restores)})
    result = {"rows": rows, "raw": raw, "log": b.log_bytes(task),
              "snapshots": b.snapshot_bytes(task)}
    await store.delete(task)
    return result


def report(label: str, result: dict[str, Any]) -> dict[str, Any]:
    """Print one backend's table and its figures against the targets; return a summary."""
    rows = result["rows"]
    print(f"\n== {label}")
    print(f"{'step':>6} {'ckpt µs':>9} {'bytes/ckpt':>11} {'snapshot µs':>12} "
          f"{'snapshot KB':>12} {'restore ms':>11}")
    for r in rows:
        snap_us, snap_kb = ("-", "-") if r["snapshot"] is None else (
            f"{r['snapshot'][0]:.0f}", f"{r['snapshot'][1] / 1024:.0f}")
        print(f"{r['step']:>6} {r['append_us']:>9.0f} {r['bytes']:>11.0f} {snap_us:>12} "
              f"{snap_kb:>12} {r['restore_ms']:>11.2f}")
    first, last = rows[0], rows[-1]
    growth = last["append_us"] / first["append_us"]
    print(f"ckpt µs at step {last['step']} / step {first['step']}: {growth:.2f}x "
          f"(target <= {TARGET_GROWTH}x: {'ok' if growth <= TARGET_GROWTH else 'MISSED'})")
    ok = last["restore_ms"] <= TARGET_RESTORE_MS
    print(f"restore of a {last['step']}-step session: {last['restore_ms']:.1f} ms "
          f"(target <= {TARGET_RESTORE_MS:g} ms: {'ok' if ok else 'MISSED'})")
    log_ratio = result["log"] / result["raw"]
    total_ratio = (result["log"] + result["snapshots"]) / result["raw"]
    print(f"stored / raw message bytes: {log_ratio:.2f}x for log and ledger, "
          f"{total_ratio:.2f}x with the kept snapshots ({result['raw'] / 1024:.0f} KB raw)")
    return {"label": label, "first": first, "last": last, "growth": growth,
            "log_ratio": log_ratio, "total_ratio": total_ratio}


# -- backends -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_backend(name: str) -> AsyncIterator[Backend]:
    """A started store of the named backend, stopped (and its files removed) afterwards."""
    if name == "memory":
        from swarm.state.memory import MemoryCheckpointer

        mem = MemoryCheckpointer()
        yield Backend("memory (in-process baseline)", mem,
                      lambda t: sum(map(len, mem.logs.get(t, ())))
                      + sum(map(len, mem.ledgers.get(t, {}).values())),
                      lambda t: sum(map(len, mem.snaps.get(t, {}).values())))
    elif name in ("redis", "tiered"):
        async with _redis(tiered=name == "tiered") as backend:
            yield backend
    elif name in ("arrow", "arrow-fsync"):
        from swarm.state.arrow import ArrowCheckpointer

        root = Path(tempfile.mkdtemp(prefix="swarm-bench-arrow-"))
        store = ArrowCheckpointer(root.as_uri(), fsync=name == "arrow-fsync")
        await store.start()
        what = "flush + fsync per append" if store.fsync else "flush per append"
        try:
            yield Backend(f"{name} (IPC segments under {root}, {what})", store,
                          lambda t: _file_bytes(store, t, "log-"),
                          lambda t: _file_bytes(store, t, "snap-"))
        finally:
            await store.close()
            shutil.rmtree(root, ignore_errors=True)
    else:
        raise SystemExit(f"unknown backend {name!r}: memory, redis, arrow, arrow-fsync or "
                         "tiered")


@contextlib.asynccontextmanager
async def _redis(tiered: bool = False) -> AsyncIterator[Backend]:
    import redis

    from swarm.state.arrow import ArrowCheckpointer
    from swarm.state.embedded import EmbeddedRedis
    from swarm.state.redis import RedisCheckpointer

    run_dir = Path(tempfile.mkdtemp(prefix="swarm-bench-redis-"))
    server = EmbeddedRedis(run_dir)
    server.start()
    raw = redis.Redis.from_url(server.url)
    hot = RedisCheckpointer(server.url)
    store: Checkpointer = hot
    label = f"redis (private redis-server on loopback, AOF everysec, {server.url})"
    if tiered:
        store = TieredCheckpointer(hot, ArrowCheckpointer((run_dir / "archive").as_uri()))
        label = f"tiered ({label[7:-1]}; archive under {run_dir / 'archive'})"

    def usage(task: str, *what: str) -> int:
        return sum(raw.memory_usage(f"{hot.prefix}:t:{task}:{w}", samples=0) or 0
                   for w in what)

    try:
        await store.start()
        yield Backend(label, store, lambda t: usage(t, "log", "ledger", "tok", "arch"),
                      lambda t: usage(t, "snap"))
    finally:
        await store.close()
        raw.close()
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def compaction(b: Backend, steps: int, every: int) -> None:
    """Print the Redis bytes of a session before and after archiving it (tiered backend)."""
    from swarm.state.interface import TaskRow

    store = b.store
    assert isinstance(store, TieredCheckpointer)
    manual = TieredCheckpointer(store.hot, store.archive, archive_after=0)  # no automatic runs
    task, state = f"compact-{time.time_ns()}", TaskState()
    for step in range(1, steps + 1):
        entry, ledger = step_records(task, step)
        await manual.append(task, [entry], [ledger])
        apply(state, entry)
        if every and step % every == 0:
            await manual.put_snapshot(to_snapshot(task, state, time.time()))

    def held() -> float:
        return (b.log_bytes(task) + b.snapshot_bytes(task)) / 1024

    before = held()
    snaps = await manual.snapshots(task)
    t0 = time.perf_counter()
    await manual.archive_log(task, snaps[-2] if len(snaps) > 1 else None)
    segment_ms, segment = (time.perf_counter() - t0) * 1e3, held()
    await manual.put_task(TaskRow(task_id=task, swarm="bench", state="completed"))
    t0 = time.perf_counter()
    await manual.drain()
    finished_ms, finished = (time.perf_counter() - t0) * 1e3, held()
    archived = _file_bytes(store.archive, task, "") / 1024
    print(f"redis bytes of the {steps}-step session (log, ledger, snapshots): {before:.0f} KB; "
          f"archived up to the previous snapshot: {segment:.0f} KB ({segment_ms:.0f} ms); "
          f"finished and archived: {finished:.1f} KB ({finished_ms:.0f} ms); archive on disk: "
          f"{archived:.0f} KB")
    await manual.delete(task)


async def finished_cost(n: int, rounds: int) -> None:
    """Print the CPU and wall time a finished task costs to archive (`--finished`)."""
    from swarm.state.interface import TaskRow

    async with _redis(tiered=True) as b:
        store = b.store
        assert isinstance(store, TieredCheckpointer)
        print(f"archiving {n} finished tasks at once, {rounds} rounds: {b.label}")
        for r in range(rounds):
            tasks = [f"done-{r}-{i}-{time.time_ns()}" for i in range(n)]

            async def fill(task: str) -> None:
                start = LogEntry(kind="turn_started", agent="bench", data={"text": "t" * 200})
                await store.append(task, [start])
                for step in range(1, 11):
                    entry, ledger = step_records(task, step)
                    call = LogEntry(kind="model", agent="bench", step=step,
                                    data={"message": {"role": "assistant", "content": "c" * 200}})
                    await store.append(task, [call, entry], [ledger])
                answer = LogEntry(kind="model", agent="bench", step=11,
                                  data={"message": {"role": "assistant", "content": "a" * 200}})
                await store.append(task, [answer, LogEntry(kind="turn_ended", agent="bench")])

            await asyncio.gather(*(fill(t) for t in tasks))
            rows = [TaskRow(task_id=t, swarm="bench", state="completed") for t in tasks]
            cpu, wall = time.process_time(), time.perf_counter()
            await store.put_tasks(rows)
            await store.drain()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            left = sum([(await store.hot.bounds(t)).end > (await store.hot.bounds(t)).base
                        for t in tasks])
            print(f"round {r + 1}: {cpu / n * 1e6:.0f} µs of CPU and {wall / n * 1e6:.0f} µs "
                  f"of wall time a finished task; {left} of {n} still hold entries in redis")


def _file_bytes(store: Any, task: str, prefix: str) -> int:
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(store.task_dir(task), allow_not_found=True)
    return sum(i.size or 0 for i in store.fs.get_file_info(selector)
               if i.base_name.startswith(prefix))


# -- recovery (on a real Ray, through recovery_scenarios.py) -------------------------------------


def scenario_figures(scenario: str) -> dict[str, Any]:
    """Run `recovery_scenarios.py SCENARIO --json` in its own process (it starts its own Ray
    cluster and Redis) and return its figures, plus whether every check passed."""
    script = Path(__file__).resolve().with_name("recovery_scenarios.py")
    proc = subprocess.run([sys.executable, str(script), scenario, "--json"],
                          capture_output=True, text=True, timeout=900, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{scenario} printed no figures (exit {proc.returncode}): "
                           f"{proc.stderr[-400:]}")
    data = json.loads(lines[-1])
    return {**data.get("figures", {}), "passed": proc.returncode == 0}


def recovery(backend: str) -> None:
    """Print the time from an actor kill and from a node removal to the next completed step.

    The scenarios run a deployed swarm whose state is in Redis, so they belong to that
    backend's figures.
    """
    if backend != "redis":
        return
    kill = scenario_figures("actor-kill")
    print(f"recovery after an actor kill: median {kill.get('recovery_ms_median')} ms, max "
          f"{kill.get('recovery_ms_max')} ms over {len(kill.get('recovery_ms_each', []))} "
          f"kills (target <= 1000 ms){'' if kill['passed'] else '; CHECKS FAILED'}")
    node = scenario_figures("node-loss")
    print(f"recovery after a node removal: {node.get('recovery_ms')} ms (target <= 5000 ms)"
          f"{'' if node['passed'] else '; CHECKS FAILED'}")


async def bench(name: str, steps: int, every: int) -> dict[str, Any]:
    """Run one backend's session and its recovery hooks; print and return its summary."""
    async with open_backend(name) as backend:
        summary = report(backend.label, await run(backend, steps, every))
        if name == "tiered":
            await compaction(backend, steps, every)
    summary["name"] = name
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--snapshot-every", type=int, default=100, metavar="K")
    ap.add_argument("--backends", default="memory,redis,arrow,arrow-fsync,tiered")
    ap.add_argument("--no-recovery", action="store_true",
                    help="skip the actor-kill and node-loss runs (each starts its own Ray)")
    ap.add_argument("--finished", type=int, metavar="N",
                    help="measure only what archiving N finished tasks costs (tiered store)")
    ap.add_argument("--rounds", type=int, default=3, help="with --finished: how many times")
    args = ap.parse_args()
    if args.finished is not None:
        if not 1 <= args.finished <= 100_000 or not 1 <= args.rounds <= 100:
            ap.error("--finished must be 1 to 100000 and --rounds 1 to 100")
        asyncio.run(finished_cost(args.finished, args.rounds))
        return
    if args.steps < WINDOW:
        ap.error(f"--steps must be at least {WINDOW}")
    print(f"{args.steps} steps, a snapshot every {args.snapshot_every}; ckpt µs = median of "
          f"{WINDOW} appends ending at the step")
    summaries = [asyncio.run(bench(n.strip(), args.steps, args.snapshot_every))
                 for n in args.backends.split(",")]
    if not args.no_recovery and "redis" in [n.strip() for n in args.backends.split(",")]:
        print("\n== recovery on a local Ray (scripts/recovery_scenarios.py)")
        recovery("redis")
    print(f"\n{'backend':<12} {'ckpt µs first':>13} {'last':>6} {'growth':>7} "
          f"{'restore ms':>11} {'bytes/ckpt':>11} {'stored/raw':>11}")
    for s in summaries:
        print(f"{s['name']:<12} {s['first']['append_us']:>13.0f} {s['last']['append_us']:>6.0f} "
              f"{s['growth']:>6.2f}x {s['last']['restore_ms']:>11.2f} "
              f"{s['last']['bytes']:>11.0f} {s['total_ratio']:>10.2f}x")
    print(f"targets: growth <= {TARGET_GROWTH}x, restore <= {TARGET_RESTORE_MS:g} ms at the "
          f"last step")


if __name__ == "__main__":
    main()
