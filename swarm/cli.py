"""The `swarm` command line: run, validate, up, down, serve, tasks, submit, cancel."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from swarm._console import SafeConsole
from swarm._text import check_chars
from swarm.config import SwarmConfig, load_config
from swarm.errors import ConfigError, SwarmError, TaskFailed, UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="swarm: run multi-agent LLM swarms on Ray."
)
# Markup off unless a print asks for it (and escapes what it interpolates): task texts, users,
# answers and errors are stored strings, and one like "[/x]" must print as itself, not break
# every table it appears in.
out = SafeConsole()
err = SafeConsole(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2

ConfigArg = Annotated[str, typer.Argument(help="path of a swarm config YAML file")]
NameArg = Annotated[str, typer.Argument(help="name of a deployed swarm")]
AddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS)")]


def _positive_seconds(value: float) -> float:
    # `not value > 0` also rejects nan; a zero or negative wait would end before it began.
    if not value > 0:
        raise typer.BadParameter(f"must be a number of seconds above 0, got {value:g}")
    return value


TimeoutOpt = Annotated[float, typer.Option(
    callback=_positive_seconds, help="seconds to wait for the task (above 0); past them it is "
    "canceled and the command exits 1")]


def _die(message: str, code: int = EXIT_USAGE) -> NoReturn:
    # Messages are plain text: `swarm[gpu]` or a field path must not be read as markup.
    err.print(f"[red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(code)


def _load(path: str) -> SwarmConfig:
    from swarm.runtime.deploy import preflight

    try:
        cfg = load_config(path)
        preflight(cfg)
        return cfg
    except ConfigError as e:
        if e.source is None:  # preflight's checks (imports, python models) know no file name
            e = ConfigError(e.problems, path)
        err.print(str(e), style="red", markup=False)
        raise typer.Exit(EXIT_USAGE) from None


@app.command()
def validate(config: ConfigArg) -> None:
    """Check a config; print every error with its field path (exit 2 on errors)."""
    cfg = _load(config)
    agents = ", ".join(
        f"{n} (x{a.replicas})" if a.replicas > 1 else n for n, a in cfg.agents.items()
    )
    out.print(
        f"[green]ok[/]: swarm {cfg.name!r}: {len(cfg.models)} model(s), "
        f"{len(cfg.tools)} tool server(s), agents {agents}; "
        f"strategy {cfg.supervisor.strategy}", markup=True
    )


@app.command()
def run(
    config: ConfigArg,
    task: Annotated[
        str | None, typer.Option(help="task text (default: the config's example_task)")
    ] = None,
    user: Annotated[str, typer.Option(help="who submits the task")] = "cli",
    timeout: TimeoutOpt = 600.0,
    events_json: Annotated[bool, typer.Option("--json", help="print events as JSON lines")] = False,
) -> None:
    """Deploy the swarm, run one task with live progress, print the answer, take it down."""
    from swarm._console import ProgressPrinter
    from swarm.client import SwarmClient
    from swarm.events import to_json
    from swarm.runtime.deploy import ensure_ray, start_swarm, stop_embedded_store, stop_swarm

    cfg = _load(config)
    text = task if task is not None else cfg.example_task
    if not text.strip():
        _die("no task: pass --task TEXT or set example_task in the config")
    if len(text) > cfg.limits.max_task_chars:
        _die(
            f"task text is {len(text)} characters; limits.max_task_chars is "
            f"{cfg.limits.max_task_chars}"
        )
    if not user:
        _die("--user must not be empty")
    try:  # refused before a cluster is started for it, as the supervisor would refuse it
        check_chars(text, "task text")
        check_chars(user, "user")
    except UserError as e:
        _die(str(e))
    _quiet_ray()
    try:
        ensure_ray()
    except UserError as e:
        _die(str(e))
    deployment = f"{cfg.name}-run-{uuid.uuid4().hex[:6]}"
    out.print(f"[bold]swarm[/] {cfg.name}: deploying as {deployment} ...", markup=True)
    try:
        sup, reports = start_swarm(cfg, deployment=deployment)
    except SwarmError as e:
        stop_embedded_store(deployment)  # a run that never started leaves no server behind
        _die(str(e))
    _warn_start_problems(reports)
    printer = ProgressPrinter(out)
    try:
        client = SwarmClient(deployment, sup)
        try:
            handle = client.submit(text, user=user)
        except SwarmError as e:  # refused (the swarm is taken down below)
            _die(str(e))
        out.print(f"task {handle.id} submitted: {text[:120]!r}")
        try:
            for ev in handle.events(timeout=timeout):
                if events_json:
                    sys.stdout.write(to_json(ev).decode() + "\n")
                else:
                    printer(ev)
        except TimeoutError:
            handle.cancel()
            _die(f"task did not finish within {timeout:g} s; canceled", EXIT_FAILED)
        except KeyboardInterrupt:
            # This run's deployment goes with it: its task ends here, canceled (`swarm down`
            # would keep it for a next `up` of a name that never comes back).
            err.print("interrupted: canceling the task and taking the swarm down")
            # The process ends after this: further Ctrl-Cs are ignored until it has, so the
            # cleanup (and Ray's own at exit) runs to its end.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            with contextlib.suppress(Exception):
                handle.cancel()
            raise
        if not events_json:
            printer.summary()
        info = handle.status()
    finally:
        # A second Ctrl-C here would leave Ray's processes behind: the cleanup runs to its end.
        with _no_interrupts():
            stop_swarm(deployment)
            stop_embedded_store(deployment)
    if info.state != "completed":
        raise typer.Exit(EXIT_FAILED)


@app.command()
def up(
    config: ConfigArg,
    address: AddressOpt = None,
    name: Annotated[str | None, typer.Option(help="deployment name (default: config name)")] = None,
    a2a: Annotated[bool, typer.Option(
        "--a2a", help="serve the swarm as an A2A agent too (as the config's a2a.serve does)",
    )] = False,
    a2a_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="the port of Ray Serve's HTTP proxy, which serves the A2A app "
        "(used if this command starts Serve; default 8000 or SWARM_SERVE_PORT)")] = None,
) -> None:
    """Deploy the swarm as long-lived named actors on a running Ray cluster."""
    import os

    from swarm.runtime.deploy import ensure_ray, start_swarm

    if name is not None and not name.strip():
        _die("--name must not be empty (leave it out for the config's name)")
    cfg = _load(config)
    if a2a or a2a_port is not None:
        cfg = cfg.model_copy(update={"a2a": cfg.a2a.model_copy(update={"serve": True})})
    if a2a_port is not None:
        os.environ["SWARM_SERVE_PORT"] = str(a2a_port)
    _quiet_ray()
    try:
        ensure_ray(address, local_ok=False)
        _, reports = start_swarm(cfg, deployment=name or cfg.name, detached=True)
    except SwarmError as e:
        _die(str(e))
    for rep in reports:
        if rep["role"] != "swarm":
            tools = ", ".join(rep["tools"]) or "no tools"
            out.print(f"  agent {rep['role']}[{rep['replica']}]: {tools}")
    _warn_start_problems(reports)
    deployed = name or cfg.name
    out.print(
        f"[green]swarm {deployed!r} is up[/]. Drive it with "
        f"swarm.connect({deployed!r}) or `python -m swarm submit {deployed} TEXT`.", markup=True
    )
    if cfg.a2a.serve:
        from swarm.protocol.a2a_server.app import card_url

        url = card_url(cfg, deployed)
        out.print(f"A2A agent card: {url}", markup=False, soft_wrap=True)
        if a2a_port is not None and f":{a2a_port}/" not in url and not cfg.a2a.public_url:
            err.print(f"[yellow]note:[/] Serve was already listening on another port; the A2A "
                      f"app is at {escape(url)}", markup=True)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C (SIGINT) in the block, in the main thread: cleanup that must finish."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _warn_start_problems(reports: list[dict[str, Any]]) -> None:
    """Print the start-up problems of a swarm's ready reports: each agent's tool sources, and
    the swarm's own (role "swarm": approval rules that match no tool)."""
    for rep in reports:
        for problem in rep["problems"]:
            who = "" if rep["role"] == "swarm" else f"agent {rep['role']}: tool source "
            err.print(f"[yellow]warning:[/] {escape(who + str(problem))}", markup=True)


@app.command()
def down(name: NameArg, address: AddressOpt = None) -> None:
    """Remove a deployed swarm: its agents, supervisor and model apps."""
    from swarm.runtime.deploy import ensure_ray, stop_swarm

    _quiet_ray()
    try:
        ensure_ray(address, local_ok=False)
        info = stop_swarm(name)
    except SwarmError as e:
        _die(str(e))
    out.print(f"swarm {name!r} is down ({sum(info['agents'].values())} agent replicas removed)")
    left = info.get("unfinished") or 0
    if left:
        out.print(f"{left} unfinished task{'s' if left != 1 else ''} "
                  + ("kept: `swarm up` with the same name resumes them" if info.get("resumable")
                     else "canceled: the swarm has no durable store to resume them from"))


@app.command()
def serve(
    config: ConfigArg,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the Serve YAML of the config's vllm models; deploy nothing",
    )] = False,
    address: AddressOpt = None,
    name: Annotated[str | None, typer.Option(
        help="deployment name the apps are named after (default: config name)")] = None,
) -> None:
    """Deploy a config's model apps (vLLM through Ray Serve LLM, scripted) on a Ray cluster."""
    from swarm.models.vllm import GPU_EXTRA, dry_run_yaml, vllm_available, vllm_models

    cfg = _load(config)
    deployment = name or cfg.name
    gpu = vllm_models(cfg)
    if dry_run:
        try:
            text, hidden = dry_run_yaml(cfg, source=config, deployment=deployment)
        except ConfigError as e:
            err.print(str(e), style="red", markup=False)
            raise typer.Exit(EXIT_USAGE) from None
        sys.stdout.write(text)
        for path in hidden:
            err.print(f"[yellow]note:[/] {escape(str(path))} redacted; set it on the cluster "
                      "instead", markup=True)
        other = sorted(set(cfg.models) - set(gpu))
        if other:
            err.print(f"[yellow]note:[/] model(s) {escape(', '.join(other))} are not vllm models "
                      "and are not in this YAML", markup=True)
        return
    missing = "" if not gpu or vllm_available() else (
        f"model(s) {', '.join(sorted(gpu))} use provider: vllm, which needs vLLM and Ray Serve "
        f"LLM: {GPU_EXTRA} (the gpu extra) on every node that serves them")
    rest = {n: m for n, m in cfg.models.items() if n not in gpu}
    if missing and not rest:
        _die(missing, EXIT_FAILED)
    from swarm.runtime.deploy import deploy_models, ensure_ray

    _quiet_ray()
    try:
        ensure_ray(address, local_ok=False)
        # Without vLLM, the other models still deploy; the command then fails for the rest.
        endpoints = deploy_models(cfg.model_copy(update={"models": rest}) if missing else cfg,
                                  deployment)
    except SwarmError as e:
        _die(str(e))
    for model, url in endpoints.items():
        out.print(f"  model {model}: {url}")
    if missing:
        _die(missing, EXIT_FAILED)
    out.print(f"[green]{len(endpoints)} model app(s) up[/] for {escape(repr(deployment))}; "
              f"`swarm up` {escape(str(config))} reuses them, `swarm down "
              f"{escape(deployment)}` removes them with the swarm", markup=True)


@app.command()
def submit(
    name: NameArg,
    text: Annotated[str, typer.Argument(help="task text")],
    user: Annotated[str, typer.Option()] = "cli",
    context: Annotated[str | None, typer.Option(
        help="conversation (A2A context) id: tasks of one user with the same context share "
        "session memory")] = None,
    wait: Annotated[bool, typer.Option(help="stream progress until the task ends")] = True,
    timeout: TimeoutOpt = 600.0,
    address: AddressOpt = None,
) -> None:
    """Submit a task to a deployed swarm; exit 1 if it fails (or outlasts --timeout)."""
    from swarm.client import connect

    _quiet_ray()
    try:
        handle = connect(name, address=address).submit(text, user=user, context_id=context)
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {handle.id}")
    if wait:
        _follow(handle, timeout)


def _follow(handle: Any, timeout: float) -> None:
    """Stream a task's progress until it ends, then print its summary. Exit 1 if it failed, or
    if it did not end within `timeout` seconds: then it is canceled, as `run` does."""
    from swarm._console import ProgressPrinter

    printer = ProgressPrinter(out)
    try:
        for ev in handle.events(timeout=timeout):
            printer(ev)
    except TimeoutError:
        try:
            handle.cancel()
        except SwarmError as e:
            _die(f"task {handle.id} did not finish within {timeout:g} s, and canceling it "
                 f"failed: {e}", EXIT_FAILED)
        _die(f"task {handle.id} did not finish within {timeout:g} s; canceled", EXIT_FAILED)
    except SwarmError as e:
        _die(str(e))
    printer.summary()
    try:
        handle.result(timeout=0)
    except TaskFailed:
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def tasks(
    name: NameArg,
    state: Annotated[str | None, typer.Option(help="only tasks in this state")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    address: AddressOpt = None,
) -> None:
    """List a deployed swarm's tasks with their A2A states."""
    from swarm.client import connect

    _quiet_ray()
    try:
        rows = connect(name, address=address).tasks(state=state)
    except SwarmError as e:
        _die(str(e))
    if as_json:
        out.print_json(json.dumps([r.__dict__ for r in rows]))
        return
    table = Table(title=f"tasks of {name}")
    # Every column folds, so all of them fit a narrow terminal (or a pipe: 80 columns); a
    # task id wider than its share goes on over two lines rather than being cut.
    for col in ("task", "state", "user", "agent", "steps", "tokens", "error"):
        table.add_column(col, overflow="fold", ratio=3 if col in ("task", "error") else None)
    for r in rows:
        table.add_row(
            r.task_id,
            r.state,
            r.user,
            r.agent or "-",
            str(r.steps),
            f"{r.input_tokens}/{r.output_tokens}",
            f"{r.error_class}: {r.error}" if r.error_class else "",
        )
    out.print(table)


@app.command()
def cancel(
    name: NameArg, task_id: Annotated[str, typer.Argument()], address: AddressOpt = None
) -> None:
    """Cancel a running task."""
    from swarm.client import connect

    _quiet_ray()
    try:
        info = connect(name, address=address).task(task_id).cancel()
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {task_id}: {info.state}")


TaskArg = Annotated[str, typer.Argument(help="task id")]


@app.command()
def history(name: NameArg, task_id: TaskArg, address: AddressOpt = None) -> None:
    """List a task's checkpoints: every logged step, tool result and turn boundary."""
    from swarm.client import connect

    _quiet_ray()
    try:
        rows = connect(name, address=address).task(task_id).history()
    except SwarmError as e:
        _die(str(e))
    table = Table(title=f"history of {task_id}")
    for col in ("seq", "step", "agent", "kind", "", "what"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["seq"]), str(r["step"]), r["agent"] or "-", r["kind"],
                      "snap" if r["snapshot"] else "", r["summary"])
    out.print(table)


@app.command()
def trace(
    name: NameArg, task_id: TaskArg, address: AddressOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the span rows as JSON lines")]
    = False,
) -> None:
    """Show a task's step tree: nested spans with durations, tokens, cost and errors."""
    from swarm.client import connect
    from swarm.observability.render import render_trace

    _quiet_ray()
    try:
        rows = connect(name, address=address).task(task_id).trace()
    except SwarmError as e:
        _die(str(e))
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    out.print(render_trace(rows, title=f"task {task_id}"))


@app.command()
def replay(name: NameArg, task_id: TaskArg, address: AddressOpt = None) -> None:
    """Print a task's conversation as it was logged, read-only."""
    from swarm.client import connect

    _quiet_ray()
    try:
        messages = list(connect(name, address=address).task(task_id).replay())
    except SwarmError as e:
        _die(str(e))
    for m in messages:
        calls = m.get("tool_calls") or ()
        text = m.get("content") or ", ".join(
            f"{(c.get('function') or {}).get('name')}({(c.get('function') or {}).get('arguments')})"
            for c in calls)
        out.print(f"[dim]step {m['step']:>3}[/] [cyan]{escape(m['agent'] or '-'):>10}[/] "
                  f"[bold]{escape(m['role']):>9}[/]: {escape(str(text))}", markup=True,
                  highlight=False)


@app.command()
def fork(
    name: NameArg, task_id: TaskArg,
    step: Annotated[int, typer.Option(help="continue from the state after this step")],
    wait: Annotated[bool, typer.Option(help="stream progress until the new task ends")] = True,
    timeout: TimeoutOpt = 600.0, address: AddressOpt = None,
) -> None:
    """Start a new task from step K of an old one (time travel); with --wait, exit 1 if the new
    task fails."""
    from swarm.client import connect

    _quiet_ray()
    try:
        handle = connect(name, address=address).task(task_id).fork(step)
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {handle.id} (forked from {task_id} at step {step})")
    if wait:
        _follow(handle, timeout)


@app.command()
def respond(name: NameArg, task_id: TaskArg,
            answer: Annotated[str, typer.Argument(
                help="rerun or skip (an interrupted tool call), continue or stop (a task that "
                "looks stuck); the task's question says which")],
            address: AddressOpt = None) -> None:
    """Answer a task that waits in INPUT_REQUIRED."""
    from swarm.client import connect

    _quiet_ray()
    try:
        info = connect(name, address=address).task(task_id).respond(answer)
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {task_id}: {info.state}")


GateArg = Annotated[str, typer.Argument(help="gate id (see `swarm tasks` / the task's question)")]
AsOpt = Annotated[str | None, typer.Option("--as", help="approver name (default: OS user)")]


@app.command()
def approve(name: NameArg, task_id: TaskArg, gate: GateArg, approver: AsOpt = None,
            args: Annotated[str | None, typer.Option(
                "--args", help="JSON object: run the call with these arguments instead")] = None,
            address: AddressOpt = None) -> None:
    """Approve a tool call waiting at an approval gate (optionally with edited arguments)."""
    from swarm.client import connect

    if args is not None:
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            _die(f"--args is not valid JSON: {e.msg} at position {e.pos}")
        if not isinstance(parsed, dict):
            _die(f"--args must be a JSON object, got {type(parsed).__name__}")
    _quiet_ray()
    try:
        info = connect(name, address=address).task(task_id).approve(
            gate, json.loads(args) if args is not None else None, approver=approver)
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {task_id}: gate {gate} approved; {info.state}")


@app.command()
def deny(name: NameArg, task_id: TaskArg, gate: GateArg, approver: AsOpt = None,
         reason: Annotated[str | None, typer.Option(help="why (the agent's model sees it)")]
         = None, address: AddressOpt = None) -> None:
    """Deny a tool call waiting at an approval gate; the agent is told who denied it and why."""
    from swarm.client import connect

    _quiet_ray()
    try:
        info = connect(name, address=address).task(task_id).deny(gate, reason,
                                                                 approver=approver)
    except SwarmError as e:
        _die(str(e))
    out.print(f"task {task_id}: gate {gate} denied; {info.state}")


@app.command("mcp")
def mcp_serve(
    name: NameArg,
    transport: Annotated[str, typer.Option(
        help="stdio (IDE and desktop clients start this command) or http (streamable HTTP)")]
    = "stdio",
    host: Annotated[str, typer.Option(help="http: the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="http: the port")] = 8765,
    address: AddressOpt = None,
) -> None:
    """Serve a deployed swarm as an MCP server (tools run_task, get_task, approve_gate, ...)."""
    from swarm.client import connect
    from swarm.protocol.mcp_server import build_server

    if transport not in ("stdio", "http"):
        _die(f"--transport must be stdio or http, got {transport!r}")
    if transport == "http":
        _check_can_listen(host, port)
    _quiet_ray()
    try:
        client = connect(name, address=address)
    except SwarmError as e:
        _die(str(e))
    server = build_server(name, address=address, client=client)
    if transport == "stdio":
        server.run("stdio")  # stdout carries the protocol: nothing else may print there
        return
    err.print(f"MCP server for swarm {name!r} at http://{host}:{port}/mcp")
    try:
        server.run("streamable-http", host=host, port=port)
    except SystemExit as e:
        # uvicorn exits 3 when it can't start: the port was taken since it was checked.
        if e.code == _UVICORN_STARTUP_FAILURE:
            _die(f"the MCP server could not listen on {host}:{port} (see above)")
        # Stopped by SIGTERM: Ray's driver turns it into SystemExit(15). A normal stop.
        if e.code == signal.SIGTERM:
            raise typer.Exit(0) from None
        raise


_UVICORN_STARTUP_FAILURE = 3  # uvicorn.server's exit code when the server can't start


def _check_can_listen(host: str, port: int) -> None:
    """Exit 2 naming the address if an HTTP server can't listen on it (a port in use)."""
    import socket

    from swarm._net import listen_problem

    problem = listen_problem(host, port)
    if isinstance(problem, socket.gaierror):
        _die(f"--host {host!r}: {problem.strerror}")
    if problem is not None:
        _die(f"can't listen on {host}:{port}: {problem.strerror}; pick another --port")


@app.command()
def audit(
    name: NameArg,
    task: Annotated[str | None, typer.Option("--task", help="only this task")] = None,
    since: Annotated[str | None, typer.Option(help="an age (30m, 2h, 7d) or ISO time")] = None,
    kind: Annotated[str | None, typer.Option(help="a kind or prefix: task, tool, approval")]
    = None,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    store: Annotated[str | None, typer.Option(
        help="read a Redis directly (redis://...) instead of asking the running swarm")] = None,
    archive_dir: Annotated[str | None, typer.Option(
        "--archive-dir", help="with --store: the Parquet archive folder (run_dir/audit)")]
    = None,
    archive: Annotated[bool, typer.Option(
        "--archive", help="first move the stream into a Parquet file")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    address: AddressOpt = None,
) -> None:
    """Print the audit log: submissions, tool calls, approvals and how tasks ended."""
    import asyncio
    import datetime as dt
    from pathlib import Path

    from swarm.governance.audit import kind_problem, parse_since

    try:
        cutoff = None if since is None else parse_since(since)
    except ValueError as e:
        _die(str(e))
    if (problem := kind_problem(kind)) is not None:
        _die(f"--kind: {problem}")
    if store is not None:
        from swarm._urls import redact_url, redis_url_problem
        from swarm.governance.audit import AuditLog, RedisAuditLog

        if not store.startswith(("redis://", "rediss://", "unix://")):
            _die(f"--store {redact_url(store)!r}: expected a redis://, rediss:// or unix:// URL")
        problem = redis_url_problem(store)
        if problem is not None:
            _die(f"--store: {problem}")
        folder = Path(archive_dir) if archive_dir else None
        log_: AuditLog = RedisAuditLog(store, name, folder)

        async def _read() -> list[dict[str, object]]:
            try:
                if archive:
                    await log_.archive()
                return await log_.read(task_id=task, since=cutoff, kind=kind, limit=limit)
            finally:
                await log_.aclose()

        try:
            rows = asyncio.run(_read())
        except Exception as e:
            _die(f"can't read the audit log from {redact_url(store)}: {redact_url(str(e))}")
    else:
        from swarm.client import connect

        _quiet_ray()
        try:
            client = connect(name, address=address)
            if archive:
                client.archive_audit()
            rows = client.audit(task_id=task, since=cutoff, kind=kind, limit=limit)
        except SwarmError as e:
            _die(str(e))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"audit log of {name}")
    for col in ("time", "kind", "task", "user", "agent", "tool / gate", "outcome", "detail"):
        table.add_column(col, overflow="fold")
    for r in rows:
        when = dt.datetime.fromtimestamp(float(r["ts"])).isoformat(sep=" ", timespec="seconds")
        what = " ".join(str(r[k]) for k in ("tool", "gate", "args_hash") if r.get(k))
        outcome = " ".join(str(r[k]) for k in ("outcome", "error_class") if r.get(k))
        if r.get("by"):
            outcome = f"{outcome} by {r['by']}".strip()
        table.add_row(when, str(r["kind"]), str(r.get("task_id", "")), str(r.get("user", "")),
                      str(r.get("agent", "")), what, outcome, str(r.get("detail", "")))
    out.print(table)


@app.command()
def usage(
    config: Annotated[str | None, typer.Argument(
        help="swarm config: read its usage.dir (default: ./runs/usage)")] = None,
    by: Annotated[str, typer.Option(help="role, user, swarm or model")] = "role",
    since: Annotated[str, typer.Option(
        help="relative (30m, 24h, 7d, 2w) or an ISO date / date-time (UTC)")] = "24h",
    swarm: Annotated[str | None, typer.Option(
        "--swarm", help="only this deployed swarm (its deployment name)")] = None,
    directory: Annotated[str | None, typer.Option(
        "--dir", help="the ledger's folder or filesystem URI (overrides the config's)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print usage and cost from the ledger, summed by role, user, swarm or model."""
    from swarm.observability.render import usd
    from swarm.observability.usage import default_location, usage_table

    if directory is not None:
        location = directory
    elif config is not None:
        try:
            location = default_location(load_config(config))
        except ConfigError as e:
            err.print(str(e), style="red", markup=False)
            raise typer.Exit(EXIT_USAGE) from None
    else:
        location = "runs/usage"
    try:
        table = usage_table(location, by, since, swarm=swarm)
    except UserError as e:
        _die(str(e))
    rows = table.to_pylist()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    what = f"usage by {by} since {since}" + (f" of {swarm}" if swarm else "")
    if not rows:
        out.print(f"no usage recorded under {location} ({what})")
        return
    view = Table(title=what, caption=location)
    view.add_column(by, overflow="fold")
    for col in ("model calls", "tool calls", "tokens in", "tokens out", "cached", "cost USD",
                "errors"):
        view.add_column(col, justify="right")
    for r in rows:
        view.add_row(str(r[by]), str(r["model_calls"]), str(r["tool_calls"]),
                     str(r["input_tokens"]), str(r["output_tokens"]), str(r["cached_tokens"]),
                     usd(r["cost_usd"])[1:], str(r["errors"]))
    out.print(view)


memory_app = typer.Typer(no_args_is_help=True, help="Session and long-term memory (swarm.memory).")
app.add_typer(memory_app, name="memory")


@memory_app.command("forget")
def memory_forget(
    config: ConfigArg,
    user: Annotated[str, typer.Option("--user", help="the user whose memory goes")],
) -> None:
    """Delete everything kept about a user: sessions (Redis) and long-term memories."""
    from swarm.memory.admin import forget_user

    try:
        done = forget_user(_load(config), user)
    except (UserError, ImportError, OSError) as e:
        _die(str(e))
    out.print(f"forgot user {user!r}: {done['sessions']} session(s), "
              f"{done['memories']} long-term memories")


@memory_app.command("prune")
def memory_prune(
    config: ConfigArg,
    older_than: Annotated[str, typer.Option(
        "--older-than", help="an age (12h, 30d, 2w) or an ISO date, UTC unless it says")],
) -> None:
    """Delete long-term memories not updated for longer than an age."""
    from swarm.memory.admin import parse_age, prune

    try:
        n = prune(_load(config), parse_age(older_than))
    except (UserError, ImportError, OSError) as e:
        _die(str(e))
    out.print(f"deleted {n} long-term memories older than {older_than}")


store_app = typer.Typer(
    no_args_is_help=True,
    help="The embedded redis-server (state.store: embedded) of a run directory.")
app.add_typer(store_app, name="store")
RunDirOpt = Annotated[str, typer.Option(
    "--run-dir", help="the run directory (state.run_dir) whose server it is")]


def _embedded_store(run_dir: str) -> Any:
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis.for_run_dir(run_dir)
    if not server.dir.is_dir():
        _die(f"no embedded store under {server.dir}: check --run-dir (state.run_dir)")
    return server


@store_app.command("status")
def store_status(run_dir: RunDirOpt = "runs") -> None:
    """Whether the run directory's embedded redis-server is running, and its URL."""
    server = _embedded_store(run_dir)
    if server.running():
        version = server.version()
        line = f"running: {server.url} ({f'{version}, ' if version else ''}pid {server.pid()}, " \
               f"data under {server.dir})"
    elif server.process_alive():
        line = f"started but not answering (pid {server.pid()}, data under {server.dir})"
    else:
        line = f"not running (data under {server.dir})"
    out.print(line, markup=False, soft_wrap=True)


@store_app.command("start")
def store_start(run_dir: RunDirOpt = "runs") -> None:
    """Start the run directory's embedded redis-server again (after it was stopped, or
    died while a swarm is up: the swarm's tasks wait for it, up to state.outage_wait_s), on
    the port it had, with its data."""
    from swarm.state.interface import StoreUnavailable

    server = _embedded_store(run_dir)
    if server.running():
        out.print(f"already running: {server.url} (data under {server.dir})", markup=False,
                  soft_wrap=True)
        return
    try:
        server.start()
    except StoreUnavailable as exc:
        _die(str(exc))
    out.print(f"started: {server.url} (data under {server.dir})", markup=False,
              soft_wrap=True)


@store_app.command("stop")
def store_stop(
    run_dir: RunDirOpt = "runs",
    force: Annotated[bool, typer.Option(
        "--force", help="stop it even while clients (swarms) are connected to it")] = False,
) -> None:
    """Stop the run directory's embedded redis-server once no swarm uses it (take them down
    first: it refuses while clients are connected, unless --force); its data stays on disk,
    and the next swarm that uses the run directory starts it again. `swarm up` leaves it
    running after `swarm down`, so that `swarm audit --store` and the next deployment can
    read it."""
    server = _embedded_store(run_dir)
    answering = server.running()
    if not answering and not server.process_alive():
        out.print(f"not running (data under {server.dir})", markup=False, soft_wrap=True)
        return
    what = server.url if answering else f"pid {server.pid()}"
    users = _store_connections(server.url) if answering and not force else 0
    if users:
        swarms = _swarms_up()
        named = (f"swarms up on the Ray cluster: {', '.join(swarms)}; take down the ones on "
                 f"this run directory with `swarm down NAME`" if swarms else
                 "take down the swarms that use it with `swarm down NAME`")
        _die(f"the embedded store {what} is in use: {users} client connection"
             f"{'s are' if users != 1 else ' is'} open to it ({named}), or pass --force to "
             "stop it anyway")
    server.stop()
    out.print(f"stopped {what}; its data stays under {server.dir}", markup=False,
              soft_wrap=True)


def _store_connections(url: str) -> int:
    """How many clients other than this one are connected to a Redis: the actors of a swarm
    keep their connections to its store open while it is up."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        me = client.client_id()
        return sum(1 for c in client.client_list(_type="normal") if int(c["id"]) != me)
    except redis.RedisError:
        return 0  # it stopped answering: nobody uses it through this server any more
    finally:
        client.close()


def _swarms_up() -> list[str]:
    """The swarms deployed on the Ray cluster this machine reaches (RAY_ADDRESS, else the one
    `ray start` runs here), by their supervisors' names; none when no cluster is reachable."""
    import ray

    from swarm.runtime.deploy import NAMESPACE, ensure_ray

    _quiet_ray()
    try:
        ensure_ray(None, local_ok=False)
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:  # no cluster, or one that doesn't answer: nothing to name
        return []
    return sorted(a["name"].removesuffix(".supervisor") for a in actors
                  if a["namespace"] == NAMESPACE and a["name"].endswith(".supervisor"))


def _quiet_ray() -> None:
    # Ray and Serve log start-up chatter to stderr; the CLI's own output is what users read.
    # Serve sets its logger's level when it is imported, so import it first, then override.
    import ray.serve  # noqa: F401

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def _not_utf8(argv: list[str]) -> str | None:
    """Why an argument can't be used, if one isn't valid UTF-8 (Python keeps such bytes as
    lone surrogates, which fail later, deep inside Ray or a store, when they are encoded)."""
    for i, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:
            raw = arg.encode("utf-8", "surrogateescape")
            byte = arg[e.start].encode("utf-8", "surrogateescape")
            shown = raw.decode("utf-8", "backslashreplace")
            return (f"argument {i} ('{shown}') is not valid UTF-8 (byte 0x{byte.hex()} at "
                    f"position {len(arg[:e.start].encode('utf-8', 'surrogateescape'))}); "
                    "pass text in UTF-8")
    return None


def main() -> None:
    """Entry point of `python -m swarm` and the `swarm` script."""
    problem = _not_utf8(sys.argv[1:])
    if problem is not None:
        err.print(f"[red]error:[/] {escape(problem)}", markup=True)
        sys.exit(EXIT_USAGE)
    app()
