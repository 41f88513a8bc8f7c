"""Characters refused in what callers hand a swarm: task texts, answers, user names, ids, metadata.

Refused: the C0 control characters (U+0000 to U+001F) other than tab, newline and carriage
return, DEL and the C1 control characters (U+007F to U+009F: some terminals take U+009B as the
start of an escape sequence, as they take ESC), and lone surrogates (U+D800 to U+DFFF, which
Python strings can hold and UTF-8 can't encode). swarm's own stores keep them (msgpack, Redis,
Arrow and Parquet strings, JSON escapes), but past them they do harm: many model APIs and stores
reject NUL (PostgreSQL's text type can't hold it), so a task accepted with one fails later, at a
model or a tool; ESC and the other controls reach operators' terminals unescaped (`swarm tasks`,
`swarm audit` and `swarm history` print task texts, user names and reasons as they are), where
they can move the cursor, clear the screen or set the window title; and a lone surrogate failed
as a bare `UnicodeEncodeError` where the task was first encoded. So they are refused where they
come in, with a `UserError` naming the field and the character's index (from 0), the same for
every entry point (the supervisor's API, which the Python client, the CLI and the MCP server
reach, and the A2A server, which maps it to an invalid-params error).
"""

from __future__ import annotations

import json
import re
from typing import Any

from swarm.errors import UserError

# The longest name of a person or process swarm keeps as a label (a task's submitter, an
# approver): it goes into every row, listing and audit entry it belongs to.
MAX_LABEL_CHARS = 256
_REFUSED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def refused_char(text: str) -> str | None:
    """What is wrong with `text`, or None: its first refused character, and where it is."""
    m = _REFUSED.search(text)
    if m is None:
        return None
    c = m.group()
    if "\ud800" <= c <= "\udfff":
        return (f"a lone surrogate (U+{ord(c):04X}) at index {m.start()}, which can't be "
                "encoded as UTF-8")
    return (f"a control character (U+{ord(c):04X}) at index {m.start()}; of the control "
            "characters (U+0000 to U+001F, U+007F to U+009F) only tab, newline and carriage "
            "return are accepted")


def check_chars(value: Any, what: str) -> None:
    """Raise `UserError` if `value` (a string, or dicts and lists holding strings, the keys
    too) has a refused character; `what` names the field (`metadata`, `user`, ...), and a
    nested string is named by its path in it (`metadata["tags"][2]`)."""
    if value is None:
        return
    if type(value) is str:  # most calls: one search, no stack (every submission makes several)
        if _REFUSED.search(value) is None:
            return
        raise UserError(f"{what} has {refused_char(value)}")
    todo = [(value, what)]  # a stack, not recursion: metadata may nest deep
    while todo:
        item, where = todo.pop()
        if isinstance(item, str):
            why = refused_char(item)
            if why is not None:
                raise UserError(f"{where} has {why}")
        elif isinstance(item, dict):
            inner = []
            for k, v in item.items():
                key = json.dumps(k)  # escaped: the message never carries the character
                inner += [(k, f"{where} key {key}"), (v, f"{where}[{key}]")]
            todo += reversed(inner)  # popped in order: the first one found is reported
        elif isinstance(item, (list, tuple)):
            todo += reversed([(v, f"{where}[{i}]") for i, v in enumerate(item)])
