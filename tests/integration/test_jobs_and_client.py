"""The user paths that go through processes: `ray job submit`, and `swarm up` + the client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import swarm
from swarm.errors import SwarmNotFound, TaskFailed, TaskNotFound, UserError
from swarm.events import ModelCalled, TaskFinished

ROOT = Path(__file__).resolve().parents[2]
ECHO = Path(__file__).resolve().parent / "configs" / "echo.yaml"


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    return subprocess.run(
        [sys.executable, "-m", "swarm", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_ray_job_submit_runs_the_demo(ray_cluster, serve_port, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = ray_cluster["dashboard_url"]
    assert address, "the integration cluster must run the dashboard for the Jobs API"
    client = JobSubmissionClient(f"http://{address}")
    entry = (
        f"{sys.executable} -m swarm run configs/research.yaml --task 'What is tensor parallelism?'"
    )
    runtime_env = {
        "working_dir": str(ROOT),
        "env_vars": {"SWARM_NOTES_DIR": str(tmp_path / "notes")},
    }
    job_id = None
    for _ in range(10):  # the job agent can answer 500 just after start-up
        try:
            job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(1)  # a retry back-off, not synchronisation
    assert job_id is not None

    async def tail() -> str:
        out = []
        async for lines in client.tail_job_logs(job_id):  # ends when the job ends
            out.append(lines)
        return "".join(out)

    logs = asyncio.run(asyncio.wait_for(tail(), 240))
    status = client.get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "handoff → researcher" in logs and "handoff → writer" in logs
    assert "tensor" in logs.lower() and "answer" in logs


def test_up_client_and_down(ray_cluster, serve_port) -> None:
    name = f"up-{uuid.uuid4().hex[:6]}"
    up = _cli("up", str(ECHO), "--name", name)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"swarm {name!r} is up" in up.stdout
    try:
        import ray

        # The actors are named and detached, so they outlive the `swarm up` process.
        from swarm.runtime.deploy import NAMESPACE

        ray.get_actor(f"{name}.supervisor", namespace=NAMESPACE)
        ray.get_actor(f"{name}.worker.1", namespace=NAMESPACE)

        client = swarm.connect(name)
        assert client.info()["agents"] == {"front": 1, "worker": 2, "broken": 1}
        meta = {"ticket": "T-1", "n": 7, "tags": ["a", {"k": [1, 2.5]}], "whole": 2.0}
        task = client.submit("hello there", user="ana", metadata=meta)
        events = list(task.events(timeout=60))
        assert any(isinstance(e, ModelCalled) for e in events)
        assert isinstance(events[-1], TaskFinished)
        assert task.result(timeout=30) == "done: hello there"
        st = task.status()
        assert (st.state, st.user, st.metadata["ticket"]) == ("completed", "ana", "T-1")
        # Plain JSON as submitted (nested lists and objects, ints as ints), in every row.
        sent = json.dumps({**meta, "user": "ana"}, sort_keys=True)
        listed = [r for r in client.tasks() if r.task_id == task.id]
        assert len(listed) == 1
        for info in (st, task.wait(timeout=0), *listed):
            assert json.dumps(info.metadata, sort_keys=True) == sent
        assert task.a2a_task().status.state == 3  # TASK_STATE_COMPLETED

        slow = client.submit("slow please")
        for ev in slow.events(timeout=60):
            if getattr(ev, "step", 0) >= 2:
                break
        assert [r.task_id for r in client.tasks(state="working")] == [slow.id]
        assert slow.cancel().state == "canceled"
        with pytest.raises(TaskFailed):
            slow.result(timeout=10)
        states = {r.task_id: r.state for r in client.tasks()}
        assert states == {task.id: "completed", slow.id: "canceled"}
        with pytest.raises(TaskNotFound):
            client.task("nope")
        with pytest.raises(UserError):
            client.submit("")

        # A batch: one call submits, one call waits for all of them.
        batch = client.submit_many([f"item {i}" for i in range(5)], user="bo")
        rows = client.wait_all(batch, timeout=60)
        assert [r.task_id for r in rows] == [h.id for h in batch]
        assert [(r.state, r.user, r.answer) for r in rows] == \
            [("completed", "bo", f"done: item {i}") for i in range(5)]
        with pytest.raises(TaskNotFound):
            client.wait_all([batch[0].id, "nope"], timeout=5)
        # A burst of more turns than a post call takes (64 a replica): they go out in calls
        # of at most 64 as the tasks start, not in one call once all have, and all are
        # answered.
        front = ray.get_actor(f"{name}.front.0", namespace=NAMESPACE)
        before = ray.get(front.stats.remote())
        burst = client.submit_many([f"burst {i}" for i in range(150)], user="bo")
        rows = client.wait_all(burst, timeout=120)
        assert [(r.state, r.answer) for r in rows] == \
            [("completed", f"done: burst {i}") for i in range(150)]
        posted = ray.get(front.stats.remote())
        assert posted["turns_posted"] - before["turns_posted"] == 150
        assert posted["posts"] - before["posts"] >= 3 and posted["largest_post"] <= 64, posted
        before = len(client.tasks())
        with pytest.raises(UserError, match="text 1: task text must be a non-empty string") \
                as err:
            client.submit_many(["fine", ""])
        assert len(client.tasks()) == before  # nothing of a rejected batch was created
        # The ids it used come with the error; the same batch again with them (fixed) makes
        # each task once, and once more makes nothing new.
        ids = err.value.task_ids  # type: ignore[attr-defined]
        assert len(ids) == 2
        again = client.submit_many(["fine", "also fine"], user="bo", task_ids=ids)
        assert [h.id for h in again] == ids
        assert [h.id for h in client.submit_many(["fine", "also fine"], user="bo",
                                                 task_ids=ids)] == ids
        assert len(client.tasks()) == before + 2

        listed = _cli("tasks", name)
        assert listed.returncode == 0 and "canceled" in listed.stdout
        again = _cli("up", str(ECHO), "--name", name)
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        down = _cli("down", name)
    assert down.returncode == 0, down.stderr
    with pytest.raises(SwarmNotFound):
        swarm.connect(name)
    gone = _cli("down", name)
    assert gone.returncode == 2 and "no swarm named" in gone.stderr


def test_a_follower_gets_the_end_of_a_task_that_left_memory(ray_cluster, serve_port,
                                                            tmp_path) -> None:
    # The swarm keeps 100 finished tasks in memory (limits.finished_in_memory); its store is
    # the session's Redis (SWARM_STATE_STORE).
    text = ECHO.read_text().replace(
        "limits: {max_task_chars: 2000}", "limits: {max_task_chars: 2000, finished_in_memory: 100}"
    ).replace("policy: echo-policy.yaml", f"policy: {ECHO.parent / 'echo-policy.yaml'}")
    assert "finished_in_memory: 100" in text
    cfg = tmp_path / "echo.yaml"
    cfg.write_text(text)
    name = f"drop-{uuid.uuid4().hex[:6]}"
    up = _cli("up", str(cfg), "--name", name)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        client = swarm.connect(name)
        task = client.submit("hello first")
        follower = task.events(timeout=120)
        seen = [next(follower)]  # following it, from its first event
        assert task.result(timeout=60) == "done: hello first"
        # 110 tasks finish after it: it leaves the supervisor's memory, its events with it.
        rows = client.wait_all(client.submit_many([f"item {i}" for i in range(110)]),
                               timeout=120)
        assert {r.state for r in rows} == {"completed"}
        assert task.id not in {r.task_id for r in client.tasks()}
        seen += list(follower)
        ends = [e for e in seen if isinstance(e, TaskFinished)]
        assert len(ends) == 1 and seen[-1] is ends[0]
        assert (ends[0].task_id, ends[0].state, ends[0].answer) == (
            task.id, "completed", "done: hello first")
        # By id it is still there; a new follower gets its end alone.
        assert task.status().state == "completed"
        again = list(client.task(task.id).events(timeout=30))
        assert [(type(e), e.answer) for e in again] == [(TaskFinished, "done: hello first")]
    finally:
        down = _cli("down", name)
    assert down.returncode == 0, down.stderr


def test_run_on_its_own_cluster_takes_a_free_port_when_8000_is_taken(tmp_path) -> None:
    # Another program (another cluster's Serve, say) holds port 8000: `swarm run`, which
    # starts a private Ray, must put its Serve proxy on a free port and answer, not fail with
    # a bind error or send its model calls to the other program.
    import socket

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 8000))
        holder.listen()
    except OSError:  # something holds it already: the same situation
        pass
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "SWARM_SERVE_PORT")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "swarm", "run", "configs/research.yaml", "--task",
             "What is MCP?", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=300, stdin=subprocess.DEVNULL)
    finally:
        holder.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"state":"completed"' in done.stdout.replace(" ", ""), done.stdout[-2000:]


def test_a_swarm_started_from_python_outlives_the_handle_it_returned(ray_cluster,
                                                                    serve_port) -> None:
    # start_swarm's supervisor isn't detached: this process holds it until stop_swarm, so a
    # caller that drops the returned handle doesn't lose the swarm (and orphan its agents).
    import gc

    from swarm.config import load_config
    from swarm.runtime.deploy import start_swarm, stop_swarm

    name = f"kept-{uuid.uuid4().hex[:6]}"
    start_swarm(load_config(ECHO), deployment=name)  # the handle is not kept
    gc.collect()
    try:
        client = swarm.connect(name)
        assert client.submit("hello").result(timeout=60) == "done: hello"
    finally:
        stop_swarm(name)
    with pytest.raises(SwarmNotFound):
        swarm.connect(name)
