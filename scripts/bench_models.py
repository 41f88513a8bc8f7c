"""The scripted engine on Ray Serve: HTTP path against a deployment-handle call, and session
affinity with two replicas.

Starts a private local Ray (its own temp dir; it never joins a running cluster), deploys the
scripted engine with the latency model at zero, and prints:

- requests/s (concurrent clients) and p50/p99 latency (one client, sequential) through the
  Serve HTTP proxy on loopback and through a deployment-handle call (target: HTTP adds at most
  3 ms at p50). Both paths run the same engine code on the replica (validation, the policy,
  the answer); HTTP adds the proxy, JSON on the wire and the ASGI layer. The client is httpx,
  as in swarm's own OpenAIModel, sending the same body and agent header.

  To be fair on a shared machine, the two paths are measured in interleaved rounds (`--rounds`,
  the order alternating), after 300 warm-up calls each: a path's p50 is the median of its
  round p50s, "HTTP adds" the median of the per-round differences (so a load change between
  rounds moves both paths), and p99 is over all calls of all rounds. Each figure comes with
  the CPU time per call of the client (this process), the Serve proxy and the replica, summed
  over their threads (Ray's I/O threads included), read with psutil during the sequential
  rounds: an account of where the HTTP path's time goes (less sensitive to other jobs than
  wall time, though contention inflates it too, e.g. pollers spinning longer);
- the session-affinity hit rate with 2 replicas and 100 concurrent sessions under the session
  router (consistent hashing on x-session-id), and under Serve's default router for contrast
  (target: at least 99% of a session's calls on one replica). The replica that answered is
  read from each answer's `system_fingerprint`.

    python scripts/bench_models.py [--requests 800] [--rounds 8] [--sessions 100] [--calls 10]
                                   [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from swarm.config import LatencyConfig  # noqa: E402
from swarm.models.ingress import DIRECT_INGRESS_ENV  # noqa: E402
from swarm.runtime.deploy import RAY_SYSTEM_CONFIG  # noqa: E402

MODEL = "scripted-bench"
TOOLS = [{"type": "function", "function": {
    "name": "transfer_to_researcher", "description": "Hand off to the researcher.",
    "parameters": {"type": "object", "properties": {"message": {"type": "string"}},
                   "required": ["message"]}}}]


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "tools": TOOLS, "messages": [
        {"role": "system", "content": "You are the planner."},
        {"role": "user", "content": f"What is prefix caching? ({i})"}]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def timed(n: int, concurrency: int, call: Any) -> tuple[list[float], float]:
    """Run `call(i)` n times with `concurrency` workers; per-call seconds and the wall time."""
    lat: list[float] = []
    nxt = iter(range(n))

    async def worker() -> None:
        for i in nxt:
            t = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, time.perf_counter() - t0


def serve_pids(app: str) -> dict[str, int]:
    """Process ids of the Serve proxy and of `app`'s (single) replica, by their actor names."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        role = ("proxy" if name.startswith("SERVE_PROXY_ACTOR") else
                "replica" if name.startswith(f"SERVE_REPLICA::{app}#") else None)
        if role:
            handle = ray.get_actor(name, namespace=actor["namespace"])
            pids[role] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return pids


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (all threads); {} without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    out = {}
    for role, pid in {"client": os.getpid(), **pids}.items():
        t = psutil.Process(pid).cpu_times()
        out[role] = t.user + t.system
    return out


async def paths(proxy_url: str, handle: Any, n: int, rounds: int, concurrency: int,
                pids: dict[str, int]) -> dict[str, Any]:
    from swarm.models.ingress import ReplicaDirectory

    directory = ReplicaDirectory(proxy_url.removesuffix("/chat/completions"))
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as c:
        async def proxy(i: int) -> None:
            r = await c.post(proxy_url, json=body(i), headers={"x-swarm-agent": "planner"})
            r.raise_for_status()

        async def direct(i: int) -> None:
            # As OpenAIModel with serve_direct: the replica picked per call, by session.
            base = directory.base_url("bench")
            r = await c.post(f"{base}/chat/completions", json=body(i),
                             headers={"x-swarm-agent": "planner", "x-session-id": "bench"})
            r.raise_for_status()

        async def via_handle(i: int) -> None:
            answer = await handle.chat.remote(body(i), "planner", "")
            assert answer["object"] == "chat.completion", answer

        await directory.refresh()
        if not directory.replicas:
            raise SystemExit("Serve listed no direct-ingress replica for the app: is "
                             "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 reaching Ray's processes?")
        out["direct_url"] = directory.replicas[0].base_url
        calls = {"proxy": proxy, "direct": direct, "handle": via_handle}
        for call in calls.values():  # warm connections, the handle's router, all code paths
            await timed(200, 4, call)
            await timed(100, 1, call)
        per_round = max(1, n // rounds)
        lat: dict[str, list[float]] = {name: [] for name in calls}
        p50s: dict[str, list[float]] = {name: [] for name in calls}
        cpu: dict[str, dict[str, float]] = {name: {} for name in calls}
        order = list(calls)
        for r in range(rounds):
            for name in order[r % 3:] + order[:r % 3]:  # each path first in turn
                before = cpu_seconds(pids)
                got, _ = await timed(per_round, 1, calls[name])
                for role, secs in cpu_seconds(pids).items():
                    cpu[name][role] = cpu[name].get(role, 0.0) + secs - before[role]
                lat[name] += got
                p50s[name].append(pct(got, 0.5))
        for name in calls:
            _, wall = await timed(n, concurrency, calls[name])
            out[name] = {"p50_ms": statistics.median(p50s[name]) * 1e3,
                         "p99_ms": pct(lat[name], 0.99) * 1e3, "rps": n / wall,
                         "round_p50s_ms": [x * 1e3 for x in p50s[name]],
                         "cpu_ms_per_call": {role: secs * 1e3 / len(lat[name])
                                             for role, secs in cpu[name].items()}}
    for name in ("proxy", "direct"):
        out[f"{name}_overhead_p50_ms"] = statistics.median(
            (h - d) * 1e3 for h, d in zip(p50s[name], p50s["handle"], strict=True))
    return out


async def direct_affinity(proxy_url: str, sessions: int, calls: int) -> dict[str, Any]:
    """As `affinity`, through `OpenAIModel` with `serve_direct` (the replica chosen by the
    client, hashing the session id over the replicas Serve lists)."""
    from swarm.models.interface import ModelRequest
    from swarm.models.openai import OpenAIModel, close_pool

    seen: dict[str, list[str]] = {}

    async def record(response: httpx.Response) -> None:
        seen.setdefault(response.request.headers["x-session-id"], []).append(
            response.headers["x-replica-id"])

    async with httpx.AsyncClient(timeout=60, event_hooks={"response": [record]},
                                 limits=httpx.Limits(max_connections=256)) as c:
        model = OpenAIModel(proxy_url.removesuffix("/chat/completions"), MODEL, http_client=c,
                            serve_direct=True)
        # As an agent host does when it starts (before that, calls go through the proxy).
        await model.prepare()

        async def session(s: int) -> None:
            for i in range(calls):
                await model.complete(ModelRequest(messages=body(i)["messages"], tools=TOOLS,
                                                  agent="planner", session_id=f"session-{s}"))

        await asyncio.gather(*(session(s) for s in range(sessions)))
        await close_pool()
    return _hits(seen)


async def affinity(url: str, sessions: int, calls: int) -> dict[str, Any]:
    """Each session makes `calls` calls in turn, all sessions at once; per session, the share
    of its calls on its most used replica."""
    seen: dict[str, list[str]] = {}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as c:
        async def session(s: int) -> None:
            sid = f"session-{s}"
            for i in range(calls):
                r = await c.post(url, json=body(i), headers={
                    "x-session-id": sid, "x-swarm-agent": "planner"})
                r.raise_for_status()
                seen.setdefault(sid, []).append(r.json()["system_fingerprint"])

        await asyncio.gather(*(session(s) for s in range(sessions)))
    return _hits(seen)


def _hits(seen: dict[str, list[str]]) -> dict[str, Any]:
    on_one = sum(Counter(r).most_common(1)[0][1] for r in seen.values())
    total = sum(len(r) for r in seen.values())
    per_replica = Counter(Counter(r).most_common(1)[0][0] for r in seen.values())
    return {"hit_rate": on_one / total, "calls": total,
            "sessions_whole_on_one_replica": sum(len(set(r)) == 1 for r in seen.values()),
            "sessions_per_replica": sorted(per_replica.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=800,
                    help="calls per path: latency (over all rounds), and again for requests/s")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved latency rounds")
    ap.add_argument("--concurrency", type=int, default=32, help="clients for requests/s")
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--calls", type=int, default=10, help="calls per session")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    for flag in ("requests", "rounds", "concurrency", "sessions", "calls"):
        if not 1 <= getattr(args, flag) <= 100_000:
            ap.error(f"--{flag} must be between 1 and 100000")

    import ray
    from ray import serve

    from swarm.models.scripted.serve import build_scripted_app

    spec = yaml.safe_load((ROOT / "configs" / "policies" / "research.yaml").read_text())
    port = free_port()
    # As a local cluster swarm starts: Serve direct ingress on (each ingress replica serves
    # HTTP on a port of its own), the proxy still there. Serve reads it in its own processes.
    os.environ.update(DIRECT_INGRESS_ENV)
    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="swbm", dir="/tmp"),
             include_dashboard=False, log_to_driver=False, _system_config=dict(RAY_SYSTEM_CONFIG))
    results: dict[str, Any] = {}
    try:
        # Per-request access logs are file writes on the proxy and replica: off, as in a
        # production deployment that logs through metrics instead.
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": False})
        zero = LatencyConfig()
        serve.run(build_scripted_app(spec, model_name=MODEL, latency=zero, replicas=1,
                                     router="default"), name="one", route_prefix="/one")
        handle = serve.get_app_handle("one")
        results["paths"] = asyncio.run(paths(
            f"http://127.0.0.1:{port}/one/v1/chat/completions", handle, args.requests,
            args.rounds, args.concurrency, serve_pids("one")))
        serve.delete("one")
        for router in ("session", "default"):
            serve.run(build_scripted_app(spec, model_name=MODEL, latency=zero, replicas=2,
                                         router=router), name=router, route_prefix=f"/{router}")
            url = f"http://127.0.0.1:{port}/{router}/v1/chat/completions"
            results[f"affinity_{router}_router"] = asyncio.run(affinity(
                url, args.sessions, args.calls))
            if router == "default":
                results["affinity_direct"] = asyncio.run(direct_affinity(
                    url, args.sessions, args.calls))
            serve.delete(router)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    p = results["paths"]
    print(f"scripted engine, latency model at zero, 1 replica; {args.requests} calls a figure, "
          f"latency in {args.rounds} interleaved rounds")
    print(f"{'path':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}   (p50/p99: one client; "
          f"req/s: {args.concurrency} clients)   CPU ms per call (one client)")
    for name in ("direct", "proxy", "handle"):
        r = p[name]
        cpu = "  ".join(f"{role} {ms:.2f}" for role, ms in r["cpu_ms_per_call"].items())
        print(f"{name:8} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rps']:8.0f}   {cpu}")
    print("direct: HTTP to the replica's own port (Serve direct ingress; `ingress: direct`); "
          "proxy: through Serve's HTTP proxy; handle: a deployment-handle call, no HTTP")
    print(f"HTTP adds {p['direct_overhead_p50_ms']:.2f} ms at p50 on the direct path, "
          f"{p['proxy_overhead_p50_ms']:.2f} ms through the proxy (median of the rounds' "
          f"differences; target: <= 3 ms)")
    rows = [("session", "session router, through the proxy"),
            ("default", "Serve's default router, through the proxy"),
            ("direct", "direct, the client hashing x-session-id (default router app)")]
    for key, label in rows:
        a = results["affinity_direct" if key == "direct" else f"affinity_{key}_router"]
        print(f"affinity, 2 replicas, {args.sessions} sessions x {args.calls} calls, {label}: "
              f"{a['hit_rate']:.2%} of calls on the session's replica; "
              f"{a['sessions_whole_on_one_replica']}/{args.sessions} sessions entirely on one; "
              f"sessions per replica {a['sessions_per_replica']}")
    print("target: >= 99% with the session router and on the direct path")


if __name__ == "__main__":
    main()
