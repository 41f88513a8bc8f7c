"""Remote A2A agents as swarm members (`agents.X.a2a`).

The supervisor hands off to a remote member like to any agent; its turn is one A2A message sent
with a2a-sdk's client. `RemoteMember` fetches and checks the member's agent card, sends the
turn's text (the swarm task's `traceparent` in the message metadata, one A2A context id per
swarm task so a multi-turn remote keeps its context), streams the remote's status updates into
the task's events (`RemoteUpdate`), and turns the end of the remote task into the turn's result:
COMPLETED is the final answer (its artifacts' text); FAILED, REJECTED, CANCELED, and a remote
that asks for input (swarm doesn't relay a remote's questions to an operator) fail the turn.

A remote that misbehaves costs only the turns that touch it: a connection error, a dropped
connection or a 408/429/5xx answer is retried with backoff (a2a.retries, a2a.backoff_s); a turn
that takes longer than a2a.timeout_s, an A2A protocol error, or an answer that isn't valid A2A
(a task in a state that is not an A2A task state, say) fails the turn at once with error class
`tool` (the remote's own failures are `orchestration`).

`RemoteMemberPool` wraps the pool of local agents and routes remote roles to their member, so it
works the same in one process (`swarm.testing.LocalSwarm`) and on Ray, where it runs in the
supervisor's actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from a2a.client import A2AClientError, A2AClientTimeoutError, Client, ClientConfig, ClientFactory
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import A2AError, UnsupportedOperationError
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict

from swarm.config import A2AMemberConfig, SwarmConfig
from swarm.errors import ConfigError
from swarm.events import Event, RemoteUpdate
from swarm.protocol import a2a
from swarm.protocol.a2a_cards import (
    JsonRpcReplyError,
    card_problem,
    check_cards,
    fetch_card,
    http_client,
)
from swarm.runtime.agent import TurnRequest, TurnResult
from swarm.runtime.supervisor import AgentPool
from swarm.state.interface import Checkpointer, LogEntry
from swarm.tools.resilience import cap_text

__all__ = ["RemoteMember", "RemoteMemberPool", "check_cards", "context_id_for", "state_name"]

log = logging.getLogger(__name__)

# Remote A2A context ids are derived from (swarm, task) in this namespace: stable across
# turns, retries and supervisor restarts, and distinct for every swarm task.
_CONTEXT_NS = uuid.UUID("5f0e4a52-4c1b-4d0e-9a55-a2a0c0ffee01")
_DONE = frozenset({TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED,
                   TaskState.TASK_STATE_CANCELED, TaskState.TASK_STATE_REJECTED,
                   TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED})
# Every state a remote task may report (TASK_STATE_UNSPECIFIED is none: a2a-sdk also reads a
# state name it doesn't know as that).
_STATES = frozenset(v for v in TaskState.values() if v != TaskState.TASK_STATE_UNSPECIFIED)
_CANCEL_TIMEOUT_S = 5.0
_POLL_MAX_S = 5.0
_MAX_TEXT = 2000  # characters of a remote's status text kept in an event or error


def context_id_for(swarm: str, task_id: str) -> str:
    """The A2A context id a swarm task's messages to remote members carry."""
    return uuid.uuid5(_CONTEXT_NS, f"{swarm}/{task_id}").hex


def state_name(state: int) -> str:
    """An A2A task state as a short name (`working`, `input_required`, ...)."""
    try:
        return TaskState.Name(state).removeprefix("TASK_STATE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown({state})"


class _Failed(Exception):
    """A remote turn failed: `error_class` and a message naming the member."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class _Transient(Exception):
    """The remote stream ended before its task did: worth following the task again."""


def _transient(exc: BaseException) -> tuple[bool, str]:
    """Whether another attempt may succeed, and what went wrong in words."""
    cause = exc.__cause__
    if isinstance(exc, _Transient):
        return True, str(exc)
    if isinstance(exc, JsonRpcReplyError):
        return False, str(exc)
    if isinstance(exc, A2AClientTimeoutError):
        # Only a connect timeout is retried: nothing was sent. A read timeout means the
        # remote may still be working, and sending again would start the work twice.
        return isinstance(cause, httpx.ConnectTimeout), f"timed out ({type(cause).__name__})"
    if isinstance(cause, httpx.HTTPStatusError):
        code = cause.response.status_code
        return code >= 500 or code in (408, 429), f"answered HTTP {code}"
    if isinstance(cause, httpx.RequestError):
        return True, f"connection failed: {cause or type(cause).__name__}"
    if isinstance(exc, A2AClientError):
        return False, f"sent an invalid response: {exc}"
    if isinstance(exc, A2AError):
        return False, f"answered with an A2A error: {type(exc).__name__}: {exc}"
    if isinstance(exc, json_format.ParseError):
        # The reply was JSON-RPC, but its result is not the A2A object the method returns
        # (a bare string, say): protobuf's parser reads it and words it as bad JSON.
        return False, ("sent a JSON-RPC result that is not an A2A response (a Task or "
                       f"Message object): {exc}")
    return False, f"sent an unusable response: {type(exc).__name__}: {exc}"


def _text(parts: Any) -> str:
    """Text of message or artifact parts; structured parts as JSON."""
    out = []
    for p in parts:
        if p.HasField("text"):
            out.append(p.text)
        elif p.HasField("data"):
            out.append(json.dumps(MessageToDict(p.data), ensure_ascii=False))
    return "\n".join(t for t in out if t)


@dataclass
class _Progress:
    """What one remote turn has seen so far."""

    task: Task | None = None
    reply: Message | None = None  # a direct message answer (no task)
    events: int = 0

    @property
    def done(self) -> bool:
        return self.reply is not None or (self.task is not None and
                                           self.task.status.state in _DONE)


class RemoteMember:
    """One remote A2A agent of a swarm: its card, its client and its turns."""

    def __init__(self, role: str, cfg: A2AMemberConfig, *, swarm: str, max_calls: int = 1000,
                 store: Checkpointer | None = None,
                 emit: Callable[[list[Event]], None] | None = None) -> None:
        self.role = role
        self.cfg = cfg
        self.swarm = swarm
        self.store = store
        self.emit = emit
        self.card: AgentCard | None = None
        self.problem: str | None = None
        self._max_calls = max_calls
        self._http: httpx.AsyncClient | None = None
        self._client: Client | None = None
        self._lock: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running: dict[str, asyncio.Task[TurnResult]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def where(self) -> str:
        """The member as errors name it."""
        return f"remote agent {self.role} ({self.cfg.url})"

    async def connect(self) -> Client:
        """Fetch and check the card and build the client, once; `ValueError` if the card is
        unusable (asked again at the next call)."""
        if self._client is not None:
            return self._client
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is not None:
                return self._client
            if self._http is None:
                self._http = http_client(self.cfg, self._max_calls)
            try:
                card = await fetch_card(self.cfg, self._http)
            except ValueError as exc:
                self.problem = str(exc)
                raise
            config = ClientConfig(streaming=self.cfg.streaming, httpx_client=self._http)
            self._client = ClientFactory(config).create(card)
            self.card, self.problem = card, None
            return self._client

    async def turn(self, req: TurnRequest) -> TurnResult:
        """Run one turn at the remote; never raises for the remote's failures."""
        inner = asyncio.ensure_future(self._turn(req))
        self._running[req.task_id] = inner
        try:
            return await inner
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # the caller went away: the turn goes with it
            return self._result(req, "canceled", "", None, "canceled")
        except Exception as exc:  # a bug here must fail this turn only
            log.exception("%s: turn of task %s crashed", self.where, req.task_id)
            return self._result(req, "failed", "", "orchestration",
                                f"{self.where}: {type(exc).__name__}: {exc}")
        finally:
            if self._running.get(req.task_id) is inner:
                del self._running[req.task_id]

    def cancel(self, task_id: str) -> bool:
        """Cancel a task's running turn (the remote task is canceled too, best effort)."""
        running = self._running.get(task_id)
        if running is None or running.done():
            return False
        running.cancel()
        return True

    async def aclose(self) -> None:
        """Cancel running turns, then close the connections (after the remote cancels that
        sends, bounded)."""
        running = list(self._running.values())
        for turn in running:
            turn.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=_CANCEL_TIMEOUT_S)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._http is not None:
            await self._http.aclose()
        self._client = self._http = None

    # ---- one turn ----------------------------------------------------------------------------

    async def _turn(self, req: TurnRequest) -> TurnResult:
        text = a2a.message_text(a2a.loads_message(req.message))
        if self.store is not None and not req.resume:
            # The turn is in the task's log like a local agent's: `swarm history` shows it,
            # and a restarted supervisor finds it ended instead of sending it again.
            try:
                await self.store.append(req.log_id or req.task_id, [LogEntry(
                    kind="turn_start", agent=self.role, step=req.step_offset, ts=time.time(),
                    data={"input": text, "turn": req.turn_id})])
            except Exception as exc:
                return self._result(req, "failed", "", "checkpoint",
                                    f"could not log the turn of {self.where}: {exc}")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_calls)
        try:
            async with self._slots:
                answer = await self._call(req, text)
            kind, error_class, error = "final", None, None
        except _Failed as exc:
            kind, answer, error_class, error = "failed", "", exc.error_class, str(exc)
        if self.store is not None:
            try:
                await self.store.append(req.log_id or req.task_id, [LogEntry(
                    kind="turn_end", agent=self.role, step=req.step_offset, ts=time.time(),
                    data={"outcome": kind, "text": answer, "target": None,
                          "error_class": error_class, "error": error, "turn": req.turn_id})])
            except Exception:
                log.warning("task %s: could not log the end of %s's turn", req.task_id,
                            self.role, exc_info=True)
        return self._result(req, kind, answer, error_class, error, text)

    def _result(self, req: TurnRequest, kind: str, answer: str, error_class: str | None,
                error: str | None, text: str | None = None) -> TurnResult:
        reply = a2a.text_message(answer or (error or ""), role="agent", task_id=req.task_id,
                                 context_id=req.context_id,
                                 metadata={"agent": self.role, "outcome": kind})
        added = []
        if kind == "final":
            added = [{"role": "user", "content": text or ""},
                     {"role": "assistant", "content": answer}]
        return TurnResult(task_id=req.task_id, agent=self.role, kind=kind,  # type: ignore[arg-type]
                          message=a2a.dumps(reply), text=answer, error_class=error_class,
                          error=error, added=added)

    def _message(self, req: TurnRequest, text: str) -> Message:
        parts = []
        if self.cfg.transcript:
            lines = [f"{m['role']}: {str(m['content'])[:_MAX_TEXT]}"
                     for m in req.transcript
                     if m.get("role") in ("user", "assistant") and m.get("content")]
            if lines[-self.cfg.transcript:]:
                parts.append(Part(text="Conversation so far:\n"
                                  + "\n".join(lines[-self.cfg.transcript:])))
        parts.append(Part(text=text))
        msg = Message(
            # The same id on every attempt and after a restart (where the turn starts in the
            # log is all that identifies it then): the remote can spot a repeat.
            message_id=uuid.uuid5(_CONTEXT_NS, f"{req.log_id or req.task_id}/{req.step_offset}/"
                                  f"{len(req.transcript)}").hex,
            role=Role.ROLE_USER, parts=parts,
            context_id=context_id_for(self.swarm, req.task_id))
        meta: dict[str, Any] = {"swarm_task_id": req.task_id}
        if req.traceparent:
            meta["traceparent"] = req.traceparent
        msg.metadata.update(meta)
        return msg

    async def _call(self, req: TurnRequest, text: str) -> str:
        """Send the turn (retrying what may succeed) and return the remote's answer."""
        try:
            client = await self.connect()
        except ValueError as exc:
            raise _Failed("tool", f"{self.where} can't be used: {exc}") from None
        msg = self._message(req, text)
        progress = _Progress()
        delay = self.cfg.backoff_s
        attempts = self.cfg.retries + 1
        for attempt in range(1, attempts + 1):
            budget = self.cfg.timeout_s
            if req.deadline is not None:
                budget = min(budget, max(req.deadline - time.time(), 0.001))
            try:
                async with asyncio.timeout(budget):
                    stream = self._send(client, msg) if progress.task is None else \
                        self._follow(client, progress.task.id)
                    async with contextlib.aclosing(stream) as events:
                        async for resp in events:
                            self._apply(req, progress, resp)
                            if progress.done:
                                break
                if not progress.done:
                    state = state_name(progress.task.status.state) if progress.task else "none"
                    raise _Transient(f"the stream ended before the remote task did "
                                     f"(state {state})")
                # A remote is a peer: what it sends is bounded like a tool's result.
                return cap_text(self._outcome(progress), self.cfg.max_answer_chars)
            except TimeoutError:
                self._cancel_remote(progress)
                limit = f"agents.{self.role}.a2a.timeout_s" if budget >= self.cfg.timeout_s \
                    else "the task's max_wall_s"
                raise _Failed("tool", f"{self.where} did not answer within {budget:g} s "
                              f"({limit})") from None
            except asyncio.CancelledError:
                self._cancel_remote(progress)
                raise
            except _Failed:
                raise
            except Exception as exc:
                retry, why = _transient(exc)
                if not retry or attempt == attempts:
                    # The remote task, if it made one, is not followed further: cancel it
                    # (README: a turn that fails this way cancels it).
                    self._cancel_remote(progress)
                    tried = f" ({attempt} attempts)" if attempt > 1 else ""
                    raise _Failed("tool", f"{self.where} {why}{tried}") from None
                wait = delay
                if req.deadline is not None:
                    wait = min(wait, max(req.deadline - time.time(), 0.0))
                self._event(req, "retrying", f"attempt {attempt} {why}; retrying in {wait:g} s",
                            progress)
                await asyncio.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")

    async def _send(self, client: Client, msg: Message) -> AsyncIterator[StreamResponse]:
        # Closed here, in this task: a2a-sdk's instrumented generators must not be finalized
        # from another context.
        stream = client.send_message(SendMessageRequest(message=msg))
        async with contextlib.aclosing(stream) as responses:
            async for resp in responses:
                yield resp

    async def _follow(self, client: Client, task_id: str) -> AsyncIterator[StreamResponse]:
        """After a lost stream, pick the remote task up again instead of sending the message
        twice: its state now, then its updates (or polls, if it doesn't stream)."""
        task = await client.get_task(GetTaskRequest(id=task_id))
        yield StreamResponse(task=task)
        if task.status.state in _DONE:
            return
        if self.cfg.streaming and self.card is not None and self.card.capabilities.streaming:
            stream = client.subscribe(SubscribeToTaskRequest(id=task_id))
            try:
                async with contextlib.aclosing(stream) as responses:
                    async for resp in responses:
                        yield resp
            except UnsupportedOperationError:
                # It ended between the two calls: its final state is there to get.
                yield StreamResponse(task=await client.get_task(GetTaskRequest(id=task_id)))
            return
        wait = 0.2
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 2, _POLL_MAX_S)
            task = await client.get_task(GetTaskRequest(id=task_id))
            yield StreamResponse(task=task)
            if task.status.state in _DONE:
                return

    def _apply(self, req: TurnRequest, progress: _Progress, resp: StreamResponse) -> None:
        """Fold one streamed response into the remote task; report status changes."""
        kind = resp.WhichOneof("payload")
        if kind == "message":
            progress.reply = resp.message
        elif kind == "task":
            before = progress.task.status.state if progress.task is not None else None
            progress.task = Task()
            progress.task.CopyFrom(resp.task)
            self._check_state(progress)
            if resp.task.status.state != before:
                self._event(req, state_name(resp.task.status.state),
                            _text(resp.task.status.message.parts), progress)
        elif kind == "status_update":
            up = resp.status_update
            if progress.task is None:
                progress.task = Task(id=up.task_id, context_id=up.context_id)
            progress.task.status.CopyFrom(up.status)
            self._check_state(progress)
            self._event(req, state_name(up.status.state), _text(up.status.message.parts),
                        progress)
        elif kind == "artifact_update":
            up = resp.artifact_update
            if progress.task is None:
                progress.task = Task(id=up.task_id, context_id=up.context_id)
            for art in progress.task.artifacts:
                if art.artifact_id == up.artifact.artifact_id:
                    if up.append:
                        art.parts.extend(up.artifact.parts)
                    else:
                        art.CopyFrom(up.artifact)
                    break
            else:
                progress.task.artifacts.append(up.artifact)
        else:
            raise A2AClientError(f"a stream response with no payload: {resp}")

    def _check_state(self, progress: _Progress) -> None:
        """Fail the turn at once when the remote task's state is not an A2A task state (it
        would never end: the turn waited for its timeout)."""
        assert progress.task is not None
        state = progress.task.status.state
        if state in _STATES:
            return
        self._cancel_remote(progress)
        shown = (f"{state} (not an A2A task state)" if state != TaskState.TASK_STATE_UNSPECIFIED
                 else "unspecified (none given, or a name that is not an A2A task state)")
        raise _Failed("tool", f"{self.where} reported its task {progress.task.id or '(no id)'} "
                      f"in an invalid state: {shown}")

    def _event(self, req: TurnRequest, state: str, text: str, progress: _Progress) -> None:
        progress.events += 1
        if self.emit is None:
            return
        self.emit([RemoteUpdate(task_id=req.task_id, ts=time.time(), agent=self.role,
                                state=state, text=text[:_MAX_TEXT],
                                remote_task_id=progress.task.id if progress.task else "")])

    def _outcome(self, progress: _Progress) -> str:
        """The remote's answer, or `_Failed` for a task that didn't complete."""
        if progress.reply is not None:
            answer = _text(progress.reply.parts)
            if not answer:
                raise _Failed("orchestration", f"{self.where} answered with no text")
            return answer
        task = progress.task
        assert task is not None
        state, said = task.status.state, _text(task.status.message.parts)
        if state == TaskState.TASK_STATE_COMPLETED:
            answer = "\n\n".join(t for t in (_text(a.parts) for a in task.artifacts) if t)
            if not answer:
                answer = said or next((_text(m.parts) for m in reversed(task.history)
                                       if m.role == Role.ROLE_AGENT and _text(m.parts)), "")
            if not answer:
                raise _Failed("orchestration", f"{self.where} completed its task {task.id} "
                              "with no text answer")
            return answer
        if state in (TaskState.TASK_STATE_INPUT_REQUIRED, TaskState.TASK_STATE_AUTH_REQUIRED):
            self._cancel_remote(progress, force=True)
            raise _Failed("orchestration", f"{self.where} asked for "
                          f"{'input' if state == TaskState.TASK_STATE_INPUT_REQUIRED else 'auth'}"
                          f" ({said[:_MAX_TEXT] or 'no question given'}); swarm doesn't relay a "
                          "remote member's questions, so the turn fails")
        raise _Failed("orchestration", f"{self.where} ended its task {task.id} "
                      f"{state_name(state)}" + (f": {said[:_MAX_TEXT]}" if said else ""))

    def _cancel_remote(self, progress: _Progress, *, force: bool = False) -> None:
        """Ask the remote to cancel a task this turn gave up on (in the background)."""
        task, client = progress.task, self._client
        if task is None or client is None or not task.id or \
                (task.status.state in _DONE and not force):
            return

        async def cancel() -> None:
            try:
                async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                    await client.cancel_task(CancelTaskRequest(id=task.id))
            except Exception as exc:
                log.debug("%s: cancel of remote task %s failed: %s", self.where, task.id, exc)

        job = asyncio.get_running_loop().create_task(cancel())
        self._background.add(job)
        job.add_done_callback(self._background.discard)


class RemoteMemberPool(AgentPool):
    """The swarm's agents: remote A2A members here, every other role in the wrapped pool."""

    def __init__(self, cfg: SwarmConfig, inner: AgentPool | None, *,
                 store: Checkpointer | None = None, swarm_id: str | None = None) -> None:
        self.cfg = cfg
        self.inner = inner
        self.members = {
            role: RemoteMember(role, cfg.agents[role].a2a,  # type: ignore[arg-type]
                               swarm=swarm_id or cfg.name,
                               max_calls=cfg.agents[role].max_sessions, store=store)
            for role in cfg.remote_agents()
        }

    @classmethod
    def around(cls, cfg: SwarmConfig, inner: AgentPool, *, store: Checkpointer | None = None,
               swarm_id: str | None = None) -> AgentPool:
        """`inner` wrapped if the config has remote members, else `inner` itself."""
        if not cfg.remote_agents():
            return inner
        return cls(cfg, inner, store=store, swarm_id=swarm_id)

    def bind(self, emit: Callable[[list[Event]], None]) -> None:
        """Send the remote members' live events to `emit` (the supervisor's push_events)."""
        for member in self.members.values():
            member.emit = emit
        if self.inner is not None:
            self.inner.bind(emit)

    async def start(self, *, strict: bool = True) -> list[dict[str, Any]]:
        """Fetch the cards of the members checked at start-up; with `strict` a bad one raises
        `ConfigError` naming it, else it is reported. One report per member."""
        async def one(role: str, member: RemoteMember) -> tuple[str, BaseException | None]:
            if member.cfg.check != "startup":
                return role, None
            try:
                await member.connect()
            except ValueError as exc:
                return role, exc
            return role, None

        results = await asyncio.gather(*(one(r, m) for r, m in self.members.items()))
        problems = [card_problem(role, self.members[role].cfg.url, exc)
                    for role, exc in results if exc is not None]
        if problems and strict:
            raise ConfigError(problems)
        return [self.report(role) for role in self.members]

    def report(self, role: str) -> dict[str, Any]:
        """A ready report for a member, like an agent replica's."""
        m = self.members[role]
        card = f"card {m.card.name!r} v{m.card.version}" if m.card is not None else (
            "card not fetched yet" if m.problem is None else "card unusable")
        return {"role": role, "replica": 0, "tools": [f"a2a {m.cfg.url} ({card})"],
                "problems": [m.problem] if m.problem else []}

    async def turn(self, role: str, key: str, req: TurnRequest, attempt: int = 0) -> TurnResult:
        """A remote member's turn here; any other role's in the wrapped pool."""
        member = self.members.get(role)
        if member is not None:
            return await member.turn(req)
        assert self.inner is not None, f"no agent {role} in this pool"
        return await self.inner.turn(role, key, req, attempt)

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Cancel the task's turn wherever it runs."""
        member = self.members.get(role)
        if member is not None:
            member.cancel(task_id)
        elif self.inner is not None:
            await self.inner.cancel(role, key, task_id)

    async def aclose(self) -> None:
        """Close every member's connections."""
        await asyncio.gather(*(m.aclose() for m in self.members.values()),
                             return_exceptions=True)
