"""Budgets and termination: runaway agents are stopped within their limit plus one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swarm.client import TaskInfo
from swarm.config import parse_config
from swarm.errors import ConfigError
from swarm.events import Alert, ModelCalled, TaskFinished, ToolCalled
from swarm.testing import LocalSwarm
from tests.unit.test_runtime_local import make_cfg

WRAP = {"name": "wrap", "when": {"last_matches": "budget for this task is exhausted"},
        "content": "best answer after {{ counts.called.echo }} echoes"}
# Loops forever, with new arguments each step (so no stuck detector fires first).
RUNAWAY = {"name": "loop", "when": {}, "tool_calls": [
    {"name": "echo", "arguments": {"text": "n{{ messages | length }}"}}]}
QUIET = {"same_call": None, "no_progress": None}


def _cfg(tmp_path: Path, budgets: dict[str, Any], rules: list[dict[str, Any]] | None = None,
         agents: dict[str, Any] | None = None, **extra: Any) -> Any:
    return make_cfg(tmp_path, rules or [WRAP, RUNAWAY],
                    agents or {"a": {"model": "m", "tools": ["fn"]}},
                    budgets=budgets, stuck=QUIET, **extra)


def _calls(sw: LocalSwarm, task_id: str) -> tuple[list[ModelCalled], list[ToolCalled]]:
    evs = sw.events(task_id)
    return ([e for e in evs if isinstance(e, ModelCalled)],
            [e for e in evs if isinstance(e, ToolCalled)])


async def test_runaway_tool_loop_fails_at_its_tool_call_limit(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"task": {"max_tool_calls": 5}, "on_exhausted": "fail"})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed" and row["error_class"] == "budget"
        assert row["error"] == "budget exhausted: task max_tool_calls (5)"
        assert row["budget_exhausted"] == "task max_tool_calls (5)"
        # Five tool calls ran; the model was not called again once they were spent.
        assert row["tool_calls"] == 5 and row["model_calls"] == 5
        models, tools = _calls(sw, row["task_id"])
        assert len(models) == 5 and len(tools) == 5
        (alert,) = [e for e in sw.events(row["task_id"]) if isinstance(e, Alert)]
        assert alert.alert == "budget_exhausted" and alert.action == "fail"


async def test_wrap_up_completes_with_the_best_answer(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"task": {"max_tool_calls": 5}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "completed", row
        assert row["answer"] == "best answer after 5 echoes"
        assert row["budget_exhausted"] == "task max_tool_calls (5)"
        assert row["metadata"]["budget_exhausted"] == "task max_tool_calls (5)"
        # The limit plus one call: the wrap-up, offered no tools.
        assert row["tool_calls"] == 5 and row["model_calls"] == 6
        evs = sw.events(row["task_id"])
        assert isinstance(evs[-1], TaskFinished)
        assert evs[-1].budget_exhausted == "task max_tool_calls (5)"
        assert [e.action for e in evs if isinstance(e, Alert)] == ["wrap_up"]
        info = TaskInfo.from_summary(row)
        assert info.budget_exhausted == "task max_tool_calls (5)" and info.state == "completed"
        # The wrap-up instruction names the limit.
        rec = sw.supervisor.get(row["task_id"])
        assert rec.transcript[-2]["role"] == "user"
        assert "task max_tool_calls (5)" in rec.transcript[-2]["content"]


async def test_model_call_limit_plus_one_wrap_up(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"task": {"max_model_calls": 3}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "completed" and row["model_calls"] == 4
        assert row["tool_calls"] == 3
        assert row["answer"] == "best answer after 3 echoes"


async def test_a_wrap_up_with_no_answer_fails(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"task": {"max_model_calls": 2}}, rules=[RUNAWAY])
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "failed" and row["error_class"] == "budget"
        assert "the wrap-up call gave no answer" in row["error"]
        assert row["model_calls"] == 3


@pytest.mark.parametrize("on_exhausted", ["fail", "wrap_up"])
async def test_token_overspender_stops_within_one_call(tmp_path: Path, on_exhausted: str
                                                       ) -> None:
    limit = 600
    cfg = _cfg(tmp_path, {"task": {"max_tokens": limit}, "on_exhausted": on_exhausted})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        models, tools = _calls(sw, row["task_id"])
        spent = [m.input_tokens + m.output_tokens for m in models]
        work = spent[:-1] if on_exhausted == "wrap_up" else spent
        # Every call but the last started under the limit; the last one crossed it.
        assert sum(work[:-1]) < limit <= sum(work)
        assert row["input_tokens"] + row["output_tokens"] == sum(spent)
        # The tool call of the step that crossed the limit did not run; it got a result
        # saying so, so the transcript stays valid for any model.
        assert len(tools) == len(work) - 1
        transcript = sw.supervisor.get(row["task_id"]).transcript
        last_tool = [m for m in transcript if m["role"] == "tool"][-1]
        assert last_tool["content"] == \
            f"ERROR: not run: budget exhausted: task max_tokens ({limit})"
        assert row["budget_exhausted"] == f"task max_tokens ({limit})"
        assert row["state"] == ("completed" if on_exhausted == "wrap_up" else "failed")


async def test_a_task_past_its_wall_clock_is_stopped_by_the_supervisor(tmp_path: Path) -> None:
    """A tool call that outlasts the task's max_wall_s with on_exhausted fail: the
    supervisor's hard stop fails the task at the deadline and cancels the turn. Tasks that end
    in time leave no deadline behind, and a cancel by request is still a cancel."""
    import asyncio

    hang = {"name": "hang", "when": {"last_matches": "^hang"},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 30}}]}
    quick = {"name": "quick", "when": {}, "content": "quick answer"}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 0.5}, "on_exhausted": "fail"}, [hang, quick])
    async with LocalSwarm(cfg) as sw:
        rows = [await sw.run(f"quick {i}") for i in range(3)]
        assert [r["state"] for r in rows] == ["completed"] * 3
        assert len(sw.supervisor._deadlines) == 0
        row = await sw.run("hang", timeout=20)
        assert row["state"] == "failed" and row["error_class"] == "budget", row
        assert row["error"] == "budget exhausted: task max_wall_s (0.5)"
        # Stopped while the tool ran: the tool's call never finished.
        assert not [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        (alert,) = [e for e in sw.events(row["task_id"]) if isinstance(e, Alert)]
        assert alert.alert == "budget_exhausted" and alert.action == "fail"
        # Cancelled by request while its turn runs, before its deadline: canceled.
        task_id = await sw.supervisor.submit("hang again")
        await _turn_running(sw, task_id)
        driver = sw.supervisor.tasks[task_id].driver
        assert driver is not None
        await sw.supervisor.cancel(task_id)
        row = await sw.supervisor.wait(task_id, 20)
        assert row["state"] == "canceled", row
        await asyncio.wait([driver], timeout=20)  # its driver unwinds after the task ended
        assert driver.done() and len(sw.supervisor._deadlines) == 0


async def test_a_tool_call_running_at_max_wall_s_is_cut_and_the_turn_wraps_up(
        tmp_path: Path) -> None:
    """With on_exhausted wrap_up, a tool call still running at the task's max_wall_s is cut
    there and the agent gets its wrap-up call (the supervisor's hard stop, max_wall_s +
    wrap_up_grace_s, failed the task instead)."""
    hang = {"name": "hang", "when": {"last_role": "user", "last_matches": "^hang"},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 3600}},
                           {"name": "echo", "arguments": {"text": "never"}}]}
    wrap = {"name": "wrap", "when": {"last_matches": "budget for this task is exhausted"},
            "content": "best answer without the slow result"}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 1}, "wrap_up_grace_s": 10}, [wrap, hang])
    cfg = cfg.model_copy(update={"tools": {  # the tool's own timeout is not what stops it
        **cfg.tools, "fn": cfg.tools["fn"].model_copy(update={"timeout_s": 3600})}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("hang", timeout=60)
        evs = sw.events(row["task_id"])
        transcript = sw.supervisor.get(row["task_id"]).transcript
    assert row["state"] == "completed", row
    assert row["answer"] == "best answer without the slow result"
    assert row["budget_exhausted"] == "task max_wall_s (1)"
    (slow,) = [e for e in evs if isinstance(e, ToolCalled)]  # echo was not run
    assert (slow.tool, slow.outcome, slow.error_class) == ("slow", "error", "budget")
    results = [m["content"] for m in transcript if m.get("role") == "tool"]
    assert len(results) == 2
    assert results[0].startswith("ERROR: tool 'slow' was stopped after ")
    assert results[0].endswith(": the task max_wall_s (1) ran out while it ran; it may or may "
                               "not have taken effect")
    assert results[1] == "ERROR: not run: budget exhausted: task max_wall_s (1)"
    assert [e.action for e in evs if isinstance(e, Alert)] == ["wrap_up"]


async def test_a_model_call_running_at_max_wall_s_is_cut_and_the_turn_wraps_up(
        tmp_path: Path) -> None:
    models = {"m": {"provider": "python",
                    "factory": "tests.unit.python_models:AnswersOnlyTheWrapUp"}}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 1}, "wrap_up_grace_s": 10}, models=models)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("think hard", timeout=60)
    assert row["state"] == "completed", row
    assert row["answer"].startswith("wrapped up: The budget for this task is exhausted (task "
                                    "max_wall_s (1)).")
    assert row["budget_exhausted"] == "task max_wall_s (1)"


async def test_a_cancel_by_request_wins_over_a_deadline_at_the_same_moment(
        tmp_path: Path) -> None:
    """The deadline fires and a cancel by request comes before the task's driver runs again:
    the task is canceled (as with `asyncio.timeout`), and its driver's cancel count is back
    to where it was."""
    import asyncio
    import heapq

    hang = {"name": "hang", "when": {},
            "tool_calls": [{"name": "slow", "arguments": {"seconds": 30}}]}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 600}, "on_exhausted": "fail"}, [hang])
    async with LocalSwarm(cfg) as sw:
        sup = sw.supervisor
        task_id = await sup.submit("hang")
        await _turn_running(sw, task_id)
        driver = sup.tasks[task_id].driver
        assert driver is not None and len(sup._deadlines) == 1
        _, task = sup._deadlines._due[task_id]
        assert task is driver
        sup._deadlines._due[task_id] = (0.0, task)  # due now
        heapq.heappush(sup._deadlines._heap, (0.0, task_id))
        sup._deadlines._fire(asyncio.get_running_loop())  # cancels the driver: expired
        driver.cancel()  # and a cancel by request before the driver runs again
        row = await sup.wait(task_id, 20)
        assert row["state"] == "canceled" and row["error"] == "canceled by request", row
        await asyncio.wait([driver], timeout=20)
        assert driver.done() and len(sup._deadlines) == 0 and not sup._deadlines._expired


async def _turn_running(sw: LocalSwarm, task_id: str) -> None:
    """Wait (bounded) until the task's first model call has been made: its turn is running."""
    cursor = 0
    for _ in range(100):
        evs, ended = await sw.supervisor.events(task_id, cursor, 10)
        cursor += len(evs)
        if any(isinstance(e, ModelCalled) for e in evs):
            return
        assert not ended, evs
    raise AssertionError(f"task {task_id} never called its model")


async def test_one_timer_holds_every_tasks_deadline() -> None:
    """`_Deadlines`: due tasks are cancelled and marked expired, in time order; a deadline set
    again for later or cleared is skipped; ended tasks leave the heap bounded."""
    import asyncio

    from swarm.runtime.supervisor import _Deadlines

    async def idle() -> None:
        await asyncio.Event().wait()

    d = _Deadlines()
    a, b, c = (asyncio.create_task(idle()) for _ in range(3))
    d.set("a", 0.05, a)
    d.set("b", 0.05, b)
    d.set("b", 3600, b)  # moved later: its first entry is stale
    d.set("c", 0.1, c)
    me = asyncio.current_task()
    assert me is not None
    for i in range(1000):  # tasks that end in time
        d.set(f"x{i}", 3600, me)
        assert not d.clear(f"x{i}", me)
    assert len(d) == 3 and len(d._heap) <= 2 * 3 + 64 + 1
    done, _ = await asyncio.wait([a, c], timeout=10)
    assert done == {a, c} and a.cancelled() and c.cancelled() and not b.done()
    assert d.clear("a", a) and d.clear("c", c) and not d.clear("b", b)
    assert len(d) == 0
    b.cancel()


async def test_cost_budget_uses_model_prices(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"task": {"max_cost_usd": 0.5}, "on_exhausted": "fail"})
    price = {"input_per_mtok": 1000.0, "output_per_mtok": 4000.0}
    model = cfg.models["m"].model_copy(update={"price": cfg.models["m"].price.model_validate(
        price)})
    cfg = cfg.model_copy(update={"models": {"m": model}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        models, tools = _calls(sw, row["task_id"])
        costs = [model.price.cost(m.input_tokens, m.output_tokens) for m in models]
        assert sum(costs[:-1]) < 0.5 <= sum(costs)
        assert row["cost_usd"] == pytest.approx(sum(costs))
        assert row["state"] == "failed" and row["budget_exhausted"] == "task max_cost_usd (0.5)"
        assert len(tools) == len(models) - 1


async def test_an_agent_budget_overrides_the_default(tmp_path: Path) -> None:
    rules = [WRAP,
             {"when": {"agent": "a", "called": {"echo": {"max": 2}}}, "tool_calls": [
                 {"name": "echo", "arguments": {"text": "a{{ messages | length }}"}}]},
             {"when": {"agent": "a"}, "tool_calls": [{"name": "transfer_to_b",
                                                      "arguments": {"message": "yours"}}]},
             RUNAWAY]
    agents = {"a": {"model": "m", "tools": ["fn"], "handoffs": ["b"]},
              "b": {"model": "m", "tools": ["fn"], "budget": {"max_tool_calls": 2}}}
    cfg = _cfg(tmp_path, {"agent": {"max_tool_calls": 10}}, rules=rules, agents=agents)
    assert cfg.agent_budget("b").max_tool_calls == 2
    assert cfg.agent_budget("a").max_tool_calls == 10
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "completed", row
        assert row["budget_exhausted"] == "agent max_tool_calls (2)"
        _, tools = _calls(sw, row["task_id"])
        # a's three echoes ran under its default of 10; b stopped after its own 2.
        assert [t.agent for t in tools] == ["a"] * 3 + ["b"] * 2
        assert row["answer"] == "best answer after 5 echoes"


async def test_swarm_budget_stops_new_work_across_tasks(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"swarm": {"max_tool_calls": 4}, "on_exhausted": "fail"})
    async with LocalSwarm(cfg) as sw:
        first = await sw.run("one")
        assert first["state"] == "failed" and first["tool_calls"] == 4
        assert first["budget_exhausted"] == "swarm max_tool_calls (4)"
        second = await sw.run("two")
        assert second["state"] == "failed" and second["error_class"] == "budget"
        assert second["budget_exhausted"] == "swarm max_tool_calls (4)"
        assert second["model_calls"] == 0 and second["tool_calls"] == 0
        assert sw.supervisor.swarm_usage.current().tool_calls == 4


async def test_swarm_budget_window_starts_afresh(tmp_path: Path) -> None:
    from swarm.governance.budget import SwarmUsage, Usage

    now = [1000.0]
    usage = SwarmUsage(window_s=3600, clock=lambda: now[0])
    usage.add(Usage(tool_calls=3))
    assert usage.current().tool_calls == 3
    now[0] += 3599
    assert usage.current().tool_calls == 3
    now[0] += 2
    assert usage.current().tool_calls == 0


@pytest.mark.parametrize(("data", "field", "needle"), [
    ({"budgets": {"task": {"max_tool_calls": -1}}}, "budgets.task.max_tool_calls",
     "greater than or equal to 0"),
    ({"budgets": {"swarm": {"max_cost_usd": -0.5}}}, "budgets.swarm.max_cost_usd",
     "greater than or equal to 0"),
    ({"budgets": {"swarm": {"max_wall_s": 10}}}, "budgets.swarm.max_wall_s",
     "no wall-clock limit"),
    ({"budgets": {"on_exhausted": "ignore"}}, "budgets.on_exhausted", "'wrap_up' or 'fail'"),
    ({"budgets": {"agent": {"max_tokenz": 5}}}, "budgets.agent.max_tokenz", "unknown field"),
    ({"agents": {"a": {"model": "m", "budget": {"max_steps": -3}}}},
     "agents.a.budget.max_steps", "greater than or equal to 0"),
    ({"stuck": {"action": "pause"}}, "stuck.action", "'stop' or 'escalate'"),
    ({"stuck": {"same_call": 1}}, "stuck.same_call", "greater than or equal to 2"),
    ({"stuck": {"input_timeout_s": 0}}, "stuck.input_timeout_s", "greater than 0"),
])
def test_bad_limits_name_their_field(data: dict[str, Any], field: str, needle: str) -> None:
    base: dict[str, Any] = {
        "name": "t", "models": {"m": {"provider": "openai", "base_url": "http://x",
                                      "model": "x"}},
        "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"}}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, **data})
    assert any(path == field and needle in msg for path, msg in err.value.problems), \
        err.value.problems


async def _tool_calls_seen(sw: LocalSwarm, task_id: str, n: int) -> None:
    """Wait (bounded) until the task's events hold `n` finished tool calls."""
    import asyncio

    cursor, seen = 0, 0
    async with asyncio.timeout(20):
        while seen < n:
            evs, _ = await sw.supervisor.events(task_id, cursor, 5.0)
            cursor += len(evs)
            seen += sum(isinstance(e, ToolCalled) for e in evs)


async def test_a_task_cut_short_while_its_turn_runs_counts_what_the_turn_ran(
        tmp_path: Path) -> None:
    """A task stopped at max_wall_s, or canceled, while its turn runs gets no report of that
    turn. What the turn's step events said it ran still counts: the task's counters and cost,
    and the swarm's budget, which then stops the next task (before, all stayed 0, and a swarm
    max_model_calls never ran out on such tasks)."""
    echo = {"name": "echo", "when": {"called": {"echo": {"max": 2}}},
            "tool_calls": [{"name": "echo", "arguments": {"text": "n{{ messages | length }}"}}]}
    hang = {"name": "hang", "when": {}, "tool_calls": [{"name": "slow",
                                                         "arguments": {"seconds": 30}}]}
    priced = {"m": {"provider": "scripted", "policy": "policy.yaml",
                    "price": {"input_per_mtok": 1e6, "output_per_mtok": 1e6}}}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 1}, "swarm": {"max_model_calls": 6},
                          "on_exhausted": "fail"}, [echo, hang], models=priced)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go", timeout=20)
        assert row["budget_exhausted"] == "task max_wall_s (1)", row
        # Three echo steps, and the fourth model call, whose tool call never ended.
        assert (row["steps"], row["model_calls"], row["tool_calls"]) == (3, 4, 3), row
        assert row["input_tokens"] > 0 and row["cost_usd"] == \
            row["input_tokens"] + row["output_tokens"], row
        assert sw.supervisor.swarm_usage.current().model_calls == 4
        # Two calls of the swarm's six are left for the next task.
        row = await sw.run("again", timeout=20)
        assert row["state"] == "failed", row
        assert row["budget_exhausted"] == "swarm max_model_calls (6)", row
        assert row["model_calls"] == 2, row
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 60}}, [echo, hang], models=priced)
    async with LocalSwarm(cfg) as sw:
        task_id = await sw.supervisor.submit("go")
        await _tool_calls_seen(sw, task_id, 3)
        await sw.supervisor.cancel(task_id)
        row = await sw.supervisor.wait(task_id, 20)
        assert row["state"] == "canceled", row
        assert (row["steps"], row["model_calls"], row["tool_calls"]) == (3, 4, 3), row
        assert row["cost_usd"] > 0, row


async def test_a_fork_of_a_task_a_budget_stopped_starts_without_its_mark(tmp_path: Path) -> None:
    """The swarm marked the source `budget_exhausted` (its metadata too); the fork starts with
    the source's metadata less that mark, which was about how the source ended."""
    from swarm.state.memory import MemoryCheckpointer

    cfg = _cfg(tmp_path, {"task": {"max_tool_calls": 2}})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        row = await sw.run("go")
        assert row["metadata"]["budget_exhausted"] == "task max_tool_calls (2)", row
        fork_id = await sw.supervisor.fork(row["task_id"], 1)
        meta = sw.supervisor.get(fork_id).summary()["metadata"]  # before it has run
        assert "budget_exhausted" not in meta and meta["forked_from"] == row["task_id"], meta
        await sw.supervisor.wait(fork_id, 20)


async def test_a_turn_cut_after_a_resume_counts_what_it_ran_before_it(tmp_path: Path) -> None:
    """A turn resent (its replica died, or the store came back) and then cut short: what it
    ran before the resend still counts (the resumed turn doesn't report it again; before, the
    resend dropped it)."""
    from swarm.runtime.agent import TurnRequest

    echo = {"name": "echo", "when": {"called": {"echo": {"max": 2}}},
            "tool_calls": [{"name": "echo", "arguments": {"text": "n{{ messages | length }}"}}]}
    hang = {"name": "hang", "when": {}, "tool_calls": [{"name": "slow",
                                                         "arguments": {"seconds": 30}}]}
    cfg = _cfg(tmp_path, {"task": {"max_wall_s": 60}}, [echo, hang])
    async with LocalSwarm(cfg) as sw:
        sup = sw.supervisor
        task_id = await sup.submit("go")
        await _tool_calls_seen(sw, task_id, 3)
        rec = sup.get(task_id)
        sup._resume_req(rec, "a", TurnRequest(task_id=task_id, context_id=rec.context_id,
                                               message=b"", transcript=[], step_offset=0,
                                               max_steps=12, log_id=task_id))
        row = await sup.cancel(task_id)
    assert row["state"] == "canceled", row
    assert (row["steps"], row["model_calls"], row["tool_calls"]) == (3, 4, 3), row
