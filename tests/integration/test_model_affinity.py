"""Session affinity through Ray Serve: two scripted replicas behind the session router, called
by `OpenAIModel` (streaming, x-session-id), keep each session on one replica."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from swarm.config import LatencyConfig
from swarm.models.interface import ModelRequest
from swarm.models.openai import OpenAIModel
from swarm.models.scripted.serve import build_scripted_app
from tests.integration.conftest import wait_until_refused

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"
APP = "affinity-it"
MODEL = "scripted-affinity"


async def test_a_sessions_calls_stay_on_one_of_two_replicas(serve_port: int) -> None:
    from ray import serve

    spec = yaml.safe_load((POLICIES / "research.yaml").read_text())
    serve.run(build_scripted_app(spec, model_name=MODEL, replicas=2, router="session",
                                 latency=LatencyConfig(fixed_ms=5, per_input_token_ms=0.01,
                                                       per_output_token_ms=0.05, jitter=0.2)),
              name=APP, route_prefix=f"/{APP}")
    served: dict[str, list[str]] = defaultdict(list)

    async def record(response: httpx.Response) -> None:
        served[response.request.headers["x-session-id"]].append(
            response.headers["x-replica-id"])

    http = httpx.AsyncClient(event_hooks={"response": [record]})
    model = OpenAIModel(f"http://127.0.0.1:{serve_port}/{APP}/v1", MODEL, http_client=http)

    async def session(i: int) -> None:
        for step in range(5):
            resp = await model.complete(ModelRequest(
                messages=[{"role": "system", "content": "You are the planner."},
                          {"role": "user", "content": f"task {i} step {step}"}],
                agent="planner", session_id=f"s-{i}"))
            assert resp.usage.input_tokens > 0 and resp.time_to_first_token_s is not None

    try:
        await asyncio.gather(*(session(i) for i in range(40)))
    finally:
        await http.aclose()
        serve.delete(APP)
    assert len(served) == 40 and all(len(r) == 5 for r in served.values())
    assert all(len(set(r)) == 1 for r in served.values()), served
    # Both replicas took sessions: the affinity is not just everything on one replica.
    assert len({r[0] for r in served.values()}) == 2


async def test_direct_ingress_calls_go_to_the_replicas_and_survive_one_being_killed(
        serve_port: int) -> None:
    """`serve_direct`: calls skip the proxy (Serve direct ingress, on in the test cluster as in
    a local cluster swarm starts), a session stays on one replica under Serve's default router,
    and when a replica dies its sessions carry on elsewhere."""
    import ray
    from ray import serve

    app = "direct-it"
    spec = yaml.safe_load((POLICIES / "research.yaml").read_text())
    serve.run(build_scripted_app(spec, model_name=MODEL, replicas=2, router="default"),
              name=app, route_prefix=f"/{app}")
    served: dict[str, list[tuple[int, str]]] = defaultdict(list)

    async def record(response: httpx.Response) -> None:
        served[response.request.headers["x-session-id"]].append(
            (response.request.url.port, response.headers["x-replica-id"]))

    http = httpx.AsyncClient(event_hooks={"response": [record]})
    model = OpenAIModel(f"http://127.0.0.1:{serve_port}/{app}/v1", MODEL, http_client=http,
                        serve_direct=True, backoff_base_s=0.05)

    async def call(i: int, step: int) -> None:
        resp = await model.complete(ModelRequest(
            messages=[{"role": "system", "content": "You are the planner."},
                      {"role": "user", "content": f"task {i} step {step}"}],
            agent="planner", session_id=f"s-{i}"))
        assert resp.usage.input_tokens > 0

    try:
        directory = model._directory
        assert directory is not None
        # Calls never wait for the replica list; until it is read they go through the proxy.
        # Read it first so that every call below goes direct.
        await directory.refresh()
        for step in range(3):
            await asyncio.gather(*(call(i, step) for i in range(30)))
        assert len(directory.replicas) == 2, directory.replicas
        assert all(r.base_url.startswith("http://127.0.0.1:") for r in directory.replicas)
        before = {s: calls[0] for s, calls in served.items()}
        assert len(before) == 30
        # Every call went to a replica's own port, none through the proxy, and a session's
        # calls all to one replica; both replicas took sessions.
        assert all(port != serve_port for calls in served.values() for port, _ in calls)
        assert all(len(set(calls)) == 1 for calls in served.values()), served
        assert len({rid for _, rid in before.values()}) == 2

        victim = before["s-0"][1]
        dead = [r for r in directory.replicas if r.name.endswith(victim)]
        assert len(dead) == 1, (dead, directory.replicas)
        # The list read before the kill stays in use (no re-read on the clock), so the dead
        # replica's sessions meet its refused connections and must move on from them.
        directory.refresh_s = 3600.0
        ray.kill(ray.get_actor(dead[0].name, namespace="serve"), no_restart=True)
        # ray.kill returns before the process is gone; until then the replica still answers.
        await wait_until_refused(urlsplit(dead[0].base_url).port or 0)
        served.clear()
        await asyncio.gather(*(call(i, 3) for i in range(30)))
        # Every call succeeded (asserted in `call`), and the dead replica was left out.
        assert len(served) == 30
        assert dead[0].base_url in directory._down
        assert dead[0] not in directory.replicas
    finally:
        await http.aclose()
        serve.delete(app)
