"""One MCP client connection, owned by a background task (private to swarm.tools.mcp)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any

import anyio
import anyio.abc
import httpx2
import mcp.types as mcp_types
from mcp import Client
from mcp.client.session import MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client

log = logging.getLogger(__name__)

# stdio shutdown closes stdin, then waits 2 s before SIGTERM and 2 s more before SIGKILL.
_CLOSE_TIMEOUT_S = 10.0
_MAX_LIST_PAGES = 100
# What a stdio server's stderr adds to an error: its last lines, each and all cut short.
_TAIL_LINES = 12
_TAIL_LINE_CHARS = 300
_TAIL_CHARS = 1500
# How long a failed start waits for the rest of the server's stderr (its last words).
_TAIL_WAIT_S = 1.0
_TAIL_READ_BYTES = 8192  # at most this much of a line is read (and passed on) at once


class StderrTail:
    """A stdio server's stderr: each line is passed on to this process's stderr, prefixed with
    the server's name (where it went before), and the last few are kept, so that an error
    about the server can say what it printed before it exited ("No module named ...", "API key
    missing").

    `writer` is the pipe's end handed to the child as its stderr; `spawned()` closes this
    process's copy, after which the reader sees the end of the stream once the child (and any
    child of its holding the pipe) has exited. Secret values (the server's configured
    environment) are masked in the kept lines and in what is passed on.
    """

    def __init__(self, source: str, secrets: list[str] | None = None) -> None:
        self.source = source
        self._secrets = sorted({s for s in secrets or () if len(s) >= 4}, key=len, reverse=True)
        self.lines: deque[str] = deque(maxlen=_TAIL_LINES)
        self.ended = threading.Event()
        read_fd, write_fd = os.pipe()
        self.writer: IO[str] | None = os.fdopen(write_fd, "w")
        self._reader = os.fdopen(read_fd, "rb")
        threading.Thread(target=self._read, name=f"mcp-stderr-{source}", daemon=True).start()

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _read(self) -> None:
        try:
            with self._reader:
                while raw := self._reader.readline(_TAIL_READ_BYTES):  # a long line: in parts
                    line = self._mask(raw.decode("utf-8", "replace").rstrip("\r\n"))
                    with contextlib.suppress(Exception):  # a closed or odd stderr of ours
                        sys.stderr.write(f"[MCP server {self.source}] {line}\n")
                    if line.strip():
                        self.lines.append(line[:_TAIL_LINE_CHARS])
        except Exception:  # pragma: no cover - never let the thread die noisily
            log.debug("MCP server %s: reading its stderr failed", self.source, exc_info=True)
        finally:
            self.ended.set()

    def spawned(self) -> None:
        """The child has its copy of the pipe (or was never made): close ours, once."""
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()

    async def settle(self, timeout_s: float = _TAIL_WAIT_S) -> None:
        """Wait, bounded, for the rest of the server's stderr (after it exited)."""
        self.spawned()
        if not self.ended.is_set():
            await asyncio.to_thread(self.ended.wait, timeout_s)

    def note(self) -> str:
        """"; its stderr ended with: ..." for an error message, or "" if it printed nothing."""
        lines = list(self.lines)
        if not lines:
            return ""
        text = " | ".join(lines)
        if len(text) > _TAIL_CHARS:
            text = "..." + text[-_TAIL_CHARS:]
        return f"; its stderr ended with: {text}"


class Connection:
    """A connected `Client` whose context one background task enters and exits.

    MCP clients hold anyio task groups, which must be exited by the task that entered them, so
    neither `start()` nor `aclose()` (possibly different tasks) may own the context themselves.
    Requests, though, may be sent on the session from any task. While connected, the task also
    re-lists the tools whenever the server says they changed (`notifications/tools/list_changed`,
    or a `subscriptions/listen` event on a 2026-07-28 connection) and hands each listing, the
    first included, to `on_tools`.
    """

    def __init__(self, open_client: Callable[[MessageHandlerFnT, IO[str] | None], Client],
                 source: str, timeout_s: float, list_timeout_s: float,
                 on_tools: Callable[[list[mcp_types.Tool]], None],
                 stderr: StderrTail | None = None) -> None:
        self.client: Client | None = None
        # A stdio server's stderr, for what it printed before a failed start or a lost
        # connection (None for other transports).
        self.stderr = stderr
        self.error: BaseException | None = None
        self.dead = False
        self.in_flight = 0  # calls using or waiting for this connection (the pool's load)
        # Whether its loss was counted against the server's breaker: a connection lost with
        # several calls in flight is one failure of the server, not one a call.
        self.loss_counted = False
        self.settled = asyncio.Event()
        self._source = source
        self._on_tools = on_tools
        self._list_timeout_s = list_timeout_s
        self._stop = False
        self._changed = False
        self._garbage = 0
        self.first_garbage: str | None = None  # the first frame that wasn't JSON-RPC
        self._wake = asyncio.Event()
        self._scope: anyio.CancelScope | None = None
        self._task = asyncio.create_task(
            self._run(open_client, timeout_s), name=f"mcp-connection-{source}"
        )

    async def _run(self, open_client: Callable[[MessageHandlerFnT, IO[str] | None], Client],
                   timeout_s: float) -> None:
        stderr = self.stderr
        try:
            if self._stop:
                return
            with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
                self._scope = scope
                errlog = stderr.writer if stderr is not None else None
                async with open_client(self._on_message, errlog) as client, \
                        anyio.create_task_group() as tg:
                    if stderr is not None:
                        stderr.spawned()  # the server runs: the pipe is its alone
                    caps = client.server_capabilities.tools
                    if caps is not None and caps.list_changed:
                        # Subscribed before listing, so no change falls in between.
                        await tg.start(self._listen, client)
                    tools = await list_all_tools(client)
                    scope.deadline = math.inf
                    self._on_tools(tools)
                    self.client = client
                    self.settled.set()
                    await self._serve(client)
                    tg.cancel_scope.cancel()
            if scope.cancelled_caught and self.client is None and not self._stop:
                self.error = TimeoutError(f"no answer within {timeout_s:g}s")
        except BaseException as e:  # the owner task reports its failure, it never raises
            self.error = e
        finally:
            self.dead = True
            self.client = None
            try:
                if stderr is not None and self.error is not None and not self._stop and \
                        not isinstance(self.error, asyncio.CancelledError):
                    # A failed start: what the server printed before it exited says why.
                    with contextlib.suppress(Exception):
                        await stderr.settle()
            finally:
                if stderr is not None:
                    stderr.spawned()
                self.settled.set()

    async def _serve(self, client: Client) -> None:
        """Wait until killed, re-listing the tools each time the server says they changed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            if not self._changed:
                continue
            self._changed = False
            try:
                with anyio.fail_after(self._list_timeout_s):
                    tools = await list_all_tools(client)
            except Exception as e:
                # The old list stays; whether the connection itself broke, calls find out.
                log.warning("MCP server %s: re-listing tools failed: %r", self._source, e)
                continue
            self._on_tools(tools)

    async def _listen(self, client: Client, *,
                      task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                      ) -> None:
        # 2026-07-28 servers announce list changes only on a subscription stream; earlier ones
        # send notifications (see `_on_message`) and refuse this at once.
        try:
            async with client.listen(tools_list_changed=True) as sub:
                task_status.started()
                async for _event in sub:
                    self._tools_changed()
        except Exception as e:
            log.debug("MCP server %s: no tools subscription: %r", self._source, e)
        finally:
            with contextlib.suppress(RuntimeError):  # already started
                task_status.started()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._tools_changed()
        elif isinstance(message, Exception):
            # A frame that isn't JSON-RPC: nothing to answer; the call it belonged to times out.
            # Warned about once per connection, so a server spewing garbage can't flood the log.
            self._garbage += 1
            if self._garbage == 1:
                self.first_garbage = _garbage_line(message)
            log.log(logging.WARNING if self._garbage == 1 else logging.DEBUG,
                    "MCP server %s sent an unreadable message: %s", self._source,
                    str(message).splitlines()[0] if str(message) else type(message).__name__)

    def notes(self) -> str:
        """What an error about this connection should add: the frames on stdout that weren't
        JSON-RPC (a stdio server printing its logs to stdout), and a stdio server's last
        stderr lines."""
        out = ""
        if self._garbage:
            out += (f"; it wrote {self._garbage} line(s) that are not JSON-RPC to stdout, "
                    f"the first: {self.first_garbage!r} (an MCP stdio server must write its "
                    "logs to stderr)")
        if self.stderr is not None:
            out += self.stderr.note()
        return out

    def _tools_changed(self) -> None:
        self._changed = True
        self._wake.set()

    def kill(self) -> None:
        """Mark the connection broken and let its task tear it down (and reap the process)."""
        self.dead = True
        self._stop = True
        self._wake.set()

    async def close(self) -> None:
        """Tear the connection down and wait, bounded, until its task has finished."""
        self.kill()
        if self.stderr is not None and self.client is None:
            # Not started, or never will be (its task cancelled before it ran): our copy of
            # the pipe goes, so its reader ends with the server.
            self.stderr.spawned()
        if self.client is None and self._scope is not None:
            self._scope.cancel()  # still connecting
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._task.cancel()


def _garbage_line(message: Exception) -> str:
    """The line a stdio server sent that wasn't JSON-RPC, cut short (pydantic's error quotes
    it as `input_value`); else the error's first line."""
    errors = getattr(message, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            for err in errors():
                value = err.get("input")
                if isinstance(value, str):
                    return value[:200]
    text = str(message)
    return (text.splitlines()[0] if text else type(message).__name__)[:200]


@asynccontextmanager
async def http_transport(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    """Streamable HTTP streams to `url`, sending `headers` with every request."""
    # The SDK builds its own HTTP client only for a bare URL; headers need one of ours.
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


async def list_all_tools(client: Client) -> list[mcp_types.Tool]:
    """Every page of the server's tool list."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools
