"""`provider: python`: a model class named by import path, checked before deployment, run by
the step loop like any other model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from swarm.cli import app
from swarm.config import PythonModelConfig, parse_config
from swarm.errors import ConfigError
from swarm.events import ModelCalled, ToolCalled
from swarm.examples.models import RepeatTool
from swarm.models import ModelRequest, build_model
from swarm.runtime.deploy import preflight
from swarm.testing import LocalSwarm

REPEAT = "swarm.examples.models:RepeatTool"


def make_cfg(tmp_path: Path, model: dict[str, Any]) -> Any:
    return parse_config({
        "name": "py",
        "models": {"m": {"provider": "python", **model}},
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {"a": {"model": "m", "tools": ["fn"]}},
        "supervisor": {"entry": "a"},
    }, base_dir=tmp_path)


async def test_a_python_model_drives_the_step_loop(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"factory": REPEAT, "options": {
        "tool": "echo", "arguments": {"text": "ping"}, "times": 3, "answer": "all echoed"}})
    preflight(cfg)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert row["state"] == "completed", row
        assert row["answer"] == "all echoed"
        assert row["steps"] == 4
        evs = sw.events(row["task_id"])
        assert [e.outcome for e in evs if isinstance(e, ToolCalled)] == ["ok"] * 3
        calls = [e for e in evs if isinstance(e, ModelCalled)]
        assert len(calls) == 4 and all(c.input_tokens > 0 and c.output_tokens > 0
                                       for c in calls)
        # A second task starts its own count: the model decides per turn.
        again = await sw.run("again")
        assert again["state"] == "completed" and again["steps"] == 4


async def test_repeat_tool_counts_only_the_latest_turn() -> None:
    model = RepeatTool("echo", {"text": "x"}, times=1, answer="ok")
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "one"}]
    first = await model.complete(ModelRequest(messages=msgs))
    assert [c.name for c in first.tool_calls] == ["echo"]
    assert first.tool_calls[0].arguments == '{"text": "x"}'
    msgs += [{"role": "assistant", "content": None, "tool_calls": []},
             {"role": "tool", "tool_call_id": "c", "content": "x"}]
    assert (await model.complete(ModelRequest(messages=msgs))).content == "ok"
    msgs += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "two"}]
    assert (await model.complete(ModelRequest(messages=msgs))).tool_calls


@pytest.mark.parametrize(("model", "field", "says"), [
    ({"factory": "no_such_module_xyz:Model"}, "models.m.factory",
     "can't import 'no_such_module_xyz:Model': ModuleNotFoundError"),
    ({"factory": "swarm.examples.models:Missing"}, "models.m.factory",
     "has no attribute 'Missing'"),
    ({"factory": "swarm.examples.tools:MAX_SLOW_S"}, "models.m.factory", "not a function"),
    ({"factory": "swarm.examples.tools:word_count", "options": {"text": "a b"}},
     "models.m.factory", "made a int, not a swarm.models.Model"),
    ({"factory": REPEAT, "options": {"tool": "echo", "colour": "red"}}, "models.m.options",
     "got an unexpected keyword argument 'colour'"),
    ({"factory": REPEAT, "options": {}}, "models.m.options",
     "missing a required argument: 'tool'"),
    ({"factory": REPEAT, "options": {"tool": "echo", "times": -1}}, "models.m.options",
     "raised ValueError: times must be 0 or more"),
    ({"factory": "tests.unit.python_models:Abstract"}, "models.m.factory",
     "is abstract: it doesn't implement complete"),
    ({"factory": "tests.unit.python_models:async_factory"}, "models.m.factory",
     "is async: the factory must return the model"),
])
def test_a_bad_python_model_is_a_config_error_naming_the_field(
        tmp_path: Path, model: dict[str, Any], field: str, says: str) -> None:
    cfg = make_cfg(tmp_path, model)
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    (path, msg), = info.value.problems
    assert path == field and says in msg, (path, msg)
    with pytest.raises(ConfigError):  # an agent replica building it says the same
        build_model("m", cfg.models["m"])


@pytest.mark.parametrize(("model", "says"), [
    ({"factory": "not a path"}, "String should match pattern"),
    ({}, "factory"),
    ({"factory": REPEAT, "options": ["echo"]}, "options"),
    ({"factory": REPEAT, "policy": "p.yaml"}, "policy unknown field"),
])
def test_a_malformed_python_model_entry_fails_to_load(tmp_path: Path, model: dict[str, Any],
                                                      says: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_cfg(tmp_path, model)
    assert any(p.startswith("models.m") and says in f"{p} {m}"
               for p, m in info.value.problems), info.value.problems


def test_validate_reports_a_python_model_that_does_not_import(tmp_path: Path) -> None:
    path = tmp_path / "swarm.yaml"
    path.write_text(
        "name: py\n"
        "models: {m: {provider: python, factory: 'no_such_module_xyz:Model'}}\n"
        "agents: {a: {model: m}}\n"
        "supervisor: {entry: a}\n")
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert "models.m.factory" in res.output and "no_such_module_xyz" in res.output


def test_the_entry_round_trips() -> None:
    cfg = PythonModelConfig(provider="python", factory=REPEAT, options={"tool": "echo"})
    assert PythonModelConfig.model_validate(cfg.model_dump()) == cfg


async def test_sync_deployment_steps_run_coroutines_under_a_running_loop() -> None:
    """As in a notebook: `start_swarm` is sync, and its checks are coroutines."""
    from swarm.runtime.deploy import _run_apart

    async def answer() -> int:
        return 42

    assert _run_apart(answer()) == 42


def test_the_check_builds_on_a_running_loop_and_survives_a_bad_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.unit import python_models

    python_models.CLOSED.clear()
    for factory in ("needs_a_loop", "ClosesBadly", "ClosesSync"):
        options = {} if factory == "needs_a_loop" else {"tool": "echo"}
        preflight(make_cfg(tmp_path, {"factory": f"tests.unit.python_models:{factory}",
                                      "options": options}))
    assert python_models.CLOSED == ["bad", "sync"]
    assert "closing it after the config check failed" in caplog.text
