"""Recovery scenarios on real Ray clusters, end to end, with figures.

    python scripts/recovery_scenarios.py actor-kill|node-loss|cluster-restart [--json]

Each scenario starts its own redis-server (the swarm's durable store and the payments tool's
ledger, outside Ray) and its own Ray cluster, runs the payments swarm (`pay.yaml`: six tasks of
twenty charges each, more if a scenario needs them), breaks something mid-run, and checks that
every task still answers as an undisturbed run does, with every charge applied exactly once.
It prints the figures, and with `--json` one JSON line last; the exit code is non-zero if any
check failed.

- actor-kill: agent replicas are killed (and restarted by Ray) five times on a local Ray.
- node-loss: the worker node hosting an agent replica is lost (its workers frozen, its raylet
  killed) in a multi-node cluster.
- cluster-restart: the whole cluster is killed and started again; the supervisor rebuilds its
  task table from Redis and resumes the unfinished tasks.

Progress events are the items the payments tool pushes on `payments:progress`, one per applied
charge, named `charge:<task id>:<agent>:<step>:<index>`, so the script knows which task moved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import psutil  # noqa: E402 - after the path set-up, like the swarm imports below
import redis  # noqa: E402

from swarm.runtime.deploy import RAY_SYSTEM_CONFIG  # noqa: E402

CONFIGS = REPO_ROOT / "tests" / "integration" / "configs"
ANSWER = "done: charged 1, balance 20"
STEPS = 21  # twenty charges plus the answer, as an undisturbed run takes
PROGRESS = "payments:progress"
TASKS = 6
REPLICAS = 2
EVENT_TIMEOUT_S = 90.0  # generous: a lost node is noticed only after several missed health checks
RESULT_TIMEOUT_S = 180.0
RAY_BIN = str(Path(sys.executable).with_name("ray"))


class Report:
    """Figures and pass/fail checks of one scenario, printed for people and as JSON."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.figures: dict[str, Any] = {}
        self.checks: dict[str, bool] = {}
        self.notes: list[str] = []

    def figure(self, name: str, value: Any) -> None:
        """Record a measurement and print it at once (a crash later still leaves it visible)."""
        self.figures[name] = value
        print(f"  {name}: {value}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        """Record a pass/fail check."""
        self.checks[name] = bool(ok)
        print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)

    def note(self, text: str) -> None:
        """Record a remark that qualifies the figures."""
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    @property
    def ok(self) -> bool:
        """Whether the scenario ran to the end and every check passed."""
        return bool(self.checks) and all(self.checks.values())

    def as_json(self) -> str:
        """The report as one JSON line."""
        return json.dumps({"scenario": self.scenario, "ok": self.ok, "checks": self.checks,
                           "figures": self.figures, "notes": self.notes}, sort_keys=True)


# ---- machinery shared by the scenarios ----------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmp(stack: contextlib.ExitStack, prefix: str) -> str:
    """A private directory under /tmp, removed at the end (Ray's socket paths must stay short)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def keep_ray_address_file(stack: contextlib.ExitStack) -> None:
    """`ray.cluster_utils.Cluster` writes its address to Ray's default temp dir (`/tmp/ray`,
    whatever `temp_dir` its head gets), which fails on a machine where that directory doesn't
    exist yet, and would leave `ray.init()` there pointing at this scenario's cluster: make
    the directory, and put the file back as it was at the end."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # another Ray: its Cluster finds its own way
        return
    path = Path(get_ray_address_file(None))
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_bytes() if path.exists() else None

    def restore() -> None:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)

    stack.callback(restore)


def private_redis(stack: contextlib.ExitStack) -> str:
    """Start a redis-server for this scenario; export it as the swarm's store and the ledger."""
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(short_tmp(stack, "rs-redis-"))
    server.start()
    stack.callback(server.stop)
    saved = {k: os.environ.get(k) for k in ("SWARM_STATE_STORE", "SWARM_PAYMENTS_REDIS")}
    os.environ["SWARM_STATE_STORE"] = os.environ["SWARM_PAYMENTS_REDIS"] = server.url

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    stack.callback(restore)
    return server.url


def worker_env(url: str) -> dict[str, str]:
    """What Ray workers need: this checkout on the path and the payments tool's Redis."""
    return {"PYTHONPATH": str(REPO_ROOT), "SWARM_PAYMENTS_REDIS": url}


def pay_config() -> Any:
    """The payments swarm of the integration tests (`pay.yaml`)."""
    from swarm.config import load_config

    return load_config(CONFIGS / "pay.yaml")


def wait_process_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (not necessarily our child) to exit; whether it did in time."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        # A pidfd becomes readable when the process terminates: an event, not a poll.
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def stop_and_wait(stop: Callable[[], None], timeout: float = 30.0) -> None:
    """Run `stop` (a cluster shutdown), then wait, bounded, for every process this script had
    spawned to exit: a straggler (a dashboard module, say) would otherwise write into the
    cluster's temp dir after it was removed."""
    spawned = psutil.Process().children(recursive=True)
    stop()
    deadline = time.monotonic() + timeout
    for p in spawned:
        wait_process_gone(p.pid, max(deadline - time.monotonic(), 0.0))


class Progress:
    """The payments tool's progress list: one item per applied charge, oldest first."""

    def __init__(self, url: str) -> None:
        # redis-py's default 5 s socket timeout would cut a longer BLPOP short.
        self.r = redis.Redis.from_url(url, decode_responses=True,
                                      socket_timeout=EVENT_TIMEOUT_S + 30)

    def take(self, charges: int, timeout: float = EVENT_TIMEOUT_S) -> None:
        """Block until `charges` more charges were applied."""
        for _ in range(charges):
            if self.r.blpop([PROGRESS], timeout=timeout) is None:
                raise TimeoutError(f"no charge applied within {timeout} s")

    def drop_pending(self) -> int:
        """Discard the items already in the list (charges applied up to now); how many."""
        pending = int(self.r.llen(PROGRESS))
        if pending:
            self.r.lpop(PROGRESS, pending)  # the oldest ones: later pushes go to the tail
        return pending

    def next_charge_of(self, task_ids: set[str], timeout: float = EVENT_TIMEOUT_S) -> float:
        """Block until one of `task_ids` applies a charge; the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            item = self.r.blpop([PROGRESS], timeout=max(left, 0.01)) if left > 0 else None
            if item is None:
                raise TimeoutError(f"none of {sorted(task_ids)} charged within {timeout} s")
            if item[1].split(":")[1] in task_ids:
                return time.monotonic()


class Job:
    """One submitted task: its account, its sticky replica and its handle."""

    def __init__(self, handle: Any, account: str, replica: int) -> None:
        self.handle, self.account, self.replica = handle, account, replica


def submit_pinned(client: Any, replicas: list[int], of: int = REPLICAS) -> list[Job]:
    """Submit one task per entry of `replicas`, each with its own account, on that replica.

    A task sticks to the replica its context id hashes to, so choosing context ids chooses
    replicas, and the script knows which tasks a killed replica was running.
    """
    from swarm.runtime.supervisor import replica_for

    jobs = []
    for want in replicas:
        context = uuid.uuid4().hex
        while replica_for(context, of) != want:
            context = uuid.uuid4().hex
        account = f"acct-{uuid.uuid4().hex[:8]}"
        jobs.append(Job(client.submit(account, context_id=context), account, want))
    return jobs


def submit_balanced(client: Any, tasks: int = TASKS) -> list[Job]:
    """Submit `tasks` tasks spread evenly over the replicas."""
    return submit_pinned(client, [i % REPLICAS for i in range(tasks)])


def unfinished(r: redis.Redis, jobs: list[Job], margin: int = 2) -> set[str]:
    """Tasks with at least `margin` charges still to apply, read from their balances.

    A margin of two leaves at least one charge after a failure even if one lands meanwhile.
    """
    balances = r.mget([f"balance:{j.account}" for j in jobs]) if jobs else []
    return {j.handle.id for j, b in zip(jobs, balances, strict=True)
            if int(b or 0) <= 20 - margin}


def check_outcome(report: Report, url: str, jobs: list[Job],
                  timeout: float = RESULT_TIMEOUT_S) -> None:
    """Every task answers as an undisturbed run does, and every charge took effect once."""
    answers, steps = [], set()
    for job in jobs:
        try:
            answers.append(job.handle.result(timeout=timeout))
        except Exception as exc:
            answers.append(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            steps.add(job.handle.status().steps)
    # Each answer names its task's account: a task that got another's answer shows.
    wrong = [a for a, j in zip(answers, jobs, strict=True) if a != f"{ANSWER} ({j.account})"]
    report.check("answers_correct", not wrong, f"{len(answers) - len(wrong)}/{len(answers)}"
                 + (f"; e.g. {wrong[0]!r}" if wrong else ""))
    report.check("steps_as_undisturbed", steps == {STEPS}, f"steps per task {sorted(steps)}")
    r = redis.Redis.from_url(url, decode_responses=True)
    balances = r.mget([f"balance:{j.account}" for j in jobs])
    report.check("balances_20", all(b == "20" for b in balances), f"{balances}")
    effect_keys = r.keys("effects:*")
    effects = [int(v) for v in r.mget(effect_keys)] if effect_keys else []
    invocations = [int(v) for v in r.mget(r.keys("invocations:*"))] if effect_keys else []
    report.check("effects_exactly_once",
                 len(effects) == len(jobs) * 20 and set(effects) == {1},
                 f"{len(effects)} logical charges, max effects per key "
                 f"{max(effects) if effects else None}")
    # A charge sent again after a crash finds its earlier result: an invocation, no effect.
    report.figure("repeated_invocations_absorbed", sum(invocations) - sum(effects))


def actor_location(gcs_address: str, name: str) -> dict[str, Any]:
    """The live actor's pid, node id and restart count, from Ray's state API."""
    from ray.util.state import list_actors

    rows = list_actors(address=gcs_address, filters=[("name", "=", name)], detail=True,
                       raise_on_missing_output=False)
    alive = [a for a in rows if a.state == "ALIVE"]
    if not alive:
        raise RuntimeError(f"actor {name} is not alive: {[a.state for a in rows]}")
    a = alive[0]
    return {"pid": a.pid, "node_id": a.node_id, "restarts": a.num_restarts}


class WaitingClient:
    """A user waiting on every task's result, in a thread, while the scenario breaks things.

    A restarted supervisor rebuilds its table and resumes tasks when it gets its first call,
    so a scenario that only watched Redis would wait for a supervisor that nobody asks.
    """

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.errors: list[str] = []
        self._backoff = threading.Event()  # never set: its wait is the pause between retries
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        for job in self.jobs:
            while time.monotonic() < deadline:
                try:
                    if job.handle.wait(timeout=max(deadline - time.monotonic(), 1.0)).done:
                        break
                except Exception as exc:  # the client gave up on a call: a user would retry
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    self._backoff.wait(0.5)

    def join(self) -> None:
        """Wait for every task to end (bounded)."""
        self._thread.join(RESULT_TIMEOUT_S)


class Recovery:
    """Timings of one failure, in ms from the moment it was caused."""

    def __init__(self, charge_ms: float, old_exit_ms: float | None) -> None:
        self.charge_ms, self.old_exit_ms = charge_ms, old_exit_ms


def measure_recovery(progress: Progress, victims: set[str], break_it: Callable[[], None],
                     old_pid: int | None = None) -> Recovery:
    """Break something; time until a task the broken part was running applies a charge again
    (and until the old worker process `old_pid`, if given, has exited).

    The clock starts just before `break_it`. A charge the old worker applied in the instant
    before it stopped is not recovery, so every item already in the progress list once it can
    apply no more (it exited, or `break_it` froze it) is dropped before waiting for a victim.
    """
    t0 = time.monotonic()
    break_it()
    gone = None
    if old_pid is not None:
        if not wait_process_gone(old_pid, EVENT_TIMEOUT_S):
            raise TimeoutError(f"the old worker (pid {old_pid}) outlived the failure")
        gone = (time.monotonic() - t0) * 1000
    progress.drop_pending()
    back = progress.next_charge_of(victims)
    return Recovery((back - t0) * 1000, gone)


def wait_alive(handles: list[Any], timeout: float = EVENT_TIMEOUT_S) -> None:
    """Block until every actor answers a call (a restarting one refuses calls until then)."""
    import ray

    deadline = time.monotonic() + timeout
    for h in handles:
        while True:
            try:
                ray.get(h.stats.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the actor is restarting; ask again shortly


def report_recoveries(report: Report, recoveries: list[Recovery]) -> None:
    """Print the recovery figures: per failure, median and max."""
    charge = [r.charge_ms for r in recoveries]
    report.figure("recovery_ms_each", [round(x) for x in charge])
    report.figure("recovery_ms_median", round(statistics.median(charge)))
    report.figure("recovery_ms_max", round(max(charge)))
    exits = [r.old_exit_ms for r in recoveries if r.old_exit_ms is not None]
    if exits:
        report.figure("old_worker_exit_ms_max", round(max(exits)))


# ---- actor-kill ---------------------------------------------------------------------------------


def actor_kill(report: Report) -> None:
    """Kill agent replicas five times on a local Ray; tasks resume on the restarted replica."""
    import ray
    from ray import serve

    from swarm.client import SwarmClient
    from swarm.runtime.deploy import NAMESPACE, start_swarm
    from swarm.runtime.supervisor_actor import agent_actor_name

    with contextlib.ExitStack() as stack:
        url = private_redis(stack)
        temp_dir = short_tmp(stack, "rs-ak-")
        ctx = ray.init(address="local", num_cpus=2, namespace=NAMESPACE, _temp_dir=temp_dir,
                       _system_config=dict(RAY_SYSTEM_CONFIG),
                       include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), log_to_driver=False,
                       runtime_env={"env_vars": worker_env(url)})
        stack.callback(stop_and_wait, ray.shutdown)
        gcs = ctx.address_info["gcs_address"]
        port = free_port()
        os.environ["SWARM_SERVE_PORT"] = str(port)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name = "pay-kill"
        sup, _ = start_swarm(pay_config(), deployment=name)
        client = SwarmClient(name, sup)
        progress = Progress(url)
        jobs = submit_balanced(client)
        progress.take(10)
        recoveries: list[Recovery] = []
        extra = 0
        replicas = [ray.get_actor(agent_actor_name(name, "teller", i), namespace=NAMESPACE)
                    for i in range(REPLICAS)]
        for i in range(5):
            replica = i % REPLICAS
            # Failures are independent: the replica killed last has restarted (its call
            # answers) before the next kill, as it would have in the time between real crashes.
            wait_alive(replicas)
            # A killed worker can run on for a few hundred ms (old_worker_exit_ms): the tasks
            # timed must have more charges left than it could apply meanwhile.
            victims = unfinished(progress.r, [j for j in jobs if j.replica == replica], 8)
            if not victims:
                # The other replica's recovery outlasted this replica's tasks: give it new
                # work, and kill it once that work is under way.
                fresh = submit_pinned(client, [replica] * 3)
                jobs += fresh
                extra += len(fresh)
                progress.next_charge_of({j.handle.id for j in fresh})
                victims = unfinished(progress.r, fresh, 8)
            actor = agent_actor_name(name, "teller", replica)
            handle = ray.get_actor(actor, namespace=NAMESPACE)
            pid = actor_location(gcs, actor)["pid"]
            # Recovery is timed to the next charge of a task the killed replica was running
            # (its context id sticks it there), not to the next charge of any task: the other
            # replica keeps charging throughout and would make the figure meaningless.
            recoveries.append(measure_recovery(
                progress, victims, lambda h=handle: ray.kill(h, no_restart=False), pid))
        report.figure("tasks", len(jobs))
        # Submitted when a replica about to be killed had finished its tasks during the other
        # replica's recovery, so every kill interrupts work.
        report.figure("tasks_added_mid_run", extra)
        report_recoveries(report, recoveries)
        report.check("five_kills_landed", len(recoveries) == 5, f"{len(recoveries)} kills")
        check_outcome(report, url, jobs)
        wait_alive(replicas)
        restarts = [actor_location(gcs, agent_actor_name(name, "teller", i))["restarts"]
                    for i in range(REPLICAS)]
        report.figure("replica_restarts", restarts)


def node_workers(node: Any) -> list[psutil.Process]:
    """The processes a node's raylet started (workers and agents)."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return psutil.Process(raylet).children(recursive=True)


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL processes (stopped ones too) and wait, bounded, for them to exit."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    for p in procs:
        wait_process_gone(p.pid, 30)
    procs.clear()


# ---- node-loss ----------------------------------------------------------------------------------

# A lost node is declared dead after three missed 500 ms health checks instead of ~16 s.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                      "health_check_failure_threshold": 3, **RAY_SYSTEM_CONFIG}


def node_loss(report: Report) -> None:
    """Remove the worker node that hosts an agent replica; its tasks resume on the other one."""
    import ray
    from ray.cluster_utils import Cluster

    from swarm.client import SwarmClient
    from swarm.runtime.deploy import NAMESPACE, start_swarm
    from swarm.runtime.supervisor_actor import agent_actor_name, supervisor_actor_name

    with contextlib.ExitStack() as stack:
        url = private_redis(stack)
        temp_dir = short_tmp(stack, "rs-nl-")
        keep_ray_address_file(stack)
        t = time.monotonic()
        cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
            "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "_system_config": dict(FAST_HEALTH_CHECKS)})
        stack.callback(stop_and_wait, cluster.shutdown)
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False,
                 runtime_env={"env_vars": worker_env(url)})
        stack.callback(ray.shutdown)
        report.figure("cluster_start_s", round(time.monotonic() - t, 1))
        gcs = cluster.address

        # One CPU per replica puts the replicas on the workers (the head has none). The model
        # runs inside the agent actors, so this measures agent failover alone, not also the
        # failover of a Serve model replica that happened to sit on the lost node.
        cfg = pay_config()
        teller = cfg.agents["teller"].model_copy(update={"num_cpus": 1})
        model = cfg.models["scripted"].model_copy(update={"transport": "in_process"})
        cfg = cfg.model_copy(update={"agents": {**cfg.agents, "teller": teller},
                                     "models": {**cfg.models, "scripted": model}})
        report.note("agent failover only: the scripted model runs in process (no Serve)")
        name = "pay-node"
        sup, _ = start_swarm(cfg, deployment=name)
        client = SwarmClient(name, sup)

        where = {i: actor_location(gcs, agent_actor_name(name, "teller", i))
                 for i in range(REPLICAS)}
        sup_node = actor_location(gcs, supervisor_actor_name(name))["node_id"]
        hosting = {n.node_id: [i for i in range(REPLICAS) if where[i]["node_id"] == n.node_id]
                   for n in workers}
        # The node that hosts replica 0, unless the supervisor sits there too (Ray places the
        # zero-CPU supervisor where it likes) and another worker hosts a replica without it:
        # the scenario is about losing agents, not the supervisor.
        candidates = sorted((n for n in workers if hosting[n.node_id]),
                            key=lambda n: (n.node_id == sup_node, 0 not in hosting[n.node_id]))
        lost = candidates[0]
        survivor = next(n for n in workers if n is not lost)
        on_lost = hosting[lost.node_id]
        report.figure("replicas_on_lost_node", on_lost)
        report.figure("supervisor_on_lost_node", sup_node == lost.node_id)
        if sup_node == lost.node_id:
            report.note("the supervisor shared the lost node with every replica: the figure "
                        "includes its restart too")

        progress = Progress(url)
        jobs = submit_balanced(client)
        progress.take(12)
        victims = unfinished(progress.r, [j for j in jobs if j.replica in on_lost])
        if not victims:
            raise RuntimeError("the tasks on the doomed node finished before it was removed")
        waiting = WaitingClient(jobs)
        frozen: list[psutil.Process] = []
        stack.callback(kill_all, frozen)

        def lose_node() -> None:
            # remove_node kills the raylet and its daemons but not the workers, which run on
            # for up to a second (long enough, here, to finish every task they had) before
            # noticing. A crashed machine runs nothing more, so its workers are frozen first;
            # nothing tells the GCS, which learns of the loss from missed health checks.
            frozen.extend(node_workers(lost))
            for p in frozen:
                with contextlib.suppress(psutil.Error):
                    p.suspend()
            cluster.remove_node(lost, allow_graceful=False)

        rec = measure_recovery(progress, victims, lose_node)
        report.figure("recovery_ms", round(rec.charge_ms))
        report.figure("frozen_worker_processes", len(frozen))
        kill_all(frozen)
        waiting.join()
        report.figure("client_errors", waiting.errors)
        check_outcome(report, url, jobs)
        # The tasks moved to the surviving replica at once; Ray restarts the lost replica on
        # the other worker in the background (once the GCS declares the node dead).
        wait_alive([ray.get_actor(agent_actor_name(name, "teller", i), namespace=NAMESPACE)
                    for i in on_lost])
        now = {i: actor_location(gcs, agent_actor_name(name, "teller", i)) for i in on_lost}
        report.check("replicas_moved_to_other_worker",
                     all(a["node_id"] == survivor.node_id for a in now.values()),
                     f"restarts {[a['restarts'] for a in now.values()]}")


# ---- cluster-restart ----------------------------------------------------------------------------


class HeadProcess:
    """A Ray head started with `ray start` in a session of its own, and killed with it.

    `ray stop --force` would end every Ray process on the machine, including clusters that are
    not ours (a pytest session's, another run's). `ray start` runs here as the leader of a new
    session; its daemons and the workers they spawn stay in that session (workers take process
    groups of their own, so a process group is not enough), and are killed by it.
    """

    def __init__(self, temp_dir: str, env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.env = env
        self.ports = {"--port": free_port(), "--dashboard-port": free_port(),
                      "--ray-client-server-port": free_port(),
                      "--dashboard-agent-listen-port": free_port()}
        self.sid: int | None = None

    @property
    def address(self) -> str:
        """The GCS address to connect to."""
        return f"127.0.0.1:{self.ports['--port']}"

    def start(self) -> float:
        """Start the head (same ports every time); the seconds `ray start` took."""
        cmd = [RAY_BIN, "start", "--head", "--temp-dir", self.temp_dir, "--num-cpus", "2",
               "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
               "--system-config", json.dumps(RAY_SYSTEM_CONFIG)]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        log_path = Path(self.temp_dir) / "ray-start.log"
        t = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.sid = proc.pid
            rc = proc.wait(timeout=180)
        if rc != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`ray start` exited {rc}:\n{tail}")
        return time.monotonic() - t

    def processes(self) -> list[psutil.Process]:
        """The live processes of this cluster's session."""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.sid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    def kill(self) -> int:
        """SIGKILL every process of the cluster, as a crash would; how many there were."""
        if self.sid is None:
            return 0
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for p in procs:
            if not wait_process_gone(p.pid, 30):
                raise RuntimeError(f"Ray process {p.pid} survived SIGKILL")
        if self.processes():  # spawned while we were killing: a second round ends them
            return len(procs) + self.kill()
        self.sid = None
        return len(procs)


def stored_rows(url: str, swarm: str) -> list[Any]:
    """The task rows the store holds for `swarm` (what a restarted supervisor will load)."""
    from swarm.state.redis import RedisCheckpointer

    async def read() -> list[Any]:
        store = RedisCheckpointer(url)
        await store.start()
        try:
            return await store.list_tasks(swarm)
        finally:
            await store.close()

    return asyncio.run(read())


def cluster_restart(report: Report) -> None:
    """Kill the whole cluster mid-run, start it again, redeploy: the tasks finish."""
    import ray
    from ray import serve

    import swarm
    from swarm.client import SwarmClient
    from swarm.protocol.a2a import TERMINAL
    from swarm.runtime.deploy import NAMESPACE, start_swarm

    with contextlib.ExitStack() as stack:
        url = private_redis(stack)
        temp_dir = short_tmp(stack, "rs-cr-")
        env = {**os.environ, **worker_env(url)}
        head = HeadProcess(temp_dir, env)
        stack.callback(head.kill)
        serve_port = free_port()
        os.environ["SWARM_SERVE_PORT"] = str(serve_port)
        name = "pay-restart"

        def up(n: int) -> None:
            report.figure(f"ray_start_s_{n}", round(head.start(), 1))
            ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False,
                     runtime_env={"env_vars": worker_env(url)})
            serve.start(http_options={"host": "127.0.0.1", "port": serve_port})

        stack.callback(ray.shutdown)
        up(1)
        sup, _ = start_swarm(pay_config(), deployment=name, detached=True)
        client = SwarmClient(name, sup)
        progress = Progress(url)
        jobs = submit_balanced(client)
        progress.take(15)

        ray.shutdown()
        report.figure("ray_processes_killed", head.kill())
        r = progress.r
        report.figure("charges_before_crash",
                      sum(int(b or 0) for b in r.mget([f"balance:{j.account}" for j in jobs])))
        rows = stored_rows(url, name)
        pending = sorted(row.task_id for row in rows if row.state not in TERMINAL)
        report.figure("tasks_unfinished_in_store", len(pending))
        report.check("every_task_in_store", {row.task_id for row in rows}
                     == {j.handle.id for j in jobs}, f"{len(rows)} rows")

        up(2)
        t = time.monotonic()
        sup, _ = start_swarm(pay_config(), deployment=name, detached=True)
        started = time.monotonic()
        report.figure("second_start_swarm_s", round(started - t, 1))
        client = swarm.connect(name)
        # A lower bound on what was resumed: some tasks may finish while start_swarm waits
        # for the replicas, since the supervisor resumes them as soon as it has loaded.
        report.figure("task_states_when_start_swarm_returned", client.info()["tasks"])
        for job in jobs:
            job.handle = client.task(job.handle.id)
        for job in jobs:
            with contextlib.suppress(Exception):
                job.handle.wait(timeout=RESULT_TIMEOUT_S)
        done = time.monotonic()
        report.figure("start_swarm_return_to_all_done_ms", round((done - started) * 1000))
        report.figure("start_swarm_call_to_all_done_ms", round((done - t) * 1000))
        # A task unfinished in the store can only have completed by being resumed.
        resumed = [tid for tid in pending if client.task(tid).status().state == "completed"]
        report.figure("tasks_resumed", len(resumed))
        report.check("unfinished_tasks_resumed", len(resumed) == len(pending) > 0,
                     f"{len(resumed)} of {len(pending)} unfinished tasks completed after restart")
        check_outcome(report, url, jobs)


SCENARIOS: dict[str, Callable[[Report], None]] = {
    "actor-kill": actor_kill, "node-loss": node_loss, "cluster-restart": cluster_restart}


def main(argv: list[str] | None = None) -> int:
    """Run one scenario; exit status 0 only if it ran to the end and every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--json", action="store_true", help="print a JSON line at the end")
    args = parser.parse_args(argv)
    # Never join a cluster that happens to run on this machine: every address here is explicit.
    os.environ.pop("RAY_ADDRESS", None)
    # `ray start` turns token auth on, and a driver is let in only if it says it uses tokens
    # too (the error otherwise claims auth is 'disabled'). Ray reads this when first imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    report = Report(args.scenario)
    print(f"== {args.scenario}", flush=True)
    t = time.monotonic()
    try:
        SCENARIOS[args.scenario](report)
    except Exception as exc:
        traceback.print_exc()
        report.check("ran_to_end", False, f"{type(exc).__name__}: {exc}")
    else:
        report.check("ran_to_end", True)
    report.figure("wall_s", round(time.monotonic() - t, 1))
    print(f"== {args.scenario}: {'PASS' if report.ok else 'FAIL'}", flush=True)
    if args.json:
        print(report.as_json(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
