"""A tool for the supervisor-crash test: it counts its runs in Redis and holds its turn until
the test releases it. Redis is the session's (`SWARM_PAYMENTS_REDIS`)."""

from __future__ import annotations

import os

import redis.asyncio as redis

from swarm.tools.interface import ToolContext


async def hold(ctx: ToolContext) -> str:
    """Count the run, say it started, then wait for the test's release (not idempotent)."""
    client = redis.Redis.from_url(os.environ["SWARM_PAYMENTS_REDIS"], decode_responses=True)
    try:
        await client.incr(f"held:runs:{ctx.task_id}")
        await client.rpush(f"held:entered:{ctx.task_id}", str(os.getpid()))
        await client.blpop([f"held:release:{ctx.task_id}"], timeout=0)
    finally:
        await client.aclose()
    return "released"
