"""Remote A2A members in a swarm deployed on a local Ray: the supervisor actor reaches a real A2A
server on 127.0.0.1, and a bad card stops the deployment before anything is started."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.client import SwarmClient
from swarm.config import parse_config
from swarm.errors import ConfigError, TaskFailed
from swarm.events import RemoteUpdate, TaskFinished
from swarm.runtime.deploy import start_swarm, stop_swarm
from tests.a2a_peer import STREAM_UPDATES, A2APeer


@pytest.fixture(scope="module")
def peer() -> Iterator[A2APeer]:
    p = A2APeer().start()
    yield p
    p.stop()


def config(tmp_path: Path, peer: A2APeer, **remotes: dict[str, Any]) -> Any:
    rules = [{"when": {"agent": "desk", "task_matches": f"^{mode}:"},
              "tool_calls": [{"name": f"transfer_to_{mode}",
                              "arguments": {"message": "{{ task }}"}}]} for mode in remotes]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": rules}))
    return parse_config({
        "name": "remote-desk",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml",
                         "transport": "in_process"}},
        "agents": {"desk": {"model": "m", "handoffs": list(remotes)},
                   **{mode: {"a2a": {"url": peer.url(mode), **kw}} for mode, kw in
                      remotes.items()}},
        "supervisor": {"entry": "desk"},
    }, base_dir=tmp_path)


def test_a_deployed_swarm_hands_off_to_a_remote_member(ray_cluster: Any, peer: A2APeer,
                                                       tmp_path: Path) -> None:
    cfg = config(tmp_path, peer, stream={}, slow={"timeout_s": 1})
    name = f"remote-{uuid.uuid4().hex[:6]}"
    sup, reports = start_swarm(cfg, deployment=name)
    try:
        remote = {r["role"]: r for r in reports if r["role"] in ("stream", "slow")}
        assert remote["stream"]["tools"] == [f"a2a {peer.url('stream')} (card 'peer-stream' "
                                             "v1.0.0)"]
        client = SwarmClient(name, sup)
        slow = client.submit("slow: wait for it")
        task = client.submit("stream: from Ray")
        events = list(task.events(timeout=60))
        assert task.result(timeout=10) == "echo: stream: from Ray"
        texts = [e.text for e in events if isinstance(e, RemoteUpdate) and e.text]
        assert texts == [f"{i}/3: {what}" for i, what in enumerate(STREAM_UPDATES, 1)]
        assert isinstance(events[-1], TaskFinished)
        with pytest.raises(TaskFailed) as failed:
            slow.result(timeout=60)
        assert failed.value.error_class == "tool"
        assert "remote agent slow" in str(failed.value) and "did not answer within 1 s" in \
            str(failed.value)
    finally:
        stop_swarm(name)


def test_a_bad_card_stops_the_deployment(ray_cluster: Any, peer: A2APeer,
                                         tmp_path: Path) -> None:
    import ray

    from swarm.runtime.deploy import NAMESPACE
    from swarm.runtime.supervisor_actor import supervisor_actor_name

    cfg = config(tmp_path, peer, emptycard={})
    name = f"remote-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigError) as err:
        start_swarm(cfg, deployment=name)
    ((path, msg),) = err.value.problems
    assert path == "agents.emptycard.a2a"
    assert f"remote A2A agent emptycard at {peer.url('emptycard')} can't be used" in msg
    with pytest.raises(ValueError):
        ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE)
