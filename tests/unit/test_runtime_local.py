"""The step loop and the supervisor in one process (no Ray), driven by scripted policies."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.config import parse_config
from swarm.errors import UserError
from swarm.events import Handoff, ModelCalled, StepFinished, StepStarted, TaskFinished, ToolCalled
from swarm.protocol import a2a
from swarm.state.interface import StoreUnavailable
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm

FAILED_TOOL = {"when": {"last_tool_error": True}, "content": "gave up: {{ last }}"}


def make_cfg(
    tmp_path: Path, rules: list[dict[str, Any]], agents: dict[str, Any], **extra: Any
) -> Any:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": rules}))
    data: dict[str, Any] = {
        "name": "t",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
        "tools": {
            "fn": {
                "python": [
                    "swarm.examples.tools:echo",
                    "swarm.examples.tools:fail",
                    "swarm.examples.tools:slow",
                ]
            },
            "other": {"python": ["swarm.examples.tools:word_count"]},
        },
        "agents": agents,
        "supervisor": {"entry": next(iter(agents))},
    }
    data.update(extra)
    return parse_config(data, base_dir=tmp_path)


LOOP_RULES = [
    FAILED_TOOL,
    {
        "when": {"agent": "looper", "called": {"echo": {"max": 2}}},
        "tool_calls": [{"name": "echo", "arguments": {"text": "ping {{ task }}"}}],
    },
    {"when": {"agent": "looper"}, "content": "echoed: {{ results.echo }}"},
]


async def test_step_loop_runs_tools_and_answers(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("hello")
        assert row["state"] == "completed", row
        assert row["answer"] == "echoed: ping hello"
        assert row["steps"] == 4  # three echo steps and the answer
        evs = sw.events(row["task_id"])
        kinds = [type(e).__name__ for e in evs]
        assert kinds.count("StepStarted") == 4 and kinds.count("StepFinished") == 4
        tools = [e for e in evs if isinstance(e, ToolCalled)]
        assert [t.outcome for t in tools] == ["ok"] * 3
        models = [e for e in evs if isinstance(e, ModelCalled)]
        assert all(m.input_tokens > 0 for m in models)
        assert isinstance(evs[-1], TaskFinished) and evs[-1].state == "completed"
        assert [e.seq for e in evs] == list(range(len(evs)))
        # Each step's events come in order: started, model, tools, finished.
        first = [e for e in evs if getattr(e, "step", None) == 1]
        assert [type(e) for e in first] == [StepStarted, ModelCalled, ToolCalled, StepFinished]


async def test_a_finished_tasks_events_are_kept_packed_and_read_back_whole(tmp_path: Path
                                                                          ) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("hello")
        tid = row["task_id"]
        rec = sw.supervisor.get(tid)
        assert rec._packed is not None and rec._events == []  # compacted at the finish
        evs, done = await sw.supervisor.events(tid, 0, 0.0)
        assert done and len(evs) == rec.event_count > 10
        assert [e.seq for e in evs] == list(range(len(evs)))
        assert isinstance(evs[-1], TaskFinished)
        tail, _ = await sw.supervisor.events(tid, rec.event_count - 2, 0.0)
        assert tail == evs[-2:]
        assert (await sw.supervisor.events(tid, rec.event_count, 0.0))[0] == []
        # A late batch from an agent still lands before TaskFinished.
        sw.supervisor.push_events([StepStarted(task_id=tid, ts=1.0, agent="looper", step=99)])
        after, _ = await sw.supervisor.events(tid, 0, 0.0)
        assert after[:-2] == evs[:-1] and isinstance(after[-1], TaskFinished)
        assert isinstance(after[-2], StepStarted) and after[-2].step == 99
        assert [e.seq for e in after] == list(range(len(after)))


@pytest.mark.parametrize(
    ("call", "error_class", "needle"),
    [
        ({"name": "nope", "arguments": {}}, "model", "unknown tool 'nope'"),
        ({"name": "echo", "raw_arguments": '{"text": oops'}, "model", "not a JSON object"),
        ({"name": "echo", "raw_arguments": "[1, 2]"}, "model", "expected an object, got an array"),
        ({"name": "fail", "raw_arguments": "null"}, "model", "expected an object, got null"),
        ({"name": "echo", "arguments": {"wrong": 1}}, "tool", "text"),
        ({"name": "fail", "arguments": {"message": "disk on fire"}}, "tool", "disk on fire"),
        # A tool of a server this agent isn't granted is not visible or callable: a policy error.
        ({"name": "word_count", "arguments": {"text": "a b"}}, "policy",
         "tool 'word_count' is not granted to agent 'a'"),
    ],
)
async def test_bad_tool_calls_go_back_to_the_model(
    tmp_path: Path, call: dict[str, Any], error_class: str, needle: str
) -> None:
    rules = [FAILED_TOOL, {"when": {"agent": "a", "last_role": "user"}, "tool_calls": [call]}]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        # The agent got the error as a tool result and answered; the task did not crash.
        assert row["state"] == "completed", row
        assert row["answer"].startswith("gave up: ERROR: ")
        assert needle in row["answer"]
        (tool,) = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        assert tool.outcome == "error" and tool.error_class == error_class


async def test_tool_timeout_is_a_tool_error(tmp_path: Path) -> None:
    rules = [
        FAILED_TOOL,
        {
            "when": {"last_role": "user"},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 5}}],
        },
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    cfg = cfg.model_copy(
        update={
            "tools": {**cfg.tools, "fn": cfg.tools["fn"].model_copy(update={"timeout_s": 0.05})}
        }
    )
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "completed"
        assert "timed out" in row["answer"] or "Timeout" in row["answer"]


HANDOFF_RULES = [
    {
        "when": {"agent": "a", "last_role": "user"},
        "tool_calls": [{"name": "echo", "arguments": {"text": "found {{ task }}"}}],
    },
    {
        "when": {"agent": "a", "last_tool": "echo"},
        "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "write it up"}}],
    },
    {"when": {"agent": "b"}, "content": "b says: {{ results.echo }} / {{ last_user }}"},
]


async def test_handoff_passes_the_transcript(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        HANDOFF_RULES,
        {"a": {"model": "m", "tools": ["fn"], "handoffs": ["b"]}, "b": {"model": "m"}},
    )
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("the facts", user="ana", metadata={"ticket": 7})
        assert row["state"] == "completed", row
        # b answered from a's tool result, which it saw in the transcript, and a's message.
        assert row["answer"] == "b says: found the facts / write it up"
        assert row["agent"] == "b" and row["user"] == "ana"
        assert row["metadata"]["ticket"] == 7
        (h,) = [e for e in sw.events(row["task_id"]) if isinstance(e, Handoff)]
        assert (h.agent, h.to_agent) == ("a", "b")
        task = sw.supervisor.get(row["task_id"]).task
        assert a2a.state_of(task) == "completed"
        assert task.artifacts[0].parts[0].text == row["answer"]
        # History: the user's task, then the A2A messages to and from each agent.
        texts = [a2a.message_text(m) for m in task.history]
        assert texts[0] == "the facts" and "write it up" in texts


@pytest.mark.parametrize(("call", "problem"), [
    ({"arguments": {}}, "missing required argument 'message' (what the next agent should do)"),
    ({"arguments": {"message": 5}}, "argument 'message' must be a string, got a number"),
    ({"arguments": {"message": "go", "why": "x"}},
     "unexpected argument 'why'; a handoff takes only 'message'"),
    ({"raw_arguments": "null"},
     "the arguments are not a JSON object: expected an object, got null"),
])
async def test_a_handoff_call_that_does_not_fit_its_schema_goes_back_to_the_model(
        tmp_path: Path, call: dict[str, Any], problem: str) -> None:
    rules = [FAILED_TOOL, {"when": {"agent": "a", "last_role": "user"},
                           "tool_calls": [{"name": "transfer_to_b", **call}]}]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "handoffs": ["b"]}, "b": {"model": "m"}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        evs = sw.events(row["task_id"])
    # No handoff: a saw the error as the call's result and answered.
    assert row["state"] == "completed" and row["agent"] == "a", row
    assert row["answer"].startswith(f"gave up: ERROR: no handoff to b: {problem}")
    assert not [e for e in evs if isinstance(e, Handoff)]
    (tool,) = [e for e in evs if isinstance(e, ToolCalled)]
    assert (tool.tool, tool.outcome, tool.error_class) == ("transfer_to_b", "error", "model")


async def test_handoff_ping_pong_is_bounded(tmp_path: Path) -> None:
    rules = [
        {
            "when": {"agent": "a"},
            "tool_calls": [{"name": "transfer_to_b", "arguments": {"message": "you"}}],
        },
        {
            "when": {"agent": "b"},
            "tool_calls": [{"name": "transfer_to_a", "arguments": {"message": "no, you"}}],
        },
    ]
    cfg = make_cfg(
        tmp_path,
        rules,
        {"a": {"model": "m", "handoffs": ["b"]}, "b": {"model": "m", "handoffs": ["a"]}},
        supervisor={"entry": "a", "max_handoffs": 5},
    )
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed"
        assert row["error_class"] == "orchestration" and "too many handoffs" in row["error"]


async def test_task_step_budget(tmp_path: Path) -> None:
    rules = [{"when": {}, "tool_calls": [{"name": "echo", "arguments": {"text": "again"}}]}]
    cfg = make_cfg(
        tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}},
        budgets={"task": {"max_steps": 7}, "on_exhausted": "fail"},
    )
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("loop forever")
        assert row["state"] == "failed" and row["error_class"] == "budget"
        assert row["steps"] == 7


async def test_parallel_fan_out_and_join(tmp_path: Path) -> None:
    rules = [
        {"when": {"agent": "x"}, "content": "x-part"},
        {"when": {"agent": "y"}, "content": "y-part"},
        {"when": {"agent": "j"}, "content": "joined[{{ last_user | replace('\n', ' ') }}]"},
    ]
    agents = {"x": {"model": "m"}, "y": {"model": "m"}, "j": {"model": "m"}}
    cfg = make_cfg(
        tmp_path,
        rules,
        agents,
        supervisor={"strategy": "parallel", "agents": ["x", "y"], "join": "j"},
    )
    async with LocalSwarm(cfg) as sw:
        answer = await sw.answer("both please")
        assert "Result from x" in answer and "x-part" in answer and "y-part" in answer


async def test_router_picks_agent(tmp_path: Path) -> None:
    rules = [
        {
            "when": {"agent": "router", "task_matches": "(?i)math"},
            "tool_calls": [{"name": "route_to", "arguments": {"agent": "calc"}}],
        },
        {
            "when": {"agent": "router"},
            "tool_calls": [{"name": "route_to", "arguments": {"agent": "chat"}}],
        },
        {"when": {"agent": "calc"}, "content": "calc handled it"},
        {"when": {"agent": "chat"}, "content": "chat handled it"},
    ]
    cfg = make_cfg(
        tmp_path,
        rules,
        {"calc": {"model": "m"}, "chat": {"model": "m"}},
        supervisor={"strategy": "router", "agents": ["calc", "chat"], "router_model": "m"},
    )
    async with LocalSwarm(cfg) as sw:
        assert await sw.answer("some math") == "calc handled it"
        assert await sw.answer("hello there") == "chat handled it"


async def test_bad_submissions_are_rejected(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        LOOP_RULES,
        {"looper": {"model": "m", "tools": ["fn"]}},
        limits={"max_task_chars": 10},
    )
    async with LocalSwarm(cfg) as sw:
        with pytest.raises(UserError, match="at most 10"):
            await sw.supervisor.submit("x" * 11)
        with pytest.raises(UserError, match="non-empty"):
            await sw.supervisor.submit("   ")
        with pytest.raises(UserError, match="JSON"):
            await sw.supervisor.submit("ok", metadata={"f": object()})
        with pytest.raises(UserError, match="unknown state"):
            sw.supervisor.list(state="bogus")
        # Wrong types, as a Python client or a peer may send them, named.
        with pytest.raises(UserError, match=r"metadata must be a dict .* not str"):
            await sw.supervisor.submit("ok", metadata="notadict")  # type: ignore[arg-type]
        with pytest.raises(UserError, match="metadata keys must be strings, not int"):
            await sw.supervisor.submit("ok", metadata={1: 2})  # type: ignore[dict-item]
        with pytest.raises(UserError, match=r"context_id must be a string .* not int"):
            await sw.supervisor.submit("ok", context_id=5)  # type: ignore[arg-type]
        with pytest.raises(UserError, match="task_id must be a string"):
            await sw.supervisor.submit("ok", task_id=12345678)  # type: ignore[arg-type]
        # Nothing was stored for the rejected submissions, and the swarm still works.
        assert sw.supervisor.tasks == {}
        assert (await sw.answer("hi")).startswith("echoed")


async def test_a_turn_that_ends_the_task_leaves_its_messages_out_when_asked(
        tmp_path: Path) -> None:
    # A supervisor with a durable store drops a finished task's transcript, so it asks agents
    # not to send the messages of a turn that ends the task; a handoff's always come back.
    from swarm.runtime.agent import TurnRequest

    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        host = sw.hosts["looper"]

        def req(task_id: str, added_at_end: bool) -> TurnRequest:
            msg = a2a.dumps(a2a.text_message("hi", role="user", task_id=task_id))
            return TurnRequest(task_id=task_id, context_id=task_id, message=msg, transcript=[],
                               step_offset=0, max_steps=10, log_id=task_id, turn_id="0",
                               added_at_end=added_at_end)

        kept = await host.run_turn(req("turn-kept-1", True))
        left = await host.run_turn(req("turn-left-1", False))
        assert kept.kind == left.kind == "final" and kept.text == left.text
        assert len(kept.added) == 1 + 2 * 3 + 1 and left.added == []  # 3 echo steps, answer
        assert (left.steps, left.model_calls, left.tool_calls) == (4, 4, 3)
        # The supervisor asks for them only without a durable store; either way the task's
        # answer and its history are whole.
        asked: list[bool] = []
        run_turn = host.run_turn

        async def spy(r: TurnRequest) -> Any:
            asked.append(r.added_at_end)
            return await run_turn(r)

        host.run_turn = spy  # type: ignore[method-assign]
        row = await sw.run("hi")
        assert asked == [False]
        assert row["answer"] == "echoed: ping hi"
        kinds = [h["kind"] for h in await sw.supervisor.history(row["task_id"])]
        assert kinds == ["turn_start", *["model", "tool"] * 3, "model", "turn_end"], kinds


class _HeldRows(MemoryCheckpointer):
    """Holds new-task rows until `release`: those of the ids in `hold`, or every one if
    `hold` is None; sets `held` once `want` of them wait at once. Refuses the rows of the ids
    in `refuse`, and counts each id's new-task writes."""

    def __init__(self, hold: set[str] | None = None, want: int = 1) -> None:
        super().__init__()
        self.hold, self.want, self.waiting = hold, want, 0
        self.held, self.release = asyncio.Event(), asyncio.Event()
        self.refuse: set[str] = set()
        self.writes: dict[str, int] = {}

    async def put_task(self, row: Any) -> None:
        if row.state == "submitted":
            self.writes[row.task_id] = self.writes.get(row.task_id, 0) + 1
            if self.hold is None or row.task_id in self.hold:
                self.waiting += 1
                if self.waiting >= self.want:
                    self.held.set()
                await self.release.wait()
                self.waiting -= 1
            if row.task_id in self.refuse:
                raise StoreUnavailable(f"row of {row.task_id} refused")
        await super().put_task(row)


async def test_submit_many_stores_the_batch_together_and_starts_what_was_stored(
        tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    store = _HeldRows(want=3)
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        ids = [f"batch-task-{i}" for i in range(3)]
        store.refuse = {ids[1]}
        call = asyncio.ensure_future(sup.submit_many(["a", "b", "c"], task_ids=ids))
        # All three rows are being written at once, not one after the other.
        await asyncio.wait_for(store.held.wait(), 10)
        assert sup.tasks == {}  # nothing is acknowledged before its row is stored
        store.release.set()
        with pytest.raises(StoreUnavailable, match=f"row of {ids[1]} refused") as err:
            await call
        assert "1 of 3 new tasks could not be stored" in "".join(err.value.__notes__)
        assert sorted(sup.tasks) == [ids[0], ids[2]]
        # The same call again makes only the missing task; the others are not made twice.
        store.refuse = set()
        assert await sup.submit_many(["a", "b", "c"], task_ids=ids) == ids
        rows = [await sup.wait(t, 10) for t in ids]
        assert [r["answer"] for r in rows] == [f"echoed: ping {t}" for t in "abc"]
        assert sorted(store.rows) == sorted(ids)


async def test_a_retry_sent_while_the_first_submission_is_stored_makes_one_task(
        tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    store = _HeldRows()
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        first = asyncio.ensure_future(sup.submit("a", task_id="retried-task-1"))
        await asyncio.wait_for(store.held.wait(), 10)  # its row is being written
        again = asyncio.ensure_future(sup.submit("a", task_id="retried-task-1"))
        batch = asyncio.ensure_future(sup.submit_many(["a"], task_ids=["retried-task-1"]))
        with pytest.raises(UserError, match="already exists"):  # another text: refused
            await sup.submit("b", task_id="retried-task-1")
        await asyncio.sleep(0)  # one turn of the loop: both reach their wait
        assert not again.done() and not batch.done()  # they wait for the first write
        assert "retried-task-1" not in sup.tasks
        store.release.set()
        assert await asyncio.wait_for(first, 10) == await asyncio.wait_for(again, 10) == \
            "retried-task-1"
        assert await asyncio.wait_for(batch, 10) == ["retried-task-1"]
        assert list(sup.tasks) == ["retried-task-1"] and store.waiting == 0
        assert (await sup.wait("retried-task-1", 10))["answer"] == "echoed: ping a"
        # A retry of a submission whose write failed gets that failure, not a task.
        store.release.clear()
        store.held.clear()
        store.refuse = {"refused-task-1"}
        first = asyncio.ensure_future(sup.submit("c", task_id="refused-task-1"))
        await asyncio.wait_for(store.held.wait(), 10)
        again = asyncio.ensure_future(sup.submit("c", task_id="refused-task-1"))
        store.release.set()
        for call in (first, again):
            with pytest.raises(StoreUnavailable, match="refused"):
                await asyncio.wait_for(call, 10)
        assert "refused-task-1" not in sup.tasks
        # A retry of a submission cancelled while its write was held is told so, not left
        # waiting for an outcome nobody will report.
        store.release.clear()
        store.held.clear()
        first = asyncio.ensure_future(sup.submit_many(["d"], task_ids=["cancelled-task-1"]))
        await asyncio.wait_for(store.held.wait(), 10)
        again = asyncio.ensure_future(sup.submit("d", task_id="cancelled-task-1"))
        await asyncio.sleep(0)  # the retry reaches its wait
        first.cancel()
        with pytest.raises(StoreUnavailable, match="cancelled-task-1 was interrupted"):
            await asyncio.wait_for(again, 10)
        assert sup._storing == {}
        store.release.set()


async def test_submit_many_starts_each_chunk_once_its_rows_are_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from swarm.runtime import supervisor as supervisor_module

    monkeypatch.setattr(supervisor_module, "_SUBMIT_CHUNK", 2)
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    ids = [f"chunked-task-{i}" for i in range(5)]
    store = _HeldRows(hold={ids[2]})  # the second chunk's first row
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        call = asyncio.ensure_future(sup.submit_many(list("abcde"), task_ids=ids))
        await asyncio.wait_for(store.held.wait(), 10)
        # The first chunk runs while the second's rows are written; the rest are not made yet.
        assert sorted(sup.tasks) == ids[:2]
        assert (await sup.wait(ids[0], 10))["answer"] == "echoed: ping a"
        assert not call.done()
        # A task of a chunk not yet written is marked as being stored from the start, so a
        # retry meanwhile waits for this call instead of making it again.
        assert ids[4] in sup._storing and ids[4] not in store.writes
        again = asyncio.ensure_future(sup.submit("e", task_id=ids[4]))
        await asyncio.sleep(0)  # one turn of the loop: the retry reaches its wait
        assert not again.done() and ids[4] not in sup.tasks
        store.release.set()
        assert await asyncio.wait_for(call, 10) == ids
        assert await asyncio.wait_for(again, 10) == ids[4]
        rows = await sup.wait_many(ids, 10)
        assert [r["answer"] for r in rows] == [f"echoed: ping {t}" for t in "abcde"]
        assert store.writes == dict.fromkeys(ids, 1) and sup._storing == {}

        # Cancelled while a middle chunk is written: the tasks stored go on, a retry of one
        # in a chunk never reached hears that its storing was interrupted, and nothing is
        # left marked as being stored.
        late = [f"cut-task-{i}" for i in range(6)]
        store.hold, store.release = {late[2]}, asyncio.Event()
        store.held.clear()
        call = asyncio.ensure_future(sup.submit_many(list("fghijk"), task_ids=late))
        await asyncio.wait_for(store.held.wait(), 10)
        again = asyncio.ensure_future(sup.submit("k", task_id=late[5]))
        await asyncio.sleep(0)
        assert not again.done()
        call.cancel()
        with pytest.raises(StoreUnavailable, match=f"{late[5]} was interrupted"):
            await asyncio.wait_for(again, 10)
        assert sup._storing == {}
        assert (await sup.wait(late[1], 10))["answer"] == "echoed: ping g"
        assert not set(late[2:]) & set(sup.tasks) and late[5] not in store.writes
        store.release.set()

        # A chunk none of whose rows is stored (the store is down) ends the call: the
        # chunks after it are not tried, and their tasks fail with the same error.
        down = [f"down-task-{i}" for i in range(6)]
        store.hold, store.refuse = set(), set(down[2:4])
        with pytest.raises(StoreUnavailable, match="refused") as err:
            await sup.submit_many(list("lmnopq"), task_ids=down)
        assert "4 of 6 new tasks could not be stored" in "".join(err.value.__notes__)
        assert [t for t in down if t in sup.tasks] == down[:2]
        assert not set(down[4:]) & set(store.writes) and sup._storing == {}
        # Once the store takes them, the same call makes the missing ones only.
        store.refuse = set()
        assert await sup.submit_many(list("lmnopq"), task_ids=down) == down
        assert {t: store.writes[t] for t in down} == \
            dict.fromkeys(down, 1) | {down[2]: 2, down[3]: 2}  # refused once, then stored
        rows = await sup.wait_many(down, 10)
        assert [r["answer"] for r in rows] == [f"echoed: ping {t}" for t in "lmnopq"]


async def test_tasks_being_stored_count_against_max_tasks(tmp_path: Path) -> None:
    rules = [{"when": {"last_role": "user"},
              "tool_calls": [{"name": "slow", "arguments": {"seconds": 20}}]},
             {"when": {}, "content": "done"}]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}},
                   limits={"max_tasks": 2})
    store = _HeldRows(hold={"held-task-1"})
    async with LocalSwarm(cfg, store=store) as sw:
        sup = sw.supervisor
        held = asyncio.ensure_future(sup.submit("a", task_id="held-task-1"))
        await asyncio.wait_for(store.held.wait(), 10)
        running = await sup.submit("b")
        with pytest.raises(UserError, match=re.escape("2 unfinished tasks; limits.max_tasks is 2")):
            await sup.submit("c")  # the one whose row is being written counts
        store.release.set()
        assert await asyncio.wait_for(held, 10) == "held-task-1"
        assert sorted(sup.tasks) == sorted(["held-task-1", running])
        for t in list(sup.tasks):
            await sup.cancel(t)


async def test_a_full_table_drops_a_tenth_of_it_at_once(tmp_path: Path) -> None:
    """With no durable store, finished tasks stay in the table until limits.max_tasks; then
    the oldest finished ones go, down to a tenth below the limit, so the next tenth of the
    submissions don't look through the table again."""
    cfg = make_cfg(tmp_path, [{"when": {}, "content": "done"}], {"a": {"model": "m"}},
                   limits={"max_tasks": 20})
    async with LocalSwarm(cfg) as sw:
        sup = sw.supervisor
        assert sup.store is None
        ids = [(await sw.run(f"t{i}"))["task_id"] for i in range(20)]
        assert list(sup.tasks) == ids
        ids.append((await sw.run("t20"))["task_id"])
        # 20 in the table: the 3 oldest went (17 left), then the new one came in.
        assert list(sup.tasks) == ids[3:] and len(sup.tasks) == 18
        for i in (21, 22):
            ids.append((await sw.run(f"t{i}"))["task_id"])
        assert list(sup.tasks) == ids[3:]  # no eviction until the table is full again


async def test_submit_many_checks_the_whole_batch_before_making_a_task(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}},
                   limits={"max_tasks": 3})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        sup = sw.supervisor
        with pytest.raises(UserError, match=r"text 1: .*non-empty"):
            await sup.submit_many(["fine", " "])
        with pytest.raises(UserError, match="already exists"):
            await sup.submit_many(["a", "b"], task_ids=["same-id-1", "same-id-1"])
        with pytest.raises(UserError, match=re.escape("3 unfinished tasks; limits.max_tasks is 3")):
            await sup.submit_many(["a", "b", "c", "d"])
        with pytest.raises(UserError, match="2 texts but 1 task ids"):
            await sup.submit_many(["a", "b"], task_ids=["only-one-id"])
        assert sup.tasks == {}
        # The same text under the same id twice in a batch is one task (a client's retry).
        assert await sup.submit_many(["x", "x"], task_ids=["twice-id-1", "twice-id-1"]) == \
            ["twice-id-1", "twice-id-1"]
        assert list(sup.tasks) == ["twice-id-1"]
        assert (await sup.wait("twice-id-1", 10))["state"] == "completed"


async def test_wait_many_returns_rows_in_order_at_the_deadline_or_when_all_ended(
        tmp_path: Path) -> None:
    from swarm.errors import TaskNotFound

    rules = [
        {"when": {"task_matches": "slow", "last_role": "user"},
         "tool_calls": [{"name": "slow", "arguments": {"seconds": 20}}]},
        {"when": {"last_role": "user"},
         "tool_calls": [{"name": "echo", "arguments": {"text": "{{ task }}"}}]},
        {"when": {}, "content": "done {{ last }}"},
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        sup = sw.supervisor
        slow = await sup.submit("slow one")
        fast = await sup.submit_many([f"fast {i}" for i in range(3)])
        rows = await sup.wait_many(fast, 10)  # all end: the rows, in the order asked
        assert [r["task_id"] for r in rows] == fast
        assert [r["answer"] for r in rows] == [f"done fast {i}" for i in range(3)]
        # One still running: the call returns at its deadline with every row as it is.
        rows = await sup.wait_many([fast[1], slow, fast[0]], 0.2)
        assert [r["task_id"] for r in rows] == [fast[1], slow, fast[0]]
        assert [r["state"] for r in rows] == ["completed", "working", "completed"]
        with pytest.raises(TaskNotFound):
            await sup.wait_many([fast[0], "no-such-task-1"], 10)
        await sup.cancel(slow)
        assert (await sup.wait_many([slow], None))[0]["state"] == "canceled"


async def test_hot_snapshots_are_held_while_their_task_runs_and_dropped_when_it_ends(
        tmp_path: Path) -> None:
    rules = [
        {"when": {"last_role": "user"},
         "tool_calls": [{"name": "slow", "arguments": {"seconds": 20}}]},
        {"when": {}, "content": "done"},
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        sup = sw.supervisor
        slow, other = await sup.submit_many(["slow one", "slow two"])
        slashed = await sup.submit("slow three", task_id="team/ticket-7")
        made: list[str] = []

        def ref(name: str) -> Any:
            return lambda: made.append(name) or name

        assert not sup.hold_hot("no-such-task-1", 1, ref("unknown"))
        assert sup.hold_hot(slow, 5, ref("ref-5")) and sup.hold_hot(f"{slow}/a", 2, ref("sub"))
        assert sup.hold_hot(other, 1, ref("ref-other"))
        assert not sup.hold_hot(slow, 4, ref("ref-4"))  # older than the one held
        assert sup.hot[slow] == (5, ["ref-5"])
        assert sup.hold_hot(slow, 7, ref("ref-7")) and sup.hot[slow] == (7, ["ref-7"])
        # A task id with a "/" in it, and a branch of it.
        assert sup.hold_hot(slashed, 1, ref("slashed"))
        assert sup.hold_hot(f"{slashed}/a", 1, ref("slashed-branch"))
        # Only the snapshots held were put in the object store.
        assert made == ["ref-5", "sub", "ref-other", "ref-7", "slashed", "slashed-branch"]
        await sup.cancel(slow)
        # The ended task's snapshots, its branch's included, are gone; the others stay.
        assert sup.hot == {other: (1, ["ref-other"]), slashed: (1, ["slashed"]),
                           f"{slashed}/a": (1, ["slashed-branch"])}
        assert not sup.hold_hot(slow, 9, ref("ref-9"))  # nothing resumes an ended task
        for t in (other, slashed):
            await sup.cancel(t)
        assert sup.hot == {} and "ref-9" not in made


async def test_cancel_leaves_other_tasks_alone(tmp_path: Path) -> None:
    rules = [
        {
            "when": {"task_matches": "slow", "last_role": "user"},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 20}}],
        },
        {
            "when": {"last_role": "user"},
            "tool_calls": [{"name": "echo", "arguments": {"text": "{{ task }}"}}],
        },
        {"when": {}, "content": "done {{ last }}"},
    ]
    cfg = make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        slow_id = await sw.supervisor.submit("slow one")
        started = asyncio.Event()

        async def wait_for_tool() -> None:
            rec = sw.supervisor.get(slow_id)
            while not any(isinstance(e, StepStarted) for e in rec.events):
                await rec.watch().wait()
            started.set()

        await asyncio.wait_for(wait_for_tool(), 10)
        fast = [await sw.supervisor.submit(f"fast {i}") for i in range(5)]
        row = await sw.supervisor.cancel(slow_id)
        assert row["state"] == "canceled"
        for tid in fast:
            r = await sw.supervisor.wait(tid, 10)
            assert r["state"] == "completed" and r["answer"].startswith("done fast")
        assert sw.supervisor.get(slow_id).state == "canceled"
        assert sw.hosts["a"].sessions() == 0


def test_sessions_stick_to_one_replica() -> None:
    from swarm.runtime.supervisor import replica_for

    keys = [f"context-{i}" for i in range(1000)]
    first = [replica_for(k, 4) for k in keys]
    # The same key always maps to the same replica (across calls and processes: crc32)...
    assert first == [replica_for(k, 4) for k in keys]
    assert replica_for("abc", 4) == 2  # crc32("abc") % 4, fixed across Python runs
    # ...and keys spread over every replica.
    counts = [first.count(r) for r in range(4)]
    assert min(counts) > 150, counts
    assert {replica_for(k, 1) for k in keys} == {0}


def _slow_tool_cfg(tmp_path: Path) -> Any:
    """A swarm whose tasks sit in a 20 s tool call after their first step."""
    rules = [
        {"when": {"last_role": "user"},
         "tool_calls": [{"name": "slow", "arguments": {"seconds": 20}}]},
        {"when": {}, "content": "done"},
    ]
    return make_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})


async def _two_in_slow_calls(sup: Any) -> tuple[str, str]:
    """Submit two tasks and wait until both have started their first step."""
    a, b = await sup.submit("task a"), await sup.submit("task b")
    for rec in (sup.get(a), sup.get(b)):
        while not any(isinstance(e, StepStarted) for e in rec.events):
            await asyncio.wait_for(rec.watch().wait(), 10)
    return a, b


def _model_event(task: str, step: int, error: str | None = None) -> ModelCalled:
    return ModelCalled(task_id=task, ts=1.0, agent="a", step=step, model="m", error=error,
                       error_class="model" if error else None)


async def test_pushed_event_runs_keep_order_counts_and_cap(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents push their events as runs of one task's; the supervisor files each run under its
    task in order with consecutive seqs, counts failed calls, wakes a follower once, and keeps
    the per-task cap (TaskFinished still last)."""
    import swarm.runtime.supervisor as sup_mod

    async with LocalSwarm(_slow_tool_cfg(tmp_path)) as sw:
        sup = sw.supervisor
        a, b = await _two_in_slow_calls(sup)
        ra, rb = sup.get(a), sup.get(b)
        na, nb = ra.event_count, rb.event_count
        follower = asyncio.ensure_future(sup.events(a, na, 10))
        await asyncio.sleep(0)  # one loop pass: the follower starts waiting for a change
        assert ra.changed is not None and rb.changed is None

        ev = _model_event

        sup.push_events([ev(a, 90), ev(a, 91, "boom"), ev(b, 90), ev(a, 92),
                         ev("no-such-task", 1)])
        got, ended = await asyncio.wait_for(follower, 10)
        assert [e.step for e in got] == [90, 91, 92] and not ended  # type: ignore[attr-defined]
        assert [e.seq for e in ra.events[na:]] == [na, na + 1, na + 2]
        assert [e.step for e in rb.events[nb:]] == [90]  # type: ignore[attr-defined]
        assert ra.errors == {"model": 1} and rb.errors == {}

        monkeypatch.setattr(sup_mod, "_MAX_EVENTS_PER_TASK", ra.event_count + 2)
        sup.push_events([ev(a, 100 + i) for i in range(5)])
        assert ra.event_count == len(ra.events) == na + 3 + 2
        row = await sup.cancel(a)
        assert row["state"] == "canceled"
        assert isinstance(ra.events[-1], TaskFinished)
        # Finished, its events are kept packed; a late one from an agent goes before
        # TaskFinished, and every read numbers them by position.
        monkeypatch.setattr(sup_mod, "_MAX_EVENTS_PER_TASK", 20_000)
        total = ra.event_count
        sup.push_events([ev(a, 300)])
        evs = ra.events
        assert len(evs) == ra.event_count == total + 1
        assert isinstance(evs[-1], TaskFinished) and evs[-2].step == 300  # type: ignore[attr-defined]
        assert [e.seq for e in evs] == list(range(total + 1))
        tail, ended = await sup.events(a, total - 1, 1)
        assert ended and [e.seq for e in tail] == [total - 1, total]
        await sup.cancel(b)


async def test_packed_runs_from_agent_replicas_read_as_events(tmp_path: Path) -> None:
    """Agent replicas send `pack_runs` batches; the supervisor keeps each task's run packed
    until the task's events are read, yet counts, failed calls, follower wake-ups, the order
    with its own events, compaction and late runs come out as with decoded events."""
    from swarm import events as E

    async with LocalSwarm(_slow_tool_cfg(tmp_path)) as sw:
        sup = sw.supervisor
        a, b = await _two_in_slow_calls(sup)
        ra, rb = sup.get(a), sup.get(b)
        na, nb = ra.event_count, rb.event_count

        ev = _model_event

        alert = E.Alert(task_id=b, ts=1.0, agent="a", alert="custom", action="none", detail="")
        follower = asyncio.ensure_future(sup.events(a, na, 10))
        await asyncio.sleep(0)  # one loop pass: the follower starts waiting for a change
        calls_a, calls_b = ra.summary()["model_calls"], rb.summary()["model_calls"]
        sup.push_packed(E.pack_runs({a: [ev(a, 90), ev(a, 91, "boom")],
                                     b: [ev(b, 90), alert], "gone": [ev("gone", 1)]}))
        assert ra._runs and not rb._runs  # a's run kept packed; b's held an Alert
        # Both turns are running: listings show the calls their runs report (a failed call
        # is no call, as in the turn's report).
        assert (ra.summary()["model_calls"], rb.summary()["model_calls"]) == \
            (calls_a + 1, calls_b + 1)
        assert ra.event_count == na + 2 and rb.event_count == nb + 2
        assert ra.errors == {"model": 1} and rb.errors == {}
        got, _ = await asyncio.wait_for(follower, 10)
        assert [(e.step, e.seq) for e in got] == [(90, na), (91, na + 1)]  # type: ignore[attr-defined]
        assert not ra._runs  # decoded once read
        sup.push_packed(E.pack_runs({a: [ev(a, 92)]}))  # packed again, then the task ends
        assert (await sup.cancel(a))["state"] == "canceled"
        evs = ra.events  # from the compacted form, which took the packed run as it was
        assert [getattr(e, "step", None) for e in evs[na:na + 3]] == [90, 91, 92]
        assert isinstance(evs[-1], TaskFinished) and [e.seq for e in evs] == \
            list(range(len(evs))) and len(evs) == ra.event_count
        sup.push_packed(E.pack_runs({a: [ev(a, 93)]}))  # late: before TaskFinished
        evs = ra.events
        assert evs[-2].step == 93 and isinstance(evs[-1], TaskFinished)  # type: ignore[attr-defined]
        assert len(evs) == ra.event_count
        await sup.cancel(b)


async def test_a_running_tasks_packed_runs_are_squeezed_and_read_back_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `_SQUEEZE_AT` packed bytes, the events of a running task nobody has read are
    compressed into chunks; its end compacts the chunks with the rest, and every event comes
    back once, in order, numbered by position. A task whose events were read is left as it
    is (a follower polls: squeezing between its reads would cost the whole history)."""
    import swarm.runtime.supervisor as sup_mod
    from swarm import events as E

    monkeypatch.setattr(sup_mod, "_SQUEEZE_AT", 200)
    async with LocalSwarm(_slow_tool_cfg(tmp_path)) as sw:
        sup = sw.supervisor
        a, b = await _two_in_slow_calls(sup)  # their events were read
        c = await sup.submit("task c")
        rc = sup.get(c)
        while rc.event_count < 2:  # started, its events unread
            await asyncio.wait_for(rc.watch().wait(), 10)
        n0 = rc.event_count
        for step in range(100, 130, 3):
            sup.push_packed(E.pack_runs({c: [_model_event(c, step),
                                             _model_event(c, step + 1, "boom"),
                                             _model_event(c, step + 2)]}))
        assert rc._squeezed and len(rc._squeezed) >= 2  # compressed, nobody having read them
        assert rc.event_count == n0 + 30 and rc.errors == {"model": 10}
        # Its end compacts the chunks and the rest into one blob; a late run goes before
        # TaskFinished.
        assert (await sup.cancel(c))["state"] == "canceled"
        assert rc._squeezed is None and rc._packed is not None
        sup.push_packed(E.pack_runs({c: [_model_event(c, 400)]}))
        evs = rc.events
        assert [e.step for e in evs[n0:n0 + 30]] == list(range(100, 130))  # type: ignore[attr-defined]
        assert evs[-2].step == 400 and isinstance(evs[-1], TaskFinished)  # type: ignore[attr-defined]
        assert len(evs) == rc.event_count and [e.seq for e in evs] == list(range(len(evs)))
        # Read before: kept as objects, in order, for the follower.
        ra = sup.get(a)
        na = ra.event_count
        follower = asyncio.ensure_future(sup.events(a, na + 30, 10))
        for step in range(200, 230, 3):
            sup.push_packed(E.pack_runs({a: [_model_event(a, s) for s in range(step, step + 3)]}))
        assert ra._squeezed is None
        sup.push_packed(E.pack_runs({a: [_model_event(a, s) for s in range(300, 310)]}))
        got, _ = await asyncio.wait_for(follower, 10)
        assert [e.step for e in got] == list(range(300, 310))  # type: ignore[attr-defined]
        evs = ra.events
        assert [e.step for e in evs[na:]] == [*range(200, 230), *range(300, 310)]  # type: ignore[attr-defined]
        assert [e.seq for e in evs] == list(range(len(evs)))
        await sup.cancel(a)
        await sup.cancel(b)


async def test_a_task_flag_wakes_its_waiters_and_makes_no_event_until_one_waits() -> None:
    from swarm.runtime.supervisor import _Flag

    flag = _Flag()
    assert not flag.is_set() and flag._event is None
    waiter = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)  # the waiter is parked on the Event it made
    assert not waiter.done() and flag._event is not None
    flag.set()
    assert await asyncio.wait_for(waiter, 5) is True
    flag.clear()
    assert not flag.is_set()
    again = asyncio.ensure_future(flag.wait())
    await asyncio.sleep(0)
    assert not again.done()
    flag.set()
    assert await asyncio.wait_for(again, 5) is True
    unused = _Flag()
    unused.set()
    assert await unused.wait() is True and unused._event is None  # set first: no Event made


async def test_a_started_turn_is_joined_by_its_resume_and_refused_a_second_copy(
        tmp_path: Path) -> None:
    """`AgentHost.start_turn` (how posted turns start on a replica): the turn's Task at once;
    a resume of the same task while it runs joins it, a fresh second turn is refused, and the
    host forgets the turn once it ends."""
    from swarm.runtime.agent import TurnRequest

    hang = {"name": "hang", "when": {"last_matches": "^hang"},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 30}}]}
    cfg = make_cfg(tmp_path, [hang, {"name": "done", "when": {}, "content": "ok"}],
                   {"a": {"model": "m", "tools": ["fn"]}})

    def request(task: str, text: str, resume: bool = False) -> TurnRequest:
        return TurnRequest(task_id=task, context_id=task, resume=resume,
                           message=a2a.dumps(a2a.text_message(text)), transcript=[],
                           step_offset=0, max_steps=5, log_id=task, turn_id=f"{task}-1")

    async with LocalSwarm(cfg) as sw:
        host = sw.hosts["a"]
        turn = host.start_turn(request("t1", "hang"))
        assert host.start_turn(request("t1", "hang", resume=True)) is turn
        with pytest.raises(RuntimeError, match="already has a turn running"):
            host.start_turn(request("t1", "hang"))
        for _ in range(500):  # until the turn runs (bounded): then it can be cancelled
            if "t1" in host._running:
                break
            await asyncio.sleep(0.01)
        assert host.cancel("t1")
        await asyncio.wait([turn], timeout=20)
        assert turn.done() and turn.result().kind == "canceled"
        assert "t1" not in host._turns
        quick = await host.run_turn(request("t2", "quick"))
        assert quick.kind == "final" and quick.text == "ok" and "t2" not in host._turns


async def test_a_listing_shows_what_a_running_turn_has_done(tmp_path: Path) -> None:
    """A task's counters grow at each turn's end; while the turn runs, listings add what its
    step events say it has done so far, and once it ends they count it exactly once, also
    when its events arrive after its report."""
    from swarm import events as E
    from tests.unit import durable_tools as dt
    from tests.unit.test_store_outage import RULES

    dt.reset()
    cfg = dt.swarm_config(tmp_path, RULES, name="progress",
                          agents={"a": {"model": "m", "tools": ["t"]}})
    dt.HOLD["p-3"], dt.ENTERED["p-3"] = asyncio.Event(), asyncio.Event()
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        sup = sw.supervisor
        task_id = await sup.submit("p")
        await asyncio.wait_for(dt.ENTERED["p-3"].wait(), 30)  # in the third call, one turn
        rec = sup.get(task_id)
        assert rec.steps == 0  # the turn hasn't ended
        # Its events reach the supervisor every few tens of ms; wait for the second step's.
        async with asyncio.timeout(30):
            while not any(isinstance(e, StepFinished) and e.step == 2 for e in rec.events):
                await rec.watch().wait()
        row = next(r for r in sup.list() if r["task_id"] == task_id)
        assert (row["state"], row["steps"], row["model_calls"], row["tool_calls"]) == \
            ("working", 2, 3, 2), row
        assert row["input_tokens"] > 0
        dt.HOLD["p-3"].set()
        done = await sup.wait(task_id, 30)
        # A late run of that turn's events, after its report: not counted again.
        sup.push_events([E.StepFinished(task_id=task_id, ts=0.0, agent="a", step=9,
                                        duration_ms=1.0)])
        again = sup.get(task_id).summary()
    assert done["state"] == "completed" and done["steps"] == 4, done
    assert (again["steps"], again["model_calls"], again["tool_calls"]) == \
        (done["steps"], done["model_calls"], done["tool_calls"]) == (4, 4, 3)
