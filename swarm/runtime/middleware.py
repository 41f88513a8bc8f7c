"""Middleware around the step loop's model and tool calls: where observability and governance
plug in (tracing, metrics, the usage ledger, budgets, stuck detection, approvals, rate limits).

A `Middleware` wraps each model call and each tool call, onion style: it sees the call before
the next layer does (to check a budget, wait on a rate limit, ask for an approval, open a span)
and the result after (to record usage, close the span). The loop composes the layers once per
agent role, so a role with no middleware pays nothing and each layer costs one await.

A layer stops the turn by raising `StopTurn` with the outcome the turn should end with (a
budget stop, a pending approval, a stuck task); any other exception from a model layer fails
the step like a model error, and from a tool layer reaches the model as a tool error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from swarm.models.interface import ModelRequest, ModelResponse, ToolCall
from swarm.tools.interface import ToolContext, ToolResult

if TYPE_CHECKING:
    from swarm.runtime.step import Outcome, Session
    from swarm.runtime.toolbox import ToolEntry


@dataclass(slots=True)
class ModelCall:
    """One model call on its way through the middleware."""

    session: Session
    step: int
    agent: str
    model: str
    request: ModelRequest
    # Scratch space a layer may use to pass things down (a span, a trace context).
    extra: dict[str, Any] = field(default_factory=dict)
    # The wrap-up call after a `StopTurn(..., wrap_up=...)`: limit layers let it through.
    final: bool = False


@dataclass(slots=True)
class ToolInvocation:
    """One tool call on its way through the middleware (after its name and JSON arguments
    were checked: `entry` is the granted tool, `args` the parsed arguments)."""

    session: Session
    step: int
    index: int
    agent: str
    call: ToolCall
    entry: ToolEntry
    args: dict[str, Any]
    ctx: ToolContext
    extra: dict[str, Any] = field(default_factory=dict)


NextModel = Callable[[ModelCall], Awaitable[ModelResponse]]
NextTool = Callable[[ToolInvocation], Awaitable[ToolResult]]


class StopTurn(Exception):
    """Raised by a layer to end the turn now with `outcome`.

    With `wrap_up` (an instruction), the model first gets one final call with no tools and
    that instruction; if it answers, the turn ends `final` with that answer instead (marked
    with the outcome's `budget_exhausted`).
    """

    def __init__(self, outcome: Outcome, wrap_up: str | None = None) -> None:
        super().__init__(outcome.error or outcome.text or outcome.kind)
        self.outcome = outcome
        self.wrap_up = wrap_up


class Middleware:
    """A layer around model and tool calls; the defaults pass calls straight through.

    A layer that keeps a record of every call (swarm.observability.metering) needn't wrap the
    calls for it: it sets `records`, and the step loop hands it one call record per call that
    went through the layers, made from the fields the loop reads for its own events (see
    swarm.runtime.step, `MODEL`). It then wraps only the calls it must act on before they run
    (`wraps_model`, `wraps_tool` False: its `on_model` / `on_tool` is left out of the chain).
    """

    records: Callable[[tuple[Any, ...]], None] | None = None
    wraps_model = True
    wraps_tool = True

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Wrap one model call; must call `nxt(call)` at most once, or raise."""
        return await nxt(call)

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Wrap one tool call; must call `nxt(inv)` at most once, or raise."""
        return await nxt(inv)

    def on_turn_start(self, session: Session) -> None:
        """Called by the agent host before each turn of a session; must be cheap (no I/O)."""

    def on_turn_end(self, session: Session) -> None:
        """Called by the agent host after each turn of a session; must be cheap (no I/O)."""

    async def aclose(self) -> None:
        """Called once when the agent host shuts down: flush what the layer buffers."""


def compose_model(layers: list[Middleware], inner: NextModel) -> NextModel:
    """The model call through every layer whose `on_model` is overridden, outermost first."""
    fn = inner
    for layer in reversed(layers):
        if type(layer).on_model is Middleware.on_model or not layer.wraps_model:
            continue
        fn = _bind_model(layer, fn)
    return fn


def compose_tool(layers: list[Middleware], inner: NextTool) -> NextTool:
    """The tool call through every layer whose `on_tool` is overridden, outermost first."""
    fn = inner
    for layer in reversed(layers):
        if type(layer).on_tool is Middleware.on_tool or not layer.wraps_tool:
            continue
        fn = _bind_tool(layer, fn)
    return fn


# A bound layer is a partial of its method: calling it returns the layer's own coroutine, with
# no wrapper coroutine in between (one frame less per layer and call). Layers name the next
# call's parameter `nxt`.
def _bind_model(layer: Middleware, nxt: NextModel) -> NextModel:
    return partial(layer.on_model, nxt=nxt)


def _bind_tool(layer: Middleware, nxt: NextTool) -> NextTool:
    return partial(layer.on_tool, nxt=nxt)


def build_middleware(cfg: Any, role: str, *, store: Any = None,
                     emit: Callable[[Any], None] | None = None,
                     host: Any = None) -> list[Middleware]:
    """The layers an agent role runs with, outermost first, from the swarm config.

    Order matters: limits are checked closest to the call, so a stopped call costs nothing.
    Tracing, metrics and usage (the metering layer) don't depend on the order: the step loop
    records every call that went through the layers, a stopped one too (a span, no usage), and
    the metering layer wraps calls only where it must act first. Each feature adds its layer
    here when the config asks for it.
    """
    layers: list[Middleware] = []
    from swarm.observability.metering import metering_layer
    from swarm.observability.tracing import swarm_tracer

    # Outermost of the layers it wraps (content capture, MCP calls' spans) around the others.
    meter = metering_layer(cfg, role, store=store, host=host, tracer=swarm_tracer(cfg))
    if meter is not None:
        layers.append(meter)
    from swarm.governance.budget import BudgetLayer
    from swarm.governance.ratelimit import build_rate_limit_layer
    from swarm.governance.stuck import StuckLayer

    limiter = build_rate_limit_layer(cfg, role, store)
    if limiter is not None:
        layers.append(limiter)
    layers.append(BudgetLayer(cfg, role))
    if cfg.stuck.same_call is not None or cfg.stuck.no_progress is not None:
        layers.append(StuckLayer(cfg.stuck))
    from swarm.governance.approvals import build_approval_layer
    from swarm.governance.audit import build_audit_layer

    for layer in (build_audit_layer(cfg, role, store), build_approval_layer(cfg, role)):
        if layer is not None:  # the audit sees each call's outcome, a gate's denial included
            layers.append(layer)
    from swarm.memory.layer import memory_layer

    if (mem := memory_layer(cfg, role, store=store, host=host, emit=emit,
                            ledger=getattr(meter, "ledger", None))):
        layers.insert(0, mem)  # first: a turn's context is primed before any span or limit
    return layers
