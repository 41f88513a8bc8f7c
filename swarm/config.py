"""Swarm config: the pydantic schema and the YAML loader.

Every model is `extra="forbid"` and frozen, so a typo is an error naming its field path and a
config that crosses a process boundary can't be changed on the way. `${VAR}` and
`${VAR:-default}` are interpolated from the environment at load time; values that came from the
environment are wrapped in `SecretStr` where the field is a secret, so they never print.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from swarm._urls import redis_url_problem
from swarm.errors import ConfigError
from swarm.memory.config import AgentMemoryConfig, MemoryConfig, memory_problems
from swarm.tools.access import grant_problems

_NAME = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"
_IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- models -------------------------------------------------------------------------------------


class LatencyConfig(_Strict):
    """Simulated latency of the scripted engine: fixed + per token, with jitter."""

    fixed_ms: float = Field(0.0, ge=0)
    per_input_token_ms: float = Field(0.0, ge=0)
    per_output_token_ms: float = Field(0.0, ge=0)
    jitter: float = Field(0.0, ge=0, le=1, description="relative jitter, 0.1 = ±10%")


class Price(_Strict):
    """What a model costs, in USD per million tokens (for the usage ledger and cost budgets)."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per 1M prompt tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per 1M completion tokens")
    cached_input_per_mtok: float | None = Field(
        None, ge=0, description="USD per 1M cached prompt tokens; default: the input price"
    )

    def rates(self) -> tuple[float, float, float]:
        """USD per 1M input, output and cached input tokens (cached: the input price unless
        set)."""
        return (self.input_per_mtok, self.output_per_mtok, self.input_per_mtok
                if self.cached_input_per_mtok is None else self.cached_input_per_mtok)

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        """USD for one call's usage (cached tokens are part of `input_tokens`)."""
        cached = min(max(cached_tokens, 0), input_tokens)
        input_rate, output_rate, cached_rate = self.rates()
        return ((input_tokens - cached) * input_rate + cached * cached_rate
                + output_tokens * output_rate) / 1e6


# How agents reach a model that swarm deploys as a Serve app (swarm.models.ingress).
Ingress = Annotated[Literal["proxy", "direct"], Field(
    description="direct: agents call the app's replicas straight, skipping Serve's HTTP proxy "
    "(Serve direct ingress; RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where the cluster starts, set by "
    "swarm for local clusters); a session's calls go to one replica")]


class ScriptedModelConfig(_Strict):
    """The deterministic scripted engine, deployed as a Ray Serve OpenAI-compatible app."""

    provider: Literal["scripted"]
    policy: str = Field(description="path of a policy YAML file, relative to the config file")
    latency: LatencyConfig = LatencyConfig()
    replicas: int = Field(1, ge=1, le=64)
    max_ongoing_requests: int = Field(1000, ge=1)
    transport: Literal["http", "in_process"] = Field(
        "http",
        description="http: through Ray Serve like a real model server; in_process: no Serve",
    )
    stream: bool = Field(True, description="http: the client streams (SSE), measuring TTFT")
    router: Literal["default", "session"] = Field(
        "session", description="session: a session's calls go to one replica (consistent "
        "hashing on x-session-id); default: Serve's power-of-two choices")
    ingress: Ingress = "proxy"
    max_context_tokens: int | None = Field(None, ge=1, description="the context window")
    price: Price = Field(Price(), description="for cost accounting; scripted is free by default")
    # Filled by the loader: the parsed policy, so the config carries it to every process.
    policy_spec: dict[str, Any] | None = None


class OpenAIModelConfig(_Strict):
    """Any OpenAI-compatible chat-completions endpoint."""

    provider: Literal["openai"]
    base_url: str
    model: str
    api_key: SecretStr | None = None
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    price: Price = Field(Price(), description="USD per million tokens, for the ledger and budgets")
    # Client behaviour (swarm.models.openai): streaming, retries, timeouts, context window.
    stream: bool = Field(True, description="stream (SSE) to measure time to first token")
    step_timeout_s: float | None = Field(
        None, gt=0, description="bound on one step's model call, all retries included")
    backoff_base_s: float = Field(0.5, gt=0, description="first retry waits up to this long")
    backoff_max_s: float = Field(20.0, gt=0, description="cap of one retry's wait")
    max_context_tokens: int | None = Field(
        None, ge=1, description="the model's context window (agents may set a smaller one)")
    serve_direct: bool = Field(
        False, description="base_url is a Ray Serve route of this cluster: call the app's "
        "replicas straight (Serve direct ingress), a session on one replica")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class VLLMAutoscaling(_Strict):
    """Serve autoscaling of a vLLM deployment: replicas between min and max, scaled to keep
    about `target_ongoing_requests` requests in flight per replica."""

    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)


# Tier presets for `provider: vllm` (README "Models on GPUs"): defaults an entry's own fields
# override. vLLM batches up to `max_num_seqs` sequences per replica (256 by default), so
# `max_ongoing_requests` is sized against that: a replica admits no more than it can batch.
# shared: many light agents (classifiers, routers) with short prompts sharing system prompts:
#   admit a full batch (256), scale out at half of it (128) to keep latency flat, up to 4
#   replicas, and route by prompt prefix so the shared prefixes hit the prefix cache.
# workflow: multi-turn agents whose context grows each step: fewer sequences fit in the KV cache
#   (64 in flight, scale at 32, up to 8 replicas), and a session stays on the replica that holds
#   its prefix (consistent hashing on x-session-id).
# dedicated: reserved for one long-horizon swarm: a fixed replica count (min = max, no cold
#   starts or session remapping mid-task), 128 in flight, session-affine.
VLLM_TIERS: dict[str, dict[str, Any]] = {
    "shared": {
        "max_ongoing_requests": 256, "router": "prefix_cache", "enable_prefix_caching": True,
        "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 128},
    },
    "workflow": {
        "max_ongoing_requests": 64, "router": "session", "enable_prefix_caching": True,
        "autoscaling": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32},
    },
    "dedicated": {
        "max_ongoing_requests": 128, "router": "session", "enable_prefix_caching": True,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64},
    },
}
# engine_kwargs that have their own field, so a value can't be given twice.
_VLLM_ENGINE_FIELDS = ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len",
                       "enable_prefix_caching", "quantization")


# The fields of a vLLM model's `client` entry that its deployment sets: where each comes from.
_SET_BY_THE_DEPLOYMENT = {"provider": "the deployment", "base_url": "the deployment",
                          "model": "the deployment", "serve_direct": "models.<name>.ingress"}


class VLLMModelConfig(_Strict):
    """A self-hosted model served by vLLM through Ray Serve LLM (`swarm serve`, swarm.models.vllm).

    Agents reach it like `provider: openai` pointed at its Serve route, with `model` = model_id.
    A `tier` fills defaults (VLLM_TIERS); fields given explicitly override them.
    """

    provider: Literal["vllm"]
    model_source: str = Field(min_length=1,
                              description="Hugging Face model id, local path or s3:// / gs:// URI")
    model_id: str | None = Field(
        None, min_length=1, description="the name clients ask for; default: model_source")
    tier: Literal["shared", "workflow", "dedicated"] | None = Field(
        None, description="sizing preset: shared, workflow or dedicated (see VLLM_TIERS)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model copy is split across")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages (x TP GPUs each)")
    gpus_per_node: int = Field(8, ge=1, description="GPUs on one node of the target node type")
    accelerator_type: str | None = Field(None,
                                         description="H100, H200, A100, L4, ... (Ray's names)")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        None, validate_default=True,  # type: ignore[assignment]
        description="default: STRICT_PACK (one node) when TP x PP <= gpus_per_node, else PACK",
    )
    max_model_len: int | None = Field(None, ge=1, description="context length in tokens")
    enable_prefix_caching: bool | None = None
    quantization: str | None = Field(None, min_length=1, description="e.g. fp8")
    autoscaling: VLLMAutoscaling | None = None
    max_ongoing_requests: int | None = Field(None, ge=1, description="in flight per replica")
    router: Literal["default", "prefix_cache", "session"] | None = Field(
        None, description="prefix_cache: PrefixCacheAffinityRouter; session: consistent hashing "
        "on the x-session-id header; default: Serve's power-of-two choices",
    )
    router_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="request_router_kwargs for the router")
    ingress: Ingress = "proxy"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                          description="more vLLM engine arguments, passed through")
    runtime_env: dict[str, Any] | None = None
    client: dict[str, Any] = Field(
        default_factory=dict, description="OpenAI client options for agents (the fields of a "
        "provider: openai entry other than provider, base_url and model: timeout_s, ...)",
    )
    price: Price = Field(Price(), description="USD per million tokens, for the ledger and budgets")

    @model_validator(mode="before")
    @classmethod
    def _apply_tier(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("tier") not in VLLM_TIERS:
            return data
        preset = VLLM_TIERS[data["tier"]]
        out = dict(data)
        for key, value in preset.items():
            if key == "autoscaling":
                given = out.get("autoscaling")
                if given is None:
                    out[key] = dict(value)
                elif isinstance(given, dict):
                    merged = dict(given)
                    if data["tier"] == "dedicated":
                        # A dedicated pool has a fixed size: one bound given sets both.
                        fixed = merged.get("min_replicas", merged.get("max_replicas"))
                        if fixed is not None:
                            merged.setdefault("min_replicas", fixed)
                            merged.setdefault("max_replicas", fixed)
                    out[key] = {**value, **merged}
            elif out.get(key) is None:
                out[key] = value
        return out

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _placement(cls, v: Any, info: ValidationInfo) -> Any:
        devices = info.data.get("tensor_parallel_size", 1) * info.data.get(
            "pipeline_parallel_size", 1)
        per_node = info.data.get("gpus_per_node", 8)
        if v is None:
            return "STRICT_PACK" if devices <= per_node else "PACK"
        if v == "STRICT_PACK" and devices > per_node:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size = {devices} GPUs, but "
                f"STRICT_PACK keeps a replica on one node of gpus_per_node = {per_node}; "
                "lower TP/PP or use PACK to span nodes")
        return v

    @field_validator("autoscaling")
    @classmethod
    def _bounds(cls, v: VLLMAutoscaling | None) -> VLLMAutoscaling | None:
        if v is not None and v.min_replicas is not None:
            # Serve's own default for a missing max_replicas is 1.
            top = 1 if v.max_replicas is None else v.max_replicas
            if v.min_replicas > top:
                raise ValueError(f"min_replicas ({v.min_replicas}) is above max_replicas ({top}"
                                 f"{', Serve default' if v.max_replicas is None else ''})")
        return v

    @field_validator("engine_kwargs")
    @classmethod
    def _no_duplicates(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in _VLLM_ENGINE_FIELDS:
            if key in v:
                raise ValueError(f"{key} has its own field: set models.<name>.{key}, "
                                 "not engine_kwargs")
        return v

    @field_validator("client")
    @classmethod
    def _client(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, where in _SET_BY_THE_DEPLOYMENT.items():
            if key in v:
                raise ValueError(f"{key} is set by {where}, not in client")
        try:
            OpenAIModelConfig(provider="openai", base_url="http://x", model="x", **v)
        except ValidationError as e:
            raise ValueError("; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: "
                f"{'unknown field' if err['type'] == 'extra_forbidden' else err['msg']}"
                for err in e.errors())) from None
        return v

    @property
    def served_model_id(self) -> str:
        """The model name clients send (model_id, else model_source)."""
        return self.model_id or self.model_source

    @property
    def num_gpus(self) -> int:
        """GPUs one replica takes: TP x PP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def openai_config(self, base_url: str) -> OpenAIModelConfig:
        """The `provider: openai` entry agents use to reach this model at `base_url`."""
        return OpenAIModelConfig(provider="openai", base_url=base_url,
                                 model=self.served_model_id, price=self.price,
                                 serve_direct=self.ingress == "direct", **self.client)


class PythonModelConfig(_Strict):
    """A model written in Python: a `swarm.models.Model` built in each agent replica from an
    import path, with keyword arguments (README "Models written in Python")."""

    provider: Literal["python"]
    factory: str = Field(
        pattern=_IMPORT_PATH,
        description="package.module:name of a Model subclass, or of a function returning a "
        "Model; called with `options` as keyword arguments")
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the factory (plain YAML "
        "values: they travel to every replica)")
    max_context_tokens: int | None = Field(None, ge=1, description="the context window")
    price: Price = Field(Price(), description="USD per million tokens, for the ledger and budgets")


ModelConfig = Annotated[
    ScriptedModelConfig | OpenAIModelConfig | VLLMModelConfig | PythonModelConfig,
    Field(discriminator="provider"),
]


# ---- tools --------------------------------------------------------------------------------------


class MCPStdioConfig(_Strict):
    """An MCP server spawned as a subprocess, spoken to over stdio."""

    command: str
    args: list[str] = []
    env: dict[str, SecretStr] = {}
    cwd: str | None = None


class MCPHttpConfig(_Strict):
    """An MCP server reached over streamable HTTP."""

    url: str
    headers: dict[str, SecretStr] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


def _mcp_transport(v: Any) -> str | None:
    # The key a server entry gives says which kind it is, so a mistake in one is reported
    # against that kind alone (not as every field the other kind lacks).
    if isinstance(v, dict):
        return "stdio" if "command" in v else "http" if "url" in v else None
    return {MCPStdioConfig: "stdio", MCPHttpConfig: "http"}.get(type(v))


MCPConfig = Annotated[
    Annotated[MCPStdioConfig, Tag("stdio")] | Annotated[MCPHttpConfig, Tag("http")],
    Discriminator(_mcp_transport, custom_error_type="mcp_transport",
                  custom_error_message="expected a mapping with command (a server started "
                  "over stdio) or url (a server reached over streamable HTTP)"),
]


class PythonExecConfig(_Strict):
    """The built-in python_exec sandbox server (swarm.tools.python_exec_server), per run."""

    cpu_s: int = Field(5, ge=1, description="CPU seconds")
    wall_s: float = Field(10.0, gt=0, description="wall-clock seconds")
    memory_mb: int = Field(512, ge=32, description="address space per process")
    file_size_mb: int = Field(16, ge=1, description="largest file it may write")
    max_procs: int = Field(32, ge=1, description="processes")
    output_bytes: int = Field(64_000, ge=1, description="stdout and stderr kept (each)")
    tmpfs_mb: int = Field(64, ge=1, description="size of the working directory")
    max_concurrent: int = Field(2, ge=1, description="runs at once per server; more wait")
    python: str | None = Field(None, description="interpreter inside the sandbox")
    uid: int = Field(65534, ge=1, description="unprivileged uid to run as when started as root")
    ro_binds: list[Annotated[str, Field(pattern=r"^/")]] = Field(
        default_factory=list, description="host paths visible read-only (absolute)")
    allow_unsandboxed: bool = Field(
        False, description="run code without isolation where bubblewrap can't run")


# ToolServerConfig fields that only an MCP server has.
_MCP_ONLY = ("connect_timeout_s", "pool_size", "retries", "retry_backoff_s", "breaker_failures",
             "breaker_cooldown_s")


class ToolServerConfig(_Strict):
    """A named source of tools: an MCP server, a list of Python functions, or the built-in
    python_exec sandbox (`python_exec:`, run as a stdio MCP server)."""

    mcp: MCPConfig | None = None
    python: list[Annotated[str, Field(pattern=_IMPORT_PATH)]] | None = Field(
        None, description="functions by import path, package.module:function"
    )
    python_exec: PythonExecConfig | None = Field(
        None, description="the sandboxed python_exec tool (README 'Sandboxed code execution')")
    timeout_s: float = Field(30.0, gt=0, description="per-call timeout")
    max_result_chars: int = Field(
        65536, ge=256, description="longest result text the model gets; the rest is cut, with "
        "a note saying how much")
    # MCP servers only (README "MCP servers"):
    connect_timeout_s: float = Field(
        30.0, gt=0, description="longest wait to open a connection (a stdio server's start "
        "and handshake, an HTTP session); a server that doesn't answer in time is down")
    pool_size: int = Field(
        1, ge=1, le=32, description="connections (stdio: server processes) per agent replica, "
        "shared by its sessions; another opens only when all are busy")
    retries: int = Field(
        2, ge=0, le=10, description="attempts after the first when a call times out or loses "
        "its connection, for tools the server marks read-only or idempotent (any tool when the "
        "request never went out)")
    retry_backoff_s: float = Field(
        0.2, ge=0, le=60, description="wait before the first retry; doubles, with full jitter")
    breaker_failures: int = Field(
        5, ge=0, description="consecutive failed calls (timeouts, lost connections, invalid "
        "answers) that open the server's circuit; 0: never")
    breaker_cooldown_s: float = Field(
        30.0, gt=0, description="how long an open circuit fails calls at once before letting "
        "one trial call through")

    @model_validator(mode="before")
    @classmethod
    def _python_exec_server(cls, data: Any) -> Any:
        # `python_exec:` is the stdio MCP server with these options: filled in as `mcp`, so
        # everything downstream sees an MCP server.
        if isinstance(data, dict) and isinstance(data.get("python_exec"), dict):
            from swarm.tools.sandbox import server_args

            mcp = {"command": "python", "args": server_args(data["python_exec"])}
            if data.get("mcp") not in (None, mcp):
                raise ValueError("give exactly one of 'mcp', 'python' or 'python_exec'")
            data = {**data, "mcp": mcp}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> ToolServerConfig:
        if (self.mcp is None) == (self.python is None):
            raise ValueError("give exactly one of 'mcp', 'python' or 'python_exec'")
        if self.python is not None and not self.python:
            raise ValueError("'python' needs at least one function")
        # Compared with the defaults, not `model_fields_set`: a dumped config loads again.
        fields = type(self).model_fields
        mcp_only = [f for f in _MCP_ONLY if getattr(self, f) != fields[f].default]
        if self.python is not None and mcp_only:
            raise ValueError(f"{', '.join(mcp_only)}: only for MCP servers")
        if self.python_exec is not None and self.timeout_s <= self.python_exec.wall_s:
            raise ValueError(f"timeout_s ({self.timeout_s:g}) must be more than "
                             f"python_exec.wall_s ({self.python_exec.wall_s:g})")
        return self


# ---- agents, supervisor, budgets ----------------------------------------------------------------


class A2AMemberConfig(_Strict):
    """A remote A2A agent as a member of the swarm (`agents.X.a2a`, swarm.protocol.a2a_member):
    agents hand off to it like to any agent, and its turn is one A2A message."""

    url: str = Field(description="the agent's base URL; its card is at "
                     "<url>/.well-known/agent-card.json")
    card_path: str = Field("/.well-known/agent-card.json", pattern=r"^/",
                           description="where the agent card is, relative to url")
    check: Literal["startup", "lazy"] = Field(
        "startup", description="startup: the card is fetched and checked when the swarm starts "
        "(a bad one stops it); lazy: at the first turn that needs it (a bad one fails that turn)")
    timeout_s: float = Field(300.0, gt=0, description="one attempt of a remote turn, from "
                             "sending the message to the remote's final answer")
    connect_timeout_s: float = Field(10.0, gt=0, description="opening a connection")
    max_answer_chars: int = Field(
        262_144, ge=256, description="longest answer taken from the remote; the rest is cut, "
        "with a note saying how much (as tools.X.max_result_chars does for tool results)")
    retries: int = Field(2, ge=0, le=10, description="attempts after the first when the remote "
                         "can't be reached, drops the connection or answers 408/429/5xx")
    backoff_s: float = Field(0.5, ge=0, description="wait before the first retry; doubles")
    streaming: bool = Field(True, description="stream the remote's status updates (when its "
                            "card says it streams)")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="HTTP headers sent with every request, e.g. "
        "Authorization: \"Bearer ${TOKEN}\" (values are secrets)")
    transcript: int = Field(0, ge=0, le=100, description="how many of the task's latest "
                            "user/assistant messages go along with the turn's text as context")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


# AgentConfig fields that only an agent run here has; a remote (a2a) member may not set them.
_LOCAL_ONLY = ("tools", "deny_tools", "handoffs", "replicas", "num_cpus", "max_steps_per_turn",
               "fallback_models", "max_context_tokens", "context_strategy", "summarize_model",
               "memory")


class AgentConfig(_Strict):
    """One agent role: its model, instructions, tools and peers; or a remote A2A agent (`a2a`)."""

    model: str | None = Field(None, description="the model it runs on (every agent run here)")
    a2a: A2AMemberConfig | None = Field(
        None, description="a remote A2A agent instead of a model (no tools or handoffs of its "
        "own); `instructions` then only describe it to a router")
    instructions: str = ""
    tools: list[str] = Field(
        default_factory=list, description="tools it may call: server, server.tool, or globs "
        "in either part (server.read_*, *.search); see swarm.tools.access"
    )
    deny_tools: list[str] = Field(
        default_factory=list, description="tools taken back out of `tools`, same patterns"
    )
    handoffs: list[str] = []
    replicas: int = Field(1, ge=1, le=256)
    max_sessions: int = Field(
        1000, ge=1, description="concurrent sessions one replica hosts; more wait in line"
    )
    max_steps_per_turn: int = Field(25, ge=1, description="model calls in one turn of this agent")
    num_cpus: float = Field(0.0, ge=0, description="CPUs each replica reserves")
    budget: AgentBudget | None = Field(
        None, description="this agent's limits per task; fields given override budgets.agent"
    )
    # The model client around `model` (swarm.models.agent): fallbacks and the context window.
    fallback_models: list[str] = Field(
        default_factory=list, description="models tried in order when `model` fails after its "
        "retries (timeouts, connection errors, 408, 429, 5xx)")
    max_context_tokens: int | None = Field(
        None, ge=1, description="prompt size limit; default: the model's max_context_tokens")
    context_strategy: Literal["drop_oldest_tool_results", "summarize", "fail"] = Field(
        "drop_oldest_tool_results", description="what happens before a call above the limit")
    summarize_model: str | None = Field(
        None, description="context_strategy summarize: the model that writes the summary")
    memory: AgentMemoryConfig | None = Field(
        None, description="session history, automatic recall and memory namespaces "
        "(swarm.memory); the built-in `memory` tool server gives remember / recall / forget"
    )


class SupervisorConfig(_Strict):
    """How tasks move between agents."""

    entry: str | None = Field(None, description="first agent (handoff strategy)")
    strategy: Literal["handoff", "parallel", "router"] = "handoff"
    agents: list[str] = Field(
        default_factory=list, description="fan-out agents (parallel) or candidates (router)"
    )
    join: str | None = Field(None, description="parallel: agent that merges the branch answers")
    router_model: str | None = Field(None, description="router: model that picks the agent")
    max_handoffs: int = Field(20, ge=0)


class Limits(_Strict):
    """Usage limits at one level; a limit left out (null) is no limit. Checked before every
    model and tool call (see swarm.governance.budget), so usage overshoots by at most one call."""

    max_steps: int | None = Field(None, ge=0, description="steps (one model call + its tools)")
    max_model_calls: int | None = Field(None, ge=0)
    max_tool_calls: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0, description="input + output tokens")
    max_input_tokens: int | None = Field(None, ge=0)
    max_output_tokens: int | None = Field(None, ge=0)
    max_cost_usd: float | None = Field(None, ge=0, description="USD, by the models' `price`")
    max_wall_s: float | None = Field(None, gt=0)


class TaskBudget(Limits):
    """Limits for one task across all of its agents."""

    max_steps: int = Field(60, ge=0)
    max_wall_s: float = Field(600.0, gt=0)


class AgentBudget(Limits):
    """Limits for one agent's share of one task (all of its turns in that task); `max_wall_s`
    is the time its turns in the task may take in total."""


class SwarmBudget(Limits):
    """Limits for the whole deployed swarm, over every task: totals since the supervisor
    started, or per fixed window of `window_s` seconds (3600: per hour)."""

    window_s: float | None = Field(None, gt=0, description="none: since the swarm started")

    @field_validator("max_wall_s")
    @classmethod
    def _no_wall(cls, v: float | None) -> float | None:
        if v is not None:
            raise ValueError("a swarm has no wall-clock limit; use budgets.task.max_wall_s "
                             "or budgets.agent.max_wall_s (and window_s for a rate)")
        return v


_WRAP_UP = ("The budget for this task is exhausted ({reason}). Do not call any tools. Give "
            "your best final answer now, from what you have so far.")


class Budgets(_Strict):
    """Limits at task, agent and swarm level, and what happens when one runs out."""

    task: TaskBudget = TaskBudget()
    agent: AgentBudget = Field(
        AgentBudget(), description="default for every agent; agents.X.budget overrides fields"
    )
    swarm: SwarmBudget = SwarmBudget()
    on_exhausted: Literal["wrap_up", "fail"] = Field(
        "wrap_up",
        description="wrap_up: the agent gets one final call with no tools to give its best "
        "answer, and the task ends COMPLETED marked budget_exhausted; fail: FAILED, class budget",
    )
    wrap_up_message: str = Field(_WRAP_UP, min_length=1,
                                 description="the wrap-up instruction; {reason} names the limit")
    wrap_up_grace_s: float = Field(
        60.0, gt=0, description="time past max_wall_s the wrap-up call may take"
    )


class StuckConfig(_Strict):
    """Stuck detection: thresholds (null disables a detector) and what to do on a detection."""

    action: Literal["stop", "escalate"] = Field(
        "stop", description="stop: the task FAILS with the cause; escalate: it waits in "
        "INPUT_REQUIRED until an operator answers 'continue' or 'stop'",
    )
    same_call: int | None = Field(
        32, ge=2, description="the N-th call of one tool with the same arguments in a task "
        "(generous by default: repeating a call can be legitimate, e.g. polling or a charge "
        "made once per item)"
    )
    no_progress: int | None = Field(
        10, ge=1, description="N steps in a row whose tool results all repeat earlier ones"
    )
    ping_pong: int | None = Field(
        8, ge=2, description="N handoffs in a row bouncing between the same two agents"
    )
    input_timeout_s: float | None = Field(
        None, gt=0, description="longest wait in INPUT_REQUIRED (an approval gate's too, "
        "when shorter than approvals.timeout_s); then the task fails"
    )
    queue_timeout_s: float | None = Field(
        None, gt=0, description="longest wait for a session slot on an agent replica"
    )
    deadlock: bool = Field(True, description="stop a task that closes a wait-for cycle")


# When a session's log is made durable (see StateConfig.checkpoint and swarm.runtime.journal).
CheckpointPolicy = Literal["every_step", "every_call", "every_n", "phase"]


# The stores swarm.state.open_checkpointer opens: Redis URLs, and the URI schemes pyarrow's
# FileSystem.from_uri knows (any other scheme fails there, when a swarm is deployed).
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_ARROW_SCHEMES = ("file", "local", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "hf",
                  "mock")
_ARROW_URI = ("a pyarrow filesystem URI (" + ", ".join(f"{s}://" for s in _ARROW_SCHEMES)
              + " or fsspec+<protocol>://)")


def _arrow_scheme(scheme: str) -> bool:
    scheme = scheme.lower()
    return scheme in _ARROW_SCHEMES or (scheme.startswith("fsspec+") and len(scheme) > 7)


class StateConfig(_Strict):
    """Where task state lives, how often it is made durable and how often snapshotted."""

    store: str = Field(
        "embedded",
        description="embedded (a private redis-server under run_dir), none (no durability), "
        "memory (one process only), redis://..., unix://..., or a pyarrow URI (file://, s3://)",
    )
    run_dir: str = Field("runs", description="run directory, relative to the working directory")
    snapshot_every: int = Field(100, ge=0, description="steps between snapshots; 0: never")
    max_turn_retries: int = Field(
        5, ge=0, description="times a turn is resumed after its agent replica dies"
    )
    outage_timeout_s: float = Field(
        30.0, gt=0, le=3600,
        description="how long one operation on a Redis store (embedded, redis://, rediss://, "
        "unix://) waits for an unreachable server, retrying with backoff, before it gives up "
        "(StoreUnavailable). A turn that gives up this way is not failed at once: see "
        "outage_wait_s",
    )
    outage_wait_s: float = Field(
        600.0, ge=0,
        description="how long, in all, a turn that stopped because the store was unreachable "
        "(after outage_timeout_s) waits for it to answer again; once it does, the turn resumes "
        "from its durable log, as after a replica crash (finished tool calls are not run again; "
        "one with side effects that started but whose result was never logged waits for an "
        "operator's rerun or skip). The task fails with a checkpoint error naming the store "
        "once this runs out; 0: fail at once. budgets.task.max_wall_s still applies",
    )
    checkpoint: CheckpointPolicy = Field(
        "every_step",
        description="when the log is made durable: every_step (one atomic write per step, when "
        "its tool calls are done), every_call (each model answer and tool result at once), "
        "every_n (every `checkpoint_every` steps) or phase (at turn start, turn end or handoff, "
        "and input_required only). Under every_step a crash loses at most the step in flight, "
        "under every_n and phase the steps since the last checkpoint: the resumed session "
        "replays from the last durable "
        "entry and runs those steps again, calling the model again. Side effects are never "
        "repeated: before a tool that is not read-only or idempotent runs, everything so far "
        "is made durable, and its result is written at once. A due snapshot is a checkpoint too",
    )
    checkpoint_every: int | None = Field(
        None, validate_default=True,
        description="steps between checkpoints (>= 1); only with checkpoint: every_n",
    )
    write_behind: bool = Field(
        True,
        description="with every_step or every_n: send a step's append when the step ends and "
        "go on to the next model call, waiting for it before the next write, before a tool "
        "with side effects runs and before the turn ends, as LangGraph's default durability "
        "(async) does; false: wait for it at the step's end. Either way each checkpoint is "
        "one durable append, a step whose append is written behind is reported finished once "
        "that append is durable, and side effects are never repeated",
    )
    archive: str | None = Field(
        None,
        description="a pyarrow filesystem URI (file:///data/archive, s3://bucket/prefix) that "
        "older log segments and finished tasks move to out of Redis; reads span both. Needs a "
        "Redis store (embedded, redis://, rediss://, unix://)",
    )
    archive_after: int = Field(
        1000, ge=0,
        description="with archive: log entries (about two a step) a task keeps in Redis before "
        "a snapshot moves the ones up to the previous snapshot to the archive; 0: only finished "
        "tasks are archived",
    )

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, v: int | None, info: ValidationInfo) -> int | None:
        policy = info.data.get("checkpoint")
        if policy == "every_n" and (v is None or v < 1):
            raise ValueError("checkpoint: every_n needs checkpoint_every, an integer >= 1")
        if policy is not None and policy != "every_n" and v is not None:
            raise ValueError(f"only used with checkpoint: every_n, not {policy}")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v in ("embedded", "none", "memory"):
            return v
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", v)
        if scheme is None:
            raise ValueError(f"expected embedded, none, memory, a redis://, rediss:// or "
                             f"unix:// URL, or {_ARROW_URI}, not {v!r}")
        if scheme[1].lower() not in _REDIS_SCHEMES and not _arrow_scheme(scheme[1]):
            raise ValueError(f"unknown store {scheme[1]}://; expected embedded, none, memory, "
                             f"a redis://, rediss:// or unix:// URL, or {_ARROW_URI}")
        if scheme[1].lower() in _REDIS_SCHEMES and (problem := redis_url_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("archive")
    @classmethod
    def _archive(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        scheme = re.match(r"^([a-z][a-z0-9+.-]*)://.", v)
        if scheme is None or not _arrow_scheme(scheme[1]):
            raise ValueError(f"expected {_ARROW_URI}, such as file:///data/archive or "
                             "s3://bucket/prefix")
        store = info.data.get("store", "")
        if store != "embedded" and not re.match(r"^(redis|rediss|unix)://", store):
            raise ValueError(f"an archive needs a redis store (embedded, redis://...), "
                             f"not {store!r}")
        return v


class OTLPConfig(_Strict):
    """Where the `otlp` exporter sends spans (an OpenTelemetry collector)."""

    endpoint: str = Field(description="http(s)://host:port; gRPC: :4317, HTTP: :4318")
    protocol: Literal["grpc", "http"] = "grpc"
    headers: dict[str, SecretStr] = {}
    timeout_s: float = Field(10.0, gt=0, description="per export, retries included")
    insecure: bool = Field(True, description="gRPC without TLS (http:// endpoints)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s:]+(:\d{1,5})?(/\S*)?$", v):
            raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:4317")
        return v.rstrip("/")


class TracingConfig(_Strict):
    """OpenTelemetry spans per task, agent turn, model call and tool call (see
    swarm.observability.tracing): where they are exported, and whether content is captured."""

    enabled: bool = Field(True, description="make spans at all (the trace store needs them)")
    exporter: Literal["none", "console", "jsonl", "otlp"] = Field(
        "none", description="none, console (stdout), jsonl (a file under state.run_dir) or "
        "otlp (a collector, see tracing.otlp)",
    )
    otlp: OTLPConfig | None = None
    jsonl_path: str = Field("traces/spans.jsonl", min_length=1,
                            description="the jsonl exporter's file, relative to state.run_dir")
    store: bool = Field(True, description="keep spans per task for `swarm trace` (Redis when "
                        "the state store is Redis, else JSONL files under state.run_dir)")
    store_ttl_s: float = Field(7 * 86400, gt=0, description="how long the trace store keeps "
                               "a task's spans (Redis)")
    capture_content: bool = Field(False, description="record prompts, answers, tool "
                                  "arguments and results in spans (secrets redacted)")
    max_content_chars: int = Field(4000, ge=16, description="per captured value")
    redact: list[str] = Field([], description="extra regexes whose matches are redacted")
    max_queue: int = Field(4096, ge=1, description="spans buffered per exporter; beyond "
                           "this they are dropped (and counted), never waited for")
    batch_size: int = Field(512, ge=1)
    flush_interval_s: float = Field(0.5, gt=0, le=60)

    @field_validator("redact")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"redact.{i}: not a regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _exporter_settings(self) -> TracingConfig:
        if self.exporter == "otlp" and self.otlp is None:
            raise ValueError("exporter otlp needs tracing.otlp.endpoint "
                             "(e.g. otlp: {endpoint: 'http://127.0.0.1:4317', protocol: grpc})")
        if self.batch_size > self.max_queue:
            raise ValueError(f"tracing.batch_size ({self.batch_size}) is more than "
                             f"tracing.max_queue ({self.max_queue})")
        return self


class LimitsConfig(_Strict):
    """Guards on input from users."""

    max_task_chars: int = Field(100_000, ge=1)
    max_tasks: int = Field(100_000, ge=1, description="tasks kept in the supervisor's table")
    finished_in_memory: int = Field(
        10_000, ge=100, description="finished tasks the supervisor keeps in memory, the most "
        "recently finished, when the swarm has a durable store: older ones are read back from "
        "the store when asked for by id (their summary, answer and history; the live events "
        "of a task are kept only while it is in memory), and are no longer listed. Each "
        "finished task kept costs the supervisor about 6 KB. Without a durable store, "
        "finished tasks stay until max_tasks. It also bounds the approval decisions remembered "
        "for clear errors on a second decision")


class ProcessConfig(_Strict):
    """Settings of the agent and supervisor processes (swarm.runtime.tuning)."""

    gc_threshold: int | None = Field(
        200_000, ge=100, description="net container allocations between young-generation "
        "garbage collections in agent and supervisor actors (Python's default is 700, which "
        "costs a busy replica about a quarter of its CPU; each pass stalls every session of "
        "the process, so fewer passes also mean less waiting); null keeps Python's default")
    gc_freeze: bool = Field(
        True, description="move objects that exist when an actor has started out of the "
        "garbage collector's view (gc.freeze)")
    arrow_memory_pool: Literal["system", "default"] = Field(
        "system", description="where Arrow's buffers come from in agent and supervisor "
        "actors (the usage ledger's Parquet writes, snapshot compression, Arrow state files): "
        "system, the process's malloc, which reuses memory the process already holds; "
        "default, pyarrow's own allocator (mimalloc or jemalloc), which sets aside several "
        "megabytes for each thread that writes (about 6 MB more resident memory per replica "
        "for a 20,000-row ledger write on the development machine)")
    ray_task_events: bool = Field(
        False, description="let Ray record a task event for every call to the supervisor and "
        "agent actors (the dashboard's task list). Off: a step already has its trace spans, "
        "and at thousands of calls a second the events cost the actors and the GCS CPU and "
        "memory; actors, jobs and metrics stay on the dashboard either way")


class MetricsConfig(_Strict):
    """Metrics for the Ray dashboard (swarm.observability.metrics)."""

    enabled: bool = True
    flush_interval_s: float = Field(
        5.0, gt=0, le=3600, description="seconds between pushes of the in-memory sums to Ray"
    )
    histogram_cap: int | None = Field(
        500, ge=1,
        description="observations of one latency histogram series pushed to Ray per flush at "
        "most: above it, a uniform sample of that many (one series' bucket shares and "
        "quantiles hold; the histogram's count and sum are the sample's, the counters keep the "
        "true counts; summed over replicas that were sampled at different rates, a busy "
        "replica weighs less than its share). Ray turns every observation into work for its "
        "metrics agent, about 15 µs a step at thousands of steps a second; null pushes every "
        "observation",
    )


class UsageConfig(_Strict):
    """The usage and cost ledger (swarm.observability.usage)."""

    enabled: bool = True
    dir: str | None = Field(
        None, min_length=1,
        description="where the Parquet files go: a path, or a pyarrow filesystem URI such as "
        "s3://bucket/usage; default <state.run_dir>/usage (a swarm.testing.LocalSwarm writes a "
        "ledger only when this is set)",
    )
    flush_interval_s: float = Field(10.0, gt=0, le=3600, description="seconds between writes")
    max_buffered_rows: int = Field(
        50_000, ge=1, description="rows held in memory that make the writer flush early"
    )
    redis_totals: bool = Field(
        True, description="with a Redis state store, keep running totals per swarm, role, "
        "user and model in Redis as well",
    )

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not re.match(r"^[a-z][a-z0-9+.-]*://.", v):
            raise ValueError("expected a path or a URI such as file:///data/usage or "
                             "s3://bucket/usage")
        return v


# ---- approvals, rate limits, audit (swarm.governance) --------------------------------------------

GateRule = Literal["none", "destructive", "listed", "all"]


class ApprovalsConfig(_Strict):
    """Approval gates: which tool calls wait in INPUT_REQUIRED until a person approves them."""

    require: GateRule = Field(
        "none", description="none: no gates; destructive: tools whose hints say destructive "
        "(an MCP tool with no annotation counts as destructive) plus `tools`; listed: only "
        "`tools`; all: every tool call",
    )
    tools: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="tools that always need approval: tool, server.tool "
        "or a glob such as files.* (fnmatch)",
    )
    exempt: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="tools that never need approval (wins over the rest)"
    )
    timeout_s: float = Field(
        300.0, gt=0, description="an unanswered gate is denied after this long (the task's "
        "budgets.task.max_wall_s still applies while it waits)",
    )
    agents: dict[str, GateRule] = Field(
        default_factory=dict, description="per-agent override of `require`"
    )

    def rule(self, agent: str) -> GateRule:
        """The rule an agent runs under."""
        return self.agents.get(agent, self.require)

    @model_validator(mode="after")
    def _consistent(self) -> ApprovalsConfig:
        if self.require == "none" and self.tools and not self.agents:
            raise ValueError("tools are listed but require is none: set require to listed "
                             "(or destructive) to gate them")
        return self


class RateLimitConfig(_Strict):
    """One token bucket: `rate` per `per`, holding at most `burst`, for each key of a scope."""

    scope: Literal["user", "agent", "model"] = Field(
        description="user: per task submitter; agent: per agent role; model: per model name"
    )
    key: str = Field("*", min_length=1,
                     description="the user, agent or model this limit is for; * for each")
    rate: float = Field(gt=0, description="tokens added per `per`")
    per: Literal["second", "minute", "hour"] = "second"
    burst: float | None = Field(None, gt=0,
                                description="bucket size; default: one `per`'s worth (rate)")
    count: Literal["requests", "tokens"] = Field(
        "requests", description="requests: one per call; tokens: a model call's input + "
        "output tokens (debited after the call; a call waits while the bucket is in debt)",
    )
    calls: Literal["model", "tool", "all"] = Field("model", description="which calls it checks")
    on_limit: Literal["wait", "reject"] = Field(
        "wait", description="wait (up to the turn's deadline) or reject the call at once"
    )
    strict: bool = Field(
        False, description="when the limiter's Redis is down: true fails the call (closed), "
        "false lets it through (open) with one warning",
    )

    @property
    def per_second(self) -> float:
        """The refill rate in tokens per second."""
        return self.rate / {"second": 1.0, "minute": 60.0, "hour": 3600.0}[self.per]

    @property
    def size(self) -> float:
        """The bucket size."""
        return self.burst if self.burst is not None else self.rate

    @model_validator(mode="after")
    def _sane(self) -> RateLimitConfig:
        if self.count == "tokens" and self.calls != "model":
            raise ValueError("count: tokens only applies to model calls (calls: model)")
        if self.count == "requests" and self.size < 1:
            raise ValueError(f"burst is {self.size:g}: a bucket must hold at least one request")
        return self


class AuditConfig(_Strict):
    """The append-only audit log: a Redis stream per swarm, archived to Parquet."""

    enabled: bool = True
    max_len: int = Field(100_000, ge=100, description="entries kept in the stream (approximate)")
    archive_dir: str = Field("audit", min_length=1,
                             description="Parquet archive, relative to state.run_dir")
    flush_interval_s: float = Field(0.2, gt=0, le=60,
                                    description="how often buffered entries are written")


class A2AServerConfig(_Strict):
    """The swarm as an A2A agent: an HTTP app on Ray Serve with the agent card, the JSON-RPC
    and the REST binding (swarm.protocol.a2a_server)."""

    serve: bool = Field(False, description="deploy the A2A app with the swarm (swarm up, "
                        "swarm run, start_swarm); `swarm up --a2a` turns it on too")
    route_prefix: str | None = Field(None, pattern=r"^/[A-Za-z0-9_./-]*$",
                                     description="where Serve mounts the app; default "
                                     "/<deployment>/a2a")
    public_url: str | None = Field(None, pattern=r"^https?://",
                                   description="the app's base URL as clients reach it (behind "
                                   "a proxy or ingress), for the card; default http://<Serve "
                                   "host>:<port><route_prefix>")
    max_body_bytes: int | None = Field(None, ge=1024, description="largest request body; "
                                       "default 6 x limits.max_task_chars + 16 KiB (at least "
                                       "64 KiB), which fits any message within the limit")
    replicas: int = Field(1, ge=1, le=64)
    max_ongoing_requests: int = Field(1000, ge=1, description="per replica; a streaming or "
                                      "blocking request is ongoing until its task ends")

    def body_limit(self, max_task_chars: int) -> int:
        """The request body limit in bytes."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max(65_536, 6 * max_task_chars + 16_384)


class SwarmConfig(_Strict):
    """A whole swarm: models, tools, agents and how tasks move between them."""

    name: Annotated[str, Field(pattern=_NAME)]
    description: str = ""
    example_task: str = Field("", description="the task `swarm run` submits when given none")
    models: dict[str, ModelConfig]
    tools: dict[str, ToolServerConfig] = {}
    agents: dict[str, AgentConfig]
    supervisor: SupervisorConfig = SupervisorConfig()
    budgets: Budgets = Budgets()
    stuck: StuckConfig = StuckConfig()
    state: StateConfig = StateConfig()
    limits: LimitsConfig = LimitsConfig()
    process: ProcessConfig = ProcessConfig()
    metrics: MetricsConfig = MetricsConfig()
    usage: UsageConfig = UsageConfig()
    tracing: TracingConfig = TracingConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    rate_limits: list[RateLimitConfig] = []
    audit: AuditConfig = AuditConfig()
    memory: MemoryConfig = MemoryConfig()
    a2a: A2AServerConfig = Field(A2AServerConfig(), description="serve the swarm as an A2A "
                                 "agent")

    @field_validator("models", "tools", "agents")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.match(_NAME, key):
                raise ValueError(f"name {key!r} must match {_NAME}")
        return v

    @model_validator(mode="after")
    def _references(self) -> SwarmConfig:
        problems: list[tuple[str, str]] = []
        if not self.agents:
            problems.append(("agents", "a swarm needs at least one agent"))
        for name, agent in self.agents.items():
            if agent.a2a is not None:
                problems.extend(_remote_member_problems(name, agent))
                continue
            if agent.model is None:
                problems.append((f"agents.{name}", "give a model (an agent run here) or "
                                 "a2a: {url: ...} (a remote A2A agent)"))
            elif agent.model not in self.models:
                problems.append(
                    (
                        f"agents.{name}.model",
                        f"unknown model {agent.model!r}; known: {sorted(self.models)}",
                    )
                )
            problems.extend(grant_problems(name, agent.tools, agent.deny_tools, self.tools))
            for i, peer in enumerate(agent.handoffs):
                if peer not in self.agents:
                    problems.append(
                        (
                            f"agents.{name}.handoffs.{i}",
                            f"unknown agent {peer!r}; known: {sorted(self.agents)}",
                        )
                    )
                elif peer == name:
                    problems.append(
                        (f"agents.{name}.handoffs.{i}", "an agent can't hand off to itself")
                    )
        sup = self.supervisor
        if sup.strategy == "handoff":
            if sup.entry is None:
                problems.append(("supervisor.entry", "the handoff strategy needs an entry agent"))
        if sup.entry is not None and sup.entry not in self.agents:
            problems.append(("supervisor.entry", f"unknown agent {sup.entry!r}"))
        if sup.strategy in ("parallel", "router") and len(sup.agents) < (
            2 if sup.strategy == "parallel" else 1
        ):
            problems.append(
                (
                    "supervisor.agents",
                    f"the {sup.strategy} strategy needs agents to "
                    f"{'fan out to' if sup.strategy == 'parallel' else 'route between'}",
                )
            )
        for i, a in enumerate(sup.agents):
            if a not in self.agents:
                problems.append((f"supervisor.agents.{i}", f"unknown agent {a!r}"))
        if sup.join is not None and sup.join not in self.agents:
            problems.append(("supervisor.join", f"unknown agent {sup.join!r}"))
        if sup.strategy == "router":
            if sup.router_model is None:
                problems.append(("supervisor.router_model", "the router strategy needs a model"))
            elif sup.router_model not in self.models:
                problems.append(("supervisor.router_model", f"unknown model {sup.router_model!r}"))
        if problems:
            # Raised as ValueError so pydantic folds it into one ValidationError; the loader
            # turns the "path: message" lines back into field paths.
            raise ValueError("\n".join(f"{p}: {m}" for p, m in problems))
        return self

    def remote_agents(self) -> list[str]:
        """Agents that are remote A2A members (`a2a`), not run here."""
        return [name for name, agent in self.agents.items() if agent.a2a is not None]

    def agent_budget(self, agent: str) -> AgentBudget:
        """An agent's limits per task: budgets.agent with the fields its own `budget` gives."""
        own = self.agents[agent].budget
        if own is None:
            return self.budgets.agent
        return self.budgets.agent.model_copy(
            update={k: getattr(own, k) for k in own.model_fields_set})

    @model_validator(mode="after")
    def _governance_references(self) -> SwarmConfig:
        problems: list[tuple[str, str]] = []
        ap = self.approvals
        for agent in ap.agents:
            if agent not in self.agents:
                problems.append((f"approvals.agents.{agent}",
                                 f"unknown agent {agent!r}; known: {sorted(self.agents)}"))
        gated = ap.require != "none" or any(r != "none" for r in ap.agents.values())
        if gated and self.state.store == "none":
            problems.append(("approvals.require", "approval gates need durable state (a gate "
                             "and its decision are logged), but state.store is none"))
        for i, lim in enumerate(self.rate_limits):
            known = {"agent": self.agents, "model": self.models}.get(lim.scope)
            if known is not None and lim.key != "*" and lim.key not in known:
                problems.append((f"rate_limits.{i}.key", f"unknown {lim.scope} {lim.key!r}; "
                                 f"known: {sorted(known)} or *"))
        if problems:
            raise ValueError("\n".join(f"{p}: {m}" for p, m in problems))
        return self

    @model_validator(mode="after")
    def _memory_references(self) -> SwarmConfig:
        problems = memory_problems(self)
        if "memory" in self.tools:
            problems.append(("tools.memory", "memory is the built-in memory tool server "
                             "(remember, recall, forget); give this server another name"))
        if problems:
            raise ValueError("\n".join(f"{p}: {m}" for p, m in problems))
        return self

    @model_validator(mode="after")
    def _model_client_references(self) -> SwarmConfig:
        problems: list[tuple[str, str]] = []
        known = ", ".join(sorted(self.models)) or "none"
        for name, agent in self.agents.items():
            for i, ref in enumerate(agent.fallback_models):
                if ref not in self.models:
                    problems.append((f"agents.{name}.fallback_models.{i}",
                                     f"unknown model {ref!r}; defined models: {known}"))
                elif ref == agent.model or agent.fallback_models.index(ref) != i:
                    problems.append((f"agents.{name}.fallback_models.{i}",
                                     f"{ref!r} is already in this agent's model chain"))
            if agent.summarize_model is not None and agent.summarize_model not in self.models:
                problems.append((f"agents.{name}.summarize_model",
                                 f"unknown model {agent.summarize_model!r}; defined models: "
                                 f"{known}"))
            if agent.context_strategy == "summarize" and agent.summarize_model is None:
                problems.append((f"agents.{name}.summarize_model", "context_strategy summarize "
                                 "needs a summarize_model (a model from `models`)"))
        if problems:
            raise ValueError("\n".join(f"{p}: {m}" for p, m in problems))
        return self

    def entry_agents(self) -> list[str]:
        """Agents a new task may start at, by strategy."""
        if self.supervisor.strategy == "handoff":
            return [self.supervisor.entry] if self.supervisor.entry else []
        return list(self.supervisor.agents)


def _remote_member_problems(name: str, agent: AgentConfig) -> list[tuple[str, str]]:
    problems = []
    if agent.model is not None:
        problems.append((f"agents.{name}", "give either model (an agent run here) or a2a (a "
                         "remote A2A agent), not both"))
    for key in _LOCAL_ONLY:
        if key in agent.model_fields_set:
            problems.append((f"agents.{name}.{key}", "a remote A2A agent (a2a) runs elsewhere "
                             f"and has no {key} here"))
    return problems


# ---- loading ------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key given twice in one mapping (an agent defined twice,
    `name:` twice), which YAML would otherwise settle by silently keeping the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: keys given here override the merged ones, as intended
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, what: str) -> tuple[Any, str | None]:
    """A YAML file's value, or None and why it can't be read (no file, not UTF-8, not YAML);
    `what` names the file in the message ("policy file")."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        return None, f"can't read {what} {path}: {e.strerror}"
    except UnicodeDecodeError as e:
        return None, (f"{what} {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                      f"position {e.start} (save it as UTF-8)")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), None  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return None, f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', e)}"


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(
    value: Any, env: Mapping[str, str], path: str, problems: list[tuple[str, str]]
) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                return env[var]
            if default is not None:
                return default
            problems.append((path, f"environment variable {var} is not set"))
            return ""

        return _ENV_RE.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}.{i}", problems) for i, v in enumerate(value)]
    return value


# Pydantic's errors for a number out of its bounds: for true or false, the message says the
# value should be a number instead (pydantic reads them as 1 and 0).
_BOUNDS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                     "multiple_of"})


def _user_loc(loc: tuple[int | str, ...]) -> str:
    """An error's location as the YAML's keys: pydantic puts the branch of a union it tried
    in the path (`models.m.openai.timeout_s`, `tools.t.mcp.MCPHttpConfig.url`); those parts
    are dropped, found by walking the path along the config's types."""
    kept: list[str] = []
    tp: Any = SwarmConfig
    for part in loc:
        while typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            chosen = next((b for b in _branches(tp) if part in _branch_names(b)), None)
            if chosen is not None:
                tp = chosen
                continue
            if isinstance(part, str) and ("[" in part or part in _TYPE_NAMES):
                continue  # a branch that is a plain type: str, list[str], ...
            tp = Any
            while typing.get_origin(tp) is Annotated:
                tp = typing.get_args(tp)[0]
        kept.append(str(part))
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = type.__getattribute__(tp, "model_fields").get(part)
            tp = Any if field is None else field.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        else:
            tp = Any
    return ".".join(kept)


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _branches(union: Any) -> list[Any]:
    """A union's branches, nested unions (`Annotated[A | B, Discriminator] | None`) flattened."""
    out = []
    for b in typing.get_args(union):
        inner = typing.get_args(b)[0] if typing.get_origin(b) is Annotated else b
        if typing.get_origin(inner) in (typing.Union, types.UnionType):
            out += _branches(inner)
        elif b is not type(None):
            out.append(b)
    return out


def _branch_names(branch: Any) -> set[Any]:
    """What pydantic calls a union's branch in an error's path: its tag (`Tag`, or the value
    of the discriminating Literal field) or its class name."""
    names: set[Any] = set()
    if typing.get_origin(branch) is Annotated:
        branch, *meta = typing.get_args(branch)
        names.update(m.tag for m in meta if isinstance(m, Tag))
    if isinstance(branch, type) and issubclass(branch, BaseModel):
        names.add(branch.__name__)
        for field in branch.model_fields.values():
            if typing.get_origin(field.annotation) is Literal and field.is_required():
                names.update(typing.get_args(field.annotation))
    return names


# What a missing discriminating key may be, by key.
_KINDS = {"provider": " (scripted, openai, vllm or python)"}


def _validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for e in err.errors():
        loc = _user_loc(e["loc"])
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "value_error" and not loc:
            # Cross-reference problems from SwarmConfig._references, one "path: message" a line.
            for line in msg.splitlines():
                sub, _, text = line.partition(": ")
                problems.append((f"{loc}.{sub}" if loc else sub, text))
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] in _BOUNDS and isinstance(e.get("input"), bool):
            msg = f"expected a number, got {str(e['input']).lower()}"  # false read as 0
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            key = str(ctx.get("discriminator", "tag")).strip("'")
            loc = f"{loc}.{key}".strip(".")
            msg = f"unknown {key} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
        elif e["type"] == "union_tag_not_found":
            key = str(e.get("ctx", {}).get("discriminator", "tag")).strip("'")
            msg = (f"expected a mapping with {key}" if not isinstance(e.get("input"), dict)
                   else f"{key} is missing")
            msg += _KINDS.get(key, "")
        problems.append((loc, msg))
    return problems


def parse_config(
    data: Any,
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> SwarmConfig:
    """Validate config values already read from YAML; raise `ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"expected a mapping at the top level, got {type(data).__name__}")], source
        )
    problems: list[tuple[str, str]] = []
    data = _interpolate(data, os.environ if env is None else env, "", problems)
    if problems:
        raise ConfigError(problems, source)
    base = base_dir or Path.cwd()
    models = data.get("models")
    if isinstance(models, dict):
        for name, m in models.items():
            if (
                isinstance(m, dict)
                and m.get("provider") == "scripted"
                and isinstance(m.get("policy"), str)
            ):
                path = Path(m["policy"])
                if not path.is_absolute():
                    path = base / path
                spec, why = _read_yaml(path, "policy file")
                if why is not None:
                    problems.append((f"models.{name}.policy", why))
                    continue
                m = dict(m)
                m["policy_spec"] = spec
                models[name] = m
                try:
                    from swarm.models.scripted.policy import Policy

                    Policy.from_spec(spec)
                except Exception as e:
                    problems.append((f"models.{name}.policy", f"invalid policy {path}: {e}"))
    if problems:
        raise ConfigError(problems, source)
    try:
        cfg = SwarmConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_validation_problems(e), source) from None
    problems = _booleans_taken_as_numbers(data, cfg, "")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _booleans_taken_as_numbers(given: Any, value: Any, path: str) -> list[tuple[str, str]]:
    """Where the YAML said true or false and the config took it as a number: pydantic reads
    `replicas: true` as 1 and `max_sessions: false` as 0, which is never what was meant.
    `given` is the YAML value, `value` what it became, field by field."""
    if isinstance(given, bool):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [(path, f"expected a number, got {str(given).lower()}")]
        return []
    problems: list[tuple[str, str]] = []
    if isinstance(given, dict):
        for key, sub in given.items():
            if isinstance(value, BaseModel) and key in type(value).model_fields:
                inner = getattr(value, key)
            elif isinstance(value, dict) and key in value:
                inner = value[key]
            else:
                continue
            problems += _booleans_taken_as_numbers(sub, inner, f"{path}.{key}" if path else key)
    elif isinstance(given, list) and isinstance(value, (list, tuple)) and \
            len(given) == len(value):
        for i, (sub, inner) in enumerate(zip(given, value, strict=True)):
            problems += _booleans_taken_as_numbers(sub, inner, f"{path}.{i}")
    return problems


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> SwarmConfig:
    """Read, interpolate and validate a swarm config file."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError([("", f"can't read {p}: {e.strerror}")], str(p)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at position "
                            f"{e.start} (save the file as UTF-8)")], str(p)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [(where, f"not valid YAML: {getattr(e, 'problem', e)}")], str(p)
        ) from None
    return parse_config(data, base_dir=p.parent, env=env, source=str(p))
