"""Exporter plumbing: bounded batch processors that count what they lose, the exporters a
config names, the task-id propagation processor, and secret redaction."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import get_current_span
from pydantic import BaseModel, SecretStr

from swarm.observability.store import TASK_ATTR, span_row

log = logging.getLogger("swarm.observability")

_LOSS_LOG_EVERY_S = 60.0


class CountingExporter(SpanExporter):
    """Wraps an exporter and counts spans exported and spans whose export failed."""

    def __init__(self, name: str, inner: SpanExporter) -> None:
        self.name = name
        self.inner = inner
        self.taken = 0  # spans handed to export (taken off the processor's queue)
        self.exported = 0
        self.failed = 0
        self.processor: CountedBatchProcessor | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export through the wrapped exporter; an exception counts as a failure."""
        self.taken += len(spans)
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            log.debug("tracing: exporter %s raised %s", self.name, exc)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            if self.processor is not None:
                self.processor.note_loss()
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self.inner.force_flush(timeout_millis)


class CountedBatchProcessor(BatchSpanProcessor):
    """A `BatchSpanProcessor` with a bounded queue that counts the spans it drops.

    `on_end` only appends to a deque; export happens on the processor's own thread, so an
    exporter that can't connect costs the task nothing: its spans pile up to `max_queue` and
    then are dropped (and counted) instead of being waited for.
    """

    def __init__(self, name: str, exporter: SpanExporter, *, max_queue: int, batch_size: int,
                 flush_interval_s: float) -> None:
        self.name = name
        self.counter = CountingExporter(name, exporter)
        self.counter.processor = self
        self.max_queue = max_queue
        self.ended = 0
        self._last_log = 0.0
        self._logged = (0, 0)
        self._log_lock = threading.Lock()
        super().__init__(self.counter, max_queue_size=max_queue,
                         schedule_delay_millis=flush_interval_s * 1e3,
                         max_export_batch_size=batch_size)
        # The SDK's deque (bounded: appending to a full one drops its oldest span); read only
        # to count drops, which the SDK does not expose.
        self._queue = getattr(self._batch_processor, "_queue", None)

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished span (a full queue drops its oldest one)."""
        if not span.context.trace_flags.sampled:
            return
        self.ended += 1
        queue = self._queue
        if queue is not None and len(queue) >= self.max_queue:
            self.note_loss()
        super().on_end(span)

    @property
    def dropped(self) -> int:
        """Spans lost to a full queue: every span ended is queued, taken for export or dropped
        (exact when no span is being ended at the same moment)."""
        queue = self._queue
        return max(0, self.ended - self.counter.taken - (len(queue) if queue is not None else 0))

    def note_loss(self) -> None:
        """Log lost spans: once at the first loss, then at most once a minute."""
        now = time.monotonic()
        if now - self._last_log < _LOSS_LOG_EVERY_S and self._last_log:
            return
        with self._log_lock:
            if now - self._last_log < _LOSS_LOG_EVERY_S and self._last_log:
                return
            self._last_log = now
            dropped, failed = self.dropped, self.counter.failed
            lost = [f"dropped {dropped} span(s) (its queue of {self.max_queue} was full)"
                    if dropped else "", f"failed to export {failed}" if failed else ""]
            log.warning("tracing: exporter %s has %s; tasks are not affected", self.name,
                        " and ".join(x for x in lost if x) or "lost no span")

    def stats(self) -> dict[str, int]:
        """Spans ended, exported, failed, dropped, and still queued."""
        queue = self._queue
        return {"ended": self.ended, "exported": self.counter.exported,
                "failed": self.counter.failed, "dropped": self.dropped,
                "queued": len(queue) if queue is not None else 0}


class TaskIdProcessor(SpanProcessor):
    """Gives a span without a task id its parent's: spans other libraries open inside a step
    (the MCP SDK's client and in-process server spans) then land in the task's trace store."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Copy `swarm.task.id` from the parent span, if it has one and this span doesn't."""
        attrs = span.attributes
        if attrs is not None and TASK_ATTR in attrs:
            return
        parent = get_current_span(parent_context)
        task_id = (getattr(parent, "attributes", None) or {}).get(TASK_ATTR)
        if task_id is not None:
            span.set_attribute(TASK_ATTR, task_id)


class JsonlSpanExporter(SpanExporter):
    """Every span as one JSON line (the trace store's row, plus the service) in one file."""

    def __init__(self, path: Path) -> None:
        import msgspec

        self.path = Path(path)
        self._encode = msgspec.json.Encoder().encode
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append the batch to the file."""
        lines = []
        for span in spans:
            row = span_row(span)
            row["service"] = (span.resource.attributes or {}).get("service.name")
            lines.append(self._encode(row))
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as f:
                f.write(b"\n".join(lines) + b"\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to close: each batch opens and closes the file."""


class _AtMostOncePerMinute(logging.Filter):
    """Lets one record of each logger and level through a minute: the OTLP exporters log an
    error (and a warning) for every batch they can't send, so a collector that is down filled
    the log. swarm says what was lost itself (`CountedBatchProcessor.note_loss`)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, int], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), (record.name, record.levelno)
        last = self._last.get(key)
        if last is not None and now - last < _LOSS_LOG_EVERY_S:
            return False
        self._last[key] = now
        return True


_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                     "opentelemetry.exporter.otlp.proto.grpc.exporter",
                     "opentelemetry.sdk._shared_internal")
_THROTTLE = _AtMostOncePerMinute()


def _throttle_exporter_logs() -> None:
    for name in _EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if _THROTTLE not in logger.filters:
            logger.addFilter(_THROTTLE)


def build_exporter(settings: Any, run_dir: Path) -> SpanExporter | None:
    """The exporter `tracing.exporter` names, or None for `none`."""
    kind = settings.exporter
    if kind == "none":
        return None
    _throttle_exporter_logs()
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + os.linesep)
    if kind == "jsonl":
        return JsonlSpanExporter(Path(run_dir) / settings.jsonl_path)
    otlp = settings.otlp
    headers = {k: v.get_secret_value() for k, v in otlp.headers.items()}
    if otlp.protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:  # pragma: no cover - a dependency of swarm
            raise ImportError("tracing.exporter otlp (grpc) needs "
                              "opentelemetry-exporter-otlp-proto-grpc") from e
        return OTLPSpanExporter(endpoint=otlp.endpoint, insecure=otlp.insecure,
                                headers=headers or None, timeout=otlp.timeout_s)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPExporter,
        )
    except ImportError as e:  # pragma: no cover - a dependency of swarm
        raise ImportError("tracing.exporter otlp (http) needs "
                          "opentelemetry-exporter-otlp-proto-http") from e
    endpoint = otlp.endpoint
    if endpoint.count("/") <= 2:  # no path given: the collector's standard one
        endpoint += "/v1/traces"
    return HTTPExporter(endpoint=endpoint, headers=headers or None, timeout=otlp.timeout_s)


# ---- redaction ----------------------------------------------------------------------------------

REDACTED = "[REDACTED]"
# Values that look like credentials wherever they appear: bearer tokens, key=value pairs whose
# key names a secret, and the shapes of well-known API keys.
_PATTERNS = [
    r"(?i:\bbearer\s+[A-Za-z0-9._~+/=-]{8,})",
    r"(?i:\bbasic\s+[A-Za-z0-9+/=]{8,})",
    r"(?i:(?<![A-Za-z0-9])(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password|passwd"
    r"|pwd|token|authorization|private[_-]?key)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:bearer|basic)\s+)?[^\s\"',;}]{3,})",
    r"\bsk-[A-Za-z0-9_-]{16,}",
    r"\bAKIA[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
]


def config_secrets(cfg: Any) -> list[str]:
    """Every `SecretStr` value in a config (api keys, MCP env and headers, OTLP headers)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            if secret:
                found.append(secret)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(cfg)
    return found


class Redactor:
    """Replaces configured secrets and secret-looking values with `[REDACTED]`."""

    def __init__(self, secrets: Iterable[str] = (), patterns: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        literal = [re.escape(s) for s in sorted(set(secrets), key=len, reverse=True)
                   if len(s) >= 3]
        self._re = re.compile("|".join([*literal, *_PATTERNS, *patterns]))

    def __call__(self, text: str) -> str:
        """The text with every match replaced."""
        return self._re.sub(REDACTED, text)
