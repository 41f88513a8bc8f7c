"""Folding a task's log into its state: plain code shared by agent resume and supervisor rebuild.

Entry kinds and their `data`:

- `turn_start` (agent): `input` (the message the agent was given), `turn` (turn id), and
  `stuck_from` if stuck detection counts from past the task's start (`OpenTurn.stuck_from`)
- `model` (agent, step): `message` (the assistant message, tool calls included), `usage`
- `tool` (agent, step): `message` (the tool message), `index` (position in the step's calls);
  `handoff` for a handoff, `not_run` for the error answer to a call a stopped turn never ran
  (neither counts as a tool call)
- `turn_end` (agent): `outcome` (final / handoff / failed / canceled / input_required), `text`,
  `target`, `error_class`, `error`; `stuck`, the detector that stopped the turn, if one did
- `task` (supervisor): `state`, plus what the transition carries (answer, error)
- `approval`: an approval gate's request and, later, its decision and its run
  (`swarm.governance.approvals`); or, with `escalation: ping_pong`, a handoff ping-pong the
  supervisor asked an operator about

A model entry is the intent: the tool calls it names are logged before any of them runs, so
after a crash the calls with no `tool` entry are exactly the ones that started and may or may
not have finished.
"""

from __future__ import annotations

from typing import Any

import msgspec

from swarm.errors import CheckpointError
from swarm.state.interface import CorruptRecord, LogEntry, Snapshot


class OpenTurn(msgspec.Struct, kw_only=True):
    """The turn in progress: who runs it and where its messages start in the transcript."""

    agent: str
    turn: str
    start: int
    step_offset: int
    # Task totals when the turn began, so a resumed turn reports only its own usage.
    base: dict[str, int] = msgspec.field(default_factory=dict)
    # Where in the transcript stuck detection counts from (after an operator answered
    # "continue" to a stuck escalation; 0: the task's start), for a resumed turn and the
    # turns after it.
    stuck_from: int = 0
    started: float = 0.0  # the turn_start entry's time


class AgentUsage(msgspec.Struct, kw_only=True):
    """What one agent's ended turns in a task used: its per-agent budget's counters, which a
    restarted supervisor takes from here (a turn still open counts once its resume ends)."""

    steps: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0


class TaskState(msgspec.Struct, kw_only=True):
    """A task's state as of entry `seq`."""

    transcript: list[dict[str, Any]] = msgspec.field(default_factory=list)
    step: int = 0
    seq: int = -1
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    handoffs: int = 0
    turns: int = 0
    open_turn: OpenTurn | None = None
    # The turn that ended last, so a turn whose result never reached the supervisor can be
    # reported in full (its messages and usage) after a restart.
    last_turn: OpenTurn | None = None
    # Tool calls of the latest model entry that have no result yet: {index: call dict}.
    pending: dict[int, dict[str, Any]] = msgspec.field(default_factory=dict)
    last_outcome: dict[str, Any] | None = None
    task_state: str = "submitted"
    task_data: dict[str, Any] = msgspec.field(default_factory=dict)
    questions: list[dict[str, Any]] = msgspec.field(default_factory=list)
    by_agent: dict[str, AgentUsage] = msgspec.field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        """Usage counters of the task so far."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "model_calls": self.model_calls, "tool_calls": self.tool_calls}

    def turn_messages(self) -> list[dict[str, Any]]:
        """Messages of the open turn (its input and everything after)."""
        if self.open_turn is None:
            return []
        return self.transcript[self.open_turn.start :]


def apply(state: TaskState, entry: LogEntry) -> None:
    """Fold one entry into the state, in place."""
    d = entry.data
    kind = entry.kind
    if kind == "model":
        msg = d["message"]
        state.transcript.append(msg)
        state.step = max(state.step, entry.step)
        state.model_calls += 1
        usage = d.get("usage") or {}
        state.input_tokens += int(usage.get("input_tokens", 0))
        state.output_tokens += int(usage.get("output_tokens", 0))
        state.pending = dict(enumerate(msg.get("tool_calls") or ()))
    elif kind == "tool":
        state.transcript.append(d["message"])
        state.pending.pop(int(d.get("index", 0)), None)
        if not (d.get("handoff") or d.get("not_run")):
            state.tool_calls += 1
    elif kind == "turn_start":
        state.open_turn = OpenTurn(
            agent=entry.agent, turn=str(d.get("turn", "")), start=len(state.transcript),
            step_offset=state.step, base=state.totals(), stuck_from=int(d.get("stuck_from", 0)),
            started=entry.ts,
        )
        state.transcript.append({"role": "user", "content": d.get("input", "")})
        state.pending = {}
        state.turns += 1
    elif kind == "turn_end":
        turn = state.open_turn
        if turn is not None:
            _count_turn(state, turn, entry)
        state.last_turn = turn
        state.open_turn = None
        state.pending = {}
        state.last_outcome = dict(d, agent=entry.agent)
        if d.get("outcome") == "handoff":
            state.handoffs += 1
    elif kind == "task":
        state.task_state = str(d.get("state", state.task_state))
        state.task_data.update(d)
    elif kind == "approval":
        state.questions.append(dict(d))
    state.seq = entry.seq


def agent_usage(raw: dict[str, dict[str, Any]] | None) -> dict[str, AgentUsage]:
    """`TaskState.by_agent` from plain dicts (a `TurnRequest`'s), bad values left out."""
    out: dict[str, AgentUsage] = {}
    for agent, used in (raw or {}).items():
        try:
            out[agent] = msgspec.convert(used, AgentUsage, strict=False)
        except msgspec.ValidationError:
            continue
    return out


def _count_turn(state: TaskState, turn: OpenTurn, end: LogEntry) -> None:
    """Add an ended turn's usage to its agent's (`TaskState.by_agent`)."""
    used = state.by_agent.get(turn.agent)
    if used is None:
        used = state.by_agent[turn.agent] = AgentUsage()
    base = turn.base
    used.steps += max(state.step - turn.step_offset, 0)
    for name in ("model_calls", "tool_calls", "input_tokens", "output_tokens"):
        setattr(used, name, getattr(used, name) + getattr(state, name) - base.get(name, 0))
    if turn.started and end.ts:
        used.wall_s += max(end.ts - turn.started, 0.0)


def fold(snapshot: Snapshot | None, entries: list[LogEntry]) -> TaskState:
    """The state of a task from its latest usable snapshot and the entries after it."""
    state = (
        msgspec.convert(snapshot.data, TaskState) if snapshot is not None else TaskState()
    )
    if snapshot is not None:
        state.seq = snapshot.seq
    for entry in entries:
        if entry.seq <= state.seq:
            continue
        apply(state, entry)
    return state


def to_snapshot(task_id: str, state: TaskState, ts: float) -> Snapshot:
    """A snapshot of the state (compacts everything up to `state.seq`)."""
    return Snapshot(task_id=task_id, seq=state.seq, step=state.step,
                    data=msgspec.to_builtins(state), ts=ts)


async def restore(store: Any, task_id: str, upto: int | None = None
                  ) -> tuple[TaskState, list[str]]:
    """Load a task's state from a `Checkpointer`: the newest usable snapshot plus later entries.

    A corrupt or unknown-version snapshot is reported and the previous one is used instead; a
    corrupt log entry raises `CorruptRecord`, since skipping it would silently drop a step.
    Returns the state and the problems met on the way.
    """
    snapshot, problems = await latest_snapshot(store, task_id, upto)
    entries = await read_after(store, task_id, snapshot, upto)
    return fold(snapshot, entries), problems


async def read_after(store: Any, task_id: str, snapshot: Snapshot | None,
                     upto: int | None = None) -> list[LogEntry]:
    """The entries to fold into `snapshot` (all of the log's, if None), up to `upto`.

    A snapshot at entry N was taken once the log held N, so a log that ends before N has lost
    entries it acknowledged (a deleted or truncated segment file, a store that lost writes):
    that raises `CorruptRecord` naming the task and entry N, rather than resume from the
    snapshot alone and run again a tool call the lost entries say finished. The check costs a
    second read, of entry N, only when nothing follows the snapshot.
    """
    seq = snapshot.seq if snapshot is not None else -1
    entries = await store.read(task_id, after=seq, upto=upto)
    if seq < 0 or entries or await store.read(task_id, after=seq - 1, upto=seq):
        return entries
    try:  # where the log ends, for the message
        held = await store.read(task_id, upto=seq)
        end = f"its last entry is {held[-1].seq}" if held else "it holds no entries"
    except CheckpointError as e:
        end = f"reading it fails: {e}"
    raise CorruptRecord(task_id, f"entry {seq}", (
        f"it is missing: the log ends before it ({end}), but the task's snapshot at entry "
        f"{seq} was taken after it was stored; the log lost entries (a deleted or truncated "
        "segment file, a store that lost writes?), and resuming from the snapshot alone could "
        "run again what they record as done"))


async def latest_snapshot(store: Any, task_id: str, upto: int | None = None
                          ) -> tuple[Snapshot | None, list[str]]:
    """The newest usable stored snapshot (at or before `upto`), falling back past corrupt ones;
    and the problems met on the way."""
    problems: list[str] = []
    seqs = await store.snapshots(task_id)
    if upto is not None:
        seqs = [s for s in seqs if s <= upto]
    snapshot = None
    for seq in reversed(seqs):
        try:
            snapshot = await store.get_snapshot(task_id, seq)
        except CorruptRecord as e:
            problems.append(f"{e}; falling back to an older snapshot")
            continue
        if snapshot is not None:
            break
    return snapshot, problems
