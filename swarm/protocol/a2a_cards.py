"""Agent cards of remote A2A members: fetched and checked with a2a-sdk (swarm.protocol.a2a_member).

A card is checked the way a2a-sdk reads it (`A2ACardResolver`), then against the fields the A2A
spec requires, and for a JSON-RPC interface, which is what swarm speaks to a remote member.
"""

from __future__ import annotations

import asyncio

import httpx
from a2a.client import A2ACardResolver, AgentCardResolutionError
from a2a.types import AgentCard
from a2a.utils.errors import A2AError
from a2a.utils.proto_utils import validate_proto_required_fields

from swarm.config import A2AMemberConfig, SwarmConfig
from swarm.errors import ConfigError

_CARD_TIMEOUT_S = 30.0


def card_problem(role: str, url: str, exc: BaseException) -> tuple[str, str]:
    """The ConfigError problem for a member whose card is unusable."""
    return f"agents.{role}.a2a", f"remote A2A agent {role} at {url} can't be used: {exc}"

async def fetch_card(cfg: A2AMemberConfig, http: httpx.AsyncClient) -> AgentCard:
    """Fetch a member's agent card and check it with a2a-sdk (parse, the spec's required
    fields, a JSON-RPC interface); raise `ValueError` saying what is wrong."""
    where = cfg.url.rstrip("/") + cfg.card_path
    # A card is small: it gets the connect timeout and at most 30 s to arrive, whatever the
    # member's (long) turn timeout.
    timeout = httpx.Timeout(min(cfg.timeout_s, _CARD_TIMEOUT_S), connect=cfg.connect_timeout_s)
    try:
        card = await A2ACardResolver(http, cfg.url, cfg.card_path).get_agent_card(
            http_kwargs={"timeout": timeout})
    except AgentCardResolutionError as exc:
        raise ValueError(str(exc)) from None
    try:
        validate_proto_required_fields(card)
    except A2AError as exc:
        missing = [f"{e['field']} ({e['message'].rstrip('.').lower()})"
                   for e in (getattr(exc, "data", None) or {}).get("errors", [])]
        raise ValueError(f"agent card at {where} is not valid A2A: "
                         f"{', '.join(missing) or exc}") from None
    if not any(i.protocol_binding == "JSONRPC" for i in card.supported_interfaces):
        offered = sorted({i.protocol_binding for i in card.supported_interfaces})
        raise ValueError(f"agent card at {where} offers no JSONRPC interface (only {offered})")
    return card


def http_client(cfg: A2AMemberConfig, max_connections: int = 100) -> httpx.AsyncClient:
    """The HTTP client a member's calls go through: its timeouts and headers. A turn's
    attempt is bounded by `timeout_s` as a whole; httpx's own read timeout is only a backstop
    behind it."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s + _CARD_TIMEOUT_S, connect=cfg.connect_timeout_s),
        headers={k: v.get_secret_value() for k, v in cfg.headers.items()},
        limits=httpx.Limits(max_connections=max_connections),
    )


async def check_cards(cfg: SwarmConfig, *, lazy_too: bool = False) -> dict[str, AgentCard]:
    """Fetch and check the cards of the remote members checked at start-up (every remote
    member with `lazy_too`); raise `ConfigError` naming each member and URL that failed."""
    roles = [r for r in cfg.remote_agents()
             if lazy_too or cfg.agents[r].a2a.check == "startup"]  # type: ignore[union-attr]

    async def one(role: str) -> AgentCard:
        mcfg = cfg.agents[role].a2a
        assert mcfg is not None
        async with http_client(mcfg) as http:
            return await fetch_card(mcfg, http)

    results = await asyncio.gather(*(one(r) for r in roles), return_exceptions=True)
    problems, cards = [], {}
    for role, res in zip(roles, results, strict=True):
        if isinstance(res, BaseException):
            problems.append(card_problem(role, cfg.agents[role].a2a.url, res))  # type: ignore[union-attr]
        else:
            cards[role] = res
    if problems:
        raise ConfigError(problems)
    return cards
