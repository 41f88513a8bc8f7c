"""Calls for the A2A server tests: messages, a2a-sdk clients over an httpx client, and raw
JSON-RPC bodies (the same helpers for the in-process and the Ray Serve tests)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.client.client import Client
from a2a.types import (
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    Task,
)

V1 = {"A2A-Version": "1.0"}


def client(http: httpx.AsyncClient, card: AgentCard, *, streaming: bool = False,
           rest: bool = False) -> Client:
    """a2a-sdk's client for `card` over `http` (which it makes send `A2A-Version: 1.0`)."""
    config = ClientConfig(httpx_client=http, streaming=streaming,
                          supported_protocol_bindings=["HTTP+JSON" if rest else "JSONRPC"])
    return ClientFactory(config).create(card)


def message(text: str = "", *, data: dict[str, Any] | None = None, task: Task | None = None,
            context_id: str = "", user: str | None = None) -> Message:
    """A user message; naming `task` makes it a follow-up to that task."""
    parts = [Part(text=text)] if text else []
    if data is not None:
        part = Part()
        part.data.struct_value.update(data)
        parts.append(part)
    msg = Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER, parts=parts,
                  task_id=task.id if task else "",
                  context_id=task.context_id if task else context_id)
    if user is not None:
        msg.metadata.update({"user": user})
    return msg


async def send(c: Client, msg: Message, **config: Any) -> list[StreamResponse]:
    """Every response to one message (one, without streaming)."""
    request = SendMessageRequest(message=msg, configuration=SendMessageConfiguration(**config))
    return [event async for event in c.send_message(request)]


async def task_of(c: Client, msg: Message, **config: Any) -> Task:
    """Send without streaming: the one response is the task."""
    (response,) = await send(c, msg, **config)
    assert response.HasField("task"), response
    return response.task


def text(holder: Any) -> str:
    """The text parts of a message or an artifact."""
    return "".join(p.text for p in holder.parts if p.HasField("text"))


def answer(task: Task) -> str:
    """The text of a task's artifacts."""
    return "".join(text(a) for a in task.artifacts)


def rpc(method: str, params: Any, request_id: Any = 1) -> dict[str, Any]:
    """A JSON-RPC 2.0 request body."""
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}


def new(text_: str, **extra: Any) -> dict[str, Any]:
    """SendMessage params (JSON) for a one-text-part message."""
    return {"message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                        "parts": [{"text": text_}], **extra}}
