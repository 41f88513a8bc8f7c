"""The built-in `python_exec` MCP server: runs untrusted Python in a bubblewrap sandbox.

Run it over stdio with `python -m swarm.tools.python_exec_server [options]`; configure it as a
tool server like any MCP server (README "Sandboxed code execution"):

    tools:
      code:
        mcp:
          command: python
          args: [-m, swarm.tools.python_exec_server, --cpu-s, "5", --memory-mb, "512"]
        timeout_s: 30

Every option also reads an environment variable (`SWARM_EXEC_CPU_S`, ...,
`SWARM_EXEC_ALLOW_UNSANDBOXED=true`), so limits can come from the tool server's `env`. Without
a working sandbox every call fails with the reason, unless unsandboxed runs are allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

from swarm.tools.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

# Each run is a fresh sandbox that keeps nothing and reaches nothing: running the same code
# again has no further effect outside it.
_ANNOTATIONS = ToolAnnotations(
    title="Run Python in a sandbox", read_only_hint=False, destructive_hint=False,
    idempotent_hint=True, open_world_hint=False)


class ExecOutput(TypedDict):
    """The result of one run (see swarm.tools.sandbox.ExecResult)."""

    stdout: str
    stderr: str
    exit_code: int | None
    signal: str | None
    limit: str | None
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float
    sandboxed: bool


def build_server(sandbox: Sandbox, max_concurrent: int = 2) -> MCPServer:
    """An MCP server with the one tool `python_exec`, running code in `sandbox`."""
    lim = sandbox.limits
    server = MCPServer(
        "python_exec",
        instructions="Runs Python code in an isolated, short-lived sandbox.",
    )
    slots = asyncio.Semaphore(max_concurrent)
    description = (
        "Run a Python 3 program in a fresh sandbox and get its stdout, stderr and exit status. "
        "Print what you want to see. The sandbox has the standard library only, no network, "
        "and an empty working directory (/work) that is discarded afterwards; limits: "
        f"{lim.cpu_s} s CPU, {lim.wall_s:g} s wall clock, {lim.memory_mb} MB memory, "
        f"{lim.file_size_mb} MB per file, {lim.max_procs} processes, {lim.output_bytes} bytes "
        "of output per stream. `limit` in the result names a limit the program hit."
    )

    @server.tool(name="python_exec", description=description, annotations=_ANNOTATIONS)
    async def python_exec(
        code: Annotated[str, Field(min_length=1, description="the Python program to run")],
    ) -> ExecOutput:
        async with slots:
            try:
                result = await sandbox.run(code)
            except (SandboxUnavailable, ValueError) as exc:
                raise ToolError(str(exc)) from None
        return ExecOutput(**result.to_dict())  # type: ignore[typeddict-item]

    return server


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SWARM_EXEC_{name.upper()}", default)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options, each defaulting to its SWARM_EXEC_* environment variable
    (`--cpu-s` to SWARM_EXEC_CPU_S and so on)."""
    d = SandboxLimits()
    p = argparse.ArgumentParser(prog="python -m swarm.tools.python_exec_server",
                                description="Serve the python_exec tool over MCP stdio.")
    p.add_argument("--cpu-s", type=_positive(int), default=_env("cpu_s", str(d.cpu_s)),
                   help="CPU seconds per run")
    p.add_argument("--wall-s", type=_positive(float), default=_env("wall_s", str(d.wall_s)),
                   help="wall-clock seconds per run")
    p.add_argument("--memory-mb", type=_positive(int),
                   default=_env("memory_mb", str(d.memory_mb)), help="address space per process")
    p.add_argument("--file-size-mb", type=_positive(int),
                   default=_env("file_size_mb", str(d.file_size_mb)), help="largest file")
    p.add_argument("--max-procs", type=_positive(int),
                   default=_env("max_procs", str(d.max_procs)), help="processes per run")
    p.add_argument("--output-bytes", type=_positive(int),
                   default=_env("output_bytes", str(d.output_bytes)),
                   help="stdout and stderr kept per run (each); more stops the run")
    p.add_argument("--tmpfs-mb", type=_positive(int), default=_env("tmpfs_mb", str(d.tmpfs_mb)),
                   help="size of the working directory")
    p.add_argument("--max-concurrent", type=_positive(int),
                   default=_env("max_concurrent", "2"), help="runs at once; more wait")
    p.add_argument("--python", default=_env("python", "") or None,
                   help="interpreter inside the sandbox (default: this Python's base install, "
                   "or /usr/bin/python3 when that isn't readable by --uid)")
    p.add_argument("--uid", type=int, default=_env("uid", "65534"),
                   help="unprivileged uid (and gid) to run as when started as root")
    p.add_argument("--ro-bind", action="append", default=[], metavar="PATH",
                   help="a host path to show read-only inside the sandbox (repeatable)")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   default=_env("allow_unsandboxed", "").lower() in ("1", "true", "yes"),
                   help="run code without bubblewrap when it is unavailable (no isolation)")
    # A default from the environment is a string, which argparse parses like an argument.
    args = p.parse_args(argv)
    if args.uid < 1:
        p.error(f"--uid must be an unprivileged uid (>= 1), got {args.uid}")
    return args


def sandbox_from_args(args: argparse.Namespace) -> Sandbox:
    """The sandbox the parsed options describe."""
    limits = SandboxLimits(
        cpu_s=args.cpu_s, wall_s=args.wall_s, memory_mb=args.memory_mb,
        file_size_mb=args.file_size_mb, max_procs=args.max_procs,
        output_bytes=args.output_bytes, tmpfs_mb=args.tmpfs_mb)
    return Sandbox(limits, python=args.python, uid=args.uid,
                   allow_unsandboxed=args.allow_unsandboxed, ro_binds=tuple(args.ro_bind))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options and serve over stdio."""
    args = parse_args(argv)
    try:
        sandbox = sandbox_from_args(args)
    except ValueError as exc:
        sys.exit(f"python_exec_server: {exc}")
    build_server(sandbox, args.max_concurrent).run("stdio")


if __name__ == "__main__":
    main()
