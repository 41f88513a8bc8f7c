"""The trace store the swarm keeps itself: finished spans per task, so `swarm trace TASK` works
with no collector.

Spans reach it through `StoreExporter` (behind a `BatchSpanProcessor`, so writes are batched
and happen on the processor's thread, never on the step path). Every actor process writes its
own spans; the supervisor reads a task's spans back with one lookup:

- `RedisTraceStore`: one LIST per task, `{prefix}:trace:{task}`, with a TTL; one pipelined
  round trip per batch (two when a list turns out new and its TTL must be set). Used whenever
  the swarm's state store is Redis (embedded or a URL).
- `JsonlTraceStore`: one JSONL file per task under a directory (the run dir), for swarms with no
  Redis; only processes on the same machine (or a shared filesystem) see each other's spans.
- `MemoryTraceStore`: in this process, for tests and `LocalSwarm`.

A stored span is a compact row: name, trace/span/parent ids (hex), kind, start/end (epoch
seconds), status, error and attributes. The per-step spans (`chat`, `execute_tool`) are stored
more compactly still: the metering layer's call records as they are, one element per task and
drained batch of an agent's calls (`CALLS`), expanded into rows when read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode
from redis.exceptions import ResponseError

from swarm.state.redis import _pack

log = logging.getLogger(__name__)

TASK_ATTR = "swarm.task.id"
_MAX_ROWS = 100_000  # per task read
_EXPIRES_KEPT = 100_000  # tasks whose TTL refresh time a trace store remembers
_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
_KINDS = {0: "internal", 1: "server", 2: "client", 3: "producer", 4: "consumer"}


def span_row(span: ReadableSpan) -> dict[str, Any]:
    """The compact, JSON-ready row of a finished span (on the export thread, per span: kept
    lean, as its cost competes with the event loop for the GIL)."""
    ctx = span.context
    parent = span.parent
    status = span.status
    code = status.status_code
    attrs = span._attributes  # the SDK's own mapping, or the plain dict swarm's spans carry
    return {
        "name": span.name,
        "trace": format(ctx.trace_id, "032x"),
        "span": format(ctx.span_id, "016x"),
        "parent": format(parent.span_id, "016x") if parent is not None else None,
        "kind": _KINDS.get(span.kind.value, str(span.kind.value)),
        "start": (span.start_time or 0) / 1e9,
        "end": (span.end_time or span.start_time or 0) / 1e9,
        "status": "error" if code is StatusCode.ERROR
        else ("ok" if code is StatusCode.OK else "unset"),
        "error": status.description,
        "attrs": attrs if type(attrs) is dict else dict(attrs or {}),  # tuples encode as lists
    }


# The spans the swarm records itself are stored as compact JSON arrays, written at a fraction of
# the cost of a full row and expanded to one when read. A per-task or per-turn span
# (`invoke_workflow`, `SendMessage`, `invoke_agent`) is ["s", trace id, span id, parent span id,
# start ns, end ns, status, error, name, kind, attributes]. The per-step spans (`chat`,
# `execute_tool`, one or more a step) are the metering layer's call records behind a few ids,
# and leave out the attributes every such span has. Fields:
#  0 "c" (chat) | "t" (execute_tool)   1 trace id   2 span id   3 parent span id   4 task id
#  5 conversation id   6 step   7 agent   8 provider (chat)   9 cost (chat)   10 start ns
#  11 end ns   12 outcome: ok | error | canceled | stopped   13 error class   14 error (status
#  "error" when set)   15 stopped (a StopTurn's kind)   16 captured input   17 captured output
# chat:          18 request model  19 response model  20 finish reason  21 tool calls
#                22 input  23 output  24 cached tokens  25 wrap-up
# execute_tool:  18 tool  19 call id  20 server


def step_row(c: list[Any]) -> dict[str, Any]:
    """The full row (as `span_row` makes it) of a compact span."""
    if c[0] == "s":
        return {"name": c[8], "trace": c[1], "span": c[2], "parent": c[3], "kind": c[9],
                "start": c[4] / 1e9, "end": c[5] / 1e9, "status": c[6], "error": c[7],
                "attrs": c[10]}
    if c[0] == "c":
        name, kind = "chat " + c[18], "client"
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": c[8],
            "gen_ai.request.model": c[18], "gen_ai.agent.name": c[7],
            "gen_ai.conversation.id": c[5], TASK_ATTR: c[4], "swarm.step": c[6]}
        if c[25]:
            attrs["swarm.wrap_up"] = True
        if c[16] is not None:
            attrs["gen_ai.input.messages"] = c[16]
        if c[12] == "ok":
            attrs["gen_ai.response.model"] = c[19]
            attrs["gen_ai.response.finish_reasons"] = [c[20]]
            attrs["gen_ai.usage.input_tokens"] = c[22]
            attrs["gen_ai.usage.output_tokens"] = c[23]
            attrs["gen_ai.usage.cache_read.input_tokens"] = c[24]
            attrs["swarm.cost_usd"] = c[9]
            attrs["swarm.tool_calls"] = c[21]
            if c[17] is not None:
                attrs["gen_ai.output.messages"] = c[17]
    else:
        name, kind = "execute_tool " + c[18], "internal"
        attrs = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": c[18],
            "gen_ai.tool.call.id": c[19], "gen_ai.tool.type": "function",
            "gen_ai.agent.name": c[7], "gen_ai.conversation.id": c[5],
            "swarm.tool.server": c[20], TASK_ATTR: c[4], "swarm.step": c[6]}
        if c[16] is not None:
            attrs["gen_ai.tool.call.arguments"] = c[16]
        if c[17] is not None:
            attrs["gen_ai.tool.call.result"] = c[17]
    if c[15] is not None:
        attrs["swarm.stopped"] = c[15]
    failed = c[14] is not None
    if failed:
        attrs["error.type"] = c[13] or "error"
    return {"name": name, "trace": c[1], "span": c[2], "parent": c[3], "kind": kind,
            "start": c[10] / 1e9, "end": c[11] / 1e9, "status": "error" if failed else "unset",
            "error": c[14], "attrs": attrs}


# The compact spans a process writes for one task in one flush, other than call records (the
# `invoke_agent` spans that ended; the per-step spans too, in elements stored before `CALLS`),
# are stored as one element, a chunk: [CHUNK, compact span, compact span, ...].
CHUNK = "b"


# One agent's calls of one task, from one drained batch: the call records as the metering layer
# keeps them (the layout is in `swarm.runtime.step`, above `MODEL`: fields 0 kind (0 model,
# 1 tool), 1 task, 2 conversation, 3 user, 4 step, 5 [trace id, parent span id], 6 span id
# (0: none yet), then from 7 on the compact span's fields from 10 on) and each call's cost:
#   [CALLS, agent, provider, base span id (16 hex digits), [record, ...], [cost, ...]]
# Written with no work per call beyond grouping by task. A record with no span id of its own
# gets the one `_nth_span_id` derives from the chunk's random base and its place in the chunk.
CALLS = "k"
_SPAN_IDS = 2**64 - 1  # span ids are 1 .. 2**64 - 1 (all zeros is no span id)


def _nth_span_id(base: int, i: int) -> str:
    return format((base + i) % _SPAN_IDS + 1, "016x")


def call_chunk(agent: str, provider: str, records: list[Any], costs: list[float]
               ) -> list[Any]:
    """The stored element (`CALLS`) of one agent's calls of one task, with a new base span
    id."""
    return [CALLS, agent, provider, os.urandom(8).hex(), records, costs]


def call_spans(chunk: list[Any]) -> list[list[Any]]:
    """The compact spans (`step_row`'s layout) of a `CALLS` chunk."""
    _, agent, provider, base, records, costs = chunk
    if not (type(base) is str and len(base) == 16 and type(records) is list
            and type(costs) is list and len(records) == len(costs)):
        raise TypeError("a chunk of calls needs a base span id and a cost per record")
    b = int(base, 16)
    out = []
    for i, (r, cost) in enumerate(zip(records, costs, strict=True)):
        trace, parent = r[5]
        span = format(r[6], "016x") if r[6] else _nth_span_id(b, i)
        if r[0] == 0:
            head = ["c", trace, span, parent, r[1], r[2], r[4], agent, provider, cost]
        elif r[0] == 1:
            head = ["t", trace, span, parent, r[1], r[2], r[4], agent, None, None]
        else:
            raise TypeError(f"a call record of unknown kind {r[0]!r}")
        out.append(head + list(r[7:]))
    return out


def _decode(data: bytes) -> list[dict[str, Any]]:
    """The rows of a stored element: a full row, a compact span expanded, or a chunk's spans
    expanded."""
    row = _decode_any(data)
    if type(row) is dict:
        return [row]
    if type(row) is list and row:
        try:
            if row[0] == CALLS:
                return [step_row(c) for c in call_spans(row)]
            if row[0] == CHUNK:
                spans = row[1:]
                if not all(type(c) is list and c and c[0] in ("c", "t", "s") for c in spans):
                    raise TypeError("a chunk holds compact spans only")
                return [step_row(c) for c in spans]
            if row[0] in ("c", "t", "s"):
                return [step_row(row)]
        except (IndexError, TypeError, KeyError, ValueError) as exc:
            raise msgspec.DecodeError(f"a malformed step span: {exc}") from None
    raise msgspec.DecodeError("not a span row")


def _rows(elements: Sequence[bytes], *, skip_bad: bool = False) -> list[dict[str, Any]]:
    """The rows of stored elements in order, the newest `_MAX_ROWS` at most (elements are
    decoded newest first, and no further than that); with `skip_bad`, an element that doesn't
    decode (a torn last line) is left out."""
    parts: list[list[dict[str, Any]]] = []
    n = 0
    for data in reversed(elements):
        try:
            rows = _decode(data)
        except msgspec.DecodeError:
            if not skip_bad:
                raise
            continue
        parts.append(rows)
        n += len(rows)
        if n >= _MAX_ROWS:
            break
    out = [row for rows in reversed(parts) for row in rows]
    return out[-_MAX_ROWS:]


class TraceStore(ABC):
    """Where finished spans are kept per task. `append` runs on an exporter thread (blocking
    I/O is fine there); `read` returns a task's rows in the order they were written."""

    @abstractmethod
    def append(self, rows: dict[str, list[bytes]]) -> None:
        """Add encoded elements (a row, or a chunk of a flush's step spans), grouped by task
        id."""

    @abstractmethod
    def read(self, task_id: str) -> list[dict[str, Any]]:
        """A task's span rows (empty if none)."""

    def close(self) -> None:  # noqa: B027 - documented no-op hook
        """Release connections; the default does nothing."""


class MemoryTraceStore(TraceStore):
    """Spans in this process (tests, `LocalSwarm`)."""

    def __init__(self) -> None:
        self._rows: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()

    def append(self, rows: dict[str, list[bytes]]) -> None:
        """Keep the rows."""
        with self._lock:
            for task_id, batch in rows.items():
                self._rows.setdefault(task_id, []).extend(batch)

    def read(self, task_id: str) -> list[dict[str, Any]]:
        """A task's rows (the newest `_MAX_ROWS` at most)."""
        with self._lock:
            return _rows(self._rows.get(task_id, ()))


class RedisTraceStore(TraceStore):
    """Spans in Redis: a LIST per task with a TTL, set by the first write and refreshed by
    writes at least a hundredth of the TTL after the last refresh (not by every write: that was
    a command for each task in every flush)."""

    def __init__(self, url: str, *, prefix: str = "swarm", ttl_s: float = 7 * 86400,
                 timeout_s: float = 5.0) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.ttl_s = max(1, int(ttl_s))
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._refresh_s = self.ttl_s / 100
        # Task id -> when its TTL was last set (monotonic), oldest first. `append` runs on the
        # step-span thread and the exporter's at once: the lock guards this.
        self._expires: OrderedDict[str, float] = OrderedDict()
        self._expires_lock = threading.Lock()

    def key(self, task_id: str) -> str:
        """The LIST holding a task's spans."""
        return f"{self.prefix}:trace:{task_id}"

    def append(self, rows: dict[str, list[bytes]]) -> None:
        """One round trip: RPUSH per task, and EXPIRE where the TTL is due, packed by
        `swarm.state.redis._pack` (a few times cheaper than redis-py's pipeline, on the thread
        that writes every span); a second one only to set the TTL of a list that turned out to
        be new (gone since its TTL was last set)."""
        commands: list[tuple[Any, ...]] = []
        now, expires, due, expiring = time.monotonic(), self._expires, [], set()
        with self._expires_lock:
            for task_id, batch in rows.items():
                key = self.key(task_id)
                commands.append((b"RPUSH", key, *batch))
                last = expires.get(task_id)
                if last is None or now - last >= self._refresh_s:
                    commands.append((b"EXPIRE", key, self.ttl_s))
                    due.append(task_id)
                    expiring.add(key)
        pool = self._redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([_pack(commands)], check_health=False)
            errors, fresh = [], []
            for cmd in commands:
                try:
                    reply = conn.read_response()
                except ResponseError as exc:  # read, so the connection stays in step
                    errors.append(exc)
                    continue
                if cmd[0] == b"RPUSH" and reply == len(cmd) - 2 and cmd[1] not in expiring:
                    fresh.append(cmd[1])  # a new list (the old one expired or was removed)
            if fresh:
                again = [(b"EXPIRE", key, self.ttl_s) for key in fresh]
                conn.send_packed_command([_pack(again)], check_health=False)
                for _ in again:
                    conn.read_response()
        except BaseException:
            conn.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            pool.release(conn)
        if errors:
            raise errors[0]
        with self._expires_lock:
            for task_id in due:  # written: the TTLs are set
                expires[task_id] = now
                expires.move_to_end(task_id)
            while len(expires) > _EXPIRES_KEPT:
                expires.popitem(last=False)  # the longest unrefreshed: set again if written

    def read(self, task_id: str) -> list[dict[str, Any]]:
        """A task's rows (the newest `_MAX_ROWS` at most)."""
        return _rows(self._redis.lrange(self.key(task_id), -_MAX_ROWS, -1))

    def close(self) -> None:
        """Close the connection pool."""
        self._redis.close()


_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class JsonlTraceStore(TraceStore):
    """Spans as one JSONL file per task under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def path(self, task_id: str) -> Path:
        """The file of a task (ids that aren't safe file names are hashed)."""
        name = task_id.replace("/", "_")
        if not _SAFE.match(name) or name.startswith("."):
            name = hashlib.sha256(task_id.encode()).hexdigest()[:32]
        return self.directory / f"{name}.jsonl"

    def append(self, rows: dict[str, list[bytes]]) -> None:
        """Append each task's rows to its file."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            for task_id, batch in rows.items():
                with self.path(task_id).open("ab") as f:
                    f.write(b"\n".join(batch) + b"\n")

    def read(self, task_id: str) -> list[dict[str, Any]]:
        """A task's rows; a torn last line (a writer that died mid-write: one span, or one
        flush's chunk of step spans) is skipped."""
        try:
            data = self.path(task_id).read_bytes()
        except FileNotFoundError:
            return []
        return _rows(data.splitlines()[-_MAX_ROWS:], skip_bad=True)


def open_trace_store(spec: str | None, run_dir: Path, *, ttl_s: float) -> TraceStore:
    """The trace store for a swarm whose state store is `spec` (a resolved URL or None)."""
    scheme = (spec or "").partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        assert spec is not None
        return RedisTraceStore(spec, ttl_s=ttl_s)
    if spec == "memory":
        return MemoryTraceStore()
    return JsonlTraceStore(Path(run_dir) / "traces" / "tasks")


class StoreExporter(SpanExporter):
    """A `SpanExporter` into a `TraceStore`: spans with a task id, grouped per task."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Write one batch; a store that is down fails the batch (counted by the processor)."""
        rows: dict[str, list[bytes]] = {}
        for span in spans:
            task_id = (span.attributes or {}).get(TASK_ATTR)
            if not isinstance(task_id, str):
                continue
            rows.setdefault(task_id, []).append(_encode(span_row(span)))
        if not rows:
            return SpanExportResult.SUCCESS
        try:
            self.store.append(rows)
        except Exception as exc:
            log.debug("trace store write failed: %s", exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Close the store."""
        self.store.close()
