"""Terminal rendering of a task's events: live progress lines and the closing summary table."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from swarm.events import (
    AnyEvent,
    Handoff,
    ModelCalled,
    RemoteUpdate,
    StepFinished,
    StepStarted,
    TaskFinished,
    TaskStateChanged,
    ToolCalled,
    ToolProgress,
)

# Control characters shown as escapes (`\x1b`) instead of written to the terminal: stored texts
# (tool results, model and remote agents' answers, errors) are whatever a tool or a peer sent,
# and an ESC sequence in one would drive the operator's terminal (colours, its title, the
# screen cleared). Tabs and newlines stay.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
             if c not in (0x09, 0x0A)}


_PIPE_WIDTH = 200


def shown(text: str) -> str:
    """`text` with its control characters (but tabs and newlines) as visible escapes."""
    return text.translate(_CONTROLS)


class SafeConsole(Console):
    """A Rich console for stored texts: markup, emoji codes and highlighting off unless a
    print asks, and every string it renders (a print's, a table cell's) with its control
    characters shown as escapes (`shown`); its own styling is unaffected."""

    def __init__(self, **kwargs: object) -> None:
        for key in ("highlight", "markup", "emoji"):
            kwargs.setdefault(key, False)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if "width" not in kwargs and not self.is_terminal and not os.environ.get("COLUMNS"):
            # Into a pipe or a file: lines as long as they come (to grep, to copy an id),
            # not folded at 80 columns, Rich's guess for an output without a size.
            self.width = _PIPE_WIDTH

    def render_str(self, text: str, **kwargs: object) -> Text:  # type: ignore[override]
        return super().render_str(shown(text), **kwargs)  # type: ignore[arg-type]


@dataclass
class _StepRow:
    agent: str
    model_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    tools: list[str] = field(default_factory=list)
    duration_ms: float | None = None
    note: str = ""


class ProgressPrinter:
    """Prints one line per event as it arrives and keeps what the summary table needs."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or SafeConsole()
        self.steps: dict[int, _StepRow] = {}
        self.finished: TaskFinished | None = None

    def __call__(self, ev: AnyEvent) -> None:
        """Render one event."""
        c = self.console
        t = dt.datetime.fromtimestamp(ev.ts).strftime("%H:%M:%S.%f")[:-3]
        who = f"[bold cyan]{escape(ev.agent or '-'):>10}[/]"
        if isinstance(ev, TaskStateChanged):
            detail = f" ({escape(ev.detail)})" if ev.detail else ""
            c.print(f"[dim]{t}[/] {'task':>10} state → [bold]{escape(ev.state)}[/]{detail}",
                    markup=True)
        elif isinstance(ev, StepStarted):
            self.steps.setdefault(ev.step, _StepRow(ev.agent or "-"))
        elif isinstance(ev, ModelCalled):
            row = self.steps.setdefault(ev.step, _StepRow(ev.agent or "-"))
            row.model_ms, row.tokens_in, row.tokens_out = (
                ev.latency_ms,
                ev.input_tokens,
                ev.output_tokens,
            )
            if ev.error:
                row.note = "model error"
                c.print(
                    f"[dim]{t}[/] {who} step {ev.step:>3} model [red]error[/]: {escape(ev.error)}",
                    markup=True)
            else:
                what = f"{ev.tool_calls} tool call(s)" if ev.tool_calls else "answer"
                c.print(
                    f"[dim]{t}[/] {who} step {ev.step:>3} model {escape(ev.model)}: "
                    f"{ev.input_tokens} in / {ev.output_tokens} out tokens, "
                    f"{ev.latency_ms:.1f} ms → {what}", markup=True
                )
        elif isinstance(ev, ToolCalled):
            row = self.steps.setdefault(ev.step, _StepRow(ev.agent or "-"))
            ok = ev.outcome == "ok"
            row.tools.append(f"{ev.tool} {'ok' if ok else 'ERR'} {ev.duration_ms:.1f}ms")
            status = (
                "[green]ok[/]" if ok else
                f"[red]error[/] ({escape(str(ev.error_class))}): {escape(ev.detail)}"
            )
            c.print(
                f"[dim]{t}[/] {who} step {ev.step:>3} tool {escape(ev.tool)} "
                f"{ev.duration_ms:.1f} ms {status}", markup=True
            )
        elif isinstance(ev, ToolProgress):
            of = f"/{ev.total:g}" if ev.total is not None else ""
            text = f": {escape(ev.message)}" if ev.message else ""
            c.print(f"[dim]{t}[/] {who} step {ev.step:>3} tool {escape(ev.tool)} "
                    f"[dim]progress {ev.progress:g}{of}[/]{text}", markup=True)
        elif isinstance(ev, Handoff):
            c.print(
                f"[dim]{t}[/] {who} [magenta]handoff → {escape(ev.to_agent)}[/]: "
                f"{escape(ev.message)}", markup=True
            )
            for row in reversed(self.steps.values()):
                row.note = f"→ {ev.to_agent}"
                break
        elif isinstance(ev, StepFinished):
            self.steps.setdefault(ev.step, _StepRow(ev.agent or "-")).duration_ms = ev.duration_ms
        elif isinstance(ev, RemoteUpdate):
            text = f": {escape(ev.text)}" if ev.text else ""
            c.print(f"[dim]{t}[/] {who} [blue]remote {escape(ev.state)}[/]{text}", markup=True)
        elif isinstance(ev, TaskFinished):
            self.finished = ev

    def summary(self) -> None:
        """Print the answer (or error) and the per-step table."""
        c = self.console
        table = Table(title="Steps", show_lines=False)
        for col in ("step", "agent", "model ms", "tokens in", "tokens out", "tools", "step ms", ""):
            table.add_column(
                col, justify="right" if col.endswith(("ms", "in", "out", "step")) else "left"
            )
        for n in sorted(self.steps):
            r = self.steps[n]
            table.add_row(
                str(n),
                r.agent,
                f"{r.model_ms:.1f}",
                str(r.tokens_in),
                str(r.tokens_out),
                ", ".join(r.tools) or "-",
                "-" if r.duration_ms is None else f"{r.duration_ms:.1f}",
                r.note,
            )
        c.print(table)
        f = self.finished
        if f is None:
            c.print("[yellow]the task had not finished[/]", markup=True)
            return
        totals = f"{f.steps} steps, {f.input_tokens} input / {f.output_tokens} output tokens"
        if f.state == "completed":
            c.print(Panel(Text(shown(f.answer or "")), title=Text(f"answer ({totals})"),
                          border_style="green"))
        else:
            c.print(
                Panel(
                    Text(shown(f.error or "")),
                    title=Text(f"task {f.state} [{f.error_class}] ({totals})"),
                    border_style="red",
                )
            )
