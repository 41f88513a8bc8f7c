"""`provider: vllm` models as Ray Serve LLM applications (vLLM on GPUs).

A swarm config's vllm entries compile to Ray Serve LLM `LLMConfig` dicts (`llm_config_dict`) and
to the Serve YAML that `serve deploy` takes (`serve_app_dict`, printed by `swarm serve --dry-run`).
Each model is its own Serve application, `<deployment>-<model>` at `/<deployment>/<model>`, with
the OpenAI front end of `ray.serve.llm:build_openai_app`; agents reach it through `OpenAIModel`
at `<route>/v1` with `model` = the model id, the same client path as `provider: openai`.

vLLM is the optional extra `swarm[gpu]` (`ray[llm]`). Without it `import ray.serve.llm` fails,
so nothing here imports it at module level; `validate_llm_config` still checks a config's
structure against Ray's own `LLMConfig` model, which imports without vLLM.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from swarm.errors import ConfigError, UserError

if TYPE_CHECKING:
    from swarm.config import SwarmConfig, VLLMModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "GPU_EXTRA",
    "ROUTERS",
    "app_name",
    "deploy_vllm_models",
    "llm_config_dict",
    "require_vllm",
    "route_prefix",
    "serve_app_dict",
    "validate_llm_config",
    "vllm_available",
    "vllm_models",
]

GPU_EXTRA = "pip install 'swarm[gpu]'"
BUILDER = "ray.serve.llm:build_openai_app"
# `router:` values and the Serve request router classes they select.
ROUTERS: dict[str, str] = {
    "prefix_cache": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
    # Consistent hashing on the session id, which Serve reads from the `x-session-id` header
    # (RAY_SERVE_SESSION_ID_HEADER_KEY) and OpenAiIngress forwards; OpenAIModel sends it.
    "session": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
}
# The class behind the public PrefixCacheAffinityRouter (a thin subclass in ray.serve.llm, which
# can't be imported without vLLM). Ray 2.60.
_PREFIX_ROUTER_IMPL = (
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
    "PrefixCacheAffinityRouter"
)


def app_name(deployment: str, model: str) -> str:
    """The Serve application name of one model of a deployment (as for scripted models)."""
    return f"{deployment}-{model}"


def route_prefix(deployment: str, model: str) -> str:
    """The HTTP route prefix of one model's application; the OpenAI API is under `<prefix>/v1`."""
    return f"/{deployment}/{model}"


def vllm_models(cfg: SwarmConfig) -> dict[str, VLLMModelConfig]:
    """The config's `provider: vllm` entries, by name."""
    from swarm.config import VLLMModelConfig

    return {n: m for n, m in cfg.models.items() if isinstance(m, VLLMModelConfig)}


def vllm_available() -> bool:
    """Whether vLLM is installed, so `ray.serve.llm` imports and models can be deployed."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(models: list[str]) -> None:
    """Raise `UserError` naming the models and the extra to install when vLLM is missing."""
    if models and not vllm_available():
        raise UserError(
            f"model(s) {', '.join(sorted(models))} use provider: vllm, which needs vLLM and Ray "
            f"Serve LLM on the cluster: {GPU_EXTRA} (the gpu extra, ray[llm])"
        )


def llm_config_dict(name: str, cfg: VLLMModelConfig) -> dict[str, Any]:
    """The Ray Serve LLM `LLMConfig` fields for one vllm model entry, as plain YAML-able data."""
    engine: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
    }
    if cfg.max_model_len is not None:
        engine["max_model_len"] = cfg.max_model_len
    if cfg.enable_prefix_caching is not None:
        engine["enable_prefix_caching"] = cfg.enable_prefix_caching
    if cfg.quantization is not None:
        engine["quantization"] = cfg.quantization
    engine.update(cfg.engine_kwargs)
    deployment: dict[str, Any] = {"name": name}
    if cfg.autoscaling is not None:
        auto = cfg.autoscaling.model_dump(exclude_none=True)
        if auto:
            deployment["autoscaling_config"] = auto
    if cfg.max_ongoing_requests is not None:
        deployment["max_ongoing_requests"] = cfg.max_ongoing_requests
    if cfg.router not in (None, "default"):
        router: dict[str, Any] = {"request_router_class": ROUTERS[cfg.router]}
        if cfg.router_kwargs:
            router["request_router_kwargs"] = dict(cfg.router_kwargs)
        deployment["request_router_config"] = router
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.served_model_id,
                                 "model_source": cfg.model_source},
        "engine_kwargs": engine,
    }
    if cfg.accelerator_type is not None:
        out["accelerator_type"] = cfg.accelerator_type
    # One GPU bundle per worker (TP x PP of them); Serve LLM puts the replica actor in the first.
    out["placement_group_config"] = {
        "bundles": [{"GPU": 1} for _ in range(cfg.num_gpus)],
        "strategy": cfg.placement_strategy,
    }
    out["deployment_config"] = deployment
    if cfg.runtime_env:
        out["runtime_env"] = dict(cfg.runtime_env)
    return out


def serve_app_dict(cfg: SwarmConfig, deployment: str | None = None) -> dict[str, Any]:
    """The Serve config (`serve deploy` YAML) for the config's vllm models: one app per model."""
    deployment = deployment or cfg.name
    apps = [
        {
            "name": app_name(deployment, name),
            "route_prefix": route_prefix(deployment, name),
            "import_path": BUILDER,
            "args": {"llm_configs": [llm_config_dict(name, m)]},
        }
        for name, m in vllm_models(cfg).items()
    ]
    return {"applications": apps}


def validate_llm_config(d: dict[str, Any], *, field: str = "") -> Any:
    """Check an `llm_config_dict` against Ray Serve LLM's own `LLMConfig`; return the instance.

    Uses Ray's internal module path (Ray 2.60, pinned in pyproject), the one place it appears:
    it imports without vLLM and checks the structure (model loading, accelerator, placement
    group, deployment config with autoscaling and router). `engine_kwargs` are checked against
    vLLM's engine arguments only where vLLM is installed. Raises `ConfigError` at `field`.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    data = d
    have_vllm = vllm_available()
    router = d.get("deployment_config", {}).get("request_router_config", {})
    if not have_vllm and router.get("request_router_class") == ROUTERS["prefix_cache"]:
        # Serve imports the router class to check it; the public one needs vLLM.
        data = {**d, "deployment_config": {**d["deployment_config"], "request_router_config": {
            **router, "request_router_class": _PREFIX_ROUTER_IMPL}}}
    try:
        llm = LLMConfig(**data)
        if have_vllm:
            llm.get_engine_config()
    except Exception as e:  # pydantic's ValidationError, or vLLM's ValueError for engine args
        raise ConfigError([(field, f"Ray Serve LLM rejects this model config: {_reason(e)}")]
                          ) from e
    return llm


def _reason(e: Exception) -> str:
    """One line from Ray's validation error, with the cause its validators wrap and hide."""
    parts: list[str] = []
    errors = getattr(e, "errors", None)
    if callable(errors):
        for err in errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            inner = err.get("ctx", {}).get("error")
            cause = getattr(inner, "__cause__", None) if inner is not None else None
            text = err.get("msg", "")
            if cause is not None:
                text += f" ({_first_lines(cause)})"
            parts.append(f"{loc}: {text}" if loc else text)
    return "; ".join(parts) or _first_lines(e)


def _first_lines(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(ln for ln in lines if not ln.startswith("For further information"))


def _running_apps() -> set[str]:
    from ray import serve

    try:
        status = serve.status()
    except Exception:
        return set()
    # ApplicationStatus is a str enum.
    return {n for n, a in status.applications.items() if a.status == "RUNNING"}


def deploy_vllm_models(cfg: SwarmConfig, deployment: str, port: int) -> dict[str, str]:
    """Deploy the config's vllm models on Serve; return their OpenAI base URLs by model name.

    A model whose application already runs under the config's own name (put there by
    `swarm serve CONFIG`, or by `swarm up`) is reused rather than loaded again.
    """
    models = vllm_models(cfg)
    if not models:
        return {}
    running = _running_apps()
    endpoints: dict[str, str] = {}
    missing = [n for n in models if app_name(cfg.name, n) not in running
               and app_name(deployment, n) not in running]
    require_vllm(missing)
    for name, mcfg in models.items():
        for owner in (cfg.name, deployment):
            if app_name(owner, name) in running:
                log.info("model %s: reusing Serve app %s", name, app_name(owner, name))
                endpoints[name] = f"http://127.0.0.1:{port}{route_prefix(owner, name)}/v1"
                break
        else:
            endpoints[name] = _deploy_one(name, mcfg, deployment, port)
    return endpoints


def _deploy_one(name: str, mcfg: VLLMModelConfig, deployment: str, port: int) -> str:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    d = llm_config_dict(name, mcfg)
    validate_llm_config(d, field=f"models.{name}")
    app = build_openai_app({"llm_configs": [LLMConfig(**d)]})
    prefix = route_prefix(deployment, name)
    log.info("model %s: deploying %s (%d GPU(s) a replica) at %s", name, mcfg.served_model_id,
             mcfg.num_gpus, prefix)
    serve.run(app, name=app_name(deployment, name), route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix}/v1"


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


def _redact(apps: dict[str, Any]) -> list[str]:
    """Blank env_vars that look secret (HF_TOKEN, ...) in place; return their paths."""
    hidden: list[str] = []
    for app in apps["applications"]:
        for llm in app["args"]["llm_configs"]:
            env = (llm.get("runtime_env") or {}).get("env_vars") or {}
            for key in env:
                if any(w in key.upper() for w in _SECRET_WORDS):
                    env[key] = "<redacted>"
                    hidden.append(f"{app['name']}: runtime_env.env_vars.{key}")
    return hidden


def dry_run_yaml(cfg: SwarmConfig, *, source: str, deployment: str | None = None
                 ) -> tuple[str, list[str]]:
    """The Serve YAML `swarm serve --dry-run` prints, checked against Ray's `LLMConfig`.

    Returns the text and the paths of values that were redacted (secret-looking env vars, which
    belong in the cluster's environment rather than in a printed file). Raises `ConfigError`
    naming the model whose config Ray rejects.
    """
    import yaml

    apps = serve_app_dict(cfg, deployment)
    for app, name in zip(apps["applications"], vllm_models(cfg), strict=True):
        validate_llm_config(app["args"]["llm_configs"][0], field=f"models.{name}")
    hidden = _redact(apps)
    header = (f"# Ray Serve LLM config for swarm {cfg.name!r}: `swarm serve --dry-run {source}`.\n"
              "# Deploy with `serve deploy FILE` or a RayService; generated, edit the swarm "
              "config instead.\n")
    return header + yaml.safe_dump(apps, sort_keys=False, width=100), hidden
