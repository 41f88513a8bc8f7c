"""Per-role tool access: grant and deny patterns over `server` and `server.tool` names.

A pattern is `server` (every tool of the server) or `server.tool`, and either part may be a
glob (`fnmatch`, case-sensitive): `research`, `research.search`, `files.read_*`, `*.search`.
An agent's `tools` say what it may call, its `deny_tools` take tools back out. Globs on the
server part match configured servers only; a built-in server must be named.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

# Tool servers swarm provides without a `tools:` entry (swarm.memory).
BUILTIN_SERVERS = frozenset({"memory"})

_GLOB = re.compile(r"[*?\[]")
_SERVER_PART = re.compile(r"^[A-Za-z0-9_*?\[\]!-]+$")


def is_glob(text: str) -> bool:
    """Whether `text` has glob characters."""
    return _GLOB.search(text) is not None


@dataclass(frozen=True, slots=True)
class Grant:
    """One parsed pattern: a server pattern and an optional tool pattern."""

    text: str
    server: str
    tool: str | None

    @property
    def exact_tool(self) -> bool:
        """Whether it names one tool of one server (`server.tool`, no globs)."""
        return self.tool is not None and not is_glob(self.server) and not is_glob(self.tool)

    def matches_server(self, server: str) -> bool:
        """Whether the server part matches `server` (a built-in one only by its name)."""
        if server in BUILTIN_SERVERS or not is_glob(self.server):
            return server == self.server
        return fnmatchcase(server, self.server)

    def matches(self, server: str, tool: str) -> bool:
        """Whether this pattern covers `tool` of `server`."""
        return self.matches_server(server) and (
            self.tool is None or fnmatchcase(tool, self.tool))


def parse_grant(text: str) -> Grant:
    """Parse `server` or `server.tool`; raise ValueError saying what is wrong."""
    server, dot, tool = text.partition(".")
    if not server:
        raise ValueError(f"{text!r} has no server name (expected server or server.tool)")
    if not _SERVER_PART.match(server):
        raise ValueError(f"{text!r}: {server!r} is not a server name or glob")
    if dot and not tool:
        raise ValueError(f"{text!r} has no tool name after the dot")
    return Grant(text, server, tool if dot else None)


def servers_matching(grant: Grant, servers: Iterable[str]) -> list[str]:
    """The servers among `servers` (and the built-in ones) that `grant` names."""
    found = [s for s in servers if grant.matches_server(s)]
    if grant.server in BUILTIN_SERVERS and grant.server not in found:
        found.append(grant.server)
    return found


def granted_servers(grants: Iterable[str], servers: Collection[str]) -> set[str]:
    """The servers an agent's grants reach (its tool sources); invalid patterns are skipped
    (config validation reports them)."""
    out: set[str] = set()
    for text in grants:
        try:
            grant = parse_grant(text)
        except ValueError:
            continue
        out.update(servers_matching(grant, servers))
    return out


def grant_problems(agent: str, tools: list[str], deny: list[str],
                   servers: Collection[str]) -> list[tuple[str, str]]:
    """Config problems in an agent's `tools` and `deny_tools`, as (field path, message)."""
    problems: list[tuple[str, str]] = []
    for field, patterns in (("tools", tools), ("deny_tools", deny)):
        for i, text in enumerate(patterns):
            path = f"agents.{agent}.{field}.{i}"
            try:
                grant = parse_grant(text)
            except ValueError as e:
                problems.append((path, str(e)))
                continue
            if servers_matching(grant, servers):
                continue
            if is_glob(grant.server):
                problems.append((path, f"{grant.server!r} matches no tool server; known: "
                                 f"{sorted(servers)}"))
            else:
                problems.append((path, f"unknown tool server {grant.server!r}; known: "
                                 f"{sorted(servers)}"))
    return problems


def function_tool_names(tools: dict[str, object], exclude: Collection[str]) -> dict[str, str]:
    """Tool name to server for the `python:` tool servers of a config outside `exclude`, read
    from their import paths (nothing is imported or connected)."""
    out: dict[str, str] = {}
    for server, tcfg in tools.items():
        if server in exclude:
            continue
        for path in getattr(tcfg, "python", None) or ():
            out.setdefault(path.rpartition(":")[2], server)
    return out
