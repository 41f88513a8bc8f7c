"""Test helpers shipped with swarm: run a swarm config in one process, with no Ray.

`LocalSwarm` builds an `AgentHost` per role (scripted models in-process) and a `Supervisor` over
them, so a config's behaviour can be checked in unit tests or debugged in a plain interpreter.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from swarm.config import ScriptedModelConfig, SwarmConfig
from swarm.errors import TaskFailed
from swarm.events import Event
from swarm.models import build_model
from swarm.models.agent import build_agent_model
from swarm.protocol.a2a_member import RemoteMemberPool
from swarm.runtime.agent import AgentHost, EventBuffer, build_sources
from swarm.runtime.supervisor import LocalAgentPool, Supervisor
from swarm.state.interface import Checkpointer
from swarm.tools.access import granted_servers


def in_process(cfg: SwarmConfig) -> SwarmConfig:
    """The same config with every scripted model switched to the in-process transport."""
    models = {
        name: m.model_copy(update={"transport": "in_process"})
        if isinstance(m, ScriptedModelConfig)
        else m
        for name, m in cfg.models.items()
    }
    return cfg.model_copy(update={"models": models})


log = logging.getLogger(__name__)


class LocalSwarm:
    """A whole swarm in this process: agent hosts plus a supervisor, no Ray.

    `store` is the caller's, opened as it likes: `swarm.state.open_checkpointer(spec, ...,
    outage_timeout_s=cfg.state.outage_timeout_s)` opens it as a deployed swarm does."""

    def __init__(self, cfg: SwarmConfig, store: Checkpointer | None = None) -> None:
        self.cfg = in_process(cfg)
        self.store = store
        self.hosts: dict[str, AgentHost] = {}
        for role, acfg in self.cfg.agents.items():
            if acfg.a2a is not None:
                continue  # a remote A2A member: the pool below reaches it
            model = build_agent_model(self.cfg, role)
            sources = build_sources(self.cfg, granted_servers(acfg.tools, self.cfg.tools))
            self.hosts[role] = AgentHost(self.cfg, role, model, sources, store=store)
        router = None
        if self.cfg.supervisor.router_model is not None:
            name = self.cfg.supervisor.router_model
            router = build_model(name, self.cfg.models[name])
        self.pool = RemoteMemberPool.around(self.cfg, LocalAgentPool(self.hosts), store=store)
        self.supervisor = Supervisor(self.cfg, self.pool, router, store=store)
        for host in self.hosts.values():
            # In one process, events reach the supervisor as they happen.
            host.buffer = EventBuffer(forward=self.supervisor.push_events)

    async def __aenter__(self) -> LocalSwarm:
        if isinstance(self.pool, RemoteMemberPool):
            try:
                await self.pool.start()  # a remote member's bad card is a ConfigError here
            except BaseException:
                await self.pool.aclose()
                raise
        await asyncio.gather(*(h.start() for h in self.hosts.values()))
        await self.supervisor.mark_store()
        from swarm.runtime.toolbox import check_agents_gates

        for problem in check_agents_gates(
                self.cfg.approvals,
                [(h.toolbox.qualified, h.toolbox.unlisted) for h in self.hosts.values()]):
            log.warning("%s", problem)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for rec in self.supervisor.tasks.values():
            if rec.driver is not None and not rec.driver.done():
                rec.driver.cancel()
        await self.supervisor.close()
        await asyncio.gather(*(h.aclose() for h in self.hosts.values()))
        if isinstance(self.pool, RemoteMemberPool):
            await self.pool.aclose()
        from swarm.observability.tracing import active

        tracing = active()
        if tracing is not None and self.cfg.tracing.enabled:
            # Spans still queued would go with the process (a script's last tasks); a
            # collector that doesn't answer holds this up 2 s at most.
            await asyncio.to_thread(tracing.flush, 2.0)

    async def run(self, text: str, *, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        """Submit a task, wait for it to end, and return its summary."""
        task_id = await self.supervisor.submit(text, **kw)
        return await self.supervisor.wait(task_id, timeout)

    async def answer(self, text: str, *, timeout: float = 30.0, **kw: Any) -> str:
        """Run a task and return its answer; raise `TaskFailed` if it didn't complete."""
        row = await self.run(text, timeout=timeout, **kw)
        if row["state"] != "completed":
            raise TaskFailed(row["task_id"], row["state"], row["error_class"], row["error"] or "")
        return str(row["answer"])

    def events(self, task_id: str) -> list[Event]:
        """Every event the task has produced so far."""
        return list(self.supervisor.get(task_id).events)

    async def crash(self) -> None:
        """Simulate the process dying: stop every task and turn, writing nothing more.

        A new `LocalSwarm` on the same store then stands for the restarted process.
        """
        self.supervisor.store = None
        for host in self.hosts.values():
            host.store = None
        drivers = [r.driver for r in self.supervisor.tasks.values()
                   if r.driver is not None and not r.driver.done()]
        for host in self.hosts.values():
            for task in list(host._running.values()):
                task.cancel()
        for d in drivers:
            d.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
