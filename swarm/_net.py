"""Whether a server could listen on an address now, and a free port: for the processes swarm
starts (redis-server, Ray Serve's proxy, the MCP server) before it starts them; and whether
anything answers at an address swarm is about to join."""

from __future__ import annotations

import socket

__all__ = ["connect_problem", "free_port", "listen_problem"]


def listen_problem(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now (the name doesn't resolve: a
    `socket.gaierror`; the port is taken: the bind's `OSError`), or None if it could. Bound
    as servers bind (SO_REUSEADDR), so a port only in TIME_WAIT counts as free."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return e
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the system picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connect_problem(host: str, port: int, timeout_s: float) -> OSError | None:
    """Why nothing accepts a TCP connection at host:port within `timeout_s` (refused, timed
    out, the name doesn't resolve), or None if something does."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return e
