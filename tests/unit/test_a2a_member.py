"""Remote A2A members (`agents.X.a2a`) against a real A2A server on 127.0.0.1 (tests.a2a_peer):
handoffs, streaming, context ids and trace context, timeouts, retries, garbage, cards."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from a2a.types import TaskState, TaskStatus
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from swarm.config import parse_config
from swarm.errors import ConfigError
from swarm.events import Handoff, RemoteUpdate
from swarm.protocol import a2a
from swarm.protocol.a2a_member import check_cards, context_id_for
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.a2a_peer import STREAM_UPDATES, A2APeer, free_port
from tests.unit.test_runtime_local import make_cfg
from tests.unit.test_tracing import Traced, traced  # noqa: F401  (the fixture)

REMOTES = ("echo", "stream", "slow", "hold", "drop", "garbage", "flaky", "fail", "ask", "cut",
           "badstate", "badid", "strresult", "bigreply", "gzipreply")
# The desk hands a task "<mode>: text" to the remote member of that mode.
RULES = [
    {"when": {"agent": "desk", "task_matches": f"^{mode}:"},
     "tool_calls": [{"name": f"transfer_to_{mode}", "arguments": {"message": "{{ task }}"}}]}
    for mode in (*REMOTES, "lazy")
]


@pytest.fixture(scope="module")
def peer() -> Iterator[A2APeer]:
    p = A2APeer().start()
    yield p
    p.stop()


def remote(peer: A2APeer, mode: str, **kw: Any) -> dict[str, Any]:
    return {"a2a": {"url": peer.url(mode), "timeout_s": 20, "backoff_s": 0.01, **kw}}


def desk_cfg(tmp_path: Path, peer: A2APeer, **overrides: Any) -> Any:
    agents: dict[str, Any] = {"desk": {"model": "m", "handoffs": [*REMOTES]}}
    agents.update({mode: remote(peer, mode) for mode in REMOTES})
    agents.update(overrides)
    agents["desk"]["handoffs"] = [a for a in agents if a != "desk"]
    return make_cfg(tmp_path, RULES, agents)


def remote_updates(sw: LocalSwarm, task_id: str) -> list[RemoteUpdate]:
    return [e for e in sw.events(task_id) if isinstance(e, RemoteUpdate)]


async def until_remote(sw: LocalSwarm, task_id: str, state: str) -> None:
    """Wait (on the task's events) until its remote member reports `state`."""
    cursor = 0
    while True:
        events, _ = await sw.supervisor.events(task_id, cursor, 10.0)
        cursor += len(events)
        if any(isinstance(e, RemoteUpdate) and e.state == state for e in events):
            return


async def test_handoff_to_a_remote_member_ends_with_its_answer(tmp_path: Path,
                                                               peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        row = await sw.run("echo: what is the rate?")
        assert row["state"] == "completed", row
        assert row["answer"] == "echo: echo: what is the rate?"
        assert row["agent"] == "echo"
        (h,) = [e for e in sw.events(row["task_id"]) if isinstance(e, Handoff)]
        assert (h.agent, h.to_agent) == ("desk", "echo")
        # A card without streaming: one SendMessage, whose final task is reported.
        assert [u.state for u in remote_updates(sw, row["task_id"])] == ["completed"]
        sent = peer.received["echo"][-1]
        assert sent.context_id == context_id_for("t", row["task_id"])
        assert sent.metadata["swarm_task_id"] == row["task_id"]
        task = sw.supervisor.get(row["task_id"]).task
        assert a2a.message_text(task.history[-1]) == row["answer"]


async def test_a_remote_answer_is_cut_to_max_answer_chars(tmp_path: Path,
                                                           peer: A2APeer) -> None:
    # A remote member is a peer: however much it sends, the task keeps a bounded answer.
    cfg = desk_cfg(tmp_path, peer, echo=remote(peer, "echo", max_answer_chars=256))
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("echo: " + "x" * 1000)
    assert row["state"] == "completed", row
    full = "echo: echo: " + "x" * 1000
    assert row["answer"] == f"{full[:256]}\n[truncated: 256 of {len(full)} characters shown]"


async def test_streamed_status_updates_become_task_events(tmp_path: Path,
                                                          peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        row = await sw.run("stream: explain it")
        assert row["state"] == "completed", row
        assert row["answer"] == "echo: stream: explain it"
        updates = remote_updates(sw, row["task_id"])
        assert [u.state for u in updates] == ["submitted", "working", "working", "working",
                                              "working", "completed"]
        assert [u.text for u in updates if u.text] == [
            f"{i}/3: {what}" for i, what in enumerate(STREAM_UPDATES, 1)]
        assert len({u.remote_task_id for u in updates}) == 1 and updates[0].remote_task_id
        assert all(u.agent == "stream" for u in updates)


async def test_one_context_per_swarm_task_and_the_trace_rides_along(
        tmp_path: Path, peer: A2APeer, traced: Traced) -> None:  # noqa: F811
    # Two members at the same remote agent, both in one task (parallel): one A2A context.
    cfg = make_cfg(tmp_path, RULES, {"r1": remote(peer, "echo"), "r2": remote(peer, "echo")},
                   supervisor={"strategy": "parallel", "agents": ["r1", "r2"]})
    async with LocalSwarm(cfg) as sw:
        first = await sw.run("same context")
        second = await sw.run("another task")
    assert first["state"] == "completed", first
    assert first["answer"] == "[r1] echo: same context\n\n[r2] echo: same context"
    mine = [m for m in peer.received["echo"]
            if m.metadata["swarm_task_id"] in (first["task_id"], second["task_id"])]
    contexts = [m.context_id for m in mine]
    assert contexts[0] == contexts[1] != contexts[2] == contexts[3]
    # Each message carries the traceparent of the supervisor's SendMessage span for it.
    sends = {s.context.span_id: s for s in traced.spans() if s.name.startswith("SendMessage r")}
    for m in mine:
        ctx = TraceContextTextMapPropagator().extract({"traceparent": m.metadata["traceparent"]})
        span_id = next(iter(ctx.values())).get_span_context().span_id
        assert span_id in sends
        assert sends[span_id].attributes["swarm.task.id"] == m.metadata["swarm_task_id"]


async def test_a_slow_remote_times_out_and_the_swarm_serves_on(tmp_path: Path,
                                                               peer: A2APeer) -> None:
    cfg = desk_cfg(tmp_path, peer, slow=remote(peer, "slow", timeout_s=0.5))
    async with LocalSwarm(cfg) as sw:
        slow, ok = await asyncio.gather(sw.run("slow: take your time"),
                                        sw.run("echo: quick one"))
        await sw.pool.members["slow"].aclose()  # waits for the remote cancel it sent
    assert ok["state"] == "completed" and ok["answer"] == "echo: echo: quick one"
    assert slow["state"] == "failed" and slow["error_class"] == "tool"
    assert f"remote agent slow ({peer.url('slow')}) did not answer within 0.5 s" in slow["error"]
    assert peer.canceled["slow"] >= 1  # the remote task it gave up on was canceled


async def test_dropped_connections_are_retried_then_fail_the_turn(tmp_path: Path,
                                                                  peer: A2APeer) -> None:
    before = peer.calls["drop"]
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        row = await sw.run("drop: anything")
        other = await sw.run("echo: still here")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    assert "remote agent drop" in row["error"] and "connection failed" in row["error"]
    assert "(3 attempts)" in row["error"]
    assert peer.calls["drop"] - before == 3  # the first try and a2a.retries (2)
    assert other["state"] == "completed"


async def test_garbage_fails_at_once_and_5xx_is_retried(tmp_path: Path, peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        garbage = await sw.run("garbage: anything")
        flaky = await sw.run("flaky: are you there?")
        retries = [u for u in remote_updates(sw, flaky["task_id"]) if u.state == "retrying"]
    assert garbage["state"] == "failed" and garbage["error_class"] == "tool", garbage
    assert "remote agent garbage" in garbage["error"]
    assert "sent an invalid response" in garbage["error"]
    assert peer.calls["garbage"] == 1  # not valid A2A: no retry
    # 503 twice, then an answer.
    assert flaky["state"] == "completed", flaky
    assert flaky["answer"] == "echo: flaky: are you there?"
    assert [u.text.split(";")[0] for u in retries] == ["attempt 1 answered HTTP 503",
                                                      "attempt 2 answered HTTP 503"]


async def test_a_result_that_is_not_an_a2a_object_is_named_as_such(tmp_path: Path,
                                                                   peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        row = await sw.run("strresult: anything")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    assert "sent a JSON-RPC result that is not an A2A response (a Task or Message object)" \
        in row["error"], row["error"]


async def test_a_card_that_never_comes_is_named_with_the_wait(tmp_path: Path,
                                                              peer: A2APeer) -> None:
    cfg = make_cfg(tmp_path, RULES, {"desk": {"model": "m", "handoffs": ["billing"]},
                                     "billing": {"a2a": {"url": peer.url("hangcard"),
                                                         "timeout_s": 1}}})
    with pytest.raises(ConfigError) as err:
        await check_cards(cfg)
    ((path, msg),) = err.value.problems
    assert path == "agents.billing.a2a"
    assert msg.endswith(": no answer within 1 s"), msg


async def test_a_card_too_big_or_too_slow_is_refused_in_bounded_time_and_memory(
        tmp_path: Path, peer: A2APeer) -> None:
    """A card of 64 MB is read no further than 1 MiB, and one sent a byte at a time is given
    up on at timeout_s plus the connect timeout (httpx's read timeout is per read, so it
    never fired: `swarm run` hung)."""
    agents = {"desk": {"model": "m", "handoffs": ["big", "slow"]},
              "big": {"a2a": {"url": peer.url("bigcard")}},
              "slow": {"a2a": {"url": peer.url("tricklecard"), "timeout_s": 1,
                               "connect_timeout_s": 1}}}
    with pytest.raises(ConfigError) as err:
        await check_cards(make_cfg(tmp_path, RULES, agents))
    problems = dict(err.value.problems)
    assert problems["agents.big.a2a"].endswith(
        f"agent card at {peer.url('bigcard')}/.well-known/agent-card.json: the agent card is "
        "over 1048576 bytes"), problems
    assert problems["agents.slow.a2a"].endswith("did not arrive whole within 2 s"), problems


async def test_a_reply_too_big_fails_the_turn_unread(tmp_path: Path, peer: A2APeer) -> None:
    """A 64 MB reply is read no further than the member's limit (8 MiB here), and the turn
    fails naming it; the next turn of another member is served."""
    cfg = desk_cfg(tmp_path, peer, bigreply=remote(peer, "bigreply", retries=0))
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("bigreply: anything")
        other = await sw.run("echo: still there?")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    assert "remote agent bigreply" in row["error"] and \
        f"reply is over {8 << 20} bytes" in row["error"], row["error"]
    assert other["state"] == "completed", other


async def test_a_compressed_reply_and_a_card_that_is_not_text_are_named(
        tmp_path: Path, peer: A2APeer) -> None:
    """Replies are asked for uncompressed; one sent compressed anyway is refused (it could
    grow a thousandfold before its size could be checked). A card that isn't UTF-8 is named
    as such, with its URL."""
    cfg = desk_cfg(tmp_path, peer, gzipreply=remote(peer, "gzipreply", retries=0))
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("gzipreply: anything")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    assert "the reply came compressed (gzip), though asked for none" in row["error"], row
    agents = {"desk": {"model": "m", "handoffs": ["bin"]},
              "bin": {"a2a": {"url": peer.url("binarycard")}}}
    with pytest.raises(ConfigError) as err:
        await check_cards(make_cfg(tmp_path, RULES, agents))
    ((_, msg),) = err.value.problems
    assert f"agent card at {peer.url('binarycard')}/.well-known/agent-card.json is not JSON " \
        "text (UTF-8)" in msg, msg


async def test_each_streamed_event_is_measured_wherever_chunks_split_it() -> None:
    """The per-event limit of a streamed reply: every event in a chunk is measured, and a
    blank line split across chunks (or CR line ends) still ends an event."""
    from swarm.protocol.a2a_cards import BodyTooLarge, _Capped

    class Body:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def aiter_bytes(self) -> Any:
            for c in self.chunks:
                yield c

        async def aclose(self) -> None:
            return None

    async def read(chunks: list[bytes]) -> bytes:
        return b"".join([c async for c in _Capped(Body(chunks), 100, True, "event")])

    event = b"data: " + b"x" * 60 + b"\n"
    assert await read([event + b"\n", event + b"\n"]) == (event + b"\n") * 2
    assert await read([event, b"\n" + event, b"\n"])  # the blank line split across chunks
    assert await read([event.replace(b"\n", b"\r") + b"\r" + event])  # CR line ends
    with pytest.raises(BodyTooLarge, match="over 100 bytes"):  # a big event mid-chunk
        await read([b"data: a\n\n" + b"data: " + b"y" * 200 + b"\n\ndata: b\n\n"])
    with pytest.raises(BodyTooLarge):  # one event over several chunks
        await read([event, event])


async def test_a_cut_stream_is_picked_up_without_sending_twice(tmp_path: Path,
                                                                peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        row = await sw.run("cut: long story")
        updates = remote_updates(sw, row["task_id"])
    assert row["state"] == "completed", row
    assert row["answer"] == "echo: cut: long story"
    assert len(peer.received["cut"]) == 1  # the message went once; the task was followed
    assert [u.state for u in updates][:2] == ["submitted", "retrying"]
    assert updates[-1].state == "completed"
    assert len({u.remote_task_id for u in updates}) == 1


async def test_a_remote_failure_or_question_fails_the_task(tmp_path: Path,
                                                           peer: A2APeer) -> None:
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        failed = await sw.run("fail: book it")
        asked = await sw.run("ask: convert it")
        await sw.pool.members["ask"].aclose()  # waits for the remote cancel it sent
    assert failed["state"] == "failed" and failed["error_class"] == "orchestration"
    assert "remote agent fail" in failed["error"]
    assert failed["error"].endswith("failed: the remote database is down")
    assert asked["state"] == "failed" and asked["error_class"] == "orchestration"
    assert "asked for input (which currency?)" in asked["error"]
    assert peer.canceled["ask"] == 1  # the question was withdrawn at the remote


@pytest.mark.parametrize(("state", "shown"), [
    ("TASK_STATE_BOGUS", "unspecified (none given, or a name that is not an A2A task state)"),
    ("TASK_STATE_UNSPECIFIED", "unspecified (none given, or a name that is not an A2A task state)"),
    ("42", "42 (not an A2A task state)"),
])
async def test_a_remote_task_in_an_invalid_state_fails_the_turn_at_once(
        tmp_path: Path, peer: A2APeer, state: str, shown: str) -> None:
    # Without the check, the turn waited the whole a2a.timeout_s for the task to end.
    cfg = desk_cfg(tmp_path, peer, badstate=remote(peer, "badstate", timeout_s=60))
    async with LocalSwarm(cfg) as sw:
        row = await sw.run(f"badstate: {state}")
        other = await sw.run("echo: still here")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    assert row["error"].endswith(
        f"remote agent badstate ({peer.url('badstate')}) reported its task "
        f"task-in-a-bad-state in an invalid state: {shown}")
    assert other["state"] == "completed"


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
async def test_a_reply_to_another_request_id_fails_the_turn_naming_both(
        tmp_path: Path, peer: A2APeer, streaming: bool) -> None:
    cfg = desk_cfg(tmp_path, peer, badid=remote(peer, "badid", streaming=streaming))
    before = peer.calls["badid"]
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("badid: anything")
        other = await sw.run("echo: still here")
    assert row["state"] == "failed" and row["error_class"] == "tool", row
    sent = re.search(r"to the request with id '([^']+)'$", row["error"])
    assert sent is not None, row["error"]
    assert row["error"] == (f"remote agent badid ({peer.url('badid')}) sent a JSON-RPC reply "
                            f"with id 'not-{sent[1]}' to the request with id '{sent[1]}'")
    assert peer.calls["badid"] - before == 1  # not retried
    assert other["state"] == "completed"


@pytest.mark.parametrize(("mode", "expected"), [
    ("badcard", "Failed to validate agent card structure"),
    ("emptycard", "is not valid A2A: name (field is required)"),
    ("unreachable", "Network communication error"),
])
async def test_a_bad_card_stops_start_up_naming_the_agent(tmp_path: Path, peer: A2APeer,
                                                          mode: str, expected: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/x" if mode == "unreachable" else peer.url(mode)
    cfg = make_cfg(tmp_path, RULES, {"desk": {"model": "m", "handoffs": ["billing"]},
                                     "billing": {"a2a": {"url": url, "connect_timeout_s": 2}}})
    with pytest.raises(ConfigError) as err:
        await check_cards(cfg)
    with pytest.raises(ConfigError) as local:
        async with LocalSwarm(cfg):
            pass
    for e in (err.value, local.value):
        ((path, msg),) = e.problems
        assert path == "agents.billing.a2a"
        assert msg.startswith(f"remote A2A agent billing at {url} can't be used: ")
        assert expected in msg


async def test_a_lazy_bad_card_fails_only_the_turns_that_need_it(tmp_path: Path,
                                                                 peer: A2APeer) -> None:
    cfg = desk_cfg(tmp_path, peer, lazy=remote(peer, "badcard", check="lazy"))
    async with LocalSwarm(cfg) as sw:
        bad = await sw.run("lazy: hello")
        good = await sw.run("echo: hello")
    assert bad["state"] == "failed" and bad["error_class"] == "tool"
    assert bad["error"].startswith(f"remote agent lazy ({peer.url('badcard')}) can't be used: ")
    assert good["state"] == "completed"


async def test_cancel_stops_a_remote_turn(tmp_path: Path, peer: A2APeer) -> None:
    cancels = peer.canceled["slow"]
    async with LocalSwarm(desk_cfg(tmp_path, peer)) as sw:
        task_id = await sw.supervisor.submit("slow: forever")
        await asyncio.wait_for(until_remote(sw, task_id, "working"), 10)
        row = await sw.supervisor.cancel(task_id)
        await sw.pool.members["slow"].aclose()
    assert row["state"] == "canceled"
    assert peer.canceled["slow"] == cancels + 1


async def test_remote_turns_are_in_the_task_log(tmp_path: Path, peer: A2APeer) -> None:
    store = MemoryCheckpointer()
    async with LocalSwarm(desk_cfg(tmp_path, peer), store=store) as sw:
        row = await sw.run("echo: log me")
        history = await sw.supervisor.history(row["task_id"])
    assert row["state"] == "completed"
    assert [(h["kind"], h["agent"]) for h in history if h["kind"].startswith("turn")] == [
        ("turn_start", "desk"), ("turn_end", "desk"), ("turn_start", "echo"),
        ("turn_end", "echo")]
    assert history[-1]["summary"] == "turn 1 ends: final"


def test_config_has_a_model_or_a2a_not_both(tmp_path: Path) -> None:
    base: dict[str, Any] = {"desk": {"model": "m", "handoffs": ["r"]}}
    cases = [
        ({"r": {"instructions": "x"}}, [("agents.r", "give a model (an agent run here) or "
                                                     "a2a: {url: ...} (a remote A2A agent)")]),
        ({"r": {"model": "m", "a2a": {"url": "http://h"}}},
         [("agents.r", "give either model (an agent run here) or a2a (a remote A2A agent), "
                       "not both")]),
        ({"r": {"a2a": {"url": "http://h"}, "tools": ["fn"]}},
         [("agents.r.tools", "a remote A2A agent (a2a) runs elsewhere and has no tools here")]),
        ({"r": {"a2a": {"url": "ftp://h"}}},
         [("agents.r.a2a.url", "must be an http:// or https:// URL")]),
        ({"r": {"a2a": {"url": "http://h", "timeout": 3}}},
         [("agents.r.a2a.timeout", "unknown field")]),
    ]
    for agents, problems in cases:
        with pytest.raises(ConfigError) as err:
            make_cfg(tmp_path, RULES, {**base, **agents})
        assert err.value.problems == problems, agents
    cfg = parse_config({"name": "t", "models": {}, "agents": {
        "r": {"a2a": {"url": "http://h", "headers": {"Authorization": "Bearer ${TOKEN}"}}}},
        "supervisor": {"entry": "r"}}, env={"TOKEN": "s3cret"})
    assert cfg.remote_agents() == ["r"]
    headers = cfg.agents["r"].a2a.headers  # type: ignore[union-attr]
    assert headers["Authorization"].get_secret_value() == "Bearer s3cret"
    assert "s3cret" not in repr(cfg)


async def test_a_restart_resends_an_open_remote_turn_with_the_same_ids(tmp_path: Path,
                                                                       peer: A2APeer) -> None:
    store = MemoryCheckpointer()
    cfg = desk_cfg(tmp_path, peer)
    async with LocalSwarm(cfg, store=store) as sw:
        task_id = await sw.supervisor.submit("hold: survive a crash")
        await asyncio.wait_for(until_remote(sw, task_id, "working"), 10)
        await sw.crash()
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        await asyncio.wait_for(until_remote(sw2, task_id, "working"), 10)
        peer.release_hold()
        row = await sw2.supervisor.wait(task_id, 10)
    assert row["state"] == "completed" and row["answer"] == "echo: hold: survive a crash"
    first, again = [m for m in peer.received["hold"] if m.metadata["swarm_task_id"] == task_id]
    assert (again.message_id, again.context_id) == (first.message_id, first.context_id)


async def test_a_restart_does_not_resend_a_finished_remote_turn(tmp_path: Path,
                                                                peer: A2APeer) -> None:
    store = MemoryCheckpointer()
    cfg = desk_cfg(tmp_path, peer)
    async with LocalSwarm(cfg, store=store) as sw:
        row = await sw.run("echo: only once")
    # The store as a crash right after the remote turn ended would leave it: task working.
    task_id, sent = row["task_id"], len(peer.received["echo"])
    persisted = await store.get_task(task_id)
    assert persisted is not None
    task = a2a.loads_task(persisted.data["a2a"])
    task.status.CopyFrom(TaskStatus(state=TaskState.TASK_STATE_WORKING))
    del task.artifacts[:]
    await store.put_task(msgspec.structs.replace(
        persisted, state="working", data={**persisted.data, "a2a": a2a.dumps(task)}))
    async with LocalSwarm(cfg, store=store) as sw2:
        assert await sw2.supervisor.load() == 1
        again = await sw2.supervisor.wait(task_id, 10)
    assert again["state"] == "completed" and again["answer"] == row["answer"]
    assert len(peer.received["echo"]) == sent  # the log said the remote had answered


def test_new_ids_are_random_version_4_uuids_in_hex() -> None:
    import uuid

    from swarm.protocol.a2a import new_id

    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for i in ids:
        u = uuid.UUID(hex=i)
        assert (u.hex, u.version, u.variant) == (i, 4, uuid.RFC_4122)


def test_a_forked_child_makes_ids_of_its_own() -> None:
    # Ids come from a pool of random bytes: a child must not go on from its parent's pool.
    from swarm.protocol.a2a import new_id

    new_id()  # the pool is filled, with bytes left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    mine = new_id()
    assert len(child) == 32 and child != mine
