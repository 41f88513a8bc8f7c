"""The scripted engine as a real Ray Serve deployment, called over HTTP like any model server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from swarm.config import LatencyConfig
from swarm.errors import ModelError
from swarm.models.interface import ModelRequest
from swarm.models.openai import OpenAIModel
from swarm.models.scripted.serve import build_scripted_app

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"
APP = "scripted-it"
MODEL = "scripted-research"
PLANNER_TOOLS = [{"type": "function", "function": {
    "name": "transfer_to_researcher", "description": "Hand off to the researcher.",
    "parameters": {"type": "object", "properties": {"message": {"type": "string"}},
                   "required": ["message"]}}}]


@pytest.fixture(scope="module")
def base_url(serve_port: int) -> Iterator[str]:
    """Deploy the research policy with 50 ms of latency; yields the OpenAI base URL."""
    from ray import serve

    spec = yaml.safe_load((POLICIES / "research.yaml").read_text())
    app = build_scripted_app(spec, model_name=MODEL, latency=LatencyConfig(fixed_ms=50),
                             replicas=1, max_ongoing_requests=200)
    serve.run(app, name=APP, route_prefix=f"/{APP}")
    try:
        yield f"http://127.0.0.1:{serve_port}/{APP}/v1"
    finally:
        serve.delete(APP)


def planner_request(task: str, session: str = "s-1") -> ModelRequest:
    return ModelRequest(messages=[{"role": "system", "content": "You are the planner."},
                                  {"role": "user", "content": task}],
                        tools=PLANNER_TOOLS, agent="planner", session_id=session)


async def test_tool_call_and_usage_over_http(base_url: str) -> None:
    model = OpenAIModel(base_url, MODEL, timeout_s=30)
    try:
        resp = await model.complete(planner_request("What is prefix caching?"))
    finally:
        await model.aclose()
    assert resp.finish_reason == "tool_calls" and resp.model == MODEL
    [call] = resp.tool_calls
    assert call.name == "transfer_to_researcher"
    assert "What is prefix caching?" in json.loads(call.arguments)["message"]
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.time_to_first_token_s is not None and resp.time_to_first_token_s >= 0.05


async def test_models_endpoint_and_errors_through_the_proxy(base_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{base_url}/models")
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == [MODEL]
        r = await client.post(f"{base_url}/chat/completions", json={"model": MODEL})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages"
    model = OpenAIModel(base_url, "no-such-model", max_retries=0)
    with pytest.raises(ModelError, match="HTTP 404"):
        await model.complete(planner_request("x"))
    await model.aclose()


async def test_streaming_through_the_proxy(base_url: str) -> None:
    body: dict[str, Any] = {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "messages": planner_request("stream me").messages, "tools": PLANNER_TOOLS}
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
        "POST", f"{base_url}/chat/completions", json=body,
        headers={"x-swarm-agent": "planner"},
    ) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    arguments = "".join(
        call["function"]["arguments"] for c in chunks if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls") or ())
    assert "stream me" in json.loads(arguments)["message"]
    assert chunks[-1]["usage"]["total_tokens"] > 0


async def test_fifty_concurrent_requests_all_succeed(base_url: str) -> None:
    model = OpenAIModel(base_url, MODEL, timeout_s=60)
    try:
        start = time.perf_counter()
        responses = await asyncio.gather(*(
            model.complete(planner_request(f"task {i}", session=f"s-{i}")) for i in range(50)))
        elapsed = time.perf_counter() - start
    finally:
        await model.aclose()
    assert len(responses) == 50
    for i, resp in enumerate(responses):
        assert f"task {i}" in json.loads(resp.tool_calls[0].arguments)["message"]
    # Fifty 50 ms calls on one replica overlap rather than queue one after another (2.5 s).
    assert elapsed < 2.0
