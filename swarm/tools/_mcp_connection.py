"""One MCP client connection, owned by a background task (private to swarm.tools.mcp)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

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


class Connection:
    """A connected `Client` whose context one background task enters and exits.

    MCP clients hold anyio task groups, which must be exited by the task that entered them, so
    neither `start()` nor `aclose()` (possibly different tasks) may own the context themselves.
    Requests, though, may be sent on the session from any task. While connected, the task also
    re-lists the tools whenever the server says they changed (`notifications/tools/list_changed`,
    or a `subscriptions/listen` event on a 2026-07-28 connection) and hands each listing, the
    first included, to `on_tools`.
    """

    def __init__(self, open_client: Callable[[MessageHandlerFnT], Client], source: str,
                 timeout_s: float, list_timeout_s: float,
                 on_tools: Callable[[list[mcp_types.Tool]], None]) -> None:
        self.client: Client | None = None
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
        self._wake = asyncio.Event()
        self._scope: anyio.CancelScope | None = None
        self._task = asyncio.create_task(
            self._run(open_client, timeout_s), name=f"mcp-connection-{source}"
        )

    async def _run(self, open_client: Callable[[MessageHandlerFnT], Client],
                   timeout_s: float) -> None:
        try:
            if self._stop:
                return
            with anyio.CancelScope(deadline=anyio.current_time() + timeout_s) as scope:
                self._scope = scope
                async with open_client(self._on_message) as client, \
                        anyio.create_task_group() as tg:
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
            log.log(logging.WARNING if self._garbage == 1 else logging.DEBUG,
                    "MCP server %s sent an unreadable message: %s", self._source,
                    str(message).splitlines()[0] if str(message) else type(message).__name__)

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
        if self.client is None and self._scope is not None:
            self._scope.cancel()  # still connecting
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._task.cancel()


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
