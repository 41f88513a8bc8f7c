"""`OpenAIModel`: any OpenAI-compatible chat-completions server, over a pooled httpx client.

No SDK: importing the openai package costs ~0.6 s, paid again on every actor restart (the
crash-recovery path), and its typed response objects cost more per call than the few fields
read here. The client speaks the wire format directly:

- one `httpx.AsyncClient` per process and event loop for each server origin (scheme, host,
  port), shared by every model on that server and closed when its last user calls `aclose`;
- `stream: true` by default: SSE chunks with `stream_options.include_usage`, content and tool
  calls assembled from their deltas, time to first token measured at the first chunk;
- retries with exponential backoff and full jitter on 408, 429 (honouring `Retry-After`), 5xx,
  connection errors and timeouts; a per-call timeout (`timeout_s`) and a per-step timeout
  (`step_timeout_s`, across retries); no retry starts past the turn's deadline;
- the session id in `x-session-id`, so a session-affine router keeps a session's calls on the
  replica that holds its prefix cache; the agent name in `x-swarm-agent`.

Failures after retries raise `ModelCallError` (status, server message, attempts); a server's
context-length 400 raises `ContextLimitError`. An answer that isn't a completion raises
`ModelError` (not retried): JSON of another shape (a `null` choice: the decoder names the
path), no choices, or neither content (`""` counts) nor tool calls. A token count that is none
(negative, not a whole number, over a billion) counts as 0, with a warning once per model.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import httpx
import msgspec

from swarm._urls import redact_url
from swarm.errors import ContextLimitError, ModelCallError, ModelError
from swarm.models.ingress import ReplicaDirectory
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage

if TYPE_CHECKING:
    from swarm.config import OpenAIModelConfig

__all__ = ["OpenAIModel", "close_pool", "is_context_length_message"]

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode
# Statuses another attempt may fix. 4xx other than these are the request's own fault.
_RETRY_STATUS = frozenset({408, 429})
_MAX_RETRY_AFTER_S = 60.0
# Calls straight to a Serve replica (`serve_direct`): no bound but on connecting.
_DIRECT_TIMEOUT = httpx.Timeout(None, connect=2.0)
# How servers word a prompt that doesn't fit (OpenAI's code, vLLM's and others' messages).
_CONTEXT_RE = re.compile(
    r"context[_ ]length|maximum context|context window|max_model_len|prompt is too long|"
    r"too many tokens|reduce the length", re.IGNORECASE)


def is_context_length_message(text: str) -> bool:
    """Whether a server's error text says the prompt exceeds the model's context."""
    return bool(_CONTEXT_RE.search(text))


# ---- the connection pool ------------------------------------------------------------------------


@dataclass(slots=True)
class _Pooled:
    client: httpx.AsyncClient
    loop: asyncio.AbstractEventLoop
    users: set[int] = field(default_factory=set)


# (id of the event loop, origin) -> client. A client's connections belong to the loop that
# opened them, so each loop gets its own; entries of closed loops are dropped on the next use.
_POOL: dict[tuple[int, str], _Pooled] = {}


def _pooled_client(origin: str, user: int) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    key = (id(loop), origin)
    entry = _POOL.get(key)
    if entry is None or entry.loop is not loop or entry.client.is_closed:
        for k in [k for k, e in _POOL.items() if e.loop.is_closed()]:
            del _POOL[k]
        # Timeouts are applied per call (asyncio.timeout), so one client serves any settings.
        # An agent replica runs up to max_sessions calls at once: allow that many connections.
        entry = _Pooled(httpx.AsyncClient(
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256),
        ), loop)
        _POOL[key] = entry
    entry.users.add(user)
    return entry.client


async def _release(user: int) -> None:
    for key, entry in list(_POOL.items()):
        entry.users.discard(user)
        if not entry.users:
            del _POOL[key]
            if not entry.loop.is_closed() and entry.loop is asyncio.get_running_loop():
                await entry.client.aclose()


async def close_pool() -> None:
    """Close every pooled client of the running event loop (for shutdown and tests)."""
    loop = asyncio.get_running_loop()
    for key, entry in list(_POOL.items()):
        if entry.loop is loop:
            del _POOL[key]
            await entry.client.aclose()


# ---- the client ---------------------------------------------------------------------------------


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, what: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.status = status
        self.retry_after = retry_after


class OpenAIModel(Model):
    """A chat model behind an OpenAI-compatible endpoint (OpenAI, vLLM, the scripted engine).

    `base_url` includes the API version prefix, e.g. `http://127.0.0.1:8000/scripted/v1`.
    `http_client` replaces the pooled client (tests pass one on an ASGI transport); the model
    then doesn't close it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_tokens: int | None = None,
        temperature: float | None = None,
        name: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        *,
        stream: bool = True,
        step_timeout_s: float | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        serve_direct: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = name or model
        self.stream = stream
        self.step_timeout_s = step_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._url = f"{self.base_url}/chat/completions"
        self._shown_url = redact_url(self.base_url)  # for messages: no credentials
        parts = urlsplit(self.base_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._own_client = http_client
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._rng = random.Random()
        # A Ray Serve route in this cluster: calls go straight to the app's replicas.
        self._directory = ReplicaDirectory(self.base_url) if serve_direct else None

    @classmethod
    def from_config(cls, cfg: OpenAIModelConfig, *, name: str | None = None) -> OpenAIModel:
        """Build from a validated `OpenAIModelConfig`."""
        return cls(
            base_url=cfg.base_url,
            model=cfg.model,
            api_key=cfg.api_key.get_secret_value() if cfg.api_key is not None else None,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            name=name,
            stream=cfg.stream,
            step_timeout_s=cfg.step_timeout_s,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            serve_direct=cfg.serve_direct,
        )

    async def prepare(self) -> None:
        """With `serve_direct`: read the app's replica list, so that calls go direct from the
        first one on (until it is read they go through the proxy)."""
        if self._directory is not None and not self._directory.replicas:
            await self._directory.refresh()

    def _client(self, origin: str | None = None) -> httpx.AsyncClient:
        if self._own_client is not None:
            return self._own_client
        return _pooled_client(origin or self._origin, id(self))

    def _route(self, session: str) -> tuple[str, httpx.AsyncClient]:
        """The completions URL for this call and the client for its server."""
        if self._directory is None:
            return self._url, self._client()
        base = self._directory.base_url(session)
        if base == self.base_url:
            return self._url, self._client()
        parts = urlsplit(base)
        return f"{base}/chat/completions", self._client(f"{parts.scheme}://{parts.netloc}")

    def _body(self, request: ModelRequest) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": request.messages}
        if request.tools:
            body["tools"] = request.tools
        max_tokens = request.max_tokens if request.max_tokens is not None else self.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        temperature = request.temperature if request.temperature is not None \
            else self.temperature
        if temperature is not None:
            body["temperature"] = temperature
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return _encode(body)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Send one chat completion, retrying transient failures; map the answer."""
        content = self._body(request)
        headers = {**self._headers, "x-session-id": request.session_id,
                   "x-swarm-agent": request.agent}
        # step_timeout_s bounds every attempt; the turn's deadline (a wall-clock budget) only
        # stops further attempts, so a call in flight finishes and the budget's wrap-up runs.
        hard = None if self.step_timeout_s is None else time.time() + self.step_timeout_s
        end = hard
        if request.deadline is not None and (end is None or request.deadline < end):
            end = request.deadline
        attempt = 0
        while True:
            attempt += 1
            url, client = self._route(request.session_id)
            call_timeout = self.timeout_s
            if end is not None and end - time.time() <= 0:
                raise self._out_of_time(attempt - 1, end, None)
            if hard is not None:
                call_timeout = min(call_timeout, hard - time.time())
            try:
                async with asyncio.timeout(call_timeout):
                    return await self._attempt(client, url, content, headers)
            except _Retryable as e:
                failure = e
            except TimeoutError:
                failure = _Retryable(f"timed out after {call_timeout:.3g}s")
            except httpx.TransportError as e:
                failure = _Retryable(
                    f"can't reach the server: {type(e).__name__}: {redact_url(str(e))}")
                if self._directory is not None and url != self._url and \
                        isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
                    # A replica that is gone (or not reachable from here): left out, and the
                    # call goes at once to the next one (or the proxy), not counted as a retry.
                    # Each time one replica fewer is left, so this ends.
                    self._directory.forget(url[: -len("/chat/completions")])
                    attempt -= 1
                    continue
            if attempt > self.max_retries:
                raise self._failed(failure, attempt)
            if failure.retry_after is not None and failure.retry_after > _MAX_RETRY_AFTER_S:
                # Asked to wait longer than swarm waits for a retry: an outage, better met by
                # a fallback model at once than by a minute's sleep per attempt.
                failure.what += (f" (and asked to wait {failure.retry_after:.0f} s before "
                                 f"trying again; swarm waits at most {_MAX_RETRY_AFTER_S:g})")
                raise self._failed(failure, attempt)
            delay = self._backoff(attempt, failure.retry_after)
            if end is not None and time.time() + delay >= end:
                raise self._out_of_time(attempt, end, failure)
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]; a server's Retry-After
        wins (up to a minute; a longer one fails the call at once, in `complete`)."""
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER_S)
        return self._rng.uniform(0.0, min(self.backoff_max_s,
                                          self.backoff_base_s * 2 ** (attempt - 1)))

    def _where(self) -> str:
        return f"model {self.model!r} at {self._shown_url}"

    def _failed(self, failure: _Retryable, attempts: int) -> ModelCallError:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if failure.status is not None:
            msg = f"{self._where()} answered HTTP {failure.status} ({tries}): {failure.what}"
        else:
            msg = f"{self._where()} failed ({tries}): {failure.what}"
        return ModelCallError(self._hide_key(msg), status=failure.status, attempts=attempts,
                              transient=True)

    def _out_of_time(self, attempts: int, end: float, last: _Retryable | None) -> ModelCallError:
        why = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if last is not None:
            status = f"HTTP {last.status} " if last.status else ""
            why += f", last: {status}{last.what}"
        step = f"step_timeout_s = {self.step_timeout_s}" if self.step_timeout_s else "the step"
        return ModelCallError(self._hide_key(
            f"{self._where()}: out of time for this step ({step} or the turn's deadline, "
            f"{max(0.0, end - time.time()):.3g}s left; {why})"),
            status=last.status if last else None, attempts=attempts, transient=True)

    async def _attempt(self, client: httpx.AsyncClient, url: str, content: bytes,
                       headers: dict[str, str]) -> ModelResponse:
        t0 = time.perf_counter()
        # A replica called directly gets a short connect timeout: one on a node that is gone
        # answers nothing, and the call should move on to the next.
        timeout = _DIRECT_TIMEOUT if url != self._url else httpx.USE_CLIENT_DEFAULT
        if not self.stream:
            r = await client.post(url, content=content, headers=headers, timeout=timeout)
            if r.status_code != 200:
                self._status_error(r.status_code, r.content, r.headers)
            return self._from_json(r.content)
        async with client.stream("POST", url, content=content, headers=headers,
                                 timeout=timeout) as r:
            if r.status_code != 200:
                self._status_error(r.status_code, await r.aread(), r.headers)
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                return self._from_json(await r.aread())  # a server that ignores `stream`
            return await self._from_stream(r, t0)

    def _hide_key(self, text: str) -> str:
        """`text` without the API key in it (a server that echoes the request's headers in
        its error: the text goes into the task's state, events and logs)."""
        key = self.api_key
        return text.replace(key, "[REDACTED]") if key and len(key) >= 8 else text

    def _status_error(self, status: int, raw: bytes, headers: httpx.Headers) -> NoReturn:
        message = self._hide_key(_server_message(raw))
        if status in _RETRY_STATUS or status >= 500:
            raise _Retryable(message, status, _retry_after(headers))
        if status == 400 and is_context_length_message(message):
            raise ContextLimitError(
                f"{self._where()} rejected the prompt as too long for its context window "
                f"(HTTP 400): {message}")
        raise ModelCallError(f"{self._where()} answered HTTP {status}: {message}",
                             status=status, attempts=1, transient=False)

    def _unreadable(self, what: str, raw: bytes | str) -> ModelError:
        return ModelError(self._hide_key(f"{self._where()} returned an unreadable completion "
                                         f"({what}): {raw[:200]!r}"))

    def _from_json(self, raw: bytes) -> ModelResponse:
        try:
            data = _decode_completion(raw)
        except msgspec.DecodeError as e:  # not JSON, or JSON of another shape
            raise self._unreadable(f"{type(e).__name__}: {e}", raw) from e
        if not data.choices:
            raise self._unreadable("no choices", raw)
        choice = data.choices[0]
        msg = choice.message
        if msg is None:
            raise self._unreadable("the choice has no message", raw)
        calls = []
        for c in msg.tool_calls or ():
            if c.type not in (None, "function"):
                raise ModelError(f"model {self.model!r} returned an unsupported "
                                 f"{c.type!r} tool call; only function tools are supported")
            fn = c.function or _Function()
            # No `arguments` key is no arguments; `"arguments": null` is handed on as the JSON
            # it is, which the step loop refuses (a tool error naming it), not read as {}.
            args = fn.arguments
            calls.append(ToolCall(id=c.id or "", name=fn.name or "",
                                  arguments="" if args is msgspec.UNSET
                                  else "null" if args is None else args))
        if msg.content is None and not calls:  # text (if empty) or tool calls, or nothing
            raise self._unreadable("no content and no tool calls", raw)
        return ModelResponse(
            content=msg.content, tool_calls=calls, usage=_usage(data.usage, self._where()),
            finish_reason=choice.finish_reason or "stop",
            model=data.model or self.model, time_to_first_token_s=None)

    async def _from_stream(self, r: httpx.Response, t0: float) -> ModelResponse:
        parts: list[str] = []
        texts = False  # whether any delta had a `content` string, if only an empty one
        calls: dict[int, list[Any]] = {}  # index -> [id, name, [argument pieces]]
        finish: str | None = None
        usage: _UsageWire | None = None
        model = ""
        ttft: float | None = None
        choices = False
        done = False
        last = ""
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            last = data
            try:
                chunk = _decode_completion(data)
            except msgspec.DecodeError as e:  # not JSON, or JSON of another shape
                raise ModelError(f"{self._where()} sent an unreadable stream chunk "
                                 f"({type(e).__name__}: {e}): {data[:200]!r}") from e
            if chunk.error is not None:  # an error after the 200 (vLLM does this)
                raise _Retryable(f"error in the stream: {_error_text(chunk.error)}")
            if chunk.usage is not None:
                usage = chunk.usage
            if not model:
                model = chunk.model or ""
            for ch in chunk.choices or ():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if ch.index:
                    continue
                choices = True
                delta = ch.delta or _Message()
                if delta.content is not None:
                    texts = True
                    if delta.content:
                        parts.append(delta.content)
                for tc in delta.tool_calls or ():
                    slot = calls.get(tc.index or 0)
                    if slot is None:
                        slot = calls[tc.index or 0] = ["", "", [], False]
                    if tc.id:
                        slot[0] = tc.id
                    fn = tc.function or _Function()
                    if fn.name:
                        slot[1] += fn.name
                    if fn.arguments:
                        slot[2].append(fn.arguments)
                    elif fn.arguments is None:
                        slot[3] = True  # `null`: the call's arguments, if nothing else comes
                if ch.finish_reason:
                    finish = ch.finish_reason
        if not done and finish is None:
            raise _Retryable("the stream ended before the completion did")
        if not choices:
            raise ModelError(f"{self._where()} streamed a completion with no choices "
                             f"(last chunk: {last[:200]!r})")
        content = "".join(parts) or None
        # Arguments that were only ever `null` are handed on as that JSON, as unstreamed
        # (the step loop refuses them, naming it); a `null` among fragments is no fragment.
        tool_calls = [ToolCall(id=s[0], name=s[1],
                               arguments="null" if s[3] and not s[2] else "".join(s[2]))
                      for _, s in sorted(calls.items())]
        if content is None and not tool_calls:
            if not texts:
                raise ModelError(f"{self._where()} streamed a completion with no content and "
                                 f"no tool calls (last chunk: {last[:200]!r})")
            content = ""  # only `content: ""` deltas: an empty answer, as unstreamed
        return ModelResponse(
            content=content, tool_calls=tool_calls, usage=_usage(usage, self._where()),
            finish_reason=finish or "stop", model=model or self.model,
            time_to_first_token_s=ttft)

    async def aclose(self) -> None:
        """Give up this model's share of the pooled client (closed with its last user)."""
        if self._directory is not None:
            self._directory.close()
        if self._own_client is None:
            await _release(id(self))


# ---- the wire format ----------------------------------------------------------------------------
# A completion, or one chunk of a stream, decoded straight into these: JSON of another shape (a
# `null` choice, a token count that is a string) is a `msgspec.ValidationError` naming the path,
# not a crash later on. Fields not read here are skipped.


class _Function(msgspec.Struct):
    name: str | None = None
    # UNSET when the key is absent (a completion's call without arguments, or a stream delta
    # that carries none), None when it is JSON null.
    arguments: str | msgspec.UnsetType | None = msgspec.UNSET


class _ToolCallWire(msgspec.Struct):
    id: str | None = None
    type: str | None = None
    function: _Function | None = None
    index: int | None = None  # stream deltas: which call a piece belongs to


class _Message(msgspec.Struct):  # a choice's message, or a stream chunk's delta
    content: str | None = None
    tool_calls: list[_ToolCallWire] | None = None


class _Choice(msgspec.Struct):
    index: int | None = None
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _UsageWire(msgspec.Struct):
    # Read as sent, and checked (`_usage`): a usage figure swarm can't use must not make the
    # whole completion unreadable.
    prompt_tokens: Any = None
    completion_tokens: Any = None
    prompt_tokens_details: Any = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _UsageWire | None = None
    model: str | None = None
    error: Any = None  # an error sent in a stream after the 200


_decode_completion = msgspec.json.Decoder(_Completion).decode


# The most tokens one completion may report: more is no real count (a server's bug, or a
# hostile one), and a count past 2**63 broke the task's end.
_MAX_USAGE_TOKENS = 10**9
_warned_usage: set[str] = set()


def _token_count(value: Any) -> int | None:
    """A token count as reported, or None if it is none (negative, too large, not a whole
    number); absent is 0."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int and 0 <= value <= _MAX_USAGE_TOKENS:
        return value
    return None


def _usage(u: _UsageWire | None, where: str) -> Usage:
    """The completion's usage; a figure that is no token count (negative, over
    `_MAX_USAGE_TOKENS`, not a whole number) counts as 0, with a warning once per model: a
    negative cost would let a task past its max_cost_usd."""
    if u is None:
        return Usage()
    details = u.prompt_tokens_details
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    sent = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "prompt_tokens_details.cached_tokens": cached}
    counts = {k: _token_count(v) for k, v in sent.items()}
    bad = [f"{k}={sent[k]!r}"[:80] for k, n in counts.items() if n is None]
    if bad and where not in _warned_usage:
        _warned_usage.add(where)
        log.warning("%s reported token usage that is no count (%s): counted as 0, so costs "
                    "and token budgets don't see it (said once per model)", where,
                    ", ".join(bad))
    return Usage(input_tokens=counts["prompt_tokens"] or 0,
                 output_tokens=counts["completion_tokens"] or 0,
                 cached_input_tokens=counts["prompt_tokens_details.cached_tokens"] or 0)


def _error_text(err: Any) -> str:
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"]
    return str(err)[:500]


def _server_message(raw: bytes) -> str:
    """The server's own error message when it sent one (OpenAI's or FastAPI's shape)."""
    try:
        body = _decode(raw)
    except msgspec.DecodeError:
        return raw[:500].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body:
                return _error_text(body[key])
    return str(body)[:500]


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked to wait: `retry-after-ms`, `retry-after` seconds or date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
