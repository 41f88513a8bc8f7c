"""The metering layer: per-call metrics and usage-ledger rows for one agent role, in one
middleware layer (one await per call for both).

Per model call it counts the step, the call, tokens and cost, and keeps the latency; per tool
call it counts the call and its outcome; a failed call also counts under `swarm_errors` with its
error class, decided exactly as the step loop decides the class it reports (see
swarm.runtime.step): a model call's exception is its `RunError` class or `model`, a tool call's is
its `RunError` class or `tool`, a tool's own error result is `tool`. A call a later layer stopped
(`StopTurn`: a budget, an approval, a rate limit) didn't run, so it is neither counted nor billed.

Everything here is in-memory bookkeeping: the metric sums go to Ray, and the rows to Parquet, from
background tasks (swarm.observability.metrics, swarm.observability.usage).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from swarm.errors import RunError, classify
from swarm.observability.metrics import (
    CHECKPOINT_LATENCY,
    COST,
    ERRORS,
    MODEL_CALLS,
    MODEL_LATENCY,
    QUEUE_DEPTH,
    SESSIONS,
    STEPS,
    TOKENS,
    TOOL_CALLS,
    Meter,
    Periodic,
    Recorder,
    Series,
    active_recorder,
    actor_identity,
)
from swarm.observability.usage import UsageLedger, _redis_url
from swarm.runtime.middleware import Middleware, ModelCall, NextModel, NextTool, StopTurn

if TYPE_CHECKING:
    from swarm.models.interface import ModelResponse
    from swarm.runtime.middleware import ToolInvocation
    from swarm.runtime.step import Session
    from swarm.tools.interface import ToolResult


class MeteringLayer(Middleware):
    """Records metrics (into a `Meter`) and ledger rows (into a `UsageLedger`) per call."""

    def __init__(self, cfg: Any, role: str, *, swarm: str, meter: Meter | None = None,
                 ledger: UsageLedger | None = None, host: Any = None, replica: str = "0",
                 flush_interval_s: float = 5.0) -> None:
        self.swarm = swarm
        self.role = role
        self.meter = meter
        self.ledger = ledger
        model = cfg.agents[role].model
        self.model = model
        self.price = cfg.models[model].price
        self.periodic = Periodic(flush_interval_s, meter.flush) if meter is not None else None
        if meter is not None:
            # Series bound once: a call only adds to attributes.
            tags = (swarm, role, model)
            self._steps = meter.series(STEPS, swarm, role)
            self._ok = meter.series(MODEL_CALLS, *tags, "ok")
            self._failed = meter.series(MODEL_CALLS, *tags, "error")
            self._in = meter.series(TOKENS, *tags, "input")
            self._out = meter.series(TOKENS, *tags, "output")
            self._cached = meter.series(TOKENS, *tags, "cached")
            self._cost = meter.series(COST, *tags)
            self._latency = meter.series(MODEL_LATENCY, *tags)
            self._checkpoint = meter.series(CHECKPOINT_LATENCY, swarm, role)
        self._tools: dict[tuple[str, str], Series] = {}
        if host is not None and meter is not None:
            host.on_checkpoint = self.checkpointed
            queue = meter.series(QUEUE_DEPTH, swarm, role, replica)
            sessions = meter.series(SESSIONS, swarm, role, replica)
            meter.samplers.append(lambda _: _sample_host(host, queue, sessions))

    # -- the layer -------------------------------------------------------------------------

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Time the call; count it, its tokens and cost; write its ledger row."""
        t0 = time.perf_counter()
        try:
            resp = await nxt(call)
        except StopTurn:
            raise
        except asyncio.CancelledError:
            self._model_failed(call, t0, "canceled", None)
            raise
        except Exception as exc:
            self._model_failed(call, t0, "error",
                               classify(exc) if isinstance(exc, RunError) else "model")
            raise
        ms = (time.perf_counter() - t0) * 1e3
        usage = resp.usage
        tin, tout, tcached = usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
        cost = self.price.cost(tin, tout, tcached) if tin or tout else 0.0
        if self.meter is not None:
            self._steps.value += 1
            self._ok.value += 1
            self._in.value += tin
            self._out.value += tout
            self._cached.value += tcached
            self._cost.value += cost
            self._latency.samples.append(ms)
            self.periodic.ensure()  # type: ignore[union-attr]
        ledger = self.ledger
        if ledger is not None:
            s = call.session
            ledger.add((time.time(), s.task_id, s.user or None, self.swarm, self.role,
                        "model", self.model, None, call.step, tin, tout, tcached, cost, ms,
                        "ok", None))
        return resp

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Time the call; count it by outcome; write its ledger row."""
        t0 = time.perf_counter()
        try:
            result = await nxt(inv)
        except StopTurn:
            raise
        except asyncio.CancelledError:
            self._tool_done(inv, t0, "canceled", None)
            raise
        except Exception as exc:
            self._tool_done(inv, t0, "error",
                            classify(exc) if isinstance(exc, RunError) else "tool")
            raise
        if result.is_error:
            self._tool_done(inv, t0, "error", "tool")
        else:
            self._tool_done(inv, t0, "ok", None)
        return result

    def on_turn_end(self, session: Session) -> None:
        """Ask the ledger to write this turn's rows soon (coalesced, in the background)."""
        if self.ledger is not None:
            self.ledger.kick()

    async def aclose(self) -> None:
        """Flush the metrics and the ledger."""
        if self.periodic is not None:
            await self.periodic.aclose()
        if self.meter is not None:
            self.meter.flush()
        if self.ledger is not None:
            await self.ledger.aclose()

    # -- bookkeeping -----------------------------------------------------------------------

    def checkpointed(self, seconds: float) -> None:
        """A journal append took `seconds` (the agent host's hook on every checkpoint)."""
        self._checkpoint.samples.append(seconds * 1e3)

    def _model_failed(self, call: ModelCall, t0: float, outcome: str,
                      error_class: str | None) -> None:
        ms = (time.perf_counter() - t0) * 1e3
        meter = self.meter
        if meter is not None:
            self._steps.value += 1
            self._failed.value += 1
            self._latency.samples.append(ms)
            if error_class is not None:
                meter.add(ERRORS, self.swarm, self.role, "model", error_class)
            self.periodic.ensure()  # type: ignore[union-attr]
        if self.ledger is not None:
            s = call.session
            self.ledger.add((time.time(), s.task_id, s.user or None, self.swarm, self.role,
                             "model", self.model, None, call.step, 0, 0, 0, 0.0, ms, outcome,
                             error_class))

    def _tool_done(self, inv: ToolInvocation, t0: float, outcome: str,
                   error_class: str | None) -> None:
        ms = (time.perf_counter() - t0) * 1e3
        tool = inv.call.name
        meter = self.meter
        if meter is not None:
            series = self._tools.get((tool, outcome))
            if series is None:
                series = self._tools[(tool, outcome)] = meter.series(
                    TOOL_CALLS, self.swarm, self.role, tool, outcome)
            series.value += 1
            if error_class is not None:
                meter.add(ERRORS, self.swarm, self.role, "tool", error_class)
        if self.ledger is not None:
            s = inv.session
            self.ledger.add((time.time(), s.task_id, s.user or None, self.swarm, self.role,
                             "tool", None, tool, inv.step, 0, 0, 0, 0.0, ms, outcome,
                             error_class))


def _sample_host(host: Any, queue: Series, sessions: Series) -> None:
    # Read at flush time, off the step path: sessions waiting on the host's slot semaphore
    # (asyncio keeps them in `_waiters`) and sessions running.
    waiters = getattr(host._slots, "_waiters", None)
    queue.value = float(sum(1 for w in waiters if not w.done())) if waiters else 0.0
    sessions.value = float(host.sessions())


def metering_layer(cfg: Any, role: str, *, store: Any = None, host: Any = None,
                   recorder: Recorder | None = None) -> MeteringLayer | None:
    """The role's metering layer, or None when neither metrics nor the ledger would record
    anything (metrics off or no recorder in this process; ledger off or no `usage.dir`)."""
    mcfg, ucfg = cfg.metrics, cfg.usage
    recorder = recorder or (active_recorder() if mcfg.enabled else None)
    ledger = None
    if ucfg.enabled and ucfg.dir:
        # A deployed swarm always has usage.dir (swarm.observability.usage.pin_location); a
        # LocalSwarm writes a ledger only when its config names one.
        ledger = UsageLedger(ucfg.dir, flush_interval_s=ucfg.flush_interval_s,
                             max_buffered_rows=ucfg.max_buffered_rows,
                             redis=_redis_url(store) if ucfg.redis_totals else None)
    if recorder is None and ledger is None:
        return None
    deployment, replica = actor_identity()
    return MeteringLayer(cfg, role, swarm=deployment or cfg.name,
                         meter=Meter(recorder) if recorder is not None else None,
                         ledger=ledger, host=host, replica=replica,
                         flush_interval_s=mcfg.flush_interval_s)
