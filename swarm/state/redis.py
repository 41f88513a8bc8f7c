"""`RedisCheckpointer`: task logs, snapshots, ledger and rows in Redis (redis-py asyncio).

Layout under a key prefix (default `swarm`):

- `{p}:t:{task}:log`    LIST of encoded entries; an entry's seq is its index
- `{p}:t:{task}:snap`   HASH seq → encoded snapshot
- `{p}:t:{task}:ledger` HASH idempotency key → encoded ledger record
- `{p}:t:{task}:swarm`  STRING, the swarm whose row it is
- `{p}:s:{swarm}:tasks` HASH task id → encoded row

`append` is one round trip: a Lua script pushes the entries and writes the ledger records
atomically. A connection can fail after Redis applied a write but before the reply arrived, so
each append carries a token: the script records it (for an hour) with the resulting length,
and a retry with the same token returns that length instead of appending twice.

When Redis is unreachable, every operation waits for it with exponential backoff up to
`outage_timeout_s`, logging one WARNING per outage and an INFO when it is back, then raises
`StoreUnavailable`. Nothing is reported durable before Redis acknowledged it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from swarm.state import codec
from swarm.state.interface import (
    Checkpointer,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_APPEND = """
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local n = tonumber(ARGV[2])
local len = redis.call('LLEN', KEYS[1])
if n > 0 then len = redis.call('RPUSH', KEYS[1], unpack(ARGV, 3, 2 + n)) end
if #ARGV > 2 + n then redis.call('HSET', KEYS[2], unpack(ARGV, 3 + n, #ARGV)) end
redis.call('SET', KEYS[3], len, 'EX', 3600)
return len
"""


def redact(url: str) -> str:
    """A URL with its password hidden, for messages."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


class RedisCheckpointer(Checkpointer):
    """The `Checkpointer` on a Redis server."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "swarm", outage_timeout_s: float = 30.0,
                 socket_timeout_s: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.outage_timeout_s = outage_timeout_s
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30,
        )
        self._append = self._client.register_script(_APPEND)
        self._outage_since: float | None = None

    def _k(self, task_id: str, what: str) -> str:
        return f"{self.prefix}:t:{task_id}:{what}"

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        deadline: float | None = None
        while True:
            try:
                result = await op()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.outage_timeout_s
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning("redis at %s unreachable (%s); waiting up to %.0f s for it",
                                redact(self.url), exc, self.outage_timeout_s)
                if now >= deadline:
                    raise StoreUnavailable(
                        f"redis at {redact(self.url)} unreachable for "
                        f"{self.outage_timeout_s:.0f} s: {exc}") from None
                await asyncio.sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, 2.0)
                continue
            if self._outage_since is not None:
                log.info("redis at %s is back after %.1f s", redact(self.url),
                         time.monotonic() - self._outage_since)
                self._outage_since = None
            return result

    async def start(self) -> None:
        """Check that Redis answers; a clear `StoreUnavailable` if it doesn't."""
        try:
            await self._client.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"can't reach redis at {redact(self.url)}: {exc}. Start it, or set "
                "state.store to 'embedded' to run a private one") from None

    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None
    ) -> int:
        """Append entries and ledger records atomically in one round trip."""
        token = uuid.uuid4().hex
        keys = [self._k(task_id, "log"), self._k(task_id, "ledger"),
                f"{self.prefix}:tok:{token}"]
        args: list[Any] = [token, len(entries), *(codec.encode(e) for e in entries)]
        for rec in ledger or ():
            args += [rec.key, codec.encode(rec)]
        length = int(await self._retry(lambda: self._append(keys=keys, args=args)))
        for i, e in enumerate(entries):
            e.seq = length - len(entries) + i
        return length - 1 if entries else -1

    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with after < seq <= upto."""
        start = max(after + 1, 0)
        stop = -1 if upto is None else upto
        if upto is not None and upto < start:
            return []
        raw = await self._retry(lambda: self._client.lrange(self._k(task_id, "log"), start, stop))
        out = []
        for i, data in enumerate(raw, start):
            entry = codec.decode(LogEntry, data, task_id=task_id, what=f"entry {i}")
            entry.seq = i
            out.append(entry)
        return out

    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot, keeping the newest `keep`."""
        key = self._k(snapshot.task_id, "snap")
        data = codec.encode(snapshot)
        await self._retry(lambda: self._client.hset(key, str(snapshot.seq), data))
        seqs = await self.snapshots(snapshot.task_id)
        old = [str(s) for s in seqs[:-keep]] if keep > 0 else []
        if old:
            await self._retry(lambda: self._client.hdel(key, *old))

    async def snapshots(self, task_id: str) -> list[int]:
        """Snapshot seqs, ascending."""
        keys = await self._retry(lambda: self._client.hkeys(self._k(task_id, "snap")))
        return sorted(int(k) for k in keys)

    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot at `seq`, or None."""
        data = await self._retry(lambda: self._client.hget(self._k(task_id, "snap"), str(seq)))
        if data is None:
            return None
        return codec.decode(Snapshot, data, task_id=task_id, what=f"snapshot at entry {seq}")

    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Ledger records by key."""
        raw = await self._retry(lambda: self._client.hgetall(self._k(task_id, "ledger")))
        return {
            k.decode(): codec.decode(LedgerRecord, v, task_id=task_id,
                                     what=f"ledger record {k.decode()}")
            for k, v in raw.items()
        }

    async def put_task(self, row: TaskRow) -> None:
        """Create or replace a task row (and remember which swarm it belongs to)."""
        data = codec.encode(row)

        async def op() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(f"{self.prefix}:s:{row.swarm}:tasks", row.task_id, data)
            pipe.set(self._k(row.task_id, "swarm"), row.swarm)
            return await pipe.execute()

        await self._retry(op)

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task row, or None."""
        swarm = await self._retry(lambda: self._client.get(self._k(task_id, "swarm")))
        if swarm is None:
            return None
        data = await self._retry(
            lambda: self._client.hget(f"{self.prefix}:s:{swarm.decode()}:tasks", task_id))
        return None if data is None else codec.decode(TaskRow, data, task_id=task_id, what="row")

    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Every row of a swarm."""
        raw = await self._retry(lambda: self._client.hgetall(f"{self.prefix}:s:{swarm}:tasks"))
        return [codec.decode(TaskRow, v, task_id=k.decode(), what="row") for k, v in raw.items()]

    async def delete(self, task_id: str) -> None:
        """Remove everything stored for a task."""
        swarm = await self._retry(lambda: self._client.get(self._k(task_id, "swarm")))

        async def op() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(*(self._k(task_id, w) for w in ("log", "snap", "ledger", "swarm")))
            if swarm is not None:
                pipe.hdel(f"{self.prefix}:s:{swarm.decode()}:tasks", task_id)
            return await pipe.execute()

        await self._retry(op)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
