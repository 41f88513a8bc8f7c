"""Rate limits: token buckets in Redis (a real redis-server) and in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from swarm.config import RateLimitConfig, parse_config
from swarm.errors import ConfigError, PolicyError
from swarm.governance.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RateLimitLayer,
    RedisRateLimiter,
)
from swarm.models.interface import ModelRequest, ModelResponse, Usage
from swarm.runtime.middleware import ModelCall
from swarm.runtime.step import Session
from swarm.state.embedded import EmbeddedRedis
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("rl-redis"))
    server.start()
    yield server.url
    server.stop()


def limit(**kw: Any) -> RateLimitConfig:
    return RateLimitConfig.model_validate({"scope": "user", "rate": 1, "per": "minute", **kw})


class Sleeps:
    """Stands in for asyncio.sleep: records the waits the limiter asked for."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def layer(limits: list[RateLimitConfig], limiter: RateLimiter, swarm: str,
          sleeps: Sleeps | None = None) -> RateLimitLayer:
    return RateLimitLayer(limits, limiter, swarm=swarm, role="writer", model="big",
                          sleep=sleeps or Sleeps())


async def model_call(lay: RateLimitLayer, user: str = "alice", tokens: int = 10,
                     deadline: float | None = None) -> None:
    session = Session(task_id="t", agent="writer", session_id="s", messages=[], user=user)
    if deadline is not None:
        session.scratch["deadline"] = deadline

    async def nxt(call: ModelCall) -> ModelResponse:
        return ModelResponse("ok", [], Usage(input_tokens=tokens, output_tokens=0))

    await lay.on_model(ModelCall(session, 1, "writer", "big", ModelRequest(messages=[])), nxt)
    for task in list(lay._debits):  # token debits run off the call's path; let them land
        await task


def _limiters(redis_url: str) -> list[tuple[str, Any]]:
    return [("memory", lambda: MemoryRateLimiter()),
            ("redis", lambda: RedisRateLimiter(redis_url))]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_over_the_limit_a_call_waits_for_its_turn(kind: str, redis_url: str,
                                                        request: pytest.FixtureRequest) -> None:
    limiter = dict(_limiters(redis_url))[kind]()
    sleeps = Sleeps()
    lay = layer([limit(burst=2)], limiter, request.node.name, sleeps)
    for _ in range(3):
        await model_call(lay)
    # Two in the burst go at once; the third waits for one token at 1 per minute.
    assert sleeps.waits[:1] and len(sleeps.waits) == 1
    assert 59.0 < sleeps.waits[0] <= 60.0
    await model_call(lay, user="bob")  # another user has a bucket of their own
    assert len(sleeps.waits) == 1


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_reject_refuses_with_a_policy_error(kind: str, redis_url: str,
                                                  request: pytest.FixtureRequest) -> None:
    limiter = dict(_limiters(redis_url))[kind]()
    lay = layer([limit(on_limit="reject")], limiter, request.node.name)
    await model_call(lay)
    with pytest.raises(PolicyError, match=r"rate limit for user alice: 1 requests per minute "
                                          r"\(burst 1\) exceeded; retry in (5\d|60)\.\d\d s"):
        await model_call(lay)


async def test_a_wait_never_goes_past_the_turn_deadline() -> None:
    import time

    lay = layer([limit()], MemoryRateLimiter(), "deadline")
    await model_call(lay)
    with pytest.raises(PolicyError, match=r"would wait 60\.00 s, past the turn's deadline"):
        await model_call(lay, deadline=time.time() + 5)


async def test_two_replicas_share_one_bucket(redis_url: str) -> None:
    # Two limiters on one Redis stand for two agent replicas (or nodes).
    a = layer([limit(scope="agent", on_limit="reject")], RedisRateLimiter(redis_url), "shared")
    b = layer([limit(scope="agent", on_limit="reject")], RedisRateLimiter(redis_url), "shared")
    await model_call(a, user="u1")
    with pytest.raises(PolicyError, match="agent writer"):
        await model_call(b, user="u2")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_tokens_are_debited_after_the_call(kind: str, redis_url: str,
                                                 request: pytest.FixtureRequest) -> None:
    limiter = dict(_limiters(redis_url))[kind]()
    sleeps = Sleeps()
    lim = limit(scope="model", count="tokens", rate=600, burst=100)  # 10 tokens a second
    lay = layer([lim], limiter, request.node.name, sleeps)
    await model_call(lay, tokens=150)  # allowed (the bucket was full), leaves it 50 in debt
    assert sleeps.waits == []
    await model_call(lay)
    assert len(sleeps.waits) == 1 and 4.5 < sleeps.waits[0] <= 5.0


async def test_a_down_store_fails_closed_for_strict_limits_and_open_otherwise(
        tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "down")
    server.start()
    url = server.url
    strict = layer([limit(strict=True)], RedisRateLimiter(url), "down")
    lax = layer([limit(strict=False)], RedisRateLimiter(url), "down")
    await model_call(strict)  # while Redis is up, both work
    server.stop()
    with pytest.raises(PolicyError, match=r"can't be checked: redis at .* \(strict: failing "
                                          r"closed\)"):
        await model_call(strict)
    for _ in range(3):
        await model_call(lax)  # open: the calls go through


RULES = [{"when": {"agent": "a"}, "content": "hello"}]


def _cfg(tmp_path: Path, limits: list[dict[str, Any]]) -> Any:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"rules": RULES}))
    return parse_config({
        "name": "limited", "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
        "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"}, "rate_limits": limits,
        "usage": {"dir": str(tmp_path / "usage")},
    }, base_dir=tmp_path)


async def test_a_rejected_model_call_fails_the_task_with_class_policy(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"scope": "user", "key": "alice", "rate": 1, "per": "hour",
                           "on_limit": "reject"}])
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        first = await sw.run("one", user="alice")
        second = await sw.run("two", user="alice")
        other = await sw.run("three", user="bob")  # the limit is alice's only
    assert first["state"] == "completed" and other["state"] == "completed"
    assert second["state"] == "failed" and second["error_class"] == "policy"
    assert "rate limit for user alice: 1 requests per hour" in second["error"]
    # The refused call never ran: no usage row (as for a budget's or a gate's stop), while
    # each call that ran has one.
    from swarm.observability.usage import read_usage

    rows = read_usage(str(tmp_path / "usage")).to_pylist()
    assert sorted((r["task_id"], r["outcome"]) for r in rows) == sorted(
        (t["task_id"], "ok") for t in (first, other)), rows


def test_bad_limits_are_named(tmp_path: Path) -> None:
    for limits, where, what in [
        ([{"scope": "agent", "key": "ghost", "rate": 1}], "rate_limits.0.key", "unknown agent"),
        ([{"scope": "model", "key": "nope", "rate": 1}], "rate_limits.0.key", "unknown model"),
        ([{"scope": "team", "rate": 1}], "rate_limits.0.scope", "Input should be"),
        ([{"scope": "user", "rate": 0}], "rate_limits.0.rate", "greater than 0"),
        ([{"scope": "user", "rate": 1, "count": "tokens", "calls": "tool"}], "rate_limits.0",
         "count: tokens only applies to model calls"),
        ([{"scope": "user", "rate": 5, "burst": 0.5}], "rate_limits.0", "at least one request"),
        ([{"scope": "user", "rate": 1, "on_limit": "drop"}], "rate_limits.0.on_limit",
         "Input should be"),
    ]:
        with pytest.raises(ConfigError) as e:
            _cfg(tmp_path, limits)
        assert where in [p for p, _ in e.value.problems], e.value.problems
        assert what in str(e.value)


async def test_a_refused_tool_call_is_no_call_and_no_row_but_a_policy_error(
        tmp_path: Path) -> None:
    """Tool calls a rate limit refuses are not counted as calls (nor against max_tool_calls),
    have no ledger row, and still count as policy errors in the task and the errors metric."""
    from swarm.observability.metrics import MemoryRecorder, use_recorder
    from swarm.observability.usage import read_usage

    rules = [{"when": {"agent": "a", "called": {"echo": {"max": 2}}},
              "tool_calls": [{"name": "echo", "arguments": {"text": "n{{ messages | length }}"}}]},
             {"when": {"agent": "a"}, "content": "done"}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"rules": rules}))
    cfg = parse_config({
        "name": "limited", "models": {"m": {"provider": "scripted", "policy": "p.yaml"}},
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {"a": {"model": "m", "tools": ["fn"]}}, "supervisor": {"entry": "a"},
        "rate_limits": [{"scope": "agent", "key": "a", "rate": 1, "per": "hour", "calls": "tool",
                         "on_limit": "reject"}],
        "stuck": {"same_call": None, "no_progress": None},
        "usage": {"dir": str(tmp_path / "usage")},
    }, base_dir=tmp_path)
    recorder = MemoryRecorder()
    before = use_recorder(recorder)
    try:
        async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
            row = await sw.run("go")
    finally:
        use_recorder(before)
    # Three echo calls asked for: the first ran, the other two were refused.
    assert row["state"] == "completed" and row["tool_calls"] == 1, row
    assert row["errors"] == {"policy": 2}, row
    tools = [r for r in read_usage(str(tmp_path / "usage")).to_pylist() if r["kind"] == "tool"]
    assert [r["outcome"] for r in tools] == ["ok"], tools
    assert recorder.value("swarm_errors", kind="tool", error_class="policy") == 2, \
        recorder.series("swarm_errors")
    assert recorder.value("swarm_tool_calls", tool="echo") == 1
