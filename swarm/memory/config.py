"""Memory config: the swarm-wide `memory:` section and each agent's `agents.X.memory` policy.

Kept apart from swarm.config (which imports these) so the memory feature's schema lives with its
code; the models follow the same rules: `extra="forbid"`, frozen, errors naming the field.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from swarm.tools.access import is_glob

Scope = Literal["user", "swarm", "shared"]
SCOPES: tuple[str, ...] = ("user", "swarm", "shared")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbedderConfig(_Strict):
    """Where embeddings come from: any OpenAI-compatible `/v1/embeddings` endpoint."""

    provider: Literal["serve", "openai", "local"] = Field(
        "serve", description="serve: the bundled all-MiniLM-L6-v2 as a Ray Serve deployment, "
        "deployed with the swarm (CPU); openai: an external or GPU endpoint at base_url (a Ray "
        "Serve LLM embedding app, vLLM, a provider); local: the bundled model in this process "
        "(one-process runs and tests). serve and local need the `embed` extra",
    )
    base_url: str | None = Field(None, description="openai: http(s)://host:port/v1")
    model: str = Field("all-MiniLM-L6-v2", min_length=1, description="the model name sent")
    api_key: SecretStr | None = None
    dimensions: int | None = Field(
        None, ge=1, le=16384, description="vector size; default: what the endpoint returns")
    timeout_s: float = Field(10.0, gt=0, description="per request")
    batch_size: int = Field(64, ge=1, le=2048, description="texts per request")
    replicas: int = Field(1, ge=1, le=64, description="serve: replicas of the deployment")
    num_cpus: float = Field(1.0, ge=0, description="serve: CPUs each replica reserves")
    price_per_mtok: float = Field(0.0, ge=0, description="USD per 1M embedded tokens (ledger)")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError("must be an http:// or https:// URL such as http://host:8000/v1")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _provider_fields(self) -> EmbedderConfig:
        if self.provider == "openai" and self.base_url is None:
            raise ValueError("provider openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.provider != "openai" and self.base_url is not None:
            raise ValueError(f"base_url is only used with provider openai, not {self.provider}")
        return self


class SessionStoreConfig(_Strict):
    """Session memory: each user's conversation history per session, in Redis."""

    redis: str | None = Field(
        None, description="redis://, rediss:// or unix:// URL; default: the swarm's state "
        "store (embedded Redis unless state.store says otherwise)",
    )
    ttl_s: float = Field(30 * 86400, gt=0, description="a session is deleted this long after "
                         "its last task")
    max_turns: int = Field(200, ge=1, description="exchanges kept per session (oldest dropped)")
    max_chars: int = Field(20_000, ge=100, description="longest stored text of one exchange "
                           "side; longer ones are cut")
    timeout_s: float = Field(2.0, gt=0, description="Redis socket timeout")

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return v


class LongTermStoreConfig(_Strict):
    """Long-term memory: records with embeddings in a LanceDB table."""

    uri: str = Field(
        "memory", min_length=1, description="LanceDB location: a path (relative to "
        "state.run_dir) or a URI such as s3://bucket/memory",
    )
    table: str = Field("memories", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    dedup_threshold: float = Field(
        0.92, gt=0, le=1, description="a new memory whose cosine similarity to one in the same "
        "namespace is at least this updates that one instead of adding a near duplicate; 1: off",
    )
    max_chars: int = Field(4000, ge=16, description="longest memory text accepted")
    max_results: int = Field(50, ge=1, description="most memories one recall returns")


class MemoryConfig(_Strict):
    """Session and long-term memory shared by the swarm's agents (swarm.memory)."""

    session: SessionStoreConfig = SessionStoreConfig()
    long_term: LongTermStoreConfig = LongTermStoreConfig()
    embedder: EmbedderConfig = EmbedderConfig()


class SessionPolicy(_Strict):
    """How much of a session's history an agent's turn starts with."""

    policy: Literal["last_n", "tokens", "summary"] = Field(
        "last_n", description="last_n: the last `turns` exchanges; tokens: as many recent "
        "exchanges as fit `max_tokens`; summary: a rolling summary written by `model` plus the "
        "last `turns` exchanges verbatim",
    )
    turns: int = Field(5, ge=0, le=1000, description="exchanges given verbatim")
    max_tokens: int = Field(2000, ge=16, description="cap on the history's size (about 4 "
                            "characters a token)")
    model: str | None = Field(None, description="summary: the model that writes it; default: "
                              "the agent's own")
    summarize_every: int = Field(4, ge=1, description="summary: exchanges past `turns` that "
                                 "are folded into the summary at once")


class AgentMemoryConfig(_Strict):
    """One agent's use of memory: session history, automatic recall, namespaces."""

    session: SessionPolicy | None = Field(
        None, description="session history in the agent's context; none: no history")
    recall: int = Field(0, ge=0, le=50, description="long-term memories recalled by meaning "
                        "and put in the context before each turn (top k); 0: none")
    min_score: float = Field(0.25, ge=-1, le=1, description="lowest cosine similarity an "
                             "automatic recall keeps")
    write: Scope = Field("user", description="the namespace `remember` writes to: user (the "
                         "task's submitter), swarm (this swarm) or shared (every swarm on the "
                         "same store)")
    read: list[Scope] = Field(default_factory=lambda: ["user", "swarm", "shared"],
                              min_length=1, description="namespaces recall searches")

    @field_validator("read")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a namespace twice: {v}")
        return v


def memory_problems(cfg: object) -> list[tuple[str, str]]:
    """Cross-references of a SwarmConfig's memory settings (field path, problem)."""
    problems: list[tuple[str, str]] = []
    models = getattr(cfg, "models", {})
    for name, agent in getattr(cfg, "agents", {}).items():
        mem = agent.memory
        if mem is None:
            continue
        if mem.session is not None and mem.session.model is not None and \
                mem.session.model not in models:
            problems.append((f"agents.{name}.memory.session.model",
                             f"unknown model {mem.session.model!r}; known: {sorted(models)}"))
    for name, agent in getattr(cfg, "agents", {}).items():
        for i, grant in enumerate(agent.tools):
            server, _, tool = grant.partition(".")
            if server == "memory" and tool and not any(
                    fnmatchcase(t, tool) for t in ("remember", "recall", "forget")):
                problems.append((f"agents.{name}.tools.{i}",
                                 f"the memory server has no tool {tool!r}"
                                 + (" (nor one it matches)" if is_glob(tool) else "")
                                 + "; it has ['forget', 'recall', 'remember']"))
    return problems
