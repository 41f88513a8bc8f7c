"""The swarm as an A2A agent, in one process: the HTTP app over an in-process supervisor
(`LocalLink` + `LocalSwarm`), driven by a2a-sdk's client through httpx's ASGI transport; and the
pure parts (reading answers, paging, the card)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client.card_resolver import parse_agent_card
from a2a.types import (
    AgentCard,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import validate_proto_required_fields

from swarm import events as ev
from swarm.config import SwarmConfig, load_config
from swarm.protocol import a2a
from swarm.protocol.a2a_server.app import build_app
from swarm.protocol.a2a_server.bridge import (
    LocalLink,
    Snapshot,
    SwarmLink,
    follow,
    read_answer,
    request_text,
)
from swarm.protocol.a2a_server.card import build_agent_card
from swarm.protocol.a2a_server.listing import TaskQuery, page
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.a2a_calls import V1, answer, message, new, rpc, send, task_of, text
from tests.a2a_calls import client as a2a_client

DESK = Path(__file__).resolve().parents[1] / "integration" / "configs" / "a2a-desk.yaml"
BASE = "http://a2a.test"


@dataclass
class Desk:
    swarm: LocalSwarm
    http: httpx.AsyncClient
    card: AgentCard

    def client(self, **kw: Any) -> Any:
        return a2a_client(self.http, self.card, **kw)


async def _desk(cfg: SwarmConfig) -> AsyncIterator[Desk]:
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        card = build_agent_card(cfg, name="desk", base_url=BASE)
        app = build_app(LocalLink(sw.supervisor), card, max_task_chars=cfg.limits.max_task_chars,
                        max_body_bytes=cfg.a2a.body_limit(cfg.limits.max_task_chars))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=BASE, timeout=30) as http:
            yield Desk(sw, http, card)


@pytest.fixture
async def desk() -> AsyncIterator[Desk]:
    async for d in _desk(load_config(DESK)):
        yield d


async def _until(rec: Any, state: str) -> None:
    while rec.state != state:
        await asyncio.wait_for(rec.watch().wait(), 10)


# ---- the card -----------------------------------------------------------------------------------


def test_the_card_is_one_a2a_sdk_clients_accept() -> None:
    cfg = load_config(DESK)
    card = build_agent_card(cfg, name="desk", base_url="http://h:1/desk/a2a/")
    validate_proto_required_fields(card)
    from a2a.server.request_handlers.response_helpers import agent_card_to_dict

    assert parse_agent_card(agent_card_to_dict(card)) == card
    assert [(s.id, list(s.tags), list(s.examples)) for s in card.skills] == [
        ("front", ["swarm", "entry"], ["say hello"]), ("worker", ["swarm", "member", "fn"], [])]
    assert [i.url for i in card.supported_interfaces] == ["http://h:1/desk/a2a/",
                                                          "http://h:1/desk/a2a/rest"]
    # A config without descriptions still makes a complete card.
    bare = cfg.model_copy(update={"description": "", "agents": {
        n: a.model_copy(update={"instructions": ""}) for n, a in cfg.agents.items()}})
    card = build_agent_card(bare, name="desk", base_url="http://h:1")
    validate_proto_required_fields(card)
    assert card.description == "swarm a2a-desk (agents: front, worker)"


# ---- over HTTP, in process ----------------------------------------------------------------------


async def test_a_message_becomes_a_task_of_the_swarm(desk: Desk) -> None:
    c = desk.client()
    task = await task_of(c, message("hello", user="ana"))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED and answer(task) == "done: hello"
    rec = desk.swarm.supervisor.get(task.id)
    assert rec.user == "ana" and rec.answer == "done: hello"
    assert await c.get_task(GetTaskRequest(id=task.id)) == rec.task  # the same Task
    assert rec.task.history[0].message_id == task.history[0].message_id


async def test_get_and_list_tasks_carry_nested_metadata(desk: Desk) -> None:
    """A task's metadata (nested lists and objects) reaches A2A clients in GetTask and
    ListTasks as the A2A task's Struct (numbers as JSON numbers), and the server's own view of
    the task (its row) holds it as plain data."""
    meta = {"ticket": 7, "tags": ["a", 1, {"deep": [None, True]}], "nested": {"x": {"y": []}}}
    sup = desk.swarm.supervisor
    task_id = await sup.submit("hello", user="ana", metadata=meta)
    await sup.wait(task_id, 30)
    c = desk.client()
    got = await c.get_task(GetTaskRequest(id=task_id))
    assert a2a.json_data(got.metadata) == {**meta, "user": "ana"}
    (listed,) = [t for t in (await c.list_tasks(ListTasksRequest())).tasks if t.id == task_id]
    assert listed.metadata == got.metadata
    snap = await LocalLink(sup).snapshot(task_id)
    assert snap is not None
    assert json.dumps(snap.row["metadata"], sort_keys=True) == json.dumps(
        {**meta, "user": "ana"}, sort_keys=True)


async def test_streaming_ends_with_the_answer(desk: Desk) -> None:
    events = await send(desk.client(streaming=True), message("stream me"))
    assert events[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
    assert text(events[0].task.history[0]) == "stream me"
    assert text(events[-2].artifact_update.artifact) == "done: stream me"
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    # Progress rides in WORKING updates: a line of text and the swarm event itself.
    tool = next(e.status_update.status.message for e in events[1:-2]
                if "tool echo" in text(e.status_update.status.message))
    assert tool.metadata["swarm_event"]["kind"] == "tool_call"


async def test_a_message_sent_again_is_the_same_task(desk: Desk,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="a2a")
    sup = desk.swarm.supervisor
    ctx = uuid.uuid4().hex

    async def send_rpc(said: str, message_id: str, **extra: Any) -> dict[str, Any]:
        params = new(said, **extra)
        params["message"]["messageId"] = message_id
        return (await desk.http.post("/", headers=V1, json=rpc("SendMessage", params))).json()

    first = await send_rpc("hello", "m-1", contextId=ctx)
    again = await send_rpc("hello", "m-1", contextId=ctx)
    task_id = first["result"]["task"]["id"]
    assert again["result"]["task"]["id"] == task_id, again
    assert again["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert [t for t in sup.tasks if t == task_id] == [task_id] and len(sup.tasks) == 1
    # With no context id, the same message sent again is still the same task.
    first = await send_rpc("hi", "m-2")
    assert (await send_rpc("hi", "m-2"))["result"]["task"]["id"] == first["result"]["task"]["id"]
    assert len(sup.tasks) == 2
    # Another text under the same message id is refused; another sender's is their own task.
    refused = await send_rpc("not hello", "m-1", contextId=ctx)
    assert refused["error"]["code"] == -32602, refused
    assert refused["error"]["message"] == (f"messageId 'm-1' was sent before with another text "
                                           f"(it started task {task_id}); a new message needs "
                                           "a new messageId"), refused
    theirs = await send_rpc("hello", "m-1", contextId=ctx, metadata={"user": "someone"})
    assert theirs["result"]["task"]["id"] != task_id and len(sup.tasks) == 3
    # A task waiting for input, sent again: the task as it is, waiting still.
    asked = await send_rpc("count a b", "m-3", contextId=ctx)
    assert asked["result"]["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
    again = await send_rpc("count a b", "m-3", contextId=ctx)
    assert again["result"]["task"]["id"] == asked["result"]["task"]["id"]
    assert again["result"]["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
    # A retry is no error of the server's: none is logged for the task handed back.
    assert not [r for r in caplog.records if "already exists" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]
    # ... and another text under its message id is refused while it waits, on both methods
    # (a2a-sdk answered it with the waiting task, the new text dropped).
    refused = await send_rpc("count c d", "m-3", contextId=ctx)
    assert refused["error"]["code"] == -32602, refused
    assert refused["error"]["message"].startswith("messageId 'm-3' was sent before"), refused
    params = new("count c d", contextId=ctx)
    params["message"]["messageId"] = "m-3"
    streamed = await desk.http.post("/", headers=V1, json=rpc("SendStreamingMessage", params))
    assert "messageId 'm-3' was sent before" in streamed.text, streamed.text
    assert len(sup.tasks) == 4
    await sup.cancel(asked["result"]["task"]["id"])
    # A task still running, sent again: the same task.
    msg = message("slow please", context_id=ctx)
    running = await asyncio.wait_for(task_of(desk.client(), msg, return_immediately=True), 10)
    again_task = await asyncio.wait_for(task_of(desk.client(), msg, return_immediately=True), 10)
    assert again_task.id == running.id and len(sup.tasks) == 5
    await sup.cancel(running.id)
    # Streaming: the message sent again streams the task it made.
    msg = message("stream once", context_id=ctx)
    events = await send(desk.client(streaming=True), msg)
    again = await send(desk.client(streaming=True), msg)
    assert again[0].task.id == events[0].task.id and len(sup.tasks) == 6
    assert again[-1].task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_a_failed_task_fails_over_a2a_with_its_reason(tmp_path: Path) -> None:
    cfg = load_config(DESK)
    cfg = cfg.model_copy(update={"budgets": cfg.budgets.model_copy(update={
        "on_exhausted": "fail", "task": cfg.budgets.task.model_copy(update={"max_steps": 1})})})
    async for d in _desk(cfg):
        events = await send(d.client(streaming=True), message("hello"))
        final = events[-1].status_update.status
        assert final.state == TaskState.TASK_STATE_FAILED and "budget" in text(final.message)
        assert not any(e.HasField("artifact_update") for e in events)


async def test_answers_to_a_gate_started_elsewhere(desk: Desk) -> None:
    sup = desk.swarm.supervisor
    task_id = await sup.submit("count one two three")  # not through A2A
    await _until(sup.get(task_id), "input_required")
    c = desk.client()
    waiting = await c.get_task(GetTaskRequest(id=task_id))
    assert waiting.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
    done = await task_of(c, message("yes", task=waiting, user="lee"))
    assert done.status.state == TaskState.TASK_STATE_COMPLETED and answer(done) == "words: 4"
    assert [d["by"] for (t, _), d in sup.approvals.done.items() if t == task_id] == ["lee"]


async def test_a_wrong_gate_id_leaves_the_gate_open(desk: Desk,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="a2a")
    sup = desk.swarm.supervisor
    task_id = await sup.submit("count one two")
    rec = sup.get(task_id)
    await _until(rec, "input_required")
    (gid,) = rec.gates
    errors = []
    for said in ("approve nosuchgate", f"approve {gid[:-1]}9", f"deny {gid[:-1]}9 not that",
                 f"approve {gid} and more"):
        resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
            said, taskId=task_id, contextId=rec.task.context_id)))
        errors.append(resp.json()["error"])
        assert errors[-1]["code"] == -32602 and gid in errors[-1]["message"], (said, errors)
    assert errors[0]["message"] == f"no open gate 'nosuchgate'; open: {gid}"
    assert rec.state == "input_required" and list(rec.gates) == [gid]
    assert not [k for k in sup.approvals.done if k[0] == task_id]
    # Refusals are the client's errors: no traceback in the server's log for them.
    assert not [r for r in caplog.records if r.exc_info], \
        [r.getMessage() for r in caplog.records]
    await sup.cancel(task_id)


async def test_a_follow_up_waits_for_the_question(desk: Desk) -> None:
    c = desk.client()
    task = await task_of(c, message("slow please"), return_immediately=True)
    resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
        "approve", taskId=task.id, contextId=task.context_id)))
    error = resp.json()["error"]
    assert error["code"] == -32004 and "input-required" in error["message"]
    resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
        "approve", taskId=task.id, contextId="another-context")))
    assert resp.json()["error"]["code"] == -32602  # the task is in another context
    await desk.swarm.supervisor.cancel(task.id)


async def test_list_tasks_filters_and_pages(desk: Desk) -> None:
    c = desk.client()
    ctx = uuid.uuid4().hex
    ids = [(await task_of(c, message(f"n{i}", context_id=ctx))).id for i in range(3)]
    await task_of(c, message("elsewhere"))
    listed = await c.list_tasks(ListTasksRequest(context_id=ctx, page_size=2))
    assert [t.id for t in listed.tasks] == ids[::-1][:2] and listed.total_size == 3
    rest = await c.list_tasks(ListTasksRequest(context_id=ctx, page_token=listed.next_page_token))
    assert [t.id for t in rest.tasks] == [ids[0]] and rest.next_page_token == ""
    assert (await c.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_WORKING))).tasks == []


async def test_list_tasks_refuses_an_unknown_status(desk: Desk) -> None:
    await task_of(desk.client(), message("one"))
    for status in ("TASK_STATE_BOGUS", 99, "working"):
        resp = await desk.http.post("/", headers=V1, json=rpc("ListTasks", {"status": status},
                                                              request_id=7))
        body = resp.json()
        assert body["id"] == 7 and body["error"]["code"] == -32602, body
        assert f"unknown task status {status!r}" in body["error"]["message"]
        assert "TASK_STATE_COMPLETED" in body["error"]["message"]  # the accepted ones
    # The method's name with a letter escaped is the same method, and is checked the same.
    escaped = b'{"jsonrpc": "2.0", "id": 8, "method": "\\u004cistTasks", ' \
              b'"params": {"status": "BOGUS"}}'
    body = (await desk.http.post("/", headers={**V1, "Content-Type": "application/json"},
                                 content=escaped)).json()
    assert body["id"] == 8 and body["error"]["code"] == -32602, body
    resp = await desk.http.get("/rest/tasks", headers=V1, params={"status": "TASK_STATE_BOGUS"})
    assert resp.status_code == 400 and "TASK_STATE_WORKING" in resp.json()["error"]["message"]
    for status in ("TASK_STATE_COMPLETED", 3):  # a name or a number of a state
        resp = await desk.http.post("/", headers=V1, json=rpc("ListTasks", {"status": status}))
        assert resp.json()["result"]["totalSize"] == 1
    resp = await desk.http.get("/rest/tasks", headers=V1,
                               params={"status": "TASK_STATE_COMPLETED"})
    assert resp.status_code == 200 and resp.json()["totalSize"] == 1


async def test_oversized_bodies_are_refused_whole_or_chunked(desk: Desk) -> None:
    limit = 65_536
    body = b'{"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"x": "' + \
        b"y" * limit + b'"}}'

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    for content in (body, chunks()):
        resp = await desk.http.post("/", headers=V1, content=content)
        assert resp.status_code == 200 and resp.json()["error"]["code"] == -32600
        resp = await desk.http.post("/rest/message:send", headers=V1, content=body)
        assert resp.status_code == 413 and resp.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert answer(await task_of(desk.client(), message("fine"))) == "done: fine"


async def test_json_nested_too_deeply_is_a_parse_error_and_the_server_serves_on(
        desk: Desk) -> None:
    deep = b"[" * 60_000  # within the body limit (65,536 bytes)
    listing = b'{"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": ' + \
        b'{"a": ' * 5_000 + b"{}" + b"}" * 5_000 + b"}"
    why = ("JSON nested too deeply: the request body nests arrays and objects more than 200 "
           "levels deep, which this agent does not parse")
    for body in (deep, listing):
        resp = await desk.http.post("/", headers=V1, content=body)
        assert resp.status_code == 200
        assert resp.json()["error"]["code"] == -32700 and resp.json()["error"]["message"] == why
    resp = await desk.http.post("/rest/message:send", headers=V1, content=deep)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == why
    # Brackets in strings, and many side by side, are no nesting.
    text = "[" * 300 + " " + "[]" * 300
    assert answer(await task_of(desk.client(), message(text))) == f"done: {text}"


async def test_a_body_that_is_not_utf8_is_a_parse_error_and_the_server_serves_on(
        desk: Desk) -> None:
    bad = b'{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"\xff"}}'
    at = bad.index(b"\xff")
    why = f"the request body is not UTF-8 (byte 0xff at offset {at}): JSON must be UTF-8"
    resp = await desk.http.post("/", headers=V1, content=bad)
    assert resp.status_code == 200, resp.text
    assert resp.json()["error"] == {"code": -32700, "message": why}
    resp = await desk.http.post("/rest/message:send", headers=V1,
                                content=b'{"message": {"parts": [{"text": "\xfe"}]}}')
    assert resp.status_code == 400 and "not UTF-8 (byte 0xfe" in resp.json()["error"]["message"]
    assert answer(await task_of(desk.client(), message("still here"))) == "done: still here"


async def test_refused_characters_are_invalid_params_and_make_no_task(
        desk: Desk, caplog: pytest.LogCaptureFixture) -> None:
    """NUL and the other C0 controls but tab, newline and CR (`swarm._text`): in a new task's
    text (checked as the message is read, on both bindings), in the sender's user label and in
    an answer (refused by the supervisor, mapped as its other refusals); nothing is made, an
    open gate stays open, and the server's log gets no traceback for the client's errors."""
    caplog.set_level("ERROR", logger="a2a")
    sup = desk.swarm.supervisor
    said = "task text has a control character (U+0000) at index 3"
    resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new("hel\x00lo")))
    error = resp.json()["error"]
    assert error["code"] == -32602 and error["message"] == said + (
        "; of the control characters (U+0000 to U+001F, U+007F to U+009F) only tab, newline "
        "and carriage return are accepted"), error
    resp = await desk.http.post("/rest/message:send", headers=V1, json=new("hel\x00lo"))
    assert resp.status_code == 400 and said in resp.json()["error"]["message"], resp.text
    resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
        "hello", metadata={"user": "ca\x1brol"})))
    error = resp.json()["error"]
    assert error["code"] == -32602, error
    assert error["message"].startswith("user has a control character (U+001B) at index 2")
    # A label too long, or not text, is refused too, not replaced by "a2a".
    for label, said in (("x" * 65, "not a string of 65 characters"), (7, "not a float")):
        resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
            "hello", metadata={"user": label})))
        error = resp.json()["error"]
        assert error["code"] == -32602 and error["message"] == (
            "metadata.user, the sender's label, must be a string of 1 to 64 characters, "
            + said), error
    assert sup.tasks == {}
    # Tab, newline and CR are text.
    done = await task_of(desk.client(), message("two\tcolumns\r\nand lines"))
    assert answer(done) == "done: two\tcolumns\r\nand lines"
    task_id = await sup.submit("count one two")
    rec = sup.get(task_id)
    await _until(rec, "input_required")
    (gid,) = rec.gates
    resp = await desk.http.post("/", headers=V1, json=rpc("SendMessage", new(
        f"deny {gid} not \x1b[2J this", taskId=task_id, contextId=rec.task.context_id)))
    error = resp.json()["error"]
    assert error["code"] == -32602, error
    assert error["message"].startswith("reason has a control character (U+001B) at index 4")
    assert rec.state == "input_required" and list(rec.gates) == [gid]
    assert not [r for r in caplog.records if r.exc_info], \
        [r.getMessage() for r in caplog.records]
    await sup.cancel(task_id)


# ---- reading messages ---------------------------------------------------------------------------


def _snap(gates: list[str] | None = None, choices: list[str] | None = None) -> Snapshot:
    question = a2a.text_message("question?", role="agent")
    question.parts.append(a2a.data_part({"choices": choices or []}))
    task = Task(id="t1", context_id="c1",
                status=TaskStatus(state=TaskState.TASK_STATE_INPUT_REQUIRED, message=question))
    return Snapshot(task, {"gates": [{"gate": g} for g in gates or []]}, 12)


def test_reading_the_answer_to_a_gate() -> None:
    one, two = _snap(["a-1-0"]), _snap(["a-1-0", "b-2-0"])
    got = read_answer(message("Approve."), one)
    assert (got.kind, got.gate, got.cursor) == ("approve", "a-1-0", 12)
    got = read_answer(message("deny too risky today"), one)
    assert (got.kind, got.gate, got.reason) == ("deny", "a-1-0", "too risky today")
    got = read_answer(message("no b-2-0 not this one"), two)
    assert (got.kind, got.gate, got.reason) == ("deny", "b-2-0", "not this one")
    got = read_answer(message(data={"approve": "b-2-0", "args": {"n": 3, "x": 1.5}}), two)
    assert (got.kind, got.gate, got.args) == ("approve", "b-2-0", {"n": 3, "x": 1.5})
    assert isinstance(got.args["n"], int)  # protobuf made it 3.0
    got = read_answer(message(data={"deny": True, "reason": "no"}), one)
    assert (got.kind, got.gate, got.reason) == ("deny", "a-1-0", "no")
    for bad, snap in [("approve", two), ("maybe", one), ("approve c-9-9", two)]:
        with pytest.raises(InvalidParamsError):
            read_answer(message(bad), snap)
    # A word where a gate id goes is one: an unknown id is refused, not read as the open gate.
    for bad in ("approve nosuchgate", "yes c-9-9", "deny c-9-9 typo", "no b-2-0.",
                "approve a-1-0 b-2-0"):
        with pytest.raises(InvalidParamsError, match="open: a-1-0"):
            read_answer(message(bad), one)
    with pytest.raises(InvalidParamsError, match="no open gate 'nosuchgate'; open: a-1-0"):
        read_answer(message("approve nosuchgate"), one)
    got = read_answer(message("approve a-1-0."), one)
    assert (got.kind, got.gate) == ("approve", "a-1-0")
    # After "deny", a word not shaped like a gate id begins the reason (one gate open) ...
    got = read_answer(message("deny typo-gate reason"), one)
    assert (got.kind, got.gate, got.reason) == ("deny", "a-1-0", "typo-gate reason")
    # ... and with two open, the gate must be named.
    with pytest.raises(InvalidParamsError, match="name the one you decide"):
        read_answer(message("deny typo-gate reason"), two)
    with pytest.raises(InvalidParamsError, match="JSON object"):
        read_answer(message(data={"approve": "a-1-0", "args": [1]}), one)
    # A number is no gate id, 1 and 1.0 included (1 == True: they approved the open gate).
    for number in (1, 1.0, 0, 5):
        with pytest.raises(InvalidParamsError, match="a gate is named by its id"):
            read_answer(message(data={"approve": number}), one)


def test_reading_the_answer_to_a_question() -> None:
    snap = _snap(choices=["rerun", "skip"])
    assert read_answer(message("Skip!"), snap).text == "skip"
    assert read_answer(message(data={"answer": "rerun"}), snap).text == "rerun"
    with pytest.raises(InvalidParamsError, match="rerun or skip"):
        read_answer(message("continue"), snap)


def test_the_text_of_a_new_task() -> None:
    assert request_text(message("hi"), 10) == "hi"
    assert request_text(message(data={"q": 1}), 20) == '{"q": 1}'
    with pytest.raises(InvalidParamsError, match="max_task_chars"):
        request_text(message("x" * 11), 10)
    with pytest.raises(InvalidParamsError, match=r"^task text has a control character "
                                                 r"\(U\+0007\) at index 1"):
        request_text(message("a\x07"), 10)
    assert request_text(message("a\tb\nc\r"), 10) == "a\tb\nc\r"
    from a2a.utils.errors import ContentTypeNotSupportedError

    with pytest.raises(ContentTypeNotSupportedError):
        request_text(Message(message_id="m", parts=[Part(url="http://x/y")]), 10)


# ---- paging -------------------------------------------------------------------------------------


def test_paging_orders_by_status_time_then_id() -> None:
    def task(tid: str, ns: int | None, state: str = "completed", ctx: str = "c") -> Task:
        t = Task(id=tid, context_id=ctx, status=TaskStatus(state=a2a.STATES[state]))
        if ns is not None:
            t.status.timestamp.FromNanoseconds(ns)
        return t

    tasks = [task("a", 10), task("b", 30), task("c", 30), task("d", None), task("e", 20, "working"),
             task("f", 40, ctx="other")]
    got, total, more = page(tasks, TaskQuery(context_id="c", limit=2))
    assert [t.id for t in got] == ["c", "b"] and (total, more) == (5, True)
    from swarm.protocol.a2a_server.listing import sort_key

    got, _, more = page(tasks, TaskQuery(context_id="c", after=sort_key(got[-1]), limit=10))
    assert [t.id for t in got] == ["e", "a", "d"] and not more
    got, total, _ = page(tasks, TaskQuery(state=a2a.STATES["working"]))
    assert [t.id for t in got] == ["e"] and total == 1
    got, _, _ = page(tasks, TaskQuery(since_ns=25))
    assert [t.id for t in got] == ["f", "c", "b"]


# ---- following a task across a supervisor restart -----------------------------------------------


class _RestartedLink(SwarmLink):
    """A supervisor that restarted: its event list is shorter than the follower's cursor."""

    def __init__(self, states: list[str], batches: list[list[Any]]) -> None:
        self.states, self.batches = states, batches
        self.cursors: list[int] = []

    async def call(self, method: str, *args: Any) -> Any:
        if method == "events":
            self.cursors.append(args[1])
            batch = self.batches.pop(0)
            return batch, bool(batch) and isinstance(batch[-1], ev.TaskFinished)
        task = Task(id="t1", context_id="c1",
                    status=TaskStatus(state=a2a.STATES[self.states.pop(0)]))
        if task.status.state == a2a.STATES["completed"]:
            a2a.add_answer(task, "the answer")
        return {"a2a": a2a.dumps(task), "events": 0}


async def test_following_a_task_picks_up_after_a_supervisor_restart() -> None:
    # The reloaded task waits for input again: it asks with no new event.
    link = _RestartedLink(["input_required"], [[]])
    got = [e async for e in follow(link, "t1", "c1", 40)]
    assert [e.status.state for e in got] == [TaskState.TASK_STATE_INPUT_REQUIRED]
    # The reloaded task runs on: its new events are read from the start.
    finished = ev.TaskFinished(task_id="t1", ts=1.0, state="completed", answer="the answer")
    link = _RestartedLink(["working", "completed"], [
        [], [ev.TaskStateChanged(task_id="t1", ts=0.5, state="working"), finished]])
    got = [e async for e in follow(link, "t1", "c1", 40)]
    assert link.cursors == [40, 0]
    assert [type(e).__name__ for e in got] == [
        "TaskStatusUpdateEvent", "TaskArtifactUpdateEvent", "TaskStatusUpdateEvent"]
    assert text(got[1].artifact) == "the answer"
    assert got[-1].status.state == TaskState.TASK_STATE_COMPLETED


def test_the_log_filter_keeps_the_servers_own_failures() -> None:
    """Only errors that are the client's to fix lose their tracebacks; a server's own failure
    (a store that can't be reached becomes an InternalError) keeps its record."""
    import logging
    import sys

    from a2a.utils.errors import InternalError, TaskNotFoundError

    from swarm.protocol.a2a_server.app import _QUIET

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("a2a", logging.ERROR, __file__, 1, "Agent execution failed",
                                 None, info)

    assert not _QUIET.filter(record(InvalidParamsError(message="bad gate")))
    assert not _QUIET.filter(record(TaskNotFoundError(message="no task")))
    assert _QUIET.filter(record(InternalError(message="StoreUnavailable: redis down")))
    assert _QUIET.filter(record(RuntimeError("a bug")))
