"""The swarm's Redis store restarts mid-task on a local Ray, for longer than
`state.outage_timeout_s`: the agent replica's turn stops on it, the supervisor actor waits for
the store and resumes the turn, and each side effect happens once (as in
tests/unit/test_store_outage.py, here across the actors' own store connections)."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from swarm.client import SwarmClient
from swarm.config import parse_config
from swarm.errors import SwarmNotFound
from swarm.events import Alert, TurnResumed
from swarm.runtime.deploy import start_swarm, stop_swarm
from swarm.state.embedded import EmbeddedRedis
from tests.integration.conftest import swarm_diagnostics

POLICY = {"rules": [
    {"when": {"agent": "a", "called": {"charge": 0}},
     "tool_calls": [{"name": "charge", "arguments": {"n": 1}}]},
    {"when": {"agent": "a", "called": {"charge": 1, "wait_here": 0}},
     "tool_calls": [{"name": "wait_here", "arguments": {}}]},
    {"when": {"agent": "a", "called": {"charge": 1}},
     "tool_calls": [{"name": "charge", "arguments": {"n": 2}}]},
    {"when": {"agent": "a"}, "content": "done: {{ results.charge }}"},
]}


def test_a_store_restart_mid_task_is_waited_out(ray_cluster, redis_url, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWARM_STATE_STORE", raising=False)  # this swarm's store is its own
    store = EmbeddedRedis(tmp_path / "store")
    store.start()
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    cfg = parse_config({
        "name": "outage",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml",
                         "transport": "in_process"}},
        "tools": {"t": {"python": ["tests.integration.held_tools:charge",
                                   "tests.integration.held_tools:wait_here"]}},
        "agents": {"a": {"model": "m", "tools": ["t"]}},
        "supervisor": {"entry": "a"},
        "state": {"store": store.url, "outage_timeout_s": 1, "outage_wait_s": 120},
    }, base_dir=tmp_path)
    name = f"outage-{uuid.uuid4().hex[:6]}"
    r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    try:
        sup, _ = start_swarm(cfg, deployment=name)
        handle = SwarmClient(name, sup).submit("x")
        assert r.blpop([f"held:entered:{handle.id}"], timeout=120) is not None, \
            "the tool never started\n" + swarm_diagnostics(ray_cluster["temp_dir"], name)
        url = store.url
        store.stop()
        # Two releases: the first for the call running now, the second for the resumed
        # turn's run of it (its result was never durable; it is idempotent).
        r.rpush(f"held:release:{handle.id}", "go", "go")
        events = handle.events(timeout=120)
        waiting = next((e for e in events if isinstance(e, Alert)
                        and e.alert == "store_unavailable"), None)
        assert waiting is not None, f"no store_unavailable alert: {handle.status()}"
        assert waiting.action == "wait" and url in waiting.detail
        # The supervisor restarts while the store is down: it can't load its task table yet
        # (TableNotLoaded), and a client's call is sent again until it can (it raised
        # StoreUnavailable to the client before).
        import threading

        import ray

        from swarm.runtime.deploy import NAMESPACE
        from swarm.runtime.supervisor_actor import supervisor_actor_name
        from swarm.state.interface import TableNotLoaded

        actor = ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE)
        ray.kill(actor, no_restart=False)
        deadline = time.monotonic() + 120
        while True:  # the dying instance may still answer a call sent as it dies
            try:
                ray.get(actor.info.remote(), timeout=60)
            except TableNotLoaded as exc:
                assert "can't load its task table yet" in str(exc)
                break
            except ray.exceptions.ActorUnavailableError:
                pass  # restarting
            assert time.monotonic() < deadline, "the restarted supervisor loaded no table"
        waited: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: waited.update(info=handle.wait(timeout=120)))
        waiter.start()  # its calls meet TableNotLoaded until the store is back
        store.start()
        assert store.url == url
        waiter.join(180)
        info = waited.get("info")
        assert info is not None, "the client's wait did not ride out the restart"
        info = handle.wait(timeout=120)
        assert (info.state, info.answer) == ("completed", "done: charged 2"), \
            f"{info}\n" + swarm_diagnostics(ray_cluster["temp_dir"], name)
        # The restarted supervisor resumed the turn (events are its own since it started).
        assert any(isinstance(e, TurnResumed) for e in handle.events(timeout=30))
        assert [r.get(f"held:charges:{handle.id}:{n}") for n in (1, 2)] == ["1", "1"]
        assert r.get(f"held:waits:{handle.id}") == "2", "\n".join(
            str((h["seq"], h["summary"])) for h in handle.history())
    finally:
        with contextlib.suppress(SwarmNotFound):
            stop_swarm(name)
        store.stop()
