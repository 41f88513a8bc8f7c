"""The scripted policy engine and the in-process ScriptedModel."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.config import LatencyConfig, ScriptedModelConfig
from swarm.errors import ConfigError, ModelError
from swarm.models.interface import ModelRequest
from swarm.models.scripted.model import ScriptedModel, simulated_latency_s
from swarm.models.scripted.policy import (
    Policy,
    PolicyDecisionError,
    PolicySpecError,
    count_tokens,
)

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"


def load(name: str) -> Policy:
    return Policy.from_spec(yaml.safe_load((POLICIES / f"{name}.yaml").read_text()))


def tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in names]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def called(call_id: str, name: str, args: str = "{}") -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}


def result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# ---- matching -----------------------------------------------------------------------------------


def test_first_matching_rule_wins_and_default_answers_the_rest() -> None:
    p = Policy.from_spec({
        "rules": [
            {"name": "a", "when": {"agent": ["x", "y"], "last_role": "user"}, "content": "A"},
            {"name": "b", "when": {"agent": "x"}, "content": "B"},
        ],
        "default": {"content": "D"},
    })
    assert p.decide([user("hi")], [], "y").content == "A"
    assert p.decide([user("hi"), {"role": "assistant", "content": "A"}], [], "x").rule == "b"
    assert p.decide([user("hi")], [], "z").content == "D"


def test_no_match_without_default_is_a_model_error_naming_the_agent() -> None:
    p = Policy.from_spec({"rules": [{"when": {"agent": "x"}, "content": "A"}]})
    with pytest.raises(PolicyDecisionError, match="agent 'nobody'") as info:
        p.decide([user("hi")], [], "nobody")
    assert isinstance(info.value, ModelError)


def test_last_tool_is_resolved_from_the_call_id_and_errors_are_seen() -> None:
    p = Policy.from_spec({"rules": [
        {"when": {"last_tool_error": True}, "content": "failed {{ last_tool }}"},
        {"when": {"last_tool": "search"}, "content": "searched"},
        {"when": {"last_tool": ["read_doc", "other"]}, "content": "read"},
    ]})
    conv = [user("q"), called("c1", "search"), result("c1", "[]")]
    assert p.decide(conv).content == "searched"
    assert p.decide([*conv[:2], result("c1", "ERROR: index down")]).content == "failed search"
    named = {"role": "tool", "tool_call_id": "zz", "name": "read_doc", "content": "{}"}
    assert p.decide([user("q"), named]).content == "read"


def test_regexes_over_task_last_and_latest_user_message() -> None:
    p = Policy.from_spec({"rules": [
        {"when": {"task_matches": "(?i)^weather"}, "content": "task"},
        {"when": {"last_matches": r"\d{3}"}, "content": "last"},
        {"when": {"user_matches": "handoff"}, "content": "user"},
    ], "default": {"content": "none"}})
    assert p.decide([user("Weather in Paris?")]).content == "task"
    assert p.decide([user("x"), {"role": "assistant", "content": "code 404"}]).content == "last"
    assert p.decide([user("x"), {"role": "assistant", "content": "ok"},
                     user("a handoff")]).content == "user"
    assert p.decide([user("x")]).content == "none"


def test_has_tool_requires_every_listed_tool() -> None:
    p = Policy.from_spec({"rules": [{"when": {"has_tool": ["a", "b"]}, "content": "both"}],
                         "default": {"content": "no"}})
    assert p.decide([user("x")], tools("a", "b", "c")).content == "both"
    assert p.decide([user("x")], tools("a")).content == "no"


def test_counts_exact_and_ranges() -> None:
    p = Policy.from_spec({"rules": [
        {"when": {"called": {"echo": {"min": 2}}}, "content": "twice"},
        {"when": {"tool_results": 1, "turn_steps": 1}, "content": "once"},
        {"when": {"agent_steps": {"max": 0}}, "content": "fresh"},
    ], "default": {"content": "other"}})
    one = [user("x"), called("c1", "echo"), result("c1", "e")]
    two = [*one, called("c2", "echo"), result("c2", "e")]
    assert p.decide([user("x")], [], "a").content == "fresh"
    assert p.decide(one, [], "a").content == "once"
    assert p.decide(two, [], "a").content == "twice"


def test_call_counts_of_a_growing_conversation_match_a_fresh_count() -> None:
    # `called` counts are kept per conversation and extended as it grows; each decision must
    # be the one a fresh policy makes on a copy of the same messages.
    spec = {"rules": [
        {"when": {"called": {"echo": {"max": 2}}}, "tool_calls": [{"name": "echo"}]},
        {"when": {"called": {"echo": {"min": 3}, "look": {"max": 0}}},
         "tool_calls": [{"name": "look"}]},
    ], "default": {"content": "done"}}
    kept, conv, seen = Policy.from_spec(spec), [user("x")], []
    for i in range(8):
        reply = kept.decide(conv, [], "a")
        assert reply.content == Policy.from_spec(spec).decide(list(conv), [], "a").content
        assert [c.name for c in reply.tool_calls] == \
            [c.name for c in Policy.from_spec(spec).decide(list(conv), [], "a").tool_calls]
        seen.append([c.name for c in reply.tool_calls] or reply.content)
        if not reply.tool_calls:
            break
        conv.append(called(f"c{i}", reply.tool_calls[0].name))
        conv.append(result(f"c{i}", "r"))
    assert seen == [["echo"], ["echo"], ["echo"], ["look"], "done"]
    # The same list cut back and grown again differently is counted afresh, not from the
    # counts it had before.
    del conv[3:]
    conv.append(called("d1", "look"))
    conv.append(result("d1", "r"))
    for c in (conv, conv[:3]):
        got, fresh = kept.decide(c, [], "a"), Policy.from_spec(spec).decide(list(c), [], "a")
        assert (got.content, got.tool_calls) == (fresh.content, fresh.tool_calls)
    assert kept.decide(conv, [], "a").tool_calls[0].name == "echo"  # one echo call, not five


def test_agent_steps_count_named_messages_across_handoffs() -> None:
    p = Policy.from_spec({"rules": [
        {"when": {"agent_steps": 2}, "content": "two"}], "default": {"content": "{{ counts }}"}})
    conv = [user("x"), {"role": "assistant", "name": "a", "content": "1"},
            {"role": "assistant", "name": "b", "content": "other agent"}, user("back to a"),
            {"role": "assistant", "content": "2 (unnamed, this turn)"}]
    assert p.decide(conv, [], "a").content == "two"


def test_max_times_repeats_a_tool_call_then_falls_through() -> None:
    p = load("testing")
    conv = [user("loop please")]
    for i in range(1, 4):
        reply = p.decide(conv, tools("echo"), "looper")
        assert reply.rule == "echo-loop"
        assert json.loads(reply.tool_calls[0].arguments) == {"text": f"ping {i}"}
        call = reply.tool_calls[0]
        conv += [called(call.id, "echo", call.arguments), result(call.id, f"echo: ping {i}")]
    final = p.decide(conv, tools("echo"), "looper")
    assert final.tool_calls == [] and final.finish_reason == "stop"
    assert final.content == "echoed 3 times; last echo: echo: ping 3"
    # A new user message starts a new turn: the loop runs again.
    again = p.decide([*conv, {"role": "assistant", "content": final.content}, user("more")],
                     tools("echo"), "looper")
    assert again.rule == "echo-loop"


# ---- replies and templates ----------------------------------------------------------------------


def test_template_context_and_native_argument_types() -> None:
    p = Policy.from_spec({"rules": [{
        "when": {"last_tool": "search"},
        "content": "{{ agent }}|{{ task }}|{{ last_role }}|{{ step }}|{{ tools | join(',') }}",
        "tool_calls": [{"name": "read_doc", "arguments": {
            "doc_id": "{{ last_json[0].id }}",
            "ids": "{{ last_json | map(attribute='id') | list }}", "k": 3,
            "label": "doc {{ last_json[0].id }}", "nested": {"q": ["{{ task }}"]},
            "copy": "{{ results_json.search[1].score }}"}}],
    }]})
    conv = [{"role": "system", "content": "sys"}, user("cats?"), called("c1", "search"),
            result("c1", json.dumps([{"id": 7, "score": 0.9}, {"id": 8, "score": 0.5}]))]
    reply = p.decide(conv, tools("search", "read_doc"), "researcher")
    assert reply.content == "researcher|cats?|tool|2|read_doc,search"
    assert json.loads(reply.tool_calls[0].arguments) == {
        "doc_id": 7, "ids": [7, 8], "k": 3, "label": "doc 7", "nested": {"q": ["cats?"]},
        "copy": 0.5}
    assert reply.tool_calls[0].id == "call_4_0"
    assert reply.finish_reason == "tool_calls"


def test_results_hold_the_latest_result_per_tool_and_filters_cut_text() -> None:
    p = Policy.from_spec({"rules": [{"content": (
        "{{ results.a }}/{{ results_json.b.n }}/{{ results_json.a }}/"
        "{{ 'One. Two! Three? Four.' | sentences(2) }}/{{ 'a b c d' | words(3) }}")}]})
    conv = [user("x"), called("1", "a"), result("1", "old"), called("2", "b"),
            result("2", '{"n": 5}'), called("3", "a"), result("3", "new")]
    assert p.decide(conv).content == "new/5/None/One. Two!/a b c"


def test_raw_arguments_are_sent_verbatim() -> None:
    reply = load("testing").decide([user("go")], tools("echo"), "broken")
    assert reply.tool_calls[0].arguments == '{"text": "unterminated'
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.tool_calls[0].arguments)


@pytest.mark.parametrize("template", [
    "{{ last_json.title }}",  # undefined: strict, never silently empty
    "{{ 1 / 0 }}",
    "{{ messages.__class__.__mro__ }}",  # the sandbox refuses internals
])
def test_render_failure_is_a_decision_error_naming_the_rule(template: str) -> None:
    p = Policy.from_spec({"rules": [{"name": "fragile", "content": template}]})
    with pytest.raises(PolicyDecisionError, match="fragile"):
        p.decide([user("x")])


def test_decide_is_deterministic_and_does_not_mutate_its_input() -> None:
    p = load("research")
    conv = [user("What is prefix caching?")]
    snapshot = json.dumps(conv)
    first = p.decide(conv, tools("transfer_to_researcher"), "planner")
    for _ in range(3):
        assert p.decide(conv, tools("transfer_to_researcher"), "planner") == first
    assert json.dumps(conv) == snapshot


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "path", "text"), [
    ({"rules": [{"content": "x", "when": {"last_tool": 3}}]}, "rules.0.when.last_tool",
     "name or a list of names"),
    ({"rules": [{"content": "x"}, {"content": "x"}, {"content": "x", "when": {"bogus": 1}}]},
     "rules.2.when.bogus", "unknown field"),
    ({"rules": [{"content": "x", "when": {"last_role": "robot"}}]}, "rules.0.when.last_role.0",
     "'user'"),
    ({"rules": [{"when": {}}]}, "rules.0", "'content' or 'tool_calls'"),
    ({"rules": [{"content": "x", "max_times": 2}]}, "rules.0", "needs 'tool_calls'"),
    ({"rules": [{"tool_calls": [{"name": "t", "arguments": {}, "raw_arguments": "{}"}]}]},
     "rules.0.tool_calls.0", "not both"),
    ({"rules": [{"content": "x", "when": {"called": {"t": {"min": 3, "max": 1}}}}]},
     "rules.0.when.called.t", "min is greater than max"),
    ({"rules": [{"content": "x", "when": {"task_matches": "("}}]}, "rules.0.when.task_matches",
     "invalid regex"),
    ({"rules": [{"content": "{{ nope }}"}]}, "rules.0.content", "unknown template variable"),
    ({"rules": [{"tool_calls": [{"name": "t", "arguments": {"a": ["{{ task"]}}]}]},
     "rules.0.tool_calls.0.arguments.a.0", "template error"),
    ({"default": {"content": "{% if %}"}}, "default.content", "template error"),
])
def test_invalid_specs_name_the_field_path(spec: dict, path: str, text: str) -> None:
    with pytest.raises(PolicySpecError) as info:
        Policy.from_spec(spec)
    assert any(p == path and text in msg for p, msg in info.value.problems), info.value.problems
    assert f"{path}: " in str(info.value)


def test_a_non_mapping_spec_is_rejected() -> None:
    with pytest.raises(PolicySpecError, match="expected a mapping"):
        Policy.from_spec(["rules"])


def test_config_loader_validates_policies_through_from_spec(tmp_path: Path) -> None:
    from swarm.config import parse_config

    (tmp_path / "bad.yaml").write_text("rules: [{when: {agent: 3}, content: x}]")
    data = {"name": "s", "models": {"m": {"provider": "scripted", "policy": "bad.yaml"}},
            "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"}}
    with pytest.raises(ConfigError, match=r"rules\.0\.when\.agent"):
        parse_config(data, base_dir=tmp_path)
    cfg = parse_config({**data, "models": {"m": {"provider": "scripted", "policy": str(
        POLICIES / "research.yaml")}}}, base_dir=tmp_path)
    assert Policy.from_spec(cfg.models["m"].policy_spec).name == "research"


# ---- the research policy ------------------------------------------------------------------------

DOCS = {
    "d1": {"id": "d1", "title": "Prefix caching in vLLM",
           "text": "Prefix caching reuses the KV cache of shared prompt prefixes. Multi-turn "
                   "agents resend the whole transcript, so most of each prompt is cached. "
                   "This cuts time to first token."},
    "d2": {"id": "d2", "title": "Speculative decoding", "text": "Drafts tokens. Verifies them."},
}
AGENT_TOOLS = {
    "planner": tools("transfer_to_researcher", "transfer_to_writer"),
    "researcher": tools("search", "read_doc", "transfer_to_writer"),
    "writer": tools("save_note"),
}


def fake_tool(name: str, args: dict[str, Any], fail: str | None) -> str:
    if name == fail:
        return f"ERROR: {name} is unavailable"
    if name == "search":
        return json.dumps([{**{k: d[k] for k in ("id", "title")}, "snippet": d["text"][:20],
                            "score": s} for d, s in ((DOCS["d1"], 0.9), (DOCS["d2"], 0.2))])
    if name == "read_doc":
        return json.dumps(DOCS[args["doc_id"]])
    assert name == "save_note" and args["title"] and args["text"]
    return json.dumps({"note_id": "n-1"})


def run_flow(task: str, fail: str | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Drive the research policy the way the runtime does: transcript carried across handoffs."""
    policy, agent = load("research"), "planner"
    transcript: list[dict[str, Any]] = [user(task)]
    trace = []
    for _ in range(20):
        messages = [{"role": "system", "content": f"You are the {agent}."}, *transcript]
        reply = policy.decide(messages, AGENT_TOOLS[agent], agent)
        trace.append((agent, reply.rule))
        transcript.append({"role": "assistant", "content": reply.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls] or None})
        if not reply.tool_calls:
            return reply.content or "", trace
        for c in reply.tool_calls:
            args = json.loads(c.arguments)
            if c.name.startswith("transfer_to_"):
                transcript.append(result(c.id, "transferred"))
                transcript.append(user(args["message"]))
                agent = c.name.removeprefix("transfer_to_")
            else:
                transcript.append(result(c.id, fake_tool(c.name, args, fail)))
    raise AssertionError(f"the flow did not finish: {trace}")


def test_research_policy_walks_the_whole_flow_from_tool_results() -> None:
    answer, trace = run_flow("How does prefix caching help multi-turn agents?")
    assert trace == [
        ("planner", "planner-to-researcher"), ("researcher", "researcher-search"),
        ("researcher", "researcher-read-top-hit"), ("researcher", "researcher-to-writer"),
        ("writer", "writer-save-note"), ("writer", "writer-answer"),
    ]
    assert '"Prefix caching in vLLM"' in answer
    assert "Prefix caching reuses the KV cache of shared prompt prefixes. Multi-turn" in answer
    assert "This cuts time" not in answer  # two sentences, not the whole document
    assert "n-1" in answer


@pytest.mark.parametrize("tool", ["search", "read_doc", "save_note"])
def test_research_policy_explains_a_tool_error_instead_of_looping(tool: str) -> None:
    answer, trace = run_flow("anything", fail=tool)
    assert trace[-1][1] == "tool-failed"
    assert f"the {tool} tool failed: {tool} is unavailable" in answer


def test_research_policy_handles_an_empty_search() -> None:
    p = load("research")
    conv = [user("q"), called("c1", "search"), result("c1", "[]")]
    assert p.decide(conv, AGENT_TOOLS["researcher"], "researcher").content == (
        "I found no documents about: q")


# ---- ScriptedModel and cost ---------------------------------------------------------------------


async def test_scripted_model_reports_usage_and_simulated_latency() -> None:
    model = ScriptedModel(load("research"), latency=LatencyConfig(fixed_ms=30), name="s")
    req = ModelRequest(messages=[user("question " * 40)], tools=AGENT_TOOLS["planner"],
                       agent="planner", session_id="s1")
    start = time.perf_counter()
    resp = await model.complete(req)
    assert time.perf_counter() - start >= 0.03
    assert resp.finish_reason == "tool_calls" and resp.model == "s"
    assert resp.tool_calls[0].name == "transfer_to_researcher"
    assert resp.usage.input_tokens > count_tokens("question " * 40)
    assert resp.usage.output_tokens > 0


def test_from_config_needs_the_loaded_policy() -> None:
    cfg = ScriptedModelConfig(provider="scripted", policy="p.yaml")
    with pytest.raises(ConfigError, match="not loaded"):
        ScriptedModel.from_config(cfg)
    spec = yaml.safe_load((POLICIES / "testing.yaml").read_text())
    model = ScriptedModel.from_config(cfg.model_copy(update={"policy_spec": spec}))
    assert model.policy.name == "testing"


def test_latency_jitter_is_deterministic_and_bounded() -> None:
    lat = LatencyConfig(fixed_ms=100, per_input_token_ms=1, per_output_token_ms=2, jitter=0.1)
    values = [simulated_latency_s(lat, 10, 5, key=f"k{i}") for i in range(50)]
    assert values == [simulated_latency_s(lat, 10, 5, key=f"k{i}") for i in range(50)]
    assert all(0.108 <= v <= 0.132 for v in values) and len(set(values)) > 10
    assert simulated_latency_s(None, 10, 5) == 0.0


def test_count_tokens_rounds_up() -> None:
    assert [count_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]


def test_decide_on_a_long_conversation_fits_the_step_budget() -> None:
    policy = load("research")
    doc = json.dumps(DOCS["d1"])
    conv: list[dict[str, Any]] = [{"role": "system", "content": "You are the writer."},
                                  user("How does prefix caching help?")]
    for i in range(99):  # 200 messages: alternating tool calls and results
        name = "read_doc" if i % 2 else "search"
        conv += [called(f"c{i}", name), result(f"c{i}", doc if name == "read_doc" else "[]")]
    conv[-1] = user("Write it up.")
    assert len(conv) == 200
    times = []
    for _ in range(200):
        start = time.perf_counter()
        reply = policy.decide(conv, AGENT_TOOLS["writer"], "writer")
        times.append(time.perf_counter() - start)
    assert reply.rule == "writer-save-note"
    assert statistics.median(times) < 1e-3  # the whole orchestration step budget
