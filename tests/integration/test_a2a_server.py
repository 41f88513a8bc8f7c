"""A deployed swarm as an A2A v1.0 agent, over HTTP on 127.0.0.1 through Ray Serve, driven by
a2a-sdk's own client (and raw HTTP for the bad inputs): one `swarm up --a2a` for the module."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import A2ACardResolver
from a2a.client.client import Client
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import (
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from a2a.utils.proto_utils import validate_proto_required_fields
from google.protobuf.json_format import MessageToDict

import swarm
from swarm.client import SwarmClient
from tests.a2a_calls import V1, answer, message, new, rpc, send, task_of, text
from tests.a2a_calls import client as a2a_client

ROOT = Path(__file__).resolve().parents[2]
DESK = Path(__file__).resolve().parent / "configs" / "a2a-desk.yaml"


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "swarm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@dataclass
class Desk:
    name: str
    base: str  # the A2A app's base URL
    card_url: str
    swarm: SwarmClient


@pytest.fixture(scope="module")
def desk(ray_cluster: dict, serve_port: int) -> Iterator[Desk]:
    name = f"a2a-{uuid.uuid4().hex[:6]}"
    up = _cli("up", str(DESK), "--name", name, "--a2a")
    assert up.returncode == 0, up.stdout + up.stderr
    found = re.search(r"A2A agent card: (\S+)", up.stdout)
    assert found, up.stdout
    url = found.group(1)
    assert url == f"http://127.0.0.1:{serve_port}/{name}/a2a/.well-known/agent-card.json"
    try:
        yield Desk(name, url.removesuffix("/.well-known/agent-card.json"), url,
                   swarm.connect(name))
    finally:
        down = _cli("down", name)
    assert down.returncode == 0, down.stderr
    from ray import serve

    assert f"{name}.a2a" not in serve.status().applications  # `swarm down` removed the app


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """For a2a-sdk's client, which makes it send `A2A-Version: 1.0` by default."""
    async with httpx.AsyncClient(timeout=120) as client:
        yield client


@pytest.fixture
async def raw() -> AsyncIterator[httpx.AsyncClient]:
    """For hand-made requests: sends only the headers a test gives."""
    async with httpx.AsyncClient(timeout=120) as client:
        yield client


async def _card(http: httpx.AsyncClient, desk: Desk) -> AgentCard:
    return await A2ACardResolver(http, desk.base).get_agent_card()


async def _client(http: httpx.AsyncClient, desk: Desk, *, streaming: bool = False,
                  rest: bool = False) -> Client:
    return a2a_client(http, await _card(http, desk), streaming=streaming, rest=rest)


async def _wait_state(client: Client, task_id: str, state: int, timeout: float = 60) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await client.get_task(GetTaskRequest(id=task_id))
        if task.status.state == state or time.monotonic() > deadline:
            return task
        await asyncio.sleep(0.1)


async def test_the_agent_card_validates_and_names_the_agents(http: httpx.AsyncClient,
                                                             desk: Desk) -> None:
    raw = await http.get(desk.card_url)
    assert raw.status_code == 200 and raw.headers["etag"]
    card = await _card(http, desk)  # a2a-sdk's resolver parses it as any client would
    validate_proto_required_fields(card)
    assert card.name == desk.name and card.capabilities.streaming
    assert {s.id: list(s.examples) for s in card.skills} == {"front": ["say hello"],
                                                             "worker": []}
    assert "fn" in next(s for s in card.skills if s.id == "worker").tags
    assert [(i.protocol_binding, i.url, i.protocol_version) for i in card.supported_interfaces] \
        == [("JSONRPC", f"{desk.base}/", "1.0"), ("HTTP+JSON", f"{desk.base}/rest", "1.0")]


async def test_send_message_completes_with_the_answer_as_artifact(http: httpx.AsyncClient,
                                                                  desk: Desk) -> None:
    client = await _client(http, desk)
    task = await task_of(client, message("hello over a2a"))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert answer(task) == "done: hello over a2a"
    assert task.artifacts[0].name == "answer"
    # GetTask and the swarm's own table hold the same task, one to one.
    got = await client.get_task(GetTaskRequest(id=task.id))
    theirs = desk.swarm.task(task.id)
    assert got.status.state == TaskState.TASK_STATE_COMPLETED and answer(got) == answer(task)
    assert theirs.status().state == "completed" and theirs.result() == "done: hello over a2a"
    assert theirs.a2a_task() == got
    assert got.history[0].message_id == task.history[0].message_id  # the client's own message
    assert theirs.status().metadata["via"] == "a2a"


async def test_streaming_sends_status_updates_then_theanswer(http: httpx.AsyncClient,
                                                              desk: Desk) -> None:
    client = await _client(http, desk, streaming=True)
    events = await send(client, message("stream this"))
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[0] == "task" and events[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
    assert kinds[-2:] == ["artifact_update", "status_update"]
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert text(events[-2].artifact_update.artifact) == "done: stream this"
    working = [text(e.status_update.status.message) for e in events[1:-2]]
    assert all(e.status_update.status.state == TaskState.TASK_STATE_WORKING
               for e in events[1:-2])
    assert "front handed the task to worker" in working
    assert any(re.match(r"worker, step \d+: tool echo ok", w) for w in working), working


async def test_list_tasks_sees_every_task_of_a_context(http: httpx.AsyncClient,
                                                       desk: Desk) -> None:
    client = await _client(http, desk)
    ctx = uuid.uuid4().hex
    first = await task_of(client, message("first in context", context_id=ctx))
    second = await task_of(client, message("second in context", context_id=ctx))
    assert first.context_id == second.context_id == ctx
    listed = await client.list_tasks(ListTasksRequest(context_id=ctx))
    assert [t.id for t in listed.tasks] == [second.id, first.id]  # newest status first
    assert listed.total_size == 2 and not listed.tasks[0].artifacts  # artifacts on request
    page1 = await client.list_tasks(ListTasksRequest(context_id=ctx, page_size=1,
                                                     include_artifacts=True))
    assert [t.id for t in page1.tasks] == [second.id] and page1.next_page_token
    assert answer(page1.tasks[0]) == "done: second in context"
    page2 = await client.list_tasks(ListTasksRequest(context_id=ctx, page_size=1,
                                                     page_token=page1.next_page_token))
    assert [t.id for t in page2.tasks] == [first.id] and not page2.next_page_token
    # A task from the Python client is in the listing too: it is the same table.
    other = desk.swarm.submit("from python", context_id=ctx)
    other.result(timeout=60)
    done = await client.list_tasks(ListTasksRequest(
        context_id=ctx, status=TaskState.TASK_STATE_COMPLETED))
    assert {t.id for t in done.tasks} == {first.id, second.id, other.id}


async def test_cancel_a_long_task(http: httpx.AsyncClient, desk: Desk) -> None:
    client = await _client(http, desk)
    task = await task_of(client, message("slow please"), return_immediately=True)
    assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
    working = await _wait_state(client, task.id, TaskState.TASK_STATE_WORKING)
    assert working.status.state == TaskState.TASK_STATE_WORKING
    await asyncio.sleep(1.0)  # into the 25 s tool call
    canceled = await client.cancel_task(CancelTaskRequest(id=task.id))
    assert canceled.status.state == TaskState.TASK_STATE_CANCELED
    got = await client.get_task(GetTaskRequest(id=task.id))
    assert got.status.state == TaskState.TASK_STATE_CANCELED
    assert desk.swarm.task(task.id).status().state == "canceled"
    with pytest.raises(TaskNotCancelableError):  # it has ended
        await client.cancel_task(CancelTaskRequest(id=task.id))
    # A task started elsewhere (the Python client) is canceled through A2A just the same.
    other = desk.swarm.submit("slow as well")
    await _wait_state(client, other.id, TaskState.TASK_STATE_WORKING)
    assert (await client.cancel_task(CancelTaskRequest(id=other.id))).status.state == \
        TaskState.TASK_STATE_CANCELED
    assert other.status().state == "canceled"


async def test_an_approval_gate_is_input_required_and_a_follow_up_answers_it(
        http: httpx.AsyncClient, desk: Desk) -> None:
    client = await _client(http, desk)
    task = await task_of(client, message("count the words here"))
    assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    question = task.status.message
    assert "Approval needed" in text(question)
    (wanted,) = [MessageToDict(p.data) for p in question.parts if p.HasField("data")]
    (gate,) = wanted["gates"]
    assert gate["tool"] == "word_count" and gate["gate"] in text(question)
    assert desk.swarm.task(task.id).status().state == "input_required"
    # A message naming the task answers it: "approve" decides the one open gate.
    done = await task_of(client, message("approve", task=task))
    assert done.id == task.id and done.status.state == TaskState.TASK_STATE_COMPLETED
    assert answer(done) == "words: 4"

    # A data part approves with edited arguments; the streamed version ends at the question.
    streaming = await _client(http, desk, streaming=True)
    events = await send(streaming, message("count more words please"))
    asked = events[-1].status_update.status
    assert asked.state == TaskState.TASK_STATE_INPUT_REQUIRED
    task = events[0].task
    done = await task_of(client, message(data={"approve": gate["gate"],
                                              "args": {"text": "one two"}}, task=task))
    assert answer(done) == "words: 2"

    # "deny REASON" refuses: the model hears who denied the call and why.
    task = await task_of(client, message("count nothing"))
    denied = await task_of(client, message("deny not today", task=task))
    assert denied.status.state == TaskState.TASK_STATE_COMPLETED
    assert "denied by a2a: not today" in answer(denied)


async def test_subscribe_follows_a_task_answered_from_the_python_client(
        http: httpx.AsyncClient, desk: Desk) -> None:
    handle = desk.swarm.submit("count these four words")
    for _ in range(600):
        if (info := handle.status()).gates:
            break
        await asyncio.sleep(0.1)
    client = await _client(http, desk, streaming=True)

    async def approve_soon() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(handle.approve, info.gates[0]["gate"], approver="ops")

    approving = asyncio.create_task(approve_soon())
    events = [e async for e in client.subscribe(SubscribeToTaskRequest(id=handle.id))]
    await approving
    assert events[0].task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    assert text(events[-2].artifact_update.artifact) == "words: 4"
    with pytest.raises(UnsupportedOperationError):  # a finished task has nothing to stream
        async for _ in client.subscribe(SubscribeToTaskRequest(id=handle.id)):
            pass


async def test_the_rest_binding(http: httpx.AsyncClient, desk: Desk) -> None:
    client = await _client(http, desk, rest=True)
    task = await task_of(client, message("hello over rest"))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert answer(task) == "done: hello over rest"
    got = await client.get_task(GetTaskRequest(id=task.id))
    assert got == desk.swarm.task(task.id).a2a_task()
    with pytest.raises(TaskNotFoundError):
        await client.get_task(GetTaskRequest(id="no-such-task"))
    listed = await http.get(f"{desk.base}/rest/tasks", params={"pageSize": 1}, headers=V1)
    assert listed.status_code == 200 and len(listed.json()["tasks"]) == 1
    streaming = await _client(http, desk, rest=True, streaming=True)
    events = await send(streaming, message("stream over rest"))
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


async def test_bad_input_gets_the_protocol_error_and_the_server_stays_up(
        http: httpx.AsyncClient, raw: httpx.AsyncClient, desk: Desk) -> None:
    endpoint = f"{desk.base}/"
    big = "x" * 70_000  # over the body limit (64 KiB for max_task_chars 2000)
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("malformed JSON", {"content": b'{"jsonrpc": "2.0", "id": 1, "method": '}, -32700),
        ("not JSON-RPC", {"json": {"hello": "world"}}, -32600),
        ("a batch", {"json": [rpc("GetTask", {"id": "x"})]}, -32600),
        ("jsonrpc 1.0", {"json": {**rpc("GetTask", {"id": "x"}), "jsonrpc": "1.0"}}, -32600),
        ("unknown method", {"json": rpc("tasks/get", {"id": "x"})}, -32601),
        ("bad params", {"json": rpc("GetTask", {"id": 5})}, -32602),
        ("unknown task", {"json": rpc("GetTask", {"id": "no-such-task"})}, -32001),
        ("cancel unknown", {"json": rpc("CancelTask", {"id": "no-such-task"})}, -32001),
        ("subscribe unknown", {"json": rpc("SubscribeToTask", {"id": "no-such-task"})}, -32001),
        ("answer unknown", {"json": rpc("SendMessage", new("approve", taskId="nope"))},
         -32001),
        ("text over max_task_chars", {"json": rpc("SendMessage", new("x" * 2001))}, -32602),
        ("body over the limit", {"json": rpc("SendMessage", new(big))}, -32600),
        ("no text", {"json": rpc("SendMessage", {"message": {
            "messageId": "m", "role": "ROLE_USER", "parts": [{"url": "http://x/y"}]}})}, -32005),
    ]
    for what, body, code in cases:
        resp = await raw.post(endpoint, headers=V1, **body)
        assert resp.status_code == 200, what
        assert resp.json()["error"]["code"] == code, (what, resp.json())
    # Refused control characters: in the text (read by the app), in the sender's label
    # (refused by the supervisor actor, its UserError mapped across Ray).
    for params, said in [(new("hel\x00lo"), "task text has a control character (U+0000)"),
                         (new("hello", metadata={"user": "ca\x1brol"}),
                          "user has a control character (U+001B) at index 2")]:
        resp = await raw.post(endpoint, headers=V1, json=rpc("SendMessage", params))
        error = resp.json()["error"]
        assert error["code"] == -32602 and error["message"].startswith(said), error
    for headers in ({}, {"A2A-Version": "0.3"}, {"A2A-Version": "2.0"}):
        resp = await raw.post(endpoint, headers=headers, json=rpc("GetTask", {"id": "x"}))
        assert resp.json()["error"]["code"] == -32009, headers  # VersionNotSupported
    # A message naming a finished task is refused; so is one that doesn't answer the question.
    client = await _client(http, desk)
    done = await task_of(client, message("finish first"))
    with pytest.raises(UnsupportedOperationError, match="completed"):
        await task_of(client, message("approve", task=done))
    gated = await task_of(client, message("count to refuse"))
    resp = await raw.post(endpoint, headers=V1, json=rpc("SendMessage", new(
        "maybe later", taskId=gated.id, contextId=gated.context_id)))
    assert resp.json()["error"]["code"] == -32602 and "approve" in resp.json()["error"]["message"]
    # The REST binding answers with HTTP statuses.
    rest = f"{desk.base}/rest"
    assert (await raw.get(f"{rest}/tasks/no-such-task", headers=V1)).status_code == 404
    assert (await raw.get(f"{rest}/tasks/no-such-task")).status_code == 400  # no version
    assert (await raw.post(f"{rest}/message:send", headers=V1, content=b"{")).status_code \
        == 400
    too_big = await raw.post(f"{rest}/message:send", headers=V1, json=new(big))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == 413
    # None of it hurt the server: it still answers, and the gated task still takes its answer.
    assert answer(await task_of(client, message("still here"))) == "done: still here"
    assert (await task_of(client, message("deny", task=gated))).status.state == \
        TaskState.TASK_STATE_COMPLETED
