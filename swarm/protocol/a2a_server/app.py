"""The A2A HTTP app (Starlette, from a2a-sdk's routes) and its Ray Serve deployment.

`build_app` is a plain ASGI app over any `SwarmLink`, testable in one process. `deploy_a2a`
runs it as a Serve application next to a deployed swarm: each replica finds the supervisor actor
by the swarm's name, so the app holds no task state and any replica answers for any task.

Paths under the app's base URL: `/.well-known/agent-card.json` (the card), `/` (JSON-RPC,
POST) and `/rest/...` (the HTTP+JSON binding: `/rest/message:send`, `/rest/tasks/{id}`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from a2a.server.jsonrpc_models import JSONParseError
from a2a.server.request_handlers import build_error_response
from a2a.server.routes import (
    create_agent_card_routes,
    create_jsonrpc_routes,
    create_rest_routes,
)
from a2a.types import AgentCard, TaskState
from a2a.utils.error_handlers import build_error_details
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swarm.protocol.a2a_server.bridge import RayLink, SwarmLink
from swarm.protocol.a2a_server.card import JSONRPC_PATH, REST_PATH, build_agent_card
from swarm.protocol.a2a_server.executor import SwarmAgentExecutor, SwarmRequestContextBuilder
from swarm.protocol.a2a_server.store import SupervisorTaskStore, SwarmRequestHandler

if TYPE_CHECKING:
    from ray.serve import Application

    from swarm.config import SwarmConfig

CARD_PATH = "/.well-known/agent-card.json"
PARKED_S = 30.0
# How deep arrays and objects may nest in a request body: far more than an A2A request needs
# (protobuf's JSON reader stops at 100 nested messages), far less than the stack json.loads
# needs to recurse (100,000 nested `[` were a RecursionError: an internal error, -32603).
MAX_JSON_DEPTH = 200
# What the depth scan looks at: strings (skipped whole, brackets in them don't count; one left
# open runs to the end, so no text is scanned twice) and brackets.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)|[\[\]{}]', re.DOTALL)


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest more than `limit` deep in `body` (JSON or not)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case, counted at C speed
    depth = 0
    for m in _JSON_TOKENS.finditer(body):
        c = m[0][0]
        if c in b"[{":
            depth += 1
            if depth > limit:
                return True
        elif c in b"]}":
            depth -= 1
    return False


class BodyLimit:
    """Refuses request bodies over `max_bytes`, or whose JSON nests deeper than
    `MAX_JSON_DEPTH`, before a2a-sdk parses them: the JSON-RPC endpoint with JSON-RPC error
    -32600 for the size (as a2a-sdk answers a body Starlette finds too large) and -32700 (parse
    error) for the depth, the REST binding with HTTP 413 or 400 in its error format. A body
    within the limits is read here and handed on whole. A body that is not UTF-8 is a parse
    error too (-32700, HTTP 400), as JSON must be UTF-8."""

    def __init__(self, app: ASGIApp, max_bytes: int, rpc_path: str = JSONRPC_PATH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.rpc_path = rpc_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, int(declared))
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        if json_too_deep(body):
            await self._refuse_deep(scope, send)
            return
        try:
            body.decode("utf-8")  # JSON is UTF-8 (RFC 8259); a2a-sdk's reader would fail inside
        except UnicodeDecodeError as exc:
            await self._refuse_encoding(scope, send, exc)
            return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # streaming responses listen for the disconnect

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        text = (f"Payload too large: the request body is {size} bytes; this agent accepts at "
                f"most {self.max_bytes} (a2a.max_body_bytes)")
        await self._error(scope, send, text, InvalidRequestError(message=text), 413)

    async def _refuse_deep(self, scope: Scope, send: Send) -> None:
        text = (f"JSON nested too deeply: the request body nests arrays and objects more than "
                f"{MAX_JSON_DEPTH} levels deep, which this agent does not parse")
        # As a2a-sdk answers JSON it can't parse: -32700 (parse error), HTTP 400.
        await self._error(scope, send, text, JSONParseError(message=text), 400)

    async def _refuse_encoding(self, scope: Scope, send: Send, exc: UnicodeDecodeError
                               ) -> None:
        text = (f"the request body is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}): JSON must be UTF-8")
        await self._error(scope, send, text, JSONParseError(message=text), 400)

    async def _error(self, scope: Scope, send: Send, text: str,
                     rpc_error: InvalidRequestError | JSONParseError, status: int) -> None:
        """The JSON-RPC endpoint's answer `rpc_error`, or the REST binding's: `status`, with
        `text` as an invalid request."""
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if (path or "/") == self.rpc_path:
            response = JSONResponse(build_error_response(None, rpc_error))
        else:
            details = build_error_details(InvalidRequestError(message=text))
            response = JSONResponse(
                {"error": {"code": status, "status": "INVALID_ARGUMENT", "message": text,
                           "details": details}}, status_code=status)
        await response(scope, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _state_error(value: Any) -> str | None:
    """Why a ListTasks `status` filter is no task state (a2a-sdk's parser would read an unknown
    name as "any state" and an unknown number as a state no task has), or None if it is one."""
    if isinstance(value, str) and value in TaskState.keys():
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in TaskState.values():
        return None
    if isinstance(value, str) and value.isdigit() and int(value) in TaskState.values():
        return None
    return (f"unknown task status {value!r}; status is one of "
            f"{', '.join(TaskState.keys())} (or its number)")


class StatusFilterCheck:
    """Refuses ListTasks with a `status` filter that is no task state, as invalid params
    (JSON-RPC -32602, HTTP 400 on the REST binding). Sits inside `BodyLimit`, whose body it
    reads again."""

    def __init__(self, app: ASGIApp, rpc_path: str = JSONRPC_PATH,
                 list_path: str = REST_PATH + "/tasks") -> None:
        self.app = app
        self.rpc_path = rpc_path
        self.list_path = list_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "POST"):
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = path or "/"
        if scope["method"] == "GET":
            if path.endswith(self.list_path):
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                for value in query.get("status", []):
                    if (why := _state_error(value)) is not None:
                        error = InvalidParamsError(message=why)
                        await JSONResponse(
                            {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": why,
                                       "details": build_error_details(error)}},
                            status_code=400)(scope, _nothing, send)
                        return
            await self.app(scope, receive, send)
            return
        if path != self.rpc_path:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        # Parsed only if it may be a ListTasks: its name as is, or with a letter escaped
        # (`\u004cistTasks`), the only JSON escape that can spell one.
        if b"ListTasks" in body or b"\\u" in body:
            try:
                request = json.loads(body)
            except (ValueError, RecursionError):
                request = None  # a2a-sdk answers with its parse error
            if not isinstance(request, dict):
                request = {}
            params = request.get("params")
            if request.get("method") == "ListTasks" and isinstance(params, dict) and \
                    "status" in params and (why := _state_error(params["status"])) is not None:
                rid = request.get("id")
                rid = rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
                await JSONResponse(build_error_response(rid, InvalidParamsError(message=why)))(
                    scope, _nothing, send)
                return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _RefusalsQuiet(logging.Filter):
    """a2a-sdk logs a traceback (twice: its producer's and its consumer's) for whatever the
    executor raises, the A2A errors it answers a bad request with included, so a client's
    typo filled the server's log with tracebacks; and an error for a client's retry of a
    running task, whose task the executor hands back. Those go (the client gets the error,
    or the task); the server's own failures (`InternalError`, ...) and anything else stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _CLIENTS_FAULT) and record.msg != _REPLACED


_REPLACED = "Task %s already exists. Ignoring task replacement."
# The A2A errors that are the client's to fix (a server's own, `InternalError` and the like,
# keep their tracebacks).
_CLIENTS_FAULT = (InvalidParamsError, InvalidRequestError, TaskNotFoundError,
                  TaskNotCancelableError, UnsupportedOperationError, MethodNotFoundError,
                  ContentTypeNotSupportedError, VersionNotSupportedError)


_QUIET = _RefusalsQuiet()


def build_app(link: SwarmLink, card: AgentCard, *, max_task_chars: int,
              max_body_bytes: int) -> Starlette:
    """The A2A app of one swarm: a2a-sdk's card, JSON-RPC and REST routes over its handler,
    with the swarm's task table as the task store."""
    for name in ("a2a.server.request_handlers.default_request_handler",
                 "a2a.server.request_handlers.default_request_handler_v2",
                 "a2a.server.agent_execution.active_task"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    store = SupervisorTaskStore(link)
    handler = SwarmRequestHandler(
        link=link, agent_executor=SwarmAgentExecutor(link, store), task_store=store,
        agent_card=card,
        request_context_builder=SwarmRequestContextBuilder(link, max_task_chars),
        # A task waiting for input may be answered elsewhere (the CLI, another replica): its
        # idle ActiveTask here is let go, and a follow-up makes a new one from the table.
        interrupted_task_timeout=PARKED_S)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await handler.aclose()

    return Starlette(
        routes=[*create_agent_card_routes(card, card_url=CARD_PATH),
                *create_jsonrpc_routes(handler, rpc_url=JSONRPC_PATH),
                *create_rest_routes(handler, path_prefix=REST_PATH)],
        middleware=[Middleware(BodyLimit, max_bytes=max_body_bytes),
                    Middleware(StatusFilterCheck)],
        lifespan=lifespan,
    )


# ---- Ray Serve ----------------------------------------------------------------------------------


class _A2AServer:
    """Replica state: the app, built on the replica around a link to the swarm's supervisor."""

    def __init__(self, deployment: str, card: bytes, max_task_chars: int,
                 max_body_bytes: int) -> None:
        # The card travels as wire bytes: protobuf values don't pickle.
        self._app = build_app(RayLink(deployment), AgentCard.FromString(card),
                              max_task_chars=max_task_chars, max_body_bytes=max_body_bytes)

    def __serve_build_asgi_app__(self) -> Starlette:
        return self._app


def app_name(deployment: str) -> str:
    """The Serve application name of a swarm's A2A app (a dot: no model app can have it)."""
    return f"{deployment}.a2a"


def route_prefix(cfg: SwarmConfig, deployment: str) -> str:
    """Where Serve mounts the swarm's A2A app."""
    return cfg.a2a.route_prefix or f"/{deployment}/a2a"


def base_url(cfg: SwarmConfig, deployment: str) -> str:
    """The A2A app's base URL as the card gives it (starts Serve's proxy if it isn't up)."""
    if cfg.a2a.public_url:
        return cfg.a2a.public_url.rstrip("/")
    from swarm.runtime.deploy import serve_port

    port = serve_port()
    host = os.environ.get("SWARM_SERVE_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        import ray

        host = ray.util.get_node_ip_address()
    prefix = route_prefix(cfg, deployment).rstrip("/")
    return f"http://{host}:{port}{prefix}"


def card_url(cfg: SwarmConfig, deployment: str) -> str:
    """Where the swarm's agent card is served."""
    return base_url(cfg, deployment) + CARD_PATH


def build_a2a_app(cfg: SwarmConfig, deployment: str) -> Application:
    """The Serve application of a deployed swarm's A2A app (its card is built and checked
    here, in the caller)."""
    from ray import serve

    card = build_agent_card(cfg, name=deployment, base_url=base_url(cfg, deployment))
    server = serve.deployment(
        serve.ingress()(_A2AServer), name="A2A", num_replicas=cfg.a2a.replicas,
        max_ongoing_requests=cfg.a2a.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0})
    return server.bind(deployment, card.SerializeToString(), cfg.limits.max_task_chars,
                       cfg.a2a.body_limit(cfg.limits.max_task_chars))


def deploy_a2a(cfg: SwarmConfig, deployment: str) -> str:
    """Run the swarm's A2A app on Serve (next to its supervisor); returns the card's URL."""
    from ray import serve

    from swarm.errors import UserError

    prefix = route_prefix(cfg, deployment)
    taken = {f"/{deployment}/{m}" for m in cfg.models}
    if prefix.rstrip("/") in taken:
        raise UserError(f"route {prefix} is a model app's; set a2a.route_prefix")
    serve.run(build_a2a_app(cfg, deployment), name=app_name(deployment), route_prefix=prefix)
    return card_url(cfg, deployment)


def undeploy_a2a(deployment: str) -> bool:
    """Delete the swarm's A2A app if it runs; whether it did."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve isn't running: nothing to delete
        return False
    if app_name(deployment) not in apps:
        return False
    serve.delete(app_name(deployment))
    return True

