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
