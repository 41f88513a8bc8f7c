"""The scripted engine behind an OpenAI-compatible HTTP API, as an ASGI app and a Serve app.

`make_openai_app` builds a plain ASGI app (testable without Ray through an ASGI transport);
`build_scripted_app` wraps it in a Ray Serve deployment. The app is written against ASGI
directly rather than FastAPI: it has two routes, and on the Serve HTTP path FastAPI's
middleware stack and request/response objects cost about as much replica time as the engine
itself. Request validation is still the pydantic model below.

Endpoints: `POST /v1/chat/completions` (JSON, or SSE chunks with `stream: true`) and
`GET /v1/models`. The agent name comes from the
`x-swarm-agent` header. Answers name the replica that served them (`system_fingerprint` and
the `x-replica-id` header) so session affinity can be measured. Sampling parameters
(temperature, max_tokens, ...) are accepted and ignored. Bad bodies answer 400 with an
OpenAI-style error, an unknown model 404, and a policy that can't answer 422; all carry
`x-should-retry: false`, as the same request fails again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from swarm.config import LatencyConfig
from swarm.models.scripted.model import reply_usage, simulated_latency_s
from swarm.models.scripted.policy import Policy, PolicyDecisionError, ScriptedReply

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["SESSION_ROUTER", "OpenAIApp", "build_scripted_app", "make_openai_app"]

_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CHUNK_CHARS = 16  # characters per streamed content or arguments delta
# Serve's session-affinity router (experimental in Ray 2.60): consistent hashing on the
# request's session id, which the HTTP proxy reads from the x-session-id header.
SESSION_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


# ---- request schema: loose where OpenAI is loose, strict where the engine depends on it --------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _content(v: Any) -> Any:
    if v is None or isinstance(v, str | list):
        return v
    raise ValueError("must be a string, a list of content parts, or null")


class _Function(_Open):
    name: str = Field(min_length=1)


class _CallFunction(_Open):
    name: str
    arguments: str


class _MessageToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: _CallFunction


class _Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, BeforeValidator(_content)] = None
    tool_calls: list[_MessageToolCall] | None = None
    tool_call_id: str | None = None


class _Tool(_Open):
    type: Literal["function"]
    function: _Function


class _StreamOptions(_Open):
    include_usage: bool = False


class _ChatRequest(_Open):
    model: str
    messages: list[_Message] = Field(min_length=1)
    tools: list[_Tool] | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="only one choice is supported")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


# ---- responses ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Failure:
    """An OpenAI-style error answer: status, body and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> _Failure:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    # Errors that are the same on every attempt tell the openai client not to retry.
    return _Failure(status, body, {"x-should-retry": "false"} if status < 500 else {})


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(e: ValidationError) -> _Failure:
    err = e.errors()[0]
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return _error(400, f"Invalid value for '{param or 'body'}': {msg}{more}", param=param or None,
                  code=code)


def _message(reply: ScriptedReply) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls
        ]
    return msg


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _pieces(text: str) -> list[str]:
    return [text[i:i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]


async def _stream(
    base: dict[str, Any], reply: ScriptedReply, usage: dict[str, Any], include_usage: bool,
    first_s: float, rest_s: float,
) -> AsyncIterator[str]:
    """OpenAI chunk events: role, content deltas, tool-call deltas, finish, usage, [DONE]."""
    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        return f"data: {_dumps(chunk).decode()}\n\n"

    deltas: list[dict[str, Any]] = [{"content": p} for p in _pieces(reply.content or "")]
    for i, c in enumerate(reply.tool_calls):
        deltas.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": ""}}]})
        deltas.extend({"tool_calls": [{"index": i, "function": {"arguments": p}}]}
                      for p in _pieces(c.arguments))
    if first_s > 0:
        await asyncio.sleep(first_s)
    yield event({"role": "assistant", "content": ""})
    per_delta = rest_s / len(deltas) if deltas else 0.0
    for delta in deltas:
        if per_delta > 0:
            await asyncio.sleep(per_delta)
        yield event(delta)
    yield event({}, reply.finish_reason)
    if include_usage:
        yield f"data: {_dumps({**base, 'choices': [], 'usage': usage}).decode()}\n\n"
    yield "data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Prepared:
    """A validated request and the policy's reply, before the simulated latency."""

    stream: bool
    include_usage: bool
    reply: ScriptedReply
    prompt: int
    completion: int
    key: str
    base: dict[str, Any]
    headers: dict[str, str]


class _Engine:
    """The engine behind both entry points: the HTTP app and the deployment handle's `chat`."""

    def __init__(self, policy: Policy, model_name: str, latency: LatencyConfig | None,
                 seed: int, replica_id: str) -> None:
        self.policy = policy
        self.model_name = model_name
        self.latency = latency
        self.seed = seed
        self.replica_id = replica_id

    def prepare(self, body: Any, agent: str, session_id: str) -> _Prepared | _Failure:
        """Validate `body` and decide the reply; an error answer for a bad request."""
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req = _ChatRequest.model_validate(body)
        except ValidationError as e:
            return _validation_error(e)
        if req.model != self.model_name:
            return _error(404, f"The model '{req.model}' does not exist; this server serves "
                          f"'{self.model_name}'.", param="model", code="model_not_found")
        # The policy reads the raw dicts: validation above only guarantees their shape.
        messages, tools = body["messages"], body.get("tools") or []
        try:
            reply = self.policy.decide(messages, tools, agent, same_lists=False)
        except PolicyDecisionError as e:
            return _error(422, str(e), code="policy_error")
        usage = reply_usage(messages, tools, reply)
        # system_fingerprint names the replica that answered, so session affinity is visible.
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": self.replica_id or None}
        headers = {"x-scripted-rule": reply.rule.encode("ascii", "replace").decode()}
        if self.replica_id:
            headers["x-replica-id"] = self.replica_id
        return _Prepared(
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            reply=reply, prompt=usage.input_tokens, completion=usage.output_tokens,
            key=f"{session_id}:{agent}:{len(messages)}", base=base, headers=headers)

    def delay_s(self, p: _Prepared, completion: int | None = None) -> float:
        """The latency model: fixed + prefill per input token + decode per output token."""
        return simulated_latency_s(self.latency, p.prompt,
                                   p.completion if completion is None else completion,
                                   p.key, self.seed)

    async def completion(self, p: _Prepared) -> dict[str, Any]:
        """The non-streamed answer, after the simulated latency."""
        total_s = self.delay_s(p)
        if total_s > 0:
            await asyncio.sleep(total_s)
        return {
            **p.base, "object": "chat.completion",
            "choices": [{"index": 0, "message": _message(p.reply), "logprobs": None,
                         "finish_reason": p.reply.finish_reason}],
            "usage": _usage(p.prompt, p.completion),
        }

    def stream(self, p: _Prepared) -> AsyncIterator[str]:
        """SSE events: the first after fixed + prefill (time to first token), then decode."""
        first_s = self.delay_s(p, 0)
        return _stream({**p.base, "object": "chat.completion.chunk"}, p.reply,
                       _usage(p.prompt, p.completion), p.include_usage, first_s,
                       self.delay_s(p) - first_s)


def _loads(raw: bytes) -> Any:
    """Decode a JSON body. msgspec is the fast path; whatever it rejects is decoded again by
    the standard library, so the accepted inputs (NaN, 1e400, UTF-16) and the error messages
    are the standard library's."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


_dumps = msgspec.json.encode


def _raw_headers(content_type: bytes, headers: dict[str, str],
                 length: int | None = None) -> list[tuple[bytes, bytes]]:
    raw = [(b"content-type", content_type)]
    if length is not None:
        raw.append((b"content-length", str(length).encode()))
    raw.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    return raw


async def _send_json(send: Send, status: int, body: Any, headers: dict[str, str],
                     *, head: bool = False) -> None:
    data = _dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": _raw_headers(b"application/json", headers, len(data))})
    await send({"type": "http.response.body", "body": b"" if head else data})


async def _send_failure(send: Send, f: _Failure) -> None:
    await _send_json(send, f.status, f.body, f.headers)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_stream(receive: Receive, send: Send, events: AsyncIterator[str],
                       headers: dict[str, str]) -> None:
    """Send SSE events as they come; stop producing them if the client goes away."""
    await send({"type": "http.response.start", "status": 200,
                "headers": _raw_headers(b"text/event-stream; charset=utf-8", headers)})

    async def pump() -> None:
        async for event in events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not pumping.done():  # the client left (or this request was cancelled)
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
    if not pumping.cancelled():
        pumping.result()  # an error while streaming propagates: the server aborts the response


class OpenAIApp:
    """The ASGI app: `POST /v1/chat/completions` and `GET /v1/models`, nothing else.

    Unknown paths answer 404 and wrong methods 405, both with OpenAI-style error bodies; an
    unexpected error before the response has started answers 500 (and is logged).
    """

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.started = int(time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            started = False

            async def tracked(message: Message) -> None:
                nonlocal started
                started = True
                await send(message)

            try:
                await self._http(scope, receive, tracked)
            except Exception as exc:
                if started:
                    raise
                _log.exception("scripted engine: unexpected error")
                await _send_failure(send, _error(
                    500, f"internal error in the scripted engine: {type(exc).__name__}: {exc}",
                    type_="server_error"))
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind Serve, the route prefix is the root path
            path = path[len(root):]
        path = path.rstrip("/")
        method = scope["method"]
        if path == "/v1/chat/completions":
            if method == "POST":
                return await self._chat(scope, receive, send)
            allow = "POST"
        elif path == "/v1/models":
            if method in ("GET", "HEAD"):
                return await _send_json(send, 200, {"object": "list", "data": [
                    {"id": self.engine.model_name, "object": "model", "created": self.started,
                     "owned_by": "swarm"}]}, {}, head=method == "HEAD")
            allow = "GET, HEAD"
        else:
            return await _send_failure(send, _error(
                404, f"Invalid URL ({method} {path}).", code="unknown_url"))
        f = _error(405, f"Method {method} is not allowed on {path}; use {allow}.",
                   code="method_not_allowed")
        f.headers["allow"] = allow
        await _send_failure(send, f)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            body = _loads(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except ValueError as e:
            return await _send_failure(send, _error(
                400, f"The request body is not valid JSON: {e}", code="invalid_json"))
        agent = session_id = ""
        for key, value in scope["headers"]:
            if key == b"x-swarm-agent":
                agent = value.decode("latin-1")
            elif key == b"x-session-id":
                session_id = value.decode("latin-1")
        p = self.engine.prepare(body, agent, session_id)
        if isinstance(p, _Failure):
            return await _send_failure(send, p)
        if p.stream:
            return await _send_stream(receive, send, self.engine.stream(p), p.headers)
        await _send_json(send, 200, await self.engine.completion(p), p.headers)


def make_openai_app(
    policy: Policy, model_name: str, latency: LatencyConfig | None = None, *, seed: int = 0,
    replica_id: str = "",
) -> OpenAIApp:
    """An ASGI app serving `policy` as the OpenAI chat-completions model `model_name`."""
    return OpenAIApp(_Engine(policy, model_name, latency, seed, replica_id))


class _ScriptedServer:
    """Replica state for the Serve deployment; the app is built on the replica itself.

    Besides the HTTP app, `chat` answers a chat-completions body through a deployment handle
    (no HTTP), for comparing the two paths (scripts/bench_models.py).
    """

    def __init__(self, policy_spec: dict[str, Any], model_name: str,
                 latency: dict[str, Any] | None) -> None:
        from ray import serve

        replica_id = serve.get_replica_context().replica_id.unique_id
        self._engine = _Engine(
            Policy.from_spec(policy_spec), model_name,
            LatencyConfig.model_validate(latency) if latency is not None else None, 0,
            replica_id)
        self._app = OpenAIApp(self._engine)

    def __serve_build_asgi_app__(self) -> OpenAIApp:
        return self._app

    async def chat(self, body: dict[str, Any], agent: str = "",
                   session_id: str = "") -> dict[str, Any]:
        """A non-streamed completion (or an OpenAI error body with its `status`)."""
        p = self._engine.prepare(body, agent, session_id)
        if isinstance(p, _Failure):
            return {**p.body, "status": p.status}
        return await self._engine.completion(p)


def build_scripted_app(
    policy_spec: dict[str, Any],
    *,
    model_name: str,
    latency: LatencyConfig | None = None,
    replicas: int = 1,
    max_ongoing_requests: int = 1000,
    num_cpus: float = 0.0,
    router: str = "session",
) -> Application:
    """A Ray Serve application serving the scripted policy as an OpenAI-compatible model.

    Every handler is async (the latency model awaits), so one replica holds up to
    `max_ongoing_requests` calls at once. `router="session"` routes with Serve's
    ConsistentHashRouter on the session id, which the proxy takes from the `x-session-id`
    header (and a handle from `.options(session_id=...)`): a session's calls stay on one
    replica, as they would on the replica holding a vLLM prefix cache.
    """
    from ray import serve

    Policy.from_spec(policy_spec)  # fail here, in the caller, rather than in every replica
    options: dict[str, Any] = {}
    if router == "session":
        options["request_router_config"] = {"request_router_class": SESSION_ROUTER}
    elif router != "default":
        raise ValueError(f"router must be 'session' or 'default', not {router!r}")
    deployment = serve.deployment(
        serve.ingress()(_ScriptedServer),
        name="ScriptedOpenAI",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
        **options,
    )
    return deployment.bind(
        policy_spec, model_name, latency.model_dump() if latency is not None else None)
