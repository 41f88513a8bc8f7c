"""The model an agent role calls: its configured model, fallbacks and context window, composed.

`build_agent_model` is what the runtime builds once per agent replica (AgentActor, LocalSwarm):
`agents.X.model`, then `agents.X.fallback_models` in order (`FallbackModel`), inside a
`ContextWindow` when the agent or its model has a context limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swarm.models import build_model
from swarm.models.context import ContextWindow
from swarm.models.fallback import FallbackModel
from swarm.models.interface import Model

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

__all__ = ["build_agent_model", "context_limit"]


def context_limit(cfg: SwarmConfig, role: str) -> tuple[int, str] | None:
    """The agent's prompt limit in tokens and the config field it came from, if any."""
    agent = cfg.agents[role]
    if agent.max_context_tokens is not None:
        return agent.max_context_tokens, f"agents.{role}.max_context_tokens"
    mcfg = cfg.models[agent.model]
    limit = getattr(mcfg, "max_context_tokens", None)
    if limit is not None:
        return limit, f"models.{agent.model}.max_context_tokens"
    client = getattr(mcfg, "client", None)  # provider: vllm
    if isinstance(client, dict) and client.get("max_context_tokens"):
        return int(client["max_context_tokens"]), f"models.{agent.model}.client.max_context_tokens"
    if getattr(mcfg, "max_model_len", None):
        return int(mcfg.max_model_len), f"models.{agent.model}.max_model_len"  # type: ignore[union-attr]
    return None


def build_agent_model(cfg: SwarmConfig, role: str,
                      endpoints: dict[str, str] | None = None) -> Model:
    """The model client of agent `role`: primary, fallbacks, context window."""
    agent = cfg.agents[role]
    chain = [build_model(n, cfg.models[n], endpoints) for n in (agent.model,
                                                                *agent.fallback_models)]
    model: Model = chain[0] if len(chain) == 1 else FallbackModel(chain)
    limit = context_limit(cfg, role)
    if limit is not None:
        summarizer = None
        if agent.context_strategy == "summarize" and agent.summarize_model is not None:
            summarizer = build_model(agent.summarize_model, cfg.models[agent.summarize_model],
                                     endpoints)
        model = ContextWindow(model, limit[0], agent.context_strategy, summarizer=summarizer,
                              source=limit[1])
    return model
