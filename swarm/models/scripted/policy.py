"""The scripted policy: deterministic replies chosen by rules over an OpenAI-format conversation.

A policy is YAML. Rules are tried in order and the first whose `when` holds answers; `default`
answers when none does. A reply is `content` (a Jinja2 template), `tool_calls`, or both::

    name: demo
    rules:
      - name: failed                      # optional; named in errors and replies
        when: {last_tool_error: true}     # the latest tool result starts with "ERROR"
        content: "Sorry, {{ last_tool }} failed: {{ last | replace('ERROR: ', '') }}"
      - name: search
        when: {agent: researcher, last_role: user, has_tool: search}
        max_times: 1                      # at most once per turn
        tool_calls:
          - {name: search, arguments: {query: "{{ task }}", k: 3}}
      - when: {agent: researcher, last_tool: search}
        content: "Top hit: {{ last_json[0].title }}"
    default: {content: "Nothing scripted for {{ agent }}."}

`when` keys (all must hold; a name-valued key takes a name or a list meaning any of):
`agent`, `last_role` (system/developer/user/assistant/tool), `last_tool` (tool whose result is
the latest message), `last_tool_error` (bool), `task_matches` / `last_matches` / `user_matches`
(`re.search` over the first user message / latest message / latest user message), `has_tool`
(all listed tools are offered), and counts, each an int (exactly) or `{min, max}`:
`tool_results` (tool messages so far), `turn_steps` (assistant messages since the latest user
message), `agent_steps` (assistant messages named after this agent, plus unnamed ones in this
turn) and `called: {tool: count}` (calls of each tool so far).

`max_times: N` repeats a tool-calling rule at most N times per turn: it stops matching once the
turn holds N assistant messages calling exactly its tools. `arguments` values are templates; a
value that is one `{{ expression }}` keeps the expression's type (list, number, ...).
`raw_arguments` is sent as is, to test malformed JSON. Template variables: `task`, `last`,
`last_role`, `last_tool`, `last_json`, `last_user`, `results` / `results_json` (tool name to its
latest result, as text / parsed JSON or None), `agent`, `step` (1-based step in this turn),
`times` (this rule's repeats so far), `counts`, `messages`, `tools`. Filters `sentences(n)` and
`words(n)` cut text. Tool-call ids are `call_<number of messages>_<index>`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal

from jinja2 import StrictUndefined, TemplateError, Undefined, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from swarm.errors import ConfigError, ModelError
from swarm.models.interface import ToolCall
from swarm.models.tokens import message_text

__all__ = [
    "Policy", "PolicyDecisionError", "PolicySpecError", "ScriptedReply", "count_tokens",
    "message_text",
]

Role = Literal["system", "developer", "user", "assistant", "tool"]
_CONTEXT_NAMES = frozenset({
    "task", "last", "last_role", "last_tool", "last_json", "last_user", "results", "results_json",
    "agent", "step", "times", "counts", "messages", "tools",
})


# ---- spec ---------------------------------------------------------------------------------------


def _as_tuple(v: Any) -> Any:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError("expected a name or a list of names")


def _as_count(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return {"min": v, "max": v}
    if not isinstance(v, dict):
        raise ValueError("expected a count: an int, or a mapping with min and/or max")
    return v


Names = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CountSpec(_Spec):
    """An inclusive count range; a bare int in YAML means exactly that many."""

    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> CountSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self

    def holds(self, n: int) -> bool:
        """Whether `n` lies in the range."""
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)


Count = Annotated[CountSpec, BeforeValidator(_as_count)]


class WhenSpec(_Spec):
    """Conditions of a rule; all given ones must hold."""

    agent: Names | None = None
    last_role: Annotated[tuple[Role, ...], BeforeValidator(_as_tuple)] | None = None
    last_tool: Names | None = None
    last_tool_error: bool | None = None
    task_matches: str | None = None
    last_matches: str | None = None
    user_matches: str | None = None
    has_tool: Names | None = None
    tool_results: Count | None = None
    turn_steps: Count | None = None
    agent_steps: Count | None = None
    called: dict[str, Count] | None = None


class ToolCallSpec(_Spec):
    """One tool call of a reply: templated `arguments` or literal `raw_arguments`."""

    name: str = Field(min_length=1)
    arguments: dict[str, Any] | None = None
    raw_arguments: str | None = None


class ReplySpec(_Spec):
    """A reply: content, tool calls, or both."""

    content: str | None = None
    tool_calls: list[ToolCallSpec] = []


class RuleSpec(ReplySpec):
    """A rule: conditions, an optional repeat bound, and the reply."""

    name: str | None = None
    when: WhenSpec = WhenSpec()
    max_times: int | None = Field(None, ge=1)


class PolicySpec(_Spec):
    """A whole policy file."""

    name: str = "policy"
    description: str = ""
    rules: list[RuleSpec] = []
    default: ReplySpec | None = None


# ---- errors and results -------------------------------------------------------------------------


class PolicySpecError(ConfigError):
    """A policy file is invalid; `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems)
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in problems)
        self.args = (f"invalid scripted policy:\n{lines}",)


class PolicyDecisionError(ModelError):
    """The policy could not answer: no rule matched, or a template failed to render."""


@dataclass(slots=True)
class ScriptedReply:
    """The policy's answer; tool-call arguments are raw JSON text."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    rule: str = ""

    @property
    def finish_reason(self) -> str:
        """`tool_calls` when the reply calls tools, else `stop`."""
        return "tool_calls" if self.tool_calls else "stop"

    def completion_tokens(self) -> int:
        """Approximate tokens of the reply."""
        n = count_tokens(self.content or "")
        for c in self.tool_calls:
            n += count_tokens(c.name) + count_tokens(c.arguments) + 3
        return n


def count_tokens(text: str) -> int:
    """A deterministic token estimate: one token per four characters, rounded up."""
    return math.ceil(len(text) / 4)


# ---- conversation view --------------------------------------------------------------------------


def _maybe_json(text: str) -> Any:
    s = text.lstrip()
    if not s or s[0] not in '[{"-0123456789tfn':
        return None
    try:
        return json.loads(s)
    except ValueError:
        return None


# Conversations whose tool-call counts a policy keeps (a bound: they come from requests).
_COUNTED_MAX = 50_000


class _Conv:
    """Lazy facts about one conversation, each computed once and only when a rule asks."""

    def __init__(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], agent: str,
                 counted: dict[int, tuple[int, Any, dict[str, int]]] | None = None):
        self.messages, self.tools, self.agent = messages, tools, agent
        # The policy's tool-call counts of conversations seen before (see `call_counts`).
        self._counted = counted
        self.last_msg: dict[str, Any] = messages[-1] if messages else {}
        self.last_role: str | None = self.last_msg.get("role")
        # State of the backward scan for tool results, resumed by each `latest_result` call.
        self._pos, self._found, self._pending = len(messages), {}, {}

    @cached_property
    def last(self) -> str:
        return message_text(self.last_msg.get("content"))

    @cached_property
    def last_tool(self) -> str | None:
        if self.last_role != "tool":
            return None
        if self.last_msg.get("name"):
            return str(self.last_msg["name"])
        call_id = self.last_msg.get("tool_call_id")
        for m in reversed(self.messages):  # the call sits just before its results
            if m.get("role") == "assistant":
                return next((_call_name(c) for c in m.get("tool_calls") or ()
                             if c.get("id") == call_id), None)
        return None

    @property
    def last_tool_error(self) -> bool:
        return self.last_role == "tool" and self.last.lstrip().startswith("ERROR")

    @cached_property
    def last_json(self) -> Any:
        return _maybe_json(self.last) if self.last_role == "tool" else None

    @cached_property
    def task(self) -> str:
        users = (m for m in self.messages if m.get("role") == "user")
        return next((message_text(m.get("content")) for m in users), "")

    @cached_property
    def last_user(self) -> str:
        users = (m for m in reversed(self.messages) if m.get("role") == "user")
        return next((message_text(m.get("content")) for m in users), "")

    @cached_property
    def tool_names(self) -> frozenset[str]:
        return frozenset((t.get("function") or t).get("name") for t in self.tools)

    @cached_property
    def turn(self) -> list[dict[str, Any]]:
        """Assistant messages since the latest user message (the current turn), newest first."""
        out = []
        for m in reversed(self.messages):
            role = m.get("role")
            if role == "user":
                break
            if role == "assistant":
                out.append(m)
        return out

    def repeats(self, signature: tuple[str, ...]) -> int:
        """Assistant messages in this turn whose tool calls are exactly `signature`."""
        n, size = 0, len(signature)
        for m in self.turn:
            calls = m.get("tool_calls") or ()
            # Only a message with as many calls can match: most are rejected by length alone.
            if len(calls) == size and _signature(m) == signature:
                n += 1
        return n

    def calls(self, tool: str, limit: int) -> int:
        """Calls of `tool` so far, at most `limit`."""
        return min(self.call_counts.get(tool, 0), limit)

    @cached_property
    def call_counts(self) -> dict[str, int]:
        """Tool calls so far by tool name. The runtime only appends to a conversation, so the
        counts of one seen before (the same list, its last counted message still in place)
        are extended from where they stopped: a call costs what the conversation added since
        the last, not its length."""
        msgs, counted = self.messages, self._counted
        start, counts = 0, {}
        seen = counted.get(id(msgs)) if counted is not None else None
        if seen is not None and 0 < seen[0] <= len(msgs) and msgs[seen[0] - 1] is seen[1]:
            start, counts = seen[0], dict(seen[2])
        for m in msgs[start:] if start else msgs:
            calls = m.get("tool_calls")
            if calls:
                for c in calls:
                    # `_call_name(c)`, with the common case (a dict with a str name) inline.
                    fn = c.get("function")
                    name = fn.get("name") if type(fn) is dict else None
                    if type(name) is not str or not name:
                        name = _call_name(c)
                    counts[name] = counts.get(name, 0) + 1
        if counted is not None and msgs:
            if len(counted) >= _COUNTED_MAX:
                del counted[next(iter(counted))]  # the oldest conversation's
            counted[id(msgs)] = (len(msgs), msgs[-1], counts)
        return counts

    def latest_result(self, tool: str | None) -> Any:
        """The latest result message of `tool`, by a resumable backward scan; None: all tools."""
        found, pending, i = self._found, self._pending, self._pos
        while i > 0 and (tool is None or tool not in found):
            i -= 1
            m = self.messages[i]
            role = m.get("role")
            if role == "tool":
                if m.get("name"):
                    found.setdefault(m["name"], m)
                else:  # named by its call, which comes earlier: resolved when the scan gets there
                    pending.setdefault(m.get("tool_call_id"), m)
            elif pending and role == "assistant":
                for c in m.get("tool_calls") or ():
                    if (hit := pending.pop(c.get("id"), None)) is not None:
                        found.setdefault(_call_name(c), hit)
        self._pos = i
        return found if tool is None else found.get(tool)

    @cached_property
    def results(self) -> _Results:
        return _Results(self, parse=False)

    @cached_property
    def results_json(self) -> _Results:
        return _Results(self, parse=True)

    @cached_property
    def counts(self) -> dict[str, Any]:
        """Counts over the whole conversation, in one pass."""
        called: dict[str, int] = {}
        tool_results = assistant = agent_steps = 0
        for m in self.messages:
            role = m.get("role")
            if role == "tool":
                tool_results += 1
            elif role == "assistant":
                assistant += 1
                agent_steps += m.get("name") == self.agent
                for c in m.get("tool_calls") or ():
                    name = _call_name(c)
                    called[name] = called.get(name, 0) + 1
        agent_steps += sum(1 for m in self.turn if not m.get("name"))
        return {"tool_results": tool_results, "assistant_steps": assistant,
                "turn_steps": len(self.turn), "agent_steps": agent_steps, "called": called}

    def context(self, needs: frozenset[str], times: Callable[[], int]) -> dict[str, Any]:
        """Template variables, only those the templates use (`times` counted only if used)."""
        extra = {"step": lambda: len(self.turn) + 1, "times": times,
                 "tools": lambda: sorted(self.tool_names)}
        return {n: extra[n]() if n in extra else getattr(self, n) for n in needs}


class _Results(Mapping[str, Any]):
    """Tool name to its latest result (text, or parsed JSON), looked up lazily from the end."""

    def __init__(self, conv: _Conv, parse: bool) -> None:
        self._conv, self._parse, self._cache = conv, parse, {}

    def __getitem__(self, tool: str) -> Any:
        if tool not in self._cache:
            m = self._conv.latest_result(tool)
            if m is None:
                raise KeyError(tool)
            text = message_text(m.get("content"))
            self._cache[tool] = _maybe_json(text) if self._parse else text
        return self._cache[tool]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._conv.latest_result(None)))

    def __len__(self) -> int:
        return len(self._conv.latest_result(None))

    def __repr__(self) -> str:
        return repr(dict(self))


def _call_name(call: dict[str, Any]) -> str:
    return str((call.get("function") or {}).get("name") or "")


def _signature(m: dict[str, Any]) -> tuple[str, ...]:
    return tuple(_call_name(c) for c in m.get("tool_calls") or ())


# ---- compiled policy ----------------------------------------------------------------------------

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_SENTENCE_END = re.compile(r"(?<=[.!?]) ")


def _sentences(text: Any, n: int = 2) -> str:
    """The first `n` sentences of `text`, with whitespace collapsed."""
    return " ".join(_SENTENCE_END.split(" ".join(str(text).split()))[:n])


_ENV.filters["sentences"] = _sentences
_ENV.filters["words"] = lambda text, n=20: " ".join(str(text).split()[:n])
_EXPR = re.compile(r"^\{\{(?P<e>(?:(?!\{\{|\}\}).)*)\}\}$", re.S)
Render = Callable[[dict[str, Any]], Any]
Check = Callable[[_Conv], bool]


class _Compiler:
    """Compiles spec strings once, collecting problems with their field paths."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.needs: set[str] = set()  # template variables used by the reply being compiled
        self.templates = 0

    def template(self, src: str, path: str, native: bool = False) -> Render | None:
        """A render function, or None for plain text; `native` keeps a lone expression's type."""
        if "{{" not in src and "{%" not in src:
            return None
        try:
            used = meta.find_undeclared_variables(_ENV.parse(src))
            m = _EXPR.match(src.strip()) if native else None
            if m:
                expr = _ENV.compile_expression(m.group("e"), undefined_to_none=False)
                render: Render = lambda ctx: _defined(expr(**ctx))  # noqa: E731
            else:
                render = _ENV.from_string(src).render
        except TemplateError as e:
            self.problems.append((path, f"template error: {e}"))
            return None
        if used - _CONTEXT_NAMES:
            unknown = sorted(used - _CONTEXT_NAMES)
            self.problems.append((path, f"unknown template variable(s) {unknown}; "
                                  f"known: {sorted(_CONTEXT_NAMES)}"))
        self.needs |= used
        self.templates += 1
        return render

    def value(self, v: Any, path: str) -> Any:
        """An argument value with its templates replaced by render functions."""
        if isinstance(v, str):
            return self.template(v, path, native=True) or v
        if isinstance(v, dict):
            return {k: self.value(x, f"{path}.{k}") for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x, f"{path}.{i}") for i, x in enumerate(v)]
        return v


def _defined(v: Any) -> Any:
    if isinstance(v, Undefined):
        v._fail_with_undefined_error()
    return v


def _build(v: Any, ctx: dict[str, Any]) -> Any:
    if callable(v):
        return v(ctx)
    if isinstance(v, dict):
        return {k: _build(x, ctx) for k, x in v.items()}
    if isinstance(v, list):
        return [_build(x, ctx) for x in v]
    return v


class _Reply:
    """A compiled reply; tool-call arguments without templates are JSON-encoded once."""

    def __init__(self, spec: ReplySpec, name: str, path: str, comp: _Compiler) -> None:
        comp.needs = set()
        if spec.content is None and not spec.tool_calls:
            comp.problems.append((path, "a reply needs 'content' or 'tool_calls'"))
        if getattr(spec, "max_times", None) is not None and not spec.tool_calls:
            comp.problems.append((path, "'max_times' needs 'tool_calls' (it counts tool calls)"))
        self.name, self.content = name, spec.content
        self.render_content = None if spec.content is None else comp.template(
            spec.content, f"{path}.content")
        self.calls: list[tuple[str, Any, str | None]] = []  # (name, builder, constant JSON)
        for i, c in enumerate(spec.tool_calls):
            if c.raw_arguments is not None and c.arguments is not None:
                comp.problems.append((f"{path}.tool_calls.{i}", "give 'arguments' or "
                                      "'raw_arguments', not both"))
            if c.raw_arguments is not None:
                self.calls.append((c.name, None, c.raw_arguments))
                continue
            before = comp.templates
            built = comp.value(c.arguments or {}, f"{path}.tool_calls.{i}.arguments")
            const = json.dumps(built) if comp.templates == before else None
            self.calls.append((c.name, built, const))
        self.signature = tuple(c.name for c in spec.tool_calls)
        self.needs = frozenset(comp.needs)

    def render(self, conv: _Conv, *, is_default: bool = False) -> ScriptedReply:
        if self.needs:
            sig = None if is_default else self.signature  # `times` is 0 in the default reply
            ctx = conv.context(self.needs, lambda: conv.repeats(sig) if sig else 0)
        else:
            ctx = {}
        try:
            content = self.content if self.render_content is None else self.render_content(ctx)
            calls = [
                ToolCall(id=f"call_{len(conv.messages)}_{i}", name=name,
                         arguments=const if const is not None else json.dumps(_build(b, ctx)))
                for i, (name, b, const) in enumerate(self.calls)
            ]
        except Exception as e:  # any failure inside a template is the policy's, not the caller's
            raise PolicyDecisionError(
                f"scripted rule {self.name!r} failed to render for agent {conv.agent!r}: "
                f"{type(e).__name__}: {e}") from None
        return ScriptedReply(content=content, tool_calls=calls, rule=self.name)


class _Rule:
    """A compiled rule: one check per condition given, cheapest first."""

    def __init__(self, spec: RuleSpec, i: int, comp: _Compiler) -> None:
        path, w = f"rules.{i}", spec.when
        self.agents = frozenset(w.agent) if w.agent else None
        self.reply = _Reply(spec, spec.name or path, path, comp)
        checks: list[Check] = []
        if w.last_role is not None:
            roles = frozenset(w.last_role)
            checks.append(lambda c: c.last_role in roles)
        if w.last_tool is not None:
            tools = frozenset(w.last_tool)
            checks.append(lambda c: c.last_tool in tools)
        if w.last_tool_error is not None:
            err = w.last_tool_error
            checks.append(lambda c: c.last_tool_error == err)
        if w.has_tool is not None:
            wanted = frozenset(w.has_tool)
            checks.append(lambda c: wanted <= c.tool_names)
        for key, attr in (("last_matches", "last"), ("task_matches", "task"),
                          ("user_matches", "last_user")):
            if getattr(w, key) is not None:
                try:
                    pattern = re.compile(getattr(w, key))
                except re.error as e:
                    comp.problems.append((f"{path}.when.{key}", f"invalid regex: {e}"))
                    continue
                checks.append(lambda c, p=pattern, a=attr: p.search(getattr(c, a)) is not None)
        if w.turn_steps is not None:
            steps = w.turn_steps
            checks.append(lambda c: steps.holds(len(c.turn)))
        for key in ("tool_results", "agent_steps"):
            if getattr(w, key) is not None:
                checks.append(lambda c, r=getattr(w, key), k=key: r.holds(c.counts[k]))
        for tool, rng in (w.called or {}).items():
            # Count from the end only as far as the range needs: past max, or up to min.
            limit = rng.max + 1 if rng.max is not None else (rng.min or 0)
            checks.append(lambda c, r=rng, t=tool, n=limit: r.holds(c.calls(t, n)))
        if spec.max_times is not None:
            limit, sig = spec.max_times, self.reply.signature
            checks.append(lambda c: c.repeats(sig) < limit)
        self.checks = tuple(checks)

    def matches(self, conv: _Conv) -> bool:
        return all(check(conv) for check in self.checks)


class Policy:
    """A validated, compiled scripted policy; `decide` picks the reply for a conversation."""

    def __init__(self, spec: PolicySpec) -> None:
        comp = _Compiler()
        self.spec, self.name = spec, spec.name
        self._rules = [_Rule(r, i, comp) for i, r in enumerate(spec.rules)]
        self._default = (None if spec.default is None
                         else _Reply(spec.default, "default", "default", comp))
        if comp.problems:
            raise PolicySpecError(comp.problems)
        self._by_agent: dict[str, list[_Rule]] = {}
        self._counted: dict[int, tuple[int, Any, dict[str, int]]] = {}

    @classmethod
    def from_spec(cls, spec: Any) -> Policy:
        """Validate a parsed policy YAML and compile its regexes and templates."""
        if not isinstance(spec, dict):
            raise PolicySpecError([("", f"expected a mapping, got {type(spec).__name__}")])
        try:
            return cls(PolicySpec.model_validate(spec))
        except ValidationError as e:
            problems = [
                (".".join(str(p) for p in err["loc"]),
                 "unknown field" if err["type"] == "extra_forbidden"
                 else err["msg"].removeprefix("Value error, "))
                for err in e.errors()
            ]
            raise PolicySpecError(problems) from None

    def _rules_for(self, agent: str) -> list[_Rule]:
        rules = self._by_agent.get(agent)
        if rules is None:
            rules = [r for r in self._rules if r.agents is None or agent in r.agents]
            if len(self._by_agent) < 1024:  # agent names come from requests: bound the cache
                self._by_agent[agent] = rules
        return rules

    def decide(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               agent: str = "", *, same_lists: bool = True) -> ScriptedReply:
        """The reply of the first matching rule (or the default); raises PolicyDecisionError.

        `same_lists`: the caller passes the same list for a conversation each time, only
        appended to (the runtime does), so its tool-call counts are kept between calls; False
        for lists made afresh per call (an HTTP request's), which would only fill the cache."""
        conv = _Conv(messages, tools or [], agent, self._counted if same_lists else None)
        for rule in self._rules_for(agent):
            if rule.matches(conv):
                return rule.reply.render(conv)
        if self._default is not None:
            return self._default.render(conv, is_default=True)
        raise PolicyDecisionError(
            f"no rule of scripted policy {self.name!r} matched agent {agent!r} "
            f"(last message role {conv.last_role!r}, last tool {conv.last_tool!r})")
