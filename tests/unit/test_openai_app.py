"""The scripted engine's OpenAI-compatible ASGI app (no Ray), and OpenAIModel against it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from swarm.config import LatencyConfig, OpenAIModelConfig
from swarm.errors import ModelError
from swarm.models.interface import ModelRequest
from swarm.models.openai import OpenAIModel
from swarm.models.scripted.model import ScriptedModel
from swarm.models.scripted.policy import Policy
from swarm.models.scripted.serve import OpenAIApp, make_openai_app

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"
MODEL = "scripted-test"
ECHO = [{"type": "function", "function": {"name": "echo", "description": "Echo text.",
                                          "parameters": {"type": "object"}}}]


def load_testing_policy() -> Policy:
    return Policy.from_spec(yaml.safe_load((POLICIES / "testing.yaml").read_text()))


def body(agent_msg: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": agent_msg}], **extra}


@pytest.fixture
def app() -> OpenAIApp:
    return make_openai_app(load_testing_policy(), MODEL)


@pytest.fixture
async def client(app: OpenAIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://scripted") as c:
        yield c


def asgi_model(app: Any, **kwargs: Any) -> OpenAIModel:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return OpenAIModel("http://scripted/v1", MODEL, http_client=http, **kwargs)


# ---- the HTTP API -------------------------------------------------------------------------------


async def test_chat_completion_is_openai_shaped(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=body("hi there"),
                          headers={"x-swarm-agent": "chatter"})
    assert r.status_code == 200
    data = r.json()
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert isinstance(data["created"], int) and data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "chatter heard: hi there",
                                 "refusal": None}
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert r.headers["x-scripted-rule"] == "default"


async def test_agent_header_selects_rules_and_tool_calls_are_returned(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/v1/chat/completions", json=body(tools=ECHO),
                          headers={"x-swarm-agent": "looper", "x-session-id": "s-1"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{
        "id": "call_1_0", "type": "function",
        "function": {"name": "echo", "arguments": '{"text": "ping 1"}'}}]
    # Without the header the agent is "" and the default rule answers.
    r = await client.post("/v1/chat/completions", json=body(tools=ECHO))
    assert r.json()["choices"][0]["message"]["content"] == "assistant heard: hello"


async def test_models_lists_the_served_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list"
    assert [(m["id"], m["object"]) for m in data["data"]] == [(MODEL, "model")]


def sse_events(text: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_streaming_tool_calls_arrive_as_openai_chunks(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", headers={"x-swarm-agent": "looper"},
        json=body(tools=ECHO, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    first_call = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first_call["id"] == "call_1_0" and first_call["function"]["name"] == "echo"
    arguments = "".join(d["function"]["arguments"] for c in chunks[1:-2]
                        for d in c["choices"][0]["delta"]["tool_calls"])
    assert json.loads(arguments) == {"text": "ping 1"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_streaming_content_reassembles_without_usage_chunk(
    client: httpx.AsyncClient,
) -> None:
    text = "a long message " * 5
    r = await client.post("/v1/chat/completions", json=body(text, stream=True))
    chunks = sse_events(r.text)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == f"assistant heard: {text}"
    assert len(chunks) > 3  # split into several deltas
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(("payload", "param", "text"), [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "Field required"),
    ({"model": MODEL}, "messages", "Field required"),
    ({"model": MODEL, "messages": []}, "messages", "at least 1"),
    ({"model": MODEL, "messages": "hi"}, "messages", "valid list"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "'user'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "content parts"),
    ({"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls[0].function", "Field required"),
    ({**body(), "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name",
     "Field required"),
    ({**body(), "stream": "sometimes"}, "stream", "valid boolean"),
    ({**body(), "n": 2}, "n", "less than or equal to 1"),
])
async def test_bad_bodies_get_400_with_an_openai_error(
    client: httpx.AsyncClient, payload: Any, param: str | None, text: str,
) -> None:
    if isinstance(payload, bytes):
        r = await client.post("/v1/chat/completions", content=payload,
                              headers={"content-type": "application/json"})
    else:
        r = await client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert text in error["message"]


async def test_unknown_model_is_404_and_an_unanswerable_policy_is_422() -> None:
    strict = make_openai_app(Policy.from_spec({"rules": [{"when": {"agent": "a"},
                                                          "content": "x"}]}), MODEL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=strict),
                                 base_url="http://s") as c:
        r = await c.post("/v1/chat/completions", json={**body(), "model": "gpt-9"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await c.post("/v1/chat/completions", json=body(), headers={"x-swarm-agent": "b"})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "policy_error"
        assert "agent 'b'" in r.json()["error"]["message"]
        assert r.headers["x-should-retry"] == "false"


async def test_bodies_the_fast_decoder_rejects_are_decoded_and_validated_as_before(
    client: httpx.AsyncClient,
) -> None:
    # msgspec rejects NaN and 1e400; the standard library decodes them, and validation then
    # names the bad field exactly as it would for any other out-of-range value.
    for literal in (b"NaN", b"1e400"):
        payload = (b'{"model": "%s", "temperature": %s, "messages": [{"role": "user", '
                   b'"content": "x"}]}' % (MODEL.encode(), literal))
        r = await client.post("/v1/chat/completions", content=payload,
                              headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "temperature" and error["code"] == "invalid_value"
        assert "Invalid value for 'temperature'" in error["message"]
    # A body in UTF-16 (which JSON allows and msgspec does not read) is answered normally.
    r = await client.post("/v1/chat/completions", content=json.dumps(body("hi")).encode("utf-16"),
                          headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


async def test_unknown_paths_and_methods_get_openai_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json=body())
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert "/v1/completions" in r.json()["error"]["message"]
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = await client.delete("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    r = await client.head("/v1/models")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    r = await client.get("/v1/models/")  # a trailing slash is the same route
    assert r.status_code == 200


async def test_routes_below_a_root_path(app: OpenAIApp) -> None:
    # Behind Serve the route prefix arrives as the ASGI root_path, with the full path.
    transport = httpx.ASGITransport(app=app, root_path="/scripted")
    async with httpx.AsyncClient(transport=transport, base_url="http://s") as c:
        r = await c.post("/scripted/v1/chat/completions", json=body())
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert r.headers["content-type"] == "application/json"
        assert int(r.headers["content-length"]) == len(r.content)


async def test_an_unexpected_error_is_a_500_server_error(app: OpenAIApp) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    app.engine.policy.decide = broken  # type: ignore[method-assign]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://s") as c:
        r = await c.post("/v1/chat/completions", json=body())
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError: boom" in error["message"]
    assert "x-should-retry" not in r.headers  # a server error may pass on a retry


async def test_a_stream_stops_when_the_client_disconnects(app: OpenAIApp) -> None:
    # Drive the ASGI app by hand: the client goes away after the first event.
    produced: list[bytes] = []
    gone = asyncio.Event()
    request = json.dumps(body("a long message " * 20, stream=True)).encode()
    inbox: list[dict[str, Any]] = [{"type": "http.request", "body": request}]

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            produced.append(message["body"])
            gone.set()
            await asyncio.sleep(0)  # the disconnect is seen before the next event

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "root_path": "", "headers": [(b"content-type", b"application/json")]}
    await app(scope, receive, send)
    events = b"".join(produced).decode()
    assert events.startswith("data: ") and "[DONE]" not in events


async def test_simulated_latency_overlaps_across_requests() -> None:
    app = make_openai_app(load_testing_policy(), MODEL, LatencyConfig(fixed_ms=100))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://s") as c:
        start = time.perf_counter()
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body(f"m{i}"))
                                    for i in range(20)))
        elapsed = time.perf_counter() - start
    assert all(r.status_code == 200 for r in rs)
    assert 0.1 <= elapsed < 1.0  # twenty 100 ms calls, concurrently


# ---- OpenAIModel --------------------------------------------------------------------------------


async def test_openai_model_maps_the_response_and_sends_agent_and_session(
    app: OpenAIApp,
) -> None:
    seen: list[dict[str, str]] = []

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    model = asgi_model(spy, name="m1")
    try:
        resp = await model.complete(ModelRequest(
            messages=[{"role": "user", "content": "go"}], tools=ECHO, agent="looper",
            session_id="sess-9"))
    finally:
        await model.aclose()
    assert model.name == "m1"
    assert resp.finish_reason == "tool_calls" and resp.content is None
    assert [(c.id, c.name, json.loads(c.arguments)) for c in resp.tool_calls] == [
        ("call_1_0", "echo", {"text": "ping 1"})]
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert resp.model == MODEL
    assert seen[0]["x-swarm-agent"] == "looper" and seen[0]["x-session-id"] == "sess-9"


async def test_openai_model_answers_like_the_in_process_model(app: OpenAIApp) -> None:
    policy = load_testing_policy()
    remote, local = asgi_model(app), ScriptedModel(policy)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "loop"}]
    for _ in range(4):
        req = ModelRequest(messages=messages, tools=ECHO, agent="looper")
        a, b = await remote.complete(req), await local.complete(req)
        assert (a.content, a.tool_calls, a.finish_reason) == (b.content, b.tool_calls,
                                                              b.finish_reason)
        assert (a.usage.input_tokens, a.usage.output_tokens) == (b.usage.input_tokens,
                                                                 b.usage.output_tokens)
        if not a.tool_calls:
            break
        call = a.tool_calls[0]
        messages = [*messages, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "echo"}]
    assert a.content == "echoed 3 times; last echo: echo"
    await remote.aclose()


def recording_app(status: int, payload: dict[str, Any], calls: list[dict[str, Any]]) -> FastAPI:
    """A fake model server that records request bodies and answers `payload` with `status`."""
    fake = FastAPI()

    @fake.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        calls.append(await request.json())
        return JSONResponse(payload, status_code=status)

    return fake


COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "real-model",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
              "prompt_tokens_details": {"cached_tokens": 64}},
}


async def test_openai_model_reads_cached_tokens_and_omits_empty_tools() -> None:
    calls: list[dict[str, Any]] = []
    model = asgi_model(recording_app(200, COMPLETION, calls), max_tokens=50, temperature=0.5)
    resp = await model.complete(ModelRequest(messages=[{"role": "user", "content": "x"}],
                                             temperature=0.0))
    assert (resp.usage.input_tokens, resp.usage.output_tokens,
            resp.usage.cached_input_tokens) == (100, 7, 64)
    assert resp.content == "hello" and resp.model == "real-model"
    assert "tools" not in calls[0]
    assert calls[0]["max_tokens"] == 50 and calls[0]["temperature"] == 0.0


async def test_openai_model_client_errors_carry_status_and_server_message() -> None:
    calls: list[dict[str, Any]] = []
    error = {"error": {"message": "messages[0].role is bad", "type": "invalid_request_error",
                       "param": "messages[0].role", "code": None}}
    model = asgi_model(recording_app(400, error, calls), max_retries=3)
    with pytest.raises(ModelError, match=r"HTTP 400: messages\[0\]\.role is bad"):
        await model.complete(ModelRequest(messages=[{"role": "user", "content": "x"}]))
    assert len(calls) == 1  # a 400 is not retried


async def test_openai_model_retries_server_errors_then_gives_up() -> None:
    calls: list[dict[str, Any]] = []
    error = {"error": {"message": "overloaded", "type": "server_error", "param": None,
                       "code": None}}
    model = asgi_model(recording_app(503, error, calls), max_retries=1)
    with pytest.raises(ModelError, match=r"HTTP 503 \(2 attempts\): overloaded"):
        await model.complete(ModelRequest(messages=[{"role": "user", "content": "x"}]))
    assert len(calls) == 2


async def test_openai_model_timeouts_and_unreachable_servers_are_model_errors() -> None:
    # A loopback server that accepts and never answers (ASGITransport enforces no timeouts).
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    slow = OpenAIModel(f"http://127.0.0.1:{port}/v1", "m", timeout_s=0.2, max_retries=0)
    try:
        with pytest.raises(ModelError, match=r"\(1 attempt\): timed out after 0\.2s"):
            await slow.complete(ModelRequest(messages=[{"role": "user", "content": "x"}]))
    finally:
        await slow.aclose()
        server.close()
    gone = OpenAIModel("http://127.0.0.1:9/v1", "m", max_retries=0, timeout_s=2)
    with pytest.raises(ModelError, match=r"model 'm' at .* \(1 attempt\): can't reach"):
        await gone.complete(ModelRequest(messages=[{"role": "user", "content": "x"}]))
    await gone.aclose()


def test_openai_model_from_config_unwraps_the_secret() -> None:
    cfg = OpenAIModelConfig(provider="openai", base_url="http://127.0.0.1:8000/v1/",
                            model="m", api_key="sk-test", timeout_s=5, max_retries=1)
    model = OpenAIModel.from_config(cfg, name="planner-model")
    assert (model.name, model.base_url, model.timeout_s, model.max_retries) == (
        "planner-model", "http://127.0.0.1:8000/v1", 5, 1)
    assert model._headers["authorization"] == "Bearer sk-test"
    assert "authorization" not in OpenAIModel("http://x/v1", "m")._headers
