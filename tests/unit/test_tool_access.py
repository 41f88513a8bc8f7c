"""Per-role tool access: grant globs, deny lists, config checks, and refusals in the step loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.config import parse_config
from swarm.errors import ConfigError, ToolError
from swarm.events import ToolCalled
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from swarm.tools.access import granted_servers, parse_grant
from swarm.tools.interface import ToolContext, ToolResult, ToolSource, ToolSpec

GAVE_UP = {"when": {"last_tool_error": True}, "content": "gave up: {{ last }}"}
TOOLS = {
    "fn": {"python": ["swarm.examples.tools:echo", "swarm.examples.tools:fail",
                      "swarm.examples.tools:slow"]},
    "other": {"python": ["swarm.examples.tools:word_count"]},
}


def make_cfg(tmp_path: Path, agents: dict[str, Any], rules: list[dict[str, Any]] | None = None,
             **extra: Any) -> Any:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": rules or []}))
    data: dict[str, Any] = {
        "name": "t",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
        "tools": TOOLS,
        "agents": agents,
        "supervisor": {"entry": next(iter(agents))},
    }
    data.update(extra)
    return parse_config(data, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("grants", "deny", "visible"),
    [
        (["fn"], [], ["echo", "fail", "slow"]),
        (["fn.echo"], [], ["echo"]),
        (["fn.s*"], [], ["slow"]),
        (["*.word_count", "fn.echo"], [], ["word_count", "echo"]),
        (["*"], [], ["echo", "fail", "slow", "word_count"]),
        (["fn", "other"], ["fn.f*", "*.slow"], ["echo", "word_count"]),
        (["fn"], ["fn"], []),
    ],
)
async def test_grants_and_denials_decide_what_an_agent_sees(
    tmp_path: Path, grants: list[str], deny: list[str], visible: list[str]
) -> None:
    cfg = make_cfg(tmp_path, {"a": {"model": "m", "tools": grants, "deny_tools": deny}})
    async with LocalSwarm(cfg) as sw:
        box = sw.hosts["a"].toolbox
        assert sorted(box.names) == sorted(visible)
        assert sorted(s["function"]["name"] for s in box.schemas) == sorted(visible)
        assert sw.hosts["a"].start_problems == []


@pytest.mark.parametrize(
    ("agent", "where", "needle"),
    [
        ({"tools": ["nope"]}, "agents.a.tools.0", "unknown tool server 'nope'"),
        ({"tools": ["fn", "nope.echo"]}, "agents.a.tools.1", "unknown tool server 'nope'"),
        ({"tools": ["x*.echo"]}, "agents.a.tools.0", "'x*' matches no tool server"),
        ({"tools": ["fn."]}, "agents.a.tools.0", "no tool name after the dot"),
        ({"tools": [".echo"]}, "agents.a.tools.0", "no server name"),
        ({"tools": ["f n"]}, "agents.a.tools.0", "not a server name or glob"),
        ({"tools": ["fn"], "deny_tools": ["gone.*"]}, "agents.a.deny_tools.0",
         "unknown tool server 'gone'"),
    ],
)
def test_bad_grants_are_config_errors(
    tmp_path: Path, agent: dict[str, Any], where: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, {"a": {"model": "m", **agent}})
    assert any(path == where and needle in msg for path, msg in err.value.problems), (
        err.value.problems)


async def test_a_glob_that_matches_nothing_is_a_start_warning(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": {"model": "m", "tools": ["fn.echo", "fn.zz*", "*.nothing"],
                                    "deny_tools": ["fn.q*"]}})
    async with LocalSwarm(cfg) as sw:
        host = sw.hosts["a"]
        assert host.toolbox.names == ["echo"]
        assert host.start_problems == [
            "agents.a.tools: 'fn.zz*' matches no tool",
            "agents.a.tools: '*.nothing' matches no tool",
            "agents.a.deny_tools: 'fn.q*' matches no tool this agent's servers list",
        ]


async def test_an_exact_tool_the_server_lacks_fails_the_start(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, {"a": {"model": "m", "tools": ["fn.missing"]}})
    sw = LocalSwarm(cfg)
    with pytest.raises(ConfigError, match="server 'fn' has no tool 'missing'"):
        await sw.__aenter__()
    await sw.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        # Denied explicitly.
        ("fail", "tool 'fail' is not granted to agent 'a' (denied by deny_tools 'fn.fail')"),
        # On a granted server, but not matched by the grant.
        ("slow", "tool 'slow' is not granted to agent 'a' (server 'fn' does not grant it)"),
        # On a server this agent doesn't use at all.
        ("word_count", "tool 'word_count' is not granted to agent 'a' (it belongs to server "
         "'other')"),
    ],
)
async def test_a_forbidden_tool_gets_a_policy_error_and_is_recorded(
    tmp_path: Path, call: str, needle: str
) -> None:
    rules = [GAVE_UP, {"when": {"agent": "a", "last_role": "user"},
                       "tool_calls": [{"name": call, "arguments": {"text": "x", "seconds": 0,
                                                                   "message": "boom"}}]}]
    cfg = make_cfg(tmp_path, {"a": {"model": "m", "tools": ["fn.e*", "fn.fail"],
                                    "deny_tools": ["fn.fail"]}}, rules)
    store = MemoryCheckpointer()
    async with LocalSwarm(cfg, store=store) as sw:
        assert sw.hosts["a"].toolbox.names == ["echo"]
        row = await sw.run("go")
        # The refusal went back to the model, which answered; the task carried on.
        assert row["state"] == "completed", row
        assert row["answer"] == f"gave up: ERROR: {needle}"
        (tool,) = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        assert tool.tool == call and tool.outcome == "error"
        assert tool.error_class == "policy" and needle in tool.detail
        entries = await store.read(row["task_id"])
    # The durable log holds the model's attempt and the refusal it got.
    model = next(e for e in entries if e.kind == "model" and e.data["message"].get("tool_calls"))
    assert model.data["message"]["tool_calls"][0]["function"]["name"] == call
    results = [e for e in entries if e.kind == "tool"]
    assert len(results) == 1 and needle in str(results[0].data)


async def test_a_made_up_tool_is_still_a_model_error(tmp_path: Path) -> None:
    rules = [GAVE_UP, {"when": {"agent": "a", "last_role": "user"},
                       "tool_calls": [{"name": "teleport", "arguments": {}}]}]
    cfg = make_cfg(tmp_path, {"a": {"model": "m", "tools": ["fn.echo"]}}, rules)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        assert "unknown tool 'teleport'; available tools: echo" in row["answer"]
        (tool,) = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        assert tool.error_class == "model"


def test_patterns_and_the_servers_they_reach() -> None:
    g = parse_grant("files.read_*")
    assert g.matches("files", "read_text") and not g.matches("files", "write_text")
    assert not g.matches("files2", "read_text")
    assert parse_grant("*.search").matches("any", "search")
    servers = {"files", "files2", "web"}
    assert granted_servers(["files*.read_*", "web.get"], servers) == {"files", "files2", "web"}
    # A built-in server is reached only by its name, never by a glob.
    assert granted_servers(["*"], servers) == servers
    assert granted_servers(["memory.recall"], servers) == {"memory"}


class _ComesUp(ToolSource):
    """A tool source that can't list its tools until `up` is set; counts the times asked."""

    name = "late"

    def __init__(self) -> None:
        self.up = False
        self.asked = 0

    async def list_tools(self) -> list[ToolSpec]:
        self.asked += 1
        if not self.up:
            raise ToolError("server late is down")
        return [ToolSpec(name="late_tool", description="a tool of a late server",
                         parameters={"type": "object"}, source="late")]

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return ToolResult("ok")


async def test_a_source_that_comes_up_is_listed_once_when_it_is_asked_again() -> None:
    from swarm.runtime.toolbox import Toolbox
    from swarm.tools.function import FunctionToolSource

    late = _ComesUp()
    steady = FunctionToolSource("fn", ["swarm.examples.tools:echo"])
    box = await Toolbox.build("a", ["late", "fn"], {"late": late, "fn": steady}, [])
    try:
        assert box.unlisted == ["late"] and box.names == ["echo"] and late.asked == 1
        # A call of one of its tools is told why it can't be listed, not only that.
        assert box.why_unlisted() == "late (server late is down)"
        late.up = True
        box.poke()
        await box.relisted()
        assert box.unlisted == [] and sorted(box.names) == ["echo", "late_tool"]
        assert box.why_unlisted() == ""
        assert late.asked == 2  # the answer that brought its tools back is the one used
    finally:
        box.close()
