"""The MCP layer's guards, in process: breaker, back-off, result cap, tool-list refresh, progress.

Servers are mcp's `MCPServer` over the in-memory transport, on both protocol eras (the 2026
`subscriptions/listen` stream and the older `notifications/tools/list_changed`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations

from swarm.config import ToolServerConfig
from swarm.errors import ConfigError, ToolError
from swarm.events import ToolProgress
from swarm.runtime.toolbox import Toolbox
from swarm.tools.interface import ToolContext, ToolResult
from swarm.tools.mcp import MCPToolSource
from swarm.tools.resilience import MAX_BACKOFF_S, CircuitBreaker, backoff_delays, cap_result

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- breaker, back-off, cap -------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_trial():
    clock = FakeClock()
    breaker = CircuitBreaker(3, 30.0, clock=clock, wall=lambda: 0.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure("timed out")
    assert breaker.allow()
    breaker.success()  # a success in between resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.failure("connection lost")
    assert breaker.state == "open" and not breaker.allow()
    message = breaker.refusal("docs")
    assert message == ("circuit open for MCP server 'docs' until 00:00:30 UTC (in 30.0s; "
                       "3 consecutive failures; last: connection lost)")
    clock.now += 30.0
    assert breaker.state == "half_open"
    assert breaker.allow()  # the trial call
    assert not breaker.allow()  # everyone else waits for its outcome
    breaker.failure("still down")  # the trial failed: open for another cool-down
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 30.0
    assert breaker.allow()
    breaker.abandon()  # the trial was cancelled: the next caller may try
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_breaker_with_zero_failures_never_opens():
    breaker = CircuitBreaker(0, 30.0)
    for _ in range(100):
        breaker.failure("x")
    assert breaker.allow()


def test_backoff_doubles_with_full_jitter_and_a_cap():
    assert list(backoff_delays(4, 0.5, rng=lambda: 1.0)) == [0.5, 1.0, 2.0, 4.0]
    assert list(backoff_delays(3, 0.5, rng=lambda: 0.5)) == [0.25, 0.5, 1.0]
    assert max(backoff_delays(10, 1.0, rng=lambda: 1.0)) == MAX_BACKOFF_S
    assert list(backoff_delays(0, 1.0)) == []


def test_result_cap_cuts_with_a_note():
    small = ToolResult("hello", structured={"a": 1})
    assert cap_result(small, 5) is small
    cut = cap_result(ToolResult("x" * 1000, structured={"big": "x" * 1000}), 100)
    assert cut.content == "x" * 100 + "\n[truncated: 100 of 1000 characters shown]"
    assert cut.structured is None and not cut.is_error


def test_config_knobs_have_defaults_and_are_mcp_only():
    cfg = ToolServerConfig.model_validate({"mcp": {"command": "srv"}})
    assert (cfg.pool_size, cfg.retries, cfg.retry_backoff_s, cfg.breaker_failures,
            cfg.breaker_cooldown_s, cfg.max_result_chars) == (1, 2, 0.2, 5, 30.0, 65536)
    src = MCPToolSource.from_config("s", ToolServerConfig.model_validate(
        {"mcp": {"command": "srv"}, "pool_size": 3, "retries": 0, "max_result_chars": 1000}))
    assert (len(src._slots), src.retries, src.max_result_chars) == (3, 0, 1000)
    assert src.connect_timeout_s == 30.0
    quick = MCPToolSource.from_config("s", ToolServerConfig.model_validate(
        {"mcp": {"command": "srv"}, "connect_timeout_s": 2.5}))
    assert quick.connect_timeout_s == 2.5
    fn = ToolServerConfig.model_validate({"python": ["m:f"], "max_result_chars": 500})
    assert fn.max_result_chars == 500
    with pytest.raises(ValueError, match="pool_size, retries: only for MCP servers"):
        ToolServerConfig.model_validate({"python": ["m:f"], "pool_size": 2, "retries": 1})
    with pytest.raises(ValueError, match="connect_timeout_s: only for MCP servers"):
        ToolServerConfig.model_validate({"python": ["m:f"], "connect_timeout_s": 5})


# ---- in-process servers -----------------------------------------------------------------------


def changing_server() -> MCPServer:
    """A server whose `grow` tool adds a tool and announces it both ways (2026 and older)."""
    server = MCPServer("changing", log_level="WARNING")

    @server.tool(annotations=READ_ONLY)
    def ping() -> str:
        """Answer pong."""
        return "pong"

    @server.tool()
    async def grow(name: str, ctx: Context) -> str:
        """Add a tool called `name`."""

        def added() -> str:
            return f"{name} works"

        server.add_tool(added, name=name, description=f"the {name} tool",
                        annotations=READ_ONLY)
        await ctx.notify_tools_changed()  # a 2026-07-28 subscription event
        await ctx.request_context.session.send_tool_list_changed()  # the older notification
        return "grown"

    @server.tool(annotations=READ_ONLY)
    async def work(steps: int, ctx: Context) -> str:
        """Report progress `steps` times."""
        for i in range(1, steps + 1):
            await ctx.report_progress(i, steps, f"step {i}")
        return "worked"

    @server.tool(annotations=READ_ONLY)
    def huge(n: int) -> str:
        """Return n characters."""
        return "y" * n

    return server


@pytest.fixture(params=["auto", "legacy"])
async def changing(request) -> AsyncIterator[MCPToolSource]:
    src = MCPToolSource("chg", changing_server(), timeout_s=10)
    mode = request.param
    if mode == "legacy":  # the handshake era: changes arrive as notifications only
        opened = src._open
        src._open = lambda handler, errlog=None: _legacy(  # type: ignore[method-assign]
            opened(handler, errlog))
    yield src
    await src.aclose()


def _legacy(client):
    client.mode = "legacy"
    return client


async def test_tool_list_change_refreshes_the_cache_and_the_toolbox(changing):
    box = await Toolbox.build("a", ["chg"], {"chg": changing}, [])
    assert sorted(box.names) == ["grow", "huge", "ping", "work"]
    seen = asyncio.Event()
    changing.on_tools_changed(seen.set)
    assert (await changing.call("grow", {"name": "fresh"}, ToolContext())).content == "grown"
    await asyncio.wait_for(seen.wait(), 10)
    assert "fresh" in [s.name for s in await changing.list_tools()]
    await asyncio.wait_for(box.refreshed(), 10)
    assert box.resolve("fresh") is not None
    assert "fresh" in [s["function"]["name"] for s in box.schemas]
    assert box.safe_to_repeat("fresh")
    assert (await changing.call("fresh", {}, ToolContext())).content == "fresh works"


async def test_progress_notifications_become_tool_progress_events(changing):
    events: list = []
    ctx = ToolContext(task_id="t1", agent="a", call_id="c9", step=4, emit=events.append)
    assert (await changing.call("work", {"steps": 3}, ctx)).content == "worked"
    assert events, "no progress events"
    assert all(isinstance(e, ToolProgress) for e in events)
    first, last = events[0], events[-1]
    assert (first.task_id, first.agent, first.step, first.tool, first.call_id) == (
        "t1", "a", 4, "work", "c9")
    assert (first.progress, first.total, first.message) == (1, 3, "step 1")
    assert (last.progress, last.total, last.message) == (3, 3, "step 3")
    assert [e.progress for e in events] == sorted({e.progress for e in events})
    # Without an emitter (outside a task) a call asks for no progress.
    assert (await changing.call("work", {"steps": 2}, ToolContext())).content == "worked"


async def test_large_results_are_truncated_with_a_note():
    src = MCPToolSource("big", changing_server(), max_result_chars=1000)
    try:
        result = await src.call("huge", {"n": 5000}, ToolContext())
        assert result.content == "y" * 1000 + "\n[truncated: 1000 of 5000 characters shown]"
        assert (await src.call("huge", {"n": 10}, ToolContext())).content == "y" * 10
    finally:
        await src.aclose()


async def test_pool_opens_a_second_connection_only_under_concurrent_load():
    release = asyncio.Event()
    started = asyncio.Semaphore(0)
    server = MCPServer("pooled", log_level="WARNING")

    @server.tool(annotations=READ_ONLY)
    async def block() -> str:
        """Wait for the test."""
        started.release()
        await release.wait()
        return "done"

    src = MCPToolSource("pooled", server, pool_size=2, timeout_s=10)
    try:
        await src.start()
        assert src.connections == 1
        for _ in range(3):  # sequential calls reuse the idle connection
            first = asyncio.create_task(src.call("block", {}, ToolContext()))
            await asyncio.wait_for(started.acquire(), 10)
            release.set()
            assert (await first).content == "done"
            release.clear()
        assert src.connections == 1
        calls = [asyncio.create_task(src.call("block", {}, ToolContext())) for _ in range(4)]
        for _ in calls:
            await asyncio.wait_for(started.acquire(), 10)
        assert src.connections == 2  # busy: a second one opened, and no more than the pool
        assert sorted(c.in_flight for c in src._slots if c is not None) == [2, 2]
        release.set()
        assert [r.content for r in await asyncio.gather(*calls)] == ["done"] * 4
    finally:
        await src.aclose()


async def test_closed_source_refuses_calls_without_touching_the_breaker():
    src = MCPToolSource("gone", changing_server())
    await src.aclose()
    with pytest.raises(ToolError, match="the source is closed"):
        await src.call("ping", {}, ToolContext())
    assert src.breaker.state == "closed" and src.breaker.consecutive == 0


async def test_exact_grant_missing_after_a_change_is_a_warning_not_an_error():
    server = MCPServer("shrinking", log_level="WARNING")

    @server.tool(annotations=READ_ONLY)
    def keep() -> str:
        """Stay."""
        return "kept"

    @server.tool()
    async def drop(ctx: Context) -> str:
        """Remove this tool."""
        server.remove_tool("drop")
        await ctx.notify_tools_changed()
        return "dropped"

    src = MCPToolSource("s", server)
    try:
        box = await Toolbox.build("a", ["s.keep", "s.drop"], {"s": src}, [])
        with pytest.raises(ConfigError, match="has no tool 'nope'"):
            await Toolbox.build("a", ["s.nope"], {"s": src}, [])
        seen = asyncio.Event()
        src.on_tools_changed(seen.set)  # after the toolbox's own callback
        assert (await src.call("drop", {}, ToolContext())).content == "dropped"
        await asyncio.wait_for(seen.wait(), 10)
        await asyncio.wait_for(box.refreshed(), 10)
        assert box.names == ["keep"]
    finally:
        await src.aclose()
