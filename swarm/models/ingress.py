"""Calls that skip Ray Serve's HTTP proxy: straight to a Serve app's replicas (direct ingress).

Through the proxy an HTTP call crosses two extra processes' worth of work: the proxy parses it,
makes an actor call to a replica, the replica fetches the body back from the proxy with a
second call, and the answer streams back through the proxy. On a 2-core machine that added
about 6 ms a call over a deployment-handle call (`scripts/bench_models.py`). With Serve's
direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1` in the cluster's environment), every
replica of an ingress deployment serves HTTP itself on a port of its own, and the controller
lists them as the app's HTTP targets.

`ReplicaDirectory` reads that list for one app (found by its route prefix, the path of the
model's base URL) and picks a replica for each call by rendezvous hashing on the session id:
a session stays on one replica, so the replica's prefix cache keeps serving it, and when a
replica comes or goes only its own sessions move. The list is re-read in the background every
`refresh_s`, and at once after a connection to a replica fails; no call waits for it. Where the
cluster has no direct ingress, or the app has no replica listed yet (the first read of a process
included), calls go to the base URL (the proxy) as before.

The controller's target list is an internal API of Ray 2.60 (`get_target_groups`), kept in this
module alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Ray settings for a cluster whose models are called directly. Serve reads them when its
# processes start, so they belong in the environment of `ray start` (or of the driver that starts
# a local cluster). A direct-ingress replica being stopped stays open for a draining period so
# load balancers can drop it (30 s by default); swarm's client re-reads the replica list on the
# first refused connection, so local clusters keep it short.
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                      "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def default_direct_ingress_env() -> None:
    """Put `DIRECT_INGRESS_ENV` in this process's environment where it isn't set, before it
    starts a local cluster (whose processes inherit it)."""
    for key, value in DIRECT_INGRESS_ENV.items():
        os.environ.setdefault(key, value)


_READ_TIMEOUT_S = 5.0
# Ray Serve's controller actor (ray.serve._private.constants, not imported: see `_read`).
SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"
SERVE_NAMESPACE = "serve"
DOWN_S = 10.0


@dataclass(frozen=True, slots=True)
class Replica:
    name: str  # Serve's replica actor name: stable for the replica's life
    base_url: str  # http://host:port/route-prefix/v1


def _weight(session: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session}\x00{replica}".encode(),
                                          digest_size=8).digest(), "big")


def pick(replicas: tuple[Replica, ...], session: str) -> Replica:
    """The replica a session goes to: the highest hash of (session, replica name)."""
    return max(replicas, key=lambda r: _weight(session, r.name))


class ReplicaDirectory:
    """The HTTP addresses of one Serve app's replicas, read from the Serve controller."""

    def __init__(self, base_url: str, refresh_s: float = 5.0) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        path = parts.path
        self.route_prefix = path[: -len("/v1")] if path.endswith("/v1") else path
        self.suffix = path[len(self.route_prefix):]  # "/v1"
        self.fallback = base_url.rstrip("/")
        self.refresh_s = refresh_s
        self.replicas: tuple[Replica, ...] = ()
        self._read_at = float("-inf")
        self._reading: asyncio.Task[None] | None = None  # the read in flight
        self._stale = False  # a replica failed while a read was in flight: read again
        self._node_ip: str | None = None
        self._controller: Any = None
        self._down: dict[str, float] = {}  # base URL -> until when it is left out
        self._warned_unlisted = self._warned_failed = False

    def base_url(self, session: str) -> str:
        """Where this session's next call goes: its replica, or the proxy's base URL. Called
        from the event loop (a re-read is started there as a task).

        Never waits on the controller: a stale list is re-read in the background, and until
        the first read is in, calls go through the proxy (the first read looks the controller
        up, which costs about half a second the first time in a process).
        """
        if self._reading is None and time.monotonic() - self._read_at >= self.refresh_s:
            self._start()
        if not self.replicas:
            return self.fallback
        return pick(self.replicas, session).base_url

    def forget(self, base_url: str) -> None:
        """A call to `base_url` couldn't connect: leave that replica out for `DOWN_S` even if the
        controller still lists it (it notices a dead replica later than the caller), and read
        the list again before the next call."""
        self._down[base_url] = time.monotonic() + DOWN_S
        self.replicas = tuple(r for r in self.replicas if r.base_url != base_url)
        self._read_at = float("-inf")
        self._stale = self._reading is not None

    async def refresh(self) -> None:
        """Read the app's replicas from the controller now (joining a read in flight)."""
        await asyncio.shield(self._start())

    def close(self) -> None:
        """Stop a read in flight."""
        if self._reading is not None:
            self._reading.cancel()

    def _start(self) -> asyncio.Task[None]:
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._refresh())
        return self._reading

    async def _refresh(self) -> None:
        try:
            listed = await asyncio.wait_for(self._read(), _READ_TIMEOUT_S)
            now = time.monotonic()
            self._down = {url: t for url, t in self._down.items() if t > now}
            self.replicas = tuple(r for r in listed if r.base_url not in self._down)
        except Exception as e:  # no controller, an old Ray, ...: the proxy serves
            if not self._warned_failed:
                log.warning("can't list the replicas behind %s (%s: %s); calling through the "
                            "Serve proxy", self.fallback, type(e).__name__, e)
                self._warned_failed = True
            self.replicas = ()
        finally:
            self._read_at = float("-inf") if self._stale else time.monotonic()
            self._stale = False
            self._reading = None

    async def _read(self) -> tuple[Replica, ...]:
        import ray

        if not ray.is_initialized():
            return ()
        if self._controller is None:
            self._node_ip = ray.util.get_node_ip_address()
            # The first lookup in a process imports Serve's controller module: off the loop.
            self._controller = await asyncio.to_thread(
                ray.get_actor, SERVE_CONTROLLER, namespace=SERVE_NAMESPACE)
        try:
            # Flattened in the controller: unpickling Serve's own objects here would import
            # ray.serve (~0.8 s) in every agent process on its first model call.
            bind_host, groups = await self._controller.__ray_call__.remote(_http_targets())
        except ray.exceptions.RayActorError:
            self._controller = None  # a restarted controller: look it up again next time
            raise
        found = replicas_of(groups, self.route_prefix, self.suffix, self._node_ip or "",
                            bind_host)
        if not found and not self._warned_unlisted:
            log.info("no direct-ingress replicas listed for %s; calling through the Serve proxy "
                     "(is RAY_SERVE_ENABLE_DIRECT_INGRESS=1 set where the cluster started?)",
                     self.fallback)
            self._warned_unlisted = True
        return found


_LOOPBACK_OR_ANY = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""})


def replicas_of(groups: list[tuple[str, list[tuple[str, str, int]]]], route_prefix: str,
                suffix: str, node_ip: str, bind_host: str) -> tuple[Replica, ...]:
    """The replicas of the app at `route_prefix` in the controller's HTTP target groups
    ((route prefix, [(name, ip, port)]), as `_http_targets` returns them).

    Serve binds replica servers to its HTTP host (`bind_host`); a replica on this node is
    called on loopback when that host is loopback or the wildcard, else on its address."""
    found = []
    for prefix, targets in groups:
        if prefix.rstrip("/") != route_prefix.rstrip("/"):
            continue
        for name, ip, port in targets:
            # Without direct ingress the targets are the proxies: the base URL is one.
            if not name.startswith("SERVE_REPLICA::"):
                continue
            host = "127.0.0.1" if ip == node_ip and bind_host in _LOOPBACK_OR_ANY else ip
            if ":" in host:  # IPv6
                host = f"[{host}]"
            found.append(Replica(name, f"http://{host}:{port}{route_prefix}{suffix}"))
    return tuple(sorted(found, key=lambda r: r.name))


def _http_targets() -> Any:
    """A function to run inside the Serve controller that returns Serve's HTTP host and its HTTP
    target groups as plain tuples: (host, [(route prefix, [(target name, ip, port)])]). Made
    here so cloudpickle sends it by value: the controller's process may not have swarm on its
    path."""

    def targets(controller):  # type: ignore[no-untyped-def]
        out = []
        for group in controller.get_target_groups():
            if getattr(group.protocol, "value", group.protocol) == "HTTP":
                out.append((group.route_prefix or "",
                            [(t.name, t.ip, int(t.port)) for t in group.targets]))
        return str(getattr(controller.get_http_config(), "host", "") or ""), out

    return targets
