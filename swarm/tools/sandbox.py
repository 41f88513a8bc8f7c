"""Run untrusted Python in a separate process inside bubblewrap, with resource limits.

Each run gets a fresh sandbox: `bwrap --unshare-all` (its own network namespace with no route
out, its own PID, IPC and UTS namespaces), only the interpreter's directories bound read-only, a
private tmpfs at `/work` as the working directory (and `$HOME` and `$TMPDIR`), and a read-only
root and `/dev` (`/dev/shm` is a small tmpfs of its own). Running as root, the process first
drops to an unprivileged uid with `setpriv`, because a user namespace alone maps the sandbox's
uid back to root for files like `/etc/shadow`.

Limits: CPU seconds, address space, file size and process count are set with `setrlimit` by a
small bootstrap inside the sandbox (after bwrap has made its user namespace, so the process count
is the sandbox's own, not every process of the uid on the machine); wall-clock time and output
size are enforced from outside, by killing the whole process group.

Without bwrap, or where the kernel refuses namespaces, `Sandbox.run` raises `SandboxUnavailable`
unless `allow_unsandboxed` is set; then code runs as a plain subprocess with the same limits and
a temporary working directory, but with the host's file system view and network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Runs inside the sandbox with `python -I -c BOOT cpu mem fsize nproc`; the code comes on stdin.
# It writes the code to main.py, points stdin at /dev/null, sets the limits and execs a fresh
# interpreter on main.py, so tracebacks show the model's own lines and limits hold for children.
_BOOT = """\
import os, resource, sys
cpu, mem, fsize, nproc = (int(a) for a in sys.argv[1:5])
src = sys.stdin.buffer.read()
with open("main.py", "wb") as f:
    f.write(src)
fd = os.open("/dev/null", os.O_RDONLY)
os.dup2(fd, 0)
os.close(fd)
R = resource
R.setrlimit(R.RLIMIT_CORE, (0, 0))
R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
if mem:
    R.setrlimit(R.RLIMIT_AS, (mem, mem))
R.setrlimit(R.RLIMIT_FSIZE, (fsize, fsize))
R.setrlimit(R.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.executable, [sys.executable, "-I", "main.py"])
"""

# Markers in stderr that say which in-sandbox limit stopped the code (best effort: the code
# could print them itself, which only misleads its own caller).
_STDERR_LIMITS = (
    ("memory", re.compile(r"^MemoryError\b|Cannot allocate memory", re.M)),
    ("file_size", re.compile(r"\[Errno 27\] File too large")),
    ("processes", re.compile(r"\[Errno 11\] Resource temporarily unavailable")),
)
_SIGNAL_LIMITS = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size"}
_MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_READ_CHUNK = 65536


class SandboxUnavailable(RuntimeError):
    """The sandbox can't run here and unsandboxed execution is not allowed."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What one run may use. `memory_mb` 0 means no address-space limit."""

    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    file_size_mb: int = 16
    max_procs: int = 32
    output_bytes: int = 64_000
    tmpfs_mb: int = 64
    max_code_bytes: int = 200_000

    def __post_init__(self) -> None:
        problems = []
        for name in ("cpu_s", "max_procs", "output_bytes", "tmpfs_mb", "max_code_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.wall_s <= 0:
            problems.append(f"wall_s must be positive, got {self.wall_s}")
        if self.memory_mb < 0 or self.file_size_mb < 0:
            problems.append("memory_mb and file_size_mb can't be negative")
        if 0 < self.memory_mb < 32:
            problems.append(f"memory_mb {self.memory_mb} is too small to start Python (>= 32)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(slots=True)
class ExecResult:
    """What a run produced and how it ended.

    `limit` names the limit that stopped the code, if one did: wall_clock, cpu_time, memory,
    file_size, processes or output (the in-sandbox ones are read from the exit signal or the
    error the code died of, so they are best effort).
    """

    stdout: str
    stderr: str
    exit_code: int | None
    signal: str | None = None
    limit: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = 0.0
    sandboxed: bool = True

    @property
    def ok(self) -> bool:
        """Whether the code ran to a zero exit status within its limits."""
        return self.exit_code == 0 and self.limit is None

    def to_dict(self) -> dict[str, Any]:
        """The result as a plain dict (for structured tool output)."""
        return asdict(self)


@dataclass
class Sandbox:
    """Runs Python code in a bubblewrap sandbox; one instance serves many runs concurrently.

    `python` is the interpreter to run (default: this interpreter's base installation, or the
    system `python3` when that one isn't readable by the sandbox uid). `uid` is the unprivileged
    uid to drop to when running as root. `ro_binds` are extra host paths visible read-only.
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    python: str | None = None
    uid: int = 65534
    allow_unsandboxed: bool = False
    ro_binds: Sequence[str] = ()
    bwrap: str | None = None
    _probe: str | None = field(default=None, init=False, repr=False)
    _probed: bool = field(default=False, init=False, repr=False)
    _probe_lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bwrap is None:
            self.bwrap = shutil.which("bwrap")
        self._root = os.geteuid() == 0
        if self.python is None:
            self.python = default_python(self._root)
        self.python = os.path.abspath(self.python)
        for p in self.ro_binds:
            if not os.path.isabs(p):
                raise ValueError(f"ro_binds: {p!r} is not an absolute path")

    # ---- availability -------------------------------------------------------------------------

    async def problem(self) -> str | None:
        """Why the sandbox can't run here (checked once, by running it), or None if it can."""
        if self._probed:
            return self._probe
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:
            if not self._probed:
                self._probe = await self._check()
                self._probed = True
        return self._probe

    async def _check(self) -> str | None:
        if not os.access(str(self.python), os.X_OK):
            return f"the interpreter {self.python} is not executable"
        if not self.bwrap or not os.access(self.bwrap, os.X_OK):
            return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        if self._root and shutil.which("setpriv") is None:
            return "running as root needs setpriv (util-linux) to drop privileges"
        if self._root and not _world_readable(str(self.python)):
            return (f"the interpreter {self.python} is not readable by uid {self.uid} "
                    "(pass one that is, e.g. /usr/bin/python3)")
        argv = self._command(sandboxed=True)
        argv[argv.index(_BOOT)] = "pass"
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            return f"bwrap did not start: {exc}"
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            _killpg(proc.pid)
            await proc.wait()
            return "a trial run of bwrap did not finish within 30 s"
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()[-500:]
            return f"bwrap failed (exit {proc.returncode}): {text or 'no message'}"
        return None

    # ---- running ------------------------------------------------------------------------------

    async def run(self, code: str) -> ExecResult:
        """Run `code` once; raise `SandboxUnavailable` if it can't be sandboxed and that's
        required, `ValueError` if the code is too long."""
        data = code.encode()
        if len(data) > self.limits.max_code_bytes:
            raise ValueError(f"code is {len(data)} bytes; the limit is "
                             f"{self.limits.max_code_bytes}")
        if not os.access(str(self.python), os.X_OK):  # no sandbox, nor running without one
            raise SandboxUnavailable(
                f"python_exec can't run code: the interpreter {self.python} is not executable "
                "(python_exec's `python` setting, or --python)")
        problem = await self.problem()
        if problem is not None and not self.allow_unsandboxed:
            raise SandboxUnavailable(
                f"python_exec refuses to run: no sandbox: {problem}. Install bubblewrap, or set "
                "allow_unsandboxed (--allow-unsandboxed) to run code without isolation")
        if problem is None:
            return await self._run(data, sandboxed=True, workdir=None)
        # The operator allowed it: a plain subprocess in a temporary directory, same limits.
        with tempfile.TemporaryDirectory(prefix="swarm-exec-") as workdir:
            if self._root:
                os.chown(workdir, self.uid, self.uid)
            return await self._run(data, sandboxed=False, workdir=workdir)

    def _command(self, *, sandboxed: bool) -> list[str]:
        lim = self.limits
        python = str(self.python)
        cmd: list[str] = []
        if self._root and shutil.which("setpriv") is not None:
            cmd += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                    "--"]
        if sandboxed:
            assert self.bwrap is not None
            cmd += [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session",
                    "--clearenv", "--ro-bind", "/usr", "/usr"]
            for name in _MERGED_USR:
                path = Path("/", name)
                if path.is_symlink():
                    cmd += ["--symlink", os.readlink(path), str(path)]
                elif path.is_dir():
                    cmd += ["--ro-bind", str(path), str(path)]
            for extra in self._python_dirs():
                cmd += ["--ro-bind", extra, extra]
            for extra in self.ro_binds:
                cmd += ["--ro-bind", extra, extra]
            # /dev is a tmpfs with no size limit: it goes read-only (its device nodes are
            # mounts of their own and stay usable), and /dev/shm, which multiprocessing
            # needs, is a tmpfs bounded like /work.
            size = str(lim.tmpfs_mb << 20)
            cmd += ["--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
                    "--proc", "/proc", "--size", size, "--tmpfs", "/work",
                    "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/work",
                    "--setenv", "HOME", "/work", "--setenv", "TMPDIR", "/work",
                    "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
                    "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                    "--"]
        cmd += [python, "-I", "-c", _BOOT]
        mem = lim.memory_mb << 20
        # The process count includes the interpreter itself (and bwrap's init, inside).
        cmd += [str(lim.cpu_s), str(mem), str(lim.file_size_mb << 20), str(lim.max_procs + 2)]
        return cmd

    def _python_dirs(self) -> list[str]:
        """Directories outside /usr that the interpreter needs (its installation prefix)."""
        real = os.path.realpath(str(self.python))
        dirs = []
        if not real.startswith("/usr/"):
            # <prefix>/bin/pythonX.Y: the prefix holds lib/ (stdlib, libpython) as well.
            dirs.append(str(Path(real).parent.parent))
        if real != self.python and not str(self.python).startswith("/usr/"):
            dirs.append(str(Path(str(self.python)).parent))
        return [d for d in dict.fromkeys(dirs) if d not in ("/", "/usr")]

    async def _run(self, data: bytes, *, sandboxed: bool, workdir: str | None) -> ExecResult:
        lim = self.limits
        argv = self._command(sandboxed=sandboxed)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        if workdir is not None:
            env.update(HOME=workdir, TMPDIR=workdir)
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=workdir, env=env, start_new_session=True)
        over = asyncio.Event()
        out = _Capped(lim.output_bytes, over)
        err = _Capped(lim.output_bytes, over)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        readers = [asyncio.ensure_future(out.drain(proc.stdout)),
                   asyncio.ensure_future(err.drain(proc.stderr))]
        limit: str | None = None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()
            waiter = asyncio.ensure_future(proc.wait())
            capped = asyncio.ensure_future(over.wait())
            done, _ = await asyncio.wait({waiter, capped}, timeout=lim.wall_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            capped.cancel()
            if waiter not in done:
                limit = "output" if over.is_set() else "wall_clock"
        finally:
            # Kill the whole group: bwrap goes, and --die-with-parent plus the PID namespace
            # take everything the code started with it.
            _killpg(proc.pid)
            _, pending = await asyncio.wait(readers, timeout=2.0)
            if pending:
                # Only unsandboxed: a process that left the group holds the pipes open.
                for r in pending:
                    r.cancel()
                proc._transport.close()  # type: ignore[attr-defined]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            returncode = -signal.SIGKILL if proc.returncode is None else proc.returncode
        duration = time.monotonic() - t0
        code, sig = _exit_status(returncode, sandboxed)
        if limit is not None:
            code = None
        stderr = err.text()
        if limit is None and over.is_set():
            limit = "output"
        if limit is None and sig is not None:
            limit = _SIGNAL_LIMITS.get(signal.Signals[sig])
            if limit is None and sig == "SIGKILL" and \
                    duration * _cpus() >= lim.cpu_s + 1:
                # The hard CPU limit (cpu_s + 1) sends SIGKILL; a kill sooner than the code
                # could have used that much CPU came from elsewhere (the kernel's OOM killer,
                # the code itself, an operator): no limit of the sandbox's.
                limit = "cpu_time"
        if limit is None and code not in (0, None):
            limit = next((n for n, pat in _STDERR_LIMITS if pat.search(stderr)), None)
        return ExecResult(
            stdout=out.text(), stderr=stderr, exit_code=code, signal=sig, limit=limit,
            stdout_truncated=out.truncated, stderr_truncated=err.truncated,
            duration_s=round(duration, 3), sandboxed=sandboxed)


def _cpus() -> int:
    """The CPUs this process may run on (its affinity, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class _Capped:
    """Reads a pipe to its end, keeping at most `cap` bytes; sets `over` when it overflows."""

    def __init__(self, cap: int, over: asyncio.Event) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self._over = over

    async def drain(self, stream: asyncio.StreamReader) -> None:
        # Reads on after the cap, discarding, until the killed process's pipe closes: asyncio
        # reports the process finished only once its pipes have.
        while chunk := await stream.read(_READ_CHUNK):
            if self.truncated:
                continue
            room = self.cap - len(self.buf)
            if len(chunk) > room:
                self.buf += chunk[:room]
                self.truncated = True
                self._over.set()
            else:
                self.buf += chunk

    def text(self) -> str:
        text = self.buf.decode(errors="replace")
        return text + "\n[output truncated]" if self.truncated else text


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _exit_status(returncode: int, sandboxed: bool) -> tuple[int | None, str | None]:
    """(exit code, signal name): bwrap reports a child killed by signal N as exit 128 + N."""
    if returncode < 0:
        return None, signal.Signals(-returncode).name
    if sandboxed and returncode > 128:
        with contextlib.suppress(ValueError):
            return None, signal.Signals(returncode - 128).name
    return returncode, None


def _world_readable(path: str) -> bool:
    """Whether an unprivileged user can reach and run `path` (every parent searchable)."""
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & 0o005 != 0o005:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def default_python(root: bool | None = None) -> str:
    """The interpreter for sandboxed code: this one's base installation, or the system python3
    when running as root and that installation isn't readable by other users."""
    if root is None:
        root = os.geteuid() == 0
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = os.path.join(sys.base_prefix, "bin", ver)
    if not os.path.exists(base):
        base = os.path.realpath(sys.executable)
    if not root or _world_readable(base):
        return base
    for cand in (f"/usr/bin/{ver}", "/usr/bin/python3"):
        if os.path.exists(cand):
            return cand
    return base


# Options of swarm.tools.python_exec_server, by config field name (swarm.config.PythonExecConfig).
_OPTIONS = ("cpu_s", "wall_s", "memory_mb", "file_size_mb", "max_procs", "output_bytes",
            "tmpfs_mb", "max_concurrent", "python", "uid")


def server_args(options: dict[str, Any]) -> list[str]:
    """Command-line arguments of the python_exec server for config options (those given)."""
    args = ["-m", "swarm.tools.python_exec_server"]
    for name in _OPTIONS:
        if options.get(name) is not None:
            args += ["--" + name.replace("_", "-"), str(options[name])]
    for path in options.get("ro_binds") or ():
        args += ["--ro-bind", str(path)]
    if options.get("allow_unsandboxed"):
        args.append("--allow-unsandboxed")
    return args
