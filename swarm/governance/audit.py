"""The audit log: an append-only record of who did what in a swarm.

Entries (`kind`): `task.submitted`, `task.<terminal state>` (with its error class: a budget stop
is `task.failed` / `task.completed` with `error_class` budget or a `budget_exhausted` detail),
`tool` (tool name, a hash of its arguments, outcome: ok / error / denied / stopped),
`approval.requested`, `approval.approved`, `approval.denied` (who, when, which gate and tool,
the hash of edited arguments).

With Redis (the swarm's state store, when it is Redis) the log is a stream per swarm,
`swarm:audit:<swarm>`, capped with `XADD MAXLEN ~ audit.max_len`. `record` only appends to a
buffer; a flush scheduled `audit.flush_interval_s` later writes the batch in one round trip (a
script that XADDs up to `_PER_SCRIPT` entries a call: one reply to read per call rather than
one per entry), so the step path never waits on it. `archive` moves what the stream holds to
a Parquet file under `<run_dir>/<audit.archive_dir>/<swarm>/` and trims the stream up to it;
`read` reads both. Without Redis the log lives in the process (`MemoryAuditLog`), archived the
same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import NoScriptError, ResponseError

from swarm.governance._redis import FastRedis, RedisDown, Script, store_redis_url
from swarm.runtime.journal import args_hash
from swarm.runtime.middleware import Middleware, NextTool, StopTurn, ToolInvocation
from swarm.state.redis import waitable_reply

if TYPE_CHECKING:
    from swarm.tools.interface import ToolResult

log = logging.getLogger(__name__)

# XADD of each entry (ARGV[3:]) to the stream KEYS[1], then one trim to ~ARGV[1] entries (the
# same cap as `XADD MAXLEN ~` on each, for less work); how many were added. KEYS[2] marks the
# batch as written (for ARGV[2] seconds): a batch sent again after a reply was lost (a timeout,
# a dropped connection) is not added twice.
_XADD_EACH = Script("""
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[1])
return #ARGV - 2
""")
_PER_SCRIPT = 500  # entries per script call: a call blocks the server while it runs
# How long a written batch's mark lasts: a batch retried later than this after its reply was
# lost may be written twice.
_SENT_MARK_S = 1800
_encode = msgspec.json.Encoder().encode  # compact JSON bytes, several times json.dumps' speed


def _entry(e: dict[str, Any]) -> bytes | str:
    """An entry as JSON; what msgspec refuses (a lone surrogate in a detail, an odd value)
    goes through json.dumps, which escapes or stringifies it."""
    try:
        return _encode(e)
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return json.dumps(e, separators=(",", ":"), default=str)

FIELDS = ("ts", "kind", "swarm", "task_id", "user", "agent", "tool", "args_hash", "outcome",
          "gate", "by", "error_class", "detail")
_DETAIL_CHARS = 300


class AuditLog:
    """The in-process audit log; `RedisAuditLog` keeps it in a Redis stream instead."""

    def __init__(self, swarm: str, archive_dir: Path | None = None) -> None:
        self.swarm = swarm
        self.archive_dir = archive_dir
        self.entries: list[dict[str, Any]] = []

    def record(self, kind: str, **fields: Any) -> None:
        """Add an entry (cheap: no I/O here)."""
        entry = {"ts": time.time(), "kind": kind, "swarm": self.swarm}
        for k, v in fields.items():
            if v is not None:
                entry[k] = v if k != "detail" else str(v)[:_DETAIL_CHARS]
        self._add(entry)

    def _add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)

    async def flush(self) -> None:
        """Write buffered entries (nothing to do in process)."""

    async def _live(self) -> list[tuple[str, dict[str, Any]]]:
        return [(str(i), e) for i, e in enumerate(self.entries)]

    async def _trim(self, upto: str) -> None:
        del self.entries[: int(upto) + 1]

    async def archive(self) -> Path | None:
        """Move every live entry to a new Parquet file; its path (None if nothing to move)."""
        await self.flush()
        live = await self._live()
        if not live or self.archive_dir is None:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.archive_dir / self.swarm
        folder.mkdir(parents=True, exist_ok=True)
        rows = [e for _, e in live]
        table = pa.table({f: [_cell(r.get(f), f) for r in rows] for f in FIELDS},
                         schema=_schema())
        path = folder / f"audit-{int(rows[0]['ts'] * 1000)}-{len(rows)}-{time.time_ns()}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.rename(path)  # a reader never sees half a file
        await self._trim(live[-1][0])
        return path

    async def read(self, *, task_id: str | None = None, since: float | None = None,
                   kind: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        """Entries from the archive and the live log, oldest first, filtered."""
        await self.flush()
        rows: list[dict[str, Any]] = []
        if self.archive_dir is not None and (self.archive_dir / self.swarm).is_dir():
            import pyarrow.parquet as pq

            for path in sorted((self.archive_dir / self.swarm).glob("audit-*.parquet")):
                for r in pq.read_table(path).to_pylist():
                    rows.append({k: v for k, v in r.items() if v is not None})
        rows += [e for _, e in await self._live()]
        out = [r for r in rows if (task_id is None or r.get("task_id") == task_id)
               and (since is None or r["ts"] >= since)
               and (kind is None or r["kind"] == kind or r["kind"].startswith(kind + "."))]
        out.sort(key=lambda r: r["ts"])
        return out[-limit:]

    async def aclose(self) -> None:
        """Write what is buffered."""
        await self.flush()


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("ts", pa.float64())] + [(f, pa.string()) for f in FIELDS[1:]])


def _cell(v: Any, name: str) -> Any:
    if v is None or name == "ts":
        return v
    return str(v)


class RedisAuditLog(AuditLog):
    """The audit log as a Redis stream, written in batches off the step path."""

    def __init__(self, url: str, swarm: str, archive_dir: Path | None = None, *,
                 max_len: int = 100_000, flush_interval_s: float = 0.2) -> None:
        super().__init__(swarm, archive_dir)
        self.redis = FastRedis(url, timeout_s=2.0)
        self.key = f"swarm:audit:{swarm}"
        self.max_len = max_len
        self.flush_interval_s = flush_interval_s
        self._buffer: list[dict[str, Any]] = []
        # Batches encoded and sent at least once but not known to be written: each with the
        # mark that makes sending it again harmless (`_XADD_EACH`), oldest first.
        self._unsent: list[tuple[str, list[bytes | str]]] = []
        self._scheduled: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self.dropped = 0

    def _add(self, entry: dict[str, Any]) -> None:
        self._buffer.append(entry)
        if self._scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the next flush() writes it
            self._scheduled = loop.call_later(self.flush_interval_s, self._kick)

    def _kick(self) -> None:
        self._scheduled = None
        self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Write the buffer in one round trip: a script call per `_PER_SCRIPT` entries, each
        batch marked so that sending it again after a lost reply doesn't add it twice."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            batch, self._buffer = self._buffer, []
            if batch:
                entries = [_entry(e) for e in batch]
                for i in range(0, len(entries), _PER_SCRIPT):
                    self._unsent.append((os.urandom(8).hex(), entries[i:i + _PER_SCRIPT]))
            if not self._unsent:
                return
            sending = list(self._unsent)
            cmds = [("EVALSHA", _XADD_EACH.sha, 2, self.key, f"{self.key}:sent:{mark}",
                     self.max_len, _SENT_MARK_S, *chunk) for mark, chunk in sending]
            try:
                try:
                    await self.redis.execute(cmds)
                except NoScriptError:  # a new or restarted server: none of the calls ran
                    await self.redis.execute([("SCRIPT", "LOAD", _XADD_EACH.source)])
                    await self.redis.execute(cmds)
            except (RedisDown, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not waitable_reply(exc):
                    # Refused for good (not a server that can't write for now): kept, they
                    # would be refused at every flush and hold back the ones after them.
                    lost = sum(len(chunk) for _, chunk in sending)
                    del self._unsent[:len(sending)]
                    self.dropped += lost
                    log.error("audit log: redis refused %d entries: %s", lost, exc)
                    return
                # The audit log must not stop the swarm: keep the batches for the next flush
                # (the same marks: any the server did write are not written again), bounded,
                # and say so.
                waiting = sum(len(chunk) for _, chunk in self._unsent)
                while waiting > self.max_len and self._unsent:
                    _, chunk = self._unsent.pop(0)
                    waiting -= len(chunk)
                    self.dropped += len(chunk)
                log.warning("audit log: %s; %d entries waiting", exc, waiting)
                return
            del self._unsent[:len(sending)]

    async def _live(self) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        start = "-"
        while True:
            (page,) = await self.redis.execute([("XRANGE", self.key, start, "+", "COUNT", 1000)])
            for sid, fields in page:
                flat = dict(zip(fields[::2], fields[1::2], strict=True))
                out.append((sid.decode(), json.loads(flat[b"e"])))
            if len(page) < 1000:
                return out
            start = "(" + page[-1][0].decode()

    async def _trim(self, upto: str) -> None:
        ms, _, seq = upto.partition("-")
        await self.redis.execute([("XTRIM", self.key, "MINID", f"{ms}-{int(seq) + 1}")])

    async def aclose(self) -> None:
        """Flush and close the connections."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        await self.flush()
        await self.redis.aclose()


# One audit log per (store, swarm) per process: the supervisor and the agent hosts of one swarm
# in one process share it; the owner is held so its id can't be reused.
_LOGS: dict[Any, tuple[Any, AuditLog]] = {}


def audit_log(cfg: Any, store: Any = None) -> AuditLog | None:
    """The swarm's audit log for this process (None when audit is disabled)."""
    acfg = cfg.audit
    if not acfg.enabled:
        return None
    url = store_redis_url(store) if store is not None else None
    key = (url or id(store), cfg.name)
    held = _LOGS.get(key)
    if held is None:
        archive = Path(cfg.state.run_dir) / acfg.archive_dir
        made: AuditLog = RedisAuditLog(url, cfg.name, archive, max_len=acfg.max_len,
                                       flush_interval_s=acfg.flush_interval_s) if url \
            else AuditLog(cfg.name, archive)
        held = _LOGS[key] = (store, made)
    return held[1]


class AuditLayer(Middleware):
    """Records every tool call: name, argument hash, outcome."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Run the call, then record it."""
        outcome = "stopped"
        try:
            result = await nxt(inv)
            outcome = "ok" if not result.is_error else (
                "denied" if result.content.startswith("denied by ") else "error")
            return result
        except StopTurn as stop:
            outcome = "gated" if stop.outcome.gate is not None else "stopped"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            s = inv.session
            self.audit.record("tool", task_id=s.task_id, user=s.user or None, agent=inv.agent,
                              tool=inv.call.name, args_hash=args_hash(inv.call.arguments),
                              outcome=outcome)


def build_audit_layer(cfg: Any, role: str, store: Any = None) -> AuditLayer | None:
    """The layer recording an agent role's tool calls, or None when audit is off."""
    audit = audit_log(cfg, store)
    return AuditLayer(audit) if audit is not None else None


# What `read(kind=...)` can name: a whole kind, or a prefix of kinds.
KINDS = ("task", "task.submitted", "task.completed", "task.failed", "task.canceled",
         "task.rejected", "tool", "approval", "approval.requested", "approval.approved",
         "approval.denied")


def kind_problem(kind: str | None) -> str | None:
    """Why `kind` names no audit entries at all (a typo, say), or None."""
    if kind is None or kind in KINDS:
        return None
    return f"unknown audit kind {kind!r}; one of {', '.join(KINDS)}"


def parse_since(text: str, now: float | None = None) -> float:
    """A time filter: an ISO date/time, or an age such as 30s, 15m, 2h, 7d; unix seconds."""
    from datetime import datetime

    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t[-1:] in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1]]
    try:
        return datetime.fromisoformat(t).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an age such as 30m, 2h, 7d or an ISO "
                         "date/time such as 2026-11-26T09:00") from None
