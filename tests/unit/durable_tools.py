"""Tools for the durability tests: they count their runs and can be held mid-call."""

from __future__ import annotations

import asyncio
from collections import Counter

from swarm.tools.function import tool

RUNS: Counter[str] = Counter()
HOLD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}


async def _maybe_hold(key: str) -> None:
    RUNS[key] += 1
    if key in ENTERED:
        ENTERED[key].set()
    if key in HOLD:
        await HOLD[key].wait()


async def pay(key: str) -> str:
    """A side effect that must not happen twice (not idempotent)."""
    await _maybe_hold(key)
    return f"paid {key}"


@tool(idempotent=True)
async def lookup(key: str) -> str:
    """A call that may safely run again (idempotent)."""
    await _maybe_hold(key)
    return f"found {key}"
