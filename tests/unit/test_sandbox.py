"""The python_exec sandbox: each attack fails safely, and the next run still works.

These run real code in bubblewrap. Without a working sandbox they are skipped, except where
SWARM_REQUIRE_SANDBOX is set (CI: .ci/run), where that is a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from swarm.config import MCPStdioConfig
from swarm.tools.interface import ToolContext
from swarm.tools.mcp import MCPToolSource
from swarm.tools.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

# The wall clock is generous so that, on a busy machine, the CPU limit still trips first; the
# wall-clock tests use SHORT.
LIMITS = SandboxLimits(cpu_s=1, wall_s=60, memory_mb=256, file_size_mb=1, max_procs=8,
                       output_bytes=10_000)
SHORT = replace(LIMITS, wall_s=2)
ROOT = os.geteuid() == 0
CODE_DESK = Path(__file__).resolve().parents[2] / "configs" / "code.yaml"

FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
# Children that survive a failed fork and keep trying: only the wall clock ends it.
STUBBORN_FORK_BOMB = """\
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    sb = Sandbox(LIMITS)
    problem = asyncio.run(sb.problem())
    if problem is not None:
        if os.environ.get("SWARM_REQUIRE_SANDBOX"):
            pytest.fail(f"SWARM_REQUIRE_SANDBOX is set but the sandbox can't run: {problem}")
        pytest.skip(f"no working sandbox here: {problem} (scripts/setup.sh installs bubblewrap "
                    "when run as root on Debian/Ubuntu)")
    return sb


def _existing(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.exists(os.path.normpath(p))]


async def run_ok(sb: Sandbox) -> None:
    """The sandbox still serves a plain run."""
    r = await sb.run("print(6 * 7)")
    assert r.ok and r.stdout == "42\n", r


async def test_plain_run(sandbox: Sandbox) -> None:
    r = await sandbox.run("import os, sys\nprint(os.getcwd(), os.getuid())\n"
                          "print('oops', file=sys.stderr)\nsys.exit(3)")
    assert r.sandboxed and r.exit_code == 3 and r.limit is None
    cwd, uid = r.stdout.split()
    assert cwd == "/work"
    if ROOT:
        assert uid != "0"  # privileges were dropped
    assert r.stderr == "oops\n"


async def test_fork_bomb_hits_the_process_limit(sandbox: Sandbox) -> None:
    r = await sandbox.run(FORK_BOMB)
    assert r.limit == "processes" and r.exit_code != 0, r
    assert "Resource temporarily unavailable" in r.stderr
    await run_ok(sandbox)


async def test_stubborn_fork_bomb_is_killed_and_others_still_run(sandbox: Sandbox) -> None:
    # The process limit is per run (the sandbox's own user namespace), so a fork bomb spinning
    # at its limit doesn't starve a run beside it.
    short = Sandbox(SHORT)
    bomb, other = await asyncio.gather(short.run(STUBBORN_FORK_BOMB), sandbox.run("print(1)"))
    # Whichever comes first ends it: the wall clock, or the CPU limit of the first process
    # (whose exit takes the whole PID namespace with it).
    assert bomb.limit in ("wall_clock", "cpu_time") and bomb.exit_code is None, bomb
    assert other.ok and other.stdout == "1\n", other
    await run_ok(sandbox)


async def test_infinite_loop_hits_the_cpu_limit(sandbox: Sandbox) -> None:
    r = await sandbox.run("while True:\n    pass\n")
    assert r.limit == "cpu_time" and r.signal in ("SIGXCPU", "SIGKILL") and r.exit_code is None
    await run_ok(sandbox)


async def test_a_kill_from_elsewhere_is_not_blamed_on_the_cpu_limit(sandbox: Sandbox) -> None:
    """SIGKILL long before the code could have used its CPU time (here it kills itself; the
    kernel's OOM killer looks the same) names no limit."""
    # A CPU limit no kill this soon could reach on any host (at most 64 CPUs for 0.5 s).
    roomy = Sandbox(dataclasses.replace(LIMITS, cpu_s=32))
    r = await roomy.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert r.signal == "SIGKILL" and r.limit is None and r.exit_code is None, r
    await run_ok(sandbox)


async def test_sleeping_code_hits_the_wall_clock(sandbox: Sandbox) -> None:
    r = await Sandbox(SHORT).run("import time\ntime.sleep(3600)")
    assert r.limit == "wall_clock" and r.exit_code is None, r
    await run_ok(sandbox)


async def test_ten_gigabyte_allocation_fails(sandbox: Sandbox) -> None:
    r = await sandbox.run("x = bytearray(10 * 1024 ** 3)\nprint('allocated')")
    assert r.limit == "memory" and "MemoryError" in r.stderr and "allocated" not in r.stdout
    await run_ok(sandbox)


async def test_etc_shadow_is_not_readable(sandbox: Sandbox) -> None:
    r = await sandbox.run("print(open('/etc/shadow').read())")
    assert r.exit_code == 1 and "FileNotFoundError" in r.stderr and r.stdout == ""


async def test_etc_shadow_is_unreadable_even_when_bound_in(sandbox: Sandbox) -> None:
    # With /etc visible, the dropped uid is what keeps /etc/shadow closed (a user namespace
    # alone would map the sandbox's uid back to root, its owner).
    sb = Sandbox(LIMITS, ro_binds=("/etc",))
    r = await sb.run("print(len(open('/etc/passwd').read()) > 0)\n"
                     "print(open('/etc/shadow').read())")
    assert r.stdout == "True\n", r
    assert r.exit_code == 1 and "PermissionError" in r.stderr, r


async def test_writes_outside_the_working_directory_fail(sandbox: Sandbox, tmp_path: Path) -> None:
    name = f"swarm-sandbox-{uuid.uuid4().hex}"
    targets = [f"/{name}", f"/usr/{name}", f"/tmp/{name}", f"/etc/{name}", str(tmp_path / name),
               f"/work/../{name}", f"/proc/{name}", f"/dev/{name}"]
    code = "import sys\nok = []\n"
    for t in targets:
        code += (f"try:\n    open({t!r}, 'w').write('x')\n    ok.append({t!r})\n"
                 "except OSError as e:\n    print(type(e).__name__, e.errno)\n")
    code += "open('inside.txt', 'w').write('fine')\nprint('wrote', ok, open('inside.txt').read())\n"
    r = await sandbox.run(code)
    assert r.exit_code == 0, r
    assert "wrote [] fine" in r.stdout, r.stdout
    assert _existing(targets) == []
    # The working directory is private and gone afterwards: a second run starts afresh.
    again = await sandbox.run("import os\nprint(os.listdir('.'))")
    assert again.stdout == "['main.py']\n"


async def test_sockets_reach_nothing(sandbox: Sandbox) -> None:
    connected: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.append(1)
        writer.close()

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    code = f"""\
import socket
for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
    try:
        socket.create_connection(addr, timeout=2).close()
        print("connected", addr)
    except OSError as e:
        print(addr[0], e.errno)
try:
    socket.getaddrinfo("example.com", 80)
    print("resolved")
except OSError as e:
    print("dns", type(e).__name__)
"""
    async with listener:
        r = await sandbox.run(code)
        # The host listener is really there: a connection from the test process reaches it.
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        await w.wait_closed()
    assert r.exit_code == 0, r
    lines = r.stdout.splitlines()
    # 111 ECONNREFUSED: the sandbox's own loopback has nothing listening; 101 ENETUNREACH:
    # no route out at all, so nothing was sent (not a timeout).
    assert lines[:3] == ["127.0.0.1 111", "1.1.1.1 101", "8.8.8.8 101"], lines
    assert lines[3].startswith("dns ") and "connected" not in r.stdout
    assert connected == [1]  # only the test's own connection


async def test_big_files_and_output_are_capped(sandbox: Sandbox) -> None:
    big = await sandbox.run("open('big', 'wb').write(b'x' * (8 << 20))")
    assert big.limit == "file_size" and "File too large" in big.stderr
    noisy = await sandbox.run("while True:\n    print('x' * 1000)")
    assert noisy.limit == "output" and noisy.stdout_truncated
    assert len(noisy.stdout) < LIMITS.output_bytes + 100
    await run_ok(sandbox)


async def test_code_size_is_checked() -> None:
    sb = Sandbox(SandboxLimits(max_code_bytes=10))
    with pytest.raises(ValueError, match="limit is 10"):
        await sb.run("print('far too long')")


async def test_no_bwrap_refuses_unless_allowed(tmp_path: Path) -> None:
    missing = str(tmp_path / "bwrap")
    refusing = Sandbox(LIMITS, bwrap=missing)
    with pytest.raises(SandboxUnavailable, match=r"bwrap is not installed.*allow_unsandboxed"):
        await refusing.run("print(1)")
    allowed = Sandbox(LIMITS, bwrap=missing, allow_unsandboxed=True)
    r = await allowed.run("import os\nprint(os.getuid())\nwhile True:\n    pass")
    # Unsandboxed it still runs under the limits (and as an unprivileged uid under root).
    assert not r.sandboxed and r.limit == "cpu_time", r
    if ROOT:
        assert r.stdout.strip() != "0"


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="cpu_s must be at least 1"):
        SandboxLimits(cpu_s=0)
    with pytest.raises(ValueError, match="memory_mb 8 is too small"):
        SandboxLimits(memory_mb=8)


async def test_mcp_server_keeps_serving_after_attacks(sandbox: Sandbox) -> None:
    """The built-in server over stdio: each attack comes back as a result, not a crash."""
    server = MCPStdioConfig(command=sys.executable, args=[
        "-m", "swarm.tools.python_exec_server", "--cpu-s", "1", "--wall-s", "60",
        "--max-procs", "8", "--memory-mb", "256"])
    src = MCPToolSource("code", server, timeout_s=30)
    try:
        (spec,) = await src.list_tools()
        assert spec.name == "python_exec" and spec.idempotent and not spec.destructive
        ctx = ToolContext()
        results = {}
        for name, code in [("bomb", FORK_BOMB), ("loop", "while True: pass"),
                           ("alloc", "bytearray(10 * 1024 ** 3)"),
                           ("shadow", "open('/etc/shadow').read()")]:
            res = await src.call("python_exec", {"code": code}, ctx)
            assert not res.is_error, res
            results[name] = res.structured
        assert results["bomb"]["limit"] == "processes"
        assert results["loop"]["limit"] == "cpu_time"
        assert results["alloc"]["limit"] == "memory"
        assert "FileNotFoundError" in results["shadow"]["stderr"]
        ok = await src.call("python_exec", {"code": "print('still here')"}, ctx)
        assert ok.structured["stdout"] == "still here\n" and ok.structured["exit_code"] == 0
        assert '"stdout": "still here\\n"' in ok.content  # the text the model reads
    finally:
        await src.aclose()


async def test_unavailable_sandbox_is_a_tool_error(tmp_path: Path) -> None:
    from mcp import Client

    from swarm.tools.python_exec_server import build_server

    server = build_server(Sandbox(LIMITS, bwrap=str(tmp_path / "bwrap")))
    async with Client(server) as client:
        res = await client.call_tool("python_exec", {"code": "print(1)"})
    assert res.is_error
    assert "refuses to run: no sandbox: bwrap is not installed" in res.content[0].text
    # An interpreter that isn't there: named, with no advice about bubblewrap (installed or
    # not, and with or without allow_unsandboxed, it can't run).
    missing = tmp_path / "no-python"
    for allow in (False, True):
        server = build_server(Sandbox(LIMITS, python=str(missing), allow_unsandboxed=allow))
        async with Client(server) as client:
            res = await client.call_tool("python_exec", {"code": "print(1)"})
        assert res.is_error and (f"can't run code: the interpreter {missing} is not "
                                 "executable (python_exec's `python` setting, or --python)"
                                 in res.content[0].text), res.content[0].text


def test_server_options_are_checked(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from swarm.tools.python_exec_server import parse_args, sandbox_from_args

    with pytest.raises(SystemExit):
        parse_args(["--cpu-s", "0"])
    assert "--cpu-s: must be positive" in capsys.readouterr().err
    monkeypatch.setenv("SWARM_EXEC_WALL_S", "soon")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--wall-s: expected a number, got 'soon'" in capsys.readouterr().err
    monkeypatch.setenv("SWARM_EXEC_WALL_S", "7.5")
    monkeypatch.setenv("SWARM_EXEC_ALLOW_UNSANDBOXED", "true")
    sb = sandbox_from_args(parse_args(["--memory-mb", "300"]))
    assert sb.limits.wall_s == 7.5 and sb.limits.memory_mb == 300 and sb.allow_unsandboxed



async def test_swarm_carries_on_after_a_fork_bomb(sandbox: Sandbox, tmp_path: Path) -> None:
    import yaml

    from swarm.config import parse_config
    from swarm.events import ToolCalled
    from swarm.testing import LocalSwarm

    rules = [
        {"when": {"agent": "coder", "last_role": "user"},
         "tool_calls": [{"name": "python_exec", "arguments": {"code": FORK_BOMB}}]},
        {"when": {"agent": "coder", "last_tool": "python_exec", "called": {"python_exec": 1}},
         "tool_calls": [{"name": "python_exec", "arguments": {"code": "print(2 ** 10)"}}]},
        {"when": {"agent": "coder", "last_tool": "python_exec"},
         "content": "then printed {{ results_json.python_exec.stdout | trim }}"},
    ]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": rules}))
    cfg = parse_config({
        "name": "t",
        "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
        "tools": {"code": {"mcp": {"command": sys.executable, "args": [
            "-m", "swarm.tools.python_exec_server", "--max-procs", "8", "--wall-s", "60"]},
            "timeout_s": 60}},
        "agents": {"coder": {"model": "m", "tools": ["code"]}},
        "supervisor": {"entry": "coder"},
    }, base_dir=tmp_path)
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("fork bomb, then arithmetic", timeout=120)
        assert row["state"] == "completed", row
        assert row["answer"] == "then printed 1024"
        calls = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
        assert [c.outcome for c in calls] == ["ok", "ok"]
        session_msgs = [m for m in sw.supervisor.get(row["task_id"]).transcript
                        if m.get("role") == "tool"]
        assert '"limit": "processes"' in session_msgs[0]["content"]


async def test_the_code_desk_example(sandbox: Sandbox) -> None:
    from swarm.config import load_config
    from swarm.testing import LocalSwarm

    cfg = load_config(CODE_DESK)
    async with LocalSwarm(cfg) as sw:
        assert await sw.answer(cfg.example_task, timeout=120) == (
            "The program exited with status 0 and printed: 3.875")
        answer = await sw.answer("run: " + FORK_BOMB, timeout=120)
        assert answer.startswith("The program was stopped by the processes limit"), answer


def _tool_cfg(tmp_path: Path, tool: dict[str, object]) -> object:
    from swarm.config import parse_config

    (tmp_path / "p.yaml").write_text("rules: []\n")
    return parse_config({
        "name": "t", "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
        "tools": {"code": tool}, "agents": {"a": {"model": "m", "tools": ["code"]}},
        "supervisor": {"entry": "a"}}, base_dir=tmp_path)


def test_python_exec_config_is_the_stdio_server(tmp_path: Path) -> None:
    cfg = _tool_cfg(tmp_path, {"python_exec": {"cpu_s": 2, "wall_s": 4, "ro_binds": ["/srv"],
                                               "allow_unsandboxed": True}, "timeout_s": 9})
    mcp = cfg.tools["code"].mcp  # type: ignore[attr-defined]
    assert mcp.command == "python"
    assert mcp.args == ["-m", "swarm.tools.python_exec_server", "--cpu-s", "2", "--wall-s", "4",
                        "--ro-bind", "/srv", "--allow-unsandboxed"]
    assert _tool_cfg(tmp_path, {"python_exec": {}}).tools["code"].mcp.args == [  # type: ignore
        "-m", "swarm.tools.python_exec_server"]


@pytest.mark.parametrize(
    ("tool", "where", "needle"),
    [
        ({"python_exec": {"cpu_s": 0}}, "tools.code.python_exec.cpu_s", "greater than or equal"),
        ({"python_exec": {"memory_mb": 8}}, "tools.code.python_exec.memory_mb", "32"),
        ({"python_exec": {"ro_binds": ["etc"]}}, "tools.code.python_exec.ro_binds.0", "pattern"),
        ({"python_exec": {"wall_s": 60}}, "tools.code",
         "timeout_s (30) must be more than python_exec.wall_s (60)"),
        ({"python_exec": {}, "mcp": {"command": "x"}}, "tools.code", "exactly one of"),
        ({"python_exec": {}, "python": ["swarm.examples.tools:echo"]}, "tools.code",
         "exactly one of"),
        ({"python_exec": {"cpus": 1}}, "tools.code.python_exec.cpus", "unknown field"),
    ],
)
def test_bad_python_exec_config(tmp_path: Path, tool: dict[str, object], where: str,
                                needle: str) -> None:
    from swarm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _tool_cfg(tmp_path, tool)
    assert any(p == where and needle in m for p, m in err.value.problems), err.value.problems
