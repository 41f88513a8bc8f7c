"""Crash recovery on a local Ray: agent replicas and the supervisor die mid-task, tasks finish
with the answers of an undisturbed run, and no charge is ever applied twice."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from swarm.client import SwarmClient
from swarm.config import load_config
from swarm.errors import SwarmNotFound
from swarm.events import TurnResumed
from swarm.runtime.deploy import NAMESPACE, start_swarm, stop_swarm
from swarm.runtime.supervisor_actor import agent_actor_name, supervisor_actor_name
from tests.integration.conftest import swarm_diagnostics

HERE = Path(__file__).resolve().parent
ANSWER = "done: charged 1, balance 20"


def answer(account: str) -> str:
    """What an undisturbed run of the task on `account` answers."""
    return f"{ANSWER} ({account})"


@pytest.fixture
def pay(ray_cluster, serve_port, redis_url) -> Iterator[tuple[SwarmClient, str, redis.Redis]]:
    cfg = load_config(HERE / "configs" / "pay.yaml")
    name = f"pay-{uuid.uuid4().hex[:6]}"
    sup, _ = start_swarm(cfg, deployment=name)
    r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    r.delete("payments:progress")
    yield SwarmClient(name, sup), name, r
    with contextlib.suppress(SwarmNotFound):  # a test may have taken it down itself
        stop_swarm(name)


def _wait_progress(r: redis.Redis, charges: int, handles: list | None = None,
                   timeout: float = 60.0, explain: Callable[[], str] | None = None) -> bool:
    """Block until `charges` more charges were applied (the tool pushes one item each).

    Returns False if every task in `handles` ended first; fails if nothing moves in `timeout`
    (with what `explain` says, if given).
    """
    got, deadline = 0, time.monotonic() + timeout
    while got < charges:
        if r.blpop(["payments:progress"], timeout=1) is not None:
            got, deadline = got + 1, time.monotonic() + timeout
            continue
        if handles is not None and all(h.status().done for h in handles):
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress after {got} of {charges} charges"
                                 + ("\n" + explain() if explain is not None else ""))
    return True


def _wait_rows_completed(r: redis.Redis, swarm: str, ids: list[str], ray_temp_dir: str,
                         timeout: float = 120.0) -> None:
    """Block until the store's task rows of `ids` say completed, reading Redis directly."""
    from swarm.state import codec
    from swarm.state.interface import TaskRow

    raw = redis.Redis(connection_pool=r.connection_pool.__class__(
        **{**r.connection_pool.connection_kwargs, "decode_responses": False}))
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        rows = raw.hmget(f"swarm:s:{swarm}:tasks", ids)
        states = {i: codec.decode(TaskRow, v, task_id=i, what="row").state if v else "missing"
                  for i, v in zip(ids, rows, strict=True)}
        if set(states.values()) == {"completed"}:
            return
        r.blpop(["payments:progress"], timeout=0.5)  # wakes on progress, else polls
    raise AssertionError(f"tasks did not complete without a client call: {states}\n"
                         + swarm_diagnostics(ray_temp_dir, swarm))


def _check_exactly_once(r: redis.Redis, accounts: list[str]) -> None:
    for acct in accounts:
        assert r.get(f"balance:{acct}") == "20", acct
    effects = [int(v) for v in r.mget(r.keys("effects:*"))] if r.keys("effects:*") else []
    assert effects and max(effects) == 1, "a logical call took effect twice"


def _kill(name: str, role: str, replica: int) -> None:
    import ray

    ray.kill(ray.get_actor(agent_actor_name(name, role, replica), namespace=NAMESPACE),
             no_restart=False)


def test_agent_replica_killed_mid_task_resumes_its_sessions(pay) -> None:
    client, name, r = pay
    accounts = [f"acct-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    handles = [client.submit(a) for a in accounts]
    _wait_progress(r, 10)
    _kill(name, "teller", 0)
    _kill(name, "teller", 1)
    for a, h in zip(accounts, handles, strict=True):
        assert h.result(timeout=120) == answer(a)
    # Every task took 20 tool steps plus the answer, as an undisturbed run does.
    assert {h.status().steps for h in handles} == {21}
    _check_exactly_once(r, accounts)


def test_replicas_killed_while_a_burst_is_posted_lose_no_task(pay) -> None:
    # More tasks than one post call takes (64 a replica), so several calls are in flight to
    # each replica when both die: every task still ends as an undisturbed run does.
    client, name, r = pay
    accounts = [f"burst-{uuid.uuid4().hex[:8]}" for _ in range(140)]
    handles = client.submit_many(accounts)
    _kill(name, "teller", 0)
    _kill(name, "teller", 1)
    rows = client.wait_all(handles, timeout=300)
    assert [(row.state, row.answer) for row in rows] == \
        [("completed", answer(a)) for a in accounts]
    assert {row.steps for row in rows} == {21}
    _check_exactly_once(r, accounts)


def test_a_resumed_turn_starts_from_the_hot_snapshot(pay) -> None:
    # Both replicas die after the task's first snapshot: the turn resumes from the copy the
    # supervisor holds in the object store and replays only the entries after it.
    import ray

    client, name, r = pay
    account = f"acct-{uuid.uuid4().hex[:8]}"
    handle = client.submit(account)
    sup = ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE)
    deadline = time.monotonic() + 60
    while handle.id not in ray.get(sup.hot_snapshots.remote()):
        assert time.monotonic() < deadline, "no snapshot was published"
        r.blpop(["payments:progress"], timeout=0.5)  # wakes on the next charge
    _kill(name, "teller", 0)
    _kill(name, "teller", 1)
    assert handle.result(timeout=120) == answer(account)
    resumed = [e for e in handle.events() if isinstance(e, TurnResumed)]
    assert resumed, "the turn was not resumed"
    assert resumed[0].source == "hot"
    assert 0 < resumed[0].step < 21 and resumed[0].entries_replayed < 10 * 2 + 2


def test_supervisor_killed_rebuilds_its_table_and_clients_keep_handles(pay, ray_cluster) -> None:
    import ray

    client, name, r = pay
    accounts = [f"acct-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    handles = [client.submit(a, user="ops") for a in accounts]
    _wait_progress(r, 8)
    sup = ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE)
    # The restarted supervisor resumes the tasks by itself, every time: charges go on (more
    # than the at most 4 that were in flight when it died) before any client calls it again,
    # and the tasks finish, as the durable task rows show.
    for kill in range(3):
        ray.kill(sup, no_restart=False)
        r.delete("payments:progress")
        if kill < 2:
            _wait_progress(r, 6, explain=lambda: swarm_diagnostics(ray_cluster["temp_dir"], name))
    _wait_rows_completed(r, name, [h.id for h in handles], ray_cluster["temp_dir"])
    # The same handles work against the restarted supervisor.
    for a, h in zip(accounts, handles, strict=True):
        assert h.result(timeout=120) == answer(a)
    rows = {t.task_id: t for t in client.tasks()}
    assert all(rows[h.id].state == "completed" and rows[h.id].user == "ops" for h in handles)
    history = handles[0].history()
    assert [row["seq"] for row in history] == list(range(len(history)))
    _check_exactly_once(r, accounts)


def test_supervisor_killed_mid_burst_gives_every_task_its_own_answer(pay, ray_cluster) -> None:
    # Replicas deliver the results of turns the dead supervisor posted to the restarted one;
    # its post ids started again at 0, so an old "p17" was taken for its new "p17": after one
    # kill, 38 of 100 tasks completed with another task's answer. Each answer names its
    # account, so one that went to the wrong task shows.
    import ray

    client, name, r = pay
    accounts = [f"mix-{uuid.uuid4().hex[:8]}" for _ in range(60)]
    handles = client.submit_many(accounts)
    for _ in range(2):
        _wait_progress(r, 40, explain=lambda: swarm_diagnostics(ray_cluster["temp_dir"], name))
        ray.kill(ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE),
                 no_restart=False)
    rows = client.wait_all(handles, timeout=300)
    assert [(row.state, row.answer) for row in rows] == \
        [("completed", answer(a)) for a in accounts], \
        [(a, row.answer) for a, row in zip(accounts, rows, strict=True) if row.answer != answer(a)]
    assert {row.steps for row in rows} == {21}
    _check_exactly_once(r, accounts)


def _alive_pid(actor_name: str) -> int | None:
    from ray.util.state import list_actors

    for a in list_actors(filters=[("name", "=", actor_name), ("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False):
        return a.pid
    return None


def test_supervisor_process_killed_leaves_its_agents_and_joins_their_running_turn(
        ray_cluster, serve_port, redis_url) -> None:
    # Deployed as `swarm run` does (not detached), the supervisor's process is killed while a
    # turn runs a tool that is not idempotent. The agent replicas live on (they were the
    # supervisor's, and died with it), the restarted supervisor joins the running turn, and
    # the tool runs once: a replica that died would have left the call unfinished in the log,
    # and the task would wait for an operator instead.
    import ray

    name = f"held-{uuid.uuid4().hex[:6]}"
    sup, _ = start_swarm(load_config(HERE / "configs" / "held.yaml"), deployment=name)
    r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=30)
    try:
        client = SwarmClient(name, sup)
        handle = client.submit("hold")
        assert r.blpop([f"held:entered:{handle.id}"], timeout=120) is not None, \
            "the tool never started"
        agents = [agent_actor_name(name, "worker", i) for i in range(2)]
        pids = {a: _alive_pid(a) for a in agents}
        assert None not in pids.values(), pids
        sup_pid = _alive_pid(supervisor_actor_name(name))
        assert sup_pid is not None
        os.kill(sup_pid, signal.SIGKILL)
        # Released once the restarted supervisor has posted the turn again (its resume) to
        # the replica running it, so the resume finds it running there.
        replicas = [ray.get_actor(a, namespace=NAMESPACE) for a in agents]
        deadline = time.monotonic() + 120
        while sum(s["turns_posted"] for s in ray.get([h.stats.remote() for h in replicas],
                                                     timeout=60)) < 2:
            assert time.monotonic() < deadline, "the turn was not posted again\n" + \
                swarm_diagnostics(ray_cluster["temp_dir"], name)
            time.sleep(0.05)  # polls the replicas' counters, up to the deadline
        r.rpush(f"held:release:{handle.id}", "go")
        info = handle.wait(timeout=120)
        assert (info.state, info.answer) == ("completed", "released"), \
            f"{info}\n" + swarm_diagnostics(ray_cluster["temp_dir"], name)
        assert r.get(f"held:runs:{handle.id}") == "1"
        assert {a: _alive_pid(a) for a in agents} == pids, "an agent replica was restarted"
        assert _alive_pid(supervisor_actor_name(name)) != sup_pid
    finally:
        with contextlib.suppress(SwarmNotFound):
            stop_swarm(name)


def test_a_driver_that_ends_takes_its_swarm_with_it(ray_cluster, redis_url) -> None:
    # Not detached (`swarm run`), the agent replicas belong to the process that deployed the
    # swarm: when it ends without taking the swarm down, they end with it, as the supervisor
    # does, and leave nothing running on the cluster.
    name = f"gone-{uuid.uuid4().hex[:6]}"
    script = (
        "from swarm.config import load_config\n"
        "from swarm.runtime.deploy import ensure_ray, start_swarm\n"
        "ensure_ray()\n"
        f"start_swarm(load_config({str(HERE / 'configs' / 'held.yaml')!r}), "
        f"deployment={name!r})\n"
        "print('started', flush=True)\n")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"],
           "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr[-3000:]
    actors = [supervisor_actor_name(name), *(agent_actor_name(name, "worker", i)
                                             for i in range(2))]
    deadline = time.monotonic() + 120
    while alive := [a for a in actors if _alive_pid(a) is not None]:
        assert time.monotonic() < deadline, f"still running after their driver ended: {alive}"
        time.sleep(0.1)  # polls the actor table, up to the deadline


def test_a_swarm_taken_down_keeps_its_unfinished_tasks_for_the_next_up(pay) -> None:
    # `swarm down` mid-task, then `swarm up` with the same name: the tasks are not canceled
    # but resumed, and finish as an undisturbed run does, with no charge applied twice.
    client, name, r = pay
    accounts = [f"down-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    handles = [client.submit(a) for a in accounts]
    _wait_progress(r, 8)
    info = stop_swarm(name)
    assert info["resumable"] is True
    assert info["unfinished"] >= 1, info
    # (Not detached: the redeployed supervisor lives while this handle does.)
    _sup, _ = start_swarm(load_config(HERE / "configs" / "pay.yaml"), deployment=name)
    # The client of the swarm taken down goes on with the one deployed under its name.
    rows = client.wait_all([h.id for h in handles], timeout=120)
    assert [(row.state, row.answer) for row in rows] == \
        [("completed", answer(a)) for a in accounts]
    assert {row.steps for row in rows} == {21}
    _check_exactly_once(r, accounts)
    stop_swarm(name)  # while `_sup` holds the redeployed supervisor (not detached) alive


@pytest.mark.slow
def test_fifty_random_kills_never_repeat_a_charge(pay) -> None:
    client, name, r = pay
    rng = random.Random(1234)
    accounts = [f"acct-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    handles = [client.submit(a) for a in accounts]
    kills = 0
    # 20 tasks x 20 charges: a kill every 6 charges gives ~66 chances, whatever the speed.
    while kills < 50 and _wait_progress(r, 6, handles):
        _kill(name, "teller", rng.randrange(2))
        kills += 1
    for a, h in zip(accounts, handles, strict=True):
        assert h.result(timeout=300) == answer(a)
    _check_exactly_once(r, accounts)
    assert kills == 50, f"only {kills} kills landed before the tasks finished"
