"""a2a-sdk's task store and request handler over the swarm's own task table.

The supervisor owns every task (A2A `Task`s in its table, rebuilt from the durable store when it
restarts), so `SupervisorTaskStore` reads from it and stores nothing of its own: GetTask and
ListTasks see every task of the swarm (CLI and Python-client ones included), and a restarted
Serve replica has lost nothing. The SDK's own writes are the task states it derived from the
executor's events, which come from the supervisor in the first place, so they are dropped; a
write that moves a task to CANCELED (CancelTask of a task no executor here is running) cancels
it in the swarm.

`SwarmRequestHandler` is a2a-sdk's `DefaultRequestHandler` with SubscribeToTask served from the
supervisor's event list, so a subscription works on any replica, for any task, whoever answers
its questions.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from a2a.server.cluster import ConcurrentTaskModificationError
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.request_handler import validate_request_params
from a2a.server.tasks import TaskStore
from a2a.types import (
    ListTasksRequest,
    ListTasksResponse,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.constants import DEFAULT_LIST_TASKS_PAGE_SIZE
from a2a.utils.errors import (
    InternalError,
    InvalidParamsError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.task import (
    ListTasksCursor,
    apply_history_length,
    decode_list_tasks_cursor,
    encode_list_tasks_cursor,
)

from swarm.errors import SwarmError, SwarmNotFound, TaskExists, TaskNotFound, UserError
from swarm.protocol import a2a
from swarm.protocol.a2a_server.bridge import Snapshot, SwarmLink, follow
from swarm.protocol.a2a_server.listing import TaskQuery, sort_key

_CREATING_TTL_S = 300.0


def a2a_error(exc: SwarmError) -> Exception:
    """The A2A error a client should see for a swarm error."""
    if isinstance(exc, TaskNotFound):
        return TaskNotFoundError(message=str(exc))
    if isinstance(exc, UserError) and not isinstance(exc, SwarmNotFound):
        return InvalidParamsError(message=str(exc))
    return InternalError(message=f"{type(exc).__name__}: {exc}")


async def snapshot(link: SwarmLink, task_id: str) -> Snapshot | None:
    """The task now (None if there is none), swarm errors turned into A2A errors."""
    try:
        return await link.snapshot(task_id)
    except SwarmError as exc:
        raise a2a_error(exc) from None


class SupervisorTaskStore(TaskStore):
    """The swarm's task table as a2a-sdk's `TaskStore` (see the module docstring)."""

    def __init__(self, link: SwarmLink) -> None:
        self.link = link
        # Tasks a request is creating, by id: the request's call context and when it began.
        # Until the SDK has stored that request's first Task event, the task is hidden from the
        # request itself, so the SDK takes it for new (it is in the swarm's table already).
        self._creating: dict[str, tuple[ServerCallContext, float]] = {}

    def creating(self, task_id: str, context: ServerCallContext) -> None:
        """Note that the request with `context` is creating task `task_id`."""
        now = time.monotonic()
        for tid in [t for t, (_, t0) in self._creating.items() if now - t0 > _CREATING_TTL_S]:
            del self._creating[tid]  # a request that never got its first event stored
        self._creating[task_id] = (context, now)

    def _hidden(self, task_id: str, context: ServerCallContext) -> bool:
        held = self._creating.get(task_id)
        return held is not None and held[0] is context

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        """The task as the supervisor holds it."""
        if self._hidden(task_id, context):
            return None
        snap = await snapshot(self.link, task_id)
        return None if snap is None else snap.task

    async def save(self, task: Task, context: ServerCallContext) -> None:
        """Drop the SDK's copy of a task, except that CANCELED cancels it in the swarm."""
        if self._hidden(task.id, context):
            del self._creating[task.id]  # the creating request's first event is stored
            return
        if task.status.state != TaskState.TASK_STATE_CANCELED:
            return
        try:
            row = await self.link.call("cancel", task.id)
        except TaskNotFound:
            raise ConcurrentTaskModificationError(task.id) from None
        except SwarmError as exc:
            raise a2a_error(exc) from None
        if row["state"] != "canceled":  # it ended otherwise first
            raise ConcurrentTaskModificationError(task.id)

    async def list(self, params: ListTasksRequest, context: ServerCallContext
                   ) -> ListTasksResponse:
        """One page of the swarm's tasks, newest status first."""
        after = None
        if params.page_token:
            cursor = decode_list_tasks_cursor(params.page_token)
            if cursor is None:
                raise InvalidParamsError(message=f"invalid page token {params.page_token!r}")
            after = cursor.sort_key()
        limit = params.page_size or DEFAULT_LIST_TASKS_PAGE_SIZE
        query = TaskQuery(
            context_id=params.context_id, state=int(params.status),
            since_ns=params.status_timestamp_after.ToNanoseconds()
            if params.HasField("status_timestamp_after") else None,
            after=after, limit=limit)
        try:
            blobs, total, more = await self.link.call("list_a2a", query)
        except SwarmError as exc:
            raise a2a_error(exc) from None
        tasks = [a2a.loads_task(b) for b in blobs]
        token = ""
        if more and tasks:
            has_ts, ts_ns, task_id = sort_key(tasks[-1])
            token = encode_list_tasks_cursor(
                ListTasksCursor(timestamp_ns=ts_ns if has_ts else None, task_id=task_id))
        return ListTasksResponse(tasks=tasks, next_page_token=token, page_size=limit,
                                 total_size=total)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        """Delete a finished task's durable state (as `swarm forget` would)."""
        try:
            await self.link.call("forget", task_id)
        except SwarmError as exc:
            raise a2a_error(exc) from None


class SwarmRequestHandler(DefaultRequestHandler):
    """a2a-sdk's default handler, with SubscribeToTask following the supervisor's events."""

    def __init__(self, *, link: SwarmLink, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.link = link

    async def _sent_before(self, params: SendMessageRequest, context: ServerCallContext
                           ) -> Task | None:
        """The task a new message made when it was sent before, if that task has ended
        (a2a-sdk refuses to run an ended task again; a client's retry gets it as it is). A task
        still running is left to the executor, which follows it. Another message under the
        same id (another text or sender) is refused here, whatever its task's state: a2a-sdk
        would answer it with the running task."""
        if not params.HasField("message") or params.message.task_id or \
                not params.message.message_id:
            return None
        probe = SendMessageRequest()
        probe.CopyFrom(params)  # the builder writes the ids it derives into the message
        request = await self._request_context_builder.build(
            context=context, params=probe, task_id=None,
            context_id=probe.message.context_id or None)
        task_id = str(request.task_id)
        snap = await snapshot(self.link, task_id)
        if snap is None:
            return None
        text = getattr(request, "text", None)
        from swarm.protocol.a2a_server.executor import caller

        try:  # the same submission is a retry; another message under the same id is refused
            await self.link.call("submit", text, caller(context, params.message), {"via": "a2a"},
                                 str(request.context_id), task_id, params.message.message_id)
        except TaskExists:
            raise InvalidParamsError(message=(
                f"messageId {params.message.message_id!r} was sent before with another text "
                f"(it started task {task_id}); a new message needs a new messageId")) from None
        except SwarmError as exc:
            raise a2a_error(exc) from None
        if snap.state not in a2a.TERMINAL:
            return None
        return apply_history_length(snap.task, params.configuration)

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext
                              ) -> Message | Task:
        """a2a-sdk's, but a message sent again whose task has ended gets that task."""
        ended = await self._sent_before(params, context)
        if ended is not None:
            return ended
        return await super().on_message_send(params, context)

    async def on_message_send_stream(self, params: SendMessageRequest,
                                     context: ServerCallContext) -> AsyncGenerator[Event, None]:
        """a2a-sdk's, but a message sent again whose task has ended gets that task."""
        ended = await self._sent_before(params, context)
        if ended is not None:
            yield ended
            return
        async for event in super().on_message_send_stream(params, context):
            yield event

    @validate_request_params
    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest,
                                   context: ServerCallContext) -> AsyncGenerator[Event, None]:
        """The task as it is now, then its updates until it ends or waits for input again."""
        snap = await snapshot(self.link, params.id)
        if snap is None:
            raise TaskNotFoundError
        if snap.state in a2a.TERMINAL:
            raise UnsupportedOperationError(
                message=f"Task {params.id} is in terminal state: "
                f"{TaskState.Name(snap.task.status.state)}")
        yield snap.task
        try:
            async for event in follow(self.link, snap.task.id, snap.task.context_id,
                                      snap.events):
                yield event
        except SwarmError as exc:
            raise a2a_error(exc) from None
