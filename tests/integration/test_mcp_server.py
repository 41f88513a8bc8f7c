"""The swarm as an MCP server: mcp's own client drives a deployed swarm through its tools.

Most tests talk to the server in process (`Client(server)`); one starts `python -m swarm mcp`
as a subprocess and talks to it over stdio, as an IDE or desktop client would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from swarm.client import SwarmClient
from swarm.config import load_config
from swarm.protocol.mcp_server import build_server
from swarm.runtime.deploy import start_swarm, stop_swarm

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "configs" / "mcp-desk.yaml"


@pytest.fixture(scope="module")
def desk(ray_cluster) -> Iterator[SwarmClient]:
    name = f"mcp-{uuid.uuid4().hex[:6]}"
    sup, reports = start_swarm(load_config(CONFIG), deployment=name)
    assert all(not r["problems"] for r in reports), reports
    yield SwarmClient(name, sup)
    stop_swarm(name)


def mcp_client(desk: SwarmClient) -> Client:
    return Client(build_server(desk.name, client=desk), read_timeout_seconds=60)


async def call(client: Client, tool: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    res = await client.call_tool(tool, args, **kw)
    assert not res.is_error, res.content
    assert res.structured_content is not None
    return res.structured_content


async def error(client: Client, tool: str, args: dict[str, Any]) -> str:
    """Call a tool that must fail; its error text."""
    res = await client.call_tool(tool, args)
    assert res.is_error, res.structured_content
    return " ".join(c.text for c in res.content)


async def test_tools_and_their_annotations(desk: SwarmClient) -> None:
    async with mcp_client(desk) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"run_task", "submit_task", "get_task", "list_tasks", "approve_gate",
                          "deny_gate", "respond", "cancel_task", "get_trace"}
    for name in ("get_task", "list_tasks", "get_trace"):
        assert tools[name].annotations.read_only_hint is True
        assert tools[name].annotations.destructive_hint is False
    for name in ("approve_gate", "deny_gate", "cancel_task", "respond"):
        assert tools[name].annotations.read_only_hint is False
        assert tools[name].annotations.destructive_hint is True
    assert tools["run_task"].annotations.destructive_hint is False
    assert tools["get_task"].output_schema["properties"]["gates"]


async def test_run_task_answers_and_reports_progress(desk: SwarmClient) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with mcp_client(desk) as client:
        row = await call(client, "run_task", {"text": "hello mcp", "user": "ana"},
                         progress_callback=on_progress)
        assert (row["state"], row["answer"], row["done"]) == ("completed", "done: hello mcp",
                                                              True)
        assert row["user"] == "ana" and row["tool_calls"] == 1 and row["steps"] >= 2
        # One notification per event, in order, from submission to the end.
        assert [v for v, _ in progress] == list(range(1, len(progress) + 1))
        messages = [m for _, m in progress]
        assert messages[0] == "task submitted"
        assert any(m.startswith("desk: tool echo: ok") for m in messages), messages
        assert messages[-1].startswith("task completed")

        again = await call(client, "get_task", {"task_id": row["task_id"]})
        assert again["answer"] == "done: hello mcp" and again["gates"] == []
        listed = await call(client, "list_tasks", {"state": "completed", "user": "ana"})
        assert row["task_id"] in [t["task_id"] for t in listed["tasks"]]
        resource = await client.read_resource(f"swarm://tasks/{row['task_id']}")
        assert json.loads(resource.contents[0].text)["state"] == "completed"
        trace = await client.call_tool("get_trace", {"task_id": row["task_id"]})
        assert not trace.is_error and trace.content[0].text.strip()


async def test_a_gated_call_waits_for_approve_gate(desk: SwarmClient) -> None:
    async with mcp_client(desk) as client:
        row = await call(client, "run_task", {"text": "count these four words"})
        # run_task stops waiting when the task needs a person.
        assert row["state"] == "input_required" and not row["done"]
        [gate] = row["gates"]
        assert gate["tool"] == "word_count" and gate["agent"] == "desk"
        assert gate["arguments"] == {"text": "count these four words"}
        assert "approve_gate" in row["note"]
        seen = await call(client, "get_task", {"task_id": row["task_id"]})
        assert [g["gate"] for g in seen["gates"]] == [gate["gate"]] and gate["reason"]
        # Approved with edited arguments: the call runs with those.
        done = await call(client, "approve_gate", {
            "task_id": row["task_id"], "gate": gate["gate"], "args": {"text": "just two"},
            "approver": "alice", "wait_s": 30})
        assert (done["state"], done["answer"]) == ("completed", "words: 2")
        text = await error(client, "approve_gate", {"task_id": row["task_id"],
                                                    "gate": gate["gate"]})
        assert f"gate {gate['gate']} of task {row['task_id']} was already approved by alice" \
            in text
    audit = desk.audit(task_id=row["task_id"], kind="approval")
    assert [(a["kind"], a.get("by")) for a in audit] == [
        ("approval.requested", None), ("approval.approved", "alice")]


async def test_a_denied_call_reaches_the_agent(desk: SwarmClient) -> None:
    async with mcp_client(desk) as client:
        row = await call(client, "run_task", {"text": "count me", "wait_s": 30})
        [gate] = row["gates"]
        done = await call(client, "deny_gate", {
            "task_id": row["task_id"], "gate": gate["gate"], "approver": "bob",
            "reason": "not today", "wait_s": 30})
        assert done["state"] == "completed"
        assert done["answer"] == "refused: ERROR: denied by bob: not today"
        assert "already denied by bob" in await error(
            client, "deny_gate", {"task_id": row["task_id"], "gate": gate["gate"]})


async def test_bad_requests_are_clear_errors_and_the_server_carries_on(
        desk: SwarmClient) -> None:
    async with mcp_client(desk) as client:
        assert "no task 'no-such-task'" in await error(client, "get_task",
                                                       {"task_id": "no-such-task"})
        assert "no task 'nope-nope'" in await error(client, "cancel_task",
                                                    {"task_id": "nope-nope"})
        assert "at most 500 (limits.max_task_chars)" in await error(
            client, "run_task", {"text": "x" * 501})
        assert "text" in await error(client, "run_task", {"text": 123})
        assert "text" in await error(client, "submit_task", {})
        assert "wait_s" in await error(client, "run_task", {"text": "hi", "wait_s": -1})
        assert "state" in await error(client, "list_tasks", {"state": "bogus"})
        assert "Unknown tool" in await error(client, "drop_tables", {})

        done = await call(client, "run_task", {"text": "plain"})
        assert done["state"] == "completed"
        task_id = done["task_id"]
        assert f"task {task_id} is completed and has no gate 'nope'" in await error(
            client, "approve_gate", {"task_id": task_id, "gate": "nope"})
        assert "args" in await error(client, "approve_gate",
                                     {"task_id": task_id, "gate": "g", "args": [1, 2]})
        assert f"task {task_id} is completed, not waiting for input" in await error(
            client, "respond", {"task_id": task_id, "answer": "rerun"})
        with pytest.raises(MCPError, match="no task 'missing1'"):
            await client.read_resource("swarm://tasks/missing1")

        slow = await call(client, "submit_task", {"text": "slow please"})
        canceled = await call(client, "cancel_task", {"task_id": slow["task_id"]})
        assert canceled["state"] == "canceled" and canceled["done"]
        # Still answering, in the same session.
        after = await call(client, "run_task", {"text": "still here"})
        assert after["answer"] == "done: still here"


async def test_stdio_transport_in_a_separate_process(ray_cluster, desk: SwarmClient) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "swarm", "mcp", desk.name, "--transport", "stdio",
              "--address", ray_cluster["address"]],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    async with Client(params, read_timeout_seconds=60) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"run_task", "get_task", "approve_gate"} <= names
        row = await call(client, "run_task", {"text": "over stdio", "wait_s": 30})
        assert row["answer"] == "done: over stdio"
        assert "no task" in await error(client, "get_task", {"task_id": "missing-task"})



@pytest.fixture
def http_server(ray_cluster, desk: SwarmClient) -> Iterator[tuple[int, subprocess.Popen]]:
    """`swarm mcp NAME --transport http` in a subprocess; yields its port and process."""
    from tests.integration.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm", "mcp", desk.name, "--transport", "http",
         "--port", str(port), "--address", ray_cluster["address"]],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_streamable_http_transport(http_server: tuple[int, subprocess.Popen]) -> None:
    from tests.integration.conftest import wait_until_listening

    port, proc = http_server
    await wait_until_listening(port, proc, timeout=60)
    async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=60) as client:
        row = await call(client, "run_task", {"text": "over http", "wait_s": 30})
        assert row["answer"] == "done: over http"
        assert "no task" in await error(client, "get_task", {"task_id": "missing-task"})


async def test_a_swarm_taken_down_and_redeployed(ray_cluster) -> None:
    import anyio.to_thread

    name = f"mcp-{uuid.uuid4().hex[:6]}"
    cfg = load_config(CONFIG)
    # start_swarm runs an event loop of its own, so it runs in a thread here; the supervisor
    # lives while its handle does.
    handles = [await anyio.to_thread.run_sync(lambda: start_swarm(cfg, deployment=name))]
    server = build_server(name)  # connects by name on first use
    async with Client(server, read_timeout_seconds=60) as client:
        first = await call(client, "run_task", {"text": "before"})
        stop_swarm(name)
        for _ in range(2):  # and again: nothing is deployed under the name
            assert f"swarm {name!r} is not running any more" in await error(
                client, "get_task", {"task_id": first["task_id"]})
        handles.append(await anyio.to_thread.run_sync(lambda: start_swarm(cfg, deployment=name)))
        try:
            again = await call(client, "run_task", {"text": "after"})
            assert again["answer"] == "done: after"
        finally:
            stop_swarm(name)
