"""MCP servers as tool sources, over stdio, streamable HTTP or (for tests) in process.

Each source keeps a small pool of MCP client connections (one by default) that every session of
the agent replica shares; MCP sessions correlate responses by request id, so concurrent calls on
one connection are safe. Around each call: a timeout, retries with back-off for tools the server
marks read-only or idempotent, a circuit breaker for the server, and a cap on the result's size.
When a connection breaks, the next attempt reconnects (respawning a stdio server). The tool list
is cached and re-listed when the server announces a change; progress the server reports while a
tool runs becomes `ToolProgress` events of the task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shlex
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import mcp.types as mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.session import MessageHandlerFnT
from mcp.client.stdio import stdio_client
from pydantic import ValidationError

from swarm.config import MCPHttpConfig, MCPStdioConfig, ToolServerConfig
from swarm.errors import ConfigError, ToolError
from swarm.tools._mcp_connection import Connection, StderrTail, http_transport
from swarm.tools.interface import ToolContext, ToolResult, ToolSource, ToolSpec
from swarm.tools.resilience import CircuitBreaker, backoff_delays, cap_result

log = logging.getLogger(__name__)

# An outer bound in case a request can't even be written (a server that stopped reading stdin);
# the MCP read timeout normally fires first and sends the server a cancellation.
_TIMEOUT_GRACE_S = 2.0
# Progress events of one call are at least this far apart (the first and the last always go).
_PROGRESS_INTERVAL_S = 0.1


class _Failed(Exception):
    """One attempt of a call failed in a way that says the server is unwell (for the breaker).

    `kind` says whether another attempt is safe: `connect` (the request never went out: always),
    `lost` and `timeout` (it may have run: only for idempotent tools), `garbage` (never: the
    server answered, just not in MCP).
    """

    def __init__(self, kind: Literal["connect", "lost", "timeout", "garbage"], message: str,
                 conn: Connection | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.conn = conn  # the connection a `lost` attempt lost


class MCPToolSource(ToolSource):
    """The tools of one MCP server, over shared connections that reconnect after failures.

    `server` is an `MCPStdioConfig`, an `MCPHttpConfig`, or an in-process `MCPServer` / low-level
    `Server` (in-memory transport, for tests). Nothing connects until `start()` or the first call,
    so a source whose server is down can be built; its calls raise `ToolError` until it is back.
    `target` names the server for messages ("stdio: cmd args", "http: url"), without secrets.
    Up to `pool_size` connections are opened, a new one only when every open one is busy. The
    other knobs are `ToolServerConfig`'s (README "MCP servers").
    """

    def __init__(
        self,
        name: str,
        server: MCPStdioConfig | MCPHttpConfig | Any,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        pool_size: int = 1,
        retries: int = 2,
        retry_backoff_s: float = 0.2,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
        max_result_chars: int = 65536,
        breaker: CircuitBreaker | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.max_result_chars = max_result_chars
        self.breaker = breaker or CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self._rng = rng
        self._server = server
        self.target = _describe(server)
        self._slots: list[Connection | None] = [None] * max(1, pool_size)
        self._lock = asyncio.Lock()
        self._specs: list[ToolSpec] | None = None
        self._watchers: list[Callable[[], None]] = []
        self._closed = False

    @classmethod
    def from_config(
        cls, name: str, config: ToolServerConfig, *, server: MCPStdioConfig | MCPHttpConfig |
        None = None, connect_timeout_s: float | None = None,
    ) -> MCPToolSource:
        """Build the source for a `ToolServerConfig` that has `mcp:` set (`server` replaces it,
        e.g. with the command resolved)."""
        if config.mcp is None:
            raise ConfigError([(f"tools.{name}.mcp", "not an MCP tool server")])
        return cls(
            name, server or config.mcp, timeout_s=config.timeout_s,
            connect_timeout_s=connect_timeout_s or config.connect_timeout_s,
            pool_size=config.pool_size,
            retries=config.retries, retry_backoff_s=config.retry_backoff_s,
            breaker_failures=config.breaker_failures,
            breaker_cooldown_s=config.breaker_cooldown_s,
            max_result_chars=config.max_result_chars,
        )

    @property
    def connected(self) -> bool:
        """Whether a live connection exists right now."""
        return self.connections > 0

    @property
    def connections(self) -> int:
        """How many connections are live right now."""
        return sum(1 for c in self._slots if c is not None and c.client is not None and not c.dead)

    async def start(self) -> None:
        """Connect and cache the tool list; raise `ToolError` if the server can't be reached."""
        try:
            conn = await self._acquire()
        except _Failed as f:
            raise ToolError(f.message) from None
        conn.in_flight -= 1

    async def list_tools(self) -> list[ToolSpec]:
        """The cached tool list (connecting first if there was none), as last announced."""
        if self._specs is None:
            await self.start()
        return list(self._specs or [])

    def on_tools_changed(self, callback: Callable[[], None]) -> None:
        """Call `callback` after the cached tool list changed."""
        self._watchers.append(callback)

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Call one tool with timeout, retries and the breaker; raise `ToolError` when the server
        can't give an answer (the tool's own errors are results)."""
        delays = backoff_delays(self.retries, self.retry_backoff_s, rng=self._rng)
        attempts = 0
        while True:
            if not self.breaker.allow():
                raise ToolError(self.breaker.refusal(self.name))
            attempts += 1
            try:
                result = await self._attempt(tool, arguments, ctx)
            except _Failed as f:
                if f.conn is None or not f.conn.loss_counted:
                    self.breaker.failure(f.message)
                    if f.conn is not None:
                        f.conn.loss_counted = True
                else:  # the loss of a connection already counted: one failure, not one a call
                    self.breaker.abandon()
                retry = f.kind == "connect" or (
                    f.kind in ("lost", "timeout") and self._idempotent(tool))
                delay = next(delays, None) if retry and not self._closed else None
                if delay is None:
                    tries = f"; gave up after {attempts} attempts" if attempts > 1 else ""
                    raise ToolError(f.message + tries) from None
                log.info("MCP server %s: %s; retrying in %.2fs", self.name, f.message, delay)
                await asyncio.sleep(delay)
                continue
            except BaseException:
                self.breaker.abandon()
                raise
            self.breaker.success()
            return cap_result(result, self.max_result_chars)

    async def aclose(self) -> None:
        """Close the connections and stop the server processes; later calls raise `ToolError`."""
        self._closed = True
        async with self._lock:
            conns, self._slots = self._slots, [None] * len(self._slots)
        for conn in conns:
            if conn is not None:
                await conn.close()

    # ---- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, tool: str, arguments: dict[str, Any],
                       ctx: ToolContext) -> ToolResult:
        conn = await self._acquire()
        try:
            client = conn.client
            if client is None:
                raise _Failed("lost", self._lost(tool, "the connection closed"), conn)
            meta: dict[str, Any] = {}
            if ctx.traceparent:
                meta["traceparent"] = ctx.traceparent
            if ctx.idempotency_key:
                # Lets a server deduplicate a call that a resumed task sends again.
                meta["swarm/idempotency_key"] = ctx.idempotency_key
            progress = _Progress(ctx, tool) if ctx.emit is not None else None
            try:
                with anyio.fail_after(self.timeout_s + _TIMEOUT_GRACE_S):
                    result = await client.call_tool(
                        tool, arguments, read_timeout_seconds=self.timeout_s,
                        progress_callback=progress, meta=meta or None,
                    )
            except MCPError as e:
                if conn.dead or e.code == mcp_types.CONNECTION_CLOSED or _session_gone(e):
                    conn.kill()
                    note = ""
                    if e.code == mcp_types.CONNECTION_CLOSED:
                        if conn.stderr is not None:
                            # The server exited: its last words say why (a traceback).
                            await conn.stderr.settle()
                        note = conn.notes()
                    raise _Failed("lost", self._lost(tool, e.message + note), conn) from None
                if e.code == mcp_types.REQUEST_TIMEOUT:
                    raise _Failed("timeout", self._timed_out(tool)) from None
                # The server answered with a protocol error; the model may fix its call.
                return ToolResult(f"MCP error {e.code}: {e.message}", is_error=True)
            except TimeoutError:
                # Even the MCP timeout didn't fire: the connection is wedged.
                conn.kill()
                raise _Failed("timeout", self._timed_out(tool)) from None
            except (RuntimeError, ValidationError) as e:
                if conn.dead:
                    raise _Failed("lost", self._lost(tool, _reason(e)), conn) from None
                # The client rejected the answer (not a CallToolResult, or structured content
                # against the output schema).
                raise _Failed("garbage", f"MCP server {self.name!r} returned an invalid result "
                              f"for {tool!r}: {_reason(e)[:500]}") from None
            except Exception as e:
                conn.kill()
                raise _Failed("lost", self._lost(tool, _reason(e)), conn) from None
            return _to_result(result)
        finally:
            conn.in_flight -= 1

    def _idempotent(self, tool: str) -> bool:
        spec = next((s for s in self._specs or () if s.name == tool), None)
        return spec is not None and spec.idempotent

    # ---- connection pool -----------------------------------------------------------------------

    def _pick(self) -> int:
        """An idle live connection, else an unopened (or broken) slot, else the least busy."""
        free: int | None = None
        best, best_load = 0, -1
        for i, conn in enumerate(self._slots):
            if conn is None or conn.dead:
                if free is None:
                    free = i
            elif conn.in_flight == 0:
                return i
            elif best_load < 0 or conn.in_flight < best_load:
                best, best_load = i, conn.in_flight
        return free if free is not None else best

    async def _acquire(self) -> Connection:
        """A settled, live connection with this caller counted in its load."""
        self._check_open()
        index = self._pick()
        conn = self._slots[index]
        if conn is None or conn.dead:
            async with self._lock:
                self._check_open()
                conn = self._slots[index]
                if conn is None or conn.dead:
                    if conn is not None:
                        await conn.close()
                    stderr = None
                    if isinstance(self._server, MCPStdioConfig):
                        stderr = StderrTail(self.name, [
                            v.get_secret_value() for v in self._server.env.values()])
                    conn = self._slots[index] = Connection(
                        self._open, self.name, self.connect_timeout_s, self.timeout_s,
                        self._listed, stderr)
        conn.in_flight += 1
        try:
            await conn.settled.wait()
            self._check_open()
            if conn.client is None:
                http = isinstance(self._server, MCPHttpConfig)
                verb = "failed to connect" if http else "failed to start"
                raise _Failed("connect", f"MCP server {self.name!r} ({self.target}) {verb}: "
                              f"{_reason(conn.error)}{conn.notes()}")
        except BaseException:
            conn.in_flight -= 1
            raise
        return conn

    def _listed(self, tools: list[mcp_types.Tool]) -> None:
        """A connection listed the tools (connecting, or told they changed)."""
        specs = [_to_spec(t, self.name) for t in tools]
        changed = self._specs is not None and specs != self._specs
        self._specs = specs
        if changed:
            log.info("MCP server %s: tool list changed (%d tools)", self.name, len(specs))
            for callback in list(self._watchers):
                try:
                    callback()
                except Exception:
                    log.warning("MCP server %s: a tools-changed callback failed", self.name,
                                exc_info=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ToolError(f"MCP server {self.name!r} ({self.target}): the source is closed")

    def _open(self, on_message: MessageHandlerFnT, errlog: IO[str] | None = None) -> Client:
        """A new, unentered client; secrets are decrypted only here, at connect time. A stdio
        server's stderr goes to `errlog` (`StderrTail`), else to this process's."""
        server = self._server
        target: Any
        if isinstance(server, MCPStdioConfig):
            target = stdio_client(StdioServerParameters(
                command=server.command,
                args=list(server.args),
                env={k: v.get_secret_value() for k, v in server.env.items()} or None,
                cwd=server.cwd,
            ), errlog=errlog or sys.stderr)
        elif isinstance(server, MCPHttpConfig):
            headers = {k: v.get_secret_value() for k, v in server.headers.items()}
            target = http_transport(server.url, headers)
        else:
            target = server
        # The response cache is off: the tool list is cached here and refreshed on change.
        return Client(target, read_timeout_seconds=self.timeout_s, cache=None,
                      message_handler=on_message)

    def _timed_out(self, tool: str) -> str:
        return f"MCP tool {tool!r} on server {self.name!r} timed out after {self.timeout_s:g}s"

    def _lost(self, tool: str, reason: str) -> str:
        return (
            f"MCP server {self.name!r} ({self.target}) connection lost while calling {tool!r}: "
            f"{reason}; the next call reconnects"
        )


class _Progress:
    """Relays one call's MCP progress notifications to the task's events, thinned to one per
    `_PROGRESS_INTERVAL_S` (a chatty server must not flood the event stream)."""

    __slots__ = ("_ctx", "_last", "_tool")

    def __init__(self, ctx: ToolContext, tool: str) -> None:
        self._ctx = ctx
        self._tool = tool
        self._last: float | None = None

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        final = total is not None and progress >= total
        if self._last is not None and not final and now - self._last < _PROGRESS_INTERVAL_S:
            return
        self._last = now
        self._ctx.report_progress(self._tool, progress, total, message)


def _to_spec(tool: mcp_types.Tool, source: str) -> ToolSpec:
    """Map MCP annotations; hints left unset keep the spec's worst-case defaults."""
    ann = tool.annotations
    read_only = bool(ann and ann.read_only_hint)
    destructive = not read_only and (ann is None or ann.destructive_hint is not False)
    # A read-only tool has no effect to repeat, so it is safe to retry.
    idempotent = read_only or bool(ann and ann.idempotent_hint)
    return ToolSpec(
        name=tool.name,
        description=tool.description or tool.title or "",
        parameters=dict(tool.input_schema or {}),
        source=source,
        read_only=read_only,
        destructive=destructive,
        idempotent=idempotent,
    )


def _to_result(result: mcp_types.CallToolResult) -> ToolResult:
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource):
            res = block.resource
            parts.append(res.text if isinstance(res, mcp_types.TextResourceContents) else (
                f"[resource {res.uri}]"
            ))
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        else:
            parts.append(f"[{block.type} {getattr(block, 'mime_type', '')}]".replace(" ]", "]"))
    structured = result.structured_content
    text = "\n".join(parts)
    if structured is not None and not result.is_error:
        # Servers serialise a list result as one text block per element, which reads as
        # several JSON documents; the structured value, as one JSON document, is what the
        # model should see. MCP wraps non-object results as {"result": value}.
        value = structured["result"] if set(structured) == {"result"} else structured
        if not isinstance(value, str):
            text = json.dumps(value, ensure_ascii=False, default=str)
    return ToolResult(text, is_error=bool(result.is_error), structured=structured)


def _session_gone(e: MCPError) -> bool:
    """Whether an HTTP server no longer knows this client's session (it restarted).

    The SDK reports a 404 as "Session terminated" and another error status without a JSON-RPC
    body as the message below; servers that send a JSON-RPC body word it themselves (the
    TypeScript SDK: "Session not found", "Bad Request: No valid session ID provided").
    """
    if e.code == mcp_types.INVALID_REQUEST and e.message == "Session terminated":
        return True
    if e.code == mcp_types.INTERNAL_ERROR and e.message == "Server returned an error response":
        return True
    text = e.message.lower()
    return "session" in text and any(
        word in text for word in ("not found", "no valid", "unknown", "expired", "terminated"))


def _reason(e: BaseException | None) -> str:
    """The innermost meaningful errors, without anyio's task-group wrappers."""
    if e is None:
        return "unknown error"
    if isinstance(e, BaseExceptionGroup):
        leaves = []
        for inner in e.exceptions:
            text = _reason(inner)
            if text not in leaves:
                leaves.append(text)
        return "; ".join(leaves)
    if isinstance(e, MCPError):
        return f"MCP error {e.code}: {e.message}"
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _describe(server: Any) -> str:
    if isinstance(server, MCPStdioConfig):
        return "stdio: " + shlex.join([server.command, *server.args])
    if isinstance(server, MCPHttpConfig):
        # Userinfo and query strings may carry credentials; they stay out of messages.
        parts = urlsplit(server.url)
        host = parts.netloc.rpartition("@")[2]
        return "http: " + urlunsplit((parts.scheme, host, parts.path, "", ""))
    return f"in-process: {getattr(server, 'name', None) or type(server).__name__}"
