"""`FallbackModel`: a chain of models tried in order when one fails after its retries."""

from __future__ import annotations

import asyncio
import logging

from swarm.errors import ModelCallError, ModelError
from swarm.models.interface import Model, ModelRequest, ModelResponse

__all__ = ["FallbackModel", "falls_back"]

log = logging.getLogger(__name__)


def falls_back(exc: BaseException) -> bool:
    """Whether another model may answer where this failure happened.

    Yes for a server that is down, slow or overloaded (a `ModelCallError` marked transient:
    timeouts, connection errors, 408, 429, 5xx) and for unexpected client crashes; no for a
    request the server refused (other 4xx), a prompt too long (`ContextLimitError`) or a
    scripted policy that can't answer: the next model would be sent the same request.
    """
    if isinstance(exc, ModelCallError):
        return exc.transient
    return not isinstance(exc, ModelError)


class FallbackModel(Model):
    """Tries `models` in order; the answer's `model` is the configured name of who answered."""

    def __init__(self, models: list[Model]) -> None:
        if not models:
            raise ValueError("FallbackModel needs at least one model")
        self.models = models
        self.name = models[0].name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Ask each model in turn until one answers; raise naming every failure if none does."""
        failures: list[str] = []
        last: BaseException | None = None
        for model in self.models:
            try:
                resp = await model.complete(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not falls_back(exc):
                    raise
                failures.append(f"{model.name}: {exc}")
                last = exc
                continue
            if failures:
                log.warning("agent %s: %s answered after %s", request.agent, model.name,
                            "; ".join(failures))
            resp.model = model.name
            return resp
        raise ModelError(f"every model in the fallback chain failed: {'; '.join(failures)}"
                         ) from last

    async def prepare(self) -> None:
        """Prepare every model of the chain."""
        await asyncio.gather(*(model.prepare() for model in self.models))

    async def aclose(self) -> None:
        """Close every model of the chain."""
        for model in self.models:
            await model.aclose()
