"""A task's metadata leaves the supervisor as the plain JSON its submitter gave: in summaries,
waits, listings and rows, after a restart, in a fork, through the client's `TaskInfo` and
`swarm tasks --json`, and in the A2A server's view of the task.

The A2A task keeps metadata as a protobuf Struct (nested values as Struct and ListValue
objects, every number a double); what leaves as plain data must be plain, and an int must stay
an int (a float a float)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import swarm.client
from swarm.cli import app
from swarm.client import TaskInfo
from swarm.errors import UserError
from swarm.protocol import a2a
from swarm.protocol.a2a_server.bridge import LocalLink
from swarm.runtime.supervisor import Supervisor, TaskRecord
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.unit.test_runtime_local import make_cfg

META: dict[str, Any] = {
    "ticket": 7, "ratio": 0.5, "whole": 2.0, "big": 2**60 + 1, "neg": -3, "flag": False,
    "none": None, "text": "naïve ✓",
    "tags": ["a", 1, 2.5, None, True, {"deep": [1, {"n": 3, "f": 3.0}]}, [], [[0]]],
    "nested": {"x": {"y": [[], {}], "z": 0}, "empty": {}},
}
WANT = {**META, "user": "ana"}


def _same(got: Any, want: Any) -> None:
    """`got` is plain JSON data equal to `want`, ints as ints and floats as floats (JSON text
    tells 2 from 2.0, and a protobuf object is no JSON at all)."""
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def _cfg(tmp_path: Path, **extra: Any) -> Any:
    return make_cfg(tmp_path, [{"when": {}, "content": "done"}], {"a": {"model": "m"}}, **extra)


async def test_metadata_comes_back_as_submitted_from_every_call(tmp_path: Path) -> None:
    store = MemoryCheckpointer()
    sent = copy.deepcopy(META)
    async with LocalSwarm(_cfg(tmp_path), store=store) as sw:
        sup = sw.supervisor
        task_id = await sup.submit("hi", user="ana", metadata=sent)
        sent["tags"].append("changed later")  # the caller's dict is not the task's
        sent["nested"]["x"]["z"] = 1
        row = await sup.wait(task_id, 30)
        assert row["state"] == "completed"
        _same(row["metadata"], WANT)
        _same((await sup.wait_many([task_id], 30))[0]["metadata"], WANT)
        _same(sup.list()[0]["metadata"], WANT)
        _same((await sup.cancel(task_id))["metadata"], WANT)  # finished: its summary
        sup.get(task_id).summary()["metadata"]["tags"].append("a reader's")  # a copy
        _same(sup.get(task_id).summary()["metadata"], WANT)
        # What the client builds from a row (TaskHandle.status, SwarmClient.tasks, wait).
        _same(TaskInfo.from_summary(row).metadata, WANT)
        # The A2A server's snapshot of the task (its row is the summary).
        snap = await LocalLink(sup).snapshot(task_id)
        assert snap is not None
        _same(snap.row["metadata"], WANT)
        # The stored row, as a restarted supervisor or a read by id rebuilds it.
        stored = await store.get_task(task_id)
        assert stored is not None
        _same(TaskRecord.from_row(stored).summary()["metadata"], WANT)
        # A fork starts with the same metadata, and says what it was forked from.
        forked = await sup.wait(await sup.fork(task_id, 0), 30)
        _same(forked["metadata"], {**WANT, "forked_from": task_id, "forked_at_step": 0})
    async with LocalSwarm(_cfg(tmp_path), store=store) as sw2:
        sup2: Supervisor = sw2.supervisor
        assert await sup2.load() == 0  # both finished: loaded, nothing to resume
        _same((await sup2.wait(task_id, 30))["metadata"], WANT)
        _same({r["task_id"]: r for r in sup2.list()}[task_id]["metadata"], WANT)


async def test_metadata_of_plain_strings_is_not_kept_twice(tmp_path: Path) -> None:
    """The usual metadata (strings, booleans, nulls) comes back exactly from the A2A task's
    Struct: the record keeps no JSON text of it, and its row stores none."""
    async with LocalSwarm(_cfg(tmp_path), store=MemoryCheckpointer()) as sw:
        task_id = await sw.supervisor.submit("hi", user="ana",
                                             metadata={"ticket": "T-1", "vip": True, "x": None})
        row = await sw.supervisor.wait(task_id, 30)
        rec = sw.supervisor.get(task_id)
    _same(row["metadata"], {"ticket": "T-1", "vip": True, "x": None, "user": "ana"})
    assert rec.meta_json is None and "metadata" not in rec.to_row("t").data


def test_metadata_the_supervisor_adds_keeps_the_rest_exact() -> None:
    """`budget_exhausted` (set as a task ends cut short) joins the metadata on the A2A task
    and in what leaves as plain data, which stays exact."""
    first = a2a.text_message("hi", role="user", task_id="task-0003", context_id="ctx-3")
    for meta in ({"user": "ana", "n": 1, "l": [1, 2.0]}, {"user": "ana"}):
        rec = TaskRecord(_task=a2a.new_task("task-0003", "ctx-3", first, meta), user="ana",
                         created=1.0)
        rec.meta_json = json.dumps(meta) if "n" in meta else None
        rec.set_metadata("budget_exhausted", "task max_steps (3)")
        rec.set_metadata("steps", 3)
        want = {**meta, "budget_exhausted": "task max_steps (3)", "steps": 3}
        _same(rec.summary()["metadata"], want)
        _same(TaskRecord.from_row(rec.to_row("s")).summary()["metadata"], want)
        assert rec.task.metadata["budget_exhausted"] == "task max_steps (3)"


def test_a_row_stored_before_metadata_was_kept_as_json_reads_plain() -> None:
    """A row without the JSON text (stored by an earlier version) reads its metadata from the
    A2A task: plain data, numbers as the Struct holds them (doubles)."""
    first = a2a.text_message("hi", role="user", task_id="task-0004", context_id="ctx-4")
    rec = TaskRecord(_task=a2a.new_task("task-0004", "ctx-4", first,
                                        {"user": "ana", "n": 1, "l": [1, {"d": [True]}]}),
                     user="ana", created=1.0)
    row = rec.to_row("s")
    assert "metadata" not in row.data
    _same(TaskRecord.from_row(row).summary()["metadata"],
          {"user": "ana", "n": 1.0, "l": [1.0, {"d": [True]}]})


class _Client:
    """`swarm.connect(...)` for the CLI: `tasks` answers from an in-process supervisor, with
    the client's own `TaskInfo` rows."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def tasks(self, state: str | None = None, user: str | None = None) -> list[TaskInfo]:
        return [TaskInfo.from_summary(r) for r in self.sup.list(state, user)]


async def test_swarm_tasks_json_prints_the_metadata(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async with LocalSwarm(_cfg(tmp_path)) as sw:
        task_id = await sw.supervisor.submit("hi", user="ana", metadata=META)
        await sw.supervisor.wait(task_id, 30)
        monkeypatch.setattr(swarm.client, "connect",
                            lambda name, address=None: _Client(sw.supervisor))
        res = CliRunner().invoke(app, ["tasks", "s", "--json"])
    assert res.exit_code == 0, (res.output, res.exception)
    (row,) = json.loads(res.output)
    assert row["task_id"] == task_id and row["state"] == "completed"
    _same(row["metadata"], WANT)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1, {"x": float("-inf")}]])
async def test_metadata_with_a_number_json_has_not_is_refused(tmp_path: Path, value: Any) -> None:
    """NaN and the infinities are no JSON (json.dumps writes them, as no JSON reader takes
    them), and a protobuf Struct holding one can't be written as JSON: the A2A server's
    GetTask and ListTasks failed on such a task. A submission with one is refused."""
    async with LocalSwarm(_cfg(tmp_path)) as sw:
        with pytest.raises(UserError, match="metadata must be JSON-serialisable: Out of range"):
            await sw.supervisor.submit("hi", metadata={"ticket": 1, "x": value})
        assert sw.supervisor.tasks == {}


async def test_a_user_label_or_metadata_too_large_is_refused(tmp_path: Path) -> None:
    """A label and the task's metadata go into every row, listing and audit entry of the task:
    a megabyte of either is refused with its size, and nothing is made."""
    async with LocalSwarm(_cfg(tmp_path)) as sw:
        with pytest.raises(UserError, match="user is 257 characters; at most 256"):
            await sw.supervisor.submit("hi", user="u" * 257)
        with pytest.raises(UserError, match=r"metadata is about 2000\d+ characters as JSON; a "
                                            r"task's metadata may be at most 65536"):
            await sw.supervisor.submit("hi", metadata={"k": "v" * 2_000_000})
        with pytest.raises(UserError, match="user is 257 characters"):
            await sw.supervisor.submit_many(["a", "b"], user="u" * 257)
        with pytest.raises(UserError, match=r"metadata is about 700\d\d characters"):
            await sw.supervisor.submit("hi", metadata={"k": ["v" * 70_000]})  # kept as JSON
        assert sw.supervisor.tasks == {}
        task_id = await sw.supervisor.submit("hi", user="u" * 256, metadata={"k": "v" * 60_000})
        assert (await sw.supervisor.wait(task_id, 30))["state"] == "completed"


def test_client_calls_with_wrong_argument_types_name_what_was_wrong() -> None:
    """Checked in the client, before any call goes out."""
    from swarm.client import SwarmClient, TaskHandle

    handle = TaskHandle(None, "t-1")  # type: ignore[arg-type]
    assert handle.task_id == handle.id == "t-1"  # as rows name it
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, not str"):
        handle.result(timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be 0 or more seconds, not -1"):
        handle.wait(timeout=-1)
    with pytest.raises(TypeError, match="timeout must be a number"):
        next(handle.events(timeout=True))  # type: ignore[arg-type]
    client = SwarmClient.__new__(SwarmClient)
    with pytest.raises(TypeError, match="submit_many: text 1 is int, not a string"):
        client.submit_many(["ok", 5, "ok"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"takes a list of task texts \(strings\), not NoneType"):
        client.submit_many(None)  # type: ignore[arg-type]
