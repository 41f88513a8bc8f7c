"""Session memory: each user's conversation history per session, in Redis.

A session is one user's conversation in one swarm: the A2A context id a client gives with its
tasks (a task without one is a session of its own). Each finished task appends one exchange (the
task's text and its answer). Keys start with the user, so no context id, guessed or not, reaches
another user's history, and forgetting a user is one prefix:

    <prefix>:mem:u:<user>:s:<swarm>:c:<context>        list of exchanges (JSON), oldest first
    <prefix>:mem:u:<user>:s:<swarm>:c:<context>:n      exchanges ever appended (numbers them)
    <prefix>:mem:u:<user>:s:<swarm>:c:<context>:sum    hash: rolling summary text, upto (number)

User and context are percent-encoded (no `:` or glob characters in a key segment). Every write
refreshes the session's TTL; the list keeps the last `memory.session.max_turns` exchanges.

What a turn starts with is the agent's `SessionPolicy`, applied by `select` (pure, no I/O).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from swarm.memory.config import SessionPolicy, SessionStoreConfig

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # a rough count: no tokenizer is assumed for the model behind an agent


def estimate_tokens(text: str) -> int:
    """About how many tokens `text` is (4 characters a token)."""
    return len(text) // CHARS_PER_TOKEN + 1


@dataclass(slots=True)
class Exchange:
    """One finished task of a session: what the user asked and what the swarm answered."""

    n: int
    task: str
    answer: str
    task_id: str = ""
    ts: float = 0.0

    def tokens(self) -> int:
        """Estimated tokens of the exchange as rendered."""
        return estimate_tokens(self.task) + estimate_tokens(self.answer) + 4


@dataclass(slots=True)
class History:
    """What a session holds: its latest exchanges and its rolling summary."""

    exchanges: list[Exchange]
    summary: str = ""
    summary_upto: int = 0  # the last exchange number the summary covers


def session_key(prefix: str, swarm: str, user: str, context: str) -> str:
    """The Redis key of one user's session in one swarm."""
    return f"{prefix}:mem:u:{quote(user, safe='')}:s:{swarm}:c:{quote(context, safe='')}"


def user_pattern(prefix: str, user: str) -> str:
    """A SCAN pattern matching every session key of `user` (every swarm)."""
    return f"{prefix}:mem:u:{quote(user, safe='')}:*"


def select(history: History, policy: SessionPolicy) -> tuple[str, list[Exchange]]:
    """The summary and the exchanges a turn starts with, under `policy`."""
    budget = policy.max_tokens
    summary = ""
    pool = history.exchanges
    if policy.policy == "summary":
        summary = history.summary
        budget -= estimate_tokens(summary) if summary else 0
        pool = [e for e in pool if e.n > history.summary_upto]
    elif policy.policy == "last_n":
        pool = pool[-policy.turns:] if policy.turns else []
    chosen: list[Exchange] = []
    for ex in reversed(pool):  # newest first, while they fit
        cost = ex.tokens()
        if cost > budget:
            break
        budget -= cost
        chosen.append(ex)
    chosen.reverse()
    return summary, chosen


def render(summary: str, exchanges: list[Exchange]) -> str:
    """The history as text for the agent's context (empty when there is none)."""
    if not summary and not exchanges:
        return ""
    lines = ["Earlier in this conversation with the user (session history, oldest first):"]
    if summary:
        lines.append(f"Summary of older exchanges: {summary}")
    for ex in exchanges:
        lines.append(f"User: {ex.task}")
        lines.append(f"Assistant: {ex.answer}")
    return "\n".join(lines)


def needs_summary(history: History, policy: SessionPolicy) -> list[Exchange]:
    """Exchanges to fold into the summary now (empty: none yet): once more than `turns` +
    `summarize_every` exchanges are past the summary, all but the last `turns` of them."""
    if policy.policy != "summary":
        return []
    pending = [e for e in history.exchanges if e.n > history.summary_upto]
    if len(pending) < policy.turns + policy.summarize_every:
        return []
    return pending[: len(pending) - policy.turns] if policy.turns else pending


def summary_prompt(summary: str, exchanges: list[Exchange], max_tokens: int
                   ) -> list[dict[str, Any]]:
    """The chat messages that ask a model to fold `exchanges` into `summary`."""
    body = "\n".join(f"User: {e.task}\nAssistant: {e.answer}" for e in exchanges)
    words = max(30, max_tokens // 2)
    return [
        {"role": "system", "content": "You keep a running summary of a conversation between a "
         "user and an assistant. Keep facts, names, numbers, decisions and the user's "
         f"preferences; drop small talk. Answer with the summary only, at most {words} words."},
        {"role": "user", "content": f"Summary so far: {summary or '(none)'}\n\n"
         f"New exchanges:\n{body}\n\nWrite the updated summary."},
    ]


class SessionStore:
    """Session histories in Redis (redis.asyncio, with socket timeouts)."""

    def __init__(self, url: str, *, prefix: str = "swarm", settings: SessionStoreConfig | None
                 = None) -> None:
        from swarm.memory.config import SessionStoreConfig

        self.url = url
        self.prefix = prefix
        self.settings = settings or SessionStoreConfig()
        self._redis: Any = None

    def _client(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aredis

            t = self.settings.timeout_s
            self._redis = aredis.Redis.from_url(self.url, socket_timeout=t,
                                                socket_connect_timeout=t)
        return self._redis

    async def append(self, swarm: str, user: str, context: str, task: str, answer: str,
                     task_id: str = "", ts: float | None = None) -> int:
        """Add one exchange to a session; returns its number (1 for the first)."""
        s = self.settings
        key = session_key(self.prefix, swarm, user, context)
        cut = s.max_chars
        payload = json.dumps({"task": task[:cut], "answer": answer[:cut], "task_id": task_id,
                              "ts": time.time() if ts is None else ts})
        ttl = max(1, int(s.ttl_s))
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.incr(f"{key}:n")
            pipe.rpush(key, payload)
            pipe.ltrim(key, -s.max_turns, -1)
            pipe.expire(key, ttl)
            pipe.expire(f"{key}:n", ttl)
            pipe.expire(f"{key}:sum", ttl)
            out = await pipe.execute()
        return int(out[0])

    async def history(self, swarm: str, user: str, context: str, last: int | None = None
                      ) -> History:
        """A session's latest `last` exchanges (all kept, if None) and its summary."""
        key = session_key(self.prefix, swarm, user, context)
        start = -last if last else 0
        if last == 0:
            start = -1  # still read one, for the numbering below; dropped after
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.lrange(key, start, -1)
            pipe.get(f"{key}:n")
            pipe.hgetall(f"{key}:sum")
            raw, count, summ = await pipe.execute()
        total = int(count or 0)
        first = total - len(raw) + 1
        exchanges = []
        for i, item in enumerate(raw):
            d = json.loads(item)
            exchanges.append(Exchange(n=first + i, task=d.get("task", ""),
                                      answer=d.get("answer", ""), task_id=d.get("task_id", ""),
                                      ts=float(d.get("ts", 0.0))))
        if last == 0:
            exchanges = []
        summ = {k.decode() if isinstance(k, bytes) else k: v for k, v in (summ or {}).items()}
        text = summ.get("text", b"")
        return History(exchanges, text.decode() if isinstance(text, bytes) else str(text),
                       int(summ.get("upto", 0) or 0))

    async def set_summary(self, swarm: str, user: str, context: str, text: str, upto: int,
                          expect_upto: int) -> bool:
        """Store a new summary covering exchanges up to `upto`, unless another writer moved
        the summary past `expect_upto` meanwhile (then False, and nothing is written)."""
        from redis.exceptions import WatchError

        key = session_key(self.prefix, swarm, user, context) + ":sum"
        client = self._client()
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                current = int(await pipe.hget(key, "upto") or 0)
                if current != expect_upto:
                    return False
                pipe.multi()
                pipe.hset(key, mapping={"text": text, "upto": upto})
                pipe.expire(key, max(1, int(self.settings.ttl_s)))
                await pipe.execute()
            except WatchError:
                return False
        return True

    async def forget(self, user: str, swarm: str | None = None, context: str | None = None
                     ) -> int:
        """Delete a user's sessions (one swarm's, or one session, if given); returns how many
        sessions were deleted."""
        client = self._client()
        if context is not None:
            if swarm is None:
                raise ValueError("forgetting one session needs its swarm")
            key = session_key(self.prefix, swarm, user, context)
            removed = await client.delete(key, f"{key}:n", f"{key}:sum")
            return 1 if removed else 0
        pattern = user_pattern(self.prefix, user)
        if swarm is not None:
            pattern = f"{pattern[:-1]}s:{swarm}:c:*"
        sessions, batch = 0, []
        async for key in client.scan_iter(match=pattern, count=500):
            k = key.decode() if isinstance(key, bytes) else key
            if not k.endswith((":n", ":sum")):
                sessions += 1
            batch.append(key)
            if len(batch) >= 500:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
        return sessions

    async def aclose(self) -> None:
        """Close the Redis connection."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
