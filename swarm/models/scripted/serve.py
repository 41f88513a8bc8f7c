"""The scripted engine behind an OpenAI-compatible HTTP API, as a FastAPI app and a Serve app.

`make_openai_app` builds a plain FastAPI app (testable without Ray through an ASGI transport);
`build_scripted_app` wraps it in a Ray Serve deployment. Endpoints: `POST /v1/chat/completions`
(JSON, or SSE chunks with `stream: true`) and `GET /v1/models`. The agent name comes from the
`x-swarm-agent` header. Sampling parameters (temperature, max_tokens, ...) are accepted and
ignored. Bad bodies answer 400 with an OpenAI-style error, an unknown model 404, and a policy
that can't answer 422; all carry `x-should-retry: false`, as the same request fails again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from swarm.config import LatencyConfig
from swarm.models.scripted.model import reply_usage, simulated_latency_s
from swarm.models.scripted.policy import Policy, PolicyDecisionError, ScriptedReply

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["build_scripted_app", "make_openai_app"]

_CHUNK_CHARS = 16  # characters per streamed content or arguments delta


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


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    # Errors that are the same on every attempt tell the openai client not to retry.
    headers = {"x-should-retry": "false"} if status < 500 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(e: ValidationError) -> JSONResponse:
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
        return f"data: {json.dumps(chunk)}\n\n"

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
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------


def make_openai_app(
    policy: Policy, model_name: str, latency: LatencyConfig | None = None, *, seed: int = 0
) -> FastAPI:
    """A FastAPI app serving `policy` as the OpenAI chat-completions model `model_name`."""
    app = FastAPI(title=f"scripted model {model_name}", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error in the scripted engine: {type(exc).__name__}: {exc}",
                      type_="server_error")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": started, "owned_by": "swarm"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return _error(400, f"The request body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req = _ChatRequest.model_validate(body)
        except ValidationError as e:
            return _validation_error(e)
        if req.model != model_name:
            return _error(404, f"The model '{req.model}' does not exist; this server serves "
                          f"'{model_name}'.", param="model", code="model_not_found")
        # The policy reads the raw dicts: validation above only guarantees their shape.
        messages, tools = body["messages"], body.get("tools") or []
        agent = request.headers.get("x-swarm-agent", "")
        try:
            reply = policy.decide(messages, tools, agent)
        except PolicyDecisionError as e:
            return _error(422, str(e), code="policy_error")
        usage = reply_usage(messages, tools, reply)
        prompt, completion = usage.input_tokens, usage.output_tokens
        key = f"{request.headers.get('x-session-id', '')}:{agent}:{len(messages)}"
        total_s = simulated_latency_s(latency, prompt, completion, key, seed)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name, "system_fingerprint": None}
        headers = {"x-scripted-rule": reply.rule.encode("ascii", "replace").decode()}
        if req.stream:
            first_s = simulated_latency_s(latency, prompt, 0, key, seed)
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream({**base, "object": "chat.completion.chunk"}, reply,
                             _usage(prompt, completion), include, first_s, total_s - first_s)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        if total_s > 0:
            await asyncio.sleep(total_s)
        return JSONResponse({
            **base, "object": "chat.completion",
            "choices": [{"index": 0, "message": _message(reply), "logprobs": None,
                         "finish_reason": reply.finish_reason}],
            "usage": _usage(prompt, completion),
        }, headers=headers)

    return app


class _ScriptedServer:
    """Replica state for the Serve deployment; the app is built on the replica itself."""

    def __init__(self, policy_spec: dict[str, Any], model_name: str,
                 latency: dict[str, Any] | None) -> None:
        self._app = make_openai_app(
            Policy.from_spec(policy_spec), model_name,
            LatencyConfig.model_validate(latency) if latency is not None else None)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def build_scripted_app(
    policy_spec: dict[str, Any],
    *,
    model_name: str,
    latency: LatencyConfig | None = None,
    replicas: int = 1,
    max_ongoing_requests: int = 1000,
    num_cpus: float = 0.0,
) -> Application:
    """A Ray Serve application serving the scripted policy as an OpenAI-compatible model."""
    from ray import serve

    Policy.from_spec(policy_spec)  # fail here, in the caller, rather than in every replica
    deployment = serve.deployment(
        serve.ingress()(_ScriptedServer),
        name="ScriptedOpenAI",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    )
    return deployment.bind(
        policy_spec, model_name, latency.model_dump() if latency is not None else None)
