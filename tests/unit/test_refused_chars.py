"""Characters refused in what callers hand a swarm (`swarm._text`): NUL and the other C0 control
characters but tab, newline and carriage return, and lone surrogates. Each entry point refuses
them with a `UserError` naming the field and the character's index, and makes nothing; the A2A
server's answer (invalid params) is in test_a2a_server.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from swarm._text import check_chars, refused_char
from swarm.errors import UserError
from swarm.runtime.supervisor import TaskRecord
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.unit import durable_tools as dt
from tests.unit.test_approvals import _gate
from tests.unit.test_approvals import make_cfg as gated_cfg

CONTROL = "a control character"
REFUSED = [chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) not in "\t\n\r"]


@pytest.fixture(autouse=True)
def _reset() -> None:
    dt.reset()


@pytest.mark.parametrize("c", [*REFUSED, "\ud800", "\udfff"])
def test_nul_other_c0_and_c1_controls_and_lone_surrogates_are_refused(c: str) -> None:
    why = refused_char(f"ab{c}c{c}")
    assert why is not None and f"(U+{ord(c):04X}) at index 2" in why  # the first one
    assert (CONTROL if c < "\ud800" else "a lone surrogate") in why
    assert c not in why  # the message never carries the character itself


@pytest.mark.parametrize("text", ["tab\there", "lines\nand\r\n", "NBSP \xa0, soft hyphen \xad",
                                  "é ü ß", "emoji 😀 and U+2028 \u2028", ""])
def test_tab_newline_cr_and_other_characters_are_accepted(text: str) -> None:
    assert refused_char(text) is None
    check_chars(text, "task text")


def test_nested_strings_are_named_by_their_path() -> None:
    check_chars({"a": ["ok", {"b": "fine\n"}], "n": 1, "x": None}, "metadata")
    cases = [({"tags": ["ok", "x\x07"]}, 'metadata["tags"][1] has a control character (U+0007) '
                                         "at index 1"),
             ({"k\x00": 1}, 'metadata key "k\\u0000" has a control character (U+0000) at '
                            "index 1"),
             ({"a": {"b": "\ud800"}}, 'metadata["a"]["b"] has a lone surrogate (U+D800) at '
                                      "index 0"),
             # The first one in order is reported.
             ({"a": "x\x01", "b": "\x02"}, 'metadata["a"] has a control character (U+0001)')]
    for value, said in cases:
        with pytest.raises(UserError) as ei:
            check_chars(value, "metadata")
        assert str(ei.value).startswith(said), str(ei.value)


# ---- the supervisor's entry points ----------------------------------------------------------


SUBMISSIONS: list[tuple[dict[str, Any], str]] = [
    ({"text": "pay\x00 me"}, "task text has a control character (U+0000) at index 3"),
    ({"text": "pay \x1b[2J"}, "task text has a control character (U+001B) at index 4"),
    ({"text": "caf\udce9"}, "task text has a lone surrogate (U+DCE9) at index 3"),
    ({"user": "ca\x00rol"}, "user has a control character (U+0000) at index 2"),
    ({"metadata": {"tags": ["ok", "x\x07"]}},
     'metadata["tags"][1] has a control character (U+0007) at index 1'),
    ({"metadata": {"k\x00": "v"}}, 'metadata key "k\\u0000" has a control character'),
    ({"metadata": {"k": "\ud800"}}, 'metadata["k"] has a lone surrogate (U+D800) at index 0'),
    ({"context_id": "ctx\x00"}, "context_id has a control character (U+0000) at index 3"),
    ({"message_id": "m\x9bm\x08"}, "message_id has a control character (U+009B) at index 1"),
    ({"task_id": "task-0001\x00"}, "task_id has a control character (U+0000) at index 9"),
]


@pytest.mark.parametrize(("kw", "said"), SUBMISSIONS)
async def test_a_submission_with_a_refused_character_makes_no_task(
        tmp_path: Path, kw: dict[str, Any], said: str) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(gated_cfg(tmp_path), store=store) as sw:
        with pytest.raises(UserError) as ei:
            await sw.supervisor.submit(kw.pop("text", "pay me"), **kw)
        assert str(ei.value).startswith(said), str(ei.value)
        assert sw.supervisor.tasks == {}
        assert await store.list_tasks(sw.supervisor.swarm_id) == []
    assert dt.RUNS == {}


async def test_submit_many_refuses_the_whole_batch_naming_the_text(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(gated_cfg(tmp_path), store=store) as sw:
        with pytest.raises(UserError, match=r"^submit_many: text 1: task text has a control "
                                            r"character \(U\+0000\) at index 1"):
            await sw.supervisor.submit_many(["fine", "b\x00"])
        with pytest.raises(UserError, match=r"^user has a control character \(U\+001B\)"):
            await sw.supervisor.submit_many(["fine"], user="\x1b")
        assert sw.supervisor.tasks == {}
        assert await store.list_tasks(sw.supervisor.swarm_id) == []


async def test_tab_newline_and_cr_go_through_and_come_back_from_the_store(
        tmp_path: Path) -> None:
    text, user = "pay\tme\r\nnow", "carol\tsmith"
    store = MemoryCheckpointer()
    async with LocalSwarm(gated_cfg(tmp_path), store=store) as sw:
        task_id = await sw.supervisor.submit(text, user=user, metadata={"note": "a\nb"})
        await sw.supervisor.cancel(task_id)
    row = await store.get_task(task_id)
    assert row is not None
    back = TaskRecord.from_row(row)
    assert (back.text, back.user, back.summary()["metadata"]["note"]) == (text, user, "a\nb")


async def test_answers_and_decisions_with_a_refused_character_leave_the_task_waiting(
        tmp_path: Path) -> None:
    async with LocalSwarm(gated_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        sup = sw.supervisor
        task_id = await sup.submit("x")
        gid = (await _gate(sw, task_id))["gate"]
        for decide, said in [
                (lambda: sup.approve(task_id, gid, approver="al\x00ice"),
                 "the approver's name has a control character (U+0000) at index 2"),
                (lambda: sup.deny(task_id, gid, approver="alice", reason="no \x1b[2J"),
                 "reason has a control character (U+001B) at index 3"),
                (lambda: sup.approve(task_id, gid, approver="alice", args={"key": "x\x00"}),
                 'arguments["key"] has a control character (U+0000) at index 1'),
                (lambda: sup.approve(task_id, gid, approver="alice",
                                     args='{"key": "x\\u0000"}'),
                 'arguments["key"] has a control character (U+0000) at index 1')]:
            with pytest.raises(UserError) as ei:
                await decide()
            assert str(ei.value).startswith(said), str(ei.value)
        rec = sup.get(task_id)
        assert rec.state == "input_required" and list(rec.gates) == [gid]
        assert dt.RUNS == {"x-1": 1}  # the payment still waits
        await sup.approve(task_id, gid, approver="alice")
        row = await sup.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == "done: paid x-2"


async def test_an_answer_with_a_refused_character_is_refused_and_the_question_stays(
        tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    cfg = dt.swarm_config(tmp_path, [
        {"when": {"agent": "a", "last_role": "user"},
         "tool_calls": [{"name": "pay", "arguments": {"key": "{{ task }}"}}]},
        {"when": {"agent": "a"}, "content": "done: {{ last }}"}], name="ask")
    dt.HOLD["q"], dt.ENTERED["q"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("q")
        await asyncio.wait_for(dt.ENTERED["q"].wait(), 10)
        await sw.crash()  # in the payment: the resumed turn asks rerun or skip
    dt.HOLD.clear()
    async with LocalSwarm(cfg, store=store) as sw2:
        await sw2.supervisor.load()
        rec = sw2.supervisor.get(task_id)
        while rec.answer_waiter is None:
            await asyncio.wait_for(rec.watch().wait(), 10)
        with pytest.raises(UserError, match=r"^answer has a control character \(U\+0000\) at "
                                            r"index 4"):
            await sw2.supervisor.respond(task_id, "skip\x00")
        assert rec.state == "input_required" and rec.answer_waiter is not None
        await sw2.supervisor.respond(task_id, "skip")
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed"


async def test_a_fork_for_a_user_with_a_refused_character_makes_no_task(
        tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(gated_cfg(tmp_path, require="none"), store=store) as sw:
        row = await sw.run("f")
        with pytest.raises(UserError, match=r"^user has a control character \(U\+0000\)"):
            await sw.supervisor.fork(row["task_id"], 1, user="\x00")
        assert list(sw.supervisor.tasks) == [row["task_id"]]


# ---- the CLI and the MCP server's own checks -------------------------------------------------


def test_swarm_run_refuses_before_starting_anything() -> None:
    from swarm.cli import app

    runner = CliRunner()
    for args, said in [(["--task", "a\x1b]0;title\x07"],
                        "task text has a control character (U+001B) at index 1"),
                       (["--user", "b\x00b"], "user has a control character (U+0000)")]:
        res = runner.invoke(app, ["run", "configs/research.yaml", *args])
        assert res.exit_code == 2, res.output
        assert said in res.output and "\x1b" not in res.output
        assert isinstance(res.exception, SystemExit)


async def test_the_mcp_server_refuses_the_text_before_calling_the_swarm() -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from swarm.protocol.mcp_server import _Swarm

    sw = _Swarm("nowhere", None, None, 1.0)  # no swarm: a call would fail otherwise
    with pytest.raises(ToolError, match=r"^task text has a control character \(U\+0000\) at "
                                        r"index 2"):
        await sw.check_text("ab\x00")
