"""Model factories for `provider: python` tests (imported by path from the configs)."""

from __future__ import annotations

import asyncio

from swarm.examples.models import RepeatTool
from swarm.models.interface import Model, ModelRequest, ModelResponse, Usage

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


class AnswersOnlyTheWrapUp(Model):
    """Never answers a call that offers tools (it waits on an event nobody sets); answers a
    call that offers none, as the wrap-up call is, with the instruction it was given."""

    async def complete(self, request: ModelRequest) -> ModelResponse:
        if request.tools:
            await asyncio.Event().wait()
        return ModelResponse(content=f"wrapped up: {request.messages[-1]['content']}",
                             tool_calls=[], usage=Usage(input_tokens=1, output_tokens=1))
