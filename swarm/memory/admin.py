"""Operator actions on a swarm's memory, without a running swarm: forget a user, prune by age.

Used by `swarm memory forget` and `swarm memory prune`. The stores are found from the config
as the swarm itself finds them: session memory in `memory.session.redis` or the state store's
Redis (an embedded one is started for the duration if it isn't running), long-term memory at
`memory.long_term.uri`.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from swarm.errors import UserError

if TYPE_CHECKING:
    from swarm.config import SwarmConfig

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, now: float | None = None) -> float:
    """Seconds in an age such as 90s, 30m, 12h, 30d or 2w, or since an ISO date/time such as
    2026-01-01 (UTC unless it names a zone, as `swarm usage --since` reads one)."""
    m = _AGE.match(text.strip())
    if m:
        return float(m.group(1)) * _UNIT[m.group(2)]
    from swarm.observability.usage import parse_since

    now = time.time() if now is None else now
    try:
        age = now - parse_since(text).timestamp()  # an ISO date, read as `--since` reads one
    except UserError:
        raise UserError(f"--older-than {text!r}: expected a number and a unit s, m, h, d or w "
                        "(e.g. 30d), or an ISO date/time such as 2026-01-01") from None
    if age < 0:
        raise UserError(f"--older-than {text!r} is in the future")
    return age


def _redis_url(cfg: SwarmConfig) -> tuple[str | None, Any]:
    """The session store's Redis URL, and an embedded server started here (to stop after)."""
    if cfg.memory.session.redis is not None:
        return cfg.memory.session.redis, None
    from swarm.runtime.deploy import resolve_store

    spec, server = resolve_store(cfg)
    if spec is None or not re.match(r"^(redis|rediss|unix)://", spec.split("|", 1)[0]):
        return None, server
    return spec.split("|", 1)[0], server


def forget_user(cfg: SwarmConfig, user: str) -> dict[str, int]:
    """Delete a user's sessions (every swarm on the store) and long-term memories."""
    if not user:
        raise UserError("--user must be a non-empty user name")
    import asyncio

    url, server = _redis_url(cfg)  # (may start an embedded server: not inside a loop)
    try:
        return asyncio.run(_forget(cfg, user, url))
    finally:
        if server is not None and getattr(server, "started_here", False):
            server.stop()


async def _forget(cfg: SwarmConfig, user: str, url: str | None) -> dict[str, int]:
    from swarm.memory.service import MemoryService, pin_memory_location

    svc = MemoryService(pin_memory_location(cfg))
    if url is not None:
        svc.settings = svc.settings.model_copy(update={
            "session": svc.settings.session.model_copy(update={"redis": url})})
    try:
        return await svc.forget_user(user)
    finally:
        await svc.aclose()


def prune(cfg: SwarmConfig, older_than_s: float) -> int:
    """Delete long-term memories last updated more than `older_than_s` seconds ago."""
    import asyncio

    return asyncio.run(_prune(cfg, older_than_s))


async def _prune(cfg: SwarmConfig, older_than_s: float) -> int:
    from swarm.memory.service import MemoryService, pin_memory_location

    svc = MemoryService(pin_memory_location(cfg))
    try:
        return await svc.longterm().delete(older_than=time.time() - older_than_s)
    finally:
        await svc.aclose()
