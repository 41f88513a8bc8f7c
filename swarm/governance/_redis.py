"""A small, fail-fast Redis client for governance (rate limits, the audit stream).

The checkpointer's client (swarm.state.redis) waits out an outage for up to 30 s, which is right
for durable state and wrong for a rate limiter that must decide at once whether to fail open or
closed. This one speaks RESP on redis-py `Connection`s (made from the URL by redis-py, so TCP,
TLS, Unix sockets, passwords and db numbers work) with explicit socket timeouts, keeps a few
idle connections, and raises `RedisDown` on the first failure; callers decide what that means.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

from swarm.state.redis import _exchange, redact

_TRANSIENT = (RedisError, TimeoutError, OSError)


class RedisDown(Exception):
    """Redis could not be reached (or timed out) for this call."""


def store_redis_url(store: Any) -> str | None:
    """The Redis URL behind a checkpointer, if it has one (a tiered store's hot tier counts)."""
    for candidate in (store, getattr(store, "hot", None)):
        url = getattr(candidate, "url", None)
        if isinstance(url, str) and url.split("://", 1)[0].lower() in ("redis", "rediss", "unix"):
            return url
    return None


class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class FastRedis:
    """Round trips on pooled raw connections, each bounded by `timeout_s`."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_idle: int = 8) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._pool = ConnectionPool.from_url(url, protocol=2, socket_timeout=timeout_s,
                                             socket_connect_timeout=timeout_s)
        self._idle: list[AbstractConnection] = []
        self._max_idle = max_idle

    def __repr__(self) -> str:
        return f"FastRedis({redact(self.url)!r})"

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send commands in one write, return their replies; `RedisDown` if Redis can't answer,
        `ResponseError` for an error reply."""
        conn = self._idle.pop() if self._idle else self._pool.make_connection()
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await _exchange(conn, commands)
        except ResponseError:
            await self._keep(conn)
            raise
        except _TRANSIENT as exc:
            await conn.disconnect(nowait=True)
            raise RedisDown(f"redis at {redact(self.url)}: {str(exc) or type(exc).__name__}"
                            ) from None
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        await self._keep(conn)
        return replies

    async def eval(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script first if the server doesn't know it."""
        try:
            return (await self.execute([("EVALSHA", script.sha, len(keys), *keys, *args)]))[0]
        except NoScriptError:
            await self.execute([("SCRIPT", "LOAD", script.source)])
            return (await self.execute([("EVALSHA", script.sha, len(keys), *keys, *args)]))[0]

    async def _keep(self, conn: AbstractConnection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Close idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect(nowait=True)
