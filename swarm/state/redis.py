"""`RedisCheckpointer`: task logs, snapshots, ledger and rows in Redis (redis-py asyncio).

Layout under a key prefix (default `swarm`):

- `{p}:t:{task}:log`    LIST of encoded entries; an entry's seq is its index plus `base`
- `{p}:t:{task}:arch`   HASH, only once a segment was archived: `base` (the seq of the LIST's
                        first entry; the ones before it were moved to an archive and trimmed),
                        `ledger` (1: finished ledger records moved too), `snap` (the seq of the
                        snapshot the archive holds)
- `{p}:t:{task}:lease`  STRING with a TTL: the token of whoever is archiving the task
- `{p}:t:{task}:logs`   SET of the ids of the task's other logs (`task/agent`), for retention
- `{p}:t:{task}:snap`   HASH seq → encoded snapshot (the newest `keep` are kept)
- `{p}:t:{task}:ledger` HASH idempotency key → encoded ledger record
- `{p}:t:{task}:tok`    ZSET of recent append tokens, scored by the log length they produced
- `{p}:t:{task}:swarm`  STRING, the swarm whose row the task has
- `{p}:t:{task}:fence`  STRING, the newest writer token (`claim`); older tokens can't append
- `{p}:s:{swarm}:tasks` HASH task id → encoded row

Every write is one round trip to a Lua script, so it is atomic and ordered with the others.
`append` runs one script that pushes the entries (their seqs follow from RPUSH's resulting
length) and upserts the ledger records. A connection can fail after Redis applied a write but
before its reply arrived, so each append call carries a random token: the script first looks
the token up in the task's token set and, if it is there, returns the length recorded with it
instead of appending again. The set keeps the task's newest 128 tokens (a compact listpack),
so a retry is recognised unless 128 other appends to the same task landed in between; the
retry comes from the same call within `outage_timeout_s`, and a task has one writer per step.

Compaction (`compact`, used by `TieredCheckpointer` once a segment is safely archived) trims
the head of the LIST and raises `base`, so seqs stay what they were and appends go on at the
next one; `read` then refuses the trimmed range rather than return a log with a hole in it.

When Redis is unreachable, every operation waits for it with exponential backoff for up to
`outage_timeout_s` (`state.outage_timeout_s`), logging one WARNING per outage and an INFO when it
is back, then raises `StoreUnavailable` (a turn that gets it stops, and the supervisor resumes
it from the log once the store answers again: `Supervisor._turn`). Nothing is reported durable
before Redis acknowledged it.

The per-step hot path skips redis-py's client layer (its pool bookkeeping, per-command
metrics hooks and a task per socket write cost more than the round trip): the instance keeps
its own bounded pool of redis-py `Connection`s, made by redis-py from the URL (TCP, TLS or
Unix socket, password, db), and speaks RESP2 on them directly. Scripts that build key names
from stored values assume a single Redis server, not a cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # what redis-py's hiredis parser has its reader return for "no whole reply yet"
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py: replies are read through its parser one at a time
    _NOT_ENOUGH_DATA = None

from swarm.errors import CheckpointError
from swarm.state import codec
from swarm.state.interface import (
    FORMAT_VERSION,
    Checkpointer,
    CorruptRecord,
    Fenced,
    LedgerRecord,
    LogEntry,
    Snapshot,
    StoreUnavailable,
    TaskRow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
_REFUSED = (AuthenticationError, AuthorizationError)  # ConnectionErrors that waiting won't fix
# Error replies that waiting fixes, waited out as an unreachable server is: a server that
# can't persist its writes (MISCONF: its disk is full, say), is a replica for now (READONLY,
# MASTERDOWN: a failover under way), is running a long script (BUSY), or asks to try again
# (TRYAGAIN). (LOADING, a server still reading its data after a restart, comes as redis-py's
# `BusyLoadingError`, a ConnectionError: unreachable for now.)
_WAITABLE_CODES = frozenset({"MISCONF", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN"})


def _code(reply: ResponseError) -> str:
    """An error reply's code: redis-py takes the known ones off the text (`status_code`)."""
    return getattr(reply, "status_code", None) or str(reply).split(" ", 1)[0]


def waitable_reply(reply: Any) -> bool:
    """Whether an error reply is one that waiting fixes (`_WAITABLE_CODES`)."""
    return isinstance(reply, ResponseError) and _code(reply) in _WAITABLE_CODES


def _reply_text(exc: BaseException) -> str:
    """What went wrong, in words: an error reply as the server sent it (its code first,
    which redis-py keeps apart), another error as `_why` says it."""
    text, code = _why(exc), getattr(exc, "status_code", None)
    return f"{code} {text}" if code and not text.startswith(code) else text
_READ_PAGE = 1024  # entries per read round trip: bounds what one call makes Redis hold

_APPEND = """
local seen = redis.call('ZSCORE', KEYS[3], ARGV[1])
if seen then return tonumber(seen) end
if ARGV[3] ~= '' then
  local current = tonumber(redis.call('GET', KEYS[4]) or '0')
  if tonumber(ARGV[3]) < current then return -1 - current end
end
local n = tonumber(ARGV[2])
local base = tonumber(redis.call('HGET', KEYS[5], 'base') or '0')
local len = 0
if n == 0 then len = redis.call('LLEN', KEYS[1]) end
for i = 4, 3 + n, 1000 do
  len = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, 3 + n)))
end
for i = 4 + n, #ARGV, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
len = base + len
redis.call('ZADD', KEYS[3], len, ARGV[1])
if redis.call('ZCARD', KEYS[3]) > 128 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -129) end
return len
"""
# ARGV: the first seq wanted, how many at most, the last seq wanted ('' for no limit). Returns
# the base, the seq of the first item returned (the base if the first wanted one was trimmed),
# how many items, and the items concatenated.
_READ = """
local base = tonumber(redis.call('HGET', KEYS[2], 'base') or '0')
local s = math.max(tonumber(ARGV[1]), base)
local e = s + tonumber(ARGV[2]) - 1
if ARGV[3] ~= '' then e = math.min(e, tonumber(ARGV[3])) end
if e < s then return {base, s, 0, ''} end
local items = redis.call('LRANGE', KEYS[1], s - base, e - base)
return {base, s, #items, table.concat(items)}
"""
_BOUNDS = """
local f = redis.call('HMGET', KEYS[2], 'base', 'ledger', 'snap')
return {tonumber(f[1] or '0') + redis.call('LLEN', KEYS[1]), f[1] or '', f[2] or '', f[3] or ''}
"""
# Trims entries up to ARGV[2] (but never past the log's end), only while the caller's lease
# (ARGV[1]) is current; then, for a finished task, deletes the ledger records given (ARGV[5:],
# key/value pairs) that are still as given, and the snapshots (ARGV[3] = '1'). ARGV[4] is the
# seq of the snapshot the archive now holds ('' for none). Returns the new base, -1 for a lost
# lease, -2 if the log is shorter than ARGV[2].
_COMPACT = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local base = tonumber(redis.call('HGET', KEYS[2], 'base') or '0')
local n = tonumber(ARGV[2]) + 1 - base
if n > redis.call('LLEN', KEYS[1]) then return -2 end
if n > 0 then
  redis.call('LTRIM', KEYS[1], n, -1)
  base = base + n
end
redis.call('HSET', KEYS[2], 'base', base)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'snap', ARGV[4]) end
if #ARGV > 4 then
  for i = 5, #ARGV, 2 do
    if redis.call('HGET', KEYS[4], ARGV[i]) == ARGV[i + 1] then
      redis.call('HDEL', KEYS[4], ARGV[i])
    end
  end
  redis.call('HSET', KEYS[2], 'ledger', 1)
end
if ARGV[3] == '1' then redis.call('DEL', KEYS[5]) end
return base
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The lease KEYS[1] for token ARGV[1] and ARGV[2] ms, if free or already this token's (a batch
# sent again after a partial failure asks twice): 1 if held now, else 0.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return 1 end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_PUT_SNAPSHOT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local keep = tonumber(ARGV[3])
if keep > 0 and redis.call('HLEN', KEYS[1]) > keep then
  local seqs = redis.call('HKEYS', KEYS[1])
  table.sort(seqs, function(a, b) return tonumber(a) < tonumber(b) end)
  for i = 1, #seqs - keep do redis.call('HDEL', KEYS[1], seqs[i]) end
end
return 0
"""
_PUT_TASK = """
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[2] then redis.call('HDEL', ARGV[4] .. ':s:' .. old .. ':tasks', ARGV[1]) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', ARGV[4] .. ':s:' .. ARGV[2] .. ':tasks', ARGV[1], ARGV[3])
return 0
"""
_GET_TASK = """
local swarm = redis.call('GET', KEYS[1])
if not swarm then return false end
return redis.call('HGET', ARGV[2] .. ':s:' .. swarm .. ':tasks', ARGV[1])
"""
_DELETE = """
local swarm = redis.call('GET', KEYS[5])
if swarm then redis.call('HDEL', ARGV[2] .. ':s:' .. swarm .. ':tasks', ARGV[1]) end
return redis.call('DEL', unpack(KEYS))
"""
_SCRIPTS = {name: (src, hashlib.sha1(src.encode()).hexdigest()) for name, src in {
    "append": _APPEND, "read": _READ, "put_snapshot": _PUT_SNAPSHOT, "put_task": _PUT_TASK,
    "get_task": _GET_TASK, "delete": _DELETE, "bounds": _BOUNDS, "compact": _COMPACT,
    "release": _RELEASE, "lease": _LEASE}.items()}
_entries = msgspec.msgpack.Decoder(list[LogEntry])


class EntryHead(msgspec.Struct, kw_only=True):
    """A stored log entry's fields but its `data` (`read_tail_raw`): what an archive segment's
    columns hold, with `raw`, the entry's stored bytes, going into it as they are."""

    kind: str
    agent: str = ""
    step: int = 0
    ts: float = 0.0
    seq: int = -1
    v: int = FORMAT_VERSION  # omitted from the stored bytes when it is the current one
    raw: bytes = b""  # not stored: set from the page that was read


_heads = msgspec.msgpack.Decoder(list[EntryHead])
_raws = msgspec.msgpack.Decoder(list[msgspec.Raw])


class Bounds(NamedTuple):
    """A task's log in Redis: `base` (first seq held; earlier ones are archived) to `end`
    (the next seq), and what the archive took over (`ledger_archived`, `snapshot`)."""

    base: int
    end: int
    archived: bool
    ledger_archived: bool
    snapshot: int | None


def redact(url: str) -> str:
    """A URL with its password hidden, for messages."""
    url = re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def _why(exc: BaseException) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


_CRLF = b"\r\n"
# RESP headers of the common sizes, made once: a step's commands are a few hundred bytes.
_BULK = [b"$%d\r\n" % n for n in range(4096)]
_ARRAY = [b"*%d\r\n" % n for n in range(64)]


class _Head:
    """The RESP encoding of a command's first `count` arguments, made once and reused as the
    command's first item: an append's EVALSHA, script and five task keys are the same for
    every append of a task, and encoding them each time was most of `_pack`'s work."""

    __slots__ = ("count", "data")

    def __init__(self, args: Sequence[Any]) -> None:
        packed = _pack([args])
        self.count = len(args)
        self.data = packed[packed.index(b"\r\n") + 2:]  # without the array header


def _pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """RESP encoding of commands whose arguments are bytes, str or int; a command may start
    with a `_Head` standing for its first arguments.

    Runs for every checkpoint, so the parts go into one list joined once, without copying an
    argument into a formatted header (about half the cost of formatting each argument)."""
    out: list[bytes] = []
    put = out.append
    for args in commands:
        n = len(args)
        head = args[0] if n else None
        if type(head) is _Head:
            n += head.count - 1
            put(_ARRAY[n] if n < 64 else b"*%d\r\n" % n)
            put(head.data)
            args = args[1:]
        else:
            put(_ARRAY[n] if n < 64 else b"*%d\r\n" % n)
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                data = arg
            elif kind is str:
                data = arg.encode()
            else:  # a bytes subclass stays as it is; anything else is sent as its text
                data = arg if isinstance(arg, bytes) else str(arg).encode()
            size = len(data)
            put(_BULK[size] if size < 4096 else b"$%d\r\n" % size)
            put(data)
            put(_CRLF)
    return b"".join(out)


def _script_cmd(script: str, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
    """The EVALSHA command running one of the Lua scripts (`_SCRIPTS`)."""
    return ("EVALSHA", _SCRIPTS[script][1], len(keys), *keys, *args)


async def _exchange_each(conn: AbstractConnection, commands: Sequence[Sequence[Any]]
                         ) -> list[Any]:
    """Send commands in one write and read every reply; an error reply is returned in its place
    (a `ResponseError`), not raised.

    The replies come from the connection's RESP parser itself, which returns an error reply as
    its exception: redis-py's `read_response` around it (a timeout context, a health-check
    stamp, the error raised) cost more than the parsing, 13 against 5 µs a reply in a batch of
    100. With hiredis (redis-py's C parser, a dependency of ours) every reply already in its
    buffer is taken without an await each. The callers bound the whole exchange with a timeout
    of their own and disconnect on any failure; the parser's are `ConnectionError` or
    `OSError`."""
    await conn.send_packed_command(_pack(commands), check_health=False)
    parser = getattr(conn, "_parser", None)
    replies: list[Any] = []
    reader = getattr(parser, "_reader", None)
    if reader is not None and _NOT_ENOUGH_DATA is not None and \
            hasattr(parser, "read_from_socket"):  # hiredis
        gets, want = reader.gets, len(commands)
        while len(replies) < want:
            reply = gets()
            if reply is _NOT_ENOUGH_DATA:  # no whole reply in the buffer yet
                await parser.read_from_socket()  # type: ignore[union-attr]
            elif isinstance(reply, RedisConnectionError):  # as hiredis' read_response does
                raise reply
            else:
                replies.append(reply)
        return replies
    read = getattr(parser, "read_response", None)
    if read is None:  # not the redis-py we know: its public read, one reply at a time
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # the reply was read; keep reading the others
                replies.append(exc)
        return replies
    for _ in commands:
        replies.append(await read())
    return replies


async def _exchange(conn: AbstractConnection, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send commands in one write and read every reply; raise the first error reply."""
    replies = await _exchange_each(conn, commands)
    error = next((r for r in replies if isinstance(r, ResponseError)), None)
    if error is not None:
        raise error
    return replies


# Appends waiting for the batch in flight go out together, up to this many in one write.
_MAX_GROUP = 256
# Tasks whose append command head is kept encoded (about 300 bytes each).
_HEADS = 4096


class RedisCheckpointer(Checkpointer):
    """The `Checkpointer` on a Redis server (`redis://`, `rediss://` or `unix://` URL)."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "swarm", outage_timeout_s: float = 30.0,
                 socket_timeout_s: float = 5.0, max_connections: int = 32) -> None:
        self.url = url
        self.prefix = prefix
        self.outage_timeout_s = outage_timeout_s
        self.socket_timeout_s = socket_timeout_s
        # redis-py parses the URL and makes connections; timeouts are ours (one per operation).
        self._pool = ConnectionPool.from_url(
            url, protocol=2, socket_timeout=None, socket_connect_timeout=socket_timeout_s)
        self._max = max_connections
        self._idle: list[AbstractConnection] = []
        self._made = 0
        self._waiters: deque[asyncio.Future[AbstractConnection]] = deque()
        self._outage_since: float | None = None
        # Group commit: appends made while one batch is in flight wait here and go out as the
        # next batch, one write and one read for all of them (see `_eval`).
        self._group: list[tuple[tuple[Any, ...], str | None, asyncio.Future[Any]]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._heads: dict[str, _Head] = {}  # by task id: see `_append_head`
        # Retry tokens of appends: a random prefix per store object, then a count (a system
        # call per append for random bytes cost more than the rest of the token's work).
        self._token_prefix = os.urandom(8)
        self._tokens = itertools.count()

    def _refused(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"redis at {redact(self.url)} refused the connection: {_why(exc)}")

    def _refused_reply(self, reply: ResponseError) -> CheckpointError:
        """The error for a command the server refused for good (an error reply that waiting
        doesn't fix)."""
        return CheckpointError(f"redis at {redact(self.url)} refused: {_reply_text(reply)}")

    def _k(self, task_id: str, what: str) -> str:
        return f"{self.prefix}:t:{task_id}:{what}"

    # -- connections -------------------------------------------------------------------------

    async def _acquire(self) -> AbstractConnection:
        if self._idle:
            return self._idle.pop()
        if self._made < self._max:
            self._made += 1
            return self._pool.make_connection()
        waiter: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            raise

    def _release(self, conn: AbstractConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def _run(self, op: Callable[[AbstractConnection], Awaitable[T]]) -> T:
        """Run `op` on a pooled connection, waiting out an outage of up to `outage_timeout_s`."""
        delay = 0.05
        deadline: float | None = None
        while True:
            conn = await self._acquire()
            try:
                async with asyncio.timeout(self.socket_timeout_s):
                    result = await op(conn)
            except _REFUSED as exc:
                self._release(conn)
                raise self._refused(exc) from None
            except (*_TRANSIENT, ResponseError) as exc:
                if isinstance(exc, ResponseError):
                    self._release(conn)  # it answered: the connection is in step
                    if not waitable_reply(exc):
                        raise self._refused_reply(exc) from exc
                    # A whole batch is sent again: each append carries its retry token.
                    what = "can't take writes"
                else:
                    await conn.disconnect(nowait=True)
                    self._release(conn)
                    what = "unreachable"
                why = _reply_text(exc)
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.outage_timeout_s
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning("redis at %s %s, waiting up to %g s (%s)",
                                redact(self.url), what, self.outage_timeout_s, why)
                if now >= deadline:
                    raise StoreUnavailable(
                        f"redis at {redact(self.url)} {what} for "
                        f"{self.outage_timeout_s:g} s: {why}") from None
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 1.0)
                continue
            except BaseException:
                await conn.disconnect(nowait=True)  # a reply may still be on its way
                self._release(conn)
                raise
            self._release(conn)
            if self._outage_since is not None:
                log.info("redis at %s is back after %.1f s", redact(self.url),
                         time.monotonic() - self._outage_since)
                self._outage_since = None
            return result

    def _append_head(self, task_id: str) -> _Head:
        """The EVALSHA of the append script with a task's five keys, encoded once per task."""
        heads = self._heads
        if len(heads) >= _HEADS:
            del heads[next(iter(heads))]  # the oldest task's: tasks end, and this is a cache
        keys = (self._k(task_id, "log"), self._k(task_id, "ledger"), self._k(task_id, "tok"),
                self._k(task_id, "fence"), self._k(task_id, "arch"))
        head = heads[task_id] = _Head(_script_cmd("append", keys, ()))
        return head

    async def _eval(self, script: str, keys: Sequence[Any], args: Sequence[Any], *,
                    head: _Head | None = None) -> Any:
        """Run one of the Lua scripts, group-committed: calls made while a batch is in flight
        go out together as the next batch, so N concurrent appends cost one round trip
        instead of N. Batches are
        sent by a task of their own, so a caller that is cancelled never cuts short the others'
        writes. Every command carries its own retry token, so resending a whole batch after a
        dropped connection applies each command once."""
        # `head`, if given, stands for the EVALSHA, the script and the keys.
        cmd = (head, *args) if head is not None else _script_cmd(script, keys, args)
        return await self._enqueue(cmd, script)

    def _enqueue(self, cmd: tuple[Any, ...], script: str | None = None) -> asyncio.Future[Any]:
        """Send a command with the next group-committed batch (`_eval`); the future of its
        reply. `script` names the Lua script it runs, if any, for a server that lost its
        script cache."""
        loop = asyncio.get_running_loop()
        if self._drain_task is not None and self._drain_task.get_loop() is not loop:
            # Left behind by an event loop that is gone (the store outlived an asyncio.run):
            # its callers are gone with it.
            self._drain_task, self._group = None, []
        fut: asyncio.Future[Any] = loop.create_future()
        self._group.append((cmd, script, fut))
        if self._drain_task is None:
            self._drain_task = loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        try:
            while self._group:
                await self._send_group()
        finally:
            self._drain_task = None

    async def _send_group(self) -> None:
        batch, self._group = self._group[:_MAX_GROUP], self._group[_MAX_GROUP:]
        commands = [cmd for cmd, _, _ in batch]

        async def op(conn: AbstractConnection) -> list[Any]:
            replies = await _exchange_each(conn, commands)
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                # A restarted server has an empty script cache: load what failed and send
                # those commands again (they didn't run).
                scripts = {n for i in missing if (n := batch[i][1]) is not None}
                await _exchange(conn, [("SCRIPT", "LOAD", _SCRIPTS[n][0]) for n in scripts])
                again = await _exchange_each(conn, [commands[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
            busy = next((r for r in replies if waitable_reply(r)), None)
            if busy is not None:
                raise busy  # waited out by `_run`, which sends the batch again
            return replies

        try:
            replies = await self._run(op)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else
                                      CheckpointError(f"append interrupted: {exc!r}"))
            if not isinstance(exc, Exception):
                for _, _, fut in self._group:  # the loop is going away: nothing more is sent
                    if not fut.done():
                        fut.set_exception(CheckpointError(f"append interrupted: {exc!r}"))
                self._group = []
                raise
            return
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(self._refused_reply(reply))
            else:
                fut.set_result(reply)

    async def _cmd(self, *args: Any) -> Any:
        async def op(conn: AbstractConnection) -> Any:
            return (await _exchange(conn, [args]))[0]

        return await self._run(op)

    async def _grouped(self, *args: Any) -> Any:
        """One plain command, sent with the next group-committed batch (`_enqueue`): what
        many tasks ask at once (archiving finished tasks: thousands a second under a steady
        load) costs one round trip a batch instead of one a command."""
        return await self._enqueue(args)

    # -- the Checkpointer ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that Redis answers and load the scripts; a clear `StoreUnavailable` if not."""
        conn = await self._acquire()
        try:
            async with asyncio.timeout(self.socket_timeout_s):
                await _exchange(conn, [("PING",), *(("SCRIPT", "LOAD", s) for s, _ in
                                                    _SCRIPTS.values())])
        except _REFUSED as exc:
            raise self._refused(exc) from None
        except BusyLoadingError as exc:
            await conn.disconnect(nowait=True)
            raise StoreUnavailable(f"redis at {redact(self.url)} is still loading its data: "
                                   f"{_why(exc)}") from None
        except _TRANSIENT as exc:
            await conn.disconnect(nowait=True)
            raise StoreUnavailable(
                f"can't reach redis at {redact(self.url)}: {_why(exc)}. Start it (an "
                "embedded store: `swarm store start --run-dir RUN_DIR`), or set state.store "
                "to 'embedded' to run a private one") from None
        except ResponseError as exc:
            if not waitable_reply(exc):
                raise self._refused_reply(exc) from exc
            raise StoreUnavailable(f"redis at {redact(self.url)} can't take writes: "
                                   f"{_reply_text(exc)}") from None
        finally:
            self._release(conn)

    async def claim(self, task_id: str) -> int:
        """A new writer token for the task (INCR of its fence key), sent with the next batch of
        appends: every turn claims its log as it starts. A batch sent again (after a server
        refused part of it for now, `_WAITABLE_CODES`) may skip a value: harmless, as only
        the newest token counts."""
        return int(await self._enqueue(("INCR", self._k(task_id, "fence"))))

    async def append(
        self, task_id: str, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
        *, fence: int | None = None,
    ) -> int:
        """Append entries and upsert ledger records atomically, in one round trip."""
        # The retry token (unique: this store's random prefix and a count), then the writer
        # token ('' for none).
        args: list[Any] = [b"%b%x" % (self._token_prefix, next(self._tokens)), b"%d" % len(entries),
                           b"" if fence is None else b"%d" % fence]
        args += [codec.encode(e) for e in entries]
        for rec in ledger or ():
            args += (rec.key, codec.encode(rec))
        head = self._heads.get(task_id)
        if head is None:
            head = self._append_head(task_id)
        length = int(await self._eval("append", (), args, head=head))
        if length < 0:
            raise Fenced(task_id, fence or 0, -1 - length)
        first = length - len(entries)
        for i, e in enumerate(entries):
            e.seq = first + i
        return length - 1 if entries else -1

    async def read(self, task_id: str, after: int = -1, upto: int | None = None) -> list[LogEntry]:
        """Entries with after < seq <= upto, fetched in pages of concatenated records.

        Raises `CheckpointError` if some of them were archived and trimmed from Redis: only a
        `TieredCheckpointer` over this store and its archive can read those.
        """
        base, out = await self.read_tail(task_id, after, upto)
        start = max(after + 1, 0)
        if start < base and (upto is None or start <= upto):
            last = base - 1 if upto is None else min(upto, base - 1)
            raise CheckpointError(
                f"task {task_id}: entries {start}..{last} were moved to an archive and trimmed "
                "from redis; read them through a TieredCheckpointer (state.archive)")
        return out

    async def read_tail(self, task_id: str, after: int = -1,
                        upto: int | None = None) -> tuple[int, list[LogEntry]]:
        """What Redis holds of `read(task_id, after, upto)`: the log's base (the seq of the first
        entry still in Redis) and the entries from `max(after + 1, base)` to `upto`, in order.

        If a compaction trims entries this call was about to read, it starts over, so the
        entries returned always begin at the base returned (or at `after + 1`) with no gap.
        """
        return await self._tail(task_id, after, upto, self._decode_page)

    async def read_tail_raw(self, task_id: str, after: int = -1, upto: int | None = None
                            ) -> tuple[int, list[EntryHead]]:
        """`read_tail` with each entry as its head (no `data`) and its stored bytes (`raw`),
        for copying to an archive without decoding and encoding every entry again."""
        return await self._tail(task_id, after, upto, self._decode_raw)

    async def _tail(self, task_id: str, after: int, upto: int | None,
                    decode: Callable[[int, bytes], list[Any] | None]) -> tuple[int, list[Any]]:
        key, arch = self._k(task_id, "log"), self._k(task_id, "arch")
        while True:
            out: list[Any] = []
            start, base = max(after + 1, 0), -1
            while upto is None or start <= upto:
                page_base, first, count, blob = await self._eval(
                    "read", (key, arch), (start, _READ_PAGE, "" if upto is None else upto))
                first, count = int(first), int(count)
                if base < 0:
                    base, start = int(page_base), first
                elif first != start:  # trimmed under us: what we have may now have a hole
                    break
                page = decode(count, blob)
                if page is None:  # something is wrong with a record: find it and name it
                    index = first - int(page_base)
                    raw = await self._cmd("LRANGE", key, index, index + count - 1)
                    page = [codec.decode(LogEntry, data, task_id=task_id,
                                         what=f"entry {first + i}") for i, data in enumerate(raw)]
                    if decode is not self._decode_page:  # all decoded: back to what was asked
                        page = self._decode_raw(count, blob)
                        if page is None:
                            raise CorruptRecord(task_id, f"entries {first}..{first + count - 1}",
                                                "they don't read as log entries")
                for i, e in enumerate(page):
                    e.seq = first + i
                out += page
                start = first + count
                if count < _READ_PAGE:
                    return max(base, 0), out
            else:
                return max(base, 0), out

    @staticmethod
    def _decode_raw(count: int, blob: bytes) -> list[EntryHead] | None:
        # The page read twice at C speed: each entry's head (its `data` skipped, not built)
        # and its bytes as stored.
        framed = b"\xdd" + count.to_bytes(4, "big") + blob
        try:
            heads, raws = _heads.decode(framed), _raws.decode(framed)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if any(h.v != FORMAT_VERSION for h in heads):
            return None
        for h, r in zip(heads, raws, strict=True):
            h.raw = bytes(r)
        return heads

    @staticmethod
    def _decode_page(count: int, blob: bytes) -> list[LogEntry] | None:
        # Encoded entries are msgpack values, so their concatenation behind an array header is
        # one msgpack array: one decode call instead of one per entry.
        try:
            page = _entries.decode(b"\xdd" + count.to_bytes(4, "big") + blob)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if any(e.v != FORMAT_VERSION for e in page):
            return None
        return page

    async def put_snapshot(self, snapshot: Snapshot, keep: int = 3) -> None:
        """Store a snapshot and drop all but the newest `keep`, in one round trip."""
        await self._eval("put_snapshot", (self._k(snapshot.task_id, "snap"),),
                         (snapshot.seq, codec.encode(snapshot), keep))

    async def snapshots(self, task_id: str) -> list[int]:
        """Snapshot seqs, ascending."""
        return sorted(int(k) for k in await self._grouped("HKEYS", self._k(task_id, "snap")))

    async def get_snapshot(self, task_id: str, seq: int) -> Snapshot | None:
        """The snapshot at `seq`, or None."""
        data = await self._cmd("HGET", self._k(task_id, "snap"), seq)  # up to MBs: not grouped
        if data is None:
            return None
        return codec.decode(Snapshot, data, task_id=task_id, what=f"snapshot at entry {seq}")

    async def ledger(self, task_id: str) -> dict[str, LedgerRecord]:
        """Ledger records by key."""
        return {key: codec.decode(LedgerRecord, v, task_id=task_id, what=f"ledger record {key}")
                for key, v in (await self.ledger_raw(task_id)).items()}

    async def put_task(self, row: TaskRow) -> None:
        """Create or replace a task row (moving it if its swarm changed)."""
        await self._eval("put_task", *self._put_task_args(row))

    def _put_task_args(self, row: TaskRow) -> tuple[tuple[str], tuple[Any, ...]]:
        """The keys and arguments of the put_task script for a row."""
        return ((self._k(row.task_id, "swarm"),),
                (row.task_id, row.swarm, codec.encode(row), self.prefix))

    async def put_tasks(self, rows: list[TaskRow]) -> list[BaseException | None]:
        """Several rows in the same group-committed batch, with no coroutine per row."""
        out: list[Any] = []
        for row in rows:
            try:
                keys, args = self._put_task_args(row)
            except Exception as exc:  # this row only
                out.append(exc)
                continue
            out.append(self._enqueue(_script_cmd("put_task", keys, args), "put_task"))
        done = iter(await asyncio.gather(*(f for f in out if isinstance(f, asyncio.Future)),
                                         return_exceptions=True))
        return [f if not isinstance(f, asyncio.Future) else
                (r if isinstance(r := next(done), BaseException) else None) for f in out]

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task row, or None."""
        data = await self._eval("get_task", (self._k(task_id, "swarm"),), (task_id, self.prefix))
        return None if data is None else codec.decode(TaskRow, data, task_id=task_id, what="row")

    async def list_tasks(self, swarm: str) -> list[TaskRow]:
        """Every row of a swarm."""
        flat = await self._cmd("HGETALL", f"{self.prefix}:s:{swarm}:tasks")
        return [codec.decode(TaskRow, v, task_id=k.decode(), what="row")
                for k, v in zip(flat[::2], flat[1::2], strict=True)]

    async def delete(self, task_id: str) -> None:
        """Remove every key of a task and its row, atomically."""
        keys = [self._k(task_id, w) for w in ("log", "snap", "ledger", "tok", "swarm", "fence",
                                              "arch", "lease", "logs")]
        await self._eval("delete", keys, (task_id, self.prefix))

    # -- compaction (for TieredCheckpointer) -----------------------------------------------------

    async def bounds(self, task_id: str) -> Bounds:
        """Where the task's log starts and ends in Redis, and what was archived of it."""
        end, base, ledger, snap = await self._eval(
            "bounds", (self._k(task_id, "log"), self._k(task_id, "arch")), ())
        return Bounds(base=int(base or 0), end=int(end), archived=base != b"",
                      ledger_archived=ledger != b"", snapshot=int(snap) if snap else None)

    async def epoch(self) -> str | None:
        """The store's epoch (`Checkpointer.epoch`): a random token under `{prefix}:epoch`,
        set by the first call that finds none. Written to the append-only file like any
        other key, so a server restarted with its data keeps it."""
        key = f"{self.prefix}:epoch"
        found = await self._cmd("GET", key)  # a read, as a replica (read-only) answers it
        if found is None:
            mine = os.urandom(12).hex()

            async def op(conn: AbstractConnection) -> Any:
                return (await _exchange(conn, [("SET", key, mine, "NX"), ("GET", key)]))[1]

            found = await self._run(op)
        return found.decode() if isinstance(found, bytes) else found

    async def lease(self, task_id: str, ttl_s: float) -> str | None:
        """Become the task's only archiver for `ttl_s` seconds: a token, or None if another
        holds the lease. `compact` needs a current token; `release` gives it back."""
        token = os.urandom(9).hex()
        ok = await self._eval("lease", (self._k(task_id, "lease"),),
                              (token, max(1, int(ttl_s * 1000))))
        return token if ok else None

    async def release(self, task_id: str, token: str) -> None:
        """Give a lease back (if it is still this token's)."""
        await self._eval("release", (self._k(task_id, "lease"),), (token,))

    async def compact(self, task_id: str, upto: int, *, lease: str, snapshot: int | None = None,
                      ledger: dict[str, bytes] | None = None, drop_snapshots: bool = False,
                      ) -> int:
        """Trim the entries up to `upto` (already archived: the caller checked) from the log,
        atomically, keeping every seq as it was; return the new base.

        `snapshot` records the seq of the snapshot the archive holds. For a finished task,
        `ledger` (raw records by key, as `ledger_raw` gave them) are deleted where still
        unchanged and marked as archived, and `drop_snapshots` deletes the task's snapshots.
        Raises `CheckpointError` if the lease was lost or the log doesn't reach `upto`.
        """
        keys = [self._k(task_id, w) for w in ("log", "arch", "lease", "ledger", "snap")]
        args: list[Any] = [lease, upto, "1" if drop_snapshots else "0",
                           "" if snapshot is None else snapshot]
        for key, value in (ledger or {}).items():
            args += (key, value)
        base = int(await self._eval("compact", keys, args))
        if base == -1:
            raise CheckpointError(f"task {task_id}: the archive lease expired before the log "
                                  "was trimmed; nothing was trimmed")
        if base == -2:
            raise CheckpointError(f"task {task_id}: can't trim through entry {upto}: the log "
                                  "is shorter")
        return base

    async def ledger_raw(self, task_id: str) -> dict[str, bytes]:
        """The task's ledger records as stored (encoded), by key."""
        flat = await self._cmd("HGETALL", self._k(task_id, "ledger"))  # a long task's: large
        return {k.decode(): v for k, v in zip(flat[::2], flat[1::2], strict=True)}

    async def link(self, task_id: str, log_id: str) -> None:
        """Record `log_id` as one of the task's logs (its agents' own logs, `task/agent`)."""
        await self._grouped("SADD", self._k(task_id, "logs"), log_id)

    async def linked(self, task_id: str) -> list[str]:
        """The ids `link` recorded for the task, sorted."""
        return sorted(m.decode() for m in await self._grouped("SMEMBERS", self._k(task_id, "logs")))

    async def info(self) -> dict[str, Any]:
        """Counts for status displays: swarms, task rows and logs under the prefix, server facts."""
        swarms = await self._scan(f"{self.prefix}:s:*:tasks")
        rows = 0
        for key in swarms:
            rows += int(await self._cmd("HLEN", key))
        logs = len(await self._scan(f"{self.prefix}:t:*:log"))
        server, memory = await self._run(
            lambda conn: _exchange(conn, [("INFO", "server"), ("INFO", "memory")]))
        facts = dict(line.split(":", 1) for line in (server + memory).decode().splitlines()
                     if ":" in line)
        return {"store": "redis", "url": redact(self.url), "prefix": self.prefix,
                "swarms": len(swarms), "tasks": rows, "logs": logs,
                "keys": int(await self._cmd("DBSIZE")),
                "used_memory_bytes": int(facts.get("used_memory", 0)),
                "redis_version": facts.get("redis_version", "")}

    async def _scan(self, pattern: str) -> list[bytes]:
        cursor, found = b"0", []
        while True:
            cursor, keys = await self._cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += keys
            if cursor in (b"0", 0):
                return found

    async def close(self) -> None:
        """Close every pooled connection (later calls reconnect), once appends under way are
        sent."""
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)
        idle, self._idle = self._idle, []
        self._made -= len(idle)
        for conn in idle:
            await conn.disconnect()

    aclose = close
