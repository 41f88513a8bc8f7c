"""The supervisor as a Ray actor: creates the agent replicas and serves the client API.

The actor restarts after a crash (`max_restarts=-1`); its constructor runs again with nothing
in memory, so it starts at once to rebuild the task table from the durable store and resume
every unfinished task (`Supervisor.load`); every client call waits for that. Clients
keep their handles: a named actor's handle stays valid across restarts.

The agent replicas are created by whoever deploys the swarm (`create_agents`, called by
`start_swarm` before it creates the supervisor), not by the supervisor: an actor that isn't
detached dies with the process that created it, and replicas created in the supervisor's
process died with it, turns and all. The supervisor finds them by name, when it starts and
when it restarts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from swarm.config import SwarmConfig
from swarm.events import Event
from swarm.governance._redis import RedisDown
from swarm.protocol import a2a
from swarm.runtime.supervisor import RayAgentPool, Supervisor
from swarm.state.interface import StoreUnavailable, TableNotLoaded

log = logging.getLogger(__name__)

_WARM_MAX_DELAY_S = 10.0


def supervisor_actor_name(deployment: str) -> str:
    """The Ray actor name of a deployed swarm's supervisor."""
    return f"{deployment}.supervisor"


def agent_actor_name(deployment: str, role: str, replica: int) -> str:
    """The Ray actor name of one agent replica."""
    return f"{deployment}.{role}.{replica}"


@dataclass(frozen=True, slots=True)
class ActorName:
    """A named actor an agent replica looks up when it starts (the supervisor, which may not
    exist yet when the replica is created)."""

    name: str
    namespace: str

    def resolve(self) -> Any:
        """The actor's handle (a blocking call to Ray's GCS)."""
        import ray

        return ray.get_actor(self.name, namespace=self.namespace)


def create_agents(cfg: SwarmConfig, deployment: str, namespace: str, detached: bool,
                  endpoints: dict[str, str], supervisor: Any, store_spec: str | None
                  ) -> dict[str, list[Any]]:
    """The handles of the swarm's agent replicas by role, each created unless one of its
    name is running already (then that one's handle). `supervisor` is its handle or
    `ActorName`. A remote A2A member has none (it runs in the supervisor's pool).

    Not detached, a replica lives as long as the process that created it (its owner) and
    while a handle to it exists: the deploying process keeps the handles."""
    import ray

    from swarm.runtime.agent import AgentActor

    remote_cls = ray.remote(AgentActor)
    return {
        role: [
            remote_cls.options(
                name=agent_actor_name(deployment, role, i), namespace=namespace,
                lifetime="detached" if detached else None, get_if_exists=True,
                max_restarts=-1, max_concurrency=acfg.max_sessions + 64,
                num_cpus=acfg.num_cpus, enable_task_events=cfg.process.ray_task_events,
            ).remote(cfg, role, endpoints, supervisor, i, store_spec)
            for i in range(acfg.replicas)
        ]
        for role, acfg in cfg.agents.items()
        if acfg.a2a is None
    }


def open_store(spec: str | None, cfg: SwarmConfig | None = None) -> Any:
    """The checkpointer for a resolved store spec (a URL), or None for no durability; with
    `cfg`, it waits out an unreachable store for `state.outage_timeout_s`."""
    if spec is None:
        return None
    from pathlib import Path

    from swarm.state import open_checkpointer

    return open_checkpointer(spec, run_dir=Path("."), outage_timeout_s=None if cfg is None
                             else cfg.state.outage_timeout_s)


class SupervisorActor:
    """Ray actor wrapper of `Supervisor`."""

    def __init__(self, cfg: SwarmConfig, endpoints: dict[str, str], deployment: str,
                 namespace: str, detached: bool, store_spec: str | None = None) -> None:
        import ray

        from swarm.models import build_model
        from swarm.observability.tracing import configure
        from swarm.runtime.tuning import tune_process

        configure(cfg, store_spec, {"swarm.process": "supervisor"})
        self.deployment = deployment
        self.endpoints = endpoints
        me = ray.get_runtime_context().current_actor
        # The replicas `start_swarm` created, found by name, after a restart too. One that is
        # gone (taken down by hand) is created again, here: owned by this process, it dies
        # with it. A remote A2A member runs in this actor's pool, below.
        self.handles: dict[str, list[Any]] = create_agents(
            cfg, deployment, namespace, detached, endpoints, me, store_spec)
        router = None
        if cfg.supervisor.router_model is not None:
            name = cfg.supervisor.router_model
            router = build_model(name, cfg.models[name], endpoints)
        from swarm.protocol.a2a_member import RemoteMemberPool

        store = open_store(store_spec, cfg)
        self.agents = RayAgentPool(self.handles)
        self.pool = RemoteMemberPool.around(cfg, self.agents, store=store, swarm_id=deployment)
        self.sup = Supervisor(cfg, self.pool, router, store=store, swarm_id=deployment)
        self._loaded: asyncio.Task[int] | None = None
        # Rebuild the table and resume unfinished tasks now, not at the first client call: after
        # a crash, nobody may call for a long time. Ray runs an async actor's constructor on
        # its event loop, so the load is a task there that runs once the constructor returns.
        # (Not a call to itself: after a restart such a call can fail at once, "the actor is
        # restarting", and the tasks would wait for a client.)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a Ray that runs constructors off the loop: call, with retries
            self._warming = None
            me.warm.options(max_task_retries=-1).remote()
        else:
            self._warming = loop.create_task(self.warm())
        tune_process(cfg.process)

    async def warm(self) -> int:
        """Load the task table (once); returns how many tasks are in it.

        Called by the actor itself when it starts: a load that fails (the store unreachable
        for a while) is tried again, backing off up to `_WARM_MAX_DELAY_S`, until it works,
        so unfinished tasks resume without anyone calling."""
        delay = 0.5
        while True:
            try:
                await self._ensure()
                return len(self.sup.tasks)
            except Exception as exc:
                log.warning("swarm %s: loading the task table failed (%s); trying again in "
                            "%g s", self.deployment, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WARM_MAX_DELAY_S)

    async def _ensure(self) -> None:
        # Every call waits for the table to be rebuilt, so nothing sees a half-loaded table.
        # A load that failed is started again by the next call, not kept as the answer.
        done = self._loaded
        if done is None or (done.done() and (done.cancelled() or done.exception() is not None)):
            self._loaded = asyncio.create_task(self._load())
        try:
            await asyncio.shield(self._loaded)
        except StoreUnavailable as exc:
            # The client may call again (`swarm.client`): the load is tried again until the
            # store answers.
            raise TableNotLoaded(f"the swarm's supervisor (re)started and can't load its task "
                                 f"table yet: {exc}") from None

    async def _load(self) -> int:
        if self.sup.store is not None:
            await self.sup.store.start()
        return await self.sup.load()

    async def ready(self) -> list[dict[str, Any]]:
        """Wait for every agent replica to start; report their tools and start-up problems."""
        await self._ensure()
        reports = list(await asyncio.gather(
            *(h.ready.remote() for hs in self.handles.values() for h in hs)))
        from swarm.protocol.a2a_member import RemoteMemberPool

        if isinstance(self.pool, RemoteMemberPool):  # remote A2A members, and their cards
            reports += await self.pool.start(strict=False)
        from swarm.runtime.toolbox import check_agents_gates

        problems = check_agents_gates(  # a ConfigError for a mistyped approvals.tools entry
            self.sup.cfg.approvals,
            [(r.get("granted", ()), r.get("unlisted", ())) for r in reports])
        if problems:
            reports.append({"role": "swarm", "replica": None, "tools": [],
                            "problems": problems})
        return reports

    async def info(self) -> dict[str, Any]:
        """Name, agents and replicas, models and their endpoints, and task counts."""
        await self._ensure()
        counts: dict[str, int] = {}
        for rec in self.sup.tasks.values():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        cfg = self.sup.cfg
        return {"name": cfg.name, "deployment": self.deployment,
                "agents": {r: len(h) for r, h in self.handles.items()},
                "entry": cfg.supervisor.entry, "strategy": cfg.supervisor.strategy,
                "endpoints": self.endpoints, "tasks": counts,
                "max_task_chars": cfg.limits.max_task_chars,
                "durable": self.sup.store is not None,
                "restore_problems": self.sup.restore_problems,
                "usage_dir": cfg.usage.dir if cfg.usage.enabled else None}

    async def submit(self, text: str, user: str = "anonymous",
                     metadata: dict[str, Any] | None = None, context_id: str | None = None,
                     task_id: str | None = None, message_id: str | None = None) -> str:
        """Create a task (or return it, if this id was submitted already); see `Supervisor`."""
        await self._ensure()
        return await self.sup.submit(text, user=user, metadata=metadata, context_id=context_id,
                                     task_id=task_id, message_id=message_id)

    async def submit_many(self, texts: list[str], user: str = "anonymous",
                          task_ids: list[str] | None = None) -> list[str]:
        """Create several tasks in one call (one Ray call instead of one per task)."""
        await self._ensure()
        return await self.sup.submit_many(texts, user=user, task_ids=task_ids)

    async def respond(self, task_id: str, text: str) -> dict[str, Any]:
        """Answer a task waiting for input."""
        await self._ensure()
        return await self.sup.respond(task_id, text)

    async def approve(self, task_id: str, gate: str, approver: str,
                      args: dict[str, Any] | str | None = None) -> dict[str, Any]:
        """Approve an open approval gate (optionally with edited arguments)."""
        await self._ensure()
        return await self.sup.approve(task_id, gate, approver=approver, args=args)

    async def deny(self, task_id: str, gate: str, approver: str,
                   reason: str | None = None) -> dict[str, Any]:
        """Deny an open approval gate."""
        await self._ensure()
        return await self.sup.deny(task_id, gate, approver=approver, reason=reason)

    async def audit(self, task_id: str | None = None, since: float | None = None,
                    kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Audit entries (stream plus Parquet archive), oldest first."""
        from swarm.errors import UserError
        from swarm.governance.audit import kind_problem

        if (problem := kind_problem(kind)) is not None:
            raise UserError(problem)
        await self._ensure()
        if self.sup.audit is None:
            return []
        try:
            return await self.sup.audit.read(task_id=task_id, since=since, kind=kind,
                                             limit=limit)
        except RedisDown as exc:
            raise StoreUnavailable(f"can't read the audit log: {exc}") from None

    async def audit_archive(self) -> str | None:
        """Move the audit stream to a Parquet file; its path."""
        await self._ensure()
        try:
            path = None if self.sup.audit is None else await self.sup.audit.archive()
        except RedisDown as exc:
            raise StoreUnavailable(f"can't archive the audit log: {exc}") from None
        return None if path is None else str(path)

    async def trace(self, task_id: str) -> list[dict[str, Any]]:
        """A task's stored spans (see `Supervisor.trace`)."""
        await self._ensure()
        return await self.sup.trace(task_id)

    async def trace_stats(self) -> dict[str, dict[str, int]]:
        """Span counts of the supervisor process's exporters (ended, exported, failed,
        dropped, queued)."""
        from swarm.observability.tracing import stats

        return stats()

    async def history(self, task_id: str, full: bool = False) -> list[dict[str, Any]]:
        """A task's checkpoints (log entries) in order."""
        await self._ensure()
        return await self.sup.history(task_id, full=full)

    async def fork(self, task_id: str, step: int, user: str | None = None) -> str:
        """Start a new task from step `step` of an old one; returns the new task's id."""
        await self._ensure()
        return await self.sup.fork(task_id, step, user=user)

    async def forget(self, task_id: str) -> None:
        """Delete a finished task's durable state."""
        await self._ensure()
        await self.sup.forget(task_id)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """A task's summary plus its A2A `Task` as wire bytes under `a2a`, and under `events`
        how many events it has so far (where to start following them)."""
        await self._ensure()
        rec = await self.sup.find(task_id)
        return {**rec.summary(), "a2a": rec.wire(), "events": rec.event_count}

    async def list_a2a(self, query: Any) -> tuple[list[bytes], int, bool]:
        """One page of A2A ListTasks (a `swarm.protocol.a2a_server.listing.TaskQuery`): the
        tasks as wire bytes, how many match, and whether more follow."""
        from swarm.protocol.a2a_server.listing import page

        await self._ensure()
        tasks, total, more = page((r.task for r in self.sup.tasks.values()), query)
        return [a2a.dumps(t) for t in tasks], total, more

    async def list_tasks(self, state: str | None = None, user: str | None = None
                         ) -> list[dict[str, Any]]:
        """Task summaries, newest first."""
        await self._ensure()
        return self.sup.list(state, user)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task."""
        await self._ensure()
        return await self.sup.cancel(task_id)

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a task to end (bounded by `timeout`)."""
        await self._ensure()
        return await self.sup.wait(task_id, timeout)

    async def wait_many(self, task_ids: list[str], timeout: float | None = None
                        ) -> list[dict[str, Any]]:
        """Wait for several tasks to end, in one call; their rows in the order given. A
        caller waiting on thousands of tasks holds one pending call here instead of one each
        (Ray keeps state per pending call on both sides)."""
        await self._ensure()
        return await self.sup.wait_many(task_ids, timeout)

    async def events(self, task_id: str, cursor: int = 0, timeout: float = 10.0
                     ) -> tuple[list[Event], bool]:
        """Long-poll a task's events from `cursor`."""
        await self._ensure()
        return await self.sup.events(task_id, cursor, min(max(timeout, 0.0), 60.0))

    async def put_hot(self, log_id: str, seq: int, data: bytes) -> None:
        """Hold an agent's latest snapshot of a log (encoded) in the object store, owned by
        this actor so that it outlives the agent replicas."""
        import ray

        # Put in the object store only if held: one that arrives after its task ended, or
        # after a newer one, is dropped.
        self.sup.hold_hot(log_id, seq, lambda: ray.put(data))

    async def hot_snapshots(self) -> dict[str, int]:
        """The seq of the snapshot held for each log id."""
        return {log_id: seq for log_id, (seq, _) in self.sup.hot.items()}

    async def turns_done(self, batch: list[tuple[str, Any]]) -> None:
        """Results of turns an agent replica was posted (see `RayAgentPool`)."""
        self.agents.deliver(batch)

    async def push_events(self, batch: bytes) -> None:
        """Receive a batch of live events from an agent replica (`swarm.events.pack_runs`)."""
        self.sup.push_packed(batch)

    async def shutdown(self) -> dict[str, Any]:
        """Stop driving tasks (`Supervisor.stop`: with a durable store, unfinished tasks are
        left for the next deployment of this swarm to resume) and close the agents'
        connections. Returns {"unfinished": tasks left unfinished, "resumable": whether the
        store keeps them}."""
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()  # a load still being retried must not reopen the store
        resumable = self.sup.store is not None
        unfinished = await self.sup.stop()
        await asyncio.gather(*(h.shutdown.remote() for hs in self.handles.values() for h in hs),
                             return_exceptions=True)
        from swarm.protocol.a2a_member import RemoteMemberPool

        if isinstance(self.pool, RemoteMemberPool):
            await self.pool.aclose()
        if self.sup.store is not None:
            await self.sup.store.close()
        return {"unfinished": unfinished, "resumable": resumable}
