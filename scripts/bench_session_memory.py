"""Memory per session of one agent host, burst after burst: what the first burst of sessions
costs the process, what it keeps afterwards, and what the same burst costs again.

    python scripts/bench_session_memory.py [--sessions 1000] [--bursts 3] [--traced]

The concurrency workload's agent side in one process (`scripts/bench/swarm_side.py`: the echo
model sleeping 200 ms a call, 10 tool steps and an answer a task, the Redis checkpointer on a
private redis-server, tracing, metrics and the usage ledger on), without Ray or a supervisor.
Each burst starts `--sessions` tasks at once and waits for all of them. For each burst it prints
the process's resident memory (RSS) growth at its peak per session, measured from the RSS just
before the burst, and the RSS left when the burst is over. With `--traced`, Python's own
allocations are followed too (tracemalloc, which slows the run): their peak per session during
the burst, and what is still allocated after it.

Why: `scripts/bench_suite.py` reports memory as RSS growth, and a process's RSS does not fall
back when its sessions end (CPython keeps freed memory for reuse). The first burst pays for the
pools the next ones reuse, so growth measured at a process's first load overstates what a
further session costs, and growth measured after an earlier, smaller load understates it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench import swarm_side
from scripts.bench.common import MODEL_LATENCY_S, TOOL_STEPS, PeakRss, Procs


async def _bursts(sessions: int, bursts: int, traced: bool) -> list[dict[str, float]]:
    from swarm.runtime.agent import AgentHost, EventBuffer, build_sources
    from swarm.runtime.tuning import tune_process

    out: list[dict[str, float]] = []
    async with swarm_side.redis_store() as (store, server, run_dir):
        cfg = swarm_side.bench_config(TOOL_STEPS + 1, run_dir)
        model = swarm_side.EchoModel(TOOL_STEPS + 1, MODEL_LATENCY_S)
        buffer = EventBuffer()
        host = AgentHost(cfg, "bench", model, build_sources(cfg, {"fn"}), buffer, store=store)
        with swarm_side.observability(cfg, server.url, run_dir):
            tune_process(cfg.process)  # as an agent replica sets itself up
            await host.start()
            res = await host.run_turn(swarm_side._request("warm", TOOL_STEPS + 1))
            assert res.kind == "final", res.error

            async def drain() -> None:  # what the replica's flusher does with the events
                while True:
                    await asyncio.sleep(0.05)
                    buffer.drain_runs()

            drainer = asyncio.create_task(drain())
            try:
                await _run_bursts(host, buffer, sessions, bursts, traced, out)
            finally:
                drainer.cancel()
                await host.aclose()
    return out


async def _run_bursts(host: Any, buffer: Any, sessions: int, bursts: int, traced: bool,
                      out: list[dict[str, float]]) -> None:
    proc = psutil.Process()
    me = Procs.this_process()
    for burst in range(bursts):
        buffer.drain_runs()
        gc.collect()
        rss0 = me.rss()  # the measure `PeakRss` samples
        if traced:
            tracemalloc.start()
        t0 = time.perf_counter()
        with PeakRss(me, every_s=0.05) as peak:
            results = await asyncio.gather(*(
                host.run_turn(swarm_side._request(f"b{burst}-{i}", TOOL_STEPS + 1))
                for i in range(sessions)))
        wall = time.perf_counter() - t0
        bad = [r for r in results if r.kind != "final"]
        assert not bad, bad[0].error
        row = {"burst": burst + 1, "wall_s": round(wall, 2),
               "rss_before_mb": round(rss0 / 2**20, 1),
               "growth_kb_per_session": round((peak.peak - rss0) / sessions / 1024, 1)}
        if traced:
            _, traced_peak = tracemalloc.get_traced_memory()
            buffer.drain_runs()
            gc.collect()
            left, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            row["traced_peak_kb_per_session"] = round(traced_peak / sessions / 1024, 1)
            row["traced_left_mb"] = round(left / 2**20, 1)
        gc.collect()
        row["rss_after_mb"] = round(proc.memory_info().rss / 2**20, 1)
        out.append(row)
        print(row, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1000, help="tasks at once in each burst")
    ap.add_argument("--bursts", type=int, default=3, help="bursts, one after the other")
    ap.add_argument("--traced", action="store_true",
                    help="also follow Python's allocations with tracemalloc (slower)")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.bursts < 1:
        ap.error("--sessions and --bursts must be at least 1")
    try:
        import uvloop  # as Ray runs async actors

        rows = uvloop.run(_bursts(args.sessions, args.bursts, args.traced))
    except ImportError:
        rows = asyncio.run(_bursts(args.sessions, args.bursts, args.traced))
    first, rest = rows[0], rows[1:]
    print(f"\nfirst burst: {first['growth_kb_per_session']} KB a session of RSS growth; "
          f"kept after it: {first['rss_after_mb'] - first['rss_before_mb']:.1f} MB")
    if rest:
        print("later bursts: " + ", ".join(f"{r['growth_kb_per_session']} KB"
                                          for r in rest) + " a session of RSS growth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
