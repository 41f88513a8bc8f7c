"""The MCP layer against real third-party servers from npm, over stdio and streamable HTTP.

`@modelcontextprotocol/server-everything` and `@modelcontextprotocol/server-filesystem`, pinned
in tests/npm/package-lock.json and installed by `scripts/setup.sh test`. No Ray: the end-to-end
test runs a scripted agent in a `LocalSwarm`. Without node and the installed packages the tests
skip, except when SWARM_REQUIRE_NPM_MCP is set (CI: .ci/run), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from pydantic import SecretStr

from swarm.config import MCPHttpConfig, MCPStdioConfig, parse_config
from swarm.errors import ToolError
from swarm.events import ToolCalled, ToolProgress
from swarm.testing import LocalSwarm
from swarm.tools.interface import ToolContext
from swarm.tools.mcp import MCPToolSource
from tests.integration.conftest import REPO_ROOT, free_port, wait_until_listening

PACKAGES = REPO_ROOT / "tests" / "npm" / "node_modules" / "@modelcontextprotocol"
EVERYTHING = PACKAGES / "server-everything" / "dist" / "index.js"
FILESYSTEM = PACKAGES / "server-filesystem" / "dist" / "index.js"
CTX = ToolContext(task_id="t1", agent="a", call_id="c1")


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the npm servers installed; else skip (or fail in CI)."""
    path = shutil.which("node")
    if path is None:
        problem = "node is not installed"
    elif not (EVERYTHING.exists() and FILESYSTEM.exists()):
        problem = "the npm MCP servers are not installed (run: bash scripts/setup.sh test)"
    else:
        return path
    if os.environ.get("SWARM_REQUIRE_NPM_MCP"):
        pytest.fail(f"SWARM_REQUIRE_NPM_MCP is set but {problem}")
    pytest.skip(problem)


def everything_stdio(node: str, **env: str) -> MCPStdioConfig:
    return MCPStdioConfig(command=node, args=[str(EVERYTHING), "stdio"],
                          env={k: SecretStr(v) for k, v in env.items()})


@pytest.fixture
async def everything(node) -> AsyncIterator[MCPToolSource]:
    src = MCPToolSource("everything", everything_stdio(node), timeout_s=20)
    yield src
    await src.aclose()


@pytest.fixture
async def files(node, tmp_path) -> AsyncIterator[tuple[MCPToolSource, Path]]:
    root = tmp_path / "root"
    root.mkdir()
    src = MCPToolSource("files", MCPStdioConfig(command=node, args=[str(FILESYSTEM), str(root)]))
    yield src, root
    await src.aclose()


class HttpEverything:
    """server-everything in streamableHttp mode on a free 127.0.0.1 port (it reads PORT)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            [self.node, str(EVERYTHING), "streamableHttp"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(self.port)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def start(self) -> None:
        await asyncio.to_thread(self.spawn)
        assert self.proc is not None
        await wait_until_listening(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)


@pytest.fixture
def http_everything(node) -> Iterator[HttpEverything]:
    server = HttpEverything(node)
    yield server
    server.stop()


async def check_progress(src: MCPToolSource) -> None:
    events: list = []
    ctx = ToolContext(task_id="t1", agent="a", call_id="c5", step=3, emit=events.append)
    result = await src.call("trigger-long-running-operation", {"duration": 0.4, "steps": 4}, ctx)
    assert result.content.startswith("Long running operation completed"), result.content
    assert events and all(isinstance(e, ToolProgress) for e in events)
    assert (events[0].progress, events[0].total, events[0].call_id) == (1, 4, "c5")
    assert (events[-1].progress, events[-1].total) == (4, 4)
    assert [e.progress for e in events] == sorted({e.progress for e in events})


# ---- server-everything ------------------------------------------------------------------------


async def test_everything_over_stdio_tools_calls_and_progress(everything):
    specs = {s.name: s for s in await everything.list_tools()}
    assert {"echo", "get-sum", "trigger-long-running-operation"} <= set(specs)
    assert specs["echo"].read_only and specs["echo"].idempotent
    assert not specs["toggle-simulated-logging"].idempotent
    assert (await everything.call("echo", {"message": "hi"}, CTX)).content == "Echo: hi"
    assert (await everything.call("get-sum", {"a": 2, "b": 3}, CTX)).content == (
        "The sum of 2 and 3 is 5.")
    bad = await everything.call("get-sum", {"a": "two"}, CTX)
    assert bad.is_error  # the server's own validation error goes back to the model
    await check_progress(everything)


async def test_everything_large_result_is_truncated(node):
    src = MCPToolSource("everything", everything_stdio(node, BIG="z" * 100_000))
    try:
        result = await src.call("get-env", {}, CTX)
        body, _, note = result.content.rpartition("\n")
        assert len(body) == 65536 and note.startswith("[truncated: 65536 of ")
        assert int(note.split()[3]) > 100_000
    finally:
        await src.aclose()


async def test_everything_over_http_survives_server_restarts(http_everything):
    await http_everything.start()
    src = MCPToolSource("everything", MCPHttpConfig(url=http_everything.url),
                        timeout_s=20, retry_backoff_s=0.05)
    try:
        assert (await src.call("echo", {"message": "one"}, CTX)).content == "Echo: one"
        await check_progress(src)

        http_everything.stop()
        await http_everything.start()
        # The new process doesn't know our session: echo is read-only, so the lost attempt is
        # retried on a new session and the caller never sees the restart.
        assert (await src.call("echo", {"message": "two"}, CTX)).content == "Echo: two"

        http_everything.stop()
        await http_everything.start()
        # A tool with effects isn't retried: that call fails, the next one reconnects.
        with pytest.raises(ToolError, match="connection lost while calling "
                                            "'toggle-simulated-logging'"):
            await src.call("toggle-simulated-logging", {}, CTX)
        toggled = await src.call("toggle-simulated-logging", {}, CTX)
        assert not toggled.is_error and "logging" in toggled.content.lower()
    finally:
        await src.aclose()


# ---- server-filesystem ------------------------------------------------------------------------


async def test_filesystem_reads_and_writes_inside_its_root_only(files, tmp_path):
    src, root = files
    specs = {s.name: s for s in await src.list_tools()}
    assert specs["read_text_file"].read_only and not specs["read_text_file"].destructive
    assert specs["write_file"].destructive and specs["write_file"].idempotent
    assert specs["move_file"].destructive and not specs["move_file"].idempotent

    wrote = await src.call("write_file", {"path": str(root / "a.txt"), "content": "hello"}, CTX)
    assert not wrote.is_error and (root / "a.txt").read_text() == "hello"
    read = await src.call("read_text_file", {"path": str(root / "a.txt")}, CTX)
    assert not read.is_error and "hello" in read.content
    listing = await src.call("list_directory", {"path": str(root)}, CTX)
    assert "a.txt" in listing.content

    denied = await src.call("read_text_file", {"path": "/etc/hostname"}, CTX)
    assert denied.is_error and "Access denied" in denied.content
    outside = tmp_path / "outside.txt"
    refused = await src.call("write_file", {"path": str(outside), "content": "x"}, CTX)
    assert refused.is_error and not outside.exists()


# ---- a scripted agent, end to end -------------------------------------------------------------


async def test_scripted_agent_uses_npm_servers_end_to_end(node, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    report = str(root / "report.txt")
    rules = [
        {"when": {"last_role": "user"},
         "tool_calls": [{"name": "write_file", "arguments": {"path": report,
                                                              "content": "{{ task }}"}}]},
        {"when": {"last_tool": "write_file"},
         "tool_calls": [{"name": "read_text_file", "arguments": {"path": report}}]},
        {"when": {"last_tool": "read_text_file", "called": {"read_text_file": 1}},
         "tool_calls": [{"name": "read_text_file", "arguments": {"path": "/etc/hostname"}}]},
        {"when": {"last_tool": "read_text_file", "last_tool_error": True},
         "tool_calls": [{"name": "trigger-long-running-operation",
                         "arguments": {"duration": 0.4, "steps": 4}}]},
        {"when": {"last_tool": "trigger-long-running-operation"},
         "content": "{{ results.read_text_file | truncate(60) }} / {{ last }}"},
    ]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": rules}))
    cfg = parse_config({
        "name": "npm-desk",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
        "tools": {
            "everything": {"mcp": {"command": node, "args": [str(EVERYTHING), "stdio"]}},
            "files": {"mcp": {"command": node, "args": [str(FILESYSTEM), str(root)]}},
        },
        "agents": {"clerk": {"model": "m", "tools": [
            "everything.trigger-long-running-operation", "files.read_*", "files.write_file"],
            "deny_tools": ["files.read_media_file", "files.read_multiple_files"]}},
        "supervisor": {"entry": "clerk"},
    }, base_dir=tmp_path)
    async with LocalSwarm(cfg) as sw:
        assert sorted(sw.hosts["clerk"].toolbox.names) == [
            "read_file", "read_text_file", "trigger-long-running-operation", "write_file"]
        row = await sw.run("quarterly numbers are up", timeout=60)
        assert row["state"] == "completed", row
        assert "Access denied" in row["answer"]
        assert row["answer"].endswith("Long running operation completed. Duration: 0.4 "
                                      "seconds, Steps: 4.")
        assert (root / "report.txt").read_text() == "quarterly numbers are up"
        events = sw.events(row["task_id"])
        tools = [(e.tool, e.outcome, e.error_class) for e in events if isinstance(e, ToolCalled)]
        assert tools == [("write_file", "ok", None), ("read_text_file", "ok", None),
                         ("read_text_file", "error", "tool"),
                         ("trigger-long-running-operation", "ok", None)]
        progress = [e for e in events if isinstance(e, ToolProgress)]
        op = next(e for e in events if isinstance(e, ToolCalled)
                  and e.tool == "trigger-long-running-operation")
        assert progress and {(e.agent, e.tool, e.call_id, e.step) for e in progress} == {
            ("clerk", op.tool, op.call_id, op.step)}
        assert (progress[-1].progress, progress[-1].total) == (4, 4)
        assert events.index(progress[-1]) < events.index(op)  # while it ran, not after

        # Concurrent tasks (sessions) share the replica's connection: one process per server.
        servers = node_children()
        assert len(servers) == 2
        rows = await asyncio.gather(*(sw.run(f"task {i}", timeout=60) for i in range(3)))
        assert [r["state"] for r in rows] == ["completed"] * 3
        assert node_children() == servers


def node_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.name() == "node" or "node" in (p.cmdline()[:1] or [""])[0]}
