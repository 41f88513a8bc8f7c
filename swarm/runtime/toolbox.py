"""An agent's toolbox: the tools its config grants, plus synthesized handoff tools."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from swarm.errors import ConfigError
from swarm.tools.access import Grant, parse_grant
from swarm.tools.interface import ToolSource, ToolSpec

log = logging.getLogger(__name__)
# How soon, and at most how often, a source that could not list its tools is asked again.
RELIST_FIRST_S = 1.0
RELIST_MAX_S = 30.0

HANDOFF_PREFIX = "transfer_to_"


def handoff_tool_name(agent: str) -> str:
    """The name of the tool that hands a task to `agent`."""
    return f"{HANDOFF_PREFIX}{agent}"


def _handoff_schema(agent: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": handoff_tool_name(agent),
            "description": f"Hand the task to the {agent} agent, with a message saying what it "
            "should do next.",
            "parameters": {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "what to do next"}},
                "required": ["message"],
                "additionalProperties": False,
            },
        },
    }


@dataclass(frozen=True, slots=True)
class ToolEntry:
    """A granted tool and the source that serves it."""

    spec: ToolSpec
    source: ToolSource


class Toolbox:
    """The tools one agent may see and call, resolved once when the agent starts.

    Only granted tools are in `schemas` and only they resolve, so access control holds in the step
    loop itself, not just in the prompt; a call of a known but ungranted tool gets `refusal`.
    """

    def __init__(self, entries: dict[str, ToolEntry], handoffs: list[str], *, agent: str = "",
                 forbidden: dict[str, str] | None = None) -> None:
        self.agent = agent
        self._entries = entries
        # Tools that exist but this agent may not call, with why (see `refusal`).
        self._forbidden = forbidden or {}
        # Start-up warnings (grant globs that match nothing), for the agent's start problems.
        self.problems: list[str] = []
        self.unlisted: list[str] = []  # servers that could not list their tools, when last asked
        self._handoffs = {handoff_tool_name(a): a for a in handoffs}
        self.schemas: list[dict[str, Any]] = [e.spec.openai_schema() for e in entries.values()]
        self.schemas.extend(_handoff_schema(a) for a in handoffs)
        # Set by `build`: what to resolve again when a source's tool list changes.
        self._rules: _Rules | None = None
        self._stale = False
        self._refresher: asyncio.Task[None] | None = None
        self._relister: asyncio.Task[None] | None = None
        self._poked = float("-inf")
        # Listings `_relist` just got, which the next `_refresh` uses instead of asking again.
        self._fresh: dict[str, list[ToolSpec]] = {}

    @property
    def qualified(self) -> list[str]:
        """The granted tools as server.tool."""
        return [f"{e.source.name}.{e.spec.name}" for e in self._entries.values()]

    @property
    def names(self) -> list[str]:
        """Names the model can call, tools first, then handoffs."""
        return [*self._entries, *self._handoffs]

    def resolve(self, name: str) -> ToolEntry | None:
        """The granted tool of this name, or None."""
        return self._entries.get(name)

    def safe_to_repeat(self, name: str) -> bool:
        """Whether a call of `name` may run again with no further effect.

        True for tools declared read-only or idempotent, for handoffs, and for names that
        resolve to no tool (their calls fail before reaching one). A tool that declares nothing
        is taken to have side effects.
        """
        entry = self._entries.get(name)
        return entry is None or entry.spec.read_only or entry.spec.idempotent

    def handoff_target(self, name: str) -> str | None:
        """The agent a handoff tool names, or None if `name` is not a handoff tool."""
        return self._handoffs.get(name)

    def refusal(self, name: str) -> str | None:
        """Why `name` may not be called, if it is a real tool this agent isn't granted (a
        policy error), or None if no such tool is known here (the model made it up)."""
        reason = self._forbidden.get(name)
        if reason is None:
            return None
        return f"tool {name!r} is not granted to agent {self.agent!r} ({reason})"

    @classmethod
    async def build(
        cls,
        agent: str,
        grants: list[str],
        sources: dict[str, ToolSource],
        handoffs: list[str],
        deny: list[str] | tuple[str, ...] = (),
        others: dict[str, str] | None = None,
        down: set[str] | frozenset[str] = frozenset(),
    ) -> Toolbox:
        """Resolve grant patterns (README "Tool access") against live sources.

        `sources` are the servers the grants reach; `deny` patterns take tools back out;
        `others` maps tool names of servers this agent doesn't use to their server, so calls
        of those are refused as policy errors too. A source that can't list its tools
        contributes none (its calls fail as tool errors, the agent's signal), except a tool
        granted by its exact name, which is kept so calls reach the source once it is back. A
        glob that matches nothing is a warning in `problems`; an exact name that the server
        doesn't have is a `ConfigError`. When a source's tool list changes later (an MCP
        server announced it), the toolbox resolves the grants again by itself.
        """
        rules = _Rules(agent, [parse_grant(g) for g in grants], [parse_grant(d) for d in deny],
                       sources, others or {})
        # `down`: sources that just failed to start are not asked again now (the re-listing
        # below asks them soon).
        listed = await _list_all(sources, known=dict.fromkeys(down))
        entries, forbidden, problems = rules.resolve(listed, strict=True)
        box = cls(entries, handoffs, agent=agent, forbidden=forbidden)
        box.problems = problems
        box.unlisted = _unlisted(listed)
        box._rules = rules
        for source in sources.values():
            source.on_tools_changed(box._tools_changed)
        if box.unlisted:
            box._relist_soon()
        return box

    def _relist_soon(self) -> None:
        """While a source could not list its tools (its server down at start, say), ask it
        again now and then: the grants are resolved again once it answers, so its tools come
        back without a restart (a server that comes up sends no tools/list_changed)."""
        if self._relister is None or self._relister.done():
            self._relister = asyncio.get_running_loop().create_task(self._relist())

    def why_unlisted(self) -> str:
        """The servers that could not list their tools, each with why, for a tool error."""
        sources = self._rules.sources if self._rules is not None else {}
        out = []
        for server in self.unlisted:
            source = sources.get(server)
            why = _LIST_ERRORS.get(source) if source is not None else None
            out.append(f"{server} ({why[:300]})" if why else server)
        return ", ".join(out)

    def poke(self) -> None:
        """Ask the sources that could not list their tools again now, not at the next retry
        (a model called a tool that may be theirs); at most once every `RELIST_FIRST_S`."""
        now = asyncio.get_running_loop().time()
        if not self.unlisted or now - self._poked < RELIST_FIRST_S:
            return
        self._poked = now
        if self._relister is not None and not self._relister.done():
            self._relister.cancel()
        self._relister = asyncio.get_running_loop().create_task(self._relist(first=0.0))

    async def _relist(self, first: float = RELIST_FIRST_S) -> None:
        rules = self._rules
        assert rules is not None
        delay = first
        while self.unlisted:
            await asyncio.sleep(delay)
            delay = min(max(RELIST_FIRST_S, delay) * 2, RELIST_MAX_S)
            for server in self.unlisted:
                if server in rules.sources and \
                        (specs := await _listing(rules.sources[server])) is not None:
                    self._fresh[server] = specs  # not asked again by the refresh
                    self._tools_changed()
                    await self.refreshed()
                    break

    async def relisted(self) -> None:
        """Wait until every source that could not list its tools has listed them (and the
        grants are resolved again); returns at once if none is missing."""
        while (task := self._relister) is not None and not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this waiter was cancelled, not the re-lister (`poke` replaced it)

    def close(self) -> None:
        """Stop asking sources for their tools again (the agent is closing)."""
        for task in (self._relister, self._refresher):
            if task is not None and not task.done():
                task.cancel()

    def _tools_changed(self) -> None:
        # Called by a source (in its connection's task): re-resolve in a task of our own, once
        # for a burst of changes.
        self._stale = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def refreshed(self) -> None:
        """Wait until the re-resolution a tool-list change started (if any) has finished."""
        while self._refresher is not None and not self._refresher.done():
            await asyncio.shield(self._refresher)

    async def _refresh(self) -> None:
        rules = self._rules
        assert rules is not None
        while self._stale:
            self._stale = False
            fresh, self._fresh = self._fresh, {}
            listed = await _list_all(rules.sources, known=fresh)
            entries, forbidden, problems = rules.resolve(listed, strict=False)
            self.unlisted = _unlisted(listed)
            for problem in problems:
                log.warning("agent %s: %s", self.agent, problem)
            # Swapped whole: a step that is running keeps the lists it read.
            self._entries, self._forbidden = entries, forbidden
            self.schemas = [e.spec.openai_schema() for e in entries.values()]
            self.schemas.extend(_handoff_schema(a) for a in self._handoffs.values())
            log.info("agent %s: tools now %s", self.agent, sorted(entries))
        if self.unlisted:
            self._relist_soon()


def _unlisted(listed: dict[str, list[ToolSpec] | None]) -> list[str]:
    """The sources of a listing that could not list their tools, sorted."""
    return sorted(s for s, specs in listed.items() if specs is None)


# Why each source last failed to list its tools (`Toolbox.why_unlisted`).
_LIST_ERRORS: weakref.WeakKeyDictionary[ToolSource, str] = weakref.WeakKeyDictionary()


def note_unlisted(source: ToolSource, why: BaseException) -> None:
    """Keep why a source could not give its tools (it failed to start, say) for the tool
    errors of calls that may be its (`Toolbox.why_unlisted`)."""
    with contextlib.suppress(TypeError):  # a source that can't be weakly referenced
        _LIST_ERRORS[source] = str(why) or type(why).__name__


async def _listing(source: ToolSource) -> list[ToolSpec] | None:
    """The source's tools now, or None if it can't list them (why is kept for messages)."""
    try:
        specs = await source.list_tools()
    except Exception as exc:
        note_unlisted(source, exc)
        return None
    with contextlib.suppress(TypeError):
        _LIST_ERRORS.pop(source, None)
    return specs


async def _list_all(sources: dict[str, ToolSource],
                    known: dict[str, list[ToolSpec] | None] | None = None
                    ) -> dict[str, list[ToolSpec] | None]:
    """Each source's tools (None for one that can't list them), in the sources' order: those
    in `known` as given there, the others asked together (servers that don't answer cost one
    timeout, not one each)."""
    known = known or {}
    ask = [n for n in sources if n not in known]
    asked = dict(zip(ask, await asyncio.gather(*(_listing(sources[n]) for n in ask)),
                     strict=True))
    return {n: known[n] if n in known else asked[n] for n in sources}


@dataclass(slots=True)
class _Rules:
    """An agent's grants and denials over its sources, resolved against tool listings."""

    agent: str
    allow: list[Grant]
    denied: list[Grant]
    sources: dict[str, ToolSource]
    others: dict[str, str]

    def resolve(self, listed: dict[str, list[ToolSpec] | None], *, strict: bool
                ) -> tuple[dict[str, ToolEntry], dict[str, str], list[str]]:
        """Entries, forbidden names and warnings; `strict` raises `ConfigError` for a clash
        or a missing exact name, else (a later re-listing) it is a warning."""
        sources, denied = self.sources, self.denied
        entries: dict[str, ToolEntry] = {}
        forbidden: dict[str, str] = {}
        problems: list[str] = []
        where = f"agents.{self.agent}.tools"

        def fail(message: str) -> None:
            if strict:
                raise ConfigError([(where, message)])
            problems.append(f"{where}: {message}")

        def deny_rule(server: str, tool: str) -> Grant | None:
            return next((d for d in denied if d.matches(server, tool)), None)

        def add(server: str, spec: ToolSpec) -> None:
            rule = deny_rule(server, spec.name)
            if rule is not None:
                forbidden[spec.name] = f"denied by deny_tools {rule.text!r}"
                return
            source = sources[server]
            other = entries.get(spec.name)
            if other is not None and other.source is not source:
                return fail(f"tool name {spec.name!r} is served by both {other.source.name!r} "
                            f"and {server!r}; grant one as server.tool")
            if spec.name.startswith(HANDOFF_PREFIX):
                return fail(f"tool {spec.name!r} of {server!r} clashes with the handoff tool "
                            "prefix")
            entries[spec.name] = ToolEntry(spec, source)

        for grant in self.allow:
            matched = False
            for server in (s for s in sources if grant.matches_server(s)):
                specs = listed[server]
                if specs is None:
                    if grant.exact_tool:
                        # The server is down. Keep the granted name so the model's calls reach
                        # the source, which reconnects or reports a tool error.
                        assert grant.tool is not None
                        add(server, ToolSpec(
                            name=grant.tool, parameters={"type": "object"}, source=server,
                            description=f"{grant.tool} (server {server} unavailable)"))
                        matched = True
                    continue
                for spec in specs:
                    if grant.tool is None or fnmatchcase(spec.name, grant.tool):
                        matched = True
                        add(server, spec)
                if grant.exact_tool and not matched:
                    fail(f"server {server!r} has no tool {grant.tool!r}; it has "
                         f"{sorted(s.name for s in specs)}")
                    matched = True  # reported once
            if not matched and grant.tool is not None:
                down = [s for s in sources if grant.matches_server(s) and listed[s] is None]
                problems.append(
                    f"{where}: {grant.text!r} matches no tool"
                    + (f" (server {', '.join(down)} did not list its tools)" if down else ""))
        for rule in denied:
            if not any(rule.matches(server, spec.name) for server, specs in listed.items()
                       for spec in specs or ()):
                problems.append(f"agents.{self.agent}.deny_tools: {rule.text!r} matches no "
                                "tool this agent's servers list")
        for server, specs in listed.items():
            for spec in specs or ():
                if spec.name not in entries:
                    forbidden.setdefault(spec.name, f"server {server!r} does not grant it")
        for name, server in self.others.items():
            if name not in entries:
                forbidden.setdefault(name, f"it belongs to server {server!r}")
        return entries, forbidden, problems


_GLOB = frozenset("*?[")


def check_agents_gates(approvals: Any,
                       agents: Iterable[tuple[Iterable[str], Iterable[str]]]) -> list[str]:
    """`check_gate_patterns` over the agents' toolboxes, each given as (its granted tools as
    server.tool, the servers that could not list their tools): from the agent replicas' ready
    reports on Ray, from the hosts' toolboxes in one process."""
    granted: list[str] = []
    unlisted: set[str] = set()
    for names, down in agents:
        granted.extend(names)
        unlisted.update(down)
    return check_gate_patterns(approvals, granted, sorted(unlisted))


def check_gate_patterns(approvals: Any, granted: list[str], unlisted: list[str]) -> list[str]:
    """Check `approvals.tools` and `approvals.exempt` against the tools the agents were granted
    (`granted`: server.tool names, over every agent; `unlisted`: servers that could not list
    their tools at start). An exact `approvals.tools` entry that names no granted tool is a
    `ConfigError` (a typo there would leave the tool it meant ungated); a glob that matches
    nothing, an `exempt` entry that matches nothing, or any entry while a server is down, is a
    warning, returned."""
    names = [n for q in granted for n in (q, q.split(".", 1)[1] if "." in q else q)]
    problems: list[str] = []
    errors: list[tuple[str, str]] = []
    for key, patterns in (("approvals.tools", approvals.tools),
                          ("approvals.exempt", approvals.exempt)):
        for p in patterns:
            if any(fnmatchcase(n, p) for n in names):
                continue
            message = f"{p!r} matches no tool any agent is granted"
            if unlisted:
                problems.append(f"{key}: {message} (server {', '.join(unlisted)} did not list "
                                "its tools)")
            elif key == "approvals.tools" and not _GLOB & set(p):
                known = ", ".join(sorted(set(granted))) or "none"
                errors.append((key, f"{message}; they are: {known}"))
            else:
                problems.append(f"{key}: {message}")
    if errors:
        raise ConfigError(errors)
    return problems
