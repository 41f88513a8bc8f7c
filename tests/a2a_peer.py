"""A real A2A server on 127.0.0.1 for tests: a2a-sdk's own server pieces under uvicorn, in a
thread, with one agent per mode mounted at its own path (`http://127.0.0.1:PORT/<mode>`).

Modes:
- `echo`: answers "echo: <text>" in an artifact (a card without streaming: SendMessage).
- `stream`: streams three WORKING status updates, then the answer (SendStreamingMessage).
- `slow`: starts working and never answers (until the peer stops).
- `hold`: starts working and answers like `echo` once the test calls `release_hold()`.
- `drop`: serves a good card, then cuts the connection in the middle of every message call.
- `garbage`: serves a good card, then answers every message call with bytes that aren't JSON.
- `flaky`: answers 503 to the first two message calls, then behaves like `echo`.
- `cut`: streams like `stream`, but the first call's connection is cut after the first event;
  the remote task goes on once the client subscribes to it again (the third call).
- `fail`: the remote task ends FAILED with a reason.
- `ask`: the remote task asks for input (INPUT_REQUIRED).
- `badcard`: its card is JSON but not an agent card (a2a-sdk refuses to parse it).
- `emptycard`: its card parses but lacks every field the A2A spec requires.
- `badstate`: answers a message (without streaming) with a task in the state the message's text
  names after "badstate: " (a number if it is digits), valid A2A or not.
- `badid`: answers a message with a JSON-RPC reply whose id is not the request's ("not-" and
  the request's id), as one JSON body (SendMessage) or as an event stream (streaming).
- `strresult`: answers a message with a well-formed JSON-RPC reply whose result is a string,
  not a Task or Message.
- `hangcard`: its card endpoint never answers.
- `bigcard`: its card is a body of 64 MB (spaces after a `{`), sent as fast as it is read.
- `tricklecard`: its card comes a byte every 0.2 s (at most 300 of them: a minute).
- `bigreply`: serves a good card, then answers every message call with a 64 MB body.
- `gzipreply`: serves a good card, then answers every message call gzip-compressed.
- `binarycard`: its card's body is not UTF-8.

The peer records every message it was sent (`received[mode]`) so tests can check the context
id, the metadata (traceparent) and how many times a message was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from a2a.helpers import new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Role,
    TaskState,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

MODES = ("echo", "stream", "slow", "hold", "drop", "garbage", "flaky", "fail", "ask", "cut",
         "badcard", "emptycard", "badstate", "badid", "strresult", "hangcard", "bigcard",
         "tricklecard", "bigreply", "gzipreply", "binarycard")
# Modes whose message calls are answered by `_Misbehave` (their cards stay good).
MISBEHAVING = ("drop", "garbage", "flaky", "cut", "badstate", "badid", "strresult", "bigreply",
               "gzipreply")
# Modes whose card says they don't stream (their messages come as SendMessage).
NOT_STREAMING = ("echo", "badstate")
STREAM_UPDATES = ("reading the question", "looking it up", "writing the answer")


class PeerExecutor(AgentExecutor):
    """The agent behind one mode."""

    def __init__(self, peer: A2APeer, mode: str) -> None:
        self.peer = peer
        self.mode = mode

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Answer the message the way this mode does."""
        msg = context.message
        assert msg is not None
        self.peer.received[self.mode].append(_copy(msg))
        text = context.get_user_input()
        task_id, context_id = context.task_id or "", context.context_id or ""
        updater = TaskUpdater(event_queue, task_id, context_id)
        if context.current_task is None:
            await event_queue.enqueue_event(new_task(task_id, context_id,
                                                     TaskState.TASK_STATE_SUBMITTED, history=[msg]))
        await updater.start_work()
        if self.mode == "cut":
            # Until the client has picked the task up again (GetTask, then SubscribeToTask).
            await self.peer.resubscribed.wait()
        if self.mode in ("stream", "cut"):
            for i, what in enumerate(STREAM_UPDATES, 1):
                await updater.update_status(TaskState.TASK_STATE_WORKING, _agent_msg(
                    f"{i}/{len(STREAM_UPDATES)}: {what}", task_id, context_id))
        elif self.mode == "slow":
            await self.peer.released.wait()
            return
        elif self.mode == "hold":
            await self.peer.hold.wait()
        elif self.mode == "fail":
            await updater.failed(_agent_msg("the remote database is down", task_id, context_id))
            return
        elif self.mode == "ask":
            await updater.requires_input(_agent_msg("which currency?", task_id, context_id))
            return
        turn = sum(1 for m in self.peer.received[self.mode] if m.context_id == context_id)
        await updater.add_artifact([new_text_part(f"echo: {text}")], name="answer",
                                   metadata={"turn_in_context": turn})
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """Mark the task canceled."""
        self.peer.canceled[self.mode] += 1
        updater = TaskUpdater(event_queue, context.task_id or "", context.context_id or "")
        await updater.cancel()


def _copy(msg: Message) -> Message:
    out = Message()
    out.CopyFrom(msg)
    return out


def _agent_msg(text: str, task_id: str, context_id: str) -> Message:
    return new_text_message(text, context_id=context_id, task_id=task_id, role=Role.ROLE_AGENT)


def card(base: str, mode: str) -> AgentCard:
    """The (valid) agent card of one mode."""
    return AgentCard(
        name=f"peer-{mode}", description=f"A test A2A agent ({mode})", version="1.0.0",
        supported_interfaces=[AgentInterface(url=f"{base}/{mode}/", protocol_binding="JSONRPC",
                                             protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=mode not in NOT_STREAMING),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id="answer", name="answer", description="answers questions",
                           tags=["test"])],
    )


class _Misbehave:
    """ASGI app for the message endpoint of the `MISBEHAVING` modes."""

    def __init__(self, peer: A2APeer, mode: str, good: Any) -> None:
        self.peer, self.mode, self.good = peer, mode, good

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.good(scope, receive, send)
        self.peer.calls[self.mode] += 1
        if self.mode == "flaky" and self.peer.calls[self.mode] > 2:
            return await self.good(scope, receive, send)
        if self.mode == "cut":
            if self.peer.calls[self.mode] == 3:
                self.peer.resubscribed.set()
            return await self._cut(scope, receive, send)
        request = Request(scope, receive)
        body = await request.body()
        if self.mode == "badstate":
            return await self._task_in_state(json.loads(body))(scope, receive, send)
        if self.mode == "badid":
            return await self._other_id(json.loads(body))(scope, receive, send)
        if self.mode == "strresult":
            reply = {"jsonrpc": "2.0", "id": json.loads(body)["id"], "result": "just a string"}
            return await JSONResponse(reply)(scope, receive, send)
        if self.mode == "flaky":
            return await Response("overloaded", status_code=503)(scope, receive, send)
        if self.mode == "garbage":
            return await Response(b"{this is not json", media_type="application/json")(
                scope, receive, send)
        if self.mode == "bigreply":
            return await StreamingResponse(_big_body(), media_type="application/json")(
                scope, receive, send)
        if self.mode == "gzipreply":
            import gzip

            task = {"id": "t", "contextId": "c", "status": {"state": "TASK_STATE_COMPLETED"}}
            reply = {"jsonrpc": "2.0", "id": json.loads(body)["id"], "result": {"task": task}}
            return await Response(gzip.compress(json.dumps(reply).encode()),
                                  media_type="application/json",
                                  headers={"content-encoding": "gzip"})(scope, receive, send)
        # drop: promise a body, send part of it, then go away (uvicorn closes the connection).
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b'{"jsonrpc": "2.0", "re',
                    "more_body": True})
        raise ConnectionAbortedError("the test peer drops the connection")

    def _task_in_state(self, call: dict[str, Any]) -> Response:
        """A JSON-RPC reply to `call`: the task, in the state the last message's text named
        (GetTask finds it there still; CancelTask cancels it)."""
        state: str | int
        if call["method"] == "SendMessage":
            state = call["params"]["message"]["parts"][0]["text"].split("badstate: ", 1)[1]
            self.peer.bad_state = int(state) if state.isdigit() else state
        state = "TASK_STATE_CANCELED" if call["method"] == "CancelTask" else self.peer.bad_state
        task = {"id": "task-in-a-bad-state", "contextId": "c", "status": {"state": state}}
        return JSONResponse({"jsonrpc": "2.0", "id": call["id"],
                             "result": {"task": task} if call["method"] == "SendMessage"
                             else task})

    @staticmethod
    def _other_id(call: dict[str, Any]) -> Response:
        """A reply to `call` under another id: a completed task, whole or as one event."""
        task = {"id": "t", "contextId": "c", "status": {"state": "TASK_STATE_COMPLETED"}}
        reply = {"jsonrpc": "2.0", "id": f"not-{call['id']}", "result": {"task": task}}
        if call["method"] == "SendStreamingMessage":
            return Response(f"data: {json.dumps(reply)}\n\n", media_type="text/event-stream")
        return JSONResponse(reply)

    async def _cut(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = self.peer.calls[self.mode] == 1
        sent = 0

        async def cutting(message: Any) -> None:
            nonlocal sent
            if first and message["type"] == "http.response.body" and message.get("body"):
                if sent == 1:
                    raise ConnectionAbortedError("the test peer cuts the stream")
                sent += 1
            await send(message)

        await self.good(scope, receive, cutting)


async def _big_body() -> AsyncIterator[bytes]:
    """64 MB: `{` and spaces, 64 KB a chunk."""
    yield b"{"
    for _ in range(1024):
        yield b" " * 65_536


async def _big_card(request: Request) -> Response:
    return StreamingResponse(_big_body(), media_type="application/json")


async def _trickle_card(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(300):
            yield b" "
            await asyncio.sleep(0.2)

    return StreamingResponse(body(), media_type="application/json")


async def _never_answer(request: Request) -> Response:
    """A card endpoint that keeps the request open until the server stops."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class A2APeer:
    """The server: start it (a free port, a thread), use `url(mode)`, stop it."""

    def __init__(self) -> None:
        self.received: dict[str, list[Message]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)
        self.canceled: dict[str, int] = defaultdict(int)
        self.bad_state: str | int = ""  # the state `badstate` reports its task in
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.released: asyncio.Event  # made in the server's loop
        self.resubscribed: asyncio.Event
        self.hold: asyncio.Event

    def url(self, mode: str) -> str:
        """The base URL of a mode's agent (its card is under /.well-known/agent-card.json)."""
        return f"{self.base}/{mode}"

    def _app(self) -> Starlette:
        mounts = []
        for mode in MODES:
            c = card(self.base, mode)
            routes: list[Any]
            if mode == "badcard":
                routes = [Route("/.well-known/agent-card.json",
                                lambda r: JSONResponse({"name": ["not", "a", "string"],
                                                        "skills": "none"}))]
            elif mode == "hangcard":
                routes = [Route("/.well-known/agent-card.json", _never_answer)]
            elif mode == "bigcard":
                routes = [Route("/.well-known/agent-card.json", _big_card)]
            elif mode == "tricklecard":
                routes = [Route("/.well-known/agent-card.json", _trickle_card)]
            elif mode == "binarycard":
                routes = [Route("/.well-known/agent-card.json", lambda r: Response(
                    b'{"name": "\xff\xfe"}', media_type="application/json"))]
            elif mode == "emptycard":
                routes = [Route("/.well-known/agent-card.json",
                                lambda r: JSONResponse({"description": "no name, no url"}))]
            else:
                handler = DefaultRequestHandler(
                    agent_executor=PeerExecutor(self, mode), task_store=InMemoryTaskStore(),
                    agent_card=c)
                routes = [*create_agent_card_routes(c), *create_jsonrpc_routes(handler, "/")]
            inner = Starlette(routes=routes)
            app: Any = inner
            if mode in MISBEHAVING:
                app = _Misbehave(self, mode, inner)
                # The card stays good: only message calls misbehave.
                app = Starlette(routes=[*create_agent_card_routes(c), Mount("/", app=app)])
            mounts.append(Mount(f"/{mode}", app=app))
        return Starlette(routes=mounts)

    def start(self) -> A2APeer:
        """Serve in a background thread; the socket already listens, so calls can start now."""
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self.released = asyncio.Event()
            self.resubscribed = asyncio.Event()
            self.hold = asyncio.Event()
            ready.set()
            assert self._server is not None
            loop.run_until_complete(self._server.serve(sockets=[self._sock]))
            # Streams and agent tasks still open end here, not as warnings at interpreter exit.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="a2a-peer", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the A2A test peer did not start")
        return self

    def release_hold(self) -> None:
        """Let the `hold` agent's waiting tasks answer."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.hold.set)

    def stop(self) -> None:
        """Release slow calls, stop serving and join the thread."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.released.set)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self._sock.close()


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
