"""Tools for the budget and stuck-detection tests: one that can be held mid-call, and one that
delegates a sub-task to the swarm and waits for it (the way a deadlock forms)."""

from __future__ import annotations

import asyncio
from typing import Any

from swarm.tools.interface import ToolContext

HOLD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}
SUPERVISOR: list[Any] = []  # the test's supervisor, for `delegate`


async def hold(key: str) -> str:
    """Wait until the test releases `key`."""
    if key in ENTERED:
        ENTERED[key].set()
    if key in HOLD:
        await HOLD[key].wait()
    return f"held {key}"


async def delegate(text: str, ctx: ToolContext) -> str:
    """Submit `text` as a sub-task of this task and wait for its outcome."""
    sup = SUPERVISOR[0]
    child = await sup.submit(text, metadata={"parent_task": ctx.task_id})
    row = await sup.wait(child, None)
    return f"sub-task {row['state']}: {row['answer'] or row['error']}"
