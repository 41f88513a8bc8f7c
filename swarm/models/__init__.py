"""Model layer: the `Model` interface and its backends (OpenAI-compatible HTTP, scripted)."""

from __future__ import annotations

from swarm.config import ModelConfig, OpenAIModelConfig, ScriptedModelConfig, VLLMModelConfig
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage

__all__ = ["Model", "ModelRequest", "ModelResponse", "ToolCall", "Usage", "build_model"]


def build_model(name: str, cfg: ModelConfig, endpoints: dict[str, str] | None = None) -> Model:
    """The client for a configured model.

    A scripted model on the `http` transport is reached through its Ray Serve deployment with
    `OpenAIModel`, the same code path a vLLM deployment takes; `endpoints` maps model names to the
    base URLs the deployment step found.
    """
    from swarm.models.openai import OpenAIModel

    if isinstance(cfg, OpenAIModelConfig):
        return OpenAIModel.from_config(cfg)
    if isinstance(cfg, VLLMModelConfig):
        # A Ray Serve LLM app: the provider: openai path pointed at its route.
        url = (endpoints or {}).get(name)
        if url is None:
            raise ValueError(f"model {name!r} has no deployed endpoint")
        return OpenAIModel.from_config(cfg.openai_config(url), name=name)
    assert isinstance(cfg, ScriptedModelConfig)
    if cfg.transport == "in_process":
        from swarm.models.scripted.model import ScriptedModel
        from swarm.models.scripted.policy import Policy

        return ScriptedModel(
            Policy.from_spec(cfg.policy_spec or {}), latency=cfg.latency, name=name
        )
    base_url = (endpoints or {}).get(name)
    if base_url is None:
        raise ValueError(f"model {name!r} has no deployed endpoint")
    return OpenAIModel(base_url=base_url, model=name, name=name, stream=cfg.stream,
                       serve_direct=cfg.ingress == "direct")
