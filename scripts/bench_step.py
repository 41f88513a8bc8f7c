"""Orchestration overhead per agent step.

One step = one model call (the scripted policy, zero latency) that asks for one `echo` tool call
with a ~200-byte argument, then the tool call, then appending both messages. With the model and
the tool in-process, what's left is the runtime's own cost. The figure is per step as measured
by the step loop's `StepFinished` events, plus throughput with 1, 10 and 100 concurrent tasks.

The same workload is then run through the Serve HTTP path (the scripted engine as a Ray Serve
deployment reached with `OpenAIModel`), which adds HTTP, JSON and Serve routing, as a real model
server would.

    python scripts/bench_step.py                # in-process and HTTP
    python scripts/bench_step.py --no-http      # in-process only, no Ray
    python scripts/bench_step.py --profile      # plus a cProfile of the in-process hot path
    python scripts/bench_step.py --no-http --layers tracing   # each layer set off vs on
    python scripts/bench_step.py --no-http --layers metrics+ledger,tracing+metrics+ledger \
        --levels 10 --rounds 1 --paired 40      # A/B in 40 alternating blocks
    python scripts/bench_step.py --no-http --levels 10 --rounds 1 --parts 100 [--repeat 5]
                                                # the layers' CPU, each part timed apart

`--layers` names optional layers (see LAYERS; comma-separated, `+` joins layers into one
run): the in-process rows are printed without them, then with each, and a summary compares
µs/step.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.config import parse_config
from swarm.events import Event, ModelCalled, StepFinished
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage
from swarm.protocol import a2a
from swarm.runtime.agent import AgentHost, EventBuffer, TurnRequest, build_sources

PAYLOAD = "x" * 190


def policy(steps: int) -> dict[str, Any]:
    """Echo `steps - 1` times, then answer: `steps` model calls per task."""
    return {
        "rules": [
            {
                "when": {"called": {"echo": {"max": steps - 2}}},
                "tool_calls": [{"name": "echo", "arguments": {"text": PAYLOAD}}],
            },
            {"when": {}, "content": "done " + "y" * 190},
        ]
    }


def config(steps: int) -> Any:
    return parse_config(
        {
            "name": "bench",
            "models": {
                "m": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
            },
            "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
            "agents": {"bench": {"model": "m", "tools": ["fn"], "max_steps_per_turn": steps + 1}},
            "supervisor": {"entry": "bench"},
            # The workload repeats one call on purpose: not a stuck agent.
            "stuck": {"same_call": None, "no_progress": None},
        }
    )


class Collector:
    """Keeps each step's duration and the part of it spent inside the model call."""

    def __init__(self) -> None:
        self.durations_ms: list[float] = []
        self.runtime_ms: list[float] = []
        self._model_ms: dict[tuple[str, int], float] = {}

    def clear(self) -> None:
        self.durations_ms.clear()
        self.runtime_ms.clear()
        self._model_ms.clear()

    def __call__(self, batch: list[Event]) -> None:
        for ev in batch:
            if type(ev) is ModelCalled:
                self._model_ms[(ev.task_id, ev.step)] = ev.latency_ms
            elif type(ev) is StepFinished:
                self.durations_ms.append(ev.duration_ms)
                model = self._model_ms.pop((ev.task_id, ev.step), 0.0)
                self.runtime_ms.append(ev.duration_ms - model)


async def run_level(host: AgentHost, concurrency: int, steps: int,
                    tag: str = "") -> tuple[float, int]:
    """Run `concurrency` tasks of `steps` steps at once; return (wall seconds, steps done).
    Task ids are `t{tag}{concurrency}-{i}`: a host with a durable store needs a fresh `tag`
    per call (the same id again would be a resume)."""
    msg = a2a.dumps(a2a.text_message("bench"))

    async def one(i: int) -> int:
        req = TurnRequest(
            task_id=f"t{tag}{concurrency}-{i}", log_id=f"t{tag}{concurrency}-{i}",
            turn_id=f"t{tag}{concurrency}-{i}-turn",
            context_id=f"c{i}",
            message=msg,
            transcript=[],
            step_offset=0,
            max_steps=steps + 1,
        )
        res = await host.run_turn(req)
        assert res.kind == "final", res.error
        return res.steps

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return time.perf_counter() - t0, sum(done)


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


# The Redis URL of `--paired-store redis`: tracing then writes to the Redis trace store, as a
# swarm deployed with a Redis state store does.
_STORE_URL: str | None = None


def _tracing(cfg: Any) -> Any:
    """Tracing as deployed: spans to the trace store (JSONL under a run dir with no Redis)."""
    import tempfile

    from opentelemetry.sdk.trace import TracerProvider

    from swarm.observability.tracing import Tracing, install

    tracing = Tracing.from_config(cfg, _STORE_URL, provider=TracerProvider(),
                                  run_dir=Path(tempfile.mkdtemp(prefix="swarm-bench-")))
    install(tracing)

    def teardown() -> None:
        install(None)
        tracing.shutdown()
        print(f"tracing: {tracing.stats()}")

    return teardown


def _metrics(cfg: Any) -> Any:
    """Metrics as in a Ray actor, summed in memory by the metering layer; the recorder they
    are pushed to every 5 s is an in-memory one here (Ray isn't running in-process)."""
    from swarm.observability.metrics import MemoryRecorder, use_recorder

    before = use_recorder(MemoryRecorder())

    def teardown() -> None:
        use_recorder(before)

    return teardown


def _ledger(cfg: Any) -> Any:
    """The usage ledger: one row per call, written as Parquet under a temporary folder."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="swarm-bench-usage-")
    cfg = cfg.model_copy(update={"usage": cfg.usage.model_copy(update={"dir": folder})})

    def teardown() -> None:
        from swarm.observability.usage import read_usage

        print(f"ledger: {read_usage(folder).num_rows} rows under {folder}")
        shutil.rmtree(folder, ignore_errors=True)

    return cfg, teardown


# Optional layers: name -> setup(cfg) that turns the layer on and returns its teardown, or
# (a changed config, its teardown).
LAYERS: dict[str, Any] = {"tracing": _tracing, "metrics": _metrics, "ledger": _ledger}


async def bench(model: Model, label: str, steps: int, levels: list[int], rounds: int,
                layers: tuple[str, ...] = ()) -> dict[int, float]:
    """Print one table; return µs/step per concurrency level."""
    cfg = config(steps)
    teardowns = []
    for name in layers:
        got = LAYERS[name](cfg)
        if isinstance(got, tuple):
            cfg, got = got
        teardowns.append(got)
    if layers:
        label += " + " + " + ".join(layers)
    result: dict[int, float] = {}
    collector = Collector()
    host = AgentHost(cfg, "bench", model, build_sources(cfg, {"fn"}), EventBuffer(collector))
    await host.start()
    await run_level(host, 4, steps)  # warm up: imports, JIT-free caches, connection pools
    print(f"\n== {label}: {steps} steps per task (1 echo tool call per step, ~200-byte messages)")
    print("step: model call + tool call + bookkeeping, from StepFinished events;")
    print("runtime: the step minus the time inside the model call (the policy or HTTP);")
    print("CPU/step: wall time / steps, all tasks sharing one event loop")
    print("CPU µs/step: this process's CPU time / steps (background threads included)")
    print(f"{'concurrent':>10} {'step p50 µs':>12} {'step p99 µs':>12} {'runtime p50':>12} "
          f"{'runtime p99':>12} {'steps/s':>9} {'µs/step':>8} {'CPU µs/step':>12}")
    for level in levels:
        collector.clear()
        wall, total = 0.0, 0
        cpu0 = time.process_time()
        best = float("inf")  # the least CPU µs/step of one round: the least disturbed one
        for _ in range(rounds):
            c0 = time.process_time()
            w, n = await run_level(host, level, steps)
            best = min(best, (time.process_time() - c0) / n * 1e6)
            wall, total = wall + w, total + n
        cpu = time.process_time() - cpu0
        d, r = collector.durations_ms, collector.runtime_ms
        print(f"{level:>10} {pct(d, 50) * 1e3:>12.0f} {pct(d, 99) * 1e3:>12.0f} "
              f"{pct(r, 50) * 1e3:>12.0f} {pct(r, 99) * 1e3:>12.0f} {total / wall:>9.0f} "
              f"{wall / total * 1e6:>8.0f} {cpu / total * 1e6:>12.0f}")
        result[level] = best
    await host.aclose()
    for teardown in teardowns:
        teardown()
    return result


class CountingModel(Model):
    """The same conversation as `policy(steps)` at a constant cost per call: it decides by the
    number of messages so far instead of matching rules over the whole conversation (the
    scripted policy's scan grows with the task, and would dilute the runtime's own cost)."""

    name = "bench-count"

    def __init__(self, steps: int) -> None:
        self.steps = steps

    async def complete(self, request: ModelRequest) -> ModelResponse:
        results = (len(request.messages) - 2) // 2  # system, user, then (call, result) pairs
        usage = Usage(input_tokens=60 + 70 * results, output_tokens=60)
        if results < self.steps - 1:
            call = ToolCall(id=f"call_{results:05d}", name="echo", arguments=_ECHO_ARGS)
            return ModelResponse(content=None, tool_calls=[call], usage=usage,
                                 finish_reason="tool_calls", model="bench")
        return ModelResponse(content="done " + "y" * 190, tool_calls=[], usage=usage,
                             model="bench")


_ECHO_ARGS = json.dumps({"text": PAYLOAD})


async def _flush_layers(host: AgentHost, ran_s: float) -> None:
    """Do the layers' background work now, so that it is counted to the host that made it:
    span rows to the trace store and metric sums to the recorder at every call (a deployed
    agent does these every 0.5 s and 5 s), and ledger rows to a Parquet file once a second of
    this host's running time (`ran_s`) has passed since its last one, as its writer does at
    turn ends (at most once per `min_gap_s`)."""
    from swarm.observability.metering import MeteringLayer

    for layer in host._loop.middleware if host._loop is not None else ():
        if isinstance(layer, MeteringLayer):
            if layer.sink is not None:
                layer.sink.flush()
            if layer.meter is not None:
                layer.meter.flush()
            ledger = layer.ledger
            if ledger is not None:
                due = getattr(ledger, "_bench_due", 0.0)
                if ran_s >= due:
                    await ledger.flush()
                    ledger._bench_due = ran_s + ledger.min_gap_s  # type: ignore[attr-defined]


async def _layered_host(layers: tuple[str, ...], steps: int, store: Any,
                        teardowns: list[Any]) -> AgentHost:
    """A started host with only the named layers (the process-wide tracing and metrics
    recorder are restored once it has bound them), on `CountingModel`: a constant cost per
    call, so its base is the runtime's own per-step cost. Layer teardowns go to `teardowns`."""
    from swarm.observability import metrics, tracing

    saved = tracing.active(), metrics.use_recorder(None)
    metrics.use_recorder(saved[1])
    cfg = config(steps)
    for name in layers:
        got = LAYERS[name](cfg)
        if isinstance(got, tuple):
            cfg, got = got
        teardowns.append(got)
    host = AgentHost(cfg, "bench", CountingModel(steps), build_sources(cfg, {"fn"}),
                     EventBuffer(Collector()), store=store)
    await host.start()  # the layers are bound here
    tracing.install(saved[0])
    metrics.use_recorder(saved[1])
    return host


async def paired(runs: list[tuple[str, ...]], steps: int, level: int, blocks: int,
                 store: str = "none") -> None:
    """See `_paired`; with `store="redis"`, every host checkpoints each step to a private
    redis-server (the embedded default store of a deployed swarm)."""
    global _STORE_URL
    if store != "redis":
        await _paired(runs, steps, level, blocks, None)
        return
    from scripts.bench.swarm_side import redis_store

    async with redis_store() as (st, server, _run_dir):
        _STORE_URL = server.url
        try:
            await _paired(runs, steps, level, blocks, st)
        finally:
            _STORE_URL = None


async def _paired(runs: list[tuple[str, ...]], steps: int, level: int, blocks: int,
                  store: Any) -> None:
    """A/B in alternating blocks: one host per layer set (and one with none), each block runs
    `level` tasks on every host in turn, starting one host later each block, and then the
    host's layer flushes (their background work), and the overhead is the median over blocks
    of each host's CPU µs/step against the bare host's in the same block, so drifting load
    cancels out.

    Each host gets only its own layers (the process-wide tracing and metrics recorder are
    restored once it is started), and the model is `CountingModel`: a constant cost per call,
    so the base is the runtime's own per-step cost rather than mostly the scripted policy's.
    The overhead is also given from the total CPU over all blocks, which counts the ledger's
    once-a-second Parquet files in full (a median of blocks would skip them)."""

    sets: list[tuple[str, ...]] = [(), *runs]
    hosts: list[AgentHost] = []
    teardowns: list[Any] = []
    for layers in sets:
        host = await _layered_host(layers, steps, store, teardowns)
        await run_level(host, 4, steps, f"w{len(hosts)}-")  # warm up
        await _flush_layers(host, 0.0)
        hosts.append(host)
    cpu: list[list[float]] = [[] for _ in sets]
    ran = [0.0 for _ in sets]
    for block in range(blocks):
        # Each block starts with the next host: no layer set always runs first or right after
        # the same neighbour (the first host of a block measured a few µs a step dearer).
        k = block % len(hosts)
        for i in [*range(k, len(hosts)), *range(k)]:
            host = hosts[i]
            c0 = time.process_time()
            wall, n = await run_level(host, level, steps, f"{i}-{block}-")
            ran[i] += wall
            await _flush_layers(host, ran[i])
            cpu[i].append((time.process_time() - c0) / n * 1e6)
    where = "no state store" if store is None else "a Redis checkpoint every step"
    print(f"\n== paired blocks: {blocks} x {level} tasks x {steps} steps per layer set, "
          f"constant-cost model, {where}, layers flushed in each block")
    print("(median CPU µs/step; added: median over blocks of the difference to no layers; "
          "overhead: median of per-block ratios, and from the total CPU of all blocks)")
    print(f"{'layers':<28} {'µs/step':>8} {'added µs':>9} {'overhead':>9} {'total':>8}")
    for i, layers in enumerate(sets):
        ratio = statistics.median(a / b for a, b in zip(cpu[i], cpu[0], strict=True))
        added = statistics.median(a - b for a, b in zip(cpu[i], cpu[0], strict=True))
        total = sum(cpu[i]) / sum(cpu[0])
        print(f"{' + '.join(layers) or 'none':<28} {statistics.median(cpu[i]):>8.0f} "
              f"{added:>+9.1f} {(ratio - 1) * 100:>+8.1f}% {(total - 1) * 100:>+7.1f}%")
    for host in hosts:
        await host.aclose()
    for teardown in teardowns:
        teardown()


async def parts(steps: int, level: int, blocks: int) -> float:
    """Where the layers' CPU goes, part by part, on a host with a Redis checkpoint every step.

    Each block runs `level` tasks on two bare hosts and on one with tracing, metrics and the
    ledger, in turn (each block starting with the next host); the layered host's background
    work is then done here, one part at a time, each timed with the process's CPU clock: the
    metering layer's drain (calls handed to the trace sink and the ledger, metric sums), the
    trace store write, the metrics push, and (once a second of the host's running time, as its
    writer does) the ledger's Parquet file and Redis totals. The layer's own cost on the step
    path (timing each call and keeping one tuple) is timed apart, around an instant model and
    tool call. Each part is summed over all blocks and divided by all steps. Unlike `--paired`,
    this doesn't rest on the difference of two noisy totals, but it leaves out what the layers
    cost the steps indirectly (memory, caches, the collector). That is in the layered host's
    steps against the bare hosts', printed too, with the two bare hosts' own difference as a
    measure of that comparison's noise, and counted in the last line instead of the timed-apart
    step-path part."""
    from scripts.bench.swarm_side import redis_store
    from swarm.observability.metering import MeteringLayer

    global _STORE_URL
    async with redis_store() as (store, server, _run_dir):
        _STORE_URL = server.url
        teardowns: list[Any] = []
        # Made in this order, the layered host between the two bare ones: a host made earlier
        # measured a few µs a step dearer than an identical one made later.
        bare = await _layered_host((), steps, store, teardowns)
        full = await _layered_host(("tracing", "metrics", "ledger"), steps, store, teardowns)
        bare2 = await _layered_host((), steps, store, teardowns)
        assert full._loop is not None
        layer = next(x for x in full._loop.middleware if isinstance(x, MeteringLayer))
        sink, ledger, meter = layer.sink, layer.ledger, layer.meter
        assert sink is not None and ledger is not None and meter is not None
        hosts = {"bare": bare, "bare2": bare2, "steps": full}
        for i, host in enumerate(hosts.values()):
            await run_level(host, 4, steps, f"w{i}-")  # task ids unique in the shared store
        # From here the background work is done below, part by part, and nothing else does
        # it: no drains on their own, the ledger's writer and the metrics push stopped, the
        # sink's thread asleep (the per-turn spans it would write go with the trace store's
        # part).
        sink.sources.remove(layer.drain)
        ledger.sources.remove(layer.drain)
        meter.samplers.clear()
        sink.interval = 3600.0
        if layer.periodic is not None:
            await layer.periodic.aclose()
        writer, ledger._task = ledger._task, None
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        layer.drain()
        sink.flush()
        await ledger.flush()
        cpu = dict.fromkeys(("bare", "bare2", "steps", "drain", "trace store", "metrics push",
                             "ledger file + totals"), 0.0)
        n_all, ran, due = 0, 0.0, 1.0
        clock = time.process_time
        order = list(hosts)
        for block in range(blocks):
            k = block % len(order)  # the hosts take turns at going first
            for which in order[k:] + order[:k]:
                c0 = clock()
                wall, n = await run_level(hosts[which], level, steps, f"{which}{block}-")
                cpu[which] += clock() - c0
                if which == "steps":
                    n_all, ran = n_all + n, ran + wall
            c0 = clock()
            layer.drain()
            cpu["drain"] += clock() - c0
            c0 = clock()
            sink.flush()
            cpu["trace store"] += clock() - c0
            c0 = clock()
            meter.flush()
            cpu["metrics push"] += clock() - c0
            if ran >= due or block == blocks - 1:
                due = ran + ledger.min_gap_s
                c0 = clock()
                await ledger.flush()  # Parquet in a worker thread: the process clock counts it
                cpu["ledger file + totals"] += clock() - c0
        on_path = await _layer_on_path(layer)
        sink.sources.append(layer.drain)
        for host in hosts.values():
            await host.aclose()
        for teardown in teardowns:
            teardown()
        _STORE_URL = None
    per = {k: v / n_all * 1e6 for k, v in cpu.items()}
    one, two = per.pop("bare"), per.pop("bare2")
    base = (one + two) / 2
    stepping = per.pop("steps")
    background = sum(per.values())
    per = {"on the step path (timed apart)": on_path, **per}
    total = sum(per.values())
    print(f"\n== layer parts: {blocks} blocks x {level} tasks x {steps} steps, a Redis "
          "checkpoint every step; CPU µs per step, summed over all blocks")
    print(f"{'bare hosts (no layers), mean':<34} {base:>7.1f}   "
          f"({one:.1f} and {two:.1f}: {two - one:+.1f} between two identical hosts)")
    print(f"{'host with the layers, steps only':<34} {stepping:>7.1f}   "
          f"({stepping - base:+.1f} against the bare hosts: the step path, direct and "
          "indirect)")
    for name, v in per.items():
        print(f"  {name:<32} {v:>7.1f}   {v / base * 100:5.1f}%")
    print(f"{'the layers, all parts':<34} {total:>7.1f}   {total / base * 100:5.1f}% of the "
          "bare step")
    whole = stepping - base + background
    print(f"{'the layers, with the steps':<34} {whole:>7.1f}   {whole / base * 100:5.1f}% "
          "(the steps against the bare hosts, and the background parts)")
    return whole / base * 100


async def _layer_on_path(layer: Any, calls: int = 20_000) -> float:
    """µs per step the metering layer adds around an instant model call and an instant tool
    call (the rest of the chain left out): the step loop's record of each call, made by the
    functions the loop uses for them (it inlines the common case: a frame less, so this is a
    little more), and the layer's own wrapping where it wraps (content capture, MCP tools);
    the best of 5 rounds, its records dropped."""
    from types import SimpleNamespace

    from swarm.runtime.middleware import ModelCall, ToolInvocation, compose_model, compose_tool
    from swarm.runtime.step import Session, _model_ok, _tool_record
    from swarm.tools.interface import ToolContext, ToolResult

    resp = ModelResponse(content=None, tool_calls=[ToolCall(id="c", name="echo",
                                                            arguments=_ECHO_ARGS)],
                         usage=Usage(input_tokens=100, output_tokens=20),
                         finish_reason="tool_calls", model="bench")
    result = ToolResult("x" * 190)

    async def model(call: Any) -> ModelResponse:
        return resp

    async def tool(inv: Any) -> ToolResult:
        return result

    session = Session("t", "bench", "s", [])
    req = ModelRequest(messages=[], tools=[], session_id="s", agent="bench")
    call = ToolCall(id="c", name="echo", arguments=_ECHO_ARGS)
    entry: Any = SimpleNamespace(source=SimpleNamespace(name="fn"))
    ctx = ToolContext(task_id="t", agent="bench", session_id="s", call_id="c", step=1)
    with_model, with_tool = compose_model([layer], model), compose_tool([layer], tool)
    record = layer.records
    assert record is not None
    # Every record kept (cleared after each round; the bound is kept at turn ends, and there
    # are none here), as a drained layer keeps them.
    best = float("inf")
    for _ in range(5):
        c0 = time.process_time()
        for i in range(calls):
            await model(ModelCall(session, i, "bench", "m", req))
            await tool(ToolInvocation(session, i, 0, "bench", call, entry, {}, ctx))
        bare = time.process_time() - c0
        c0 = time.process_time()
        for i in range(calls):
            mc = ModelCall(session, i, "bench", "m", req)
            n0 = time.time_ns()
            record(_model_ok(session, mc, n0, await with_model(mc)))
            inv = ToolInvocation(session, i, 0, "bench", call, entry, {}, ctx)
            n0 = time.time_ns()
            await with_tool(inv)
            record(_tool_record(inv, n0, "ok", None, None))
        best = min(best, (time.process_time() - c0 - bare) / calls * 1e6)
        layer.pending.clear()
    return best


def profile_inprocess(steps: int) -> None:
    cfg = config(steps)
    from swarm.models.scripted.model import ScriptedModel

    model = ScriptedModel(policy(steps))
    host = AgentHost(cfg, "bench", model, build_sources(cfg, {"fn"}), EventBuffer(Collector()))

    async def go() -> None:
        await host.start()
        await run_level(host, 1, steps)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            await run_level(host, 1, steps)
        prof.disable()
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(18)
        print(f"\n== profile: 20 tasks x {steps} steps, in-process, top functions by own time")
        print("\n".join(out.getvalue().splitlines()[:45]))
        total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]

        def share(*needles: str) -> float:
            own = sum(
                v[2]
                for k, v in st.stats.items()  # type: ignore[attr-defined]
                if any(n in f"{k[0]}:{k[2]}" for n in needles)
            )
            return 100 * own / total

        areas = [
            ("scripted policy (the model stand-in)", ("scripted/",)),
            ("tool call (function tool, thread)",
             ("tools/function", "threading", "thread.py", "concurrent/futures")),
            ("step loop + agent host", ("runtime/step", "runtime/agent", "runtime/toolbox")),
            ("events (msgspec structs)", ("events.py", "msgspec")),
            ("asyncio machinery", ("asyncio/",)),
            ("json", ("json/",)),
        ]
        print("\nown time by area:")
        for label, needles in areas:
            print(f"  {label:<38} {share(*needles):5.1f}%")
        await host.aclose()

    asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=50, help="model calls per task")
    ap.add_argument("--levels", default="1,10,100", help="concurrent tasks, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions per level")
    ap.add_argument("--no-http", action="store_true", help="skip the Serve HTTP path")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the hot path")
    ap.add_argument("--layers", default="",
                    help=f"layer sets to compare with none, comma-separated ({', '.join(LAYERS)}"
                    "; join with + to combine)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --layers: run the base and each layer set this many times, "
                    "alternating, and compare the best CPU µs/step of each (a shared machine "
                    "is noisy); with --parts: run it this many times and print the median of "
                    "the layers' share with the steps")
    ap.add_argument("--python-gc", action="store_true",
                    help="keep Python's garbage-collector settings; by default this process "
                    "gets an agent actor's (process.gc_threshold, gc_freeze)")
    ap.add_argument("--paired-store", choices=("none", "redis"), default="none",
                    help="with --paired: the hosts' state store (redis: a private "
                    "redis-server, a durable checkpoint every step, as deployed)")
    ap.add_argument("--paired", type=int, default=0, metavar="BLOCKS",
                    help="with --layers: also compare in BLOCKS alternating blocks at the last "
                    "--levels value (robust on a busy machine)")
    ap.add_argument("--parts", type=int, default=0, metavar="BLOCKS",
                    help="time each part of the tracing, metrics and ledger work apart, over "
                    "BLOCKS blocks at the last --levels value, with a Redis checkpoint every "
                    "step (see `parts`)")
    args = ap.parse_args()
    runs = [tuple(x.split("+")) for x in args.layers.split(",") if x]
    for run in runs:
        for name in run:
            if name not in LAYERS:
                ap.error(f"--layers: unknown layer {name!r}; known: {', '.join(LAYERS)}")
    if args.steps < 2:
        ap.error("--steps must be at least 2")
    if args.paired < 0 or args.parts < 0:
        ap.error("--paired and --parts take a number of blocks, at least 1 (0: off)")
    levels = [int(x) for x in args.levels.split(",")]
    from swarm.models.scripted.model import ScriptedModel

    gc_note = "Python's GC settings"
    if not args.python_gc:
        from swarm.config import ProcessConfig
        from swarm.runtime.tuning import tune_process

        tune_process(ProcessConfig())
        gc_note = "an agent actor's GC settings"
    print(f"python {sys.version.split()[0]}; in-process scripted model, zero latency; "
          f"{gc_note}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    tried: dict[tuple[str, ...], list[dict[int, float]]] = {(): [], **{run: [] for run in runs}}
    for _ in range(args.repeat if runs else 1):
        for run in tried:
            tried[run].append(asyncio.run(bench(ScriptedModel(policy(args.steps)), "in-process",
                                                args.steps, levels, args.rounds, run)))
    best = {run: {lv: min(r[lv] for r in res) for lv in levels} for run, res in tried.items()}
    base = best[()]
    for run in runs:
        on = best[run]
        print(f"\n== overhead of {' + '.join(run)} (in-process, CPU µs/step of the best "
              f"round of {args.repeat} x {args.rounds}, off -> on)")
        for level in levels:
            print(f"{level:>10} concurrent: {base[level]:>6.0f} -> {on[level]:>6.0f} "
                  f"({(on[level] / base[level] - 1) * 100:+.1f}%)")
    if args.paired:
        if not runs:
            ap.error("--paired needs --layers")
        asyncio.run(paired(runs, args.steps, levels[-1], args.paired, args.paired_store))
    if args.parts:
        shares = [asyncio.run(parts(args.steps, levels[-1], args.parts))
                  for _ in range(args.repeat)]
        if len(shares) > 1:
            print(f"\n== the layers, with the steps, {len(shares)} runs: "
                  f"{' / '.join(f'{x:.1f}%' for x in shares)}; median "
                  f"{statistics.median(shares):.1f}% of the bare step")
    if args.profile:
        profile_inprocess(args.steps)
    if not args.no_http:
        http_path(args.steps, levels, max(1, args.rounds - 1))


def http_path(steps: int, levels: list[int], rounds: int) -> None:
    import socket
    import tempfile

    import ray
    from ray import serve

    from swarm.models.openai import OpenAIModel
    from swarm.models.scripted.serve import build_scripted_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="swarm-bench-"),
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_scripted_app(policy(steps), model_name="m"), name="bench", route_prefix="/bench"
        )
        model = OpenAIModel(base_url=f"http://127.0.0.1:{port}/bench/v1", model="m")
        asyncio.run(
            bench(
                model,
                "Serve HTTP path (scripted engine as a Serve deployment)",
                steps,
                levels,
                rounds,
            )
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
