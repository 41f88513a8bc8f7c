"""a2a-sdk's `AgentExecutor` for a swarm, and the request context builder that reads messages.

A new message (no task id) is a new task: the builder checks its text and derives the task id
from the sender, the context and the message id (`retry_ids`), so a message sent again (a
client's retry) names the task the first one made; the executor submits it to the supervisor,
emits the Task (SUBMITTED, the message in its history) and then the swarm's events as A2A events
until the task ends or asks for input. For a message sent again it emits the task as it is,
then follows it if it still runs. A message naming a task in INPUT_REQUIRED is its answer: the
builder reads it (see `bridge.read_answer`), the executor sends the decision and follows the
task from there. Cancel is the supervisor's cancel.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from a2a.server.agent_execution import AgentExecutor, RequestContext, RequestContextBuilder
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.types import Message, SendMessageRequest, Task, TaskState, TaskStatus
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError, UnsupportedOperationError

from swarm.errors import SwarmError
from swarm.protocol import a2a
from swarm.protocol.a2a_server.bridge import (
    Answer,
    SwarmLink,
    apply_answer,
    final_events,
    follow,
    is_final,
    read_answer,
    request_text,
)
from swarm.protocol.a2a_server.store import SupervisorTaskStore, a2a_error, snapshot

DEFAULT_USER = "a2a"
_LABEL_CHARS = 64  # the most a sender's label (`metadata.user`) may have


def caller(context: ServerCallContext, message: Message | None) -> str:
    """Who sent a message: the authenticated user, else the message's `metadata.user` (a label,
    as `swarm submit --user` gives one), else "a2a". A label that isn't a string of 1 to 64
    characters is an invalid-params error, not replaced."""
    if context.user.is_authenticated and context.user.user_name:
        return context.user.user_name
    if message is not None and "user" in message.metadata:
        named = message.metadata["user"]
        if isinstance(named, str) and 0 < len(named) <= _LABEL_CHARS:
            return named
        what = f"a string of {len(named)} characters" if isinstance(named, str) else \
            f"a {type(named).__name__}"
        raise InvalidParamsError(message=f"metadata.user, the sender's label, must be a "
                                 f"string of 1 to {_LABEL_CHARS} characters, not {what}")
    return DEFAULT_USER


_IDS = uuid.UUID("6f1d3c1e-5a0b-4c55-9a43-2c7e8f0b9d21")  # the namespace of derived ids


def retry_ids(who: str, context_id: str | None, message_id: str) -> tuple[str, str]:
    """The task and context ids of a new message: the same for the same message sent again by
    the same sender (into the same context, or into none, when the context is derived too), so
    the supervisor takes the second send for a retry of the first. Nothing is remembered."""
    context_id = context_id or uuid.uuid5(_IDS, f"context\0{who}\0{message_id}").hex
    return uuid.uuid5(_IDS, f"task\0{who}\0{context_id}\0{message_id}").hex, context_id


class SwarmRequestContext(RequestContext):
    """a2a-sdk's request context plus what the builder read from the message: the task text
    of a new task, or the answer to a pending question."""

    text: str | None = None
    answer: Answer | None = None


class SwarmRequestContextBuilder(RequestContextBuilder):
    """Checks a message before anything runs, so a bad one gets its error with no task made."""

    def __init__(self, link: SwarmLink, max_task_chars: int) -> None:
        self.link = link
        self.max_task_chars = max_task_chars

    async def build(self, context: ServerCallContext, params: SendMessageRequest | None = None,
                    task_id: str | None = None, context_id: str | None = None,
                    task: Task | None = None) -> RequestContext:
        """A context holding the new task's text, or the answer for the named task."""
        text, answer = None, None
        if params is not None:
            if task_id:
                snap = await snapshot(self.link, task_id)
                if snap is None:
                    raise TaskNotFoundError(message=f"Task {task_id} not found")
                if snap.state != "input_required":
                    raise UnsupportedOperationError(
                        message=f"task {task_id} is {snap.state}; a message naming a task is "
                        "the answer to its question and is taken only while the task is "
                        "input-required (send a message without a task id for a new task)")
                answer = read_answer(params.message, snap)
            else:
                text = request_text(params.message, self.max_task_chars)
                if params.message.message_id:
                    task_id, context_id = retry_ids(caller(context, params.message), context_id,
                                                    params.message.message_id)
        out = SwarmRequestContext(call_context=context, request=params, task_id=task_id,
                                  context_id=context_id, task=task)
        out.text, out.answer = text, answer
        return out


@dataclass
class _Run:
    final: bool = False  # the terminal status is in the queue (from the stream or a cancel)


class SwarmAgentExecutor(AgentExecutor):
    """Runs A2A requests as swarm tasks (see the module docstring)."""

    def __init__(self, link: SwarmLink, store: SupervisorTaskStore) -> None:
        self.link = link
        self.store = store
        self._runs: dict[str, _Run] = {}

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Submit or answer, then stream the task's events until it ends or asks for input."""
        if not isinstance(context, SwarmRequestContext) or context.message is None:
            raise UnsupportedOperationError(message="this executor needs its own context builder")
        task_id, context_id = str(context.task_id), str(context.context_id)
        run = _Run()
        self._runs[task_id] = run
        try:
            if context.answer is not None:
                who = caller(context.call_context, context.message)
                await apply_answer(self.link, task_id, context.answer, who)
                cursor = context.answer.cursor
            else:
                cursor = await self._submit(context, event_queue)
                if cursor is None:
                    return  # sent again: the task has ended or waits for input, as emitted
            async for event in follow(self.link, task_id, context_id, cursor):
                if is_final(event):
                    if run.final:
                        return  # a cancel got there first
                    run.final = True
                await event_queue.enqueue_event(event)
        except SwarmError as exc:
            raise a2a_error(exc) from None
        finally:
            if self._runs.get(task_id) is run:
                del self._runs[task_id]

    async def _submit(self, context: SwarmRequestContext, queue: EventQueue) -> int | None:
        """Submit the task; where its stream goes on (its events so far), or None if the
        message was sent before and its task has ended or waits for input."""
        message = context.message
        assert message is not None and context.text is not None
        task_id, context_id = str(context.task_id), str(context.context_id)
        sent = await self.link.snapshot(task_id)  # the task of this message, sent before
        if sent is None:
            self.store.creating(task_id, context.call_context)
        # The supervisor takes the same submission again for a retry (and refuses another
        # message under the same id: a different text or sender).
        await self.link.call("submit", context.text, caller(context.call_context, message),
                             {"via": "a2a"}, context_id, task_id, message.message_id)
        if sent is not None:
            await queue.enqueue_event(sent.task)
            if sent.state in a2a.TERMINAL or sent.state == "input_required":
                return None
            return sent.events
        status = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
        status.timestamp.GetCurrentTime()
        await queue.enqueue_event(Task(id=task_id, context_id=context_id, status=status,
                                       history=[message]))
        return 0

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Cancel the task in the swarm and end its stream with the state it ended in."""
        task_id = str(context.task_id)
        try:
            await self.link.call("cancel", task_id)
            snap = await self.link.snapshot(task_id)
        except SwarmError as exc:
            raise a2a_error(exc) from None
        if snap is None or snap.state not in a2a.TERMINAL:
            return
        run = self._runs.get(task_id)
        if run is not None:
            if run.final:
                return
            run.final = True
        for event in final_events(snap.task):
            await event_queue.enqueue_event(event)
