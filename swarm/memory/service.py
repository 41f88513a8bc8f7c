"""The memory service one process shares between its agents: session history, long-term
memories, the embedder, and their spans, metrics and usage rows.

`memory_service(cfg)` returns the process's service for a swarm config (made once; the tool
source and the middleware layer of every role find the same one). Stores and clients open on
first use, so a swarm that configures memory but never uses it opens nothing.

Observability: each long-term operation is a span named after its GenAI memory operation
(`search_memory`, `update_memory`, `delete_memory`) with `gen_ai.memory.*` attributes, under the
agent turn or tool call that caused it; counts and latencies go to the `swarm_memory_*` metrics;
embedding tokens go to `swarm_embedding_tokens` and, as `kind=embedding` rows, to the usage
ledger (their tokens count as input tokens, priced by `memory.embedder.price_per_mtok`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.errors import UserError
from swarm.memory.longterm import Hit, NewMemory, namespace_for
from swarm.observability.metrics import Meter, MetricSpec, active_recorder

if TYPE_CHECKING:
    from collections.abc import Iterator

    from swarm.config import SwarmConfig
    from swarm.memory.config import AgentMemoryConfig
    from swarm.memory.embed import Embedder
    from swarm.memory.longterm import LanceMemoryStore
    from swarm.memory.session import SessionStore

log = logging.getLogger(__name__)

_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0)
MEMORY_OPS = MetricSpec("swarm_memory_operations", "counter",
                        "memory operations (search_memory, update_memory, delete_memory, "
                        "session_read, session_write) by outcome (ok, error)",
                        ("swarm", "agent", "operation", "outcome"))
MEMORY_LATENCY = MetricSpec("swarm_memory_latency_ms", "histogram",
                            "latency of memory operations (ms), embedding included",
                            ("swarm", "agent", "operation"), _MS)
EMBED_TOKENS = MetricSpec("swarm_embedding_tokens", "counter", "tokens sent to the embedder",
                          ("swarm", "agent", "model"))
MEMORY_SPECS = (MEMORY_OPS, MEMORY_LATENCY, EMBED_TOKENS)


class MemoryUnavailable(Exception):
    """A memory backend (embedder, Redis, LanceDB) failed; the caller degrades."""


def pin_memory_location(cfg: SwarmConfig) -> SwarmConfig:
    """The config with a relative `memory.long_term.uri` made absolute against the working
    directory and `state.run_dir` (done where a swarm is deployed, so every actor agrees)."""
    uri = cfg.memory.long_term.uri
    if "://" in uri or Path(uri).is_absolute():
        return cfg
    absolute = str((Path(cfg.state.run_dir) / uri).resolve())
    lt = cfg.memory.long_term.model_copy(update={"uri": absolute})
    return cfg.model_copy(update={"memory": cfg.memory.model_copy(update={"long_term": lt})})


def uses_memory(cfg: SwarmConfig, role: str) -> bool:
    """Whether an agent role uses memory at all (config or tool grant)."""
    agent = cfg.agents[role]
    return agent.memory is not None or any(g.split(".", 1)[0] == "memory" for g in agent.tools)


def agent_memory(cfg: SwarmConfig, role: str) -> AgentMemoryConfig:
    """An agent's memory settings (defaults when it grants the tools but sets none)."""
    from swarm.memory.config import AgentMemoryConfig

    return cfg.agents[role].memory or AgentMemoryConfig()


class MemoryService:
    """Session and long-term memory for the agents of one swarm in this process."""

    def __init__(self, cfg: SwarmConfig) -> None:
        self.cfg = cfg
        self.swarm = cfg.name
        self.settings = cfg.memory
        self.store: Any = None  # the swarm's checkpointer (its Redis serves session memory)
        self.endpoints: dict[str, str] = {}
        self.ledger: Any = None  # a UsageLedger, when the metering layer has one
        self._sessions: SessionStore | None = None
        self._sessions_checked = False
        self._longterm: LanceMemoryStore | None = None
        self._embedder: Embedder | None = None
        recorder = active_recorder()
        self.meter = Meter(recorder, self.cfg.metrics.histogram_cap) \
            if recorder is not None else None
        self._periodic: Any = None
        self._background: set[asyncio.Task[Any]] = set()
        self.embedding_failures = 0

    def bind(self, *, store: Any = None, endpoints: dict[str, str] | None = None,
             ledger: Any = None) -> None:
        """Give the service what the agent host knows (called when a role starts)."""
        if store is not None and self.store is None:
            self.store = store
        if endpoints:
            self.endpoints.update(endpoints)
        if ledger is not None and self.ledger is None:
            self.ledger = ledger

    # ---- backends (opened on first use) ------------------------------------------------------

    def sessions(self) -> SessionStore | None:
        """The session store, or None when there is no Redis to keep sessions in."""
        if self._sessions is None and not self._sessions_checked:
            self._sessions_checked = True
            from swarm.memory.session import SessionStore
            from swarm.observability.usage import _redis_url

            url, prefix = self.settings.session.redis, "swarm"
            if url is None:
                found = _redis_url(self.store)
                if found is not None:
                    url, prefix = found
            if url is None:
                log.warning("swarm %s: session memory needs Redis (state.store embedded or a "
                            "redis:// URL, or memory.session.redis); sessions are not kept",
                            self.swarm)
                return None
            self._sessions = SessionStore(url, prefix=prefix, settings=self.settings.session)
        return self._sessions

    def longterm(self) -> LanceMemoryStore:
        """The long-term store (LanceDB; needs the memory extra)."""
        if self._longterm is None:
            from swarm.memory.longterm import LanceMemoryStore

            lt = self.settings.long_term
            uri = lt.uri
            if "://" not in uri and not Path(uri).is_absolute():
                uri = str(Path(self.cfg.state.run_dir) / uri)
            self._longterm = LanceMemoryStore(uri, lt.table, dedup_threshold=lt.dedup_threshold)
        return self._longterm

    def embedder(self) -> Embedder:
        """The configured embedder."""
        if self._embedder is None:
            from swarm.memory.embed import build_embedder

            self._embedder = build_embedder(self.settings.embedder, self.endpoints)
        return self._embedder

    # ---- telemetry ---------------------------------------------------------------------------

    @contextmanager
    def _op(self, operation: str, agent: str, attrs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One memory operation: its span, count and latency. Yields the span's attributes,
        which the body may add to."""
        from swarm.observability.tracing import active

        tracing = active()
        span = None
        if tracing is not None and self.cfg.tracing.enabled and operation.endswith("memory"):
            span = tracing.tracer.start_span(f"{operation} {self.settings.long_term.table}")
        t0 = time.perf_counter()
        outcome = "error"
        try:
            yield attrs
            outcome = "ok"
        except Exception as exc:
            if span is not None:
                from opentelemetry.trace import Status, StatusCode

                attrs["error.type"] = type(exc).__name__
                span.set_status(Status(StatusCode.ERROR, str(exc)[:300]))
            raise
        finally:
            ms = (time.perf_counter() - t0) * 1e3
            if span is not None:
                span.set_attributes({
                    "gen_ai.operation.name": operation, "gen_ai.provider.name": "lancedb",
                    "gen_ai.memory.store.name": self.settings.long_term.table,
                    "gen_ai.memory.type": "long_term", "gen_ai.agent.name": agent,
                    "swarm.name": self.swarm,
                    **{k: v for k, v in attrs.items() if v is not None}})
                span.end()
            if self.meter is not None:
                self.meter.add(MEMORY_OPS, self.swarm, agent, operation, outcome)
                self.meter.observe(MEMORY_LATENCY, self.swarm, agent, operation, value=ms)
                self._flush_soon()

    def _flush_soon(self) -> None:
        if self._periodic is None and self.meter is not None:
            from swarm.observability.metrics import Periodic

            self._periodic = Periodic(self.cfg.metrics.flush_interval_s, self.meter.flush)
        if self._periodic is not None:
            self._periodic.ensure()

    async def embed(self, texts: list[str], *, agent: str, task_id: str = "", user: str = ""
                    ) -> Any:
        """Vectors for `texts`; counts the tokens (metric and usage ledger)."""
        emb = self.embedder()
        t0 = time.perf_counter()
        try:
            out = await emb.embed(texts)
        except ImportError:
            raise
        except Exception as exc:
            self.embedding_failures += 1
            raise MemoryUnavailable(f"embedding failed: {exc}") from exc
        ms = (time.perf_counter() - t0) * 1e3
        if self.meter is not None:
            self.meter.add(EMBED_TOKENS, self.swarm, agent, emb.model, value=out.tokens)
        if self.ledger is not None:
            cost = out.tokens * self.settings.embedder.price_per_mtok / 1e6
            self.ledger.add((time.time(), task_id, user or None, self.swarm, agent, "embedding",
                             emb.model, None, 0, out.tokens, 0, 0, cost, ms, "ok", None))
        return out.vectors

    # ---- long-term memory --------------------------------------------------------------------

    def _check_text(self, text: Any, what: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{what} must be non-empty text")
        limit = self.settings.long_term.max_chars
        if len(text) > limit:
            raise UserError(f"{what} is {len(text)} characters; at most {limit} are accepted "
                            "(memory.long_term.max_chars)")
        return text.strip()

    def readable(self, role: str, user: str, scope: str | None = None) -> list[str]:
        """The namespaces `role` may search for `user` (one scope, if given)."""
        mem = agent_memory(self.cfg, role)
        if scope is not None:
            if scope not in mem.read:
                raise UserError(f"agent {role} may not read the {scope!r} memory namespace; it "
                                f"reads {mem.read} (agents.{role}.memory.read)")
            scopes = [scope]
        else:
            scopes = list(mem.read)
        if "user" in scopes and not user:
            scopes.remove("user")  # no submitter, no user namespace
        return [namespace_for(s, user=user, swarm=self.swarm) for s in scopes]

    async def remember(self, text: str, *, role: str, user: str, task_id: str = "",
                       metadata: dict[str, Any] | None = None) -> tuple[str, str]:
        """Store a memory in the agent's write namespace; returns (id, inserted|updated)."""
        text = self._check_text(text, "a memory's text")
        scope = agent_memory(self.cfg, role).write
        if scope == "user" and not user:
            raise UserError("this task has no user, so there is no user namespace to write to")
        ns = namespace_for(scope, user=user, swarm=self.swarm)
        with self._op("update_memory", role, {"gen_ai.memory.scope": scope,
                                              "gen_ai.memory.namespace": ns,
                                              "gen_ai.memory.update.strategy": "overwrite"}) as a:
            vec = await self.embed([text], agent=role, task_id=task_id, user=user)
            item = NewMemory(text, ns, user=user, swarm=self.swarm, agent=role,
                             source_task=task_id, metadata=dict(metadata or {}))
            [(mid, action)] = await self.longterm().add([item], vec)
            a["gen_ai.memory.id"] = mid
            a["swarm.memory.action"] = action
        return mid, action

    async def recall(self, query: str, *, role: str, user: str, k: int = 5,
                     scope: str | None = None, min_score: float | None = None,
                     task_id: str = "") -> list[Hit]:
        """The memories nearest `query` in the namespaces the agent may read."""
        query = self._check_text(query, "a recall query")
        if not 1 <= k <= self.settings.long_term.max_results:
            raise UserError(f"k must be between 1 and {self.settings.long_term.max_results} "
                            "(memory.long_term.max_results)")
        namespaces = self.readable(role, user, scope)
        with self._op("search_memory", role, {
                "gen_ai.memory.scope": scope or ",".join(agent_memory(self.cfg, role).read),
                "gen_ai.memory.namespace": ",".join(namespaces),
                "gen_ai.memory.search.similarity.threshold": min_score}) as a:
            vec = await self.embed([query], agent=role, task_id=task_id, user=user)
            hits = await self.longterm().search(vec[0], namespaces, k, min_score)
            a["gen_ai.memory.search.result.count"] = len(hits)
        return hits

    async def forget(self, memory_id: str, *, role: str, user: str) -> bool:
        """Delete one memory, if it is in a namespace the agent writes to."""
        ns = namespace_for(agent_memory(self.cfg, role).write, user=user, swarm=self.swarm)
        with self._op("delete_memory", role, {"gen_ai.memory.id": memory_id,
                                              "gen_ai.memory.namespace": ns}):
            found = await self.longterm().get(memory_id)
            if found is None or found.namespace != ns:
                raise UserError(f"no memory {memory_id!r} in namespace {ns!r} that agent "
                                f"{role} may delete")
            return await self.longterm().delete(ids=[memory_id]) > 0

    # ---- session memory ----------------------------------------------------------------------

    async def record_exchange(self, user: str, context: str, task: str, answer: str,
                              task_id: str) -> None:
        """Append a finished task to its session (never raises: a down Redis loses it)."""
        sessions = self.sessions()
        if sessions is None:
            return
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            await asyncio.wait_for(
                sessions.append(self.swarm, user, context, task, answer, task_id),
                self.settings.session.timeout_s * 2)
        except Exception as exc:
            outcome = "error"
            log.warning("swarm %s: session memory of task %s not stored: %s", self.swarm,
                        task_id, exc)
        if self.meter is not None:
            self.meter.add(MEMORY_OPS, self.swarm, "supervisor", "session_write", outcome)
            self.meter.observe(MEMORY_LATENCY, self.swarm, "supervisor", "session_write",
                               value=(time.perf_counter() - t0) * 1e3)
            self._flush_soon()

    async def forget_user(self, user: str) -> dict[str, int]:
        """Delete everything kept about a user: sessions and long-term memories."""
        out = {"sessions": 0, "memories": 0}
        sessions = self.sessions()
        if sessions is not None:
            out["sessions"] = await sessions.forget(user)
        try:
            out["memories"] = await self.longterm().delete(user=user)
        except ImportError:
            pass  # no lancedb installed: there can be no long-term memories either
        return out

    def background(self, coro: Any) -> None:
        """Run a coroutine off the turn (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Finish background work; close clients."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._periodic is not None:
            await self._periodic.aclose()
        if self.meter is not None:
            self.meter.flush()
        for closer in (self._sessions, self._embedder, self._longterm):
            if closer is not None:
                try:
                    await closer.aclose()
                except Exception:
                    log.debug("closing %s failed", type(closer).__name__, exc_info=True)


_SERVICES: dict[int, MemoryService] = {}


def memory_service(cfg: SwarmConfig) -> MemoryService:
    """This process's memory service for a swarm config (one per config object)."""
    svc = _SERVICES.get(id(cfg))
    if svc is None or svc.cfg is not cfg:
        svc = _SERVICES[id(cfg)] = MemoryService(cfg)
    return svc


def session_recorder(cfg: SwarmConfig, store: Any) -> MemoryService | None:
    """The service the supervisor records finished tasks with, or None when no agent keeps
    session history."""
    if not any(a.memory is not None and a.memory.session is not None
               for a in cfg.agents.values()):
        return None
    svc = memory_service(cfg)
    svc.bind(store=store)
    return svc
