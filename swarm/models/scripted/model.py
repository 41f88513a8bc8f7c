"""`ScriptedModel`: the scripted policy as an in-process `Model`, with simulated latency."""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from swarm.config import LatencyConfig, ScriptedModelConfig
from swarm.errors import ConfigError
from swarm.models.interface import Model, ModelRequest, ModelResponse, Usage
from swarm.models.scripted.policy import Policy, ScriptedReply
from swarm.models.tokens import PromptCounter, count_prompt_tokens

__all__ = ["PromptCounter", "ScriptedModel", "count_prompt_tokens", "reply_usage",
           "simulated_latency_s"]


def simulated_latency_s(
    latency: LatencyConfig | None, input_tokens: int, output_tokens: int, key: str = "",
    seed: int = 0,
) -> float:
    """Seconds a call should take: fixed + per token, with jitter drawn from a hash of `key`.

    The jitter depends only on (seed, key), not on call order or process, so a benchmark
    replays with the same delays however its requests interleave.
    """
    if latency is None:
        return 0.0
    ms = (latency.fixed_ms + latency.per_input_token_ms * input_tokens
          + latency.per_output_token_ms * output_tokens)
    if latency.jitter and ms:
        unit = zlib.crc32(f"{seed}:{key}".encode()) / 0xFFFFFFFF  # in [0, 1]
        ms *= 1.0 + latency.jitter * (2.0 * unit - 1.0)
    return ms / 1000.0


def reply_usage(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], reply: ScriptedReply
) -> Usage:
    """Approximate token usage of one scripted call."""
    return Usage(input_tokens=count_prompt_tokens(messages, tools),
                 output_tokens=reply.completion_tokens())


class ScriptedModel(Model):
    """A deterministic in-process model driven by a scripted `Policy`; for tests and benchmarks."""

    def __init__(
        self,
        policy: Policy | dict[str, Any],
        *,
        latency: LatencyConfig | None = None,
        name: str = "scripted",
        seed: int = 0,
    ) -> None:
        self.policy = policy if isinstance(policy, Policy) else Policy.from_spec(policy)
        self.latency = latency
        self.name = name
        self.seed = seed
        self._count = PromptCounter()

    @classmethod
    def from_config(cls, cfg: ScriptedModelConfig, *, name: str = "scripted") -> ScriptedModel:
        """Build from a loaded config (its `policy_spec` is filled by the config loader)."""
        if cfg.policy_spec is None:
            raise ConfigError([("policy", f"policy {cfg.policy!r} was not loaded; "
                                "use swarm.config.load_config")])
        return cls(cfg.policy_spec, latency=cfg.latency, name=name)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Decide the reply, wait the simulated latency, and report approximate usage."""
        start = time.perf_counter()
        reply = self.policy.decide(request.messages, request.tools, request.agent)
        usage = Usage(input_tokens=self._count(request.messages, request.tools),
                      output_tokens=reply.completion_tokens())
        delay = simulated_latency_s(
            self.latency, usage.input_tokens, usage.output_tokens,
            key=f"{request.session_id}:{request.agent}:{len(request.messages)}", seed=self.seed,
        )
        if delay > 0:
            await asyncio.sleep(delay)
        return ModelResponse(
            content=reply.content,
            tool_calls=reply.tool_calls,
            usage=usage,
            finish_reason=reply.finish_reason,
            model=self.name,
            time_to_first_token_s=time.perf_counter() - start,
        )
