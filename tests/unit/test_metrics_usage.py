"""Metrics and the usage ledger in one process: what the metering layer records per call, the
Parquet ledger and its queries, Redis totals, and one error class everywhere."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from swarm.errors import ConfigError, UserError
from swarm.events import ModelCalled, ToolCalled
from swarm.observability.metrics import MODEL_LATENCY, STEPS, MemoryRecorder, Meter, use_recorder
from swarm.observability.tracing import install
from swarm.observability.usage import (
    UsageLedger,
    parse_since,
    read_usage,
    redis_totals,
    to_table,
    usage_table,
)
from swarm.state.memory import MemoryCheckpointer
from swarm.testing import LocalSwarm
from tests.unit.test_runtime_local import FAILED_TOOL, LOOP_RULES, make_cfg
from tests.unit.test_tracing import Traced

PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "cached_input_per_mtok": 0.3}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for this module (the binary EmbeddedRedis finds)."""
    from swarm.state.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("usage-redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def recorder() -> Iterator[MemoryRecorder]:
    rec = MemoryRecorder()
    before = use_recorder(rec)
    try:
        yield rec
    finally:
        use_recorder(before)


def priced_cfg(tmp_path: Path, rules: list[dict[str, Any]], agents: dict[str, Any],
               **extra: Any) -> Any:
    cfg = make_cfg(tmp_path, rules, agents, usage={"dir": str(tmp_path / "usage")}, **extra)
    m = cfg.models["m"]
    price = m.price.model_validate(PRICE)
    return cfg.model_copy(update={"models": {"m": m.model_copy(update={"price": price})}})


async def test_one_row_and_one_count_per_call(tmp_path: Path, recorder: MemoryRecorder) -> None:
    cfg = priced_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg, store=MemoryCheckpointer()) as sw:
        row = await sw.run("hello", user="ana")
        events = sw.events(row["task_id"])
        sup_meter = sw.supervisor.meter
        assert sup_meter is not None
        await sup_meter.aclose()
    assert row["state"] == "completed"
    models = [e for e in events if isinstance(e, ModelCalled)]
    tools = [e for e in events if isinstance(e, ToolCalled)]
    assert (len(models), len(tools)) == (4, 3)

    table = read_usage(str(tmp_path / "usage")).sort_by([("ts", "ascending")])
    rows = table.to_pylist()
    model_rows = [r for r in rows if r["kind"] == "model"]
    tool_rows = [r for r in rows if r["kind"] == "tool"]
    assert len(model_rows) == 4 and len(tool_rows) == 3
    price = cfg.models["m"].price
    for ev, r in zip(models, sorted(model_rows, key=lambda r: r["step"]), strict=True):
        assert (r["step"], r["input_tokens"], r["output_tokens"], r["cached_tokens"]) == \
            (ev.step, ev.input_tokens, ev.output_tokens, ev.cached_tokens)
        assert r["cost_usd"] == pytest.approx(
            price.cost(ev.input_tokens, ev.output_tokens, ev.cached_tokens))
        assert r["cost_usd"] > 0
        assert (r["task_id"], r["user"], r["swarm"], r["role"], r["model"], r["tool"]) == \
            (row["task_id"], "ana", "t", "looper", "m", None)
        assert (r["outcome"], r["error_class"]) == ("ok", None) and r["latency_ms"] >= 0
    assert {(r["tool"], r["outcome"], r["input_tokens"], r["cost_usd"]) for r in tool_rows} == \
        {("echo", "ok", 0, 0.0)}

    # The same calls, counted in the metrics.
    tags = {"swarm": "t", "agent": "looper"}
    assert recorder.value("swarm_steps", **tags) == 4
    assert recorder.value("swarm_model_calls", outcome="ok", model="m", **tags) == 4
    assert recorder.value("swarm_model_calls", outcome="error", **tags) == 0
    assert recorder.value("swarm_tokens", type="input", **tags) == \
        sum(e.input_tokens for e in models)
    assert recorder.value("swarm_tokens", type="output", **tags) == \
        sum(e.output_tokens for e in models)
    assert recorder.value("swarm_cost_usd", **tags) == pytest.approx(
        sum(r["cost_usd"] for r in model_rows))
    assert recorder.value("swarm_tool_calls", tool="echo", outcome="ok", **tags) == 3
    assert recorder.value("swarm_errors", **tags) == 0
    assert len(recorder.observations("swarm_model_latency_ms", model="m", **tags)) == 4
    # Every journal append was timed: turn start, one per tool step (the echo tool is
    # read-only, so a step's answer and result go as one), the final answer with the turn end.
    assert len(recorder.observations("swarm_checkpoint_latency_ms", **tags)) == 5
    assert recorder.value("swarm_queue_depth", agent="looper") == 0
    assert recorder.value("swarm_sessions", agent="looper") == 0
    # The supervisor's task metrics.
    assert recorder.value("swarm_tasks_finished", swarm="t", state="completed") == 1
    for state in ("active", "input_required", "stuck"):
        assert {"swarm": "t", "state": state} in recorder.series("swarm_tasks")
        assert recorder.value("swarm_tasks", swarm="t", state=state) == 0


async def test_nothing_is_metered_without_a_recorder_or_a_ledger_dir(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        assert sw.supervisor.meter is None
        loop: Any = sw.hosts["looper"]._loop
        assert not any(type(x).__name__ == "MeteringLayer" for x in loop.middleware)
        assert (await sw.run("hi"))["state"] == "completed"
    assert not (tmp_path / "usage").exists()


def _row(ts: float, **kw: Any) -> tuple[Any, ...]:
    r = {"task_id": "t1", "user": "u", "swarm": "s", "role": "a", "kind": "model", "model": "m",
         "tool": None, "step": 1, "input_tokens": 10, "output_tokens": 5, "cached_tokens": 0,
         "cost_usd": 0.5, "latency_ms": 1.0, "outcome": "ok", "error_class": None, **kw}
    return (ts, *r.values())


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def test_files_are_partitioned_by_day_and_filtered_by_since(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "usage"))
    ledger.add(_row(_ts("2026-01-01T23:59:00"), task_id="old"))
    ledger.add(_row(_ts("2026-01-02T00:01:00"), task_id="new1"))
    ledger.add(_row(_ts("2026-01-02T10:00:00"), task_id="new2"))
    assert await ledger.flush() == 3
    await ledger.aclose()
    days = sorted(p.name for p in (tmp_path / "usage").iterdir())
    assert days == ["day=2026-01-01", "day=2026-01-02"]
    for d in days:
        (f,) = (tmp_path / "usage" / d).iterdir()
        assert f.name.startswith("part-") and f.suffix == ".parquet"
    # The day is a hive partition the reader can prune on.
    data = ds.dataset(str(tmp_path / "usage"), format="parquet", partitioning="hive")
    assert "day" in data.schema.names

    def tasks(since: str) -> list[str]:
        when = parse_since(since, now=datetime(2026, 1, 2, 12, tzinfo=UTC))
        return sorted(read_usage(str(tmp_path / "usage"), since=when)["task_id"].to_pylist())

    assert tasks("2026-01-01") == ["new1", "new2", "old"]
    assert tasks("2026-01-02") == ["new1", "new2"]
    assert tasks("2026-01-02T05:00:00Z") == ["new2"]
    assert tasks("12h") == ["new1", "new2"]
    assert tasks("13h") == ["new1", "new2", "old"]
    assert tasks("1d") == ["new1", "new2", "old"]
    assert tasks("30m") == []


async def test_closing_the_ledger_as_a_turn_end_wakes_its_writer_does_not_hang(
        tmp_path: Path) -> None:
    """A turn's end wakes the writer (`kick`) in the same moment the host closes the ledger:
    the writer's wait and the close's cancel land together, which Python 3.11's
    `asyncio.wait_for` turned into a lost cancel and a close that waited forever for the
    writer. The close must return, with the rows written once."""
    for attempt in range(3):
        ledger = UsageLedger(str(tmp_path / f"usage-{attempt}"), flush_interval_s=30)
        ledger.add(_row(time.time()))  # starts the writer
        await asyncio.sleep(0)  # it is waiting for a wake-up now
        ledger.add(_row(time.time(), step=2))
        ledger.kick()
        await asyncio.wait_for(ledger.aclose(), 10)
        assert ledger.rows_written == 2 and ledger.rows == []
        assert read_usage(str(tmp_path / f"usage-{attempt}")).num_rows == 2


class _Rows:
    """A call source whose records are ledger rows already (`UsageLedger.extend_calls`)."""

    def ledger_table(self, records: list[tuple[Any, ...]], costs: list[float]) -> Any:
        return to_table(records)


async def test_a_failed_write_keeps_its_rows_and_calls_for_the_next(tmp_path: Path) -> None:
    loc = tmp_path / "usage"
    loc.write_text("a file where the ledger's folder goes")  # every write fails
    ledger = UsageLedger(str(loc))
    src = _Rows()
    now = time.time()
    ledger.extend_calls(src, [_row(now, task_id="c1"), _row(now, task_id="c2")], [0.5, 0.5])
    ledger.add(_row(now, task_id="r1"))
    ledger.extend_calls(src, [_row(now, task_id="c3")], [0.5])
    assert await ledger.flush() == 0
    assert ledger.rows_dropped == 0
    ledger.add(_row(now, task_id="r2"))  # arrives while the failed batch waits
    loc.unlink()
    assert await ledger.flush() == 5
    await ledger.aclose()
    # Written once each: the failed batch and what came after it, the source's two batches
    # converted together.
    assert sorted(read_usage(str(loc))["task_id"].to_pylist()) == ["c1", "c2", "c3", "r1", "r2"]
    assert ledger.files_written == 1 and ledger.rows_written == 5


def _converted(ledger: UsageLedger) -> None:
    """Wait until the ledger's converter thread has done what was queued on it."""
    if ledger._converter is not None:
        ledger._converter.submit(lambda: None).result(10)


async def test_buffered_records_become_tables_early_and_are_written_once(
        tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "usage"))
    ledger.convert_every = 4
    now, src = time.time(), _Rows()
    ledger.extend_calls(src, [_row(now, task_id=f"a{i}") for i in range(3)], [0.0] * 3)
    ledger.convert_soon()
    _converted(ledger)
    assert ledger.tables == [] and len(ledger.calls) == 1  # under the threshold: records
    ledger.extend_calls(src, [_row(now, task_id=f"b{i}") for i in range(2)], [0.0] * 2)
    ledger.convert_soon()
    _converted(ledger)
    assert ledger.calls == [] and [t.num_rows for t in ledger.tables] == [5]
    ledger.extend_calls(src, [_row(now, task_id=f"c{i}") for i in range(3)], [0.0] * 3)
    assert await ledger.flush() == 8  # tables and records in one file
    await ledger.aclose()
    assert sorted(read_usage(str(tmp_path / "usage"))["task_id"].to_pylist()) == \
        [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(2)] + [f"c{i}" for i in range(3)]
    assert ledger.files_written == 1 and ledger.rows_dropped == 0


async def test_an_early_conversion_that_fails_leaves_the_records_to_the_writer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class _FailsOnce(_Rows):
        calls = 0

        def ledger_table(self, records: list[tuple[Any, ...]], costs: list[float]) -> Any:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("not now")
            return super().ledger_table(records, costs)

    ledger = UsageLedger(str(tmp_path / "usage"))
    ledger.convert_every = 2
    src, now = _FailsOnce(), time.time()
    ledger.extend_calls(src, [_row(now, task_id="x"), _row(now, task_id="y")], [0.0, 0.0])
    ledger.convert_soon()
    _converted(ledger)
    assert "converting 2 call records early failed" in caplog.text
    assert ledger.tables == [] and len(ledger.calls) == 1
    # No second try before the next flush: the writer converts them.
    ledger.extend_calls(src, [_row(now, task_id="z")], [0.0])
    ledger.convert_soon()
    _converted(ledger)
    assert src.calls == 1 and len(ledger.calls) == 2
    assert await ledger.flush() == 3
    await ledger.aclose()
    assert sorted(read_usage(str(tmp_path / "usage"))["task_id"].to_pylist()) == ["x", "y", "z"]


async def test_a_flush_waits_for_a_conversion_under_way_and_close_writes_its_rows(
        tmp_path: Path) -> None:
    converting, go_on = threading.Event(), threading.Event()

    class _Slow(_Rows):
        def ledger_table(self, records: list[tuple[Any, ...]], costs: list[float]) -> Any:
            converting.set()
            assert go_on.wait(10)
            return super().ledger_table(records, costs)

    ledger = UsageLedger(str(tmp_path / "usage"))
    ledger.convert_every = 1
    ledger.extend_calls(_Slow(), [_row(time.time(), task_id="slow")], [0.0])
    ledger.convert_soon()
    assert await asyncio.to_thread(converting.wait, 10)
    flush = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0)  # the flush is waiting for the conversion, in a thread
    assert not flush.done()
    go_on.set()
    assert await asyncio.wait_for(flush, 10) == 1
    # A flush cancelled while it waits holds nothing: the next one goes through.
    converting.clear()
    go_on.clear()
    ledger.extend_calls(_Slow(), [_row(time.time(), task_id="late")], [0.0])
    ledger.convert_soon()
    assert await asyncio.to_thread(converting.wait, 10)
    cancelled = asyncio.ensure_future(ledger.flush())
    await asyncio.sleep(0)
    cancelled.cancel()
    go_on.set()
    await asyncio.wait_for(ledger.aclose(), 10)  # waits for the converter, writes its table
    assert sorted(read_usage(str(tmp_path / "usage"))["task_id"].to_pylist()) == \
        ["late", "slow"]


async def test_a_failed_write_keeps_converted_tables_too(tmp_path: Path) -> None:
    loc = tmp_path / "usage"
    loc.write_text("blocked")
    ledger = UsageLedger(str(loc))
    ledger.convert_every = 1
    ledger.extend_calls(_Rows(), [_row(time.time(), task_id="t")], [0.0])
    ledger.convert_soon()
    _converted(ledger)
    assert [t.num_rows for t in ledger.tables] == [1]
    assert await ledger.flush() == 0 and [t.num_rows for t in ledger.tables] == [1]
    loc.unlink()
    await ledger.aclose()
    assert read_usage(str(loc))["task_id"].to_pylist() == ["t"]


def test_warming_up_converts_a_step_loops_record_and_writes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from swarm.observability.metering import MeteringLayer, _warm_record

    layer = MeteringLayer(make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m"}}), "looper",
                          swarm="s1")
    # The warm-up's record is one `ledger_table` reads as a model call that ran.
    (row,) = layer.ledger_table([_warm_record("m")], [0.0]).to_pylist()
    assert (row["kind"], row["model"], row["outcome"], row["input_tokens"]) == \
        ("model", "m", "ok", 1)
    ledger = UsageLedger(str(tmp_path / "usage"))
    ledger.warm_up(layer, [_warm_record("m")])
    assert "warming up pyarrow failed" not in caplog.text
    assert not (tmp_path / "usage").exists()
    assert ledger.rows_written == 0 and ledger.files_written == 0


async def test_a_ledger_that_cannot_write_keeps_at_most_its_bound(tmp_path: Path) -> None:
    loc = tmp_path / "usage"
    loc.write_text("blocked")
    ledger = UsageLedger(str(loc), max_buffered_rows=3)
    now = time.time()
    ledger.extend_calls(_Rows(), [_row(now, task_id=f"old{i}") for i in range(3)], [0.0] * 3)
    ledger.add(_row(now, task_id="r1"))
    ledger.extend_calls(_Rows(), [_row(now, task_id=f"new{i}") for i in range(2)], [0.0] * 2)
    assert await ledger.flush() == 0
    # The newest three are kept (batches of records whole): the rows and the newer batch.
    assert ledger.rows_dropped == 3
    loc.unlink()
    await ledger.aclose()  # (the full buffer also woke the writer: either may write them)
    assert ledger.rows_written == 3 and ledger.rows_dropped == 3
    assert sorted(read_usage(str(loc))["task_id"].to_pylist()) == ["new0", "new1", "r1"]


async def test_the_ledger_has_the_calls_that_ran_not_the_one_a_budget_stopped(
        tmp_path: Path) -> None:
    # Each task runs five tool steps; its sixth model call is stopped by the budget before it
    # runs (a span marked stopped, no ledger row). Two users in one file.
    loop = {"name": "loop", "when": {}, "tool_calls": [
        {"name": "echo", "arguments": {"text": "n{{ messages | length }}"}}]}
    cfg = priced_cfg(tmp_path, [loop], {"a": {"model": "m", "tools": ["fn"]}},
                     budgets={"task": {"max_tool_calls": 5}, "on_exhausted": "fail"},
                     stuck={"same_call": None, "no_progress": None})
    traced = Traced()
    previous = install(traced.tracing)
    try:
        async with LocalSwarm(cfg) as sw:
            rows = await asyncio.gather(sw.run("go", user="ana"), sw.run("go", user="bo"))
            events = {r["task_id"]: sw.events(r["task_id"]) for r in rows}
        chats = [s for s in traced.spans() if s.name == "chat m"]
    finally:
        install(previous)
        traced.tracing.shutdown()
    assert [r["error_class"] for r in rows] == ["budget", "budget"]
    # Six model calls a task were made, the last stopped before it ran.
    assert len(chats) == 12
    assert sorted(s.attributes.get("swarm.stopped", "") for s in chats) == \
        [""] * 10 + ["failed"] * 2
    table = read_usage(str(tmp_path / "usage"))
    price = cfg.models["m"].price
    for row, user in zip(rows, ("ana", "bo"), strict=True):
        got = [r for r in table.to_pylist() if r["task_id"] == row["task_id"]]
        models = sorted((e for e in events[row["task_id"]] if isinstance(e, ModelCalled)),
                        key=lambda e: e.step)
        assert len(models) == 5
        assert sorted((r["kind"], r["step"]) for r in got) == sorted(
            [("model", e.step) for e in models] + [("tool", e.step) for e in models])
        for r in got:
            assert (r["user"], r["swarm"], r["role"], r["outcome"], r["error_class"]) == \
                (user, "t", "a", "ok", None)
            assert (r["model"], r["tool"]) == (("m", None) if r["kind"] == "model"
                                               else (None, "echo"))
        for e, r in zip(models, sorted((r for r in got if r["kind"] == "model"),
                                       key=lambda r: r["step"]), strict=True):
            assert (r["input_tokens"], r["output_tokens"], r["cached_tokens"]) == \
                (e.input_tokens, e.output_tokens, e.cached_tokens)
            assert r["cost_usd"] == price.cost(e.input_tokens, e.output_tokens,
                                               e.cached_tokens) > 0


def test_each_calls_cost_is_the_price_tables(tmp_path: Path) -> None:
    from swarm.observability.metering import MeteringLayer

    cfg = priced_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    layer = MeteringLayer(cfg, "looper", swarm="t")
    price = cfg.models["m"].price

    def model(outcome: str, tin: int, tout: int, cached: int) -> tuple[Any, ...]:
        return (0, "t1", "t1", "", 1, None, 0, 0, 1, outcome, None, None, None, None, None,
                "m", "m", "stop", 0, tin, tout, cached, False)

    tool = (1, "t1", "t1", "", 1, None, 0, 0, 1, "ok", None, None, None, None, None, "echo",
            "c1", "fn")
    batch = [model("ok", 1000, 200, 300), model("ok", 100, 5, 500), model("ok", 7, 0, -3),
             model("error", 50, 0, 0), model("ok", 0, 0, 0), tool]
    assert layer._costs(batch) == [price.cost(1000, 200, 300), price.cost(100, 5, 500),
                                   price.cost(7, 0, -3), 0.0, 0.0, 0.0]
    assert layer._costs(batch)[1] == pytest.approx((100 * 0.3 + 5 * 15.0) / 1e6)  # all cached
    free = MeteringLayer(make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m"}}), "looper",
                         swarm="t")
    assert free._costs(batch) == [0.0] * 6  # no price table: nothing costs anything


def test_ledger_rows_of_call_records_of_every_kind_and_outcome(tmp_path: Path) -> None:
    from swarm.observability.metering import MeteringLayer

    cfg = priced_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    layer = MeteringLayer(cfg, "looper", swarm="s1")
    t0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z in ns

    def model(step: int, outcome: str = "ok", error: str | None = None,
              user: str = "ana") -> tuple[Any, ...]:
        return (0, "t1", "t1", user, step, None, 0, t0, t0 + 2_500_000, outcome, error, None,
                None, None, None, "m", "m", "stop", 0, 100 * step, 10 * step, step, False)

    def tool(step: int, outcome: str = "ok", error: str | None = None) -> tuple[Any, ...]:
        return (1, "t1", "t1", "", step, None, 0, t0, t0 + 1_000_000, outcome, error, None,
                None, None, None, "echo", "c1", "fn")

    def rows(records: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        got = layer.ledger_table(records, [0.5 if r[0] == 0 else 0.0 for r in records])
        return [(r["kind"], r["model"], r["tool"], r["step"], r["user"], r["input_tokens"],
                 r["output_tokens"], r["cached_tokens"], r["cost_usd"], r["latency_ms"],
                 r["outcome"], r["error_class"], r["swarm"], r["role"], r["ts"].timestamp())
                for r in got.to_pylist()]

    ok1 = ("model", "m", None, 1, "ana", 100, 10, 1, 0.5, 2.5, "ok", None, "s1", "looper",
           1_767_225_600.0025)
    ok2 = ("model", "m", None, 2, "ana", 200, 20, 2, 0.5, 2.5, "ok", None, "s1", "looper",
           1_767_225_600.0025)
    echo = ("tool", None, "echo", 1, None, 0, 0, 0, 0.0, 1.0, "ok", None, "s1", "looper",
            1_767_225_600.001)
    assert rows([model(1), model(2)]) == [ok1, ok2]  # model calls only
    assert rows([tool(1)]) == [echo]  # tool calls only
    failed = ("tool", None, "echo", 1, None, 0, 0, 0, 0.0, 1.0, "error", "tool", "s1",
              "looper", 1_767_225_600.001)
    # Mixed, with a failed tool call, a stopped model call (not a row), a cancelled one (no
    # error class: it didn't fail), and a second user.
    canceled = ("model", "m", None, 4, "ana", 400, 40, 4, 0.5, 2.5, "canceled", None, "s1",
                "looper", 1_767_225_600.0025)
    assert rows([model(1), tool(1, "error", "tool"), model(3, "stopped", "budget"),
                 model(4, "canceled", "model"), model(2, user="bo")]) == \
        [ok1, failed, canceled, (*ok2[:4], "bo", *ok2[5:])]
    assert rows([]) == []


async def test_records_that_cannot_be_converted_are_dropped_not_retried(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "usage"))
    now = time.time()
    ledger.extend_calls(_Rows(), [("not", "a", "ledger", "row")], [0.0])
    ledger.add(_row(now, task_id="good"))
    assert await ledger.flush() == 1
    assert ledger.rows_dropped == 1 and ledger.rows == [] and ledger.calls == []
    assert await ledger.flush() == 0  # nothing kept for a retry that would fail again
    await ledger.aclose()
    assert read_usage(str(tmp_path / "usage"))["task_id"].to_pylist() == ["good"]


def test_since_values_that_mean_nothing_are_errors() -> None:
    for bad in ("yesterday", "24", "-3h", "2026-13-01", ""):
        with pytest.raises(UserError, match="--since"):
            parse_since(bad)
    assert parse_since("2026-01-02T03:00:00+02:00") == datetime(2026, 1, 2, 1, tzinfo=UTC)


async def test_grouping_by_each_key(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "u"))
    now = datetime.now(UTC).timestamp()
    ledger.add(_row(now, user="ana", role="planner", swarm="s1", model="big", cost_usd=1.0))
    ledger.add(_row(now, user="ana", role="writer", swarm="s1", model="small", cost_usd=0.25))
    ledger.add(_row(now, user="bo", role="writer", swarm="s2", model="small", cost_usd=0.5,
                    outcome="error", error_class="model"))
    ledger.add(_row(now, user="bo", role="writer", swarm="s2", kind="tool", model=None,
                    tool="search", input_tokens=0, output_tokens=0, cost_usd=0.0))
    await ledger.aclose()
    loc = str(tmp_path / "u")

    def sums(by: str, swarm: str | None = None) -> dict[str, tuple[Any, ...]]:
        t = usage_table(loc, by, "1h", swarm=swarm)
        assert t.column_names == [by, "model_calls", "tool_calls", "input_tokens",
                                  "output_tokens", "cached_tokens", "cost_usd", "errors"]
        return {r[by]: (r["model_calls"], r["tool_calls"], r["input_tokens"], r["cost_usd"],
                        r["errors"]) for r in t.to_pylist()}

    assert sums("user") == {"ana": (2, 0, 20, 1.25, 0), "bo": (1, 1, 10, 0.5, 1)}
    assert sums("role") == {"planner": (1, 0, 10, 1.0, 0), "writer": (2, 1, 20, 0.75, 1)}
    assert sums("swarm") == {"s1": (2, 0, 20, 1.25, 0), "s2": (1, 1, 10, 0.5, 1)}
    assert sums("model") == {"big": (1, 0, 10, 1.0, 0), "small": (2, 0, 20, 0.75, 1),
                             "-": (0, 1, 0, 0.0, 0)}
    assert sums("role", swarm="s2") == {"writer": (1, 1, 10, 0.5, 1)}
    # Most expensive first.
    assert usage_table(loc, "role", "1h")["role"].to_pylist() == ["planner", "writer"]
    # Nothing recorded yet is an empty table, not an error.
    assert usage_table(str(tmp_path / "nothing"), "user", "1h").num_rows == 0


def test_a_bad_by_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--by must be one of role, user, swarm, model "
                                        r"\(got 'team'\)"):
        usage_table(str(tmp_path), "team", "1h")
    from swarm.cli import app

    res = CliRunner().invoke(app, ["usage", "--by", "team", "--dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "--by must be one of role, user, swarm, model" in res.output


def test_bad_usage_and_metrics_config_name_the_field(tmp_path: Path) -> None:
    for extra, path in (({"usage": {"flush_interval_s": 0}}, "usage.flush_interval_s"),
                        ({"usage": {"dir": ""}}, "usage.dir"),
                        ({"usage": {"dir": "://nowhere"}}, "usage.dir"),
                        ({"usage": {"bogus": 1}}, "usage.bogus"),
                        ({"metrics": {"flush_interval_s": -1}}, "metrics.flush_interval_s"),
                        ({"metrics": {"histogram_cap": 0}}, "metrics.histogram_cap")):
        with pytest.raises(ConfigError) as ei:
            make_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m"}}, **extra)
        assert path in [p for p, _ in ei.value.problems], ei.value.problems


def test_a_histogram_series_pushes_at_most_its_cap_a_flush() -> None:
    rec = MemoryRecorder()
    meter = Meter(rec, histogram_cap=100)
    busy = meter.series(MODEL_LATENCY, "s", "a", "m")
    quiet = meter.series(MODEL_LATENCY, "s", "b", "m")
    busy.samples.extend(float(i) for i in range(2000))
    quiet.samples.extend([3.0, 1.0, 2.0])
    meter.add(STEPS, "s", "a", value=2000)
    meter.flush()
    sample = rec.observations("swarm_model_latency_ms", agent="a")
    # A sample of the busy series' observations, each one once; the quiet one's all, in order.
    assert len(sample) == 100 and len(set(sample)) == 100
    assert set(sample) <= {float(i) for i in range(2000)}
    assert rec.observations("swarm_model_latency_ms", agent="b") == [3.0, 1.0, 2.0]
    assert rec.value("swarm_steps", agent="a") == 2000  # counters are never sampled
    assert busy.samples == []  # the next flush starts afresh
    unlimited = MemoryRecorder()
    every = Meter(unlimited)  # no cap: every observation
    every.series(MODEL_LATENCY, "s", "a", "m").samples.extend(float(i) for i in range(2000))
    every.flush()
    assert unlimited.observations("swarm_model_latency_ms") == [float(i) for i in range(2000)]


async def test_cli_prints_the_table(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "u"))
    now = datetime.now(UTC).timestamp()
    ledger.add(_row(now, role="planner", cost_usd=0.125))
    ledger.add(_row(now, role="writer", cost_usd=0.5))
    await ledger.aclose()
    from swarm.cli import app

    res = CliRunner().invoke(app, ["usage", "--by", "role", "--since", "1h",
                                   "--dir", str(tmp_path / "u")], terminal_width=200)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    writer = next(i for i, x in enumerate(lines) if "writer" in x)
    planner = next(i for i, x in enumerate(lines) if "planner" in x)
    assert writer < planner and "0.5000" in lines[writer] and "0.1250" in lines[planner]
    res = CliRunner().invoke(app, ["usage", "--since", "later", "--dir", str(tmp_path / "u")])
    assert res.exit_code == 2 and "--since" in res.output


async def test_redis_totals_match_the_ledger(tmp_path: Path, redis_url: str,
                                             recorder: MemoryRecorder) -> None:
    from swarm.state.redis import RedisCheckpointer

    prefix = f"t{uuid.uuid4().hex[:10]}"
    store = RedisCheckpointer(redis_url, prefix=prefix)
    await store.start()
    cfg = priced_cfg(tmp_path, LOOP_RULES, {"looper": {"model": "m", "tools": ["fn"]}})
    try:
        async with LocalSwarm(cfg, store=store) as sw:
            for user in ("ana", "bo", "ana"):
                assert (await sw.run("hi", user=user))["state"] == "completed"
    finally:
        await store.close()
    rows = read_usage(str(tmp_path / "usage")).to_pylist()
    assert len(rows) == 21
    by_user = await redis_totals(redis_url, "t", "user", prefix=prefix)
    assert set(by_user) == {"ana", "bo"}
    for user, tot in by_user.items():
        mine = [r for r in rows if r["user"] == user]
        assert tot["model_calls"] == sum(r["kind"] == "model" for r in mine)
        assert tot["tool_calls"] == sum(r["kind"] == "tool" for r in mine)
        assert tot["input_tokens"] == sum(r["input_tokens"] for r in mine)
        assert tot["output_tokens"] == sum(r["output_tokens"] for r in mine)
        assert tot["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in mine))
    (role,) = (await redis_totals(redis_url, "t", "role", prefix=prefix)).values()
    (model,) = (await redis_totals(redis_url, "t", "model", prefix=prefix)).values()
    (swarm,) = (await redis_totals(redis_url, "t", "swarm", prefix=prefix)).values()
    assert role["model_calls"] == model["model_calls"] == swarm["model_calls"] == 12
    assert role["tool_calls"] == swarm["tool_calls"] == 9 and "tool_calls" not in model
    assert swarm["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))


# ---- one error class everywhere -----------------------------------------------------------------


async def test_a_failing_tool_has_one_class_everywhere(tmp_path: Path,
                                                       recorder: MemoryRecorder) -> None:
    rules = [FAILED_TOOL, {"when": {"last_role": "user"},
                           "tool_calls": [{"name": "fail", "arguments": {"message": "no disk"}}]}]
    cfg = priced_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        (ev,) = [e for e in sw.events(row["task_id"]) if isinstance(e, ToolCalled)]
    # The model got the error and answered: the task recovered, and its status says what failed.
    assert row["state"] == "completed" and "no disk" in row["answer"]
    assert (ev.outcome, ev.error_class) == ("error", "tool")
    assert row["errors"] == {"tool": 1}
    (ledger_row,) = [r for r in read_usage(str(tmp_path / "usage")).to_pylist()
                     if r["kind"] == "tool"]
    assert (ledger_row["tool"], ledger_row["outcome"], ledger_row["error_class"]) == \
        ("fail", "error", "tool")
    assert recorder.series("swarm_errors") == [
        {"swarm": "t", "agent": "a", "kind": "tool", "error_class": "tool"}]
    assert recorder.value("swarm_errors", kind="tool", error_class="tool") == 1
    assert recorder.value("swarm_tool_calls", tool="fail", outcome="error") == 1


async def test_a_failing_model_call_has_one_class_everywhere(tmp_path: Path,
                                                             recorder: MemoryRecorder) -> None:
    # No rule matches the second step and there is no default: the scripted model raises.
    rules = [{"when": {"last_role": "user"},
              "tool_calls": [{"name": "echo", "arguments": {"text": "x"}}]}]
    cfg = priced_cfg(tmp_path, rules, {"a": {"model": "m", "tools": ["fn"]}})
    async with LocalSwarm(cfg) as sw:
        row = await sw.run("go")
        failed = [e for e in sw.events(row["task_id"]) if isinstance(e, ModelCalled) and e.error]
        meter = sw.supervisor.meter
        assert meter is not None
        meter.meter.flush()
    assert row["state"] == "failed" and row["error_class"] == "model"
    assert row["errors"] == {"model": 1}
    (ev,) = failed
    assert ev.error_class == "model"
    (bad,) = [r for r in read_usage(str(tmp_path / "usage")).to_pylist()
              if r["outcome"] != "ok"]
    assert (bad["kind"], bad["outcome"], bad["error_class"], bad["step"]) == \
        ("model", "error", "model", ev.step)
    assert bad["cost_usd"] == 0.0
    assert recorder.value("swarm_errors", kind="model", error_class="model") == 1
    # The task that failed because of it is counted with the same class.
    assert recorder.value("swarm_errors", kind="task", error_class="model", agent="a") == 1
    assert recorder.value("swarm_tasks_finished", state="failed", error_class="model") == 1
    assert recorder.value("swarm_model_calls", outcome="error") == 1
    assert recorder.value("swarm_steps", agent="a") == 2


def test_the_grafana_dashboard_uses_exactly_the_exported_metrics() -> None:
    import json
    import re

    from swarm.observability.metrics import SPECS

    path = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "swarm-dashboard.json"
    dash = json.loads(path.read_text())
    suffix = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {f"ray_{s.name}{x}": s for s in SPECS.values() for x in suffix[s.kind]}
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = re.findall(r"\bray_\w+", expr)
            assert names, expr
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not a swarm metric"
                spec = exported[name]
                used.add(spec.name)
                for group in re.findall(r"by \(([^)]*)\)", expr):
                    for label in (x.strip() for x in group.split(",")):
                        assert label in (*spec.tag_keys, "le"), (panel["title"], label)
    # Every metric is on the dashboard.
    assert used == set(SPECS)
