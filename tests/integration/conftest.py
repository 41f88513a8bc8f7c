"""Integration fixtures: one private local Ray cluster and one Serve HTTP proxy per session."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm.models.ingress import default_direct_ingress_env
from swarm.runtime.deploy import NAMESPACE, RAY_SYSTEM_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Poll until the port accepts a TCP connection, bounded by `timeout`; fail at once if
    `proc`, the server meant to listen there, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


async def wait_until_refused(port: int, timeout: float = 30.0) -> None:
    """Poll until a TCP connection to the port is refused (its server's process is gone),
    bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)
    raise AssertionError(f"127.0.0.1:{port} still accepted connections after {timeout}s")


def swarm_diagnostics(ray_temp_dir: str, deployment: str, lines: int = 30) -> str:
    """What a failed recovery test needs to be read from CI output alone: every Ray actor of
    a deployed swarm (name, state, pid, why it died) and the last lines each wrote to
    stderr, where swarm's warnings go."""
    from ray.util.state import list_actors

    logs = Path(ray_temp_dir) / "session_latest" / "logs"
    out = []
    try:
        actors = list_actors(filters=[("ray_namespace", "=", NAMESPACE)], limit=10_000,
                             detail=True, raise_on_missing_output=False)
    except Exception as exc:  # the state API itself failing is worth knowing too
        return f"(listing actors failed: {exc})"
    for a in sorted(actors, key=lambda a: (a.name or "", a.pid or 0)):
        if not (a.name or "").startswith(deployment + "."):
            continue
        died = (a.death_cause or {}).get("actor_died_error_context", {}).get("error_message", "")
        out.append(f"--- {a.name} {a.state} pid={a.pid} {died[:200]}")
        for f in sorted(logs.glob(f"worker-*-{a.pid}.err")) if a.pid else []:
            tail = [ln for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
            out.extend("    " + ln[:300] for ln in tail[-lines:])
    return "\n".join(out) or f"(no actors of {deployment})"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the session: the swarms' durable store and the payments tool's.

    Exported as SWARM_STATE_STORE, so every swarm the tests deploy is durable, and as
    SWARM_PAYMENTS_REDIS for the example payment tool.
    """
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    os.environ["SWARM_STATE_STORE"] = server.url
    os.environ["SWARM_PAYMENTS_REDIS"] = server.url
    try:
        yield server.url
    finally:
        os.environ.pop("SWARM_STATE_STORE", None)
        os.environ.pop("SWARM_PAYMENTS_REDIS", None)
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(redis_url: str) -> Iterator[dict]:
    """A private local Ray (never an already running cluster); yields `ray.init`'s context info.

    Two test sessions on one machine would fight over Ray's fixed default ports (the dashboard
    agent's among them), so a session holds a machine-wide lock while its cluster runs.
    """
    import fcntl

    import ray

    lock = open(os.path.join(tempfile.gettempdir(), "swarm-ray-tests.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    # A short path: Ray's socket paths under the temp dir must stay under the Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="swarm-ray-", dir="/tmp")
    # As a local cluster started by swarm has it: Serve direct ingress available to models with
    # `ingress: direct` (the Serve proxy keeps working for the others).
    default_direct_ingress_env()
    ctx = ray.init(
        address="local",
        # Logical CPUs: agents and model replicas reserve none, so this only bounds tasks.
        num_cpus=4,
        # The dashboard serves the Jobs API that the `ray job submit` test uses.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        _temp_dir=temp_dir,
        _system_config=dict(RAY_SYSTEM_CONFIG),
        # Workers import swarm from this checkout, whatever their working directory.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT),
                                  "SWARM_PAYMENTS_REDIS": redis_url}},
    )
    try:
        yield {"address": ctx.address_info["address"], "dashboard_url": ctx.dashboard_url,
               "temp_dir": temp_dir}
    finally:
        ray.shutdown()
        if not os.environ.get("SWARM_KEEP_RAY_TMP"):  # set it to read Ray's logs afterwards
            shutil.rmtree(temp_dir, ignore_errors=True)
        lock.close()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: dict) -> Iterator[int]:
    """Start Serve's HTTP proxy on 127.0.0.1 at a free port; yields the port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
