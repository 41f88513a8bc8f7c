"""The command line's answers to bad input and failed tasks: a clear message and the README's
exit code (0 ok, 1 the task failed, 2 bad input), never a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import swarm.client
from swarm.cli import app, main
from swarm.errors import TaskFailed
from swarm.events import TaskFinished

runner = CliRunner()


class _Handle:
    """A task handle whose task never ends (`finish` None) or ends in `finish`."""

    def __init__(self, finish: str | None) -> None:
        self.id = "t-1"
        self.finish = finish
        self.canceled = False

    def events(self, timeout: float | None = None) -> Iterator[Any]:
        if self.finish is None:
            raise TimeoutError(f"task {self.id} still running after {timeout} s")
        yield TaskFinished(ts=0.0, task_id=self.id, state=self.finish, answer="42", error="boom",
                           error_class="tool")

    def cancel(self) -> None:
        self.canceled = True

    def result(self, timeout: float | None = None) -> str:
        if self.finish != "completed":
            raise TaskFailed(self.id, str(self.finish), "tool", "boom")
        return "42"

    def task(self, task_id: str) -> _Handle:
        return self

    def fork(self, step: int) -> _Handle:
        return self

    def submit(self, text: str, **kw: Any) -> _Handle:
        return self


@pytest.fixture
def handle(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Handle]:
    """A fake deployed swarm whose tasks are `handle`; set `handle.finish` per test."""
    h = _Handle(None)
    monkeypatch.setattr(swarm.client, "connect", lambda name, address=None: h)
    yield h


@pytest.mark.parametrize("command", [["submit", "s", "hi"], ["fork", "s", "t-0", "--step", "1"]])
def test_a_task_that_outlasts_timeout_is_canceled_and_exits_1(handle: _Handle,
                                                               command: list[str]) -> None:
    res = runner.invoke(app, [*command, "--timeout", "0.05"])
    assert res.exit_code == 1, res.output
    assert "did not finish within 0.05 s; canceled" in res.output
    assert handle.canceled
    assert isinstance(res.exception, SystemExit)  # not an uncaught error


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
@pytest.mark.parametrize("command", [["run", "configs/research.yaml"], ["submit", "s", "hi"],
                                     ["fork", "s", "t-0", "--step", "1"]])
def test_timeout_must_be_above_zero(handle: _Handle, command: list[str], value: str) -> None:
    res = runner.invoke(app, [*command, "--timeout", value])
    assert res.exit_code == 2, res.output
    assert "--timeout" in res.output and "above 0" in res.output
    assert not handle.canceled


@pytest.mark.parametrize("command", [["submit", "s", "hi"], ["fork", "s", "t-0", "--step", "1"]])
def test_a_failed_task_exits_1(handle: _Handle, command: list[str]) -> None:
    handle.finish = "failed"
    res = runner.invoke(app, command)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    handle.finish = "completed"
    res = runner.invoke(app, command)
    assert res.exit_code == 0, res.output
    assert "42" in res.output


def test_arguments_that_are_not_utf8_are_rejected(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # How Python passes the bytes b"caf\xe9" of a Latin-1 terminal: a lone surrogate.
    arg = b"caf\xe9".decode("utf-8", "surrogateescape")
    monkeypatch.setattr("sys.argv", ["swarm", "submit", "research-desk", arg])
    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code == 2
    said = capsys.readouterr().err
    assert "argument 3" in said and "caf\\xe9" in said and "not valid UTF-8" in said
    assert "byte 0xe9 at position 3" in said


def test_mcp_on_a_port_in_use_exits_2(handle: _Handle) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = runner.invoke(app, ["mcp", "s", "--transport", "http", "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"can't listen on 127.0.0.1:{port}" in res.output.replace("\n", " ")


def test_audit_of_an_unreachable_store_exits_2() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = runner.invoke(app, ["audit", "s", "--store", f"redis://127.0.0.1:{port}/0"])
    assert res.exit_code == 2, res.output
    assert "can't read the audit log" in res.output


def test_audit_of_an_unknown_kind_exits_2_naming_the_kinds() -> None:
    res = runner.invoke(app, ["audit", "s", "--kind", "zzz", "--store", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "--kind: unknown audit kind 'zzz'; one of task, task.submitted" in text, text
    for kind in ("tool", "approval.denied"):  # a kind and a prefix: past the check
        res = runner.invoke(app, ["audit", "s", "--kind", kind, "--store",
                                  "redis://127.0.0.1:1/0"])
        assert res.exit_code == 2 and "can't read the audit log" in res.output, res.output


def test_store_stop_refuses_while_clients_use_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis.for_run_dir(tmp_path)
    server.start()
    swarm_connection = redis.Redis.from_url(server.url)
    try:
        swarm_connection.ping()  # a swarm's actors hold connections like this one
        res = runner.invoke(app, ["store", "stop", "--run-dir", str(tmp_path)])
        assert res.exit_code == 2, res.output
        said = " ".join(res.output.split())
        assert "in use: 1 client connection is open" in said and "--force" in said
        assert server.running()
        monkeypatch.setattr("swarm.cli._swarms_up", lambda: ["research-desk"])
        res = runner.invoke(app, ["store", "stop", "--run-dir", str(tmp_path)])
        assert res.exit_code == 2 and "research-desk" in res.output
        res = runner.invoke(app, ["store", "stop", "--run-dir", str(tmp_path), "--force"])
        assert res.exit_code == 0, res.output
        assert not server.running()
    finally:
        swarm_connection.close()
        server.stop()


def test_store_start_brings_a_dead_store_back_on_its_port_with_its_data(
        tmp_path: Path) -> None:
    import os
    import signal

    import redis

    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis.for_run_dir(tmp_path)
    server.start()
    try:
        url = server.url
        first = redis.Redis.from_url(url)
        first.config_set("appendfsync", "always")  # the write on disk before the kill
        first.set("k", "v")
        first.close()
        res = runner.invoke(app, ["store", "start", "--run-dir", str(tmp_path)])
        assert res.exit_code == 0 and "already running" in res.output, res.output
        pid = server.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        res = runner.invoke(app, ["store", "start", "--run-dir", str(tmp_path)])
        assert res.exit_code == 0, res.output
        said = " ".join(res.output.split())
        assert f"started: {url}" in said, said  # the same port: URLs handed out still work
        again = redis.Redis.from_url(url)
        assert again.get("k") == b"v"
        again.close()
    finally:
        server.stop()


def test_store_stop_stops_an_unused_store(tmp_path: Path) -> None:
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis.for_run_dir(tmp_path)
    server.start()
    try:
        res = runner.invoke(app, ["store", "stop", "--run-dir", str(tmp_path)])
        assert res.exit_code == 0, res.output
        assert "stopped" in res.output and not server.running()
    finally:
        server.stop()


class _Listing:
    """A fake deployed swarm with two tasks whose stored strings look like Rich markup."""

    def tasks(self, state: str | None = None) -> list[Any]:
        from swarm.client import TaskInfo

        def info(task_id: str, user: str, error: str | None) -> TaskInfo:
            return TaskInfo(task_id=task_id, context_id="c", state="failed" if error else
                            "completed", user=user, agent="writer", steps=3, input_tokens=4386,
                            output_tokens=29, created=0.0, updated=0.0, answer=None,
                            error_class="tool" if error else None, error=error, metadata={})

        return [info("4d14e6a0b1c2d3e4f5a6b7c8d9e0f1c9", "[/u]", None),
                info("5e25f7b1c2d3e4f5a6b7c8d9e0f1a2b3", "[bold]eve[/bold]",
                     "lookup failed: [/x] not found")]

    def task(self, task_id: str) -> Any:
        return self

    def history(self) -> list[dict[str, Any]]:
        return [{"seq": 0, "step": 0, "agent": "a", "kind": "turn_start", "snapshot": False,
                 "summary": "input: What is [/x]? key t1:a:3:0"}]

    def replay(self) -> list[dict[str, Any]]:
        return [{"step": 0, "agent": "a", "role": "user",
                 "content": "What is [/x]? [red]no[/] :x: \x1b]0;title\x07\x1b[2J"}]


@pytest.mark.parametrize("command", [["tasks", "s"], ["history", "s", "t-1"],
                                     ["replay", "s", "t-1"]])
def test_stored_text_that_looks_like_markup_prints_as_itself(
        monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    # A task's text, user or error is whatever a client or peer sent: "[/x]" must neither
    # break the table (a MarkupError for every task listed) nor style anything.
    monkeypatch.setattr(swarm.client, "connect", lambda name, address=None: _Listing())
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    if command[0] == "tasks":
        for header in ("task", "state", "user", "agent", "steps", "tokens", "error"):
            assert f" {header} " in result.output  # every column shows at 80 columns
        # Folded cells: read down each column, the table's borders and padding taken out.
        lines = [ln.split("│") for ln in result.output.splitlines() if ln.startswith("│")]
        columns = ["".join("".join(cells[i].split()) for cells in lines) for i in range(1, 8)]
        assert columns[2] == "[/u][bold]eve[/bold]"
        assert columns[6] == "tool:lookupfailed:[/x]notfound"
        assert columns[0] == "4d14e6a0b1c2d3e4f5a6b7c8d9e0f1c95e25f7b1c2d3e4f5a6b7c8d9e0f1a2b3"
    elif command[0] == "history":
        # Nor does ":a:" (an idempotency key's part) turn into an emoji.
        assert "[/x]" in result.output and "t1:a:3:0" in result.output
    else:
        # And an ESC sequence (a tool's or a peer's text) is shown, not sent to the terminal.
        assert "What is [/x]? [red]no[/] :x: \\x1b]0;title\\x07\\x1b[2J" in \
            result.output.replace("\n", "")  # folded at 80 columns
        assert "\x1b" not in result.output and "\x07" not in result.output


def test_the_progress_printer_prints_markup_like_text_as_itself() -> None:
    import io

    from rich.console import Console

    from swarm._console import ProgressPrinter
    from swarm.events import Handoff, TaskStateChanged, ToolCalled

    buf = io.StringIO()
    printer = ProgressPrinter(Console(file=buf, width=200, highlight=False, markup=False))
    printer(TaskStateChanged(ts=0.0, task_id="t", state="working", detail="[/d]"))
    printer(ToolCalled(ts=0.0, task_id="t", agent="a", step=1, tool="look[/up]", call_id="c",
                       outcome="error", error_class="tool", detail="no [/x] here",
                       duration_ms=1.0))
    printer(Handoff(ts=0.0, task_id="t", agent="a", to_agent="b", message="over [/y]"))
    printer(TaskFinished(ts=0.0, task_id="t", state="completed",
                         answer="It is [/x]. [red]! \x1b[31mred"))
    printer.summary()
    text = buf.getvalue()
    for literal in ("([/d])", "look[/up]", "no [/x] here", "over [/y]", "It is [/x]. [red]!",
                    "\\x1b[31mred"):
        assert literal in text, literal
    assert "[dim]" not in text and "[/]" not in text  # its own styling is applied, not shown


def test_a_store_url_that_is_not_usable_is_a_usage_error(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # In the config, in SWARM_STATE_STORE (which overrides it), and for `audit --store`: a
    # clear exit 2 naming the setting, from validate as from run, never a traceback.
    cfg = tmp_path / "s.yaml"
    body = ("name: s\nmodels: {m: {provider: scripted, policy: p.yaml}}\n"
            "agents: {a: {model: m}}\nsupervisor: {entry: a}\n")
    (tmp_path / "p.yaml").write_text("rules: [{when: {}, content: hi}]\n")
    cfg.write_text(body + "state: {store: 'redis://127.0.0.1:notaport/0'}\n")
    for command in (["validate", str(cfg)], ["run", str(cfg)]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2, res.output
        flat = " ".join(res.output.split())
        assert "state.store: 'redis://127.0.0.1:notaport/0' is not a usable Redis URL" in flat
    cfg.write_text(body)
    for value in ("garbage", "redis://:secret@127.0.0.1:x/0"):
        monkeypatch.setenv("SWARM_STATE_STORE", value)
        res = runner.invoke(app, ["validate", str(cfg)])
        assert res.exit_code == 2, res.output
        assert "SWARM_STATE_STORE (which overrides it)" in " ".join(res.output.split())
        assert "secret" not in res.output
    monkeypatch.delenv("SWARM_STATE_STORE")
    res = runner.invoke(app, ["audit", "s", "--store", "redis://127.0.0.1:notaport/0"])
    assert res.exit_code == 2 and "is not a usable Redis URL" in res.output


def test_run_refuses_an_empty_user_before_deploying(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import swarm.runtime.deploy as deploy

    def no_ray(*a: Any, **kw: Any) -> None:
        raise AssertionError("ensure_ray must not be reached")

    monkeypatch.setattr(deploy, "ensure_ray", no_ray)
    (tmp_path / "p.yaml").write_text("rules: [{when: {}, content: hi}]\n")
    (tmp_path / "s.yaml").write_text(
        "name: s\nmodels: {m: {provider: scripted, policy: p.yaml}}\n"
        "agents: {a: {model: m}}\nsupervisor: {entry: a}\nexample_task: hi\n")
    res = runner.invoke(app, ["run", str(tmp_path / "s.yaml"), "--user", ""])
    assert res.exit_code == 2, res.output
    assert "--user must not be empty" in res.output


def test_mcp_over_http_stopped_by_sigterm_exits_0(tmp_path: Path) -> None:
    # Ray's driver turns SIGTERM into SystemExit(15); a stop is not "could not listen".
    import signal
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(
        "import signal, sys\n"
        "import swarm.client\n"
        "signal.signal(signal.SIGTERM, lambda n, f: sys.exit(n))  # as ray.init does\n"
        "swarm.client.connect = lambda name, address=None: object()\n"
        f"sys.argv = ['swarm', 'mcp', 's', '--transport', 'http', '--port', '{port}']\n"
        "from swarm.cli import main\n"
        "main()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until it listens (bounded)
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, errs = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errs
    assert "could not listen" not in errs


def test_up_with_an_empty_name_exits_2() -> None:
    res = runner.invoke(app, ["up", "configs/research.yaml", "--name", ""])
    assert res.exit_code == 2 and "--name must not be empty" in res.output


def test_a_ray_address_where_nothing_listens_exits_2_at_once() -> None:
    """RAY_ADDRESS naming a port nobody listens on: a clear error and exit 2, not `ray.init`
    retrying for minutes. In a process of its own: this one may have joined a cluster."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "swarm", "tasks", "nobody"], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, (done.stdout, done.stderr)
    text = " ".join((done.stdout + done.stderr).split())
    assert f"can't reach a Ray cluster at '127.0.0.1:{port}': nothing answers at " \
        f"127.0.0.1:{port}" in text, text
