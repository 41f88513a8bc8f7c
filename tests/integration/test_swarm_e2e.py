"""Whole swarms on a local Ray: the demo, 50 concurrent tasks, and failures that stay contained."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.client import SwarmClient
from swarm.config import load_config
from swarm.errors import TaskFailed, UserError
from swarm.events import Handoff, TaskFinished, ToolCalled
from swarm.runtime.deploy import start_swarm, stop_swarm

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def research(ray_cluster, serve_port, tmp_path_factory) -> Iterator[SwarmClient]:
    import os

    os.environ["SWARM_NOTES_DIR"] = str(tmp_path_factory.mktemp("notes"))
    cfg = load_config(ROOT / "configs" / "research.yaml")
    name = f"rd-{uuid.uuid4().hex[:6]}"
    sup, reports = start_swarm(cfg, deployment=name)
    assert all(not r["problems"] for r in reports), reports
    yield SwarmClient(name, sup)
    stop_swarm(name)


@pytest.fixture(scope="module")
def echo(ray_cluster, serve_port) -> Iterator[SwarmClient]:
    cfg = load_config(HERE / "configs" / "echo.yaml")
    name = f"echo-{uuid.uuid4().hex[:6]}"
    sup, reports = start_swarm(cfg, deployment=name)
    # The `down` MCP server exits at once: the replicas report it and still come up.
    worker_reports = [r for r in reports if r["role"] == "worker"]
    assert worker_reports and all(r["problems"] for r in worker_reports)
    yield SwarmClient(name, sup)
    stop_swarm(name)


def test_demo_swarm_answers_from_its_tools(research: SwarmClient) -> None:
    task = research.submit("How does prefix caching in vLLM help multi-turn agents?", user="t")
    events = list(task.events(timeout=120))
    answer = task.result(timeout=10)
    handoffs = [(e.agent, e.to_agent) for e in events if isinstance(e, Handoff)]
    assert handoffs == [("planner", "researcher"), ("researcher", "writer")]
    tools = [(e.agent, e.tool, e.outcome) for e in events if isinstance(e, ToolCalled)]
    assert ("researcher", "search", "ok") in tools
    assert ("researcher", "read_doc", "ok") in tools
    assert ("writer", "save_note", "ok") in tools
    assert isinstance(events[-1], TaskFinished) and events[-1].state == "completed"
    # The answer quotes the document the researcher read, as the tool returned it.
    a2a_task = task.a2a_task()
    assert a2a_task.artifacts[0].parts[0].text == answer
    read = next(e for e in events if isinstance(e, ToolCalled) and e.tool == "read_doc")
    assert read.outcome == "ok"
    assert "prefix" in answer.lower()
    info = task.status()
    assert info.state == "completed" and info.steps >= 6 and info.input_tokens > 0


def test_fifty_concurrent_tasks_all_answer_right(echo: SwarmClient) -> None:
    tokens = [uuid.uuid4().hex[:10] for _ in range(50)]
    handles = [echo.submit(f"token {t}", user=f"u{i % 5}") for i, t in enumerate(tokens)]
    for t, h in zip(tokens, handles, strict=True):
        assert h.result(timeout=180) == f"done: token {t}"
    rows = {r.task_id: r for r in echo.tasks(state="completed")}
    assert all(h.id in rows for h in handles)


def test_failures_are_classified_and_contained(echo: SwarmClient) -> None:
    healthy = [echo.submit(f"fine {i}") for i in range(10)]
    raising = echo.submit("please raise")
    malformed = echo.submit("send malformed json")
    mcp_down = echo.submit("mcpdown lookup")
    bad_model = echo.submit("badmodel please")
    # Tool-level failures go back to the model, which recovers and answers.
    assert "exploded on purpose" in raising.result(timeout=60)
    assert "not a JSON object" in malformed.result(timeout=60)
    assert "recovered from: ERROR:" in mcp_down.result(timeout=60)
    classes = {e.error_class for e in malformed.events(timeout=30) if isinstance(e, ToolCalled)}
    assert classes == {"model"}
    classes = {e.error_class for e in mcp_down.events(timeout=30) if isinstance(e, ToolCalled)}
    assert classes == {"tool"}
    # A model endpoint that is down fails its own task, classified as a model error.
    with pytest.raises(TaskFailed) as ei:
        bad_model.result(timeout=60)
    assert ei.value.error_class == "model"
    for i, h in enumerate(healthy):
        assert h.result(timeout=60) == f"done: fine {i}"


def test_oversized_and_unknown_inputs(echo: SwarmClient) -> None:
    with pytest.raises(UserError, match="max_task_chars"):
        echo.submit("x" * 2001)
    from swarm.errors import TaskNotFound

    with pytest.raises(TaskNotFound):
        echo.task("no-such-task")
    # The swarm still works after rejecting them.
    assert echo.submit("still ok").result(timeout=60) == "done: still ok"


def test_cancel_a_running_task(echo: SwarmClient) -> None:
    slow = echo.submit("slow please")
    for ev in slow.events(timeout=60):
        if isinstance(ev, ToolCalled) or getattr(ev, "step", 0) >= 2:
            break
    info = slow.cancel()
    assert info.state == "canceled"
    with pytest.raises(TaskFailed) as ei:
        slow.result(timeout=10)
    assert ei.value.state == "canceled"
    assert echo.submit("after cancel").result(timeout=60) == "done: after cancel"


def test_a_python_model_runs_in_the_agent_replicas(ray_cluster, tmp_path: Path) -> None:
    """`provider: python`: each replica imports and builds the model from the config."""
    from swarm.config import parse_config

    cfg = parse_config({
        "name": "pym",
        "models": {"m": {"provider": "python", "factory": "swarm.examples.models:RepeatTool",
                         "options": {"tool": "echo", "arguments": {"text": "hi"}, "times": 2,
                                     "answer": "echoed twice"}}},
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {"a": {"model": "m", "tools": ["fn"], "replicas": 2}},
        "supervisor": {"entry": "a"},
        "state": {"run_dir": str(tmp_path)},
    }, base_dir=tmp_path)
    name = f"pym-{uuid.uuid4().hex[:6]}"
    sup, reports = start_swarm(cfg, deployment=name)
    try:
        assert len(reports) == 2 and all(not r["problems"] for r in reports), reports
        client = SwarmClient(name, sup)
        handles = [client.submit(f"task {i}") for i in range(8)]
        assert [h.result(timeout=120) for h in handles] == ["echoed twice"] * 8
        info = handles[0].status()
        assert info.steps == 3 and info.input_tokens > 0
    finally:
        stop_swarm(name)
