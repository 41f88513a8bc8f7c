"""Direct calls to Serve replicas (`swarm.models.ingress`): the replica a session goes to, and
the fallback to the proxy's URL where no replica is listed."""

from __future__ import annotations

import asyncio

from swarm.models.ingress import Replica, ReplicaDirectory, pick


def _replicas(n: int) -> tuple[Replica, ...]:
    return tuple(Replica(f"SERVE_REPLICA::app#d#r{i}", f"http://127.0.0.1:{30000 + i}/app/v1")
                 for i in range(n))


def test_a_session_always_gets_the_same_replica_and_sessions_spread() -> None:
    three = _replicas(3)
    picks = {s: pick(three, f"s-{s}") for s in range(300)}
    assert all(pick(three, f"s-{s}") == r for s, r in picks.items())
    counts = [sum(1 for r in picks.values() if r == rep) for rep in three]
    assert min(counts) > 50, counts  # about 100 each


def test_only_a_lost_replicas_sessions_move() -> None:
    three = _replicas(3)
    two = three[:2]
    for s in range(300):
        was = pick(three, f"s-{s}")
        now = pick(two, f"s-{s}")
        if was in two:
            assert now == was  # a survivor's session stays
        # and a session of the lost one lands on a survivor
        assert now in two


def test_the_route_prefix_and_the_proxy_fallback_without_ray() -> None:
    d = ReplicaDirectory("http://127.0.0.1:8000/dep/model/v1/")
    assert d.route_prefix == "/dep/model" and d.suffix == "/v1"
    # No Ray here: no replica list, every call goes to the given URL.
    async def twice() -> list[str]:
        first = await d.base_url("s-1")
        await d.refresh()  # what the first call started in the background
        return [first, await d.base_url("s-1")]

    assert asyncio.run(twice()) == ["http://127.0.0.1:8000/dep/model/v1"] * 2
    assert d.replicas == ()


def test_a_replica_that_refused_a_connection_is_left_out() -> None:
    d = ReplicaDirectory("http://127.0.0.1:8000/app/v1")
    d.replicas = _replicas(2)
    gone = d.replicas[0].base_url
    d.forget(gone)
    assert [r.base_url for r in d.replicas] == [_replicas(2)[1].base_url]
    assert gone in d._down


def test_ingress_in_the_config_reaches_the_client() -> None:
    import pytest
    from pydantic import ValidationError

    from swarm.config import ScriptedModelConfig, VLLMModelConfig
    from swarm.models import build_model

    scripted = ScriptedModelConfig(provider="scripted", policy="p.yaml", ingress="direct")
    model = build_model("m", scripted, {"m": "http://127.0.0.1:8000/dep/m/v1"})
    assert model._directory is not None and model._directory.route_prefix == "/dep/m"
    plain = build_model("m", ScriptedModelConfig(provider="scripted", policy="p.yaml"),
                        {"m": "http://127.0.0.1:8000/dep/m/v1"})
    assert plain._directory is None
    vllm = VLLMModelConfig(provider="vllm", model_source="org/model", ingress="direct")
    assert vllm.openai_config("http://127.0.0.1:8000/dep/v/v1").serve_direct is True
    with pytest.raises(ValidationError, match="ingress"):
        ScriptedModelConfig(provider="scripted", policy="p.yaml", ingress="sideways")
    with pytest.raises(ValidationError, match=r"serve_direct is set by models\.<name>\.ingress"):
        VLLMModelConfig(provider="vllm", model_source="org/model",
                        client={"serve_direct": True})
