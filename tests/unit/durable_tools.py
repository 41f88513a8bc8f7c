"""Tools for the durability tests: they count their runs and can be held mid-call."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from swarm.config import SwarmConfig, parse_config
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


def reset() -> None:
    """Forget runs, holds and entries (an autouse fixture calls this before each test)."""
    RUNS.clear()
    HOLD.clear()
    ENTERED.clear()


def swarm_config(tmp_path: Path, rules: list[dict[str, Any]], *, name: str,
                 agents: dict[str, Any] | None = None, **sections: Any) -> SwarmConfig:
    """A swarm on the scripted policy `rules` with these tools as server `t`: by default agent
    `a` (the tools, a handoff to `b`) and agent `b`, entry `a`; `sections` are added."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"rules": rules}))
    return parse_config({
        "name": name,
        "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
        "tools": {"t": {"python": ["tests.unit.durable_tools:pay",
                                   "tests.unit.durable_tools:lookup"]}},
        "agents": agents or {"a": {"model": "m", "tools": ["t"], "handoffs": ["b"]},
                             "b": {"model": "m"}},
        "supervisor": {"entry": "a"},
        **sections,
    }, base_dir=tmp_path)
