"""Model layer: the `Model` interface and its backends (OpenAI-compatible HTTP, scripted)."""

from __future__ import annotations

import inspect
from typing import Any

from swarm.config import (
    ModelConfig,
    OpenAIModelConfig,
    PythonModelConfig,
    ScriptedModelConfig,
    VLLMModelConfig,
)
from swarm.errors import ConfigError
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage

__all__ = ["Model", "ModelRequest", "ModelResponse", "ToolCall", "Usage", "build_model",
           "build_python_model"]


def build_python_model(name: str, cfg: PythonModelConfig) -> Model:
    """`provider: python`: import `factory`, call it with `options`, check it made a `Model`.

    Every failure is a `ConfigError` naming `models.<name>.factory` or `.options`, so a bad
    entry stops `swarm validate` and deployment (`preflight` builds each one once) instead of
    an agent replica."""
    from swarm.tools.function import import_function

    where = f"models.{name}"
    try:
        factory: Any = import_function(cfg.factory)
    except (Exception, SystemExit) as e:  # ImportError, AttributeError, the module's own
        raise ConfigError([(f"{where}.factory",
                            f"can't import {cfg.factory!r}: {type(e).__name__}: {e}")]) from e
    if inspect.isclass(factory) and inspect.isabstract(factory):
        missing = ", ".join(sorted(getattr(factory, "__abstractmethods__", ())))
        raise ConfigError([(f"{where}.factory", f"{cfg.factory} is abstract: it doesn't "
                            f"implement {missing}")])
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # none to check (a builtin): the call says what is wrong
        signature = None
    if signature is not None:
        try:
            signature.bind(**cfg.options)
        except TypeError as e:
            raise ConfigError([(f"{where}.options", f"{cfg.factory} does not take them: {e}")]) \
                from None
    try:
        model = factory(**cfg.options)
    except Exception as e:
        raise ConfigError([(f"{where}.options",
                            f"{cfg.factory}(...) raised {type(e).__name__}: {e}")]) from e
    if inspect.isawaitable(model):
        close = getattr(model, "close", None)
        if close is not None:
            close()  # a coroutine never awaited would warn
        raise ConfigError([(f"{where}.factory", f"{cfg.factory} is async: the factory must "
                            "return the model, not a coroutine (do async set-up in the "
                            "model's `prepare`)")])
    if not isinstance(model, Model):
        raise ConfigError([(f"{where}.factory",
                            f"{cfg.factory} made a {type(model).__name__}, not a "
                            "swarm.models.Model (a class with `async def complete`)")])
    return model


def build_model(name: str, cfg: ModelConfig, endpoints: dict[str, str] | None = None) -> Model:
    """The client for a configured model.

    A scripted model on the `http` transport is reached through its Ray Serve deployment with
    `OpenAIModel`, the same code path a vLLM deployment takes; `endpoints` maps model names to the
    base URLs the deployment step found.
    """
    from swarm.models.openai import OpenAIModel

    if isinstance(cfg, OpenAIModelConfig):
        return OpenAIModel.from_config(cfg, name=name)
    if isinstance(cfg, VLLMModelConfig):
        # A Ray Serve LLM app: the provider: openai path pointed at its route.
        url = (endpoints or {}).get(name)
        if url is None:
            raise ValueError(f"model {name!r} has no deployed endpoint")
        return OpenAIModel.from_config(cfg.openai_config(url), name=name)
    if isinstance(cfg, PythonModelConfig):
        return build_python_model(name, cfg)
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
