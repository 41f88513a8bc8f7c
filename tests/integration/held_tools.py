"""Tools for the supervisor-crash and store-outage tests: they count their runs in Redis and
hold their turn until the test releases it. Redis is the session's (`SWARM_PAYMENTS_REDIS`)."""

from __future__ import annotations

import os

import redis.asyncio as redis

from swarm.tools.function import tool
from swarm.tools.interface import ToolContext


async def _held(ctx: ToolContext, counter: str) -> None:
    """Count the run under `counter`, say it started, then wait for one of the test's
    releases."""
    client = redis.Redis.from_url(os.environ["SWARM_PAYMENTS_REDIS"], decode_responses=True)
    try:
        await client.incr(f"held:{counter}:{ctx.task_id}")
        await client.rpush(f"held:entered:{ctx.task_id}", str(os.getpid()))
        await client.blpop([f"held:release:{ctx.task_id}"], timeout=0)
    finally:
        await client.aclose()


async def hold(ctx: ToolContext) -> str:
    """Count the run, say it started, then wait for the test's release (not idempotent)."""
    await _held(ctx, "runs")
    return "released"


@tool(idempotent=True)
async def wait_here(ctx: ToolContext) -> str:
    """Say it started, then wait for one of the test's releases (idempotent: a resumed turn
    may run it again, and then takes the next release)."""
    await _held(ctx, "waits")
    return "waited"


async def charge(ctx: ToolContext, n: int) -> str:
    """A side effect (not idempotent): counts its runs, per `n`."""
    client = redis.Redis.from_url(os.environ["SWARM_PAYMENTS_REDIS"], decode_responses=True)
    try:
        await client.incr(f"held:charges:{ctx.task_id}:{n}")
    finally:
        await client.aclose()
    return f"charged {n}"
