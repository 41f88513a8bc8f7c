"""Native function tools for demos and tests (`swarm.examples.tools:echo`, ...)."""

from __future__ import annotations

import asyncio

from swarm.tools.function import tool

MAX_SLOW_S = 30.0


@tool(read_only=True, idempotent=True, inline=True)
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@tool(read_only=True, idempotent=True, inline=True)
def word_count(text: str) -> int:
    """Count the whitespace-separated words in a text."""
    return len(text.split())


def fail(message: str = "boom") -> None:
    """Always raise RuntimeError with the given message (for error-path tests)."""
    raise RuntimeError(message)


@tool(read_only=True, idempotent=True)
async def slow(seconds: float) -> str:
    """Sleep for some seconds (capped at 30) and say how long (for timeout tests)."""
    seconds = max(0.0, min(seconds, MAX_SLOW_S))
    await asyncio.sleep(seconds)
    return f"slept {seconds:g}s"
