"""MCP servers as tool sources, over stdio, streamable HTTP or (for tests) in process.

Each source keeps one MCP client connection that every caller shares; MCP sessions correlate
responses by request id, so concurrent calls are safe. When the connection breaks, the call in
flight raises `ToolError` and the next call reconnects (respawning a stdio server).
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx2
import mcp.types as mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from pydantic import ValidationError

from swarm.config import MCPHttpConfig, MCPStdioConfig, ToolServerConfig
from swarm.errors import ConfigError, ToolError
from swarm.tools.interface import ToolContext, ToolResult, ToolSource, ToolSpec

# An outer bound in case a request can't even be written (a server that stopped reading stdin);
# the MCP read timeout normally fires first and sends the server a cancellation.
_TIMEOUT_GRACE_S = 2.0
# stdio shutdown closes stdin, then waits 2 s before SIGTERM and 2 s more before SIGKILL.
_CLOSE_TIMEOUT_S = 10.0
_MAX_LIST_PAGES = 100


class MCPToolSource(ToolSource):
    """The tools of one MCP server, over a shared connection that reconnects after failures.

    `server` is an `MCPStdioConfig`, an `MCPHttpConfig`, or an in-process `MCPServer` / low-level
    `Server` (in-memory transport, for tests). Nothing connects until `start()` or the first call,
    so a source whose server is down can be built; its calls raise `ToolError` until it is back.
    `target` names the server for messages ("stdio: cmd args", "http: url"), without secrets.
    """

    def __init__(
        self,
        name: str,
        server: MCPStdioConfig | MCPHttpConfig | Any,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 30.0,
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._server = server
        self.target = _describe(server)
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._specs: list[ToolSpec] | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls, name: str, config: ToolServerConfig, *, connect_timeout_s: float = 30.0
    ) -> MCPToolSource:
        """Build the source for a `ToolServerConfig` that has `mcp:` set."""
        if config.mcp is None:
            raise ConfigError([(f"tools.{name}.mcp", "not an MCP tool server")])
        return cls(
            name, config.mcp, timeout_s=config.timeout_s, connect_timeout_s=connect_timeout_s
        )

    @property
    def connected(self) -> bool:
        """Whether a live connection exists right now."""
        conn = self._conn
        return conn is not None and conn.client is not None and not conn.dead

    async def start(self) -> None:
        """Connect and cache the tool list; raise `ToolError` if the server can't be reached."""
        await self._connection()

    async def list_tools(self) -> list[ToolSpec]:
        """The tools from the latest successful connection (connecting first if there was none)."""
        if self._specs is None:
            await self._connection()
        return list(self._specs or [])

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Call one tool under the per-call timeout; a broken connection raises `ToolError`."""
        conn = await self._connection()
        client = conn.client
        if client is None:
            raise ToolError(self._lost(tool, "the connection closed"))
        meta: dict[str, Any] = {}
        if ctx.traceparent:
            meta["traceparent"] = ctx.traceparent
        if ctx.idempotency_key:
            # Lets a server deduplicate a call that a resumed task sends again.
            meta["swarm/idempotency_key"] = ctx.idempotency_key
        try:
            with anyio.fail_after(self.timeout_s + _TIMEOUT_GRACE_S):
                result = await client.call_tool(
                    tool, arguments, read_timeout_seconds=self.timeout_s, meta=meta or None
                )
        except MCPError as e:
            if e.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(self._timed_out(tool)) from None
            if conn.dead or e.code == mcp_types.CONNECTION_CLOSED or _session_gone(e):
                conn.kill()
                raise ToolError(self._lost(tool, e.message)) from None
            # The server answered with a protocol error; the model may fix its call.
            return ToolResult(f"MCP error {e.code}: {e.message}", is_error=True)
        except TimeoutError:
            raise ToolError(self._timed_out(tool)) from None
        except (RuntimeError, ValidationError) as e:
            if conn.dead:
                raise ToolError(self._lost(tool, _reason(e))) from None
            # The client rejected the answer (e.g. structured content against the output schema).
            raise ToolError(
                f"MCP server {self.name!r} returned an invalid result for {tool!r}: {e}"
            ) from None
        except Exception as e:
            conn.kill()
            raise ToolError(self._lost(tool, _reason(e))) from None
        return _to_result(result)

    async def aclose(self) -> None:
        """Close the connection and stop the server process; later calls raise `ToolError`."""
        self._closed = True
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # ---- connection management -------------------------------------------------------------

    async def _connection(self) -> _Connection:
        self._check_open()
        conn = self._conn
        if conn is None or conn.dead:
            async with self._lock:
                self._check_open()
                conn = self._conn
                if conn is None or conn.dead:
                    if conn is not None:
                        await conn.close()
                    conn = self._conn = _Connection(
                        self._open, self.name, self.connect_timeout_s
                    )
        await conn.settled.wait()
        self._check_open()
        if conn.client is None:
            http = isinstance(self._server, MCPHttpConfig)
            verb = "failed to connect" if http else "failed to start"
            raise ToolError(
                f"MCP server {self.name!r} ({self.target}) {verb}: {_reason(conn.error)}"
            )
        self._specs = conn.specs
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise ToolError(f"MCP server {self.name!r} ({self.target}): the source is closed")

    def _open(self) -> Client:
        """A new, unentered client; secrets are decrypted only here, at connect time."""
        server = self._server
        target: Any
        if isinstance(server, MCPStdioConfig):
            target = StdioServerParameters(
                command=server.command,
                args=list(server.args),
                env={k: v.get_secret_value() for k, v in server.env.items()} or None,
                cwd=server.cwd,
            )
        elif isinstance(server, MCPHttpConfig):
            headers = {k: v.get_secret_value() for k, v in server.headers.items()}
            target = _http_transport(server.url, headers)
        else:
            target = server
        # The response cache is off: the tool list is cached here and refreshed per connection.
        return Client(target, read_timeout_seconds=self.timeout_s, cache=None)

    def _timed_out(self, tool: str) -> str:
        return f"MCP tool {tool!r} on server {self.name!r} timed out after {self.timeout_s:g}s"

    def _lost(self, tool: str, reason: str) -> str:
        return (
            f"MCP server {self.name!r} ({self.target}) connection lost while calling {tool!r}: "
            f"{reason}; the next call reconnects"
        )


class _Connection:
    """A connected `Client` whose context one background task enters and exits.

    MCP clients hold anyio task groups, which must be exited by the task that entered them, so
    neither `start()` nor `aclose()` (possibly different tasks) may own the context themselves.
    Requests, though, may be sent on the session from any task.
    """

    def __init__(self, open_client: Callable[[], Client], source: str, timeout_s: float) -> None:
        self.client: Client | None = None
        self.specs: list[ToolSpec] = []
        self.error: BaseException | None = None
        self.dead = False
        self.settled = asyncio.Event()
        self._stop = asyncio.Event()
        self._scope: anyio.CancelScope | None = None
        self._task = asyncio.create_task(
            self._run(open_client, source, timeout_s), name=f"mcp-connection-{source}"
        )

    async def _run(self, open_client: Callable[[], Client], source: str, timeout_s: float) -> None:
        try:
            if self._stop.is_set():
                return
            with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
                self._scope = scope
                async with open_client() as client:
                    tools = await _list_all_tools(client)
                    scope.deadline = math.inf
                    self.specs = [_to_spec(t, source) for t in tools]
                    self.client = client
                    self.settled.set()
                    await self._stop.wait()
            if scope.cancelled_caught and self.client is None and not self._stop.is_set():
                self.error = TimeoutError(f"no answer within {timeout_s:g}s")
        except BaseException as e:  # the owner task reports its failure, it never raises
            self.error = e
        finally:
            self.dead = True
            self.client = None
            self.settled.set()

    def kill(self) -> None:
        """Mark the connection broken and let its task tear it down (and reap the process)."""
        self.dead = True
        self._stop.set()

    async def close(self) -> None:
        """Tear the connection down and wait, bounded, until its task has finished."""
        self.kill()
        if self.client is None and self._scope is not None:
            self._scope.cancel()  # still connecting
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._task.cancel()


@asynccontextmanager
async def _http_transport(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    # The SDK builds its own HTTP client only for a bare URL; headers need one of ours.
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


async def _list_all_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


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
    # Streamable HTTP reports a session the server no longer knows (it restarted) this way.
    return e.code == mcp_types.INVALID_REQUEST and e.message == "Session terminated"


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
