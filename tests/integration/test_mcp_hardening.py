"""A misbehaving stdio MCP server (tests/mcp_misbehaving.py) costs only the calls that touch it.

No Ray. Each test spawns the server as a subprocess; it logs every call that reaches it, so the
tests can tell a retry from a call that never went out.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarm.config import MCPStdioConfig
from swarm.errors import ToolError
from swarm.events import ToolProgress
from swarm.tools.interface import ToolContext
from swarm.tools.mcp import MCPToolSource
from swarm.tools.resilience import CircuitBreaker

SERVER = Path(__file__).resolve().parents[1] / "mcp_misbehaving.py"
CTX = ToolContext(task_id="t1", agent="a", call_id="c1")


def calls(state: Path) -> list[str]:
    log = state / "calls.log"
    return log.read_text().split() if log.exists() else []


def source(state: Path, **kw) -> MCPToolSource:
    config = MCPStdioConfig(command=sys.executable, args=[str(SERVER), str(state)])
    kw.setdefault("retry_backoff_s", 0.01)
    return MCPToolSource("bad", config, **kw)


@pytest.fixture
async def bad(tmp_path) -> AsyncIterator[MCPToolSource]:
    src = source(tmp_path, timeout_s=1.0)
    yield src
    await src.aclose()


async def test_garbage_and_invalid_answers_fail_only_their_own_calls(bad, tmp_path):
    await bad.start()
    assert (await bad.call("ok", {}, CTX)).content == "fine"

    # A line that isn't JSON-RPC: the call waiting for an answer times out; the rest go on.
    pending = asyncio.create_task(bad.call("garbage", {}, CTX))
    assert (await bad.call("ok", {}, CTX)).content == "fine"
    with pytest.raises(ToolError, match=r"timed out after 1s; gave up after 3 attempts$"):
        await pending
    # An answer that isn't a CallToolResult: a clear error at once, and no retry.
    with pytest.raises(ToolError, match="returned an invalid result for 'bad_result'"):
        await bad.call("bad_result", {}, CTX)
    assert calls(tmp_path).count("bad_result") == 1
    assert (await bad.call("ok", {}, CTX)).content == "fine"


async def test_idempotent_call_is_retried_across_a_crash_and_a_write_is_not(bad, tmp_path):
    # flaky is read-only: its first attempt kills the server, the retry reaches a new one.
    assert (await bad.call("flaky", {}, CTX)).content == "flaky ran"
    assert calls(tmp_path).count("flaky") == 2
    # flaky_write declares nothing, so it may have had an effect: one attempt, then an error.
    with pytest.raises(ToolError, match="connection lost while calling 'flaky_write'") as info:
        await bad.call("flaky_write", {}, CTX)
    assert "attempts" not in str(info.value)
    assert calls(tmp_path).count("flaky_write") == 1
    assert (await bad.call("flaky_write", {}, CTX)).content == "flaky_write ran"


async def test_hanging_server_opens_the_circuit_then_a_trial_call_closes_it(tmp_path):
    now = [0.0]
    breaker = CircuitBreaker(3, 60.0, clock=lambda: now[0])
    src = source(tmp_path, timeout_s=0.3, retries=1, breaker=breaker)
    try:
        for _ in range(2):
            with pytest.raises(ToolError, match="timed out"):
                await src.call("hang", {}, CTX)  # two attempts each
        assert src.breaker.state == "open"
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"circuit open for MCP server 'bad' until "
                                            r"\d\d:\d\d:\d\d UTC .*last: MCP tool 'hang'"):
            await src.call("ok", {}, CTX)
        assert time.monotonic() - started < 0.3  # failed fast, no server round trip
        assert calls(tmp_path).count("ok") == 0
        now[0] += 60.0  # the cool-down is over: the next call is the trial
        assert (await src.call("ok", {}, CTX)).content == "fine"
        assert src.breaker.state == "closed"
    finally:
        await src.aclose()


async def test_a_server_that_cannot_start_is_retried_then_reported(tmp_path):
    # The request never went out, so even a tool with side effects may be tried again.
    src = MCPToolSource("ghost", MCPStdioConfig(command=str(tmp_path / "missing")),
                        retry_backoff_s=0.01, retries=2)
    try:
        with pytest.raises(ToolError, match=r"failed to start: FileNotFoundError.*"
                                            r"; gave up after 3 attempts$"):
            await src.call("anything", {}, CTX)
        assert src.breaker.consecutive == 3
    finally:
        await src.aclose()


async def test_progress_and_list_changes_from_a_handshake_era_server(bad, tmp_path):
    events: list = []
    ctx = ToolContext(task_id="t1", agent="a", call_id="c7", step=2, emit=events.append)
    assert (await bad.call("progress", {"steps": 3}, ctx)).content == "3 steps done"
    assert [type(e) for e in events][:1] == [ToolProgress]
    assert (events[0].progress, events[0].total, events[0].message) == (1, 3, "step 1 of 3")
    assert (events[-1].progress, events[-1].message) == (3, "step 3 of 3")

    changed = asyncio.Event()
    bad.on_tools_changed(changed.set)
    await bad.call("grow", {"name": "sprout"}, CTX)
    await asyncio.wait_for(changed.wait(), 10)
    spec = next(s for s in await bad.list_tools() if s.name == "sprout")
    assert spec.read_only and spec.idempotent


async def test_large_result_is_cut_for_the_model(bad):
    result = await bad.call("big", {"n": 200_000}, CTX)
    assert result.content.endswith("\n[truncated: 65536 of 200000 characters shown]")
    assert len(result.content) < 65536 + 100


async def test_a_crash_with_calls_in_flight_is_one_failure_of_the_server(tmp_path):
    # Five calls wait on the connection when the server dies: the breaker (5 failures) must
    # count one lost connection, not six failures, and the next call must reach a new server.
    src = source(tmp_path, timeout_s=5.0, retries=0)
    try:
        await src.start()
        hangs = [asyncio.create_task(src.call("hang", {}, CTX)) for _ in range(5)]
        deadline = time.monotonic() + 10
        while calls(tmp_path).count("hang") < 5:  # each has reached the server (bounded)
            assert time.monotonic() < deadline, calls(tmp_path)
            await asyncio.sleep(0.02)
        with pytest.raises(ToolError, match="connection lost while calling 'crash'"):
            await src.call("crash", {}, CTX)
        for hang in hangs:
            with pytest.raises(ToolError, match="connection lost while calling 'hang'"):
                await hang
        assert src.breaker.state == "closed" and src.breaker.consecutive == 1
        assert (await src.call("ok", {}, CTX)).content == "fine"
    finally:
        await src.aclose()
