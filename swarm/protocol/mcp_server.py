"""The swarm as an MCP server: MCP clients (IDEs, desktop assistants) drive a deployed swarm.

`build_server(name)` returns an mcp `MCPServer` whose tools submit tasks and follow them with
progress notifications (`run_task`, `submit_task`), read them (`get_task`, `list_tasks`,
`get_trace`), and act on them (`approve_gate`, `deny_gate`, `respond`, `cancel_task`); the
resources `swarm://tasks` and `swarm://tasks/{task_id}` hold the same rows as JSON.
`swarm mcp NAME` serves it over stdio or streamable HTTP.

Every call into the swarm is a blocking Ray call, so it runs in a worker thread under a
timeout, off the event loop. A bad argument or a refused request (unknown task or gate, a task
that isn't waiting, text over the swarm's limit) is an `is_error` tool result whose text names
what was wrong; the server carries on. A supervisor that went away (the swarm was taken down
and deployed again) is looked up afresh on the next call.
"""

import io
import json
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from swarm._text import check_chars
from swarm.client import SwarmClient, TaskHandle, TaskInfo, _call, _whoami, connect
from swarm.errors import SwarmError, TaskNotFound, UserError
from swarm.events import (
    Alert,
    AnyEvent,
    Handoff,
    ModelCalled,
    StepStarted,
    TaskFinished,
    TaskStateChanged,
    ToolCalled,
    TurnResumed,
    to_dict,
)

__all__ = ["GateView", "TaskList", "TaskRow", "TaskView", "build_server"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The longest a single long poll of a task's events waits; progress arrives at least this often.
_POLL_S = 5.0
_CALL_TIMEOUT_S = 30.0

StateName = Literal["submitted", "working", "input_required", "completed", "failed",
                    "canceled", "rejected"]
TaskId = Annotated[str, Field(min_length=1, max_length=128, description="the task's id")]
GateId = Annotated[str, Field(min_length=1, max_length=200,
                              description="the gate's id, from get_task's gates")]
UserName = Annotated[str, Field(min_length=1, max_length=200,
                                description="who the task is for (budgets, memory, audit)")]


class GateView(BaseModel):
    """An open approval gate: a tool call that waits for a person's decision."""

    gate: str
    agent: str
    tool: str
    arguments: dict[str, Any] | str = Field(
        description="the call's arguments (JSON object; text if they don't parse)")
    reason: str
    requested: float = Field(description="unix time the gate was raised")


class TaskView(BaseModel):
    """A task's state, answer and what it waits for."""

    task_id: str
    state: str = Field(description="A2A state: submitted, working, input_required, completed, "
                       "failed, canceled or rejected")
    done: bool = Field(description="whether the state is terminal")
    answer: str | None = None
    error_class: str | None = None
    error: str | None = None
    question: str | None = Field(None, description="what the task asks while input_required")
    gates: list[GateView] = Field(default_factory=list,
                                  description="open approval gates (approve_gate / deny_gate)")
    user: str
    agent: str | None = Field(None, description="the agent working on it last")
    context_id: str
    steps: int
    model_calls: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    created: float
    updated: float
    note: str | None = Field(None, description="what to do next, when it isn't obvious")


class TaskRow(BaseModel):
    """A task's line in a listing."""

    task_id: str
    state: str
    user: str
    agent: str | None
    steps: int
    open_gates: int
    error_class: str | None
    created: float
    updated: float


class TaskList(BaseModel):
    """Tasks, newest first."""

    tasks: list[TaskRow]
    total: int = Field(description="how many tasks matched, before the limit")


def _arguments(text: Any) -> dict[str, Any] | str:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return str(text)
    return value if isinstance(value, dict) else str(text)


def task_view(info: TaskInfo, note: str | None = None) -> TaskView:
    """The MCP view of a task row."""
    gates = [GateView(gate=g["gate"], agent=g.get("agent", ""), tool=g.get("tool", ""),
                      arguments=_arguments(g.get("arguments")), reason=g.get("reason", ""),
                      requested=float(g.get("requested", 0.0)))
             for g in info.gates if not g.get("decision")]
    if note is None and gates:
        note = (f"waits for approval of gate {', '.join(g.gate for g in gates)}: call "
                "approve_gate or deny_gate")
    elif note is None and info.state == "input_required":
        note = "waits for an answer to its question: call respond"
    return TaskView(
        task_id=info.task_id, state=info.state, done=info.done, answer=info.answer,
        error_class=info.error_class, error=info.error, question=info.question, gates=gates,
        user=info.user, agent=info.agent, context_id=info.context_id, steps=info.steps,
        model_calls=info.model_calls, tool_calls=info.tool_calls,
        input_tokens=info.input_tokens, output_tokens=info.output_tokens,
        cost_usd=info.cost_usd, created=info.created, updated=info.updated, note=note)


def describe(ev: AnyEvent) -> str:
    """One line of plain text for a task event: the message of a progress notification."""
    who = f"{ev.agent}: " if ev.agent else ""
    if isinstance(ev, TaskStateChanged):
        return f"task {ev.state}" + (f" ({ev.detail})" if ev.detail else "")
    if isinstance(ev, StepStarted):
        return f"{who}step {ev.step} started"
    if isinstance(ev, ModelCalled):
        if ev.error:
            return f"{who}model {ev.model} failed ({ev.error_class}): {ev.error}"
        what = f"{ev.tool_calls} tool call(s)" if ev.tool_calls else "an answer"
        return (f"{who}model {ev.model}: {ev.input_tokens} in / {ev.output_tokens} out "
                f"tokens → {what}")
    if isinstance(ev, ToolCalled):
        if ev.outcome == "ok":
            return f"{who}tool {ev.tool}: ok ({ev.duration_ms:.0f} ms)"
        return f"{who}tool {ev.tool}: {ev.outcome} ({ev.error_class}) {ev.detail}".rstrip()
    if isinstance(ev, Handoff):
        return f"{who}handoff → {ev.to_agent}"
    if isinstance(ev, TaskFinished):
        return f"task {ev.state} after {ev.steps} step(s)"
    if isinstance(ev, Alert):
        return f"{who}alert {ev.alert}: {ev.action}" + (f" ({ev.detail})" if ev.detail else "")
    if isinstance(ev, TurnResumed):
        return f"{who}resumed at step {ev.step} from the {ev.source} snapshot"
    # A kind this function doesn't know yet: its tag and whatever state or text it carries.
    row = to_dict(ev)
    extra = " ".join(str(row[k]) for k in ("state", "text") if row.get(k))
    return f"{who}{row.get('kind', type(ev).__name__)}" + (f": {extra}" if extra else "")


class _Swarm:
    """The connection to one deployed swarm, and the one way the tools call into it."""

    def __init__(self, name: str, address: str | None, client: SwarmClient | None,
                 call_timeout_s: float) -> None:
        self.name = name
        self.address = address
        self.client = client
        self.timeout = call_timeout_s
        self.max_chars: int | None = None

    def _connected(self) -> SwarmClient:
        if self.client is None:
            self.client = connect(self.name, address=self.address)
        return self.client

    async def call(self, fn: Callable[[SwarmClient], T], what: str,
                   timeout: float | None = None, error: type[Exception] = ToolError) -> T:
        """Run `fn(client)` in a worker thread within `timeout`; a failure becomes `error`
        (a tool error by default) with a message that says what went wrong."""
        import ray

        limit = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(limit):
                # Abandoned on timeout: the Ray call ends by itself (each has its own bound).
                return await anyio.to_thread.run_sync(lambda: fn(self._connected()),
                                                      abandon_on_cancel=True)
        except TaskNotFound as e:
            raise (ResourceNotFoundError if error is ResourceError else error)(str(e)) from None
        except SwarmError as e:
            raise error(str(e)) from None
        except ray.exceptions.RayActorError:
            self.client = self.max_chars = None  # look the supervisor up again next time
            raise error(f"swarm {self.name!r} is not running any more (its supervisor is "
                        "gone); deploy it again with `swarm up`") from None
        except TimeoutError:
            raise error(f"swarm {self.name!r} did not answer {what} within {limit:g} s; "
                        "try again") from None
        except ray.exceptions.RayError as e:
            raise error(f"swarm {self.name!r} failed {what}: {type(e).__name__}: "
                        f"{str(e)[:500]}") from None

    async def status(self, task_id: str, error: type[Exception] = ToolError) -> TaskInfo:
        return await self.call(lambda c: TaskHandle(c, task_id).status(), f"get_task {task_id}",
                               error=error)

    async def check_text(self, text: str) -> None:
        """Refuse a task text over the swarm's limit, or with a character the supervisor
        refuses (`swarm._text`), before shipping it across the cluster."""
        try:
            check_chars(text, "task text")
        except UserError as e:
            raise ToolError(str(e)) from None
        if self.max_chars is None:
            info = await self.call(lambda c: c.info(), "info")
            self.max_chars = int(info.get("max_task_chars") or 0) or None
        if self.max_chars is not None and len(text) > self.max_chars:
            raise ToolError(f"task text is {len(text)} characters; swarm {self.name!r} accepts "
                            f"at most {self.max_chars} (limits.max_task_chars)")

    async def follow(self, task_id: str, cursor: int, wait_s: float, ctx: Context) -> TaskView:
        """Report the task's events from `cursor` on as progress until it ends, asks for input,
        or `wait_s` passes; then its row."""
        deadline = anyio.current_time() + wait_s
        stopped = False
        while not stopped:
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            poll = min(left, _POLL_S)
            batch, done = await self.call(
                lambda c, cur=cursor, p=poll: _poll_events(c, task_id, cur, p),
                f"the events of task {task_id}", timeout=poll + self.timeout)
            if done:  # one more read catches events that arrived with the final state
                tail, _ = await self.call(
                    lambda c, cur=cursor + len(batch): _poll_events(c, task_id, cur, 0.0),
                    f"the events of task {task_id}")
                batch = [*batch, *tail]
            for ev in batch:
                cursor += 1
                await ctx.report_progress(cursor, None, describe(ev))
                if isinstance(ev, TaskStateChanged) and ev.state == "input_required":
                    stopped = True
            stopped = stopped or done
        info = await self.status(task_id)
        note = None
        if not info.done and info.state != "input_required":
            note = (f"still {info.state} after waiting {wait_s:g} s; call get_task later "
                    "(or cancel_task)")
        return task_view(info, note)

    async def cursor(self, task_id: str) -> int:
        """How many events the task has produced so far."""
        batch, _ = await self.call(lambda c: _poll_events(c, task_id, 0, 0.0),
                                   f"the events of task {task_id}")
        return len(batch)


def _poll_events(client: SwarmClient, task_id: str, cursor: int,
                 wait: float) -> tuple[list[AnyEvent], bool]:
    # TaskHandle.events is an iterator from the first event on; following a task from a cursor
    # (after a decision) and in bounded slices needs the supervisor's long poll itself.
    batch, done = _call(client, "events", task_id, cursor, wait,
                        timeout=wait + _CALL_TIMEOUT_S)
    return list(batch), bool(done)


def _render_trace(rows: list[dict[str, Any]], task_id: str) -> str:
    from swarm._console import SafeConsole
    from swarm.observability.render import render_trace

    buf = io.StringIO()
    SafeConsole(file=buf, width=120, color_system=None, force_terminal=False).print(
        render_trace(rows, title=f"task {task_id}"))
    return buf.getvalue()


INSTRUCTIONS = """\
Drives the multi-agent swarm {name!r}. run_task submits a task and waits for its answer
(progress notifications follow its steps); submit_task returns at once. A task that needs a
person's approval for a tool call stops in state input_required with open gates (get_task shows
the tool, its arguments and the reason): approve_gate runs the call (optionally with edited
arguments), deny_gate tells the agent it was refused. respond answers a task's question,
cancel_task stops a task, get_trace shows its step tree."""


def build_server(
    swarm: str,
    *,
    address: str | None = None,
    client: SwarmClient | None = None,
    call_timeout_s: float = _CALL_TIMEOUT_S,
    max_wait_s: float = 600.0,
    default_wait_s: float = 60.0,
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING",
) -> MCPServer:
    """An MCP server that drives the deployed swarm `swarm` (on the Ray cluster at `address`,
    or through `client` if given)."""
    sw = _Swarm(swarm, address, client, call_timeout_s)
    server = MCPServer(f"swarm-{swarm}", instructions=INSTRUCTIONS.format(name=swarm),
                       log_level=log_level)
    wait_field = Field(ge=0, le=max_wait_s, description=(
        f"seconds to wait for the task to end or ask for input (at most {max_wait_s:g})"))

    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False,
                                idempotent_hint=True, open_world_hint=False)
    starts_work = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                  idempotent_hint=False, open_world_hint=True)

    @server.tool(title="Run a task", annotations=starts_work)
    async def run_task(
        text: Annotated[str, Field(min_length=1, description="the task, in plain language")],
        ctx: Context,
        user: UserName = "mcp",
        context_id: Annotated[str | None, Field(
            max_length=128, description="conversation id: a user's tasks with the same one "
            "share session memory")] = None,
        wait_s: Annotated[float, wait_field] = default_wait_s,
    ) -> TaskView:
        """Submit a task to the swarm and wait for its answer, reporting each step as progress.
        Returns early if the task needs input (an approval gate or a question); a task that
        failed is a result too, with its state, error class and error."""
        await sw.check_text(text)
        task_id = await sw.call(
            lambda c: c.submit(text, user=user, context_id=context_id).id, "the submission")
        return await sw.follow(task_id, 0, wait_s, ctx)

    @server.tool(title="Submit a task", annotations=starts_work)
    async def submit_task(
        text: Annotated[str, Field(min_length=1, description="the task, in plain language")],
        user: UserName = "mcp",
        context_id: Annotated[str | None, Field(max_length=128)] = None,
    ) -> TaskView:
        """Submit a task to the swarm and return at once (follow it with get_task)."""
        await sw.check_text(text)
        task_id = await sw.call(
            lambda c: c.submit(text, user=user, context_id=context_id).id, "the submission")
        return task_view(await sw.status(task_id))

    @server.tool(title="Get a task", annotations=read_only)
    async def get_task(task_id: TaskId) -> TaskView:
        """A task's state, answer or error, step counts, and open approval gates with their
        tool, arguments and reason."""
        return task_view(await sw.status(task_id))

    @server.tool(title="List tasks", annotations=read_only)
    async def list_tasks(
        state: StateName | None = None,
        user: Annotated[str | None, Field(min_length=1, max_length=200)] = None,
        limit: Annotated[int, Field(ge=1, le=1000)] = 50,
    ) -> TaskList:
        """The swarm's tasks, newest first, optionally only those in one state or of one user."""
        rows = await sw.call(lambda c: c.tasks(state=state, user=user), "list_tasks")
        return TaskList(total=len(rows), tasks=[
            TaskRow(task_id=r.task_id, state=r.state, user=r.user, agent=r.agent,
                    steps=r.steps, open_gates=sum(1 for g in r.gates if not g.get("decision")),
                    error_class=r.error_class, created=r.created, updated=r.updated)
            for r in rows[:limit]])

    async def _decide(task_id: str, wait_s: float, ctx: Context,
                      act: Callable[[SwarmClient], Any], what: str) -> TaskView:
        cursor = await sw.cursor(task_id) if wait_s > 0 else 0
        await sw.call(act, what)
        if wait_s > 0:
            return await sw.follow(task_id, cursor, wait_s, ctx)
        return task_view(await sw.status(task_id))

    @server.tool(title="Approve a gated tool call", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=False,
        open_world_hint=True))
    async def approve_gate(
        task_id: TaskId,
        gate: GateId,
        ctx: Context,
        args: Annotated[dict[str, Any] | None, Field(
            description="run the call with these arguments instead")] = None,
        approver: Annotated[str | None, Field(
            min_length=1, max_length=200, description="who approves (audit log)")] = None,
        wait_s: Annotated[float, wait_field] = 0.0,
    ) -> TaskView:
        """Approve a tool call waiting at an approval gate: it runs (once), optionally with
        edited arguments. With wait_s, waits for the task to end or ask for input again."""
        who = approver or f"{_whoami()} via mcp"
        return await _decide(task_id, wait_s, ctx,
                             lambda c: TaskHandle(c, task_id).approve(gate, args, approver=who),
                             f"approve_gate {gate}")

    @server.tool(title="Deny a gated tool call", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=False,
        open_world_hint=False))
    async def deny_gate(
        task_id: TaskId,
        gate: GateId,
        ctx: Context,
        reason: Annotated[str | None, Field(
            max_length=2000, description="why (the agent's model sees it)")] = None,
        approver: Annotated[str | None, Field(min_length=1, max_length=200)] = None,
        wait_s: Annotated[float, wait_field] = 0.0,
    ) -> TaskView:
        """Deny a tool call waiting at an approval gate; the agent is told who denied it and
        why, and the task goes on."""
        who = approver or f"{_whoami()} via mcp"
        return await _decide(task_id, wait_s, ctx,
                             lambda c: TaskHandle(c, task_id).deny(gate, reason, approver=who),
                             f"deny_gate {gate}")

    @server.tool(title="Answer a task's question", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=False,
        open_world_hint=True))
    async def respond(
        task_id: TaskId,
        answer: Annotated[str, Field(min_length=1, max_length=200,
                                     description="one of the choices the question names")],
        ctx: Context,
        wait_s: Annotated[float, wait_field] = 0.0,
    ) -> TaskView:
        """Answer the question of a task waiting in input_required (for a call interrupted by a
        crash: rerun or skip)."""
        return await _decide(task_id, wait_s, ctx,
                             lambda c: TaskHandle(c, task_id).respond(answer), "respond")

    @server.tool(title="Cancel a task", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True,
        open_world_hint=False))
    async def cancel_task(task_id: TaskId) -> TaskView:
        """Cancel a task that hasn't finished (a finished task is left as it is)."""
        return task_view(await sw.call(lambda c: TaskHandle(c, task_id).cancel(), "cancel_task"))

    @server.tool(title="Show a task's trace", annotations=read_only, structured_output=False)
    async def get_trace(task_id: TaskId) -> str:
        """A task's step tree as text: nested spans with durations, tokens, cost and errors."""
        rows = await sw.call(lambda c: TaskHandle(c, task_id).trace(), "get_trace")
        return _render_trace(rows, task_id)

    @server.resource("swarm://tasks", name="tasks", mime_type="application/json",
                     description="the swarm's tasks, newest first")
    async def tasks_resource() -> str:
        rows = await sw.call(lambda c: c.tasks(), "list_tasks", error=ResourceError)
        return json.dumps([task_view(r).model_dump(mode="json") for r in rows])

    @server.resource("swarm://tasks/{task_id}", name="task", mime_type="application/json",
                     description="one task: state, answer, open gates")
    async def task_resource(task_id: str) -> str:
        info = await sw.status(task_id, error=ResourceError)
        return task_view(info).model_dump_json()

    return server
