"""`provider: vllm` models: presets, placement, validation, Serve LLM configs, `swarm serve`.

Generated configs are checked against Ray Serve LLM's own `LLMConfig` model, which imports
without vLLM; tests that need vLLM itself are skipped where it is absent.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from swarm.cli import app
from swarm.config import VLLM_TIERS, parse_config
from swarm.errors import ConfigError
from swarm.models.vllm import (
    ROUTERS,
    llm_config_dict,
    serve_app_dict,
    validate_llm_config,
    vllm_available,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(**model: Any) -> dict[str, Any]:
    m = {"provider": "vllm", "model_source": "Qwen/Qwen2.5-0.5B-Instruct", **model}
    return {"name": "g", "models": {"m": m}, "agents": {"a": {"model": "m"}},
            "supervisor": {"entry": "a"}}


def _model(**model: Any) -> Any:
    return parse_config(_cfg(**model), env={}).models["m"]


def _problems(**model: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(**model), env={})
    return dict(ei.value.problems)


@pytest.mark.parametrize("tier", sorted(VLLM_TIERS))
def test_tier_presets_fill_defaults_and_validate_against_ray(tier: str) -> None:
    m = _model(tier=tier)
    preset = VLLM_TIERS[tier]
    assert m.max_ongoing_requests == preset["max_ongoing_requests"]
    assert m.router == preset["router"]
    assert m.autoscaling.model_dump() == preset["autoscaling"]
    d = llm_config_dict("m", m)
    dep = d["deployment_config"]
    assert dep["request_router_config"]["request_router_class"] == ROUTERS[preset["router"]]
    assert dep["autoscaling_config"]["max_replicas"] == preset["autoscaling"]["max_replicas"]
    assert d["engine_kwargs"]["enable_prefix_caching"] is True
    llm = validate_llm_config(d)
    assert llm.model_id == "Qwen/Qwen2.5-0.5B-Instruct"


def test_tiers_differ_the_way_their_use_needs() -> None:
    shared, workflow, dedicated = (_model(tier=t) for t in ("shared", "workflow", "dedicated"))
    assert shared.router == "prefix_cache" and workflow.router == "session"
    assert shared.max_ongoing_requests > workflow.max_ongoing_requests
    assert dedicated.autoscaling.min_replicas == dedicated.autoscaling.max_replicas


def test_explicit_fields_override_the_preset() -> None:
    m = _model(tier="shared", max_ongoing_requests=32, router="default",
               enable_prefix_caching=False, autoscaling={"max_replicas": 10})
    assert m.max_ongoing_requests == 32
    assert m.autoscaling.model_dump() == {"min_replicas": 1, "max_replicas": 10,
                                          "target_ongoing_requests": 128}
    d = llm_config_dict("m", m)
    assert "request_router_config" not in d["deployment_config"]
    assert d["engine_kwargs"]["enable_prefix_caching"] is False
    validate_llm_config(d)


def test_dedicated_pool_keeps_min_equal_max() -> None:
    assert _model(tier="dedicated", autoscaling={"min_replicas": 3}).autoscaling.max_replicas == 3
    assert _model(tier="dedicated", autoscaling={"max_replicas": 2}).autoscaling.min_replicas == 2


def test_no_tier_leaves_serve_defaults() -> None:
    d = llm_config_dict("m", _model())
    assert d["deployment_config"] == {"name": "m"}
    assert d["engine_kwargs"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    validate_llm_config(d)


@pytest.mark.parametrize(
    ("fields", "strategy", "gpus"),
    [
        ({}, "STRICT_PACK", 1),
        ({"tensor_parallel_size": 8}, "STRICT_PACK", 8),
        ({"tensor_parallel_size": 8, "pipeline_parallel_size": 2}, "PACK", 16),
        ({"tensor_parallel_size": 8, "gpus_per_node": 4}, "PACK", 8),
        ({"tensor_parallel_size": 2, "placement_strategy": "SPREAD"}, "SPREAD", 2),
    ],
)
def test_placement_strategy_is_derived_from_tp_pp(fields: dict[str, Any], strategy: str,
                                                  gpus: int) -> None:
    d = llm_config_dict("m", _model(**fields))
    pg = d["placement_group_config"]
    assert pg["strategy"] == strategy
    assert pg["bundles"] == [{"GPU": 1}] * gpus
    assert d["engine_kwargs"]["tensor_parallel_size"] * d["engine_kwargs"][
        "pipeline_parallel_size"] == gpus
    validate_llm_config(d)


def test_strict_pack_over_a_node_is_an_error() -> None:
    problems = _problems(tensor_parallel_size=8, pipeline_parallel_size=2,
                         placement_strategy="STRICT_PACK")
    msg = problems["models.m.placement_strategy"]
    assert "16 GPUs" in msg and "gpus_per_node = 8" in msg and "PACK" in msg
    assert "models.m.placement_strategy" in _problems(
        tensor_parallel_size=4, gpus_per_node=2, placement_strategy="STRICT_PACK")


@pytest.mark.parametrize(
    ("fields", "path", "needle"),
    [
        ({"autoscaling": {"min_replicas": 5, "max_replicas": 2}}, "models.m.autoscaling",
         "min_replicas (5) is above max_replicas (2)"),
        ({"tier": "shared", "autoscaling": {"min_replicas": 9}}, "models.m.autoscaling",
         "min_replicas (9)"),
        ({"autoscaling": {"min_replicas": 3}}, "models.m.autoscaling", "Serve default"),
        ({"tier": "huge"}, "models.m.tier", "shared"),
        ({"router": "sticky"}, "models.m.router", "session"),
        ({"tensor_parallel_size": 0}, "models.m.tensor_parallel_size", "greater than"),
        ({"engine_kwargs": {"tensor_parallel_size": 2}}, "models.m.engine_kwargs",
         "own field"),
        ({"client": {"timeout_s": 0}}, "models.m.client", "timeout_s"),
        ({"client": {"base_url": "http://x"}}, "models.m.client", "set by the deployment"),
        ({"gpus": 3}, "models.m.gpus", "unknown field"),
        ({"model_source": ""}, "models.m.model_source", "at least 1"),
    ],
)
def test_bad_vllm_fields_name_the_field(fields: dict[str, Any], path: str, needle: str) -> None:
    problems = _problems(**fields)
    assert path in problems, problems
    assert needle in problems[path]


def test_unknown_provider_and_missing_key_variable_are_clear() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(provider="vlm"), env={})
    msg = dict(ei.value.problems)["models.m.provider"]
    assert "unknown provider 'vlm'" in msg and "'vllm'" in msg
    with pytest.raises(ConfigError) as ei:
        parse_config(_cfg(client={"api_key": "${VLLM_API_KEY}"}), env={})
    assert "VLLM_API_KEY is not set" in dict(ei.value.problems)["models.m.client.api_key"]


def test_agents_reach_the_model_like_provider_openai() -> None:
    from swarm.models import build_model
    from swarm.models.openai import OpenAIModel

    m = _model(model_id="small", client={"timeout_s": 7, "api_key": "k"},
               price={"input_per_mtok": 0.1})
    oc = m.openai_config("http://127.0.0.1:8000/g/m/v1")
    assert (oc.provider, oc.model, oc.base_url, oc.timeout_s) == (
        "openai", "small", "http://127.0.0.1:8000/g/m/v1", 7)
    assert oc.api_key.get_secret_value() == "k" and oc.price.input_per_mtok == 0.1
    client = build_model("m", m, {"m": "http://127.0.0.1:8000/g/m/v1"})
    assert isinstance(client, OpenAIModel)
    assert client.model == "small" and client.name == "m"
    with pytest.raises(ValueError, match="no deployed endpoint"):
        build_model("m", m, {})


def test_router_classes_resolve() -> None:
    module, _, cls = ROUTERS["session"].rpartition(".")
    assert getattr(importlib.import_module(module), cls).__name__ == "ConsistentHashRouter"
    d = llm_config_dict("m", _model(router="prefix_cache",
                                    router_kwargs={"imbalanced_threshold": 4}))
    rc = d["deployment_config"]["request_router_config"]
    assert rc == {"request_router_class": ROUTERS["prefix_cache"],
                  "request_router_kwargs": {"imbalanced_threshold": 4}}
    validate_llm_config(d)  # Serve imports the router class to check it


def test_ray_rejections_name_the_model() -> None:
    d = llm_config_dict("m", _model(accelerator_type="H900"))
    with pytest.raises(ConfigError) as ei:
        validate_llm_config(d, field="models.m")
    assert "Unsupported accelerator type: H900" in dict(ei.value.problems)["models.m"]


def test_serve_app_dict_is_one_openai_app_per_model() -> None:
    data = _cfg(tier="workflow")
    data["models"]["other"] = {"provider": "vllm", "model_source": "x/y", "model_id": "y"}
    cfg = parse_config(data, env={})
    apps = serve_app_dict(cfg, "prod")["applications"]
    assert [(a["name"], a["route_prefix"]) for a in apps] == [("prod-m", "/prod/m"),
                                                              ("prod-other", "/prod/other")]
    assert {a["import_path"] for a in apps} == {"ray.serve.llm:build_openai_app"}
    assert apps[1]["args"]["llm_configs"][0]["model_loading_config"] == {
        "model_id": "y", "model_source": "x/y"}


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    p = tmp_path / "swarm.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_serve_dry_run_prints_the_serve_yaml(tmp_path: Path) -> None:
    data = _cfg(tier="shared", runtime_env={"env_vars": {"HF_TOKEN": "hf_secret", "MODE": "x"}})
    path = _write(tmp_path, data)
    result = CliRunner().invoke(app, ["serve", "--dry-run", str(path)])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    expected = serve_app_dict(parse_config(data, env={}))
    env = expected["applications"][0]["args"]["llm_configs"][0]["runtime_env"]["env_vars"]
    env["HF_TOKEN"] = "<redacted>"
    assert printed == expected
    assert "hf_secret" not in result.output
    assert "HF_TOKEN redacted" in result.output


def test_serve_dry_run_reports_a_config_ray_rejects(tmp_path: Path) -> None:
    path = _write(tmp_path, _cfg(accelerator_type="H900"))
    result = CliRunner().invoke(app, ["serve", "--dry-run", str(path)])
    assert result.exit_code == 2
    assert "models.m" in result.output and "H900" in result.output


@pytest.mark.skipif(vllm_available(), reason="checks the message shown without vLLM")
def test_serve_without_vllm_names_the_extra(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(_write(tmp_path, _cfg()))])
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "pip install 'swarm[gpu]'" in text
    assert "model(s) m use provider: vllm" in text


# ---- the committed cluster files ---------------------------------------------------------------

GPU_CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


def test_every_gpu_config_has_its_committed_serve_file() -> None:
    assert len(GPU_CONFIGS) >= 5
    committed = {p.name for p in (REPO / "cluster" / "serve").glob("*.yaml")}
    assert committed == {p.name for p in GPU_CONFIGS}


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.stem)
def test_committed_serve_files_match_their_swarm_configs(
        config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    source = f"configs/gpu/{config.name}"
    result = CliRunner().invoke(app, ["serve", "--dry-run", source])
    assert result.exit_code == 0, result.output
    committed = (REPO / "cluster" / "serve" / config.name).read_text()
    assert result.stdout == committed, (
        f"cluster/serve/{config.name} is stale: regenerate it with "
        f"`swarm serve --dry-run {source} > cluster/serve/{config.name}`")


def test_gpu_configs_cover_the_documented_shapes() -> None:
    shapes = set()
    for p in (REPO / "cluster" / "serve").glob("*.yaml"):
        for a in yaml.safe_load(p.read_text())["applications"]:
            llm = a["args"]["llm_configs"][0]
            ek = llm["engine_kwargs"]
            shapes.add((ek["tensor_parallel_size"], ek["pipeline_parallel_size"],
                        ek.get("quantization"), llm["placement_group_config"]["strategy"]))
    assert {(1, 1, "fp8", "STRICT_PACK"), (2, 1, None, "STRICT_PACK"), (4, 1, None, "STRICT_PACK"),
            (8, 1, None, "STRICT_PACK"), (8, 2, None, "PACK")} <= shapes


CLUSTER_YAML = sorted((REPO / "cluster").rglob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cluster_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for doc in docs:
        if isinstance(doc, dict) and "applications" in doc:
            for a in doc["applications"]:
                if a.get("import_path") == "ray.serve.llm:build_openai_app":
                    for llm in a["args"]["llm_configs"]:
                        validate_llm_config(llm, field=f"{path.name}: {a['name']}")


def test_rayservice_embeds_a_generated_serve_config() -> None:
    svc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    generated = yaml.safe_load((REPO / "cluster" / "serve" / "llama70b-tp4.yaml").read_text())
    assert embedded["applications"] == generated["applications"]


def test_kuberay_manifests_share_one_cluster_spec() -> None:
    kuberay = REPO / "cluster" / "kuberay"
    cluster = yaml.safe_load((kuberay / "raycluster.yaml").read_text())
    service = yaml.safe_load((kuberay / "rayservice.yaml").read_text())
    job = yaml.safe_load((kuberay / "rayjob.yaml").read_text())
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"h100", "h200"}
    for g in groups.values():
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
    head = cluster["spec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # The cluster starts with the Ray settings recovery relies on (what local clusters get).
    from swarm.runtime.deploy import RAY_SYSTEM_CONFIG

    started = json.loads(head["rayStartParams"]["system-config"])
    assert started.items() >= RAY_SYSTEM_CONFIG.items()
    assert job["spec"]["entrypoint"].startswith("python -m swarm run configs/")
    assert (REPO / job["spec"]["entrypoint"].split()[-1]).is_file()


def test_launcher_config_validates_against_rays_schema() -> None:
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = yaml.safe_load((REPO / "cluster" / "launcher" / "aws-gpu.yaml").read_text())
    jsonschema.validate(launcher, schema)
    types = launcher["available_node_types"]
    assert types["gpu-h100"]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert types["gpu-h200"]["node_config"]["InstanceType"].startswith("p5e")
    from swarm.runtime.deploy import RAY_SYSTEM_CONFIG

    start = " ".join(launcher["head_start_ray_commands"])
    flag = start.split("--system-config='", 1)[1].split("'", 1)[0]
    assert json.loads(flag).items() >= RAY_SYSTEM_CONFIG.items()
    assert any("[gpu]" in c for c in launcher["setup_commands"])
    types["head"]["node_config_typo"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(launcher, schema)


# ---- with vLLM ---------------------------------------------------------------------------------


def test_engine_kwargs_are_checked_by_vllm_where_installed() -> None:
    pytest.importorskip("vllm")
    from ray.serve.llm import LLMConfig  # public API, needs vLLM

    d = llm_config_dict("m", _model(tier="shared"))
    assert LLMConfig(**d).model_id == "Qwen/Qwen2.5-0.5B-Instruct"
    validate_llm_config(d)
    with pytest.raises(ConfigError, match="no_such_engine_arg"):
        validate_llm_config({**d, "engine_kwargs": {**d["engine_kwargs"],
                                                    "no_such_engine_arg": 1}})
