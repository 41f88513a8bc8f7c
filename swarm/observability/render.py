"""`swarm trace`: a task's stored spans as a step tree in the terminal (rich)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.text import Text
from rich.tree import Tree

from swarm._console import shown


@dataclass
class Node:
    """One span and its children (in start order)."""

    row: dict[str, Any]
    children: list[Node] = field(default_factory=list)


def build_tree(rows: list[dict[str, Any]]) -> list[Node]:
    """Nest span rows by parent; a span whose parent isn't stored (a span of a process that
    died before exporting it, or a resumed task's earlier trace) becomes a root."""
    nodes = {r["span"]: Node(r) for r in rows}
    roots: list[Node] = []
    for node in nodes.values():
        parent = nodes.get(node.row.get("parent") or "")
        (parent.children if parent is not None else roots).append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: n.row.get("start", 0.0))
    roots.sort(key=lambda n: n.row.get("start", 0.0))
    return roots


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens and cost summed over the model-call (`chat`) spans; errors over all spans."""
    out: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cached_tokens": 0,
                           "cost_usd": 0.0, "model_calls": 0, "tool_calls": 0, "errors": 0}
    for r in rows:
        a = r.get("attrs") or {}
        op = a.get("gen_ai.operation.name")
        if op == "chat":
            out["model_calls"] += 1
            out["input_tokens"] += int(a.get("gen_ai.usage.input_tokens", 0))
            out["output_tokens"] += int(a.get("gen_ai.usage.output_tokens", 0))
            out["cached_tokens"] += int(a.get("gen_ai.usage.cache_read.input_tokens", 0))
            out["cost_usd"] += float(a.get("swarm.cost_usd", 0.0))
        elif op == "execute_tool":
            out["tool_calls"] += 1
        if r.get("status") == "error":
            out["errors"] += 1
    return out


def _ms(row: dict[str, Any]) -> float:
    return max(0.0, (row.get("end", 0.0) - row.get("start", 0.0)) * 1e3)


def usd(cost: float) -> str:
    """A cost for the terminal: cents to four places, less than a cent to three significant
    digits (a cheap model's calls are not $0.0000)."""
    return f"${cost:.4f}" if cost >= 0.01 or cost == 0 else f"${cost:.3g}"


class _Shown(Text):
    """A `Text` whose appended strings have their control characters shown as escapes: span
    names, errors and attributes come from peers (a model server's error, its finish reason)
    and must not drive the terminal."""

    def append(self, text: Any, style: Any = None) -> _Shown:  # type: ignore[override]
        super().append(shown(str(text)), style=style)
        return self


def _label(node: Node, t0: float) -> Text:
    r = node.row
    a = r.get("attrs") or {}
    op = a.get("gen_ai.operation.name")
    text = _Shown()
    style = "bold red" if r.get("status") == "error" else \
        {"invoke_workflow": "bold", "invoke_agent": "bold cyan", "chat": "magenta",
         "execute_tool": "yellow"}.get(op or "", "blue")
    text.append(r.get("name", "?"), style=style)
    text.append(f"  {_ms(r):.1f} ms", style="green")
    text.append(f"  @+{(r.get('start', t0) - t0) * 1e3:.1f}", style="dim")
    if op == "chat":
        cached = a.get("gen_ai.usage.cache_read.input_tokens", 0)
        text.append(f"  {a.get('gen_ai.usage.input_tokens', 0)} in"
                    f"{f' ({cached} cached)' if cached else ''} / "
                    f"{a.get('gen_ai.usage.output_tokens', 0)} out")
        cost = float(a.get("swarm.cost_usd", 0.0))
        if cost:
            text.append(f"  {usd(cost)}", style="bold")
        reasons = a.get("gen_ai.response.finish_reasons")
        if reasons:
            text.append(f"  [{', '.join(map(str, reasons))}]", style="dim")
    elif op == "execute_tool":
        server = a.get("swarm.tool.server")
        if server:
            text.append(f"  ({server})", style="dim")
    elif op == "invoke_agent" or a.get("a2a.method.name"):
        outcome = a.get("swarm.outcome")
        if outcome:
            text.append(f"  → {outcome}", style="dim")
        if a.get("swarm.handoff.to"):
            text.append(f" {a['swarm.handoff.to']}", style="dim")
    elif op == "invoke_workflow" and a.get("swarm.task.state"):
        text.append(f"  {a['swarm.task.state']}", style="bold")
    if a.get("swarm.stopped"):
        text.append(f"  stopped ({a['swarm.stopped']})", style="yellow")
    if r.get("status") == "error":
        text.append(f"  ✗ {a.get('error.type', 'error')}: {r.get('error') or ''}"[:300],
                    style="red")
    return text


def render_trace(rows: list[dict[str, Any]], title: str | None = None) -> Group:
    """A rich renderable: a summary line and the span tree with durations, tokens, cost and
    errors."""
    if not rows:
        return Group(Text("no spans stored for this task", style="yellow"))
    roots = build_tree(rows)
    t0 = min(r.get("start", 0.0) for r in rows)
    end = max(r.get("end", 0.0) for r in rows)
    tot = totals(rows)
    summary = _Shown()
    summary.append(title or f"trace {rows[0].get('trace', '')}", style="bold")
    summary.append(f"  {len(rows)} spans, {(end - t0) * 1e3:.1f} ms, "
                   f"{tot['model_calls']} model calls, {tot['tool_calls']} tool calls, "
                   f"{tot['input_tokens']} in / {tot['output_tokens']} out tokens")
    if tot["cost_usd"]:
        summary.append(f", {usd(tot['cost_usd'])}", style="bold")
    if tot["errors"]:
        summary.append(f", {tot['errors']} error(s)", style="bold red")
    parts: list[Any] = [summary]
    for root in roots:
        tree = Tree(_label(root, t0), guide_style="dim")
        stack = [(tree, root)]
        while stack:
            branch, node = stack.pop()
            for child in node.children:
                stack.append((branch.add(_label(child, t0)), child))
        parts.append(tree)
    return Group(*parts)
