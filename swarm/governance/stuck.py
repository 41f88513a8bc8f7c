"""Stuck detection: a task that repeats itself, makes no progress, bounces between two agents,
waits too long, or waits on itself through other tasks (deadlock).

Detectors, thresholds in config `stuck:` (null disables one):

- `same_call: N` — the N-th call of one tool with the same arguments (compared as canonical
  JSON) in a task is stuck; it does not run. Checked by `StuckLayer` before each tool call.
- `no_progress: N` — a step (one model answer with tool calls, handoffs aside) brings no new
  information when every tool result it got (tool name and exact content, errors included)
  already appeared earlier in the task. After N such steps in a row the next model call is
  refused. Checked by `StuckLayer` before each model call.
- `ping_pong: N` — N handoffs in a row alternating between the same two agents (A→B, B→A, ...);
  the next turn doesn't start. Checked by the supervisor at each handoff (`bounces`).
- `input_timeout_s` — a task waiting in INPUT_REQUIRED longer than this fails.
- `queue_timeout_s` — a turn waiting longer than this for a session slot of an agent replica
  (all `max_sessions` busy) fails (`StuckError` from the agent host).
- `deadlock` — a cycle in the wait-for graph of tasks (`WaitGraph`): a task *waits on* another
  when (a) it was submitted as a sub-task (metadata `parent_task`) by a tool call of that task,
  whose turn is still running (the parent's tool waits for its result), or (b) its turn is
  queued for a session slot of an agent replica, where it waits on each task holding one of that
  replica's slots. Handoffs and parallel branches never hold a slot while they wait (a handoff
  ends the turn; a join starts after its branches ended), so in this codebase a cycle needs a
  task that waits on another from inside a turn. The task whose turn would close the cycle is
  stopped, which breaks it.

A detection counts once in `counts()` (for the metrics), is reported as an `Alert` event, and
then `stuck.action` applies: `stop` fails the task (class policy for the repetition detectors,
orchestration for waits and deadlock), `escalate` parks it in INPUT_REQUIRED with the cause as
the question, until an operator answers `continue` (detectors count afresh from there) or
`stop`. Waiting too long and deadlock always stop: waiting longer for an operator can't help.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from swarm.errors import RunError
from swarm.runtime.middleware import (
    Middleware,
    ModelCall,
    NextModel,
    NextTool,
    StopTurn,
    ToolInvocation,
)
from swarm.runtime.step import Outcome
from swarm.runtime.toolbox import HANDOFF_PREFIX

if TYPE_CHECKING:
    from swarm.config import StuckConfig
    from swarm.models.interface import ModelResponse
    from swarm.runtime.step import Session
    from swarm.tools.interface import ToolResult

# Error class of a stop, by detector.
ERROR_CLASS = {"same_call": "policy", "no_progress": "policy", "ping_pong": "policy",
               "input_timeout": "orchestration", "queue_timeout": "orchestration",
               "deadlock": "orchestration"}

_counts: Counter[tuple[str, str]] = Counter()
_listeners: list[Callable[[str, str], None]] = []


def record(swarm: str, detector: str) -> None:
    """Count one detection (the supervisor calls this once per detection)."""
    _counts[(swarm, detector)] += 1
    for fn in _listeners:
        with contextlib.suppress(Exception):  # a metrics hook must never stop a task
            fn(swarm, detector)


def counts() -> dict[tuple[str, str], int]:
    """Detections so far in this process, by (swarm, detector)."""
    return dict(_counts)


def on_detection(fn: Callable[[str, str], None]) -> None:
    """Call `fn(swarm, detector)` on every detection (e.g. to increment a Ray metric)."""
    _listeners.append(fn)


class StuckError(RunError):
    """A task was found stuck by a check outside the step loop (e.g. a queue timeout)."""

    error_class = "orchestration"

    def __init__(self, detector: str, message: str) -> None:
        super().__init__(message)
        self.detector = detector


def stuck_stop(detector: str, cause: str) -> StopTurn:
    """The stop a detector raises inside a turn."""
    return StopTurn(Outcome("failed", error_class=ERROR_CLASS[detector],
                            error=f"stuck ({detector}): {cause}", stuck=detector))


class _Seen:
    """What a turn has seen of the task so far (built from the transcript at its first call)."""

    __slots__ = ("calls", "results", "stale", "step", "step_new", "step_tools")

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}
        self.results: set[int] = set()
        self.stale = 0  # steps in a row with nothing new
        self.step = -1
        self.step_tools = 0
        self.step_new = False

    def end_step(self) -> None:
        if self.step_tools:
            self.stale = 0 if self.step_new else self.stale + 1
        self.step_tools, self.step_new = 0, False

    def result(self, name: str, content: str) -> None:
        key = hash((name, content))
        if key not in self.results:
            self.results.add(key)
            self.step_new = True
        self.step_tools += 1


def _canonical(args: Any) -> str:
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)


def _scan(session: Session, *, in_step: bool) -> _Seen:
    """Replay the transcript (from `stuck_from`) into counters: once per turn. `in_step`: the
    last model answer is the step running now (a resumed turn's first call is a tool call),
    which the layer counts as its calls run."""
    seen = _Seen()
    start = 1 + int(session.scratch.get("stuck_from", 0))
    messages = session.messages
    end = len(messages)
    if in_step:
        end = next((i for i in range(end - 1, start - 1, -1)
                    if messages[i].get("role") == "assistant"), end)
    names: dict[str, str] = {}
    for m in messages[start:end]:
        role = m.get("role")
        if role == "assistant":
            seen.end_step()
            for c in m.get("tool_calls") or ():
                fn = c.get("function") or {}
                name = fn.get("name", "")
                if name.startswith(HANDOFF_PREFIX):
                    continue
                names[c.get("id", "")] = name
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    continue  # never ran: the loop rejected it
                key = (name, _canonical(args))
                seen.calls[key] = seen.calls.get(key, 0) + 1
        elif role == "tool":
            name = names.get(m.get("tool_call_id", ""))
            if name is not None:
                seen.result(name, str(m.get("content")))
    return seen


class StuckLayer(Middleware):
    """Same-call and no-progress detection around each tool and model call."""

    def __init__(self, cfg: StuckConfig) -> None:
        self.same_call = cfg.same_call
        self.no_progress = cfg.no_progress

    @staticmethod
    def _seen(session: Session, *, in_step: bool) -> _Seen:
        seen = session.scratch.get("stuck")
        if seen is None:
            seen = session.scratch["stuck"] = _scan(session, in_step=in_step)
        return seen

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        """Refuse the model call after `no_progress` stale steps in a row."""
        if call.final:
            return await nxt(call)
        seen = self._seen(call.session, in_step=False)
        if self.no_progress is not None:
            if seen.step != call.step:
                seen.end_step()
                seen.step = call.step
            if seen.stale >= self.no_progress:
                raise stuck_stop("no_progress", (
                    f"the last {seen.stale} steps brought no new information (every tool "
                    f"result repeated an earlier one; stuck.no_progress is {self.no_progress})"))
        return await nxt(call)

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Refuse the `same_call`-th identical call; note whether the result is new."""
        seen = self._seen(inv.session, in_step=True)
        if self.same_call is not None:
            key = (inv.entry.spec.name, _canonical(inv.args))
            n = seen.calls.get(key, 0) + 1
            if n >= self.same_call:
                raise stuck_stop("same_call", (
                    f"{inv.entry.spec.name} called {n} times with the same arguments "
                    f"{key[1][:120]} (stuck.same_call is {self.same_call})"))
            seen.calls[key] = n
        result = await nxt(inv)
        if self.no_progress is not None:
            if seen.step != inv.step:
                seen.end_step()
                seen.step = inv.step
            seen.result(inv.entry.spec.name, result.content)
        return result


def bounces(trail: list[str]) -> int:
    """Handoffs in a row at the end of `trail` (the agents that took turns, in order) that
    alternate between the same two agents: A, B, A, B is 3."""
    n = len(trail)
    if n < 2 or trail[-1] == trail[-2]:
        return 0
    count = 1
    for i in range(n - 2, 0, -1):
        if trail[i + 1] != trail[i - 1] or trail[i] == trail[i - 1]:
            break
        count += 1
    return count


class WaitGraph:
    """Which task waits on which (see the module docstring), to find wait-for cycles."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}  # sub-task -> the task whose tool waits for it
        self.slots: dict[tuple[str, int], list[str]] = {}  # replica -> tasks sent there, FIFO
        self.capacity: dict[tuple[str, int], int] = {}
        self.running: Counter[str] = Counter()  # turns in flight per task (branches run at once)

    def enter(self, task: str, replica: tuple[str, int], capacity: int) -> None:
        """A turn of `task` was sent to `replica` (it runs, or queues for a slot)."""
        self.slots.setdefault(replica, []).append(task)
        self.capacity[replica] = capacity
        self.running[task] += 1

    def leave(self, task: str, replica: tuple[str, int]) -> None:
        """The turn ended."""
        queue = self.slots.get(replica)
        if queue is not None and task in queue:
            queue.remove(task)
            if not queue:
                del self.slots[replica]
        self.running[task] -= 1
        if self.running[task] <= 0:
            del self.running[task]

    def waits_on(self, task: str) -> list[str]:
        """The tasks `task` waits on now."""
        out = [child for child, parent in self.parent.items() if parent == task
               and task in self.running]
        for replica, queue in self.slots.items():
            cap = self.capacity[replica]
            if len(queue) > cap and task in itertools.islice(queue, cap, None):
                out.extend(queue[:cap])
        return out

    def cycle(self, start: str) -> list[str] | None:
        """A wait-for cycle through `start`, as the tasks on it, or None."""
        if not self.parent:
            # A turn holding a slot runs on unless its task waits for a sub-task, so every
            # cycle has a sub-task edge: with none, there is none (and no search, which with
            # thousands of queued tasks would cost a scan of every queue per hop).
            return None
        path: list[str] = []
        seen: set[str] = set()

        def visit(t: str) -> list[str] | None:
            for nxt in self.waits_on(t):
                if nxt == start:
                    return [*path, t]
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(t)
                    found = visit(nxt)
                    path.pop()
                    if found is not None:
                        return found
            return None

        return visit(start)
