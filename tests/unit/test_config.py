"""Config schema and loader: good configs load, every bad one names its field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from swarm.cli import app
from swarm.config import load_config, parse_config
from swarm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
POLICY = {"rules": [{"when": {"agent": "a"}, "content": "hi"}]}


def _base(**over: object) -> dict:
    cfg: dict = {
        "name": "t",
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "x"}},
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {
            "a": {"model": "m", "tools": ["fn"], "handoffs": ["b"]},
            "b": {"model": "m"},
        },
        "supervisor": {"entry": "a"},
    }
    cfg.update(over)
    return cfg


def _paths(exc: ConfigError) -> dict[str, str]:
    return dict(exc.problems)


def test_demo_config_is_valid() -> None:
    cfg = load_config(ROOT / "configs" / "research.yaml")
    assert cfg.supervisor.entry == "planner"
    assert cfg.agents["researcher"].replicas == 2
    # The policy file was read relative to the config and travels inside the config.
    assert cfg.models["default"].policy_spec


def test_minimal_config_defaults() -> None:
    cfg = parse_config(_base())
    assert cfg.budgets.task.max_steps == 60
    assert cfg.agents["b"].tools == []
    assert cfg.entry_agents() == ["a"]


def test_unknown_field_names_its_path() -> None:
    data = _base()
    data["agents"]["a"]["toolz"] = []
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert _paths(ei.value)["agents.a.toolz"] == "unknown field"


@pytest.mark.parametrize(
    ("mutate", "path", "needle"),
    [
        (lambda d: d["agents"]["a"].update(model="nope"), "agents.a.model", "unknown model 'nope'"),
        (lambda d: d["agents"]["a"].update(handoffs=["ghost"]), "agents.a.handoffs.0", "ghost"),
        (lambda d: d["agents"]["a"].update(handoffs=["a"]), "agents.a.handoffs.0", "itself"),
        (lambda d: d["agents"]["b"].update(tools=["missing"]), "agents.b.tools.0", "missing"),
        (lambda d: d["supervisor"].update(entry="zed"), "supervisor.entry", "unknown agent"),
        (lambda d: d["agents"]["a"].update(replicas=0), "agents.a.replicas", "greater than"),
        (lambda d: d.update(name="has space"), "name", "pattern"),
        (
            lambda d: d["models"]["m"].update(base_url="ftp://x"),
            "models.m.base_url",
            "http",
        ),
        (lambda d: d["models"]["m"].update(provider="magic"), "models.m.provider",
         "unknown provider 'magic'"),
        (lambda d: d["tools"]["fn"].update(python=["not a path"]), "tools.fn.python.0", "pattern"),
        (
            lambda d: d["tools"].update(both={"python": ["a.b:c"], "mcp": {"url": "http://h"}}),
            "tools.both",
            "exactly one",
        ),
        (
            lambda d: d["supervisor"].update(strategy="router", agents=["a"]),
            "supervisor.router_model",
            "needs a model",
        ),
    ],
)
def test_bad_config_names_field(mutate, path: str, needle: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    problems = _paths(ei.value)
    assert path in problems, problems
    assert needle in problems[path] or needle in str(ei.value)


def test_every_problem_is_reported_at_once() -> None:
    data = _base()
    data["agents"]["a"]["model"] = "nope"
    data["agents"]["b"]["handoffs"] = ["ghost"]
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert {"agents.a.model", "agents.b.handoffs.0"} <= set(_paths(ei.value))


def test_env_interpolation_and_secrets_stay_hidden() -> None:
    data = _base()
    data["models"]["m"]["api_key"] = "${MY_KEY}"
    data["models"]["m"]["base_url"] = "${BASE:-http://127.0.0.1:9/v1}"
    cfg = parse_config(data, env={"MY_KEY": "sk-very-secret"})
    model = cfg.models["m"]
    assert model.base_url == "http://127.0.0.1:9/v1"
    assert model.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(cfg)
    assert "sk-very-secret" not in cfg.model_dump_json()


def test_missing_env_var_is_named() -> None:
    data = _base()
    data["models"]["m"]["api_key"] = "${NOT_SET_ANYWHERE}"
    with pytest.raises(ConfigError) as ei:
        parse_config(data, env={})
    assert "NOT_SET_ANYWHERE" in _paths(ei.value)["models.m.api_key"]


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nagents: [unclosed\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "line" in ei.value.problems[0][0]
    assert "not valid YAML" in ei.value.problems[0][1]


def test_policy_file_problems(tmp_path: Path) -> None:
    data = _base()
    data["models"]["m"] = {"provider": "scripted", "policy": "missing.yaml"}
    with pytest.raises(ConfigError) as ei:
        parse_config(data, base_dir=tmp_path)
    assert "can't read policy file" in _paths(ei.value)["models.m.policy"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    data["models"]["m"] = {"provider": "scripted", "policy": "p.yaml"}
    assert parse_config(data, base_dir=tmp_path).models["m"].policy_spec == POLICY


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(["a"])
    assert "mapping" in str(ei.value)


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(ROOT / "configs" / "research.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "research-desk" in ok.output
    bad = tmp_path / "bad.yaml"
    data = _base()
    data["agents"]["a"]["handoffs"] = ["ghost"]
    bad.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "agents.a.handoffs.0" in res.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2


def test_cli_validate_imports_function_tools(tmp_path: Path) -> None:
    data = _base()
    data["tools"]["fn"]["python"] = ["swarm.examples.tools:no_such_function"]
    bad = tmp_path / "badfn.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "tools.fn.python.0" in res.output and "no_such_function" in res.output


def test_prices_are_checked_and_priced() -> None:
    data = _base()
    data["models"] = {"gpt": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1",
                              "model": "x", "price": {"input_per_mtok": -1}}}
    data["agents"] = {"a": {"model": "gpt"}}
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert "models.gpt.price.input_per_mtok" in _paths(exc.value)
    data["models"]["gpt"]["price"] = {"input_per_mtok": 3, "output_per_mtok": 15,
                                      "cached_input_per_mtok": 0.3}
    price = parse_config(data).models["gpt"].price
    # 800 fresh + 200 cached prompt tokens, 500 completion tokens.
    assert price.cost(1000, 500, cached_tokens=200) == pytest.approx(0.00996)


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.source == str(p)
    assert "not UTF-8 text: byte 0xe9 at position 9" in ei.value.problems[0][1]
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert "not UTF-8" in res.output
    (tmp_path / "policy.yaml").write_bytes(b"rules: []\n# \xff\n")
    data = _base()
    data["models"]["m"] = {"provider": "scripted", "policy": "policy.yaml"}
    with pytest.raises(ConfigError) as ei:
        parse_config(data, base_dir=tmp_path)
    why = _paths(ei.value)["models.m.policy"]
    assert "policy.yaml is not UTF-8 text: byte 0xff at position 12" in why


def test_duplicate_keys_are_rejected_with_their_line(tmp_path: Path) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text(yaml.safe_dump(_base()) + "agents:\n  a: {model: m}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    where, what = ei.value.problems[0]
    assert where.startswith(f"line {p.read_text().count(chr(10)) - 1},")
    assert "duplicate key 'agents' (first given on line" in what
    (tmp_path / "p.yaml").write_text("rules: []\nrules: []\n")
    data = _base()
    data["models"]["m"] = {"provider": "scripted", "policy": "p.yaml"}
    with pytest.raises(ConfigError) as ei:
        parse_config(data, base_dir=tmp_path)
    assert "duplicate key 'rules'" in _paths(ei.value)["models.m.policy"]
    # A merge key's values may be overridden: that is not a duplicate.
    (tmp_path / "merge.yaml").write_text(
        "name: t\nmodels: {m: {provider: openai, base_url: 'http://127.0.0.1:1/v1', model: x}}\n"
        "agents:\n  a: &a {model: m, handoffs: [b], max_sessions: 5}\n"
        "  b: {<<: *a, handoffs: []}\nsupervisor: {entry: a}\n")
    assert load_config(tmp_path / "merge.yaml").agents["b"].max_sessions == 5


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda d: d["agents"]["a"].update(replicas=True), "agents.a.replicas"),
    (lambda d: d["agents"]["b"].update(max_sessions=False), "agents.b.max_sessions"),
    (lambda d: d.update(a2a={"replicas": True}), "a2a.replicas"),
    (lambda d: d["models"]["m"].update(timeout_s=True), "models.m.timeout_s"),
    (lambda d: d.update(memory={"embedder": {"replicas": True}}), "memory.embedder.replicas"),
])
def test_booleans_are_not_numbers(mutate, path: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert _paths(ei.value)[path].startswith("expected a number, got ")


def test_numbers_and_booleans_where_they_belong_still_load() -> None:
    data = _base()
    data["agents"]["a"].update(replicas=3, num_cpus=1)
    data["models"]["m"].update(stream=False, timeout_s=5)
    cfg = parse_config(data)
    assert cfg.agents["a"].replicas == 3 and cfg.agents["a"].num_cpus == 1.0
    assert cfg.models["m"].stream is False


@pytest.mark.parametrize("store", ["embedded", "none", "memory", "redis://127.0.0.1:6379/0",
                                   "rediss://h:6380/1", "unix:///tmp/redis.sock",
                                   "file:///data/swarm", "s3://bucket/swarm", "gs://b/p",
                                   "abfss://c@acct.dfs.core.windows.net/p", "fsspec+ftp://h/p"])
def test_state_stores_that_open(store: str) -> None:
    assert parse_config(_base(state={"store": store})).state.store == store


def test_the_store_outage_waits_are_settable_and_checked(tmp_path: Path) -> None:
    from swarm.runtime.supervisor_actor import open_store
    from swarm.state import open_checkpointer

    state = parse_config(_base()).state
    assert (state.outage_timeout_s, state.outage_wait_s) == (30.0, 600.0)
    cfg = parse_config(_base(state={"outage_timeout_s": 2.5, "outage_wait_s": 0}))
    assert (cfg.state.outage_timeout_s, cfg.state.outage_wait_s) == (2.5, 0.0)
    for field, bad in (("outage_timeout_s", 0), ("outage_timeout_s", -1),
                       ("outage_wait_s", -1), ("outage_timeout_s", "soon")):
        with pytest.raises(ConfigError) as ei:
            parse_config(_base(state={field: bad}))
        assert f"state.{field}" in _paths(ei.value)
    # What opens the store for a swarm's processes passes the timeout on to Redis (and to a
    # tiered store's Redis tier); nothing is connected here.
    url = "redis://127.0.0.1:1/0"
    assert open_store(url, cfg).outage_timeout_s == 2.5
    assert open_store(url).outage_timeout_s == 30.0
    tiered = open_checkpointer(f"{url}|{tmp_path.as_uri()}|5", run_dir=tmp_path,
                               outage_timeout_s=4)
    assert tiered.hot.outage_timeout_s == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("store", ["mysql://x", "http://h/p", "postgres://db/0", "redis"])
def test_an_unknown_state_store_lists_what_is_accepted(store: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(_base(state={"store": store}))
    why = _paths(ei.value)["state.store"]
    assert "expected embedded, none, memory, a redis://, rediss:// or unix:// URL" in why
    assert "s3://" in why and "file://" in why
    with pytest.raises(ConfigError) as ei:
        parse_config(_base(state={"store": "embedded", "archive": "mysql://x/y"}))
    assert "pyarrow filesystem URI" in _paths(ei.value)["state.archive"]


@pytest.mark.parametrize(("tool", "where", "needle"), [
    ({"mcp": {"command": "srv", "headers": {"a": "b"}}}, "tools.t.mcp.headers", "unknown field"),
    ({"mcp": {"url": "ftp://h"}}, "tools.t.mcp.url", "http:// or https://"),
    ({"mcp": {"args": []}}, "tools.t.mcp", "command (a server started over stdio) or url"),
])
def test_a_union_error_names_the_users_keys_only(tool: dict, where: str, needle: str) -> None:
    data = _base(tools={"t": tool})
    data["agents"]["a"]["tools"] = []
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert [p for p, _ in ei.value.problems] == [where]
    assert needle in ei.value.problems[0][1]


def test_a_model_error_has_no_provider_in_its_path() -> None:
    data = _base()
    data["models"]["m"]["timeout_s"] = 0
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert list(_paths(ei.value)) == ["models.m.timeout_s"]
    data["models"]["m"] = {"model": "x"}
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert "provider is missing" in _paths(ei.value)["models.m"]


def test_cli_names_the_file_of_a_python_model_error(tmp_path: Path) -> None:
    data = _base()
    data["models"]["m"] = {"provider": "python", "factory": "swarm.examples.models:NoSuchModel"}
    p = tmp_path / "factory.yaml"
    p.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert f"invalid swarm config in {p}" in res.output.replace("\n", "")
    assert "models.m.factory" in res.output
