"""Budgets: limits on steps, model calls, tool calls, tokens, cost and wall clock at task, agent
and swarm level, checked before every model call and every tool call.

How the levels meet: at the start of each turn the supervisor works out what the turn may still
use (`Allowance`): per quantity, the least that the task's limit, the agent's limit (its share of
this task) and the swarm's limit leave. The turn carries it in its `TurnRequest`; the
`BudgetLayer` compares it with the turn's own counters (`Session`) before each call, so the check
is a few comparisons and usage overshoots a limit by at most the one call that crossed it.

The swarm level is approximate across concurrent turns: each turn is given what the swarm had
left when it started, so N turns running at once can together overshoot the swarm's limit by up
to N times what was left (plus one call each). A turn never starts once the swarm's budget is
gone, so the overshoot is bounded by the turns already running. Swarm totals are kept by the
supervisor in memory, since it started (or per fixed `window_s`); a restarted supervisor starts
counting again.

On exhaustion (`budgets.on_exhausted`): `wrap_up` gives the agent one final model call with no
tools and an instruction to answer now (the task then ends COMPLETED marked `budget_exhausted`),
`fail` ends the task FAILED with error class `budget`. The wall clock is also watched while a
call runs: with `wrap_up`, the step loop cuts a model or tool call at the turn's deadline
(swarm.runtime.step), so the wrap-up gets the `wrap_up_grace_s` the supervisor's hard stop
leaves it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarm.runtime.middleware import Middleware, ModelCall, NextModel, NextTool, ToolInvocation
from swarm.runtime.step import budget_stop

if TYPE_CHECKING:
    from swarm.config import Price, SwarmConfig
    from swarm.models.interface import ModelResponse
    from swarm.runtime.step import Session
    from swarm.tools.interface import ToolResult

# Quantities a limit can name (config field max_<name>), in the order they are reported.
QUANTITIES = ("steps", "model_calls", "tool_calls", "tokens", "input_tokens", "output_tokens",
              "cost_usd")


@dataclass(slots=True)
class Usage:
    """What was used: at one level (a task, an agent in a task, the swarm)."""

    steps: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float = 0.0

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        """Add another usage to this one."""
        self.steps += other.steps
        self.model_calls += other.model_calls
        self.tool_calls += other.tool_calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.wall_s += other.wall_s

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters."""
        return {"steps": self.steps, "model_calls": self.model_calls,
                "tool_calls": self.tool_calls, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
                "wall_s": self.wall_s}


@dataclass(slots=True)
class SwarmUsage:
    """The swarm's running totals, since the supervisor started or per fixed window."""

    window_s: float | None = None
    clock: Any = time.time
    used: Usage = field(default_factory=Usage)
    window_start: float | None = None

    def current(self) -> Usage:
        """Totals of the current window (a new window starts from zero)."""
        if self.window_s is not None:
            now = self.clock()
            if self.window_start is None:
                self.window_start = now
            elif now >= self.window_start + self.window_s:
                self.window_start, self.used = now, Usage()
        return self.used

    def add(self, usage: Usage) -> None:
        """Count a finished turn's usage."""
        self.current().add(usage)


@dataclass(slots=True)
class Allowance:
    """What one turn may still use; None is unlimited. `why` names the limit behind each."""

    model_calls: int | None = None
    tool_calls: int | None = None
    tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    deadline: float | None = None
    why: dict[str, str] = field(default_factory=dict)

    def exhausted(self, s: Session, price: Price | None, now: float, *, tool: bool = False
                  ) -> str | None:
        """The limit a turn with counters `s` has reached, if any (`tool`: before a tool call,
        whose counter the loop has already advanced)."""
        if self.model_calls is not None and not tool and s.model_calls >= self.model_calls:
            return self.why["model_calls"]
        if self.tool_calls is not None and s.tool_calls - tool >= self.tool_calls:
            return self.why["tool_calls"]
        if self.tokens is not None and s.input_tokens + s.output_tokens >= self.tokens:
            return self.why["tokens"]
        if self.input_tokens is not None and s.input_tokens >= self.input_tokens:
            return self.why["input_tokens"]
        if self.output_tokens is not None and s.output_tokens >= self.output_tokens:
            return self.why["output_tokens"]
        if self.cost_usd is not None and price is not None and \
                price.cost(s.input_tokens, s.output_tokens, s.cached_tokens) >= self.cost_usd:
            return self.why["cost_usd"]
        if self.deadline is not None and now >= self.deadline:
            return self.why["wall_s"]
        return None


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@functools.lru_cache(maxsize=1024)
def _why(level: str, quantity: str, limit: float) -> str:
    """The text naming one limit, "task max_tool_calls (5)": one string per limit, shared by
    every turn's allowance that names it (a supervisor holds one per running task, and
    pickling a batch of turns for an agent sends a shared string once)."""
    return f"{level} max_{quantity} ({_fmt(limit)})"


_MAX_FIELD = {q: f"max_{q}" for q in (*QUANTITIES, "wall_s")}


def turn_allowance(cfg: SwarmConfig, agent: str, task: Usage, mine: Usage,
                   swarm: Usage, *, now: float, task_deadline: float
                   ) -> tuple[Allowance, int | None, str]:
    """What a turn of `agent` may use given what the task, the agent in this task and the swarm
    have used: the allowance, the steps left (None: no step limit but the task's) and why."""
    levels = (("task", cfg.budgets.task, task), ("agent", cfg.agent_budget(agent), mine),
              ("swarm", cfg.budgets.swarm, swarm))
    out = Allowance()
    steps_left: int | None = None
    steps_why = ""
    for q in QUANTITIES:
        best: float | None = None
        for level, limits, used in levels:
            limit = getattr(limits, _MAX_FIELD[q])
            if limit is None:
                continue
            left = limit - getattr(used, q)
            if best is None or left < best:
                best = left
                reason = _why(level, q, limit)
        if best is None:
            continue
        if q == "steps":
            steps_left, steps_why = int(max(best, 0)), reason
        else:
            setattr(out, q, max(best, 0))
            out.why[q] = reason
    out.deadline, out.why["wall_s"] = task_deadline, \
        _why("task", "wall_s", cfg.budgets.task.max_wall_s)
    agent_wall = cfg.agent_budget(agent).max_wall_s
    if agent_wall is not None and now + agent_wall - mine.wall_s < task_deadline:
        out.deadline = now + agent_wall - mine.wall_s
        out.why["wall_s"] = _why("agent", "wall_s", agent_wall)
    return out, steps_left, steps_why


def swarm_exhausted(cfg: SwarmConfig, swarm: Usage) -> str | None:
    """The swarm limit already reached, if any (no new turn starts then)."""
    limits = cfg.budgets.swarm
    for q in QUANTITIES:
        limit = getattr(limits, _MAX_FIELD[q])
        if limit is not None and getattr(swarm, q) >= limit:
            return _why("swarm", q, limit)
    return None


class BudgetLayer(Middleware):
    """Checks the turn's `Allowance` (in `session.scratch["budget"]`) before every model and
    tool call, and stops the turn (with a wrap-up call, if so configured) when one ran out."""

    def __init__(self, cfg: SwarmConfig, role: str, clock: Any = time.time) -> None:
        self.price = cfg.models[cfg.agents[role].model].price
        self.wrap_up = cfg.budgets.wrap_up_message if cfg.budgets.on_exhausted == "wrap_up" \
            else None
        self.clock = clock

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Refuse the call if the turn's allowance is spent."""
        if not call.final:
            allowance = call.session.scratch.get("budget")
            if allowance is not None:
                why = allowance.exhausted(call.session, self.price, self.clock())
                if why is not None:
                    raise budget_stop(why, self.wrap_up)
        return await nxt(call)

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Refuse the tool call if the turn's allowance is spent."""
        allowance = inv.session.scratch.get("budget")
        if allowance is not None:
            why = allowance.exhausted(inv.session, self.price, self.clock(), tool=True)
            if why is not None:
                raise budget_stop(why, self.wrap_up)
        return await nxt(inv)


def task_usage(rec: Any) -> Usage:
    """A task record's usage so far (swarm.runtime.supervisor.TaskRecord)."""
    return Usage(rec.steps, rec.model_calls, rec.tool_calls, rec.input_tokens,
                 rec.output_tokens, rec.cost_usd)
