"""Approval gates: a tool call that needs a person's approval waits for it, durably.

The agent side is `ApprovalLayer`, a `Middleware` whose `on_tool` runs before the tool does.
For a gated call with no decision yet it logs an `approval` entry (`event: requested`, with the
gate id, tool, arguments, agent and reason) and ends the turn in INPUT_REQUIRED
(`StopTurn(Outcome("input_required", gate=...))`). The supervisor side is `ApprovalDesk`: it
parks the task, and `approve` / `deny` log the decision (`event: approved | denied`, who, why,
edited arguments) in the same log, durable before they return; a gate nobody answers within
`approvals.timeout_s` of its request is denied by `timeout`. Then the turn resumes
(`StepLoop.resume`): the layer finds the decision in the log, and an approved call logs
`event: ran` and runs once (with the edited arguments, if any) while a denied one returns the
tool error "denied by <who>: <reason>" to the model.

Everything is in the task's log, so a restart of any actor loses nothing: a resumed turn whose
gate is still open raises it again (with its original time, so the timeout still counts from
the request); an approved gate whose call had started (`ran` logged, no result) is a crash in a
call with side effects, handled like any other (the operator answers rerun or skip).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from swarm._text import MAX_LABEL_CHARS, check_chars
from swarm.errors import UserError
from swarm.protocol import a2a
from swarm.runtime.middleware import Middleware, NextTool, StopTurn, ToolInvocation
from swarm.tools.interface import ToolResult

if TYPE_CHECKING:
    from swarm.config import ApprovalsConfig, GateRule
    from swarm.runtime.journal import Journal
    from swarm.runtime.supervisor import Supervisor, TaskRecord
    from swarm.tools.interface import ToolSpec

log = logging.getLogger(__name__)

_ARGS_CHARS = 300


def gate_id(agent: str, step: int, index: int) -> str:
    """The id of the gate on one tool call: unique in a task's log, readable on a command line."""
    return f"{agent}-{step}-{index}"


@dataclass(slots=True)
class Gate:
    """A gate folded from its log entries."""

    gate: str
    agent: str
    step: int
    index: int
    tool: str
    arguments: str
    reason: str
    ts: float
    task_id: str = ""
    log_id: str = ""
    decision: str | None = None  # "approved" or "denied"
    by: str | None = None
    why: str | None = None
    edited: str | None = None  # the arguments an approver gave instead (JSON text)
    decided_ts: float | None = None
    ran: bool = False

    def public(self) -> dict[str, Any]:
        """The gate as a JSON-ready dict (for task summaries and clients)."""
        return {"gate": self.gate, "agent": self.agent, "tool": self.tool,
                "arguments": self.arguments, "reason": self.reason, "requested": self.ts,
                "step": self.step, "index": self.index, "log_id": self.log_id,
                "decision": self.decision, "by": self.by, "why": self.why,
                "edited_arguments": self.edited}

    def question(self, swarm: str | None = None) -> str:
        """What the task asks its operator while the gate is open; with the swarm's name (its
        deployment name, what `swarm approve` takes), the commands that answer it."""
        args = self.arguments if len(self.arguments) <= _ARGS_CHARS \
            else self.arguments[:_ARGS_CHARS] + "…"
        text = (f"Approval needed (gate {self.gate}): agent {self.agent} wants to call "
                f"{self.tool}({args}) — {self.reason}.")
        task = self.task_id or self.log_id.split("/", 1)[0]
        if not (swarm and task):
            return text
        return (f"{text} Approve with `swarm approve {swarm} {task} {self.gate}` (optionally "
                f"--args JSON) or deny with `swarm deny {swarm} {task} {self.gate}`.")


def fold_gates(questions: list[dict[str, Any]]) -> dict[str, Gate]:
    """Gates from a task's `approval` entries (`TaskState.questions`), by id; the first decision
    of a gate is the one that counts."""
    gates: dict[str, Gate] = {}
    for q in questions:
        gid = q.get("gate")
        if not isinstance(gid, str):
            continue  # another kind of question
        event = q.get("event")
        g = gates.get(gid)
        if event == "requested":
            if g is None:
                gates[gid] = Gate(
                    gate=gid, agent=str(q.get("agent", "")), step=int(q.get("step", 0)),
                    index=int(q.get("index", 0)), tool=str(q.get("tool", "")),
                    arguments=str(q.get("arguments", "")), reason=str(q.get("reason", "")),
                    ts=float(q.get("ts", 0.0)), task_id=str(q.get("task_id", "")),
                    log_id=str(q.get("log_id", "")))
        elif g is None:
            continue
        elif event in ("approved", "denied") and g.decision is None:
            g.decision, g.by, g.why = event, q.get("by"), q.get("reason")
            g.edited, g.decided_ts = q.get("arguments"), q.get("ts")
        elif event == "ran":
            g.ran = True
    return gates


def held_calls(questions: list[dict[str, Any]], agent: str, step: int,
               pending: dict[int, Any]) -> set[int]:
    """Pending calls of `step` that a gate stopped before they ran: the gated one and those after
    it (calls run in order, so none of them started). They are safe to send on, gate and all."""
    first: int | None = None
    for g in fold_gates(questions).values():
        if g.agent == agent and g.step == step and not g.ran and (first is None or
                                                                   g.index < first):
            first = g.index
    if first is None:
        return set()
    return {i for i in pending if i >= first}


def reopened_gates(entries: list[Any], step: int, now: float) -> list[Any]:
    """For a fork up to `step`: the gate requests of its calls, undecided and dated `now` (a
    fork is a new task, so its gated calls wait for a new approval)."""
    import msgspec

    return [msgspec.structs.replace(e, seq=-1, ts=now, data={**e.data, "ts": now})
            for e in entries if e.kind == "approval" and e.step <= step
            and e.data.get("event") == "requested"]


class GatePolicy:
    """Which tools of one agent need approval, and why (decided once per tool name)."""

    def __init__(self, cfg: ApprovalsConfig, agent: str) -> None:
        self.rule: GateRule = cfg.rule(agent)
        self.listed = list(cfg.tools)
        self.exempt = list(cfg.exempt)
        self._cache: dict[str, str | None] = {}

    @property
    def active(self) -> bool:
        """Whether any call of this agent can be gated."""
        return self.rule != "none"

    def reason(self, spec: ToolSpec) -> str | None:
        """Why a call of this tool needs approval, or None if it doesn't."""
        try:
            return self._cache[spec.name]
        except KeyError:
            pass
        names = (spec.name, f"{spec.source}.{spec.name}")
        why: str | None = None
        if any(fnmatchcase(n, p) for p in self.exempt for n in names):
            why = None
        elif self.rule == "all":
            why = "approvals.require is all"
        elif self.rule in ("listed", "destructive") and (
                hit := next((p for p in self.listed for n in names if fnmatchcase(n, p)), None)):
            why = f"listed in approvals.tools ({hit})"
        elif self.rule == "destructive" and spec.destructive and not spec.read_only:
            why = "the tool is marked destructive (or declares nothing)"
        self._cache[spec.name] = why
        return why


async def log_approval(journal: Journal, agent: str, step: int, data: dict[str, Any]) -> None:
    """Append one `approval` entry through a turn's journal, durable at once (with everything
    buffered before it), and keep the journal's base state in step for its snapshots."""
    from swarm.state.interface import LogEntry

    await journal._append([LogEntry(kind="approval", agent=agent, step=step, ts=data["ts"],
                                    data=data)], now=True)
    journal.base.questions.append(dict(data))


class ApprovalLayer(Middleware):
    """Stops a gated tool call until it is approved; runs it once approved, refuses it denied."""

    def __init__(self, policy: GatePolicy, clock: Any = time.time) -> None:
        self.policy = policy
        self.clock = clock

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        """Check the gate of a call before it runs."""
        reason = self.policy.reason(inv.entry.spec)
        if reason is None:
            return await nxt(inv)
        from swarm.runtime.step import Outcome

        session = inv.session
        journal = session.journal
        name = inv.call.name
        if journal is None:
            raise StopTurn(Outcome(
                "failed", error_class="policy",
                error=f"tool {name!r} needs approval ({reason}), but this swarm keeps no "
                "durable state to hold the gate (state.store)"))
        gid = gate_id(inv.agent, inv.step, inv.index)
        g = fold_gates(journal.base.questions).get(gid)
        if g is None:
            data = {"gate": gid, "event": "requested", "agent": inv.agent, "step": inv.step,
                    "index": inv.index, "tool": name, "arguments": inv.call.arguments,
                    "reason": reason, "task_id": session.task_id, "log_id": journal.log_id,
                    "ts": self.clock()}
            await log_approval(journal, inv.agent, inv.step, data)
            g = fold_gates([data])[gid]
        if g.decision is None:
            # The tool's input schema rides along for the supervisor, which checks edited
            # arguments against it before it takes an approval.
            raise StopTurn(Outcome("input_required", text=g.question(), gate={
                **g.public(), "input_schema": inv.entry.spec.parameters}))
        if g.decision == "denied":
            return ToolResult(f"denied by {g.by or 'unknown'}: {g.why or 'no reason given'}",
                              is_error=True)
        if g.edited is not None and not g.ran and (problem := schema_problem(
                inv.entry.spec.parameters, json.loads(g.edited))) is not None:
            # Approved before the supervisor checked edited arguments: refused, not run.
            return ToolResult(f"the arguments {g.by or 'the approver'} approved for {name} don't "
                              f"fit its input schema, so the call did not run: {problem}",
                              is_error=True)
        if g.edited is not None:
            # What runs is what was approved; the ledger's argument hash and the log say so.
            inv.args = json.loads(g.edited)
            inv.call.arguments = g.edited
        if not g.ran:
            # Durable before the call starts: after a crash from here on, the call may have
            # taken effect, and it is treated like any interrupted call with side effects.
            await log_approval(journal, inv.agent, inv.step,
                               {"gate": gid, "event": "ran", "ts": self.clock()})
        return await nxt(inv)


def schema_problem(schema: Any, args: dict[str, Any]) -> str | None:
    """What is wrong with `args` for a tool with the input JSON schema `schema` (None if they
    fit it, or if there is no usable schema to check them against)."""
    if not isinstance(schema, dict) or not schema:
        return None
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        log.debug("tool schema unusable for checking arguments: %s", schema, exc_info=True)
        return None
    said = []
    for error in sorted(cls(schema).iter_errors(args), key=jsonschema.exceptions.relevance)[:5]:
        where = "/".join(str(p) for p in error.absolute_path)
        said.append(f"{error.message} (at {where})" if where else error.message)
    return "; ".join(said) or None


def build_approval_layer(cfg: Any, role: str) -> ApprovalLayer | None:
    """The layer for an agent role, or None when none of its calls can be gated."""
    policy = GatePolicy(cfg.approvals, role)
    return ApprovalLayer(policy) if policy.active else None


# ---- the supervisor's side -------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    gate: dict[str, Any]
    decided: asyncio.Future[str]
    deciding: bool = False
    schema: dict[str, Any] | None = None  # the tool's input schema, for edited arguments


@dataclass
class ApprovalDesk:
    """The supervisor's open gates: parks tasks on them, logs decisions, times them out."""

    sup: Supervisor
    open: dict[tuple[str, str], _Open] = field(default_factory=dict)
    # Decisions made by this supervisor, for clear errors on a second decision: the newest
    # `limits.finished_in_memory` of them (with a store, an older one is read from the log).
    done: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    on_record: Any = None  # called with audit entries (kind, fields)

    @property
    def timeout_s(self) -> float:
        return float(self.sup.cfg.approvals.timeout_s)

    async def wait(self, rec: TaskRecord, gate: dict[str, Any]) -> str:
        """Park the task until the gate is decided (or times out, as denied); the decision."""
        gid = gate["gate"]
        key = (rec.id, gid)
        schema = gate.get("input_schema")
        gate = {k: v for k, v in gate.items() if k != "input_schema"}
        entry = self.open.get(key)
        new = entry is None
        if entry is None:
            entry = _Open(gate, asyncio.get_running_loop().create_future())
            self.open[key] = entry
        if isinstance(schema, dict):
            entry.schema = schema
        rec.gates[gid] = gate
        question = _question(gate, rec.id, self.sup.swarm_id)
        rec.question = question
        # Audited once: not again when the turn is resent while it waits, nor by a restarted
        # supervisor for a gate its predecessor had (and audited) already.
        if new and gate["requested"] >= self.sup.started:
            self._audit("approval.requested", rec, gid, tool=gate["tool"], agent=gate["agent"],
                        args_hash=_hash(gate["arguments"]), detail=gate["reason"])
        if rec.state == "input_required":  # already parked (another gate, or a restart)
            await self.sup._persist_soon(rec)
        else:
            await self.sup._set_state(rec, "input_required", question)
        remaining = gate["requested"] + self.timeout_s - self.sup.clock()
        try:
            try:
                decision = await asyncio.wait_for(asyncio.shield(entry.decided),
                                                  max(remaining, 0.0))
            except TimeoutError:
                if entry.deciding:
                    decision = await entry.decided  # a decision is being written right now
                else:
                    decision = await self._decide(
                        rec, gid, "denied", by="timeout",
                        reason=f"no decision within {self.timeout_s:g} s")
        finally:
            self.open.pop(key, None)
            rec.gates.pop(gid, None)
        others = [g for (t, _), g in self.open.items() if t == rec.id]
        if others:  # a parallel branch still waits on its own gate
            rec.question = _question(others[0].gate, rec.id, self.sup.swarm_id)
        else:
            rec.question = None
            await self.sup._set_state(rec, "working", f"gate {gid} {decision}")
        return decision

    async def decide(self, task_id: str, gid: str, decision: str, *, by: str,
                     reason: str | None = None, args: Any = None) -> dict[str, Any]:
        """Approve or deny an open gate (durably); a clear `UserError` for anything else."""
        rec = await self.sup.find(task_id)
        if not isinstance(gid, str) or not gid:
            raise UserError("gate must be a non-empty string (see the task's gates)")
        if not isinstance(by, str) or not by.strip():
            raise UserError("the approver's name must be a non-empty string")
        if len(by) > MAX_LABEL_CHARS:
            raise UserError(f"the approver's name is {len(by)} characters; at most "
                            f"{MAX_LABEL_CHARS}")
        check_chars(by, "the approver's name")
        if reason is not None and not isinstance(reason, str):
            raise UserError("reason must be a string")
        check_chars(reason, "reason")
        edited: str | None = None
        if args is not None:
            if decision != "approved":
                raise UserError("arguments can only be given with an approval")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as e:
                    raise UserError(f"the arguments are not valid JSON: {e.msg} at position {e.pos}"
                                    ) from None
            if not isinstance(args, dict):
                raise UserError(f"arguments must be a JSON object, got {type(args).__name__}")
            try:
                edited = json.dumps(args)
            except (TypeError, ValueError) as e:
                raise UserError(f"arguments must be JSON-serialisable: {e}") from None
            check_chars(args, "arguments")
        entry = self.open.get((task_id, gid))
        if rec.state in a2a.TERMINAL and entry is not None:
            # Ended (canceled, say) while the gate was open: the gate closed with it, though
            # its turn may not have unwound yet.
            raise UserError(_closed_with(rec, gid))
        if entry is None:
            raise UserError(await self._why_not_open(rec, gid))
        if entry.deciding:
            raise UserError(f"gate {gid} of task {task_id} is being decided already")
        if args is not None and (problem := schema_problem(entry.schema, args)) is not None:
            raise UserError(f"the arguments don't fit the input schema of {entry.gate['tool']}: "
                            f"{problem}; gate {gid} of task {task_id} stays open")
        await self._decide(rec, gid, decision, by=by.strip(), reason=reason, edited=edited)
        return rec.summary()

    async def _decide(self, rec: TaskRecord, gid: str, decision: str, *, by: str,
                      reason: str | None = None, edited: str | None = None) -> str:
        from swarm.state.interface import LogEntry

        entry = self.open[(rec.id, gid)]
        entry.deciding = True
        gate = entry.gate
        now = self.sup.clock()
        data = {"gate": gid, "event": decision, "by": by, "reason": reason, "arguments": edited,
                "ts": now}
        store = self.sup.store
        try:
            if store is not None:
                # Durable before anyone hears of it: a restart then finds the decision.
                await store.append(gate.get("log_id") or rec.id, [LogEntry(
                    kind="approval", agent=gate["agent"], step=gate["step"], ts=now,
                    data=data)])
        except BaseException:
            entry.deciding = False
            raise
        done = self.done
        done[(rec.id, gid)] = {**data, "tool": gate["tool"]}
        while len(done) > self.sup.cfg.limits.finished_in_memory:
            del done[next(iter(done))]
        self.open.pop((rec.id, gid), None)
        self._audit(f"approval.{decision}", rec, gid, tool=gate["tool"], agent=gate["agent"],
                    by=by, args_hash=_hash(edited) if edited is not None else None,
                    detail=reason or "")
        if not entry.decided.done():
            entry.decided.set_result(decision)
        return decision

    async def _why_not_open(self, rec: TaskRecord, gid: str) -> str:
        done = self.done.get((rec.id, gid))
        if done is None and self.sup.store is not None:
            from swarm.state.replay import restore

            for log_id in self._logs(rec):
                state, _ = await restore(self.sup.store, log_id)
                g = fold_gates(state.questions).get(gid)
                if g is None:
                    continue
                if g.decision is None:
                    if rec.state in a2a.TERMINAL:
                        return _closed_with(rec, gid)
                    return (f"gate {gid} of task {rec.id} is not open for a decision right now "
                            "(the task is resuming); try again in a moment")
                done = {"event": g.decision, "by": g.by, "tool": g.tool}
                break
        if done is not None:
            return (f"gate {gid} of task {rec.id} was already {done['event']} by "
                    f"{done['by']} (tool {done['tool']})")
        if rec.state in a2a.TERMINAL:
            return f"task {rec.id} is {rec.state} and has no gate {gid!r} that was decided"
        waiting = sorted(g for (t, g) in self.open if t == rec.id)
        return (f"task {rec.id} has no gate {gid!r}; "
                + (f"open gates: {', '.join(waiting)}" if waiting else "it has no open gates"))

    def _logs(self, rec: TaskRecord) -> list[str]:
        sup = self.sup.cfg.supervisor
        extra = [f"{rec.id}/{a}" for a in sup.agents] if sup.strategy == "parallel" else []
        if sup.strategy == "parallel" and sup.join:
            extra.append(f"{rec.id}/join")
        return [rec.id, *extra]

    def _audit(self, kind: str, rec: TaskRecord, gid: str, **fields: Any) -> None:
        if self.on_record is not None:
            self.on_record(kind, task_id=rec.id, user=rec.user, gate=gid, **fields)


def _closed_with(rec: TaskRecord, gid: str) -> str:
    """Why gate `gid` of a task that ended before it was decided takes no decision."""
    return f"task {rec.id} is {rec.state}: its gates closed with it (gate {gid} was not decided)"


def _question(gate: dict[str, Any], task_id: str, swarm: str) -> str:
    return Gate(**{k: gate[k] for k in ("gate", "agent", "step", "index", "tool", "arguments",
                                        "reason")}, ts=gate["requested"],
                task_id=task_id).question(swarm)


def _hash(arguments: str | None) -> str | None:
    if arguments is None:
        return None
    from swarm.runtime.journal import args_hash

    return args_hash(arguments)
