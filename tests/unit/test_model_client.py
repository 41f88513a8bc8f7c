"""`OpenAIModel`, `FallbackModel` and `ContextWindow` against a real HTTP server on 127.0.0.1.

The server is a small Starlette app under uvicorn in a thread; each test scripts its answers
per model name (status codes, Retry-After, slow answers, SSE streams, context-length errors)
and reads back the requests it received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from swarm._urls import redact_url
from swarm.config import ConfigError, parse_config
from swarm.errors import ContextLimitError, ModelCallError, ModelError
from swarm.events import ModelCalled, ToolCalled
from swarm.models.agent import build_agent_model
from swarm.models.context import SUMMARY_PREFIX, ContextWindow, dropped_placeholder
from swarm.models.fallback import FallbackModel
from swarm.models.interface import ModelRequest
from swarm.models.openai import OpenAIModel
from swarm.testing import LocalSwarm

Responder = Callable[[dict[str, Any]], Awaitable[Response]]


@dataclass
class FakeServer:
    """Answers each model's requests from its script, in order (the last entry repeats)."""

    url: str
    scripts: dict[str, list[Responder]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def script(self, model: str, *answers: Responder) -> None:
        self.scripts[model] = list(answers)

    def bodies(self, model: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["body"]["model"] == model]


def make_app(srv: FakeServer) -> Starlette:
    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        srv.requests.append({"body": body, "headers": dict(request.headers), "t": time.time()})
        script = srv.scripts[body["model"]]
        answer = script.pop(0) if len(script) > 1 else script[0]
        return await answer(body)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    srv = FakeServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1")
    uv = uvicorn.Server(uvicorn.Config(make_app(srv), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(autouse=True)
def _fresh(server: FakeServer) -> None:
    server.scripts.clear()
    server.requests.clear()


# ---- scripted answers ---------------------------------------------------------------------------


def completion(content: str | None = "hi", *, tool_calls: list[dict[str, Any]] | None = None,
               usage: dict[str, Any] | None = None) -> Responder:
    async def answer(body: dict[str, Any]) -> Response:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        return JSONResponse({
            "id": "c1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": msg,
                         "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": usage or {"prompt_tokens": 10, "completion_tokens": 2}})
    return answer


def error(status: int, message: str, headers: dict[str, str] | None = None,
          delay: float = 0.0) -> Responder:
    async def answer(body: dict[str, Any]) -> Response:
        if delay:
            await asyncio.sleep(delay)
        return JSONResponse({"error": {"message": message, "type": "x", "code": None}},
                            status_code=status, headers=headers)
    return answer


def slow(seconds: float) -> Responder:
    async def answer(body: dict[str, Any]) -> Response:
        await asyncio.sleep(seconds)
        return await completion("late")(body)
    return answer


def sse(chunks: list[dict[str, Any]], first_delay: float = 0.0, done: bool = True) -> Responder:
    async def answer(body: dict[str, Any]) -> Response:
        async def events() -> Any:
            if first_delay:
                await asyncio.sleep(first_delay)
            for c in chunks:
                yield f"data: {json.dumps({'model': body['model'], **c})}\n\n"
            if done:
                yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return answer


def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def raw(body: Any) -> Responder:
    """Answers `body` as JSON, whatever its shape."""
    async def answer(_: dict[str, Any]) -> Response:
        return Response(json.dumps(body), media_type="application/json")
    return answer


def raw_sse(*lines: str) -> Responder:
    """Streams `lines` as they are (each a `data:` value), then `[DONE]`."""
    async def answer(_: dict[str, Any]) -> Response:
        async def events() -> Any:
            for line in (*lines, "[DONE]"):
                yield f"data: {line}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return answer


def req(text: str = "hello", session: str = "s-1", **kw: Any) -> ModelRequest:
    return ModelRequest(messages=[{"role": "user", "content": text}], session_id=session,
                        agent="a", **kw)


def model(server: FakeServer, name: str = "m1", **kw: Any) -> OpenAIModel:
    kw.setdefault("backoff_base_s", 0.001)
    return OpenAIModel(server.url, name, **kw)


# ---- headers, streaming, usage ------------------------------------------------------------------


async def test_streaming_assembles_content_and_tool_calls_with_ttft(server: FakeServer) -> None:
    server.script("m1", sse([
        delta({"role": "assistant", "content": ""}),
        delta({"content": "Let me "}),
        delta({"content": "check."}),
        delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "search", "arguments": ""}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "ray'}}]}),
        delta({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "fetch", "arguments": '{"url":'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": ' serve"}'}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": ' "x"}'}}]}),
        delta({}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 1200, "completion_tokens": 30,
                                  "prompt_tokens_details": {"cached_tokens": 1024}}},
    ], first_delay=0.05))
    m = model(server)
    try:
        resp = await m.complete(req(session="sess-42"))
    finally:
        await m.aclose()
    assert resp.content == "Let me check."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in resp.tool_calls] == [
        ("call_a", "search", {"q": "ray serve"}), ("call_b", "fetch", {"url": "x"})]
    assert resp.finish_reason == "tool_calls" and resp.model == "m1"
    assert (resp.usage.input_tokens, resp.usage.output_tokens,
            resp.usage.cached_input_tokens) == (1200, 30, 1024)
    assert resp.time_to_first_token_s is not None and resp.time_to_first_token_s >= 0.05
    [sent] = server.requests
    assert sent["headers"]["x-session-id"] == "sess-42"
    assert sent["headers"]["x-swarm-agent"] == "a"
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}


async def test_non_streaming_reads_cached_tokens(server: FakeServer) -> None:
    server.script("m1", completion("plain", usage={
        "prompt_tokens": 100, "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 64}}))
    m = model(server, stream=False)
    resp = await m.complete(req(session="s-9"))
    await m.aclose()
    assert resp.content == "plain" and resp.time_to_first_token_s is None
    assert (resp.usage.input_tokens, resp.usage.cached_input_tokens) == (100, 64)
    [sent] = server.requests
    assert "stream" not in sent["body"] and sent["headers"]["x-session-id"] == "s-9"


async def test_a_stream_cut_short_is_retried(server: FakeServer) -> None:
    server.script("m1", sse([delta({"content": "par"})], done=False),
                  sse([delta({"content": "whole"}, "stop")]))
    m = model(server)
    resp = await m.complete(req())
    await m.aclose()
    assert resp.content == "whole" and len(server.requests) == 2


# ---- retries and timeouts -----------------------------------------------------------------------


async def test_429_and_5xx_are_retried_honouring_retry_after(server: FakeServer) -> None:
    server.script("m1", error(429, "slow down", {"retry-after": "0.3"}), error(502, "bad gw"),
                  completion("finally"))
    m = model(server, max_retries=3)
    resp = await m.complete(req())
    await m.aclose()
    assert resp.content == "finally"
    times = [r["t"] for r in server.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.3  # the server's Retry-After, not the 1 ms backoff


async def test_gives_up_after_max_retries_with_status_message_and_attempts(
        server: FakeServer) -> None:
    server.script("m1", error(503, "overloaded, try later"))
    m = model(server, max_retries=2)
    with pytest.raises(ModelCallError) as info:
        await m.complete(req())
    await m.aclose()
    e = info.value
    assert (e.status, e.attempts, e.transient) == (503, 3, True)
    assert "HTTP 503 (3 attempts): overloaded, try later" in str(e)
    assert len(server.requests) == 3


async def test_a_retry_after_past_a_minute_fails_at_once_naming_it(server: FakeServer) -> None:
    """A server asking for a wait longer than swarm waits for a retry (a minute) is an
    outage: the call fails at once, saying so, for a fallback model to take over, instead of
    sleeping a minute an attempt."""
    server.script("m1", error(429, "slow down", {"retry-after": "1000000000"}),
                  completion("too late"))
    m = model(server, max_retries=3)
    with pytest.raises(ModelCallError) as info:
        await m.complete(req())
    await m.aclose()
    assert info.value.transient and len(server.requests) == 1
    assert ("HTTP 429 (1 attempt): slow down (and asked to wait 1000000000 s before trying "
            "again; swarm waits at most 60)") in str(info.value), str(info.value)


async def test_an_api_key_the_server_echoes_stays_out_of_errors(server: FakeServer) -> None:
    key = "sk-SECRETKEY-abcdef0123456789"
    server.script("m1", error(401, f"Incorrect API key provided: Bearer {key}"))
    server.script("m2", error(500, f"headers: authorization=Bearer {key}"))
    for name in ("m1", "m2"):
        m = model(server, name, api_key=key, max_retries=1)
        with pytest.raises(ModelCallError) as info:
            await m.complete(req())
        await m.aclose()
        assert key not in str(info.value) and "Bearer [REDACTED]" in str(info.value), \
            str(info.value)


async def test_client_errors_are_not_retried(server: FakeServer) -> None:
    server.script("m1", error(401, "bad key"))
    m = model(server, max_retries=5)
    with pytest.raises(ModelCallError, match="HTTP 401: bad key") as info:
        await m.complete(req())
    await m.aclose()
    assert info.value.transient is False and len(server.requests) == 1


def test_backoff_is_full_jitter_under_an_exponential_cap(server: FakeServer) -> None:
    m = OpenAIModel(server.url, "m1", backoff_base_s=0.5, backoff_max_s=3.0)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [m._backoff(attempt, None) for _ in range(300)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > cap / 2 and min(waits) < cap / 2  # spread over the range
    assert m._backoff(1, 7.5) == 7.5  # Retry-After wins
    assert m._backoff(1, 3600) == 60.0  # ...up to a minute


async def test_per_call_timeout_then_success(server: FakeServer) -> None:
    server.script("m1", slow(2.0), completion("quick"))
    m = model(server, timeout_s=0.2, max_retries=1)
    resp = await m.complete(req())
    await m.aclose()
    assert resp.content == "quick" and len(server.requests) == 2


async def test_step_timeout_bounds_all_retries(server: FakeServer) -> None:
    # Each case has its own model name: an abandoned slow request of one case may reach the
    # server late, and must not count for the next.
    server.script("m1", slow(2.0))
    m = model(server, "m1", timeout_s=0.2, max_retries=50, step_timeout_s=0.5)
    with pytest.raises(ModelCallError, match="out of time for this step") as info:
        await m.complete(req())
    await m.aclose()
    assert 1 <= info.value.attempts <= 3 and len(server.bodies("m1")) <= 3
    # The turn's deadline stops retries (the attempt in flight may finish, for the wrap-up).
    server.script("m2", slow(2.0))
    m = model(server, "m2", timeout_s=0.2, max_retries=50)
    with pytest.raises(ModelCallError, match="out of time") as info:
        await m.complete(req(deadline=time.time() + 0.3))
    await m.aclose()
    assert info.value.attempts <= 2
    server.script("m3", slow(0.3))
    m = model(server, "m3", timeout_s=5, max_retries=50)
    resp = await m.complete(req(deadline=time.time() + 0.1))
    await m.aclose()
    assert resp.content == "late" and len(server.bodies("m3")) == 1


async def test_unreachable_server_is_a_transient_model_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        m = OpenAIModel(f"http://127.0.0.1:{port}/v1", "m", max_retries=1,
                        backoff_base_s=0.001)
        with pytest.raises(ModelCallError, match=r"\(2 attempts\): can't reach") as info:
            await m.complete(req())
        await m.aclose()
    assert info.value.transient and info.value.status is None


# ---- the pooled client --------------------------------------------------------------------------


async def test_models_on_one_server_share_one_client_closed_with_the_last(
        server: FakeServer) -> None:
    server.script("m1", completion())
    server.script("m2", completion())
    a, b = model(server, "m1"), model(server, "m2")
    await a.complete(req())
    await b.complete(req())
    assert a._client() is b._client()
    client = a._client()
    await a.aclose()
    assert not client.is_closed
    await b.aclose()
    assert client.is_closed
    c = model(server, "m1")  # a new user gets a new client
    assert (await c.complete(req())).content == "hi"
    await c.aclose()


# ---- fallbacks ----------------------------------------------------------------------------------


async def test_fallback_chain_moves_on_after_retries(server: FakeServer) -> None:
    server.script("primary", error(503, "down"))
    server.script("backup", error(429, "busy"))
    server.script("last", completion("from last"))
    chain = FallbackModel([model(server, n, max_retries=1) for n in ("primary", "backup",
                                                                      "last")])
    resp = await chain.complete(req())
    await chain.aclose()
    assert resp.content == "from last" and resp.model == "last"
    assert [r["body"]["model"] for r in server.requests] == [
        "primary", "primary", "backup", "backup", "last"]


async def test_fallback_is_not_used_for_client_errors(server: FakeServer) -> None:
    server.script("primary", error(422, "bad tool schema"))
    server.script("backup", completion())
    chain = FallbackModel([model(server, "primary"), model(server, "backup")])
    with pytest.raises(ModelCallError, match="HTTP 422: bad tool schema"):
        await chain.complete(req())
    await chain.aclose()
    assert server.bodies("backup") == []


async def test_every_model_failing_names_each(server: FakeServer) -> None:
    server.script("primary", error(500, "boom"))
    server.script("backup", error(503, "also down"))
    chain = FallbackModel([model(server, "primary", max_retries=0),
                           model(server, "backup", max_retries=0)])
    with pytest.raises(ModelError, match=r"primary: .*boom; backup: .*also down"):
        await chain.complete(req())
    await chain.aclose()


# ---- context limits -----------------------------------------------------------------------------


def long_conversation(n: int = 6, size: int = 800) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You research."},
                                      {"role": "user", "content": "find things"}]
    for i in range(n):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function",
             "function": {"name": "search", "arguments": json.dumps({"q": f"q{i}"})}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"{i}" * size})
    return messages


async def test_drop_oldest_tool_results_fits_without_touching_the_session(
        server: FakeServer) -> None:
    server.script("m1", completion("ok"))
    messages = long_conversation()  # ~1300 tokens
    before = json.dumps(messages)
    window = ContextWindow(model(server), 700, "drop_oldest_tool_results")
    resp = await window.complete(ModelRequest(messages=messages, agent="a"))
    await window.aclose()
    assert resp.content == "ok"
    assert json.dumps(messages) == before  # the session's list (the durable log) is intact
    sent = [m for m in server.requests[0]["body"]["messages"] if m["role"] == "tool"]
    dropped = [m["content"] == dropped_placeholder(800) for m in sent]
    # The oldest go first, and only as many as needed; the latest result is kept.
    assert dropped[0] and not dropped[-1]
    assert dropped == sorted(dropped, reverse=True)
    assert 0 < sum(dropped) < len(sent)


async def test_fail_strategy_names_the_sizes_and_sends_nothing(server: FakeServer) -> None:
    server.script("m1", completion())
    window = ContextWindow(model(server), 500, "fail", source="agents.a.max_context_tokens")
    with pytest.raises(ContextLimitError,
                       match=r"about \d+ tokens .* above the limit of 500 "
                             r"\(agents\.a\.max_context_tokens = 500\); context_strategy: fail"):
        await window.complete(ModelRequest(messages=long_conversation(), agent="a"))
    await window.aclose()
    assert server.requests == []


async def test_summarize_replaces_older_messages_and_reuses_the_summary(
        server: FakeServer) -> None:
    server.script("m1", completion("answer"))
    server.script("summ", completion("SUMMARY: searched q0..q4"))
    window = ContextWindow(model(server), 900, "summarize",
                           summarizer=model(server, "summ"))
    messages = long_conversation()
    resp = await window.complete(ModelRequest(messages=messages, agent="a", session_id="s1"))
    assert resp.content == "answer"
    assert resp.usage.input_tokens == 20  # the answer's 10 and the summary call's 10
    [ask] = server.bodies("summ")
    assert "q0" in ask["messages"][1]["content"]
    sent = server.bodies("m1")[0]["messages"]
    assert sent[0] == messages[0]
    assert sent[1] == {"role": "user", "content": SUMMARY_PREFIX + "SUMMARY: searched q0..q4"}
    assert sent[2]["role"] != "tool" and sent[-1] == messages[-1]
    assert len(messages) == 14  # untouched
    # The next step adds a little: the summary still fits, so no second summary call.
    messages.append({"role": "assistant", "content": "thinking"})
    await window.complete(ModelRequest(messages=messages, agent="a", session_id="s1"))
    await window.aclose()
    assert len(server.bodies("summ")) == 1
    assert server.bodies("m1")[1]["messages"][1]["content"].startswith(SUMMARY_PREFIX)


async def test_servers_context_length_400_is_a_clear_error_or_handled(
        server: FakeServer) -> None:
    too_long = error(400, "This model's maximum context length is 4096 tokens. However, you "
                          "requested 5000 tokens in the messages.")
    server.script("m1", too_long)
    m = model(server)
    with pytest.raises(ContextLimitError, match=r"too long for its context window.*4096"):
        await m.complete(req())
    # Under a strategy, the prompt is shortened with headroom and sent once more.
    server.script("m1", too_long, completion("fits now"))
    window = ContextWindow(m, 100_000, "drop_oldest_tool_results")
    resp = await window.complete(ModelRequest(messages=long_conversation(), agent="a"))
    await window.aclose()
    assert resp.content == "fits now"
    retry = server.requests[-1]["body"]["messages"]
    assert any(msg.get("content") == dropped_placeholder(800) for msg in retry)


# ---- config and the runtime ---------------------------------------------------------------------


def swarm_cfg(tmp_path: Path, server: FakeServer, **agent: Any) -> Any:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": []}))
    return parse_config({
        "name": "t",
        "models": {
            "primary": {"provider": "openai", "base_url": server.url, "model": "primary",
                        "max_retries": 1, "backoff_base_s": 0.001},
            "backup": {"provider": "openai", "base_url": server.url, "model": "backup",
                       "stream": False},
        },
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {"a": {"model": "primary", "tools": ["fn"], **agent}},
        "supervisor": {"entry": "a"},
    }, base_dir=tmp_path)


def test_config_checks_fallback_and_summarize_models(tmp_path: Path,
                                                     server: FakeServer) -> None:
    with pytest.raises(ConfigError) as info:
        swarm_cfg(tmp_path, server, fallback_models=["nope"])
    assert "agents.a.fallback_models.0: unknown model 'nope'" in str(info.value)
    with pytest.raises(ConfigError, match=r"agents\.a\.summarize_model: context_strategy "
                                          r"summarize needs a summarize_model"):
        swarm_cfg(tmp_path, server, context_strategy="summarize", max_context_tokens=100)
    with pytest.raises(ConfigError, match="already in this agent's model chain"):
        swarm_cfg(tmp_path, server, fallback_models=["primary"])
    with pytest.raises(ConfigError, match="context_strategy"):
        swarm_cfg(tmp_path, server, context_strategy="truncate")
    cfg = swarm_cfg(tmp_path, server, fallback_models=["backup"], max_context_tokens=5000)
    built = build_agent_model(cfg, "a")
    assert isinstance(built, ContextWindow) and built.max_tokens == 5000
    assert isinstance(built.inner, FallbackModel)
    assert [m.name for m in built.inner.models] == ["primary", "backup"]


async def test_swarm_agent_falls_back_and_reports_who_answered(tmp_path: Path,
                                                               server: FakeServer) -> None:
    server.script("primary", error(503, "down"))
    server.script("backup", completion("backup here"))
    cfg = swarm_cfg(tmp_path, server, fallback_models=["backup"])
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("hello")
        assert row["state"] == "completed" and row["answer"] == "backup here"
        [called] = [e for e in sw.events(row["task_id"]) if isinstance(e, ModelCalled)]
    assert called.model == "backup"
    assert [r["body"]["model"] for r in server.requests] == ["primary", "primary", "backup"]
    # Every call of the task carried the agent's session id.
    assert len({r["headers"]["x-session-id"] for r in server.requests}) == 1


async def test_broken_tool_arguments_over_http_go_back_as_a_model_error(
        tmp_path: Path, server: FakeServer) -> None:
    server.script("primary", sse([
        delta({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                               "function": {"name": "echo", "arguments": '{"text": "unterm'}}]},
              "tool_calls")]), completion("recovered"))
    cfg = swarm_cfg(tmp_path, server)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        evs = sw.events(row["task_id"])
    assert row["state"] == "completed" and row["answer"] == "recovered"
    [tool] = [e for e in evs if isinstance(e, ToolCalled)]
    assert tool.outcome == "error" and tool.error_class == "model"
    second = server.requests[1]["body"]["messages"]
    assert second[-1]["role"] == "tool" and "not a JSON object" in second[-1]["content"]
    first = next(e for e in evs if isinstance(e, ModelCalled))
    assert first.ttft_ms is not None  # streamed: time to first token in the step's event


@pytest.mark.parametrize(("arguments", "stream"), [("null", False), (None, False),
                                                   (None, True)],
                         ids=["text-null", "json-null", "streamed-json-null"])
async def test_null_tool_arguments_go_back_as_a_model_error_and_the_tool_does_not_run(
        tmp_path: Path, server: FakeServer, arguments: str | None, stream: bool) -> None:
    # `fail` runs with no arguments (its message has a default): read as {}, it ran and failed.
    # Streamed, `null` was dropped as no fragment, so the call had no arguments and ran.
    call = {"id": "c1", "type": "function", "function": {"name": "fail", "arguments": arguments}}
    server.script("backup", sse([delta({"tool_calls": [{"index": 0, **call}]}, "tool_calls")])
                  if stream else completion(None, tool_calls=[call]), completion("recovered"))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": []}))
    cfg = parse_config({
        "name": "t",
        "models": {"backup": {"provider": "openai", "base_url": server.url, "model": "backup",
                              "stream": stream}},
        "tools": {"fn": {"python": ["swarm.examples.tools:fail"]}},
        "agents": {"a": {"model": "backup", "tools": ["fn"]}},
        "supervisor": {"entry": "a"},
    }, base_dir=tmp_path)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        evs = sw.events(row["task_id"])
    assert row["state"] == "completed" and row["answer"] == "recovered"
    [tool] = [e for e in evs if isinstance(e, ToolCalled)]
    assert tool.outcome == "error" and tool.error_class == "model"
    result = server.requests[1]["body"]["messages"][-1]
    assert result["role"] == "tool" and result["content"] == (
        "ERROR: arguments for 'fail' are not a JSON object: expected an object, got null")


def test_importing_the_client_does_not_import_the_openai_sdk() -> None:
    # The SDK's import alone cost ~0.6 s on every actor restart.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, swarm.models.openai, swarm.models.agent; "
         "print('openai' in sys.modules)"], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


async def test_a_direct_replica_refusing_connections_is_skipped_at_once(
        server: FakeServer) -> None:
    """`serve_direct`: replicas that refuse connections are left out and the call goes on to
    the next (here: the base URL, as the proxy), without using up a retry."""
    import time as _time

    from swarm.models.ingress import Replica

    server.script("m1", completion("via the proxy"))
    socks = [socket.socket() for _ in range(2)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        m = model(server, max_retries=0, serve_direct=True)
        directory = m._directory
        assert directory is not None
        dead = tuple(Replica(f"SERVE_REPLICA::app#d#r{i}",
                             f"http://127.0.0.1:{s.getsockname()[1]}/v1")
                     for i, s in enumerate(socks))
        directory.replicas = dead
        directory._read_at = _time.monotonic()  # as if just read

        async def listed_again() -> tuple[Replica, ...]:  # the controller, still listing them
            return dead

        directory._read = listed_again  # type: ignore[method-assign]
        resp = await m.complete(req())
        await m.aclose()
    finally:
        for s in socks:
            s.close()
    assert resp.content == "via the proxy"
    assert directory.replicas == () and set(directory._down) == {r.base_url for r in dead}
    assert len(server.bodies("m1")) == 1


# ---- completions without an answer, or of the wrong shape ---------------------------------------


@pytest.mark.parametrize(("stream", "answer", "why"), [
    (True, sse([{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 0}}]),
     "streamed a completion with no choices"),
    (True, sse([delta({"role": "assistant", "content": None}, "stop")]),
     "streamed a completion with no content and no tool calls"),
    (False, raw({"model": "m1", "choices": [], "usage": {"prompt_tokens": 5}}),
     r"unreadable completion \(no choices\)"),
    (False, completion(None), r"unreadable completion \(no content and no tool calls\)"),
], ids=["stream-no-choices", "stream-null-content", "json-no-choices", "json-null-content"])
async def test_a_completion_without_an_answer_is_a_model_error(
        server: FakeServer, stream: bool, answer: Responder, why: str) -> None:
    error = await _refused(server, answer, stream, why)
    assert not isinstance(error, ModelCallError)  # not retried: the server answered
    assert len(server.requests) == 1


async def _refused(server: FakeServer, answer: Responder, stream: bool, match: str
                   ) -> ModelError:
    """The ModelError model m1 raises for this answer; it names the model and its URL."""
    server.script("m1", answer)
    m = model(server, stream=stream)
    with pytest.raises(ModelError, match=match) as info:
        await m.complete(req())
    await m.aclose()
    assert f"model 'm1' at {server.url}" in str(info.value)
    return info.value


async def test_an_empty_string_answer_is_still_an_answer(server: FakeServer) -> None:
    server.script("m1", completion(""))
    server.script("m2", sse([delta({"role": "assistant", "content": ""}, "stop")]))
    for name, stream in (("m1", False), ("m2", True)):
        m = model(server, name, stream=stream)
        resp = await m.complete(req())
        await m.aclose()
        assert resp.content == "" and resp.tool_calls == []


def _choice(**msg: Any) -> dict[str, Any]:
    return {"model": "m1", "choices": [{"index": 0, "message": {"role": "assistant", **msg},
                                        "finish_reason": "stop"}]}


@pytest.mark.parametrize(("stream", "answer", "where"), [
    (False, raw({"model": "m1", "choices": [None]}), r"\$\.choices\[0\]"),
    (False, raw({"model": "m1", "choices": [{"index": 0, "message": None}]}), "no message"),
    (False, raw(_choice(content=None, tool_calls=["x"])), r"\$\.choices\[0\]\.message"),
    (False, raw(_choice(content=None, tool_calls=[{"id": "c", "function": "f"}])),
     r"\.tool_calls\[0\]\.function"),
    (False, raw(5), "got `int`"),
    (True, raw_sse("5"), "unreadable stream chunk.*got `int`"),
    (True, raw_sse('{"choices": [null]}'), r"unreadable stream chunk.*\$\.choices\[0\]"),
    (True, raw_sse('{"choices": [{"index": 0, "delta": {"tool_calls": ["x"]}}]}'),
     r"\$\.choices\[0\]\.delta\.tool_calls\[0\]"),
], ids=["choice-null", "message-null", "tool-call-str", "function-str", "not-object",
        "stream-int", "stream-choice-null", "stream-tool-call-str"])
async def test_json_of_the_wrong_shape_is_a_model_error_naming_the_model(
        server: FakeServer, stream: bool, answer: Responder, where: str) -> None:
    assert type(await _refused(server, answer, stream, where)) is ModelError


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "lots", "completion_tokens": 2},
    {"prompt_tokens": 10**30, "completion_tokens": 5},
    {"prompt_tokens": -1_000_000, "completion_tokens": -5},
    {"prompt_tokens": 1.5, "completion_tokens": True},
    {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": "some"}},
], ids=["string", "past-2**64", "negative", "fraction-and-bool", "cached-string"])
async def test_a_usage_that_is_no_count_counts_as_zero_and_the_task_ends(
        tmp_path: Path, server: FakeServer, usage: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """A server's token counts that are none (a string, a fraction, negative, past what any
    completion holds) count as 0, with a warning naming the model: the answer is used, the
    task ends (a count past 2**64 made its end raise, so its waiters never heard of it), and
    no negative cost lets it past max_cost_usd."""
    from swarm.models import openai as openai_client

    openai_client._warned_usage.clear()
    for stream in (False, True):
        server.script("primary", raw({**_choice(content="x"), "usage": usage}) if not stream
                      else raw_sse(json.dumps({"choices": [{"index": 0, "delta": {
                          "role": "assistant", "content": "x"}, "finish_reason": "stop"}],
                          "usage": usage})))
        cfg = parse_config({
            "name": "t", "models": {"primary": {
                "provider": "openai", "base_url": server.url, "model": "primary",
                "stream": stream, "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}},
            "agents": {"a": {"model": "primary"}}, "supervisor": {"entry": "a"},
        }, base_dir=tmp_path)
        async with LocalSwarm(cfg) as sw:
            row = await sw.run("go", timeout=30)
        assert row["state"] == "completed" and row["answer"] == "x", row
        assert 0 <= row["input_tokens"] <= 10 and 0 <= row["output_tokens"] <= 5, row
        assert row["cost_usd"] >= 0, row
    warned = [r.getMessage() for r in caplog.records if "is no count" in r.getMessage()]
    assert len(warned) == 1 and "model 'primary'" in warned[0], warned


# ---- fallbacks name the configured model, credentials stay out of messages -----------------------


async def test_a_fallback_is_reported_by_its_configured_name_not_its_wire_id(
        tmp_path: Path, server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": []}))
    cfg = parse_config({
        "name": "t",
        "models": {
            "m": {"provider": "openai", "base_url": server.url, "model": "m",
                  "max_retries": 0},
            "m2": {"provider": "openai", "base_url": server.url, "model": "other-id"},
        },
        "agents": {"a": {"model": "m", "fallback_models": ["m2"]}},
        "supervisor": {"entry": "a"},
    }, base_dir=tmp_path)
    server.script("m", error(500, "down"))
    server.script("other-id", completion("from m2"))
    assert [m.name for m in build_agent_model(cfg, "a").models] == ["m", "m2"]  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="swarm.models.fallback"):
        async with LocalSwarm(cfg) as sw:
            row = await sw.run("hello")
            [called] = [e for e in sw.events(row["task_id"]) if isinstance(e, ModelCalled)]
    assert row["state"] == "completed" and row["answer"] == "from m2"
    assert called.model == "m2"
    assert "m2 answered after m:" in caplog.text and "other-id answered" not in caplog.text
    assert [r["body"]["model"] for r in server.requests] == ["m", "other-id"]  # wire ids


def test_redact_url_hides_userinfo_and_secret_parameters() -> None:
    assert redact_url("http://u:sk-LEAK@h:1/v1") == "http://***@h:1/v1"
    assert redact_url("see https://sk-LEAK@h/v1 and http://a:p@ss@h/x") == \
        "see https://***@h/v1 and http://***@h/x"
    assert redact_url("https://h/v1?api_key=sk&x=1&access_token=t#f") == \
        "https://h/v1?api_key=***&x=1&access_token=***#f"
    assert redact_url("https://h/v1?monkey=1") == "https://h/v1?monkey=1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


async def test_credentials_in_the_base_url_stay_out_of_errors(
        tmp_path: Path, server: FakeServer) -> None:
    leaky = server.url.replace("http://", "http://u:sk-LEAK-6@")
    shown = server.url.replace("http://", "http://***@")
    server.script("m1", error(500, "boom"))
    server.script("m2", raw(5))
    for name in ("m1", "m2"):
        m = OpenAIModel(leaky, name, max_retries=0)
        with pytest.raises(ModelError) as info:
            await m.complete(req())
        await m.aclose()
        assert "sk-LEAK" not in str(info.value) and f"at {shown}" in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        m = OpenAIModel(f"http://u:sk-LEAK-6@127.0.0.1:{s.getsockname()[1]}/v1", "m",
                        max_retries=0)
        with pytest.raises(ModelCallError, match="can't reach") as info:
            await m.complete(req())
        await m.aclose()
    assert "sk-LEAK" not in str(info.value)
    # ...and out of the task's error and its events.
    cfg = swarm_cfg(tmp_path, dataclasses.replace(server, url=leaky))  # the same scripts
    server.script("primary", error(500, "boom"))
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        evs = sw.events(row["task_id"])
    assert row["state"] == "failed" and row["error_class"] == "model", row
    assert "sk-LEAK" not in row["error"] and shown in row["error"]
    assert not any("sk-LEAK" in repr(e) for e in evs)
