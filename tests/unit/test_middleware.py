"""Middleware around model and tool calls: order, pass-through, and stopping a turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swarm.models.interface import ModelResponse
from swarm.runtime.middleware import (
    Middleware,
    ModelCall,
    NextModel,
    NextTool,
    StopTurn,
    ToolInvocation,
)
from swarm.runtime.step import Outcome
from swarm.testing import LocalSwarm
from swarm.tools.interface import ToolResult
from tests.unit.test_runtime_local import LOOP_RULES, make_cfg


class Recorder(Middleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        self.log.append(f"{self.name}>model{call.step}")
        resp = await nxt(call)
        self.log.append(f"{self.name}<model{call.step}")
        return resp

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        self.log.append(f"{self.name}>{inv.entry.spec.name}({inv.args['text']})")
        result = await nxt(inv)
        self.log.append(f"{self.name}<{result.content}")
        return result


class StopAtTool(Middleware):
    """Stops the turn before the tool runs (as an approval gate or a budget would)."""

    async def on_tool(self, inv: ToolInvocation, nxt: NextTool) -> ToolResult:
        raise StopTurn(Outcome("failed", error_class="policy",
                               error=f"{inv.entry.spec.name} needs a decision"))


class ModelOnly(Middleware):
    def __init__(self) -> None:
        self.calls = 0

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        self.calls += 1
        return await nxt(call)


def _use(sw: LocalSwarm, layers: list[Middleware]) -> None:
    for host in sw.hosts.values():
        assert host._loop is not None
        host._loop.use(layers)


async def test_layers_wrap_calls_outermost_first(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    log: list[str] = []
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["looper"].start()
        _use(sw, [Recorder("a", log), Recorder("b", log)])
        row = await sw.run("hi")
    assert row["state"] == "completed" and row["answer"] == "echoed: ping hi"
    assert log[:6] == ["a>model1", "b>model1", "b<model1", "a<model1",
                       "a>echo(ping hi)", "b>echo(ping hi)"]
    assert log[6:8] == ["b<ping hi", "a<ping hi"]
    assert log.count("a>model1") == 1 and sum(x.startswith("a>model") for x in log) == 4


async def test_a_layer_can_stop_the_turn_before_the_tool_runs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["looper"].start()
        _use(sw, [StopAtTool()])
        row = await sw.run("hi")
    assert row["state"] == "failed"
    assert row["error_class"] == "policy" and "echo needs a decision" in row["error"]
    assert row["tool_calls"] == 0 and row["steps"] == 1


async def test_a_layer_that_wraps_only_models_leaves_tools_direct(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    layer = ModelOnly()
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["looper"].start()
        _use(sw, [layer])
        loop: Any = sw.hosts["looper"]._loop
        assert loop._tool_fn is not None  # composed, but with no layer in it
        row = await sw.run("hi")
    assert row["state"] == "completed" and layer.calls == 4


class Keeper(Middleware):
    """Keeps the step loop's call records and wraps nothing (as the metering layer does)."""

    wraps_model = wraps_tool = False

    def __init__(self) -> None:
        self.kept: list[tuple[Any, ...]] = []
        self.records = self.kept.append

    async def on_model(self, call: ModelCall, nxt: NextModel) -> ModelResponse:
        raise AssertionError("not in the chain")


async def test_the_loop_records_each_call_as_its_events_report_it(tmp_path: Path) -> None:
    """One record per call through the layers, read from the same fields as the loop's
    `ModelCalled` / `ToolCalled` events: tokens, tool, call id, outcome and error class agree;
    a layer that doesn't wrap is left out of the chain."""
    from swarm.events import ModelCalled, ToolCalled
    from swarm.runtime.step import MODEL, TOOL

    rules = [
        {"when": {"agent": "looper", "called": {"echo": {"max": 0}}},
         "tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]},
        {"when": {"agent": "looper", "called": {"fail": {"max": 0}}},
         "tool_calls": [{"name": "fail", "arguments": {"message": "bad disk"}}]},
        {"when": {"agent": "looper"}, "content": "done"},
    ]
    cfg = make_cfg(tmp_path, rules, {"looper": {"model": "m", "tools": ["fn"]}})
    keeper = Keeper()
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["looper"].start()
        _use(sw, [keeper])
        loop: Any = sw.hosts["looper"]._loop
        assert loop.record == keeper.kept.append and loop._model_fn == loop._complete
        row = await sw.run("go", user="ana")
        events = sw.events(row["task_id"])
    assert row["state"] == "completed" and row["answer"] == "done"
    models = [e for e in events if isinstance(e, ModelCalled)]
    tools = [e for e in events if isinstance(e, ToolCalled)]
    got_models = [r for r in keeper.kept if r[0] == MODEL]
    got_tools = [r for r in keeper.kept if r[0] == TOOL]
    assert [(r[4], r[9], r[19], r[20], r[21], r[18]) for r in got_models] == \
        [(e.step, "ok", e.input_tokens, e.output_tokens, e.cached_tokens, e.tool_calls)
         for e in models] and len(models) == 3
    assert [(r[4], r[15], r[16], r[9], r[10]) for r in got_tools] == \
        [(e.step, e.tool, e.call_id, e.outcome, e.error_class) for e in tools] == \
        [(1, "echo", tools[0].call_id, "ok", None), (2, "fail", tools[1].call_id, "error",
                                                     "tool")]
    assert all(r[1] == row["task_id"] and r[3] == "ana" and r[7] <= r[8] for r in keeper.kept)
    assert "bad disk" in got_tools[1][11]  # the raw text: redacted when drained


async def test_the_loop_records_a_stopped_call_and_a_timed_out_one(tmp_path: Path) -> None:
    from swarm.runtime.step import TOOL, Session, TurnLimits

    rules = [{"when": {"agent": "looper", "called": {"slow": {"max": 0}}},
              "tool_calls": [{"name": "slow", "arguments": {"seconds": 30}}]},
             {"when": {"agent": "looper"}, "content": "done"}]
    cfg = make_cfg(tmp_path, rules, {"looper": {"model": "m", "tools": ["fn"]}})
    keeper = Keeper()
    async with LocalSwarm(cfg) as sw:
        await sw.hosts["looper"].start()
        loop: Any = sw.hosts["looper"]._loop
        loop.use([keeper])
        session = Session("t1", "looper", "t1", [{"role": "user", "content": "go"}])
        out = await loop.run_turn(session, TurnLimits(max_steps=5, tool_timeout_s=0.05))
        assert out.kind == "final"
        (timed_out,) = [r for r in keeper.kept if r[0] == TOOL]
        assert timed_out[9:11] == ("error", "tool") and "timed out" in timed_out[11]
        keeper.kept.clear()
        loop.use([keeper, StopAtTool()])
        session = Session("t2", "looper", "t2", [{"role": "user", "content": "go"}])
        out = await loop.run_turn(session, TurnLimits(max_steps=5))
        assert out.kind == "failed" and out.error_class == "policy"
        (stopped,) = [r for r in keeper.kept if r[0] == TOOL]
        assert stopped[9:13] == ("stopped", "policy", "slow needs a decision", "failed")
