"""Rate limits: token buckets per user, per agent role and per model (config `rate_limits`).

Each configured limit is a bucket per key (`key: "*"` means one bucket per user / agent / model,
a name means just that one): it holds up to `burst` and refills at `rate` per `per`. A call takes
one from each bucket that applies (count: requests); a token-counted bucket is debited with the
call's input + output tokens after the call, and a call waits while it is in debt.

With Redis (the swarm's state store, when it is Redis) the buckets live there and one EVALSHA
checks and takes from every bucket of a call atomically, on Redis's clock, so limits hold across
replicas and nodes. A call that must wait takes its tokens now (the bucket goes into debt) and
sleeps for the time the script returns, so waiters are served in order. Over the limit,
`on_limit: wait` waits (never past the turn's deadline) and `reject` refuses at once; both
refusals are `RateLimited` (a `PolicyError`). When the limiter's Redis can't be reached, a
check that involves a `strict` limit fails closed (`RateLimited` too) and any other passes (one
warning per outage).
Without Redis, `MemoryRateLimiter` applies the same buckets within the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarm.errors import PolicyError, RateLimited
from swarm.governance._redis import FastRedis, RedisDown, Script
from swarm.runtime.middleware import Middleware, ModelCall, NextModel, NextTool, ToolInvocation

if TYPE_CHECKING:
    from swarm.config import RateLimitConfig
    from swarm.models.interface import ModelResponse
    from swarm.tools.interface import ToolResult

log = logging.getLogger(__name__)

_RETRY_DOWN_S = 1.0  # after a failure, how long checks skip Redis before trying it again

# KEYS: one per bucket. ARGV: per bucket (rate per s, size, cost, longest wait allowed).
# Returns {granted (0/1), wait in microseconds, index of the bucket that decided (1-based)}.
_TAKE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level, wait, worst = {}, 0, 0
for i = 1, #KEYS do
  local rate, size = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2])
  local cost, limit = tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i])
  local v = redis.call('HMGET', KEYS[i], 'v', 't')
  local l = tonumber(v[1]) or size
  local ts = tonumber(v[2]) or now
  if now > ts then l = math.min(size, l + (now - ts) * rate) end
  level[i] = l
  local w = 0
  if l < cost then w = (cost - l) / rate end
  if w > limit then return {0, math.ceil(w * 1000000), i} end
  if w > wait then wait, worst = w, i end
end
for i = 1, #KEYS do
  local rate, size, cost = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2]),
    tonumber(ARGV[4 * i - 1])
  local l = level[i] - cost
  redis.call('HSET', KEYS[i], 'v', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((size - l) / rate * 1000) + 1000)
end
return {1, math.ceil(wait * 1000000), worst}
""")

# KEYS: buckets; ARGV: per bucket (rate per s, size, amount). Debits after the fact.
_DEBIT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local rate, size, amount = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]),
    tonumber(ARGV[3 * i])
  local v = redis.call('HMGET', KEYS[i], 'v', 't')
  local l = tonumber(v[1]) or size
  local ts = tonumber(v[2]) or now
  if now > ts then l = math.min(size, l + (now - ts) * rate) end
  l = l - amount
  redis.call('HSET', KEYS[i], 'v', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((size - l) / rate * 1000) + 1000)
end
return 0
""")


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket a call draws on: its storage key and the limit it enforces."""

    key: str
    limit: RateLimitConfig
    subject: str  # "user alice", "agent writer", "model big"

    def describe(self) -> str:
        """The limit in words, for errors."""
        lim = self.limit
        what = "requests" if lim.count == "requests" else "tokens"
        return (f"rate limit for {self.subject}: {lim.rate:g} {what} per {lim.per} "
                f"(burst {lim.size:g})")


class RateLimiter(ABC):
    """Where buckets live. `take` returns the seconds to wait before the call may go (the
    tokens are taken), or raises `PolicyError`; `debit` charges a token-counted bucket after a
    call, off the caller's path."""

    @abstractmethod
    async def take(self, buckets: tuple[Bucket, ...], costs: tuple[float, ...],
                   max_waits: tuple[float, ...]) -> float:
        """Take `costs` from `buckets` at once, or none of them if one would wait longer than
        its `max_waits`."""

    @abstractmethod
    async def debit(self, buckets: tuple[Bucket, ...], amount: float) -> None:
        """Charge `amount` to each bucket (it may go into debt)."""

    async def aclose(self) -> None:  # noqa: B027 - documented no-op hook
        """Release connections; the default does nothing."""


def _refused(bucket: Bucket, wait: float, deadline_bound: bool) -> PolicyError:
    if bucket.limit.on_limit == "reject":
        return RateLimited(f"{bucket.describe()} exceeded; retry in {wait:.2f} s "
                           "(on_limit: reject)")
    why = "past the turn's deadline" if deadline_bound else "too long"
    return RateLimited(f"{bucket.describe()} exceeded; the call would wait {wait:.2f} s, {why}")


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process (no Redis): the same arithmetic as the Redis script."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.levels: dict[str, tuple[float, float]] = {}

    def _level(self, b: Bucket, now: float) -> float:
        lim = b.limit
        level, ts = self.levels.get(b.key, (lim.size, now))
        return min(lim.size, level + max(0.0, now - ts) * lim.per_second)

    async def take(self, buckets: tuple[Bucket, ...], costs: tuple[float, ...],
                   max_waits: tuple[float, ...]) -> float:
        """See `RateLimiter.take`."""
        now = self.clock()
        levels = [self._level(b, now) for b in buckets]
        wait = 0.0
        for b, level, cost, limit in zip(buckets, levels, costs, max_waits, strict=True):
            w = (cost - level) / b.limit.per_second if level < cost else 0.0
            if w > limit:
                raise _Over(b, w)
            wait = max(wait, w)
        for b, level, cost in zip(buckets, levels, costs, strict=True):
            self.levels[b.key] = (level - cost, now)
        return wait

    async def debit(self, buckets: tuple[Bucket, ...], amount: float) -> None:
        """See `RateLimiter.debit`."""
        now = self.clock()
        for b in buckets:
            self.levels[b.key] = (self._level(b, now) - amount, now)


class _Over(Exception):
    """A bucket would make the call wait longer than it may."""

    def __init__(self, bucket: Bucket, wait: float) -> None:
        super().__init__(bucket.key)
        self.bucket, self.wait = bucket, wait


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, checked and taken by one Lua script per call (atomic, Redis's clock)."""

    def __init__(self, url: str, *, timeout_s: float = 0.5) -> None:
        self.redis = FastRedis(url, timeout_s=timeout_s)
        self._down_until = 0.0
        self._warned = False

    async def take(self, buckets: tuple[Bucket, ...], costs: tuple[float, ...],
                   max_waits: tuple[float, ...]) -> float:
        """See `RateLimiter.take`; `_Down` when Redis can't be reached."""
        if time.monotonic() < self._down_until:
            raise _Down(self._why)
        args: list[Any] = []
        for b, cost, limit in zip(buckets, costs, max_waits, strict=True):
            args += (repr(b.limit.per_second), repr(b.limit.size), repr(cost),
                     repr(min(limit, 1e9)))
        try:
            granted, wait_us, which = await self.redis.eval(_TAKE, [b.key for b in buckets], args)
        except RedisDown as exc:
            self._down(str(exc))
            raise _Down(str(exc)) from None
        self._up()
        if not granted:
            raise _Over(buckets[int(which) - 1], int(wait_us) / 1e6)
        return int(wait_us) / 1e6

    async def debit(self, buckets: tuple[Bucket, ...], amount: float) -> None:
        """See `RateLimiter.debit` (a debit lost to an outage is only logged)."""
        args: list[Any] = []
        for b in buckets:
            args += (repr(b.limit.per_second), repr(b.limit.size), repr(amount))
        try:
            await self.redis.eval(_DEBIT, [b.key for b in buckets], args)
        except RedisDown as exc:
            self._down(str(exc))

    def _down(self, why: str) -> None:
        self._why = why
        self._down_until = time.monotonic() + _RETRY_DOWN_S
        if not self._warned:
            self._warned = True
            log.warning("rate limiter: %s; strict limits fail closed, the others are open "
                        "until it is back", why)

    def _up(self) -> None:
        if self._warned:
            log.info("rate limiter: redis at %s is back", self.redis)
            self._warned = False

    async def aclose(self) -> None:
        """Close the connections."""
        await self.redis.aclose()


class _Down(Exception):
    """The limiter's store is unreachable."""


class RateLimitLayer(Middleware):
    """Checks the buckets that apply before each model call (and tool call, if configured)."""

    def __init__(self, limits: list[RateLimitConfig], limiter: RateLimiter, *, swarm: str,
                 role: str, model: str, sleep: Any = asyncio.sleep, clock: Any = time.time
                 ) -> None:
        self.limiter = limiter
        self.sleep = sleep
        self.clock = clock
        self._by_user: dict[tuple[str, str], tuple[Bucket, ...]] = {}
        self._limits = [(i, lim) for i, lim in enumerate(limits)
                        if lim.scope == "user" or lim.key in ("*",
                                                              role if lim.scope == "agent"
                                                              else model)]
        self._prefix = f"swarm:rl:{swarm}"
        self._role, self._model = role, model
        self._debits: set[asyncio.Task[None]] = set()
        self.tool_checked = any(lim.calls != "model" for _, lim in self._limits)

    def buckets(self, user: str, kind: str) -> tuple[Bucket, ...]:
        """The buckets a call of `kind` ("model" or "tool") by `user` draws on (cached)."""
        found = self._by_user.get((user, kind))
        if found is None:
            out = []
            for i, lim in self._limits:
                if lim.calls not in (kind, "all"):
                    continue
                if lim.scope == "user" and lim.key not in ("*", user):
                    continue
                subject = {"user": user, "agent": self._role, "model": self._model}[lim.scope]
                out.append(Bucket(f"{self._prefix}:{i}:{lim.scope}:{subject}", lim,
                                  f"{lim.scope} {subject}"))
            found = self._by_user[(user, kind)] = tuple(out)
        return found

    async def _admit(self, buckets: tuple[Bucket, ...], deadline: float | None) -> None:
        room = float("inf") if deadline is None else max(0.0, deadline - self.clock())
        costs = tuple(1.0 if b.limit.count == "requests" else 0.0 for b in buckets)
        waits = tuple(0.0 if b.limit.on_limit == "reject" else room for b in buckets)
        try:
            wait = await self.limiter.take(buckets, costs, waits)
        except _Over as over:
            raise _refused(over.bucket, over.wait, deadline is not None) from None
        except _Down as down:
            strict = [b for b in buckets if b.limit.strict]
            if strict:
                raise RateLimited(f"{strict[0].describe()} can't be checked: {down} "
                                  "(strict: failing closed)") from None
            return
        if wait > 0:
            await self.sleep(wait)

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Wait for (or be refused) the model call's buckets; debit tokens after it."""
        session = call.session
        buckets = self.buckets(session.user, "model")
        if not buckets:
            return await nxt(call)
        await self._admit(buckets, session.scratch.get("deadline"))
        resp = await nxt(call)
        tokens = tuple(b for b in buckets if b.limit.count == "tokens")
        if tokens:
            used = resp.usage.input_tokens + resp.usage.output_tokens
            if used:
                task = asyncio.ensure_future(self._debit(tokens, used))
                self._debits.add(task)
                task.add_done_callback(self._debits.discard)
        return resp

    async def _debit(self, buckets: tuple[Bucket, ...], amount: float) -> None:
        try:
            await self.limiter.debit(buckets, amount)
        except Exception:
            log.debug("rate limit debit failed", exc_info=True)

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Wait for (or be refused) the tool call's buckets."""
        if self.tool_checked:
            buckets = self.buckets(inv.session.user, "tool")
            if buckets:
                await self._admit(buckets, inv.session.scratch.get("deadline"))
        return await nxt(inv)


# One limiter per Redis URL per process (every role's layer shares its connections), and one in
# memory per store object (the roles of one in-process swarm share their buckets); the owner is
# kept with it so its id can't be reused.
_LIMITERS: dict[Any, tuple[Any, RateLimiter]] = {}


def build_rate_limit_layer(cfg: Any, role: str, store: Any = None) -> RateLimitLayer | None:
    """The layer for an agent role, or None when no limit applies to it."""
    if not cfg.rate_limits:
        return None
    from swarm.governance._redis import store_redis_url

    url = store_redis_url(store) if store is not None else None
    key = url or id(store)
    held = _LIMITERS.get(key)
    if held is None:
        held = _LIMITERS[key] = (store, RedisRateLimiter(url) if url else MemoryRateLimiter())
    limiter = held[1]
    agent = cfg.agents[role]
    layer = RateLimitLayer(list(cfg.rate_limits), limiter, swarm=cfg.name, role=role,
                           model=agent.model)
    return layer if layer._limits else None
