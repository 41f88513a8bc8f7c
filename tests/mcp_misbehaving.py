"""A stdio MCP server that misbehaves on request, for tests of the client's hardening.

Run as `python tests/mcp_misbehaving.py STATE_DIR`. It speaks JSON-RPC by hand (one message per
line, the initialize handshake of protocol 2025-11-25) because a well-kept server library can't
be made to send garbage. Tools:

  ok           answers "fine" (read-only)
  big          answers "x" * n characters (read-only)
  progress     sends `steps` progress notifications, then answers (read-only)
  grow         adds a tool named `name` and sends notifications/tools/list_changed
  garbage      writes a line that is not JSON and never answers (read-only)
  bad_result   answers with a result that is not a CallToolResult (read-only)
  hang         never answers (read-only)
  crash        exits at once (read-only)
  flaky        exits the first time (a marker file in STATE_DIR remembers), then answers
               (read-only, so a client may retry it)
  flaky_write  the same, with no annotations: a client must not retry it

Every tools/call is appended to STATE_DIR/calls.log, so a test can count what reached the server.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True}


def _tool(name: str, annotations: dict[str, Any] | None = None, /, **props: Any) -> dict[str, Any]:
    tool: dict[str, Any] = {
        "name": name,
        "description": f"the {name} tool",
        "inputSchema": {"type": "object", "properties": props},
    }
    if annotations is not None:
        tool["annotations"] = annotations
    return tool


TOOLS = [
    _tool("ok", READ_ONLY),
    _tool("big", READ_ONLY, n={"type": "integer"}),
    _tool("progress", READ_ONLY, steps={"type": "integer"}),
    _tool("grow", None, name={"type": "string"}),
    _tool("garbage", READ_ONLY),
    _tool("bad_result", READ_ONLY),
    _tool("hang", READ_ONLY),
    _tool("crash", READ_ONLY),
    _tool("flaky", READ_ONLY),
    _tool("flaky_write"),
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    sys.stdout.flush()


def text(value: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}]}


def first_time(state: Path, name: str) -> bool:
    marker = state / f"{name}.seen"
    if marker.exists():
        return False
    marker.touch()
    return True


def call(state: Path, msg_id: Any, params: dict[str, Any]) -> None:
    name = params.get("name")
    args = params.get("arguments") or {}
    with open(state / "calls.log", "a") as log:
        log.write(f"{name}\n")
    if name == "ok":
        send({"id": msg_id, "result": text("fine")})
    elif name == "big":
        send({"id": msg_id, "result": text("x" * int(args.get("n", 100_000)))})
    elif name == "progress":
        token = (params.get("_meta") or {}).get("progressToken")
        steps = int(args.get("steps", 3))
        for i in range(1, steps + 1):
            if token is not None:
                send({"method": "notifications/progress", "params": {
                    "progressToken": token, "progress": i, "total": steps,
                    "message": f"step {i} of {steps}"}})
        send({"id": msg_id, "result": text(f"{steps} steps done")})
    elif name == "grow":
        TOOLS.append(_tool(str(args["name"]), READ_ONLY))
        send({"id": msg_id, "result": text("grown")})
        send({"method": "notifications/tools/list_changed"})
    elif name == "garbage":
        sys.stdout.write("}{ this is not JSON-RPC\n")
        sys.stdout.flush()
    elif name == "bad_result":
        send({"id": msg_id, "result": {"content": 42}})
    elif name == "crash" or (name in ("flaky", "flaky_write") and first_time(state, name)):
        os._exit(3)
    elif name in ("flaky", "flaky_write"):
        send({"id": msg_id, "result": text(f"{name} ran")})
    elif name != "hang":
        send({"id": msg_id, "error": {"code": -32602, "message": f"unknown tool {name}"}})


def main() -> None:
    state = Path(sys.argv[1])
    for line in sys.stdin:
        msg = json.loads(line)
        method, msg_id = msg.get("method"), msg.get("id")
        if method == "initialize":
            send({"id": msg_id, "result": {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "misbehaving", "version": "1"}}})
        elif method == "tools/list":
            send({"id": msg_id, "result": {"tools": TOOLS}})
        elif method == "tools/call":
            call(state, msg_id, msg.get("params") or {})
        elif method == "ping":
            send({"id": msg_id, "result": {}})
        elif msg_id is not None:  # server/discover (a newer protocol) and anything else
            send({"id": msg_id, "error": {"code": -32601, "message": "Method not found"}})
    time.sleep(0.1)


if __name__ == "__main__":
    main()
