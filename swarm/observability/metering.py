"""The metering layer: tracing, metrics and usage-ledger rows of one agent role's model and tool
calls, in one middleware layer.

On the step path a call is timed and leaves one flat tuple of plain values (ids, times, token
counts, outcome): no span object, no attribute dict, no ledger row, no metric update. `drain`
turns the tuples into the three outputs, off the step path: whichever needs them first pulls
them (the trace store's writer thread, the ledger's writer task, the metrics push), and each
tuple feeds all three at once:

- a `chat {model}` or `execute_tool {tool}` span row for the trace store (and SDK spans for a
  configured exporter), under the turn's `invoke_agent` span (swarm.observability.tracing);
- a ledger row (swarm.observability.usage);
- the metric sums: steps, model calls, tokens, cost, latency, tool calls, errors by class
  (swarm.observability.metrics).

Error classes are decided exactly as the step loop decides the class it reports (see
swarm.runtime.step): a model call's exception is its `RunError` class or `model`, a tool call's is
its `RunError` class or `tool`, a tool's own error result is `tool`. A call a later layer stopped
(`StopTurn`: a budget, an approval, a rate limit) didn't run: it has a span (marked
`swarm.stopped`) but is neither counted nor billed.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import deque
from time import time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry.context import attach, detach
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    get_current_span,
    set_span_in_context,
)

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
    from swarm.observability.tracing import SwarmTracer
    from swarm.runtime.middleware import ToolInvocation
    from swarm.runtime.step import Session
    from swarm.tools.interface import ToolResult

_random_bits = random.getrandbits
_SAMPLED = 1
_MODEL, _TOOL = 0, 1

# A call's record, one flat tuple (fields by index):
#  0 kind (_MODEL | _TOOL)   1 task id      2 conversation id   3 user     4 step
#  5 trace id               6 parent span  7 span id           8 start ns 9 end ns
# 10 outcome: ok | error | canceled | stopped   11 error class   12 span error text
# 13 stopped: the StopTurn outcome's kind       14 captured content (input or arguments)
# 15 captured content (output or result)
# model calls:  16 request model  17 response model  18 finish reason  19 tool calls
#               20 input tokens   21 output tokens   22 cached tokens   23 wrap-up
# tool calls:   16 tool name      17 call id         18 server name


class MeteringLayer(Middleware):
    """Tracing (when `tracer` is given), metrics (into a `Meter`) and ledger rows (into a
    `UsageLedger`) of one role's calls; any of the three may be off."""

    def __init__(self, cfg: Any, role: str, *, swarm: str, meter: Meter | None = None,
                 ledger: UsageLedger | None = None, host: Any = None, replica: str = "0",
                 flush_interval_s: float = 5.0, tracer: SwarmTracer | None = None) -> None:
        self.swarm = swarm
        self.role = role
        self.meter = meter
        self.ledger = ledger
        self.tracer = tracer
        self.sink = tracer.tracing.sink if tracer is not None else None
        model = cfg.agents[role].model
        self.model = model
        mcfg = cfg.models[model]
        self.provider = mcfg.provider
        self.price = mcfg.price
        self.capture = tracer is not None and tracer.capture
        self.mcp_servers = frozenset(name for name, tcfg in cfg.tools.items()
                                     if getattr(tcfg, "mcp", None) is not None)
        self.pending: deque[tuple[Any, ...]] = deque()
        self.max_pending = self.sink.max_queue if self.sink is not None else 1_000_000
        self._lock = threading.Lock()  # one drain at a time
        self.periodic = Periodic(flush_interval_s, meter.flush) if meter is not None else None
        if meter is not None:
            # Series bound once; `drain` adds to them.
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
            meter.samplers.append(lambda _: self.drain())
        self._tools: dict[tuple[str, str], Series] = {}
        if host is not None and meter is not None:
            host.on_checkpoint = self.checkpointed
            queue = meter.series(QUEUE_DEPTH, swarm, role, replica)
            sessions = meter.series(SESSIONS, swarm, role, replica)
            meter.samplers.append(lambda _: _sample_host(host, queue, sessions))
        if ledger is not None:
            ledger.sources.append(self.drain)
        if self.sink is not None:
            self.sink.sources.append(self.drain)
            self.sink.start()

    # -- the layer -------------------------------------------------------------------------

    def _record(self, rec: tuple[Any, ...]) -> None:
        pending = self.pending
        if len(pending) >= self.max_pending:  # nobody drains (a stuck store): bounded
            if self.sink is not None:
                self.sink.dropped += 1
            return
        pending.append(rec)
        if self.periodic is not None:
            self.periodic.ensure()
        ledger = self.ledger
        if ledger is not None and (ledger._task is None or ledger._task.done()):
            ledger._start()

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Time the call and record it."""
        session = call.session
        parent = _parent_of(session) if self.sink is not None else None
        captured = self.tracer.content(_new_input(call)) if self.capture else None
        span_id, t0 = _random_bits(64), time_ns()
        try:
            resp = await nxt(call)
        except BaseException as exc:
            self._model_raised(call, parent, span_id, t0, captured, exc)
            raise
        usage = resp.usage
        out = None
        if captured is not None:
            msg: dict[str, Any] = {"role": "assistant", "content": resp.content}
            if resp.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                     for c in resp.tool_calls]
            out = self.tracer.content([msg])  # type: ignore[union-attr]
        self._record((
            _MODEL, session.task_id, session.session_id, session.user, call.step,
            parent.trace_id if parent is not None else 0,
            parent.span_id if parent is not None else 0, span_id, t0, time_ns(), "ok", None,
            None, None, captured, out, call.model, resp.model or call.model,
            resp.finish_reason, len(resp.tool_calls), usage.input_tokens, usage.output_tokens,
            usage.cached_input_tokens, call.final))
        return resp

    def _model_raised(self, call: ModelCall, parent: SpanContext | None, span_id: int, t0: int,
                      captured: str | None, exc: BaseException) -> None:
        outcome, error_class, text, stopped = self._raised(exc, "model")
        s = call.session
        self._record((
            _MODEL, s.task_id, s.session_id, s.user, call.step,
            parent.trace_id if parent is not None else 0,
            parent.span_id if parent is not None else 0, span_id, t0, time_ns(), outcome,
            error_class, text, stopped, captured, None, call.model, None, None, 0, 0, 0, 0,
            call.final))

    def _raised(self, exc: BaseException, default_class: str
                ) -> tuple[str, str | None, str | None, str | None]:
        """(outcome, error class, span error text, stopped kind) of a call that raised: a
        layer below stopped the turn (a budget, an approval gate, stuck detection), it was
        cancelled, or it failed."""
        if isinstance(exc, StopTurn):
            o = exc.outcome
            if o.kind == "failed":
                return "stopped", o.error_class, self._redact(o.error or o.error_class), o.kind
            return "stopped", None, None, o.kind
        text = self._redact(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, asyncio.CancelledError):
            return "canceled", getattr(exc, "error_class", None) or default_class, text, None
        cls = classify(exc) if isinstance(exc, RunError) else default_class
        return "error", cls, text, None

    def _redact(self, text: str | None) -> str | None:
        if self.tracer is None:
            return None
        return self.tracer.redact(text or "error")[:500]

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Time the call and record it; its span is current while the tool runs, and its
        traceparent goes to an MCP tool (`_meta`), whose client spans nest under it."""
        session = inv.session
        parent = _parent_of(session) if self.sink is not None else None
        span_id = _random_bits(64)
        server = inv.entry.source.name
        token = None
        if parent is not None and server in self.mcp_servers:
            trace_id = parent.trace_id
            inv.ctx.traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
            token = attach(set_span_in_context(
                NonRecordingSpan(SpanContext(trace_id, span_id, False, _SAMPLED))))
        captured = self.tracer.content(inv.args) if self.capture else None  # type: ignore
        t0 = time_ns()
        try:
            result = await nxt(inv)
        except BaseException as exc:
            outcome, error_class, text, stopped = self._raised(exc, "tool")
            self._record_tool(inv, parent, span_id, t0, outcome, error_class, text, stopped,
                              captured, None)
            raise
        finally:
            if token is not None:
                detach(token)
        out = self.tracer.content(result.content) if self.capture else None  # type: ignore
        if result.is_error:
            self._record_tool(inv, parent, span_id, t0, "error", "tool",
                              self._redact(result.content), None, captured, out)
        else:
            self._record_tool(inv, parent, span_id, t0, "ok", None, None, None, captured, out)
        return result

    def _record_tool(self, inv: ToolInvocation, parent: SpanContext | None, span_id: int,
                     t0: int, outcome: str, error_class: str | None, text: str | None,
                     stopped: str | None, captured: str | None, out: str | None) -> None:
        s = inv.session
        call = inv.call
        self._record((
            _TOOL, s.task_id, s.session_id, s.user, inv.step,
            parent.trace_id if parent is not None else 0,
            parent.span_id if parent is not None else 0, span_id, t0, time_ns(), outcome,
            error_class, text, stopped, captured, out, call.name, call.id,
            inv.entry.source.name))

    def on_turn_end(self, session: Session) -> None:
        """Ask the ledger to write this turn's rows soon (coalesced, in the background)."""
        if self.ledger is not None:
            self.ledger.kick()

    async def aclose(self) -> None:
        """Write what is recorded: spans, metrics and the ledger."""
        self.drain()
        if self.sink is not None:
            self.sink.sources.remove(self.drain)
        if self.periodic is not None:
            await self.periodic.aclose()
        if self.meter is not None:
            self.meter.flush()
        if self.ledger is not None:
            await self.ledger.aclose()

    # -- off the step path -----------------------------------------------------------------

    def checkpointed(self, seconds: float) -> None:
        """A journal append took `seconds` (the agent host's hook on every checkpoint)."""
        self._checkpoint.samples.append(seconds * 1e3)

    def drain(self) -> None:
        """Turn the recorded calls into span rows (to the tracing sink), ledger rows and metric
        sums. Thread-safe: called from the sink's thread, the ledger's writer and the metrics
        push, whichever comes first."""
        with self._lock:
            pending = self.pending
            n = len(pending)
            if not n:
                return
            batch = [pending.popleft() for _ in range(n)]
            if self.sink is not None:
                self.sink.put(self._spans(batch))
            if self.ledger is not None:
                self.ledger.extend(self._rows(batch))
            if self.meter is not None:
                self._sums(batch)

    def _spans(self, batch: list[tuple[Any, ...]]) -> list[tuple[str, tuple[Any, ...]]]:
        """(task id, compact span) of each call, for `StepSpanSink` (the layout is
        `swarm.observability.store.step_row`'s)."""
        out = []
        role, provider, cost = self.role, self.provider, self.price.cost
        hexes: dict[int, str] = {}  # a batch has few traces and parents
        for r in batch:
            trace = hexes.get(r[5])
            if trace is None:
                trace = hexes[r[5]] = format(r[5], "032x")
            parent = None
            if r[6]:
                parent = hexes.get(r[6])
                if parent is None:
                    parent = hexes[r[6]] = format(r[6], "016x")
            failed = r[12] is not None
            if r[0] == _MODEL:
                ran = r[10] == "ok"
                span = ("c", trace, format(r[7], "016x"), parent, r[8], r[9],
                        "error" if failed else "unset", r[12], r[1], r[2], r[4], role, r[13],
                        (r[11] or "error") if failed else None, r[14], r[15], provider, r[16],
                        ran, r[17], r[18], r[20], r[21], r[22],
                        cost(r[20], r[21], r[22]) if ran else 0.0, r[19], r[23])
            else:
                span = ("t", trace, format(r[7], "016x"), parent, r[8], r[9],
                        "error" if failed else "unset", r[12], r[1], r[2], r[4], role, r[13],
                        (r[11] or "error") if failed else None, r[14], r[15], r[16], r[17],
                        r[18])
            out.append((r[1], span))
        return out

    def _rows(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Ledger rows (`usage.COLUMNS` order) of the calls that ran."""
        out = []
        swarm, role, model, cost = self.swarm, self.role, self.model, self.price.cost
        for r in batch:
            outcome = r[10]
            if outcome == "stopped":
                continue
            ms = (r[9] - r[8]) / 1e6
            if r[0] == _MODEL:
                tin, tout, tc = r[20], r[21], r[22]
                out.append((r[9] / 1e9, r[1], r[3] or None, swarm, role, "model", model, None,
                            r[4], tin, tout, tc, cost(tin, tout, tc) if tin or tout else 0.0,
                            ms, outcome, r[11] if outcome == "error" else None))
            else:
                out.append((r[9] / 1e9, r[1], r[3] or None, swarm, role, "tool", None, r[16],
                            r[4], 0, 0, 0, 0.0, ms, outcome,
                            r[11] if outcome == "error" else None))
        return out

    def _sums(self, batch: list[tuple[Any, ...]]) -> None:
        """Add the calls that ran to the metric series."""
        meter = self.meter
        assert meter is not None
        steps = ok = failed = tin = tout = tc = 0
        cost = 0.0
        latencies = []
        tools: dict[tuple[str, str], int] = {}
        errors: dict[tuple[str, str], int] = {}
        for r in batch:
            outcome = r[10]
            if outcome == "stopped":
                continue
            if r[0] == _MODEL:
                steps += 1
                latencies.append((r[9] - r[8]) / 1e6)
                if outcome == "ok":
                    ok += 1
                    tin += r[20]
                    tout += r[21]
                    tc += r[22]
                    if r[20] or r[21]:
                        cost += self.price.cost(r[20], r[21], r[22])
                else:
                    failed += 1
            else:
                key = (r[16], outcome)
                tools[key] = tools.get(key, 0) + 1
            if outcome == "error" and r[11] is not None:
                ekey = ("model" if r[0] == _MODEL else "tool", r[11])
                errors[ekey] = errors.get(ekey, 0) + 1
        with meter.lock:
            self._steps.value += steps
            self._ok.value += ok
            self._failed.value += failed
            self._in.value += tin
            self._out.value += tout
            self._cached.value += tc
            self._cost.value += cost
            self._latency.samples.extend(latencies)
            for (tool, outcome), n in tools.items():
                series = self._tools.get((tool, outcome))
                if series is None:
                    series = self._tools[(tool, outcome)] = meter.series(
                        TOOL_CALLS, self.swarm, self.role, tool, outcome)
                series.value += n
            for (kind, cls), n in errors.items():
                meter.series(ERRORS, self.swarm, self.role, kind, cls).value += n


def _parent_of(session: Any) -> SpanContext:
    """The span a step's spans hang under: the turn's `invoke_agent` span (kept in the session
    by the agent host), else the current span, else a new trace."""
    parent = session.scratch.get("span")
    if parent is not None:
        return parent
    parent = get_current_span().get_span_context()
    if parent.is_valid:
        return parent
    parent = SpanContext(_random_bits(128), 0, False)
    session.scratch["span"] = parent
    return parent


def _new_input(call: ModelCall) -> list[dict[str, Any]]:
    """The messages since the model's last answer: what this call adds to the conversation."""
    messages = call.request.messages
    i = len(messages)
    while i > 0 and messages[i - 1].get("role") != "assistant":
        i -= 1
    return messages[i:] if i else messages


def _sample_host(host: Any, queue: Series, sessions: Series) -> None:
    # Read at flush time, off the step path: sessions waiting on the host's slot semaphore
    # (asyncio keeps them in `_waiters`) and sessions running.
    waiters = getattr(host._slots, "_waiters", None)
    queue.value = float(sum(1 for w in waiters if not w.done())) if waiters else 0.0
    sessions.value = float(host.sessions())


def metering_layer(cfg: Any, role: str, *, store: Any = None, host: Any = None,
                   recorder: Recorder | None = None,
                   tracer: SwarmTracer | None = None) -> MeteringLayer | None:
    """The role's metering layer, or None when nothing would be recorded: no `tracer`
    (tracing off or not installed), metrics off or no recorder in this process, and the ledger
    off or without a `usage.dir`."""
    mcfg, ucfg = cfg.metrics, cfg.usage
    recorder = recorder or (active_recorder() if mcfg.enabled else None)
    ledger = None
    if ucfg.enabled and ucfg.dir:
        # A deployed swarm always has usage.dir (swarm.observability.usage.pin_location); a
        # LocalSwarm writes a ledger only when its config names one.
        ledger = UsageLedger(ucfg.dir, flush_interval_s=ucfg.flush_interval_s,
                             max_buffered_rows=ucfg.max_buffered_rows,
                             redis=_redis_url(store) if ucfg.redis_totals else None)
    if recorder is None and ledger is None and tracer is None:
        return None
    deployment, replica = actor_identity()
    return MeteringLayer(cfg, role, swarm=deployment or cfg.name,
                         meter=Meter(recorder) if recorder is not None else None,
                         ledger=ledger, host=host, replica=replica,
                         flush_interval_s=mcfg.flush_interval_s, tracer=tracer)
