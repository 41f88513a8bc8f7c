"""Agent cards of remote A2A members: fetched and checked with a2a-sdk (swarm.protocol.a2a_member).

A card is checked the way a2a-sdk reads it (`A2ACardResolver`), then against the fields the A2A
spec requires, and for a JSON-RPC interface, which is what swarm speaks to a remote member.

A member's HTTP client (`http_client`) also checks what a2a-sdk's JSON-RPC client doesn't: that
each reply (and each event of a streamed one) carries the id of the request it answers; one that
doesn't raises `JsonRpcReplyError` naming both ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from a2a.client import A2ACardResolver, AgentCardResolutionError
from a2a.types import AgentCard
from a2a.utils.errors import A2AError
from a2a.utils.proto_utils import validate_proto_required_fields

from swarm.config import A2AMemberConfig, SwarmConfig
from swarm.errors import ConfigError

_CARD_TIMEOUT_S = 30.0
# The most a member's card may be, decoded: a card is a few KB. A reply's limit follows the
# member's max_answer_chars (`reply_limit`).
_CARD_MAX_BYTES = 1 << 20
_REPLY_MIN_BYTES = 8 << 20


class BodyTooLarge(ValueError):
    """A remote's card or reply (or one event of a streamed reply) is over its byte limit:
    read no further, so a peer can't fill the supervisor's memory."""


def reply_limit(cfg: A2AMemberConfig) -> int:
    """The most bytes a member's reply (or one streamed event) may be, decoded: room for
    `max_answer_chars` of any UTF-8 twice over (a task carries its history and artifacts), at
    least 8 MiB."""
    return max(_REPLY_MIN_BYTES, 8 * cfg.max_answer_chars)


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
    # httpx's read timeout is per read: a card sent a byte at a time would never time out.
    whole = min(cfg.timeout_s, _CARD_TIMEOUT_S) + cfg.connect_timeout_s
    try:
        async with asyncio.timeout(whole):
            card = await A2ACardResolver(http, cfg.url, cfg.card_path).get_agent_card(
                http_kwargs={"timeout": timeout})
    except AgentCardResolutionError as exc:
        raise ValueError(_resolution_problem(exc, timeout)) from None
    except TimeoutError:
        raise ValueError(f"agent card at {where} did not arrive whole within {whole:g} s"
                         ) from None
    except BodyTooLarge as exc:
        raise ValueError(f"agent card at {where}: {exc}") from None
    except RecursionError:
        raise ValueError(f"agent card at {where} is nested too deeply to read") from None
    except UnicodeDecodeError as exc:  # a2a-sdk's resolver lets it through as it is
        raise ValueError(f"agent card at {where} is not JSON text (UTF-8): {exc}") from None
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


def _resolution_problem(exc: BaseException, timeout: httpx.Timeout) -> str:
    """Why a card could not be fetched: the SDK's words, and the underlying error's, which
    may have no text of its own (an httpx timeout)."""
    text = str(exc).rstrip().rstrip(":")
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return text
    detail = str(cause) or type(cause).__name__
    if isinstance(cause, httpx.ConnectTimeout):
        detail = f"no connection within {timeout.connect:g} s"
    elif isinstance(cause, httpx.TimeoutException):
        detail = f"no answer within {timeout.read:g} s"
    return f"{text}: {detail}" if detail not in text else text


def http_client(cfg: A2AMemberConfig, max_connections: int = 100) -> httpx.AsyncClient:
    """The HTTP client a member's calls go through: its timeouts and headers, and the check of
    JSON-RPC reply ids. A turn's attempt is bounded by `timeout_s` as a whole; httpx's own read
    timeout is only a backstop behind it."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s + _CARD_TIMEOUT_S, connect=cfg.connect_timeout_s),
        # Bodies uncompressed: a compressed one is refused (`_cap_body`), as it could grow a
        # thousandfold in memory before its size could be checked.
        headers={"accept-encoding": "identity",
                 **{k: v.get_secret_value() for k, v in cfg.headers.items()}},
        limits=httpx.Limits(max_connections=max_connections),
        event_hooks={"response": [_cap_body(reply_limit(cfg)), _check_reply_ids]},
    )


def _cap_body(limit: int) -> Any:
    """Response hook: read a body no further than its limit once decoded (a card's
    `_CARD_MAX_BYTES`, a reply's `limit`, each event's of a streamed reply), raising
    `BodyTooLarge` there."""

    async def hook(response: httpx.Response) -> None:
        card = response.request.method == "GET"
        events = "text/event-stream" in response.headers.get("content-type", "")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise BodyTooLarge(f"the {'agent card' if card else 'reply'} came compressed "
                               f"({encoding}), though asked for none: its size can't be "
                               "bounded before it is unpacked")
        what = "agent card" if card else "event of its streamed reply" if events else "reply"
        response.stream = _Capped(_decoded(response), _CARD_MAX_BYTES if card else limit,
                                  events, what)

    return hook


def _decoded(response: httpx.Response) -> httpx.Response:
    """A response over `response`'s stream that reads it decoded; `response`'s own headers
    lose the encoding and length, so a stream put in its place (which passes decoded bytes)
    is read as it is."""
    decoded = httpx.Response(response.status_code, headers=response.headers,
                             stream=response.stream, request=response.request)
    for name in ("content-encoding", "content-length"):
        if name in response.headers:
            del response.headers[name]
    return decoded


class _Capped(httpx.AsyncByteStream):
    """A decoded body passed on until it (or, for server-sent events, one event) is over
    `limit` bytes."""

    def __init__(self, decoded: httpx.Response, limit: int, per_event: bool, what: str
                 ) -> None:
        self._decoded, self._limit, self._per_event, self._what = \
            decoded, limit, per_event, what

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size, newline = 0, False  # the event's size so far; whether the last byte ended a line
        limit = self._limit
        async for chunk in self._decoded.aiter_bytes():
            if self._per_event:
                # Events end at a blank line (LF, CRLF or CR line ends); every event in the
                # chunk is measured, and a blank line split across chunks still ends one.
                text = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                if newline and text.startswith(b"\n"):
                    size, text = 0, text[1:]
                parts = text.split(b"\n\n")
                for i, part in enumerate(parts):
                    size = len(part) if i else size + len(part)
                    if size > limit:
                        raise BodyTooLarge(f"the {self._what} is over {limit} bytes")
                newline = text.endswith(b"\n")
            else:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the {self._what} is over {limit} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._decoded.aclose()


class JsonRpcReplyError(Exception):
    """A JSON-RPC reply that doesn't answer the request it came for (its id is another)."""


def _same_id(sent: Any, got: Any) -> bool:
    return type(sent) is type(got) and sent == got  # 1 is not "1", nor True


def _check_reply_id(sent: Any, body: bytes) -> None:
    """Raise `JsonRpcReplyError` if `body`, a JSON-RPC reply, is not the one to `sent`. A body
    that isn't a JSON object is left to a2a-sdk, which says what is wrong with it."""
    try:
        reply = json.loads(body)
    except ValueError:
        return
    if not isinstance(reply, dict):
        return
    if "id" not in reply:
        raise JsonRpcReplyError(f"sent a JSON-RPC reply without an id to the request with id "
                                f"{sent!r}")
    got = reply["id"]
    # null is the id of an error about a request whose id the server could not read.
    if not _same_id(sent, got) and not (got is None and "error" in reply):
        raise JsonRpcReplyError(f"sent a JSON-RPC reply with id {got!r} to the request with "
                                f"id {sent!r}")


async def _check_reply_ids(response: httpx.Response) -> None:
    """Response hook: check the ids of a JSON-RPC call's reply, read whole, or of each event of
    a streamed one, as it arrives and before a2a-sdk reads it."""
    request = response.request
    if request.method != "POST" or not response.is_success:
        return  # not a call, or an HTTP error a2a-sdk reports
    try:
        call = json.loads(request.content)
    except (ValueError, httpx.RequestNotRead):
        return
    if not isinstance(call, dict) or "id" not in call:
        return
    if "text/event-stream" in response.headers.get("content-type", ""):
        # The events are checked as they pass, decoded.
        response.stream = _CheckedEvents(_decoded(response), call["id"])
        return
    _check_reply_id(call["id"], await response.aread())


class _CheckedEvents(httpx.AsyncByteStream):
    """A server-sent-events body passed on as it arrives, each event's reply id checked before
    the chunk that completes the event is."""

    def __init__(self, decoded: httpx.Response, sent: Any) -> None:
        self._decoded = decoded
        self._sent = sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        rest, data = b"", []
        async for chunk in self._decoded.aiter_bytes():
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:
                    _check_reply_id(self._sent, b"\n".join(data))
                    data = []
            yield chunk

    async def aclose(self) -> None:
        await self._decoded.aclose()


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
