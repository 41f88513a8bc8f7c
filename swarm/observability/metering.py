"""The metering layer: tracing, metrics and usage-ledger rows of one agent role's model and tool
calls, in one middleware layer.

On the step path each call leaves one flat tuple of plain values (ids, times, token counts,
outcome), which the step loop builds from the fields it reads for its own events
(swarm.runtime.step, `MODEL`: the layout) and hands to `records`: no span object, no attribute
dict, no ledger row, no metric update, and no layer around the call. The layer wraps a call
only where it must act on the call itself: to capture its content and answer
(`tracing.capture_content`) and to give an MCP tool call its span's traceparent (`_meta`).
`drain` hands the tuples to the three outputs, off the step path: whichever needs them first
pulls them (the trace store's writer thread, the ledger's writer task, the metrics push), and
each tuple feeds all three at once:

- a `chat {model}` or `execute_tool {tool}` span under the turn's `invoke_agent` span: the
  tracing sink stores the tuples as they are, by task (swarm.observability.store `CALLS`), and
  makes SDK spans of them only for a configured exporter (swarm.observability.tracing);
- a ledger row: the ledger's writer has this layer make Arrow columns of the tuples
  (`ledger_table`, swarm.observability.usage);
- the metric sums: steps, model calls, tokens, cost, latency, tool calls, errors by class
  (swarm.observability.metrics).

Error classes are the step loop's own (see swarm.runtime.step): a model call's exception is its
`RunError` class or `model`, a tool call's is its `RunError` class or `tool`, a tool's own error
result and a timed-out tool call are `tool`. A call a later layer stopped (`StopTurn`: a
budget, an approval, a rate limit) didn't run: it has a span (marked `swarm.stopped`) but is
neither counted nor billed. Error texts are redacted when drained.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from opentelemetry.context import attach, detach
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    get_current_span,
    set_span_in_context,
)

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
from swarm.observability.tracing import _SAMPLED, _random_bits
from swarm.observability.usage import UsageLedger, _redis_url
from swarm.runtime.middleware import Middleware, ModelCall, NextModel, NextTool
from swarm.runtime.step import MODEL as _MODEL
from swarm.runtime.step import REFUSED as _REFUSED

if TYPE_CHECKING:
    import pyarrow as pa

    from swarm.models.interface import ModelResponse
    from swarm.observability.tracing import SwarmTracer
    from swarm.runtime.middleware import ToolInvocation
    from swarm.runtime.step import Session
    from swarm.tools.interface import ToolResult

_TRACES = 1024


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
        self._rates = mcfg.price.rates()  # read once: `_costs` runs per drained call
        self.capture = tracer is not None and tracer.capture
        self.mcp_servers = frozenset(name for name, tcfg in cfg.tools.items()
                                     if getattr(tcfg, "mcp", None) is not None)
        self.pending: deque[tuple[Any, ...]] = deque()
        # The step loop makes the records and appends them here (a bound builtin: no frame of
        # ours per call; the bound on `pending` is kept at turn ends); the layer wraps only
        # calls it acts on first.
        self.records = self.pending.append
        self.wraps_model = self.capture
        self.wraps_tool = self.capture or (self.sink is not None and bool(self.mcp_servers))
        self.max_pending = self.sink.max_queue if self.sink is not None else 1_000_000
        self._lock = threading.Lock()  # one drain at a time
        self._traces: dict[str, tuple[str, None]] = {}  # see `_for_spans`
        self._idle = True  # the background tasks aren't started
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
            # Seconds per journal append, kept as they come (a bound builtin: no frame of ours
            # per checkpoint) and moved into the histogram (in ms) at each metrics push.
            self._checkpoint_s: list[float] = []
            host.on_checkpoint = self._checkpoint_s.append
            meter.samplers.append(lambda _: self._checkpoints())
            queue = meter.series(QUEUE_DEPTH, swarm, role, replica)
            sessions = meter.series(SESSIONS, swarm, role, replica)
            meter.samplers.append(lambda _: _sample_host(host, queue, sessions))
        if ledger is not None:
            ledger.sources.append(self.drain)
            # pyarrow's first conversion and Parquet write, once per process, in the
            # background now rather than in the first flush.
            ledger.warm_up_once(self, [_warm_record(model)])
        if self.sink is not None:
            self.sink.sources.append(self.drain)
            self.sink.start()

    # -- the layer -------------------------------------------------------------------------

    def _background(self) -> None:
        """Start the metrics push and the ledger writer (from the event loop: the first turn
        that starts after start or after `aclose`)."""
        if self.periodic is not None:
            self.periodic.ensure()
        ledger = self.ledger
        if ledger is not None and (ledger._task is None or ledger._task.done()):
            ledger._start()
        self._idle = False

    def _bound(self) -> None:
        """Keep at most `max_pending` records (a trace store, ledger and metrics push that all
        stopped draining): the newest beyond it are dropped, and counted."""
        with self._lock:  # not while a drain takes them
            over = len(self.pending) - self.max_pending
            for _ in range(over):
                self.pending.pop()
        if over > 0 and self.sink is not None:
            self.sink.drop(over)

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Capture what the call adds to the conversation and its answer, for its record
        (in the call's `extra` "meter": the step loop puts them in the record)."""
        captured = self.tracer.content(_new_input(call))  # type: ignore[union-attr]
        call.extra["meter"] = (captured, None)
        resp = await nxt(call)
        msg: dict[str, Any] = {"role": "assistant", "content": resp.content}
        if resp.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                                 for c in resp.tool_calls]
        call.extra["meter"] = (captured, self.tracer.content([msg]))  # type: ignore[union-attr]
        return resp

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Give an MCP tool call its span now: the span is current while the tool runs, and
        its traceparent goes to the tool (`_meta`), whose client spans nest under it; capture
        the arguments and the result. Both for the call's record (`extra` "meter")."""
        session = inv.session
        span_id = token = 0
        if self.sink is not None and inv.entry.source.name in self.mcp_servers:
            parent = session.scratch.get("span_ids") or _parent_ids(session)
            # The loop's record reads the parent from here too.
            session.scratch.setdefault("span_ids", parent)
            span_id = _random_bits(64)
            trace_id = int(parent[0], 16)
            inv.ctx.traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
            token = attach(set_span_in_context(
                NonRecordingSpan(SpanContext(trace_id, span_id, False, _SAMPLED))))
        captured = self.tracer.content(inv.args) if self.capture else None  # type: ignore
        inv.extra["meter"] = (span_id, captured, None)
        try:
            result = await nxt(inv)
        finally:
            if token:
                detach(token)
        if self.capture:
            inv.extra["meter"] = (span_id, captured,
                                  self.tracer.content(result.content))  # type: ignore
        return result

    def on_turn_start(self, session: Session) -> None:
        """Start the background work (after a start or `aclose`), and give the turn's calls
        their parent span's ids in `scratch` "span_ids", which the step loop puts in each
        record: the agent host's `invoke_agent` span (`scratch` "span"), else see
        `_parent_of`."""
        if self._idle:
            self._background()
        if self.sink is not None and "span_ids" not in session.scratch:
            session.scratch["span_ids"] = _parent_ids(session)

    def on_turn_end(self, session: Session) -> None:
        """Keep the records bounded, and ask the ledger to write this turn's rows soon
        (coalesced, in the background)."""
        if len(self.pending) > self.max_pending:
            self._bound()
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
        self._idle = True

    # -- off the step path -----------------------------------------------------------------

    def _checkpoints(self) -> None:
        """Move the journal appends' seconds into the checkpoint latency histogram (ms)."""
        kept = self._checkpoint_s  # the journals hold its `append`: emptied in place
        n = len(kept)
        if n:
            self._checkpoint.samples.extend([s * 1e3 for s in kept[:n]])
            del kept[:n]

    def drain(self) -> None:
        """Hand the recorded calls to the tracing sink and the ledger, and add them to the
        metric sums. Thread-safe: called from the sink's thread, the ledger's writer and the metrics
        push, whichever comes first."""
        with self._lock:
            pending = self.pending
            n = len(pending)
            if not n:
                return
            batch = [pending.popleft() for _ in range(n)]
            if self.sink is not None:
                self._for_spans(batch)
            costs = self._costs(batch)  # once for the three outputs
            if self.sink is not None:
                self.sink.put_calls(self.role, self.provider, batch, costs)
            if self.ledger is not None:
                # In the lock: a drain that finds nothing (`aclose`'s) knows every record
                # taken before it is in the ledger.
                self.ledger.extend_calls(self, batch, costs)
            if self.meter is not None:
                self._sums(batch, costs)
        if self.ledger is not None:
            self.ledger.convert_soon()  # on the ledger's own thread

    def _for_spans(self, batch: list[tuple[Any, ...]]) -> None:
        """Redact the error texts, and give a call with no parent span (a step loop run
        without an agent host's turns) one: a new trace per task, the same for later batches
        (the last `_TRACES` tasks')."""
        traces = self._traces
        for i, r in enumerate(batch):
            if r[11] is None and r[5] is not None:  # nearly always
                continue
            parent = r[5]
            if parent is None:
                parent = traces.get(r[1])
                if parent is None:
                    if len(traces) >= _TRACES:
                        del traces[next(iter(traces))]
                    parent = traces[r[1]] = (format(_random_bits(128), "032x"), None)
            text = r[11]
            batch[i] = (*r[:5], parent, *r[6:11], None if text is None else self._redact(text),
                        *r[12:])

    def _redact(self, text: str) -> str | None:
        if self.tracer is None:
            return None
        return self.tracer.redact(text or "error")[:500]

    def _costs(self, batch: list[tuple[Any, ...]]) -> list[float]:
        """Each call's cost in USD: `Price.cost` of a model call that ran, 0 otherwise (the
        same arithmetic, with the prices read once)."""
        inp, out, cached = self._rates
        if not (inp or out or cached):
            return [0.0] * len(batch)
        costs = []
        for r in batch:
            if r[0] == _MODEL and r[9] == "ok" and (r[19] or r[20]):
                # r[19] input tokens, r[21] cached (part of the input), r[20] output
                c = min(max(r[21], 0), r[19])
                costs.append(((r[19] - c) * inp + c * cached + r[20] * out) / 1e6)
            else:
                costs.append(0.0)
        return costs

    def ledger_table(self, records: list[tuple[Any, ...]], costs: list[float]) -> pa.Table:
        """The ledger rows (`swarm.observability.usage.schema`) of the calls that ran, made
        column by column straight from the records (the ledger's writer calls this, off the
        step path)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from swarm.observability.usage import column, schema

        sch = schema()
        n = len(records)
        string, int64 = pa.string(), pa.int64()
        if not n:
            return sch.empty_table()
        # One list comprehension per column, then one conversion each; Arrow does the rest.
        # (Transposing with zip(*records) costs more.) Token counts from the model calls'
        # records alone, put in place among the tool calls' zeros by Arrow.
        ends = pa.array([r[8] for r in records], int64)
        kinds = pa.array([r[0] for r in records], pa.int8())  # _MODEL 0, _TOOL 1
        is_model = pc.equal(kinds, _MODEL)
        outcomes = [r[9] for r in records]
        outcome = column(outcomes, string)
        if outcomes.count("ok") == n:
            errors = pa.nulls(n, string)
        else:
            errors = pa.array([r[10] if r[9] == "error" else None for r in records], string)
        models = [r for r in records if r[0] == _MODEL]
        counts = [pa.array([r[k] for r in models], int64) for k in (19, 20, 21)]
        if len(models) < n:
            zeros = pa.repeat(pa.scalar(0, int64), n)
            counts = [pc.replace_with_mask(zeros, is_model, c) for c in counts]
        null = pa.scalar(None, string)
        table = pa.Table.from_arrays([
            pc.divide(ends, 1000).cast(sch.field("ts").type),  # ns to µs
            pa.array([r[1] for r in records], string),
            column([r[3] or None for r in records], string),
            pa.repeat(pa.scalar(self.swarm, string), n),
            pa.repeat(pa.scalar(self.role, string), n),
            pc.if_else(is_model, pa.scalar("model", string), pa.scalar("tool", string)),
            pc.if_else(is_model, pa.scalar(self.model, string), null),
            # 15: a tool call's tool (a model call's requested model, left out)
            pc.if_else(is_model, null, pa.array([r[15] for r in records], string)),
            pa.array([r[4] for r in records], pa.int32()),
            *counts,
            pa.array(costs, pa.float64()),
            pc.divide(pc.subtract(ends, pa.array([r[7] for r in records], int64))
                      .cast(pa.float64()), 1e6),  # ns to ms
            outcome, errors], schema=sch)
        if "stopped" in outcomes:  # stopped by a later layer: didn't run, not billed
            table = table.filter(pc.not_equal(outcome, "stopped"))
        return table

    def _sums(self, batch: list[tuple[Any, ...]], costs: list[float]) -> None:
        """Add the calls that ran to the metric series."""
        meter = self.meter
        assert meter is not None
        steps = ok = failed = tin = tout = tc = 0
        cost = sum(costs)
        latencies = []
        tools: dict[tuple[str, str], int] = {}
        errors: dict[tuple[str, str], int] = {}
        for r in batch:
            outcome = r[9]
            if outcome == "stopped":
                if r[12] == _REFUSED:  # refused by a rate limit: no call, but an error of
                    # its class, as the step's event and the task's `errors` count it
                    ekey = ("model" if r[0] == _MODEL else "tool", r[10])
                    errors[ekey] = errors.get(ekey, 0) + 1
                continue
            if r[0] == _MODEL:
                steps += 1
                latencies.append((r[8] - r[7]) / 1e6)
                if outcome == "ok":
                    ok += 1
                    tin += r[19]
                    tout += r[20]
                    tc += r[21]
                else:
                    failed += 1
            else:
                key = (r[15], outcome)
                tools[key] = tools.get(key, 0) + 1
            if outcome == "error" and r[10] is not None:
                ekey = ("model" if r[0] == _MODEL else "tool", r[10])
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


def _parent_ids(session: Any) -> tuple[str, str | None]:
    """The (trace id, span id) in hex of the span a step's spans hang under (`_parent_of`).
    Records keep these strings rather than the span context, so a record holds no object the
    garbage collector must keep watching. When the span found is the session's own (`scratch`
    "span": the agent host's turn span), they are kept in `scratch` "span_ids", where the step
    loop reads them for each call's record."""
    ctx = _parent_of(session)
    ids = (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x") if ctx.span_id else None)
    if session.scratch.get("span") is ctx:
        session.scratch["span_ids"] = ids
    return ids


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


def _warm_record(model: str) -> tuple[Any, ...]:
    """A model call's record as the step loop makes it (`ledger_table`'s input)."""
    now = time.time_ns()
    return (_MODEL, "warm-up", "warm-up", "", 0, None, 0, now, now, "ok", None, None, None,
            None, None, model, model, "stop", 0, 1, 1, 0, False)


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
    meter = Meter(recorder, mcfg.histogram_cap) if recorder is not None else None
    return MeteringLayer(cfg, role, swarm=deployment or cfg.name, meter=meter,
                         ledger=ledger, host=host, replica=replica,
                         flush_interval_s=mcfg.flush_interval_s, tracer=tracer)
