"""A payment tool with a real side effect in Redis, for the exactly-once demos and tests.

`charge` applies a charge at most once per idempotency key: the key swarm passes in
`ToolContext.idempotency_key` (or an MCP call's `_meta`) is the same for every attempt of one
logical call, so a call that a resumed task sends again after a crash finds its earlier result
instead of charging twice. That is why it may be declared idempotent. `charge_once_unsafe`
charges on every invocation and is not idempotent: after a crash mid-call swarm asks an
operator before running it again.

Each applied charge is pushed on the list `payments:progress`, so a test can wait for
progress with BLPOP instead of polling. Both count every invocation (`invocations:<key>`)
and every applied effect (`effects:<key>`), so a test can check that no logical call took
effect twice. The Redis URL comes from
`SWARM_PAYMENTS_REDIS` (default `redis://127.0.0.1:6379/0`).
"""

from __future__ import annotations

import os

import redis.asyncio as redis

from swarm.tools.function import tool
from swarm.tools.interface import ToolContext

_clients: dict[str, redis.Redis] = {}

# Applies the charge and records its result in one atomic step, unless the key already has one.
_CHARGE = """
redis.call('INCR', KEYS[3])
local done = redis.call('GET', KEYS[1])
if done then return done end
local balance = redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[4])
redis.call('RPUSH', 'payments:progress', KEYS[1])
local result = 'charged ' .. ARGV[1] .. ', balance ' .. balance
redis.call('SET', KEYS[1], result)
return result
"""


def _client() -> redis.Redis:
    url = os.environ.get("SWARM_PAYMENTS_REDIS", "redis://127.0.0.1:6379/0")
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(url, decode_responses=True)
    return client


@tool(idempotent=True)
async def charge(account: str, amount: int, ctx: ToolContext) -> str:
    """Charge `amount` to `account`, at most once per logical call."""
    if amount <= 0:
        raise ValueError("amount must be positive")
    key = ctx.idempotency_key or ctx.call_id
    result = await _client().eval(
        _CHARGE, 4, f"charge:{key}", f"balance:{account}", f"invocations:{key}",
        f"effects:{key}", amount,
    )
    return str(result)


async def charge_once_unsafe(account: str, amount: int, ctx: ToolContext) -> str:
    """Charge `amount` to `account` on every invocation (not idempotent)."""
    key = ctx.idempotency_key or ctx.call_id
    client = _client()
    pipe = client.pipeline(transaction=True)
    pipe.incr(f"invocations:{key}")
    pipe.incr(f"effects:{key}")
    pipe.incrby(f"balance:{account}", amount)
    pipe.rpush("payments:progress", key)
    _, _, balance, _ = await pipe.execute()
    return f"charged {amount}, balance {balance}"
