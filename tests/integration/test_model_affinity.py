"""Session affinity through Ray Serve: two scripted replicas behind the session router, called
by `OpenAIModel` (streaming, x-session-id), keep each session on one replica."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import httpx
import yaml

from swarm.config import LatencyConfig
from swarm.models.interface import ModelRequest
from swarm.models.openai import OpenAIModel
from swarm.models.scripted.serve import build_scripted_app

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
