"""MCPToolSource over real transports: a stdio subprocess, streamable HTTP, in-process servers.

No Ray. Servers are the research example server, started as subprocesses on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError as ServerToolError
from pydantic import SecretStr

import swarm
from swarm.config import MCPHttpConfig, MCPStdioConfig, ToolServerConfig
from swarm.errors import ToolError
from swarm.tools.interface import ToolContext
from swarm.tools.mcp import MCPToolSource
from tests.integration.conftest import free_port, wait_until_listening

REPO = Path(swarm.__file__).resolve().parents[1]
MODULE = "swarm.examples.research_server"
CTX = ToolContext(task_id="t1", agent="researcher", session_id="s1")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def stdio_config(notes_dir: Path) -> MCPStdioConfig:
    return MCPStdioConfig(
        command=sys.executable,
        args=["-m", MODULE],
        cwd=str(REPO),
        env={"SWARM_NOTES_DIR": SecretStr(str(notes_dir))},
    )


def stdio_server_pid() -> int:
    """The pid of the one stdio research server this test process has spawned."""
    found = [
        p.pid for p in psutil.Process().children()
        if MODULE in p.cmdline() and "--http" not in p.cmdline()
    ]
    assert len(found) == 1, found
    return found[0]


def spawn_http_server(port: int, notes_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", MODULE, "--http", "--port", str(port)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "SWARM_NOTES_DIR": str(notes_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
async def stdio_source(tmp_path) -> AsyncIterator[MCPToolSource]:
    src = MCPToolSource("research", stdio_config(tmp_path), timeout_s=20)
    yield src
    await src.aclose()


@pytest.fixture
async def http_server(tmp_path) -> AsyncIterator[tuple[str, int, subprocess.Popen]]:
    port = free_port()
    proc = spawn_http_server(port, tmp_path)
    try:
        await wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}/mcp", port, proc
    finally:
        stop(proc)


def _top_id(result) -> str:
    assert not result.is_error, result.content
    return result.structured["result"][0]["id"]


# ---- stdio ----------------------------------------------------------------------------------


async def test_stdio_roundtrip_and_env_reaches_the_server(stdio_source, tmp_path):
    await stdio_source.start()
    assert stdio_source.connected
    names = [s.name for s in await stdio_source.list_tools()]
    assert names == ["search", "read_doc", "save_note", "list_notes"]
    hit = await stdio_source.call("search", {"query": "Megatron all-reduce"}, CTX)
    assert _top_id(hit) == "tensor-parallelism"
    saved = await stdio_source.call("save_note", {"title": "t", "text": "x"}, CTX)
    assert saved.structured["note_id"] in (tmp_path / "notes.jsonl").read_text()


async def test_stdio_serves_concurrent_calls_on_one_connection(stdio_source):
    await stdio_source.start()
    pid = stdio_server_pid()
    queries = ["prefix caching", "idempotency key", "agent card", "token budget"] * 5
    results = await asyncio.gather(
        *(stdio_source.call("search", {"query": q, "k": 1}, CTX) for q in queries)
    )
    assert [_top_id(r) for r in results] == [
        "vllm-prefix-caching", "idempotency-keys", "a2a-protocol", "token-budgets"] * 5
    notes = await asyncio.gather(
        *(stdio_source.call("save_note", {"title": f"n{i}", "text": "t"}, CTX) for i in range(20))
    )
    assert len({n.structured["note_id"] for n in notes}) == 20
    listed = await stdio_source.call("list_notes", {}, CTX)
    assert sorted(n["title"] for n in listed.structured["result"]) == sorted(
        f"n{i}" for i in range(20))
    assert stdio_server_pid() == pid


def kill_stdio_server() -> int:
    pid = stdio_server_pid()
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return pid


async def test_stdio_server_crash_fails_one_call_then_respawns(stdio_source, tmp_path):
    await stdio_source.start()
    pid = kill_stdio_server()

    # save_note may have run before the crash: it is not retried, the call fails.
    with pytest.raises(ToolError) as info:
        await stdio_source.call("save_note", {"title": "t", "text": "x"}, CTX)
    message = str(info.value)
    assert "MCP server 'research' (stdio: " in message and MODULE in message
    assert "connection lost while calling 'save_note'" in message
    assert not stdio_source.connected

    saved = await stdio_source.call("save_note", {"title": "t", "text": "x"}, CTX)
    assert saved.structured["note_id"] in (tmp_path / "notes.jsonl").read_text()
    assert stdio_server_pid() != pid


async def test_read_only_call_rides_over_a_crash_by_retrying(stdio_source):
    await stdio_source.start()
    pid = kill_stdio_server()
    # search is read-only: the lost attempt is retried on a respawned server.
    result = await stdio_source.call("search", {"query": "ray actors"}, CTX)
    assert _top_id(result) == "ray-actors"
    assert stdio_server_pid() != pid


async def test_start_and_close_from_different_tasks_stop_the_process(tmp_path):
    src = MCPToolSource("research", stdio_config(tmp_path))
    await asyncio.create_task(src.start())
    proc = psutil.Process(stdio_server_pid())
    await asyncio.create_task(src.aclose())
    proc.wait(timeout=1)  # aclose waited for the shutdown: the process is already gone
    assert not proc.is_running()
    with pytest.raises(ToolError, match="closed"):
        await src.call("search", {"query": "ray"}, CTX)


async def test_stdio_command_that_cannot_start_raises_a_clear_tool_error(tmp_path):
    src = MCPToolSource("broken", MCPStdioConfig(command=str(tmp_path / "no-such-server")))
    with pytest.raises(ToolError, match=r"MCP server 'broken' \(stdio: .*no-such-server\) "
                                        r"failed to start: FileNotFoundError"):
        await src.start()
    with pytest.raises(ToolError, match="failed to start"):
        await src.call("search", {}, CTX)
    await src.aclose()


async def test_stdio_server_that_never_answers_times_out_at_connect(tmp_path):
    silent = MCPStdioConfig(command=sys.executable, args=["-c", "import time; time.sleep(60)"])
    src = MCPToolSource("silent", silent, connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"failed to start: TimeoutError: no answer within 0\.5s"):
        await src.start()
    assert time.monotonic() - started < 10
    await src.aclose()


def _script(tmp_path: Path, name: str, body: str, **more: Any) -> MCPStdioConfig:
    path = tmp_path / name
    path.write_text(body)
    return MCPStdioConfig(command=sys.executable, args=[str(path)], **more)


async def test_a_server_that_exits_at_start_is_reported_with_its_last_stderr_lines(tmp_path):
    config = _script(tmp_path, "dies.py", (
        "import os, sys\n"
        "print('starting with key', os.environ['API_KEY'], file=sys.stderr)\n"
        "import no_such_module_for_swarm_tests\n"),
        env={"API_KEY": SecretStr("sk-do-not-print-me")})
    src = MCPToolSource("broken", config)
    with pytest.raises(ToolError) as err:
        await src.start()
    await src.aclose()
    text = str(err.value)
    assert "failed to start" in text
    assert "its stderr ended with:" in text
    assert "No module named 'no_such_module_for_swarm_tests'" in text
    # The configured secret is masked in what the error repeats.
    assert "starting with key ***" in text
    assert "sk-do-not-print-me" not in text


async def test_a_server_that_logs_to_stdout_is_told_to_log_to_stderr(tmp_path):
    config = _script(tmp_path, "chatty.py", (
        "import sys\n"
        "print('Server starting on stdio...')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.readline()\n"))
    src = MCPToolSource("chatty", config, connect_timeout_s=5)
    with pytest.raises(ToolError) as err:
        await src.start()
    await src.aclose()
    assert "1 line(s) that are not JSON-RPC to stdout, the first: 'Server starting on " \
        "stdio...'" in str(err.value)
    assert "must write its logs to stderr" in str(err.value)


async def test_a_server_that_crashes_during_a_call_is_reported_with_its_last_stderr_lines(
        tmp_path):
    config = _script(tmp_path, "crashes.py", (
        "import os, sys\n"
        "from mcp.server.mcpserver import MCPServer\n"
        "server = MCPServer('crashes')\n"
        "@server.tool()\n"
        "def write(text: str) -> str:\n"
        "    print('fatal: the disk is full', file=sys.stderr, flush=True)\n"
        "    os._exit(7)\n"
        "server.run('stdio')\n"), cwd=str(REPO))
    src = MCPToolSource("crashes", config)
    try:
        await src.start()
        with pytest.raises(ToolError) as err:
            await src.call("write", {"text": "x"}, CTX)
    finally:
        await src.aclose()
    text = str(err.value)
    assert "connection lost while calling 'write'" in text
    assert "its stderr ended with: fatal: the disk is full" in text


# ---- streamable HTTP ------------------------------------------------------------------------


async def test_http_roundtrip_with_headers_and_concurrency(http_server):
    url, _, _ = http_server
    config = ToolServerConfig(mcp=MCPHttpConfig(url=url, headers={"X-Test": SecretStr("1")}))
    src = MCPToolSource.from_config("research", config)
    try:
        await src.start()
        assert src.target == f"http: {url}"
        doc = await src.call("read_doc", {"doc_id": "mcp"}, CTX)
        assert doc.structured["title"] == "The Model Context Protocol (MCP)"
        results = await asyncio.gather(
            *(src.call("search", {"query": "checkpoint replay", "k": 1}, CTX) for _ in range(20))
        )
        assert {_top_id(r) for r in results} == {"durable-execution"}
    finally:
        await src.aclose()


async def test_http_server_restart_fails_one_call_then_reconnects(http_server, tmp_path):
    url, port, proc = http_server
    src = MCPToolSource("research", MCPHttpConfig(url=url), timeout_s=10, retries=0)
    try:
        await src.start()
        stop(proc)
        with pytest.raises(ToolError, match=r"MCP server 'research' \(http: .*\) connection lost"):
            await src.call("search", {"query": "kv cache"}, CTX)
        with pytest.raises(ToolError, match="failed to connect: ConnectError"):
            await src.call("search", {"query": "kv cache"}, CTX)
        restarted = spawn_http_server(port, tmp_path)
        try:
            await wait_until_listening(port, restarted)
            assert _top_id(await src.call("search", {"query": "kv cache"}, CTX)) == "kv-cache"
        finally:
            stop(restarted)
    finally:
        await src.aclose()


async def test_url_nobody_listens_on_fails_fast_and_clearly():
    url = f"http://127.0.0.1:{free_port()}/mcp"
    src = MCPToolSource("ghost", MCPHttpConfig(url=url, headers={"Authorization": SecretStr("s3")}))
    started = time.monotonic()
    with pytest.raises(ToolError) as info:
        await src.start()
    assert str(info.value).startswith(f"MCP server 'ghost' (http: {url}) failed to connect: ")
    assert "ConnectError" in str(info.value) and "s3" not in str(info.value)
    with pytest.raises(ToolError, match="failed to connect"):
        await src.call("search", {"query": "x"}, CTX)
    assert time.monotonic() - started < 10
    await src.aclose()


def test_credentials_in_a_url_stay_out_of_messages():
    src = MCPToolSource("x", MCPHttpConfig(url="https://user:pw@example.com/mcp?token=abc"))
    assert src.target == "http: https://example.com/mcp"


# ---- in-process -----------------------------------------------------------------------------


def probe_server(never: asyncio.Event) -> MCPServer:
    server = MCPServer("probe", log_level="WARNING")

    @server.tool()
    def unannotated(x: int) -> int:
        """Double x."""
        return 2 * x

    @server.tool()
    def trace(ctx: Context) -> str:
        """Report the traceparent this request carried."""
        meta = ctx.request_context.meta or {}
        return str(meta.get("traceparent") if isinstance(meta, dict) else meta.traceparent)

    @server.tool()
    async def hang() -> str:
        """Wait for an event nobody sets."""
        await never.wait()
        return "unreachable"

    @server.tool()
    def refuse() -> str:
        """Report an error the way tools do."""
        raise ServerToolError("quota exhausted")

    return server


@pytest.fixture
async def probe() -> AsyncIterator[MCPToolSource]:
    src = MCPToolSource("probe", probe_server(asyncio.Event()), timeout_s=0.3)
    yield src
    await src.aclose()


async def test_tool_without_annotations_is_treated_as_destructive(probe):
    spec = next(s for s in await probe.list_tools() if s.name == "unannotated")
    assert (spec.read_only, spec.destructive, spec.idempotent) == (False, True, False)
    assert spec.description == "Double x."
    result = await probe.call("unannotated", {"x": 21}, CTX)
    assert (result.content, result.structured) == ("42", {"result": 42})


async def test_traceparent_travels_in_request_meta(probe):
    ctx = ToolContext(call_id="c1", traceparent=TRACEPARENT)
    assert (await probe.call("trace", {}, ctx)).content == TRACEPARENT


async def test_call_timeout_raises_and_the_connection_stays_usable(probe):
    with pytest.raises(ToolError, match=r"MCP tool 'hang' on server 'probe' timed out after 0.3s"):
        await probe.call("hang", {}, CTX)
    assert probe.connected
    assert (await probe.call("unannotated", {"x": 1}, CTX)).content == "2"


async def test_tool_reported_errors_are_results_not_exceptions(probe):
    refused = await probe.call("refuse", {}, CTX)
    assert refused.is_error and "quota exhausted" in refused.content
    unknown = await probe.call("nope", {}, CTX)
    assert unknown.is_error and "nope" in unknown.content


async def test_a_server_down_when_the_agent_starts_has_its_tools_once_it_is_up(tmp_path):
    # Granted whole (`research`, not research.search): nothing is known of its tools while it
    # is down. The toolbox asks it again until it answers, and a call of one of its tools
    # meanwhile is a tool error that asks again at once, not the model's slip.
    from swarm.runtime.toolbox import Toolbox

    port = free_port()
    src = MCPToolSource("research", MCPHttpConfig(url=f"http://127.0.0.1:{port}/mcp"),
                        timeout_s=5, retries=0)
    box = await Toolbox.build("a", ["research"], {"research": src}, [])
    proc = None
    try:
        assert box.names == [] and box.unlisted == ["research"]
        proc = spawn_http_server(port, tmp_path)
        await wait_until_listening(port, proc)
        box.poke()  # what a call of an unknown tool does (the step loop), instead of waiting
        await asyncio.wait_for(box.relisted(), 60)
        assert box.unlisted == [] and box.resolve("search") is not None
        assert "read_doc" in box.names
        assert _top_id(await src.call("search", {"query": "kv cache"}, CTX)) == "kv-cache"
    finally:
        box.close()
        await src.aclose()
        if proc is not None:
            stop(proc)
