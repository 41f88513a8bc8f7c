"""OpenTelemetry spans per task, following the GenAI semantic conventions.

One task is one trace:

    invoke_workflow {swarm}                 the supervisor drives the task
      SendMessage {agent}                   an A2A message to an agent (client span)
        invoke_agent {agent}                the agent's turn, in its actor
          chat {model}                      one model call: usage, finish reasons
          execute_tool {tool}               one tool call (MCP spans nest under it)

The trace context crosses actors as a W3C `traceparent` in the `TurnRequest` and the A2A
message metadata, and reaches MCP servers in the request's `_meta` (`ToolContext.traceparent`).

A process has at most one installed `Tracing` (its provider, processors and trace store): Ray
actors call `configure` once; tests `install` one built on a private `TracerProvider`, since
the global OpenTelemetry provider can be set only once per process. `SwarmTracer` binds it to
one swarm config and is what the supervisor, agent hosts and the middleware layer call; with
tracing off, they hold None and pay nothing. The per-step `chat` and `execute_tool` spans are
recorded by the metering layer (swarm.observability.metering) and written by `StepSpanSink`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from time import time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry.context import attach, detach
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from swarm.observability._export import (
    CountedBatchProcessor,
    Redactor,
    TaskIdProcessor,
    build_exporter,
    config_secrets,
)
from swarm.observability.store import (
    CHUNK,
    TASK_ATTR,
    TraceStore,
    call_chunk,
    call_spans,
    open_trace_store,
    step_row,
)
from swarm.observability.store import _encode as _encode_row

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

log = logging.getLogger("swarm.observability")

_propagator = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_random_bits = random.getrandbits
_STORE_QUEUE = 8192
# The per-step spans the sink holds while its writer can't write: this many flushes' worth.
_QUEUED_FLUSHES = 8
# A2A task state a turn leaves the task in, by the turn's outcome.
_A2A_STATE = {"final": "completed", "handoff": "working", "failed": "failed",
              "canceled": "canceled", "input_required": "input_required"}


class Tracing:
    """A process's tracer provider, its processors (trace store, exporter) and trace store.

    `provider` is injectable: tests pass a private one (with an `InMemorySpanExporter`); by
    default a new provider is made. The store processor and the configured exporter each get
    their own bounded `CountedBatchProcessor`, so a slow exporter never delays the store.
    """

    def __init__(self, *, provider: TracerProvider | None = None, store: TraceStore | None = None,
                 exporter: Any = None, settings: Any = None,
                 resource: dict[str, Any] | None = None) -> None:
        from swarm.config import TracingConfig

        self.settings = settings if settings is not None else TracingConfig()
        s = self.settings
        self.provider = provider or TracerProvider(
            resource=Resource.create({"service.name": "swarm", **(resource or {})}))
        self.provider.add_span_processor(TaskIdProcessor())
        self.store = store
        self.processors: dict[str, CountedBatchProcessor] = {}
        for name, exp in (("store", None if store is None else _store_exporter(store)),
                          (s.exporter, exporter)):
            if exp is None:
                continue
            # The store is local and fast: it gets a queue of its own size, so an exporter
            # configured with a small one doesn't make it drop spans.
            queue = s.max_queue if name != "store" else max(s.max_queue, _STORE_QUEUE)
            proc = CountedBatchProcessor(name, exp, max_queue=queue,
                                         batch_size=min(s.batch_size, queue),
                                         flush_interval_s=s.flush_interval_s)
            self.processors[name] = proc
            self.provider.add_span_processor(proc)
        self.tracer = self.provider.get_tracer("swarm")
        self.sink = StepSpanSink(self, max_queue=max(s.max_queue, _STORE_QUEUE),
                                 flush_interval_s=s.flush_interval_s)

    @classmethod
    def from_config(cls, cfg: SwarmConfig, store_spec: str | None, *,
                    run_dir: Path | None = None, provider: TracerProvider | None = None,
                    resource: dict[str, Any] | None = None) -> Tracing:
        """Build from `cfg.tracing`: the trace store next to the state store `store_spec`."""
        s = cfg.tracing
        run_dir = Path(run_dir if run_dir is not None else cfg.state.run_dir)
        store = open_trace_store(store_spec, run_dir, ttl_s=s.store_ttl_s) if s.store else None
        return cls(provider=provider, store=store, exporter=build_exporter(s, run_dir),
                   settings=s, resource={"swarm.name": cfg.name, **(resource or {})})

    def read(self, task_id: str) -> list[dict[str, Any]]:
        """A task's stored spans, after flushing this process's own (blocking: use a thread)."""
        if self.store is None:
            return []
        self.sink.flush()
        proc = self.processors.get("store")
        if proc is not None:
            proc.force_flush()
        return self.store.read(task_id)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Export everything queued now (blocks up to the exporters' own timeouts)."""
        self.sink.flush()
        return self.provider.force_flush(int(timeout_s * 1e3))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per processor: spans ended, exported, failed, dropped and still queued (the store's
        include the per-step spans its direct sink wrote)."""
        out = {name: p.stats() for name, p in self.processors.items()}
        if "store" in out:
            for key, n in self.sink.stats().items():
                out["store"][key] = out["store"].get(key, 0) + n
        return out

    def shutdown(self) -> None:
        """Flush and stop the processors."""
        self.sink.close()
        self.provider.shutdown()


class StepSpanSink:
    """Where the per-step spans (`chat`, `execute_tool`) go: one thread, every
    `flush_interval_s`, pulls the calls the metering layers recorded (their `drain`, registered
    in `sources`), writes the trace store's rows directly, and builds SDK `ReadableSpan`s only
    for the provider's other processors (a configured exporter, a test's), which is where the
    cost of an OpenTelemetry span is paid: never on the step path, and not at all when the store
    is the only destination (the default).
    """

    def __init__(self, tracing: Tracing, *, max_queue: int, flush_interval_s: float) -> None:
        self.tracing = tracing
        self.max_queue = max_queue
        self.interval = flush_interval_s
        self.sources: list[Callable[[], None]] = []
        # (task id, compact span) of each span (`swarm.observability.store.step_row`), put
        # here by the `invoke_agent` spans; (agent, provider, call records, costs) of the calls
        # the sources' drains took (`put_calls`).
        self.pending: deque[tuple[Any, ...]] = deque()
        self.calls: deque[tuple[str, str, list[tuple[Any, ...]], list[float]]] = deque()
        self._queued_calls = 0  # records in `calls`
        self.ended = self.exported = self.failed = self.dropped = 0
        self._lock = threading.Lock()  # one flush at a time
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.scope = InstrumentationScope("swarm")

    def put(self, spans: list[tuple[Any, ...]]) -> None:
        """Queue finished spans (from any thread)."""
        self.pending.extend(spans)
        with self._count_lock:  # drains on several threads put at once
            self.ended += len(spans)

    def drop(self, n: int) -> None:
        """Count spans that ended but were dropped before reaching the sink."""
        with self._count_lock:
            self.ended += n
            self.dropped += n

    def put_calls(self, agent: str, provider: str, records: list[tuple[Any, ...]],
                  costs: list[float]) -> None:
        """Queue an agent's finished calls: the metering layer's records as they are, and
        each call's cost (from any thread); each becomes a `chat` or `execute_tool` span.
        While the writer is stuck (a trace store that doesn't answer), at most
        `_QUEUED_FLUSHES` x `max_queue` calls wait; the rest are dropped and counted."""
        with self._count_lock:
            self.ended += len(records)
            if self._queued_calls + len(records) > _QUEUED_FLUSHES * self.max_queue:
                self.dropped += len(records)
                return
            self._queued_calls += len(records)
        self.calls.append((agent, provider, records, costs))

    def start(self) -> None:
        """Start the writer thread, once."""
        if self._thread is not None or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="swarm-step-spans",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # pragma: no cover - never let the thread die
                log.warning("tracing: writing step spans failed", exc_info=True)

    def flush(self) -> None:
        """Write what is recorded: rows to the trace store, spans to the other processors."""
        with self._lock:
            for drain in list(self.sources):
                drain()
            pending, calls = self.pending, self.calls
            batch = [pending.popleft() for _ in range(len(pending))]
            call_batches = [calls.popleft() for _ in range(len(calls))]
            if not batch and not call_batches:
                return
            with self._count_lock:
                self._queued_calls -= sum(len(c[2]) for c in call_batches)
            # Each batch of calls split by task: one chunk of records per task and agent
            # (`swarm.observability.store.CALLS`), with its own base span id.
            chunks: list[tuple[str, list[Any]]] = []
            n = len(batch)
            for agent, provider, records, costs in call_batches:
                n += len(records)
                groups: dict[str, tuple[list[Any], list[float]]] = {}
                for r, cost in zip(records, costs, strict=True):
                    group = groups.get(r[1])
                    if group is None:
                        group = groups[r[1]] = ([], [])
                    group[0].append(r)
                    group[1].append(cost)
                chunks += [(task, call_chunk(agent, provider, recs, cs))
                           for task, (recs, cs) in groups.items()]
            tracing = self.tracing
            store_proc = tracing.processors.get("store")
            if tracing.store is not None:
                # One stored element per task for each drained batch of an agent's calls
                # (usually one a flush), and one for the task's other spans
                # (`swarm.observability.store.CHUNK`).
                rows: dict[str, list[bytes]] = {}
                for task, chunk in chunks:
                    rows.setdefault(task, []).append(_encode_row(chunk))
                by_task: dict[str, list[Any]] = {}
                for task, span in batch:
                    part = by_task.get(task)
                    if part is None:
                        part = by_task[task] = [CHUNK]
                    part.append(span)
                for task, part in by_task.items():
                    rows.setdefault(task, []).append(_encode_row(part))
                try:
                    tracing.store.append(rows)
                    self.exported += n
                except Exception:
                    self.failed += n
                    log.warning("tracing: the trace store refused %d span(s)", n,
                                exc_info=True)
            multi = tracing.provider._active_span_processor  # the SDK's; pinned with the SDK
            others = [p for p in getattr(multi, "_span_processors", ())
                      if p is not store_proc and not isinstance(p, TaskIdProcessor)]
            if others:
                resource = tracing.provider.resource
                spans = [span for _task, chunk in chunks for span in call_spans(chunk)]
                for span in [*spans, *(span for _task, span in batch)]:
                    readable = _readable(span, resource, self.scope)
                    for proc in others:
                        proc.on_end(readable)

    def stats(self) -> dict[str, int]:
        """Per-step spans ended, written to the store, failed and dropped, and queued."""
        return {"ended": self.ended, "exported": self.exported, "failed": self.failed,
                "dropped": self.dropped, "queued": len(self.pending) + self._queued_calls}

    def close(self) -> None:
        """Write what is left and stop the thread."""
        self._closed = True
        self._wake.set()
        self.flush()


_KINDS = {"client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}


def _readable(span: tuple[Any, ...], resource: Any, scope: Any) -> ReadableSpan:
    """An SDK span of a compact per-step span, for exporters."""
    row = step_row(list(span))
    trace_id = int(row["trace"], 16)
    parent = row["parent"]
    attrs = row["attrs"]
    if "gen_ai.response.finish_reasons" in attrs:  # a sequence attribute: a tuple in the SDK
        attrs["gen_ai.response.finish_reasons"] = tuple(attrs["gen_ai.response.finish_reasons"])
    return ReadableSpan(
        name=row["name"], context=SpanContext(trace_id, int(row["span"], 16), False, _SAMPLED),
        parent=SpanContext(trace_id, int(parent, 16), False, _SAMPLED) if parent else None,
        resource=resource, attributes=attrs, kind=_KINDS[row["kind"]],
        status=Status(StatusCode.ERROR, row["error"]) if row["status"] == "error" else _UNSET,
        start_time=span[4] if span[0] == "s" else span[10],
        end_time=span[5] if span[0] == "s" else span[11], instrumentation_scope=scope)


def _store_exporter(store: TraceStore) -> Any:
    from swarm.observability.store import StoreExporter

    return StoreExporter(store)


_ACTIVE: Tracing | None = None


def install(tracing: Tracing | None) -> Tracing | None:
    """Make `tracing` this process's tracing (None: none); returns the previous one."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, tracing
    return previous


def active() -> Tracing | None:
    """This process's installed tracing, if any."""
    return _ACTIVE


def stats() -> dict[str, dict[str, int]]:
    """Span counts of this process's tracing per processor (empty if none is installed)."""
    return _ACTIVE.stats() if _ACTIVE is not None else {}


def configure(cfg: SwarmConfig, store_spec: str | None,
              resource: dict[str, Any] | None = None) -> Tracing | None:
    """Set up tracing for this (actor) process from its swarm config, once.

    The provider also becomes the global OpenTelemetry provider, so libraries' own spans (the
    MCP SDK's) join the task's trace. Returns None when the config turns tracing off.
    """
    if not cfg.tracing.enabled:
        return None
    if _ACTIVE is not None:
        return _ACTIVE
    from opentelemetry import trace

    tracing = Tracing.from_config(cfg, store_spec, resource=resource)
    try:
        trace.set_tracer_provider(tracing.provider)
    except Exception:  # pragma: no cover - another library set it first
        log.debug("global tracer provider already set", exc_info=True)
    install(tracing)
    return tracing


def swarm_tracer(cfg: SwarmConfig) -> SwarmTracer | None:
    """The tracer for one swarm, or None when tracing is off or no tracing is installed."""
    if not cfg.tracing.enabled or _ACTIVE is None:
        return None
    return SwarmTracer(_ACTIVE, cfg)


def traceparent_of(span: Any) -> str:
    """The W3C traceparent of a span (what `TraceContextTextMapPropagator` writes)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _set_error(span: Any, error_class: str | None, error: str | None, redact: Redactor) -> None:
    span.set_attribute("error.type", error_class or "error")
    span.set_status(Status(StatusCode.ERROR, redact(error or error_class or "error")[:500]))


class LightSpan:
    """A span the swarm opens itself per task and per turn (`invoke_workflow`, `SendMessage`,
    `invoke_agent`), recorded straight to the `StepSpanSink` when it ends, like the per-step
    spans: no SDK `Span` on the hot path. Code that needs a current span (the MCP SDK's own
    spans) sees a `NonRecordingSpan` with this span's context."""

    __slots__ = ("attrs", "ctx", "error", "kind", "name", "parent_id", "sink", "status", "t0")

    def __init__(self, sink: StepSpanSink, name: str, kind: str, ctx: SpanContext,
                 parent_id: int, attrs: dict[str, Any]) -> None:
        self.sink, self.name, self.kind, self.ctx = sink, name, kind, ctx
        self.parent_id, self.attrs = parent_id, attrs
        self.status, self.error = "unset", None
        self.t0 = time_ns()

    def get_span_context(self) -> SpanContext:
        return self.ctx

    def set_attribute(self, key: str, value: Any) -> None:
        self.attrs[key] = value

    def set_attributes(self, attrs: dict[str, Any]) -> None:
        self.attrs.update(attrs)

    def set_status(self, status: Status) -> None:
        code = status.status_code
        self.status = "error" if code is StatusCode.ERROR else \
            ("ok" if code is StatusCode.OK else "unset")
        self.error = status.description

    def end(self) -> None:
        """Queue the span's row (`swarm.observability.store.step_row`'s "s" layout)."""
        ctx = self.ctx
        self.sink.put([(self.attrs.get(TASK_ATTR, ""), (
            "s", format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"),
            format(self.parent_id, "016x") if self.parent_id else None, self.t0, time_ns(),
            self.status, self.error, self.name, self.kind, self.attrs))])
        self.sink.start()


class SwarmTracer:
    """Spans for one swarm: the supervisor's workflow and A2A spans, agent turns, and the
    middleware layer for model and tool calls."""

    def __init__(self, tracing: Tracing, cfg: SwarmConfig) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.cfg = cfg
        self.swarm = cfg.name
        self.capture = cfg.tracing.capture_content
        self.max_chars = cfg.tracing.max_content_chars
        self.redact = Redactor(config_secrets(cfg), cfg.tracing.redact)

    # ---- supervisor ---------------------------------------------------------------------------

    def _open(self, name: str, kind: str, parent: SpanContext | None,
              attrs: dict[str, Any]) -> LightSpan:
        trace_id = parent.trace_id if parent is not None and parent.is_valid else \
            _random_bits(128)
        ctx = SpanContext(trace_id, _random_bits(64), False, _SAMPLED)
        return LightSpan(self.tracing.sink, name, kind, ctx,
                         parent.span_id if parent is not None and parent.is_valid else 0, attrs)

    def start_workflow(self, task_id: str, context_id: str, user: str, resumed: bool
                       ) -> tuple[Any, Any]:
        """Open a task's `invoke_workflow` span (a new trace) and make it current."""
        span = self._open(f"invoke_workflow {self.swarm}", "internal", None, {
            "gen_ai.operation.name": "invoke_workflow", "swarm.name": self.swarm,
            "gen_ai.conversation.id": context_id, TASK_ATTR: task_id, "swarm.user": user,
            "swarm.resumed": resumed})
        return span, attach(set_span_in_context(NonRecordingSpan(span.ctx)))

    def end_workflow(self, handle: tuple[Any, Any], rec: Any) -> None:
        """Close the workflow span with the task's final state and totals."""
        span, token = handle
        detach(token)
        span.set_attributes({
            "swarm.task.state": rec.state, "swarm.steps": rec.steps,
            "gen_ai.usage.input_tokens": rec.input_tokens,
            "gen_ai.usage.output_tokens": rec.output_tokens,
            "swarm.model_calls": rec.model_calls, "swarm.tool_calls": rec.tool_calls})
        if rec.state == "failed":
            _set_error(span, rec.error_class, rec.error, self.redact)
        span.end()

    def start_send(self, task_id: str, context_id: str, agent: str) -> tuple[Any, str]:
        """Open the A2A client span of a message to `agent`; returns it and its traceparent."""
        span = self._open(f"SendMessage {agent}", "client", get_current_span().get_span_context(),
                          {"a2a.method.name": "SendMessage", "a2a.task.id": task_id,
                           "gen_ai.conversation.id": context_id, "gen_ai.agent.name": agent,
                           TASK_ATTR: task_id})
        return span, traceparent_of(span)

    def end_send(self, span: Any, result: Any = None, exc: BaseException | None = None) -> None:
        """Close an A2A span with the state the turn left the task in."""
        if result is not None:
            span.set_attributes({"a2a.task.state": _A2A_STATE.get(result.kind, result.kind),
                                 "swarm.outcome": result.kind})
            if result.target:
                span.set_attribute("swarm.handoff.to", result.target)
            if result.kind == "failed":
                _set_error(span, result.error_class, result.error, self.redact)
        elif exc is not None:
            span.set_attribute("a2a.task.state", "failed")
            _set_error(span, getattr(exc, "error_class", None) or type(exc).__name__,
                       str(exc), self.redact)
        span.end()

    # ---- agents -------------------------------------------------------------------------------

    def start_agent(self, req: Any, role: str, model: str) -> tuple[Any, Any]:
        """Open an agent turn's `invoke_agent` span under the request's traceparent and make
        it current (MCP client spans nest under the turn's tool spans through it)."""
        parent = get_current_span(_propagator.extract({"traceparent": req.traceparent})
                                  ).get_span_context() if req.traceparent else None
        span = self._open(f"invoke_agent {role}", "internal", parent, {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": role,
            "gen_ai.agent.id": f"{self.swarm}.{role}", "gen_ai.conversation.id": req.context_id,
            "gen_ai.request.model": model, TASK_ATTR: req.task_id, "swarm.turn": req.turn_id,
            "swarm.resume": req.resume})
        return span, attach(set_span_in_context(NonRecordingSpan(span.ctx)))

    def end_agent(self, handle: tuple[Any, Any], kind: str, error_class: str | None,
                  error: str | None, session: Any, target: str | None, steps: int) -> None:
        """Close an agent turn's span with its outcome and usage."""
        span, token = handle
        detach(token)
        span.set_attributes({
            "swarm.outcome": kind, "swarm.steps": steps,
            "gen_ai.usage.input_tokens": session.input_tokens,
            "gen_ai.usage.output_tokens": session.output_tokens,
            "gen_ai.usage.cache_read.input_tokens": session.cached_tokens,
            "swarm.model_calls": session.model_calls, "swarm.tool_calls": session.tool_calls})
        if kind == "handoff" and target:
            span.set_attribute("swarm.handoff.to", target)
        if kind == "failed":
            _set_error(span, error_class, error, self.redact)
        span.end()

    def content(self, value: Any) -> str:
        """A captured value: JSON, redacted, cut to `max_content_chars`."""
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return self.redact(text[: self.max_chars * 2])[: self.max_chars]
