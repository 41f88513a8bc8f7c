"""Tracing: the exact span tree of a three-agent task, redaction, exporters that can't connect,
the trace store and `swarm trace` rendering, and the traceparent reaching an MCP server."""

from __future__ import annotations

import collections
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import Context, MCPServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from swarm.errors import ConfigError
from swarm.observability._export import REDACTED, Redactor, build_exporter
from swarm.observability.store import JsonlTraceStore, MemoryTraceStore
from swarm.observability.tracing import Tracing, install, traceparent_of
from swarm.protocol import a2a
from swarm.testing import LocalSwarm
from swarm.tools.mcp import MCPToolSource
from tests.unit.test_runtime_local import make_cfg

THREE_AGENTS = [
    {"when": {"agent": "a", "last_role": "user"},
     "tool_calls": [{"name": "echo", "arguments": {"text": "found {{ task }}"}}]},
    {"when": {"agent": "a", "last_tool": "echo"},
     "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "check it"}}]},
    {"when": {"agent": "b"},
     "tool_calls": [{"name": "transfer_to_c", "arguments": {"message": "write it up"}}]},
    {"when": {"agent": "c"}, "content": "c says: {{ results.echo }}"},
]
AGENTS = {"a": {"model": "m", "tools": ["fn"], "handoffs": ["b"]},
          "b": {"model": "m", "handoffs": ["c"]}, "c": {"model": "m"}}


class Traced:
    """A private provider with an in-memory exporter, installed as this process's tracing."""

    def __init__(self, **tracing: Any) -> None:
        from swarm.config import TracingConfig

        self.memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.store = MemoryTraceStore()
        self.settings = TracingConfig(**tracing)
        self.tracing = Tracing(provider=provider, store=self.store, settings=self.settings,
                               exporter=tracing.pop("_exporter", None))

    def spans(self) -> list[Any]:
        self.tracing.sink.flush()  # per-step spans reach processors from the sink's thread
        return list(self.memory.get_finished_spans())


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    previous = install(t.tracing)
    yield t
    install(previous)
    t.tracing.shutdown()


def tree(spans: list[Any]) -> list[tuple[str, list[Any]]]:
    """Spans as nested (name, children), children in start order."""
    by_parent: dict[int | None, list[Any]] = {}
    for s in spans:
        by_parent.setdefault(s.parent.span_id if s.parent else None, []).append(s)

    def build(parent: int | None) -> list[tuple[str, list[Any]]]:
        kids = sorted(by_parent.get(parent, []), key=lambda s: s.start_time)
        return [(s.name, build(s.context.span_id)) for s in kids]

    return build(None)


def cfg3(tmp_path: Path, **extra: Any) -> Any:
    return make_cfg(tmp_path, THREE_AGENTS, AGENTS, **extra)


async def test_three_agent_task_is_one_trace_with_the_exact_tree(tmp_path: Path, traced: Traced
                                                                ) -> None:
    async with LocalSwarm(cfg3(tmp_path)) as sw:
        row = await sw.run("the facts")
    assert row["state"] == "completed", row
    spans = traced.spans()
    assert tree(spans) == [
        ("invoke_workflow t", [
            ("SendMessage a", [("invoke_agent a", [
                ("chat m", []), ("execute_tool echo", []), ("chat m", [])])]),
            ("SendMessage b", [("invoke_agent b", [("chat m", [])])]),
            ("SendMessage c", [("invoke_agent c", [("chat m", [])])]),
        ]),
    ]
    assert len({s.context.trace_id for s in spans}) == 1
    task_id, context_id = row["task_id"], row["context_id"]
    for s in spans:
        attrs = s.attributes
        assert attrs["swarm.task.id"] == task_id
        assert attrs["gen_ai.conversation.id"] == context_id
    ops = {s.name: s.attributes.get("gen_ai.operation.name") for s in spans}
    assert ops == {"invoke_workflow t": "invoke_workflow", "invoke_agent a": "invoke_agent",
                   "invoke_agent b": "invoke_agent", "invoke_agent c": "invoke_agent",
                   "chat m": "chat", "execute_tool echo": "execute_tool",
                   "SendMessage a": None, "SendMessage b": None, "SendMessage c": None}
    agents = [s for s in spans if s.name.startswith("invoke_agent")]
    assert [(s.attributes["gen_ai.agent.name"], s.attributes["gen_ai.request.model"],
             s.attributes["swarm.outcome"]) for s in sorted(agents, key=lambda s: s.start_time)
            ] == [("a", "m", "handoff"), ("b", "m", "handoff"), ("c", "m", "final")]
    chats = sorted((s for s in spans if s.name == "chat m"), key=lambda s: s.start_time)
    assert [c.attributes["gen_ai.agent.name"] for c in chats] == ["a", "a", "b", "c"]
    for c in chats:
        a = c.attributes
        assert a["gen_ai.request.model"] == "m" and a["gen_ai.provider.name"] == "scripted"
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["gen_ai.usage.cache_read.input_tokens"] >= 0
        assert a["gen_ai.response.finish_reasons"] in (("tool_calls",), ("stop",))
    assert chats[-1].attributes["gen_ai.response.finish_reasons"] == ("stop",)
    # The chat spans' tokens add up to the task's.
    assert sum(c.attributes["gen_ai.usage.input_tokens"] for c in chats) == row["input_tokens"]
    assert sum(c.attributes["gen_ai.usage.output_tokens"] for c in chats) == \
        row["output_tokens"]
    (tool,) = [s for s in spans if s.name == "execute_tool echo"]
    assert tool.attributes["gen_ai.tool.name"] == "echo"
    assert tool.attributes["gen_ai.tool.type"] == "function"
    assert tool.attributes["gen_ai.tool.call.id"].startswith("call_")
    sends = sorted((s for s in spans if s.name.startswith("SendMessage")),
                   key=lambda s: s.start_time)
    assert [(s.attributes["a2a.method.name"], s.attributes["a2a.task.id"],
             s.attributes["a2a.task.state"]) for s in sends] == [
        ("SendMessage", task_id, "working"), ("SendMessage", task_id, "working"),
        ("SendMessage", task_id, "completed")]
    (wf,) = [s for s in spans if s.name == "invoke_workflow t"]
    assert wf.attributes["swarm.task.state"] == "completed"
    assert wf.attributes["gen_ai.usage.input_tokens"] == row["input_tokens"]
    # Content is off by default: no prompts, answers, arguments or results in any span.
    assert not [k for s in spans for k in s.attributes
                if k in ("gen_ai.input.messages", "gen_ai.output.messages",
                         "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")]


async def test_traceparent_travels_in_the_a2a_messages(tmp_path: Path, traced: Traced) -> None:
    sent: list[tuple[str, str | None, str]] = []
    async with LocalSwarm(cfg3(tmp_path)) as sw:
        pool = sw.supervisor.pool
        turn = pool.turn

        async def spy(role: str, key: str, req: Any, attempt: int = 0) -> Any:
            meta = a2a.loads_message(req.message).metadata
            sent.append((role, req.traceparent, meta["traceparent"]))
            return await turn(role, key, req, attempt)

        pool.turn = spy  # type: ignore[method-assign]
        await sw.run("the facts")
    sends = {s.attributes["gen_ai.agent.name"]: s for s in traced.spans()
             if s.name.startswith("SendMessage")}
    agents = {s.attributes["gen_ai.agent.name"]: s for s in traced.spans()
              if s.name.startswith("invoke_agent")}
    assert [role for role, _, _ in sent] == ["a", "b", "c"]
    for role, in_request, in_message in sent:
        # The request and the A2A message carry the W3C traceparent of the A2A span, and the
        # agent's span (in "another actor") continues from it.
        assert in_request == in_message == traceparent_of(sends[role])
        assert agents[role].parent.span_id == sends[role].context.span_id


async def test_content_capture_is_opt_in_and_secrets_are_redacted(tmp_path: Path) -> None:
    rules = [
        {"when": {"agent": "a", "last_role": "user"},
         "tool_calls": [{"name": "echo", "arguments": {"text": "{{ task }}"}}]},
        {"when": {"agent": "a"}, "content": "done: {{ results.echo }}"},
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}},
                   models={"m": {"provider": "scripted", "policy": "policy.yaml"},
                           "paid": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1",
                                    "model": "x", "api_key": "s3cr3t-config-key"}},
                   tracing={"capture_content": True})
    t = Traced(capture_content=True)
    previous = install(t.tracing)
    try:
        async with LocalSwarm(cfg) as sw:
            row = await sw.run("key s3cr3t-config-key, Authorization: Bearer abcdef0123456789 "
                               "and password=hunter22 but the weather is fine")
    finally:
        install(previous)
        t.tracing.shutdown()
    assert row["state"] == "completed"
    captured = [str(v) for s in t.spans() for k, v in s.attributes.items()
                if k in ("gen_ai.input.messages", "gen_ai.output.messages",
                         "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")]
    assert len(captured) == 6  # two chats (in and out), one tool (arguments and result)
    text = "\n".join(captured)
    assert "the weather is fine" in text  # content is there...
    for secret in ("s3cr3t-config-key", "abcdef0123456789", "hunter22"):
        assert secret not in text  # ...secrets are not
    assert REDACTED in text


def test_redactor_patterns() -> None:
    r = Redactor(["my-configured-token"])
    assert r("x my-configured-token y") == f"x {REDACTED} y"
    assert r('{"api_key": "abc123xyz"}') == '{' + REDACTED + '}' or \
        "abc123xyz" not in r('{"api_key": "abc123xyz"}')
    assert "sk-proj1234567890abcdefgh" not in r("use sk-proj1234567890abcdefgh now")
    assert r("nothing secret here") == "nothing secret here"


def test_invalid_exporter_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        cfg3(tmp_path, tracing={"exporter": "zipkin"})
    assert "tracing.exporter" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg3(tmp_path, tracing={"exporter": "otlp"})
    assert "tracing" in str(e.value) and "otlp.endpoint" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg3(tmp_path, tracing={"exporter": "otlp", "otlp": {"endpoint": "localhost:4317"}})
    assert "tracing.otlp.endpoint" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg3(tmp_path, tracing={"exporter": "otlp", "otlp": {"endpoint": "http://h:4317",
                                                              "protocol": "thrift"}})
    assert "tracing.otlp.protocol" in str(e.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_an_exporter_that_cannot_connect_never_fails_a_task(
        tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")
    port = _closed_port()
    cfg = cfg3(tmp_path, tracing={
        "exporter": "otlp", "max_queue": 2, "batch_size": 1,
        "otlp": {"endpoint": f"http://127.0.0.1:{port}", "protocol": protocol,
                 "timeout_s": 0.5}})
    exporter = build_exporter(cfg.tracing, tmp_path)
    tracing = Tracing(provider=TracerProvider(), store=MemoryTraceStore(),
                      exporter=exporter, settings=cfg.tracing)
    previous = install(tracing)
    try:
        async with LocalSwarm(cfg) as sw:
            rows = [await sw.run(f"task {i}") for i in range(3)]
        assert [r["state"] for r in rows] == ["completed"] * 3
        tracing.flush(timeout_s=30)
        stats = tracing.stats()
    finally:
        install(previous)
        tracing.shutdown()
    otlp = stats["otlp"]
    # 3 tasks x 12 spans: every one was either dropped (queue of 2 full) or failed to export.
    assert otlp["ended"] == 36
    assert otlp["exported"] == 0 and otlp["failed"] > 0 and otlp["dropped"] > 0
    assert otlp["failed"] + otlp["dropped"] == otlp["ended"]
    # The trace store, on its own processor, got everything.
    assert stats["store"]["exported"] == 36 and stats["store"]["dropped"] == 0
    # The exporter's own complaints: at most one a minute for each of its loggers and levels
    # (one for every batch filled the log), and swarm's note says what was lost.
    sdk = collections.Counter((r.name, r.levelno) for r in caplog.records
                              if r.name.startswith("opentelemetry"))
    assert sdk and max(sdk.values()) == 1, sdk
    notes = [r.getMessage() for r in caplog.records if "tracing: exporter otlp" in
             r.getMessage()]
    assert notes and "was full" in notes[0] and "queue of 4096" not in notes[0], notes


async def test_a_local_swarm_flushes_its_spans_as_it_exits(tmp_path: Path) -> None:
    """A script's last tasks' spans reach the exporter though nobody flushed them (they went
    with the process)."""
    cfg = cfg3(tmp_path, tracing={"exporter": "jsonl", "flush_interval_s": 60})
    tracing = Tracing(provider=TracerProvider(), store=None,
                      exporter=build_exporter(cfg.tracing, tmp_path), settings=cfg.tracing)
    previous = install(tracing)
    try:
        async with LocalSwarm(cfg) as sw:
            await sw.run("the last task")
        lines = (tmp_path / cfg.tracing.jsonl_path).read_text().splitlines()
    finally:
        install(previous)
        tracing.shutdown()
    assert len(lines) == 12, len(lines)


async def test_trace_store_keeps_spans_per_task(tmp_path: Path, traced: Traced) -> None:
    async with LocalSwarm(cfg3(tmp_path)) as sw:
        one = await sw.run("first")
        two = await sw.run("second")
        rows = await sw.supervisor.trace(one["task_id"])
    assert len(rows) == 12
    assert {r["attrs"]["swarm.task.id"] for r in rows} == {one["task_id"]}
    assert rows[0]["name"] == "invoke_workflow t" and rows[0]["parent"] is None
    assert len(traced.store.read(two["task_id"])) == 12
    ids = {r["span"] for r in rows}
    assert all(r["parent"] in ids for r in rows[1:])


def test_jsonl_store_round_trip(tmp_path: Path) -> None:
    store = JsonlTraceStore(tmp_path / "traces")
    store.append({"t-1": [b'{"name": "x", "start": 1.0}'], "../evil": [b'{"name": "y"}']})
    assert store.read("t-1") == [{"name": "x", "start": 1.0}]
    assert store.read("../evil") == [{"name": "y"}]
    assert all(p.parent == tmp_path / "traces" for p in (tmp_path / "traces").iterdir())
    assert store.read("nothing") == []


async def test_trace_rendering(tmp_path: Path) -> None:
    from rich.console import Console

    from swarm.observability.render import render_trace

    cfg = cfg3(tmp_path, models={"m": {"provider": "scripted", "policy": "policy.yaml",
                                       "price": {"input_per_mtok": 1000,
                                                 "output_per_mtok": 2000}}})
    t = Traced()
    previous = install(t.tracing)
    try:
        async with LocalSwarm(cfg) as sw:
            row = await sw.run("the facts")
            rows = await sw.supervisor.trace(row["task_id"])
    finally:
        install(previous)
        t.tracing.shutdown()
    console = Console(width=140, record=True, color_system=None)
    console.print(render_trace(rows))
    text = console.export_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for n in ("invoke_workflow t", "SendMessage a", "invoke_agent a", "chat m",
              "execute_tool echo", "SendMessage b", "invoke_agent c"):
        assert n in text
    # Nesting shows as indentation: workflow < send < agent < chat.
    def indent(name: str) -> int:
        line = next(ln for ln in lines if name in ln)
        return line.index(name)
    assert indent("invoke_workflow t") < indent("SendMessage a") < indent("invoke_agent a") \
        < indent("chat m")
    cost = (row["input_tokens"] * 1000 + row["output_tokens"] * 2000) / 1e6
    assert f"${cost:.4f}" in text
    assert f"{row['input_tokens']} in" in text


def test_a_rendered_trace_shows_control_characters_as_escapes_and_small_costs() -> None:
    """What peers put in spans (a model server's error, its finish reason) can't drive the
    terminal, and a cost under a cent is not shown as $0.0000."""
    from swarm._console import SafeConsole
    from swarm.observability.render import render_trace

    rows = [{"trace": "t1", "span": "s1", "parent": None, "start": 1.0, "end": 1.5,
             "name": "chat m\x1b[2J", "status": "error", "error": "bad \x1b[31mRED\x00",
             "attrs": {"gen_ai.operation.name": "chat", "swarm.cost_usd": 2e-05,
                       "gen_ai.response.finish_reasons": ["\x1b[2Jstop"],
                       "error.type": "model"}}]
    console = SafeConsole(width=200, record=True, color_system=None)
    console.print(render_trace(rows, title="trace of \x1b]0;x\x07"))
    text = console.export_text()
    assert "\x1b" not in text and "\x00" not in text and "\x07" not in text, repr(text)
    assert "chat m\\x1b[2J" in text and "bad \\x1b[31mRED\\x00" in text, text
    assert "[\\x1b[2Jstop]" in text and "$2e-05" in text, text


async def test_traceparent_reaches_an_mcp_server(tmp_path: Path, traced: Traced) -> None:
    server = MCPServer("probe", log_level="WARNING")

    @server.tool()
    def trace(ctx: Context) -> str:
        """Report the traceparent this request carried."""
        meta = ctx.request_context.meta or {}
        return str(meta.get("traceparent") if isinstance(meta, dict) else meta.traceparent)

    rules = [
        {"when": {"agent": "a", "last_role": "user"},
         "tool_calls": [{"name": "trace", "arguments": {}}]},
        {"when": {"agent": "a"}, "content": "{{ results.trace }}"},
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["probe"]}},
                   tools={"probe": {"mcp": {"command": "unused"}}})
    sw = LocalSwarm(cfg)
    sw.hosts["a"].sources["probe"] = MCPToolSource("probe", server)
    async with sw:
        row = await sw.run("go")
    assert row["state"] == "completed", row
    (tool,) = [s for s in traced.spans() if s.name == "execute_tool trace"]
    assert row["answer"] == traceparent_of(tool)
    ctx = TraceContextTextMapPropagator().extract({"traceparent": row["answer"]})
    from opentelemetry.trace import get_current_span

    assert get_current_span(ctx).get_span_context().span_id == tool.context.span_id


async def test_no_installed_tracing_means_no_spans_and_no_layer(tmp_path: Path) -> None:
    previous = install(None)
    try:
        async with LocalSwarm(cfg3(tmp_path)) as sw:
            row = await sw.run("x")
            assert sw.supervisor._tracer is None
            assert sw.hosts["a"]._tracer is None
            assert sw.hosts["a"]._loop is not None
            # No layer records spans (a metering layer may still meter, without a sink).
            assert all(getattr(m, "sink", None) is None for m in sw.hosts["a"]._loop.middleware)
    finally:
        install(previous)
    assert row["state"] == "completed"


async def test_redis_trace_store_from_config_as_actors_use_it(tmp_path: Path) -> None:
    """`Tracing.from_config` with a Redis state store (as each Ray actor builds it): spans of
    two processes' tracers land in one per-task LIST with a TTL."""
    from swarm.observability.store import RedisTraceStore
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        cfg = cfg3(tmp_path, tracing={"store_ttl_s": 3600})
        sup_side = Tracing.from_config(cfg, server.url, provider=TracerProvider())
        agent_side = Tracing.from_config(cfg, server.url, provider=TracerProvider())
        assert isinstance(sup_side.store, RedisTraceStore)
        previous = install(sup_side)
        try:
            async with LocalSwarm(cfg) as sw:
                # The agents trace through "another process's" tracing.
                install(agent_side)
                for host in sw.hosts.values():
                    host._tracer = None
                    host._loop = None
                    await host.start()
                install(sup_side)
                row = await sw.run("the facts")
            agent_side.flush()
            rows = sup_side.read(row["task_id"])
        finally:
            install(previous)
        names = sorted(r["name"] for r in rows)
        assert names == sorted(["invoke_workflow t", "SendMessage a", "SendMessage b",
                                "SendMessage c", "invoke_agent a", "invoke_agent b",
                                "invoke_agent c", "chat m", "chat m", "chat m", "chat m",
                                "execute_tool echo"])
        store = sup_side.store
        assert isinstance(store, RedisTraceStore)
        ttl = store._redis.ttl(store.key(row["task_id"]))
        assert 0 < ttl <= 3600
        assert sup_side.stats()["store"]["failed"] == 0
        sup_side.shutdown()
        agent_side.shutdown()
    finally:
        server.stop()


async def test_a_library_span_inside_an_mcp_tool_call_is_a_sampled_child(
        tmp_path: Path, traced: Traced) -> None:
    """What the MCP SDK does under a tool call: start an SDK span from the current context. It
    must nest under the `execute_tool` span and be sampled (a parent-based sampler reads the
    parent's trace flags)."""
    from opentelemetry.trace import get_current_span

    from swarm.models.interface import ToolCall
    from swarm.observability.metering import metering_layer
    from swarm.observability.tracing import swarm_tracer
    from swarm.runtime.middleware import ToolInvocation
    from swarm.runtime.step import Session, _tool_record
    from swarm.tools.interface import ToolContext, ToolResult

    cfg = make_cfg(tmp_path, [{"when": {}, "content": "x"}],
                   {"a": {"model": "m", "tools": ["probe"]}},
                   tools={"probe": {"mcp": {"command": "unused"}}})
    layer = metering_layer(cfg, "a", tracer=swarm_tracer(cfg))
    assert layer is not None

    class Source:
        name = "probe"

    class Entry:
        source = Source()

    seen: dict[str, Any] = {}

    async def tool(inv: ToolInvocation) -> ToolResult:
        seen["current"] = get_current_span().get_span_context()
        with traced.tracing.provider.get_tracer("lib").start_as_current_span("lib call") as s:
            seen["lib"] = s
        return ToolResult(content="ok")

    session = Session(task_id="t1", agent="a", session_id="c1", messages=[])
    inv = ToolInvocation(session=session, step=1, index=0, agent="a",
                         call=ToolCall(id="k1", name="trace", arguments="{}"), entry=Entry(),
                         args={}, ctx=ToolContext(task_id="t1", agent="a", call_id="k1", step=1))
    n0 = time.time_ns()
    await layer.on_tool(inv, tool)
    assert layer.records is not None
    layer.records(_tool_record(inv, n0, "ok", None, None))  # as the step loop does
    await layer.aclose()
    (span,) = [s for s in traced.spans() if s.name == "execute_tool trace"]
    (lib,) = [s for s in traced.spans() if s.name == "lib call"]
    assert seen["current"].trace_flags.sampled
    assert lib.parent is not None and lib.parent.span_id == span.context.span_id
    assert lib.context.trace_id == span.context.trace_id
    assert inv.ctx.traceparent == traceparent_of(span)


def test_redis_trace_store_reports_an_error_reply_and_keeps_working(tmp_path: Path) -> None:
    """A key of the wrong type fails that write with Redis's error; the connection is still in
    step for the next one."""
    from redis.exceptions import ResponseError

    from swarm.observability.store import RedisTraceStore
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        store = RedisTraceStore(server.url, ttl_s=60)
        store._redis.set(store.key("bad"), "a string, not a list")
        row = b'{"name":"x","trace":"1","span":"2","parent":null,"kind":"internal",' \
              b'"start":1.0,"end":2.0,"status":"unset","error":null,"attrs":{}}'
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            store.append({"ok1": [row], "bad": [row], "ok2": [row, row]})
        assert [r["name"] for r in store.read("ok2")] == ["x", "x"]  # the rest was written
        store.append({"ok3": [row]})
        assert len(store.read("ok3")) == 1
        assert 0 < store._redis.ttl(store.key("ok3")) <= 60
        store.close()
    finally:
        server.stop()


def test_redis_trace_store_sets_a_lists_ttl_without_a_command_every_write(tmp_path: Path
                                                                         ) -> None:
    """The TTL is set by a list's first write and refreshed once it is due, not by every
    write; a list that went away (expired, removed) meanwhile gets its TTL again."""
    from swarm.observability.store import RedisTraceStore
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        store = RedisTraceStore(server.url, ttl_s=60_000)
        r, key, row = store._redis, store.key("t"), b'{"name":"x"}'
        store.append({"t": [row]})
        assert 59_000 < r.ttl(key) <= 60_000
        r.config_resetstat()
        r.expire(key, 100)
        store.append({"t": [row, row], "u": [row]})  # t's TTL isn't due: no EXPIRE for it
        assert r.llen(key) == 3 and 0 < r.ttl(key) <= 100
        assert 59_000 < r.ttl(store.key("u")) <= 60_000
        assert r.info("commandstats")["cmdstat_expire"]["calls"] == 2  # ours, and u's
        r.delete(key)
        store.append({"t": [row]})  # a new list: its TTL is set at once
        assert r.llen(key) == 1 and 59_000 < r.ttl(key) <= 60_000
        store._expires["t"] -= 601  # as if the refresh were due (60,000 / 100 s since)
        r.expire(key, 100)
        store.append({"t": [row]})
        assert 59_000 < r.ttl(key) <= 60_000
        store.close()
    finally:
        server.stop()


def _compact(kind: str, span: str, step: int) -> list[Any]:
    """A compact per-step span in the layout `swarm.observability.store.step_row` reads."""
    head = [kind, "a" * 32, span, "p" * 16, "task-1", "conv", step, "agent"]
    if kind == "c":
        return [*head, "openai", 0.25, 1_000, 2_000, "ok", None, None, None, None, None,
                "m", "m", "stop", 0, 10, 5, 0, False]
    return [*head, None, None, 3_000, 4_000, "error", "tool", "boom", None, None, None,
            "echo", "call-1", "fn"]


@contextmanager
def _every_store(tmp_path: Path) -> Iterator[list[Any]]:
    """The memory, JSONL and Redis trace stores (Redis: a real redis-server of its own)."""
    from swarm.observability.store import RedisTraceStore
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        stores = [MemoryTraceStore(), JsonlTraceStore(tmp_path / "traces"),
                  RedisTraceStore(server.url, ttl_s=60)]
        yield stores
        stores[2].close()
    finally:
        server.stop()


def _refuses(store: Any, elements: list[Any]) -> None:
    """Each malformed stored element is a clear decode error on reading (the JSONL store
    skips it, like a torn last line)."""
    import msgspec

    for n, element in enumerate(elements):
        store.append({f"bad-{n}": [msgspec.json.encode(element)]})
        if isinstance(store, JsonlTraceStore):
            assert store.read(f"bad-{n}") == []
        else:
            with pytest.raises(msgspec.DecodeError, match="malformed step span"):
                store.read(f"bad-{n}")


def test_every_trace_store_reads_chunks_of_step_spans_in_order(tmp_path: Path) -> None:
    """The sink stores a task's per-step spans of one flush as one chunk element; a reader
    expands it among full rows and single compact rows, in the order written, and a malformed
    chunk is a clear decode error (a torn JSONL line is skipped)."""
    import msgspec

    from swarm.observability.store import CHUNK

    enc = msgspec.json.encode
    full = enc({"name": "invoke_agent a", "trace": "a" * 32, "span": "s0", "parent": None,
                "kind": "internal", "start": 0.5, "end": 5.0, "status": "unset",
                "error": None, "attrs": {}})
    chunk = enc([CHUNK, _compact("c", "s1", 1), _compact("t", "s2", 1)])
    single = enc(_compact("c", "s3", 2))
    with _every_store(tmp_path) as stores:
        for store in stores:
            store.append({"task-1": [full, chunk]})
            store.append({"task-1": [single]})
            rows = store.read("task-1")
            assert [r["span"] for r in rows] == ["s0", "s1", "s2", "s3"], type(store)
            assert [r["name"] for r in rows] == ["invoke_agent a", "chat m",
                                                 "execute_tool echo", "chat m"]
            assert rows[1]["attrs"]["swarm.cost_usd"] == 0.25
            assert rows[2]["status"] == "error" and rows[2]["attrs"]["error.type"] == "tool"
            _refuses(store, [[CHUNK, ["c", "too short"]],
                             [CHUNK, _compact("c", "s4", 3), [CHUNK]],
                             [CHUNK, ["x", *_compact("t", "s5", 3)[1:]]]])


def _record(kind: int, step: int, span_id: int = 0) -> list[Any]:
    """A metering layer's call record (`swarm.observability.metering`), as JSON keeps it."""
    head = [kind, "task-1", "conv", "ana", step, ["a" * 32, "b" * 16], span_id]
    if kind == 0:
        return [*head, 1_000, 2_000, "ok", None, None, None, None, None, "m", "m", "stop", 0,
                10, 5, 0, False]
    return [*head, 3_000, 4_000, "ok", None, None, None, None, None, "echo", "call-1", "fn"]


def test_every_trace_store_reads_chunks_of_call_records(tmp_path: Path) -> None:
    """An agent's calls of one task are stored as its records, one chunk per flush: a reader
    expands them into the `chat` and `execute_tool` rows, with span ids from the chunk's base
    (the same on every read) unless a record has its own (an MCP tool call's, which its server's
    spans hang under); a malformed chunk is a clear decode error."""
    import msgspec

    from swarm.observability.store import call_chunk

    enc = msgspec.json.encode
    chunk = call_chunk("writer", "openai", [_record(0, 1), _record(1, 1, 0xABC), _record(0, 2)],
                       [0.25, 0.0, 0.5])
    base = int(chunk[3], 16)
    with _every_store(tmp_path) as stores:
        for store in stores:
            store.append({"task-1": [enc(chunk)]})
            rows = store.read("task-1")
            assert rows == store.read("task-1"), type(store)
            assert [r["name"] for r in rows] == ["chat m", "execute_tool echo", "chat m"]
            assert [r["span"] for r in rows] == [
                format(base % (2**64 - 1) + 1, "016x"), "0000000000000abc",
                format((base + 2) % (2**64 - 1) + 1, "016x")]
            assert {(r["trace"], r["parent"]) for r in rows} == {("a" * 32, "b" * 16)}
            chat = rows[0]["attrs"]
            assert (chat["gen_ai.agent.name"], chat["gen_ai.provider.name"],
                    chat["swarm.cost_usd"], chat["gen_ai.usage.input_tokens"],
                    chat["swarm.task.id"], chat["swarm.step"]) == \
                ("writer", "openai", 0.25, 10, "task-1", 1)
            assert rows[1]["attrs"]["gen_ai.tool.name"] == "echo"
            assert "gen_ai.provider.name" not in rows[1]["attrs"]
            assert (rows[2]["start"], rows[2]["end"]) == (1e-6, 2e-6)
            _refuses(store, [[*chunk[:3], "abc", chunk[4], chunk[5]],  # no base span id
                             [*chunk[:5], [0.25]],  # a cost short
                             [*chunk[:4], [[7, *_record(0, 1)[1:]]], [0.0]],  # unknown kind
                             [*chunk[:4], [_record(0, 1)[:9]], [0.0]],  # a record cut short
                             chunk[:5]])  # no costs


def test_calls_waiting_for_a_stuck_writer_are_bounded_and_counted(traced: Traced) -> None:
    """While nothing is written (a trace store that doesn't answer holds the writer), the
    sink keeps a bounded number of calls waiting and counts the rest as dropped; once a flush
    gets through, it takes calls again."""
    from swarm.observability import tracing as tracing_mod

    sink = traced.tracing.sink
    bound = tracing_mod._QUEUED_FLUSHES * sink.max_queue
    records = [tuple(_record(1, 1)) for _ in range(1000)]
    puts = bound // 1000 + 2
    for _ in range(puts):  # no flush in between: the writer is held up
        sink.put_calls("writer", "openai", records, [0.0] * 1000)
    stats = sink.stats()
    assert stats["queued"] == bound // 1000 * 1000 <= bound
    assert stats["dropped"] == puts * 1000 - stats["queued"] > 0
    assert stats["ended"] == puts * 1000
    sink.flush()
    assert sink.stats()["queued"] == 0 and sink.stats()["exported"] == bound // 1000 * 1000
    assert len(traced.store.read("task-1")) == bound // 1000 * 1000
    sink.put_calls("writer", "openai", records, [0.0] * 1000)
    assert sink.stats()["queued"] == 1000


def test_calls_dropped_before_the_sink_are_counted_as_ended_and_dropped(
        tmp_path: Path, traced: Traced) -> None:
    from swarm.observability.metering import MeteringLayer
    from swarm.observability.tracing import SwarmTracer
    from swarm.runtime.step import Session

    cfg = cfg3(tmp_path)
    layer = MeteringLayer(cfg, "a", swarm="t", tracer=SwarmTracer(traced.tracing, cfg))
    sink = traced.tracing.sink
    sink.sources.remove(layer.drain)  # drained here only, not by the sink's thread
    layer.max_pending = 2
    assert layer.records is not None
    for step in range(3):  # nothing drains in between: the third is one too many
        layer.records(tuple(_record(1, step)))
    layer.on_turn_end(Session("t", "a", "s", []))  # where the bound is kept
    assert sink.stats()["ended"] == 1 and sink.stats()["dropped"] == 1
    layer.drain()
    sink.flush()
    stats = sink.stats()
    assert stats["ended"] == 3 and stats["exported"] == 2 and stats["queued"] == 0
    assert stats["ended"] == stats["exported"] + stats["failed"] + stats["dropped"]


def test_a_calls_parent_ids_are_kept_only_for_the_turns_own_span() -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, use_span

    from swarm.observability.metering import _parent_ids
    from swarm.runtime.step import Session

    own = SpanContext(0xA, 0xB, False)
    turn = Session("t", "a", "s", [])
    turn.scratch["span"] = own
    assert _parent_ids(turn) == (f"{0xA:032x}", f"{0xB:016x}")
    assert turn.scratch["span_ids"] == _parent_ids(turn)  # read from here by later calls
    # No span of the turn's own, a current one: looked up on each call, never kept.
    other = Session("t", "a", "s", [])
    with use_span(NonRecordingSpan(SpanContext(0xC, 0xD, False))):
        assert _parent_ids(other) == (f"{0xC:032x}", f"{0xD:016x}")
    assert "span_ids" not in other.scratch and "span" not in other.scratch


async def test_stored_and_exported_step_spans_have_the_same_ids(tmp_path: Path,
                                                                traced: Traced) -> None:
    async with LocalSwarm(cfg3(tmp_path)) as sw:
        row = await sw.run("the facts")
    exported = {format(s.context.span_id, "016x"): s.name for s in traced.spans()}
    stored = {r["span"]: r["name"] for r in traced.store.read(row["task_id"])}
    assert len(stored) == 12 and stored == exported


def test_a_read_keeps_the_newest_rows_and_expands_no_further(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the per-read cap, a read returns the newest rows in order, the oldest chunk cut
    in the middle, and doesn't decode the elements before it."""
    import msgspec

    from swarm.observability import store as trace_store

    monkeypatch.setattr(trace_store, "_MAX_ROWS", 5)
    enc = msgspec.json.encode
    store = MemoryTraceStore()
    store.append({"t": [b"not json: never read", enc([trace_store.CHUNK, *(
        _compact("t", f"a{i}", 1) for i in range(3))])]})
    store.append({"t": [enc([trace_store.CHUNK, *(_compact("t", f"b{i}", 2) for i in range(3))])]})
    assert [r["span"] for r in store.read("t")] == ["a1", "a2", "b0", "b1", "b2"]


def test_calls_without_a_turn_span_keep_one_trace_per_task_and_redacted_errors(
        tmp_path: Path, traced: Traced) -> None:
    """Records a step loop made without an agent host's turn span (no parent ids) get a trace
    of their own per task, the same in later drains; error texts are redacted when drained."""
    from swarm.observability.metering import MeteringLayer
    from swarm.observability.tracing import SwarmTracer

    cfg = cfg3(tmp_path)
    layer = MeteringLayer(cfg, "a", swarm="t", tracer=SwarmTracer(traced.tracing, cfg))
    assert layer.records is not None
    secret = "sk-" + "a1" * 20  # looks like an API key
    for step in (1, 2):
        rec = _record(1, step)
        rec[5] = None
        if step == 2:
            rec[9:12] = ["error", "tool", f"token {secret} refused"]
        layer.records(tuple(rec))
        layer.drain()  # one drained batch each
    traced.tracing.sink.flush()
    rows = [r for r in traced.store.read("task-1") if r["name"].startswith("execute_tool")]
    assert len(rows) == 2 and rows[0]["trace"] == rows[1]["trace"] != "a" * 32
    assert rows[0]["parent"] is None and rows[1]["parent"] is None
    text = json.dumps(rows[1])
    assert secret not in text and "refused" in text


async def test_a_model_call_is_timed_from_where_a_layer_says_it_starts(tmp_path: Path) -> None:
    """A layer that spends time of its own before the call (memory priming) leaves the start
    in `extra` "start_ns"; the call's record starts there."""
    from swarm.models.interface import ModelResponse
    from swarm.runtime.middleware import Middleware, ModelCall, NextModel
    from swarm.runtime.step import MODEL
    from tests.unit.test_middleware import Keeper, _use
    from tests.unit.test_runtime_local import make_cfg

    starts: list[int] = []

    class Primer(Middleware):
        async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
            starts.append(time.time_ns())
            call.extra["start_ns"] = starts[-1]
            return await nxt(call)

    cfg = make_cfg(tmp_path, [{"when": {}, "content": "done"}], {"a": {"model": "m"}})
    keeper = Keeper()
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["a"].start()
        _use(sw, [keeper, Primer()])
        row = await sw.run("go")
    assert row["state"] == "completed"
    (rec,) = [r for r in keeper.kept if r[0] == MODEL]
    assert rec[7] == starts[0] and rec[7] <= rec[8]
