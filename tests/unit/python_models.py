"""Model factories for `provider: python` tests (imported by path from the configs)."""

from __future__ import annotations

import asyncio

from swarm.examples.models import RepeatTool
from swarm.models.interface import Model

CLOSED: list[str] = []


class Abstract(Model):
    """A Model subclass that forgot `complete`."""


async def async_factory() -> Model:
    return RepeatTool("echo")


def needs_a_loop() -> Model:
    """Like a model that makes an asyncio object bound to the running loop."""
    asyncio.get_running_loop()
    return RepeatTool("echo")


class ClosesBadly(RepeatTool):
    async def aclose(self) -> None:
        CLOSED.append("bad")
        raise RuntimeError("close failed")


class ClosesSync(RepeatTool):
    def aclose(self) -> None:  # type: ignore[override]  # a plain def, not async
        CLOSED.append("sync")
