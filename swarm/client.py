"""The Python client that drives a running swarm: `swarm.connect(name)`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from swarm.errors import SwarmError, SwarmNotFound, TaskFailed
from swarm.events import AnyEvent, TaskFinished
from swarm.protocol import a2a
from swarm.runtime.deploy import NAMESPACE, ensure_ray
from swarm.runtime.supervisor_actor import supervisor_actor_name

_POLL_S = 5.0


@dataclass(frozen=True)
class TaskInfo:
    """A task's row in the supervisor's table."""

    task_id: str
    context_id: str
    state: str
    user: str
    agent: str | None
    steps: int
    input_tokens: int
    output_tokens: int
    created: float
    updated: float
    answer: str | None
    error_class: str | None
    error: str | None
    # Plain JSON as submitted, with `user` and what the swarm added (budget_exhausted, a
    # fork's forked_from and forked_at_step).
    metadata: dict[str, Any]
    question: str | None = None
    # Open approval gates: gate, agent, tool, arguments, reason, requested (unix time), ...
    gates: list[dict[str, Any]] = field(default_factory=list)
    model_calls: int = 0
    tool_calls: int = 0
    cost_usd: float = 0.0
    budget_exhausted: str | None = None  # the limit that cut the task short (it may still
    # have COMPLETED, with the agent's wrap-up answer)
    stuck: str | None = None  # the stuck detector that stopped or escalated it
    # Failed model and tool calls by error class, the ones the task recovered from included.
    errors: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_summary(cls, row: dict[str, Any]) -> TaskInfo:
        """Build from the supervisor's summary dict."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    @property
    def done(self) -> bool:
        """Whether the task reached a terminal state."""
        return self.state in a2a.TERMINAL


def _get(ref: Any, timeout: float | None = None) -> Any:
    """ray.get that re-raises swarm's own errors as themselves rather than wrapped."""
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SwarmError):
            raise cause from None
        raise


_RESTART_WAIT_S = 120.0


def _check_timeout(timeout: Any) -> None:
    """A timeout is None (no limit) or a number of seconds, 0 or more."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not "
                        f"{type(timeout).__name__}")
    if not timeout >= 0:  # also NaN
        raise ValueError(f"timeout must be 0 or more seconds, not {timeout}")


def _wait_until_done(timeout: float | None, poll: Callable[[float], list[TaskInfo]]
                     ) -> list[TaskInfo]:
    """Call `poll(seconds)` (a supervisor wait, at most 30 s a call, so no call outlives a
    restart for long) until every row it returns is done or `timeout` has passed."""
    _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = 30.0 if deadline is None else max(0.0, min(30.0, deadline - time.monotonic()))
        infos = poll(wait)
        if all(i.done for i in infos) or (deadline is not None and time.monotonic() >= deadline):
            return infos


def _call(client: SwarmClient, method: str, *args: Any, timeout: float | None = None) -> Any:
    """Call a supervisor method, riding out a restart of the supervisor.

    While a crashed supervisor restarts, calls fail with ActorUnavailableError ("may or may not
    have been executed"); every supervisor method is safe to repeat (a submission carries the
    task id the client chose), so the call is simply sent again, for a bounded time. A
    supervisor that was taken down (`swarm down`) and deployed again (`swarm up`) is a new
    actor: the client finds it by the swarm's name and goes on with it.
    """
    import ray

    from swarm.state.interface import TableNotLoaded

    deadline = time.monotonic() + _RESTART_WAIT_S
    delay = 0.1
    while True:
        try:
            return _get(getattr(client._sup, method).remote(*args), timeout)
        except ray.exceptions.ActorDiedError:
            client._reattach()
            continue
        except (ray.exceptions.ActorUnavailableError, TableNotLoaded) as exc:
            # Restarting, or restarted while its store can't be reached (it loads its task
            # table once the store answers).
            if time.monotonic() > deadline:
                raise SwarmError(f"the swarm's supervisor stayed unavailable for "
                                 f"{_RESTART_WAIT_S:.0f} s: {exc}") from None
            time.sleep(delay)  # back-off between retries, not synchronisation
            delay = min(delay * 2, 2.0)


class TaskHandle:
    """A submitted task: stream its events, wait for its result, cancel it."""

    def __init__(self, client: SwarmClient, task_id: str) -> None:
        self.client = client
        self.id = task_id

    @property
    def task_id(self) -> str:
        """The task's id, as `TaskInfo.task_id` names it (the same as `id`)."""
        return self.id

    def __repr__(self) -> str:
        return f"TaskHandle({self.client.name!r}, {self.id!r})"

    def status(self) -> TaskInfo:
        """The task's current row."""
        row = _call(self.client, "get_task", self.id)
        row.pop("a2a", None)
        return TaskInfo.from_summary(row)

    def a2a_task(self) -> Any:
        """The task as an a2a-sdk `Task` (state, history, artifacts)."""
        return a2a.loads_task(_call(self.client, "get_task", self.id)["a2a"])

    def events(self, timeout: float | None = None) -> Iterator[AnyEvent]:
        """Yield the task's events as they happen, from the first, until it ends.

        Raises `TimeoutError` if the task hasn't ended within `timeout` seconds.
        """
        _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = 0
        finished = False
        while True:
            wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"task {self.id} still running after {timeout} s")
            batch, done = _call(self.client, "events", self.id, cursor, wait)
            cursor += len(batch)
            finished = finished or any(isinstance(e, TaskFinished) for e in batch)
            yield from batch
            if done:
                # One more read catches events that arrived with the final state.
                tail, _ = _call(self.client, "events", self.id, cursor, 0.0)
                yield from tail
                if not finished and not any(isinstance(e, TaskFinished) for e in tail):
                    # The task left the supervisor's memory between two reads (its events
                    # with it: limits.finished_in_memory); read back, it has its end alone.
                    kept, _ = _call(self.client, "events", self.id, 0, 0.0)
                    yield from (e for e in kept[-1:] if isinstance(e, TaskFinished))
                return

    def wait(self, timeout: float | None = None) -> TaskInfo:
        """Wait for the task to end, up to `timeout` seconds; return its row (maybe unfinished)."""
        return _wait_until_done(timeout, lambda wait: [TaskInfo.from_summary(
            _call(self.client, "wait", self.id, wait))])[0]

    def result(self, timeout: float | None = None) -> str:
        """The final answer; raises `TaskFailed` if the task failed, `TimeoutError` on timeout."""
        info = self.wait(timeout)
        if not info.done:
            raise TimeoutError(f"task {self.id} is still {info.state} after {timeout} s")
        if info.state != "completed":
            raise TaskFailed(self.id, info.state, info.error_class, info.error or "")
        return info.answer or ""

    def history(self, *, full: bool = False) -> list[dict[str, Any]]:
        """The task's checkpoints in order (seq, kind, agent, step, summary; data if `full`)."""
        return list(_call(self.client, "history", self.id, full))

    def trace(self) -> list[dict[str, Any]]:
        """The task's spans from the swarm's trace store, in start order (name, trace/span/parent
        ids, kind, start/end in epoch seconds, status, error, attributes): what `swarm trace`
        renders (`swarm.observability.render.render_trace`)."""
        return list(_call(self.client, "trace", self.id))

    def replay(self) -> Iterator[dict[str, Any]]:
        """The task's messages as they were logged, read-only, in order."""
        for row in self.history(full=True):
            msg = (row.get("data") or {}).get("message")
            if row["kind"] == "turn_start":
                msg = {"role": "user", "content": row["data"].get("input", "")}
            if msg is not None:
                yield {"step": row["step"], "agent": row["agent"], **msg}

    def fork(self, step: int, *, user: str | None = None) -> TaskHandle:
        """A new task that continues from this one's state after `step`."""
        new_id = _call(self.client, "fork", self.id, step, user)
        return TaskHandle(self.client, new_id)

    def forget(self) -> None:
        """Delete this finished task's durable state."""
        _call(self.client, "forget", self.id)

    def respond(self, text: str) -> TaskInfo:
        """Answer the task's question while it is in INPUT_REQUIRED (see `TaskInfo.question`)."""
        return TaskInfo.from_summary(_call(self.client, "respond", self.id, text))

    def approve(self, gate: str, args: dict[str, Any] | None = None, *,
                approver: str | None = None) -> TaskInfo:
        """Approve the open approval gate `gate` (see `TaskInfo.gates`); with `args`, the call
        runs with these arguments instead. `approver` defaults to the OS user name."""
        return TaskInfo.from_summary(_call(self.client, "approve", self.id, gate,
                                           _whoami() if approver is None else approver,
                                           args))

    def deny(self, gate: str, reason: str | None = None, *,
             approver: str | None = None) -> TaskInfo:
        """Deny the open approval gate `gate`; the agent's model is told who denied it and why."""
        return TaskInfo.from_summary(_call(self.client, "deny", self.id, gate,
                                           _whoami() if approver is None else approver,
                                           reason))

    def cancel(self) -> TaskInfo:
        """Cancel the task if it is still running."""
        return TaskInfo.from_summary(_call(self.client, "cancel", self.id))


def _whoami() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "unknown"


class SwarmClient:
    """A connection to one deployed swarm's supervisor."""

    def __init__(self, name: str, supervisor: Any) -> None:
        self.name = name
        self._sup = supervisor

    def _reattach(self) -> None:
        """The supervisor this client called is gone for good (the swarm was taken down):
        take the one now deployed under the swarm's name, if it is another actor; else raise
        `SwarmNotFound`."""
        import ray

        try:
            sup = ray.get_actor(supervisor_actor_name(self.name), namespace=NAMESPACE)
        except ValueError:
            sup = None
        if sup is None or sup._actor_id == self._sup._actor_id:
            raise SwarmNotFound(f"swarm {self.name!r} is not running any more (its "
                                "supervisor is gone, and none is deployed under its name); "
                                "deploy it again with `swarm up`") from None
        self._sup = sup

    def __repr__(self) -> str:
        return f"SwarmClient({self.name!r})"

    def info(self) -> dict[str, Any]:
        """Agents, replicas, model endpoints and task counts."""
        return dict(_call(self, "info"))

    def submit(
        self,
        text: str,
        *,
        user: str = "anonymous",
        metadata: dict[str, Any] | None = None,
        context_id: str | None = None,
    ) -> TaskHandle:
        """Submit a task; returns at once with a handle."""
        # The client picks the id, so a submission repeated after a supervisor restart can't
        # create a second task.
        task_id = _call(self, "submit", text, user, metadata, context_id, uuid.uuid4().hex)
        return TaskHandle(self, task_id)

    def submit_many(self, texts: list[str], *, user: str = "anonymous",
                    task_ids: list[str] | None = None) -> list[TaskHandle]:
        """Submit several tasks in one call to the supervisor (for batches of thousands: one
        Ray call instead of one per task); returns their handles in order.

        The task ids are chosen here (or given as `task_ids`, 8-64 characters each), so a call
        sent again makes only the tasks not made yet. Should the call fail part way (the
        store refused some rows), the exception carries the ids it used as `task_ids`:
        `submit_many(texts, task_ids=exc.task_ids)` finishes the batch."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError("submit_many takes a list of task texts (strings), not "
                            f"{type(texts).__name__}")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"submit_many: text {bad} is {type(texts[bad]).__name__}, not a "
                            "string")
        ids = list(task_ids) if task_ids is not None else [uuid.uuid4().hex for _ in texts]
        if len(ids) != len(texts):
            raise TypeError(f"submit_many: {len(texts)} texts but {len(ids)} task ids")
        try:
            got = _call(self, "submit_many", list(texts), user, ids)
        except Exception as exc:
            exc.task_ids = ids  # type: ignore[attr-defined]
            exc.add_note("submit_many: the task ids this call used are on the exception as "
                         "task_ids; sending the batch again with them makes only the tasks "
                         "not made yet")
            raise
        return [TaskHandle(self, task_id) for task_id in got]

    def wait_all(self, tasks: list[TaskHandle] | list[str], timeout: float | None = None
                 ) -> list[TaskInfo]:
        """Wait for several tasks to end, up to `timeout` seconds, with one pending call to
        the supervisor (not one per task); their rows in order (some maybe unfinished)."""
        ids = [t.id if isinstance(t, TaskHandle) else t for t in tasks]
        return _wait_until_done(timeout, lambda wait: [
            TaskInfo.from_summary(r) for r in _call(self, "wait_many", ids, wait)])

    def task(self, task_id: str) -> TaskHandle:
        """A handle on an existing task (raises `TaskNotFound` if there is none)."""
        handle = TaskHandle(self, task_id)
        handle.status()
        return handle

    def audit(self, *, task_id: str | None = None, since: float | None = None,
              kind: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Audit log entries, oldest first: submissions, tool calls, approvals, task ends.
        `since` is unix seconds; `kind` a kind or its prefix (`approval`, `task`)."""
        return list(_call(self, "audit", task_id, since, kind, limit))

    def archive_audit(self) -> str | None:
        """Move the audit stream into a Parquet file under the run directory; its path."""
        path = _call(self, "audit_archive")
        return None if path is None else str(path)

    def tasks(self, state: str | None = None, user: str | None = None) -> list[TaskInfo]:
        """Tasks and their A2A states, newest first."""
        return [TaskInfo.from_summary(r) for r in _call(self, "list_tasks", state, user)]

    def usage(self, by: str = "role", since: str | float | None = "24h") -> Any:
        """This swarm's usage and cost from its ledger as a pyarrow Table, summed `by` role,
        user, swarm or model, since `since` (30m, 24h, 7d, an ISO date, or unix seconds).

        The ledger's Parquet files are read directly from where the swarm writes them (its
        `usage.dir`, shared storage); rows still buffered in the agents (up to
        `usage.flush_interval_s`) are not in it yet."""
        from datetime import UTC, datetime

        from swarm.errors import UserError
        from swarm.observability.usage import usage_table

        location = _call(self, "info").get("usage_dir")
        if not location:
            raise UserError(f"swarm {self.name} keeps no usage ledger (usage.enabled: false)")
        when = datetime.fromtimestamp(since, UTC) if isinstance(since, int | float) else since
        return usage_table(location, by, when, swarm=self.name)


def connect(name: str, *, address: str | None = None) -> SwarmClient:
    """Connect to the swarm deployed as `name` on the cluster at `address` (default: RAY_ADDRESS,
    else the cluster running on this machine)."""
    import ray

    ensure_ray(address, local_ok=False)
    try:
        sup = ray.get_actor(supervisor_actor_name(name), namespace=NAMESPACE)
    except ValueError:
        raise SwarmNotFound(
            f"no swarm named {name!r} is running; deploy it with `python -m swarm up CONFIG`"
        ) from None
    return SwarmClient(name, sup)
