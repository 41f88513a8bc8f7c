"""Metrics and the usage ledger of a swarm deployed on Ray: the counters reach the node's
Prometheus endpoint with the swarm's label, and the client reads the ledger back."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

from swarm.client import SwarmClient
from swarm.config import load_config
from swarm.runtime.deploy import start_swarm, stop_swarm

HERE = Path(__file__).resolve().parent
_POLL_S = 0.5
_WAIT_S = 120.0  # Ray's metrics agent reports every ~10 s; the agents flush every 1 s here


def _scrape(port: int, swarm: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of the node's /metrics for this swarm: (name, our labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    ours = {"swarm", "agent", "model", "tool", "type", "outcome", "kind", "error_class",
            "state", "replica"}
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("swarm") != swarm:
                continue
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ours)))
            out[key] = out.get(key, 0.0) + s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, tags), v in samples.items()
               if n == name and all(dict(tags).get(k) == w for k, w in labels.items()))


def test_counters_reach_prometheus_and_the_ledger_reads_back(ray_cluster, serve_port,
                                                             tmp_path) -> None:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    cfg = load_config(HERE / "configs" / "echo.yaml")
    cfg = cfg.model_copy(update={
        "metrics": cfg.metrics.model_copy(update={"flush_interval_s": 1.0}),
        "usage": cfg.usage.model_copy(update={"dir": str(tmp_path / "usage"),
                                              "flush_interval_s": 1.0})})
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    sup, _ = start_swarm(cfg, deployment=name)
    try:
        client = SwarmClient(name, sup)
        tasks = [client.submit(f"count {i}", user=f"u{i % 2}") for i in range(3)]
        for i, t in enumerate(tasks):
            assert t.result(timeout=120) == f"done: count {i}"
        # Each task: front hands off (1 step), worker calls echo, then answers (2 steps).
        want = {"front": 3.0, "worker": 6.0}
        deadline = time.monotonic() + _WAIT_S
        while True:
            samples = _scrape(port, name)
            got = {a: _total(samples, "ray_swarm_steps_total", agent=a) for a in want}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)  # a bounded poll of the exporter, not synchronisation
        assert got == want, sorted(samples)
        for agent, n in want.items():
            assert _total(samples, "ray_swarm_model_calls_total", agent=agent, model="scripted",
                          outcome="ok") == n
            assert _total(samples, "ray_swarm_tokens_total", agent=agent, type="input") > 0
            assert _total(samples, "ray_swarm_tokens_total", agent=agent, type="output") > 0
        assert _total(samples, "ray_swarm_tool_calls_total", agent="worker", tool="echo",
                      outcome="ok") == 3
        # Journal appends are timed (the tests' store is Redis).
        assert _total(samples, "ray_swarm_checkpoint_latency_ms_count", agent="worker") > 0
        # The supervisor's task metrics, from its own process.
        deadline = time.monotonic() + _WAIT_S
        while _total(samples, "ray_swarm_tasks_finished_total", state="completed") < 3 and \
                time.monotonic() < deadline:
            time.sleep(_POLL_S)
            samples = _scrape(port, name)
        assert _total(samples, "ray_swarm_tasks_finished_total", state="completed") == 3
        assert _total(samples, "ray_swarm_tasks", state="active") == 0
        assert _total(samples, "ray_swarm_errors_total") == 0

        # The ledger, written by the agent replicas, read back by the client.
        deadline = time.monotonic() + 60
        while True:
            by_role = {r["role"]: r for r in client.usage(by="role", since="1h").to_pylist()}
            if by_role.get("worker", {}).get("tool_calls") == 3 or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        assert by_role["front"]["model_calls"] == 3 and by_role["front"]["tool_calls"] == 0
        assert by_role["worker"]["model_calls"] == 6 and by_role["worker"]["tool_calls"] == 3
        by_user = {r["user"]: r["model_calls"]
                   for r in client.usage(by="user", since="1h").to_pylist()}
        assert by_user == {"u0": 6, "u1": 3}
    finally:
        stop_swarm(name)
