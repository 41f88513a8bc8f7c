"""vllm models on Serve: a model app already running under the config's name is reused.

No GPU or vLLM here, so the running app is a small stand-in answering the OpenAI `/v1/models`
route; what is tested is swarm's side: finding the app by name, the endpoint it hands agents,
and that without vLLM nothing else is attempted.
"""

from __future__ import annotations

import httpx
import pytest

from swarm.config import parse_config
from swarm.errors import UserError
from swarm.models.vllm import app_name, deploy_vllm_models, route_prefix, vllm_available


def _cfg() -> object:
    return parse_config({
        "name": "gpuswarm",
        "models": {"big": {"provider": "vllm", "model_source": "org/model", "model_id": "big-1",
                           "tier": "workflow"}},
        "agents": {"a": {"model": "big"}},
        "supervisor": {"entry": "a"},
    }, env={})


def test_served_model_app_is_reused(serve_port: int) -> None:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment
    class StandIn:
        async def __call__(self, request: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": "big-1"}],
                                 "path": request.url.path})

    cfg = _cfg()
    name = app_name("gpuswarm", "big")
    serve.run(StandIn.bind(), name=name, route_prefix=route_prefix("gpuswarm", "big"))
    try:
        # A throwaway deployment (as `swarm run` makes) reuses the app swarm serve put up.
        endpoints = deploy_vllm_models(cfg, "gpuswarm-run-abc", serve_port)
        url = f"http://127.0.0.1:{serve_port}/gpuswarm/big/v1"
        assert endpoints == {"big": url}
        body = httpx.get(f"{url}/models", timeout=10).json()
        assert body["data"][0]["id"] == "big-1"
        assert serve.status().applications[name].status == "RUNNING"
    finally:
        serve.delete(name)
    if not vllm_available():
        with pytest.raises(UserError, match=r"swarm\[gpu\]"):
            deploy_vllm_models(cfg, "gpuswarm-run-abc", serve_port)
