"""Direct calls to Serve replicas (`swarm.models.ingress`): the replica a session goes to, and
the fallback to the proxy's URL where no replica is listed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from swarm.models.ingress import Replica, ReplicaDirectory, _http_targets, pick, replicas_of


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


async def _nothing_listed() -> tuple[Replica, ...]:
    return ()


def test_the_route_prefix_and_the_proxy_fallback_when_nothing_is_listed() -> None:
    d = ReplicaDirectory("http://127.0.0.1:8000/dep/model/v1/")
    assert d.route_prefix == "/dep/model" and d.suffix == "/v1"
    # The controller lists no replica for the app (no direct ingress, none up yet; `_read`
    # is the Ray boundary): every call goes to the given URL.
    d._read = _nothing_listed  # type: ignore[method-assign]

    async def twice() -> list[str]:
        first = d.base_url("s-1")
        await d.refresh()  # what the first call started in the background
        return [first, d.base_url("s-1")]

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


def test_the_controllers_targets_become_replica_urls() -> None:
    groups = [
        ("/dep/m", [("SERVE_REPLICA::dep-m#D#b", "10.0.0.5", 30001),
                    ("SERVE_REPLICA::dep-m#D#a", "10.0.0.9", 30000),
                    ("SERVE_PROXY_ACTOR-node", "10.0.0.5", 8000)]),
        ("/dep/other", [("SERVE_REPLICA::dep-other#D#c", "10.0.0.5", 30002)]),
    ]
    got = replicas_of(groups, "/dep/m", "/v1", "10.0.0.5", "127.0.0.1")
    # Sorted by name; the proxy and the other app are left out; this node's replica is called
    # on loopback (Serve bound it there), the other node's on its address.
    assert got == (Replica("SERVE_REPLICA::dep-m#D#a", "http://10.0.0.9:30000/dep/m/v1"),
                   Replica("SERVE_REPLICA::dep-m#D#b", "http://127.0.0.1:30001/dep/m/v1"))
    # Bound to a specific address: called there, even on this node.
    assert replicas_of(groups, "/dep/m", "/v1", "10.0.0.5", "10.0.0.5")[1].base_url == \
        "http://10.0.0.5:30001/dep/m/v1"
    # IPv6 addresses are bracketed; an app at "/" (route prefix "") matches the controller's "/".
    v6 = [("/", [("SERVE_REPLICA::root#D#x", "fd00::2", 30003)])]
    assert replicas_of(v6, "", "/v1", "fd00::1", "::") == (
        Replica("SERVE_REPLICA::root#D#x", "http://[fd00::2]:30003/v1"),)
    # Without direct ingress only proxies are listed: no replica, calls use the proxy URL.
    proxies = [("/dep/m", [("SERVE_PROXY_ACTOR-node", "10.0.0.5", 8000)])]
    assert replicas_of(proxies, "/dep/m", "/v1", "10.0.0.5", "127.0.0.1") == ()


def test_the_function_run_in_the_controller_flattens_its_groups() -> None:
    http, grpc = SimpleNamespace(value="HTTP"), SimpleNamespace(value="gRPC")
    target = SimpleNamespace(name="SERVE_REPLICA::a#D#r", ip="10.0.0.5", port="30000")
    controller = SimpleNamespace(
        get_target_groups=lambda: [SimpleNamespace(protocol=http, route_prefix="/a",
                                                   targets=[target]),
                                   SimpleNamespace(protocol=grpc, route_prefix="/a",
                                                   targets=[target]),
                                   SimpleNamespace(protocol=http, route_prefix=None,
                                                   targets=[])],
        get_http_config=lambda: SimpleNamespace(host="0.0.0.0"))
    assert _http_targets()(controller) == (
        "0.0.0.0", [("/a", [("SERVE_REPLICA::a#D#r", "10.0.0.5", 30000)]), ("", [])])


def test_many_calls_at_once_start_one_read() -> None:
    d = ReplicaDirectory("http://127.0.0.1:8000/app/v1")
    reads = 0

    async def counted() -> tuple[Replica, ...]:
        nonlocal reads
        reads += 1
        return _replicas(2)

    d._read = counted  # type: ignore[method-assign]

    async def many() -> int:
        for i in range(30):
            d.base_url(f"s-{i}")
        readers = [t for t in asyncio.all_tasks()
                   if t.get_coro().__qualname__.endswith("._refresh")]
        await d.refresh()  # joins the read the calls started
        return len(readers)

    assert asyncio.run(many()) == 1
    assert reads == 1 and d.replicas == _replicas(2)
