"""The workloads on swarm: an `AgentHost` (the agent actor's logic, no Ray) with the Redis
checkpointer on a private redis-server, tracing, metrics and the usage ledger on as a deployed
swarm has them, and the same deterministic model and `echo` tool as LangGraph's side; plus the
concurrency workload on the real multi-process shape (a Ray deployment) and in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from scripts.bench.common import (
    ANSWER,
    MODEL_LATENCY_S,
    PAYLOAD,
    TASK_IDEAL_S,
    TOOL_STEPS,
    CpuWindows,
    PeakRss,
    Procs,
    concurrency_row,
    cpu_by_role,
    cpu_delta,
    machine_cpu,
    machine_cpu_split,
    openai_messages_bytes,
    payload,
    pct,
    step_gaps_us,
    sustain,
    sustained_row,
    wants_tool,
)
from swarm.config import SwarmConfig, parse_config
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage
from swarm.protocol import a2a
from swarm.runtime.agent import AgentHost, EventBuffer, TurnRequest, build_sources

_ARGS: list[str] = []


def _args(step: int) -> str:
    """The echo call's JSON arguments for tool call `step` (made once, then looked up)."""
    while len(_ARGS) <= step:
        _ARGS.append(json.dumps({"text": payload(len(_ARGS))}))
    return _ARGS[step]


class EchoModel(Model):
    """The deterministic policy as a swarm `Model`, in-process: one `echo` call per call until
    `steps - 1` results are in, then the answer. `stamps` gets perf_counter at each call."""

    name = "bench-echo"

    def __init__(self, steps: int, latency_s: float = 0.0) -> None:
        self.steps = steps
        self.latency_s = latency_s
        self.stamps: list[float] | None = None
        self.hook: Any = None  # called with the tool results so far (the growth workload)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """One call: a tool call or the answer, decided by the count of results so far."""
        if self.stamps is not None:
            self.stamps.append(time.perf_counter())
        results = (len(request.messages) - 2) // 2  # system, user, then (call, result) pairs
        if self.hook is not None:
            await self.hook(results)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        usage = Usage(input_tokens=60 + 70 * results, output_tokens=60)
        if wants_tool(results, self.steps):
            call = ToolCall(id=f"call_{results:05d}", name="echo",
                            arguments=_args(results))
            return ModelResponse(content=None, tool_calls=[call], usage=usage,
                                 finish_reason="tool_calls", model="bench")
        return ModelResponse(content=ANSWER, tool_calls=[], usage=usage, model="bench")


def bench_config(steps: int, run_dir: Path, state: dict[str, Any] | None = None,
                 **extra: Any) -> SwarmConfig:
    """One agent `bench` with the `echo` function tool; tracing, metrics and the ledger on."""
    return parse_config({
        "name": "bench",
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1",
                         "model": "m"}},
        "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
        "agents": {"bench": {"model": "m", "tools": ["fn"], "max_steps_per_turn": steps + 1}},
        "supervisor": {"entry": "bench"},
        # The workload repeats one call on purpose: not a stuck agent.
        "stuck": {"same_call": None, "no_progress": None},
        "state": {"run_dir": str(run_dir), **(state or {})},
        "usage": {"dir": str(run_dir / "usage")},
        **extra,
    })


def mcp_echo_server() -> Any:
    """An in-process MCP server with the same `echo` tool (read-only, idempotent)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.types import ToolAnnotations

    server = MCPServer("bench", log_level="WARNING")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return server


@contextlib.asynccontextmanager
async def redis_store(fsync_always: bool = False) -> AsyncIterator[tuple[Any, Any, Path]]:
    """A private redis-server (AOF, fsync every second unless `fsync_always`) and a started
    `RedisCheckpointer` on it; yields (store, server, run dir)."""
    import redis as redis_sync

    from swarm.state.embedded import EmbeddedRedis
    from swarm.state.redis import RedisCheckpointer

    run_dir = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    server = EmbeddedRedis(run_dir)
    server.start()
    if fsync_always:
        with redis_sync.Redis.from_url(server.url) as r:
            r.config_set("appendfsync", "always")
    store = RedisCheckpointer(server.url)
    await store.start()
    try:
        yield store, server, run_dir
    finally:
        await store.close()
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def observability(cfg: SwarmConfig, store_url: str, run_dir: Path) -> Any:
    """Tracing into the Redis trace store (as a deployed swarm with a Redis store has it, no
    exporter) and metrics into an in-memory recorder (Ray's isn't there in-process)."""
    from opentelemetry.sdk.trace import TracerProvider

    from swarm.observability.metrics import MemoryRecorder, use_recorder
    from swarm.observability.tracing import Tracing, install

    tracing = Tracing.from_config(cfg, store_url, provider=TracerProvider(), run_dir=run_dir)
    before = install(tracing)
    recorder = use_recorder(MemoryRecorder())
    try:
        yield tracing
    finally:
        use_recorder(recorder)
        install(before)
        tracing.shutdown()


def _request(task: str, steps: int) -> TurnRequest:
    return TurnRequest(task_id=task, context_id=task, message=a2a.dumps(a2a.text_message("bench")),
                       transcript=[], step_offset=0, max_steps=steps + 1, log_id=task,
                       turn_id=f"{task}-turn")


async def _host(steps: int, store: Any, run_dir: Path, tool: str, state: dict[str, Any] | None
                = None) -> tuple[AgentHost, EchoModel, SwarmConfig]:
    from swarm.tools.mcp import MCPToolSource

    cfg = bench_config(steps, run_dir, state)
    model = EchoModel(steps)
    sources = build_sources(cfg, {"fn"}) if tool == "function" else \
        {"fn": MCPToolSource("fn", mcp_echo_server())}
    host = AgentHost(cfg, "bench", model, sources, EventBuffer(), store=store)
    return host, model, cfg


def step_overhead(steps: int, tasks: int, tool: str = "function",
                  fsync_always: bool = False, state: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """`tasks` tasks of `steps` model calls, one at a time, checkpointing every step."""
    return asyncio.run(_step_overhead(steps, tasks, tool, fsync_always, state))


async def _step_overhead(steps: int, tasks: int, tool: str, fsync_always: bool,
                         state: dict[str, Any] | None) -> dict[str, Any]:
    async with redis_store(fsync_always) as (store, server, run_dir):
        host, model, cfg = await _host(steps, store, run_dir, tool, state)
        with observability(cfg, server.url, run_dir) as tracing:
            await host.start()
            res = await host.run_turn(_request("warm", steps))  # imports, caches, connections
            assert res.kind == "final", res.error
            gaps: list[float] = []
            walls: list[float] = []
            for i in range(tasks):
                model.stamps = []
                t0 = time.perf_counter()
                # run_turn returns once the turn's end is durable (and a snapshot in flight is
                # written): the time until the last checkpoint is durable.
                res = await host.run_turn(_request(f"t{i}", steps))
                wall = time.perf_counter() - t0
                assert res.kind == "final" and res.text == ANSWER, (res.kind, res.error)
                assert res.tool_calls == steps - 1
                gaps += step_gaps_us(model.stamps)
                walls.append(wall / steps * 1e6)
            await host.aclose()
            spans = tracing.stats()
    label = "swarm+redis" + (" (MCP tool)" if tool == "mcp" else "") + \
        (" (appendfsync always)" if fsync_always else "") + \
        ("".join(f" ({k}={v})" for k, v in (state or {}).items()))
    return {"impl": label, "steps": steps, "tasks": tasks, "p50_us": pct(gaps, 50),
            "p99_us": pct(gaps, 99), "durable_us_per_step": min(walls),
            "durable_us_per_step_median": pct(walls, 50), "spans": spans}


def growth(marks: list[int]) -> dict[str, Any]:
    """One task up to the last mark; what Redis holds for it (MEMORY USAGE of every key of the
    task: log, ledger, snapshots, tokens, fence) at each mark."""
    return asyncio.run(_growth(marks))


async def _growth(marks: list[int]) -> dict[str, Any]:
    import redis as redis_sync

    steps = max(marks) + 1
    sizes: dict[int, int] = {}
    async with redis_store() as (store, server, run_dir):
        host, model, cfg = await _host(steps, store, run_dir, "function")
        raw = redis_sync.Redis.from_url(server.url)

        def usage() -> dict[str, int]:
            keys = list(raw.scan_iter(match=f"{store.prefix}:t:g:*", count=1000))
            return {k.decode().rsplit(":", 1)[1]: raw.memory_usage(k, samples=0) or 0
                    for k in keys}

        breakdown: dict[str, int] = {}

        async def hook(done: int) -> None:
            if done in marks and done not in sizes:
                await asyncio.sleep(0.05)  # a snapshot due at this step lands in the background
                breakdown.clear()
                breakdown.update(usage())
                sizes[done] = sum(breakdown.values())

        model.hook = hook
        with observability(cfg, server.url, run_dir):
            await host.start()
            res = await host.run_turn(_request("g", steps))
            assert res.kind == "final", res.error
            await host.aclose()
        raw.close()
    return {"impl": "swarm+redis", "breakdown": breakdown, "rows": [
        {"step": m, "stored_bytes": sizes[m], "message_bytes": openai_messages_bytes(m + 1)}
        for m in marks if m in sizes]}


# -- concurrency ----------------------------------------------------------------------------------


def local_concurrency(sessions: int, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """`sessions` tasks at once through a whole swarm in one process (`LocalSwarm`: supervisor
    and agent host, no Ray) with the Redis checkpointer, the model sleeping 200 ms a call."""
    return asyncio.run(_local_concurrency(sessions, state))


async def _local_concurrency(sessions: int, state: dict[str, Any] | None) -> dict[str, Any]:
    from swarm.runtime.tuning import tune_process
    from swarm.testing import LocalSwarm

    async with redis_store() as (store, server, run_dir):
        cfg = bench_config(TOOL_STEPS + 1, run_dir, state,
                           budgets={"task": {"max_wall_s": 3600}})
        procs = Procs([p for p in [server.pid()] if p])
        with observability(cfg, server.url, run_dir):
            sw = LocalSwarm(cfg, store=store)
            # This process stands for a deployed replica: the same process settings.
            tune_process(cfg.process)
            sw.hosts["bench"].model = EchoModel(TOOL_STEPS + 1, MODEL_LATENCY_S)
            async with sw:
                row = await sw.run("warm", timeout=60)
                assert row["state"] == "completed", row
                store_pids = [server.pid()] if server.pid() else []
                base = procs.freeze().rss()
                base_store = procs.rss(store_pids)
                cpu0 = procs.cpu()
                with PeakRss(procs, store=store_pids) as peak:
                    t0 = time.perf_counter()
                    ids = await asyncio.gather(*(sw.supervisor.submit(f"task {i}")
                                                 for i in range(sessions)))
                    rows = await asyncio.gather(*(sw.supervisor.wait(t, 600) for t in ids))
                    wall = time.perf_counter() - t0
                cpu = cpu_delta(cpu0, procs.cpu())
            bad = [r for r in rows if r["state"] != "completed"]
            assert not bad, bad[0]
    label = "".join(f" ({k}={v})" for k, v in (state or {}).items())
    return concurrency_row(f"swarm+redis, one process (LocalSwarm){label}", sessions, wall,
                           sessions * TOOL_STEPS, cpu, peak.peak - base,
                           peak.store_at_peak - base_store, peak, processes=2)


def floor_concurrency(sessions: int, store: bool, behind: bool = False) -> dict[str, Any]:
    """The reference the concurrency target is set against: the same workload with no
    framework, in one process. Each task is a plain coroutine: 11 "model calls" (an
    `asyncio.sleep` of 200 ms), the first 10 answered with one `echo` call whose result goes into
    the task's messages (OpenAI dicts), the last with the answer. With `store`, each step's model
    answer and tool result (two log entries) and the call's ledger record are appended at the
    step's end through swarm's `RedisCheckpointer` on a private redis-server, as swarm's default
    checkpoint policy writes them (one group-committed atomic append per step), and the answer
    too. No supervisor, agent host, events, spans, budgets, audit or Ray: what is left is the
    event loop, the messages, the tool, and (with `store`) the durable checkpoint.

    `behind`: each step's append is sent as the step ends and waited for only before the next
    step's append (or the answer's), so it is written while the next model call sleeps: what
    LangGraph's default durability ("async") does, against swarm's, which makes a step durable
    before its next model call starts. What waiting for each step's checkpoint costs a task."""
    if behind and not store:
        raise ValueError("behind needs store")
    return asyncio.run(_floor_concurrency(sessions, store, behind))


async def _floor_task(store: Any, task_id: str, behind: bool = False) -> None:
    from swarm.examples.tools import echo
    from swarm.state.interface import LedgerRecord, LogEntry

    messages: list[dict[str, Any]] = [{"role": "user", "content": task_id}]
    writing: asyncio.Future[Any] | None = None  # with `behind`: the last step's append
    for step in range(TOOL_STEPS + 1):
        await asyncio.sleep(MODEL_LATENCY_S)
        if writing is not None:
            await writing  # in order: a task's appends are never two at once
            writing = None
        if step == TOOL_STEPS:
            answer = {"role": "assistant", "content": ANSWER}
            messages.append(answer)
            if store is not None:
                await store.append(task_id, [LogEntry(kind="model", step=step,
                                                      data={"message": answer}, ts=time.time())])
            return
        call = {"id": f"call_{step:05d}", "type": "function",
                "function": {"name": "echo", "arguments": _args(step)}}
        asked = {"role": "assistant", "content": None, "tool_calls": [call]}
        messages.append(asked)
        result = str(echo(**json.loads(call["function"]["arguments"])))
        answered = {"role": "tool", "tool_call_id": call["id"], "content": result}
        messages.append(answered)
        if store is not None:
            now = time.time()
            append = store.append(task_id, [
                LogEntry(kind="model", step=step, data={"message": asked}, ts=now),
                LogEntry(kind="tool", step=step, data={"message": answered}, ts=now)],
                [LedgerRecord(key=f"{task_id}:bench:{step}:0", state="finished", tool="echo",
                              result=result, ts=now)])
            if behind:
                writing = asyncio.ensure_future(append)
            else:
                await append


async def _floor_concurrency(sessions: int, with_store: bool, behind: bool = False
                             ) -> dict[str, Any]:
    if not with_store:
        return await _floor_run(sessions, None, [])
    async with redis_store() as (store, server, _run_dir):
        return await _floor_run(sessions, store, [server.pid()] if server.pid() else [],
                                behind)


async def _floor_run(sessions: int, store: Any, store_pids: list[int], behind: bool = False
                     ) -> dict[str, Any]:
    # This process, and redis-server with a store: no other child (a test's pytest has some).
    procs = Procs.of([os.getpid(), *store_pids], forking=store_pids)
    await asyncio.gather(*(_floor_task(store, f"warm {i}", behind) for i in range(10)))
    base = procs.rss()
    base_store = procs.rss(store_pids)
    cpu0 = procs.cpu()
    with PeakRss(procs, store=store_pids) as peak:
        t0 = time.perf_counter()
        await asyncio.gather(*(_floor_task(store, f"task {i}", behind)
                               for i in range(sessions)))
        wall = time.perf_counter() - t0
    cpu = cpu_delta(cpu0, procs.cpu())
    impl = "no framework: asyncio" + (" + Redis checkpoint" if store is not None else "") + (
        " written behind" if behind else "")
    return concurrency_row(impl, sessions, wall, sessions * TOOL_STEPS, cpu, peak.peak - base,
                           peak.store_at_peak - base_store, peak,
                           processes=len(procs.processes()))


def checkpoint_policy(spec: str) -> dict[str, Any]:
    """The `state` settings of a `--ray-checkpoint` value: every_step, every_n:N or phase;
    `:wait` after every_step or every_n:N makes each step wait for its append
    (`state.write_behind: false`) instead of writing it behind, the default."""
    base, wait = (spec[:-len(":wait")], True) if spec.endswith(":wait") else (spec, False)
    name, _, n = base.partition(":")
    out: dict[str, Any] | None = None
    if name in ("every_step", "phase") and not n and not (wait and name == "phase"):
        out = {"checkpoint": name}
    elif name == "every_n" and n.isdigit() and int(n) >= 1:
        out = {"checkpoint": name, "checkpoint_every": int(n)}
    if out is None:
        raise ValueError("checkpoint must be every_step, every_n:N (N >= 1) or phase, the first "
                         f"two optionally with :wait, not {spec!r}")
    if wait:
        out["write_behind"] = False
    return out


# The layers the Ray concurrency workload can turn off (`layers_off`), each a config section.
LAYERS = ("tracing", "metrics", "usage", "audit")


def layers_off(spec: str) -> tuple[str, ...]:
    """The layers a `--ray-layers` value turns off: "on" none, "off" all of `LAYERS`,
    "off:tracing,audit" those named."""
    name, colon, names = spec.partition(":")
    if name == "on" and not colon:
        return ()
    if name == "off" and not colon:
        return LAYERS
    picked = tuple(dict.fromkeys(x.strip() for x in names.split(",")))
    if name == "off" and picked and all(x in LAYERS for x in picked):
        return picked
    raise ValueError(f"layers must be on, off or off:LAYER[,LAYER...] with LAYER one of "
                     f"{', '.join(LAYERS)}, not {spec!r}")


def ray_concurrency(levels: list[int], replicas: int = 2, repeat: int = 1,
                    model: str = "python", layers: bool | str = True,
                    checkpoint: str = "every_step", workload: str = "burst",
                    archive: bool = False) -> list[dict[str, Any]]:
    """The concurrency workload on a local Ray with 2 CPUs: a supervisor actor and `replicas`
    agent actors, the model in-process (200 ms a call) and a Redis store; every level in the
    same deployment, one after the other, each `repeat` times: the row is the run with the
    median share of ideal, and `runs` has every run's share and CPU a step (a single run moves
    by tens of percent on a shared 2-core machine). CPU and memory are summed over the driver,
    Ray's processes (GCS, raylet, workers) and redis-server.

    `model`: "python" is `swarm.examples.models:RepeatTool` (`provider: python`), a model class
    that decides from the turn's last messages, as LangGraph's fake chat model and the step
    workload's `EchoModel` do; "scripted" is the scripted engine, whose rules and templates
    cost more a call (its `called:` condition, its Jinja rendering).

    `layers=False` turns tracing, metrics, the usage ledger and the audit log off in the
    swarm's config (budgets and the durable checkpoints stay): what those layers cost; a
    `layers_off` spec ("off:tracing,audit") turns off only those named: what each costs.

    `checkpoint`: the checkpoint policy (`state.checkpoint`), `every_step` (the default, what
    the targets are for), `every_n:N` (a durable append every N steps) or `phase` (at the
    turn's start and end): what a durable append every step costs at scale; with `:wait`
    (`every_step:wait`), each step waits for its append instead of writing it behind.

    `archive`: with `state.archive` on a directory of the run (`file://`), as README advises
    for a swarm under a steady load: each finished task's log and ledger move from Redis to an
    Arrow segment file in the supervisor's background.

    `workload`: "burst" starts each level's tasks together (the concurrency workload);
    "sustained" keeps that many in flight (`scripts.bench.common.sustain`), its rows giving
    the steady rate over a window and no memory figures."""
    if model not in ("python", "scripted"):
        raise ValueError(f"model must be python or scripted, not {model!r}")
    if workload not in ("burst", "sustained"):
        raise ValueError(f"workload must be burst or sustained, not {workload!r}")
    durability = checkpoint_policy(checkpoint)
    off = layers_off("on" if layers is True else "off" if layers is False else layers)
    import ray

    from swarm.runtime.deploy import NAMESPACE, RAY_SYSTEM_CONFIG, start_swarm
    from swarm.state.embedded import EmbeddedRedis

    run_dir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    server = EmbeddedRedis(run_dir)
    server.start()
    policy = run_dir / "policy.yaml"
    if model == "scripted":
        policy.write_text(json.dumps({"rules": [
            {"when": {"called": {"echo": {"max": TOOL_STEPS - 1}}},
             "tool_calls": [{"name": "echo", "arguments": {"text": PAYLOAD}}]},
            {"when": {}, "content": ANSWER}]}))
    out: list[dict[str, Any]] = []
    os.environ["SWARM_STATE_STORE"] = server.url
    try:
        ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False,
                 log_to_driver=False, _temp_dir=str(run_dir / "ray"),
                 _system_config=dict(RAY_SYSTEM_CONFIG),
                 runtime_env={"env_vars": {"SWARM_STATE_STORE": server.url}})
        from swarm.config import load_config

        cfg_path = run_dir / "bench.yaml"
        cfg_path.write_text(json.dumps({
            "name": "bench",
            "models": {"m": {"provider": "scripted", "policy": str(policy),
                             "transport": "in_process",
                             "latency": {"fixed_ms": MODEL_LATENCY_S * 1000}}}
            if model == "scripted" else
            {"m": {"provider": "python", "factory": "swarm.examples.models:RepeatTool",
                   "options": {"tool": "echo", "arguments": {"text": PAYLOAD},
                               "times": TOOL_STEPS, "answer": ANSWER,
                               "latency_s": MODEL_LATENCY_S}}},
            "tools": {"fn": {"python": ["swarm.examples.tools:echo"]}},
            "agents": {"bench": {"model": "m", "tools": ["fn"], "replicas": replicas,
                                 "max_steps_per_turn": TOOL_STEPS + 2,
                                 "max_sessions": max(levels)}},
            "supervisor": {"entry": "bench"},
            "stuck": {"same_call": None, "no_progress": None},
            "state": {"store": server.url, "run_dir": str(run_dir), **durability,
                      **({"archive": f"file://{run_dir / 'archive'}"} if archive else {})},
            "budgets": {"task": {"max_wall_s": 3600}},
            **{x: {"enabled": False} for x in off},
        }))
        cfg = load_config(cfg_path)
        sup, _ = start_swarm(cfg, deployment="bench")
        store_pids = [p for p in [server.pid()] if p]
        procs = Procs(store_pids)
        asyncio.run(_ray_level(sup, 4, procs, store_pids))  # warm up
        for level in levels:
            runs = [asyncio.run(_ray_level(sup, level, procs, store_pids)
                                if workload == "burst" else _ray_sustained(sup, level, procs))
                    for _ in range(max(repeat, 1))]
            row = first_run_memory(runs)
            if model == "scripted":
                row["impl"] += ", scripted engine"
            if off:
                row["impl"] += ", layers off" if off == LAYERS else f", {' and '.join(off)} off"
                row["layers_off"] = list(off)
            if checkpoint != "every_step":
                row["impl"] += f", checkpoint: {checkpoint}"
            if archive:
                row["impl"] += ", archive on"
            out.append(row | {"replicas": replicas, "model": model, "runs": [
                {"of_ideal": r["of_ideal"], "cpu_us_per_step": r["cpu_us_per_step"],
                 "orchestration_kb_per_session": r.get("orchestration_kb_per_session")}
                for r in runs]})
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        os.environ.pop("SWARM_STATE_STORE", None)
    return out


async def _ray_sustained(sup: Any, sessions: int, procs: Procs) -> dict[str, Any]:
    """`sessions` tasks kept in flight through the supervisor, each group's round one
    `submit_many` and one `wait_many`, as in `_ray_level`."""

    async def run_group(group: int, rnd: int, n: int) -> list[float]:
        ids = await sup.submit_many.remote([f"task {group}.{rnd}.{i}" for i in range(n)])
        rows = await sup.wait_many.remote(ids, 600)
        bad = [r for r in rows if r["state"] != "completed"]
        assert not bad, bad[0]
        return [r["updated"] for r in rows]

    window = await sustain(run_group, sessions, procs)
    return sustained_row("swarm+redis, Ray (supervisor + agent replicas)", sessions, window,
                         processes=len(procs.processes()))


# A level's memory figures: what its sessions grew the processes by.
MEMORY_FIELDS = ("mem_per_session_kb", "store_kb_per_session", "orchestration_kb_per_session",
                 "orchestration_rss_sum_kb_per_session", "peak_kb", "store_peak_kb")


def first_run_memory(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of a level run `len(runs)` times in one deployment, `runs` in the order they
    ran: the run with the median share of ideal, with the memory figures of the first run. A
    later run's growth starts from the high-water mark the runs before it left (the memory
    the processes kept), so it understates what the level's sessions take."""
    first = runs[0]
    row = dict(sorted(runs, key=lambda r: r["of_ideal"])[len(runs) // 2])
    row.update({k: first[k] for k in MEMORY_FIELDS if k in first})
    if len(runs) > 1:
        row["memory_of"] = "the first run"
    return row


async def _ray_level(sup: Any, sessions: int, procs: Procs, store_pids: list[int]
                     ) -> dict[str, Any]:
    base = procs.freeze().rss()
    base_store = procs.rss(store_pids)
    cpu0, machine0 = procs.cpu(), machine_cpu()
    with PeakRss(procs, every_s=0.2, store=store_pids) as peak, CpuWindows(procs) as windows:
        t0, submitted = time.perf_counter(), time.time()
        # As `SwarmClient.submit_many` and `wait_all` do: one call each for the whole batch.
        # (A call per task costs Ray state per pending call in the driver and the supervisor:
        # about 90 KB a session more at 2,000 on the development machine.)
        ids = await sup.submit_many.remote([f"task {i}" for i in range(sessions)])
        rows = await sup.wait_many.remote(ids, 600)
        wall = time.perf_counter() - t0
    cpu1, machine1 = procs.cpu(), machine_cpu()
    cpu = cpu_delta(cpu0, cpu1)
    bad = [r for r in rows if r["state"] != "completed"]
    assert not bad, bad[0]
    timeline = {"cpu_windows": windows.windows,
                "machine_cpu": machine_cpu_split(machine0, machine1),
                "task_end_s": task_ends(rows, submitted)}
    if sessions >= 100:
        timeline["task_ms"] = await _task_times(sup, rows)
    steps = {r.get("steps") for r in rows}
    by_role = {role: round(s / (sessions * TOOL_STEPS) * 1e6, 1)
               for role, s in cpu_by_role(procs, cpu0, cpu1).items()}
    return concurrency_row("swarm+redis, Ray (supervisor + agent replicas)", sessions, wall,
                           sessions * TOOL_STEPS, cpu, peak.peak - base,
                           peak.store_at_peak - base_store, peak,
                           processes=len(procs.processes()), steps_per_task=sorted(
                               s for s in steps if s is not None),
                           cpu_us_per_step_by_process=by_role, timeline=timeline)


def task_ends(rows: list[dict[str, Any]], submitted: float) -> list[float]:
    """When the first, the median and the last task ended (its row's `updated`), in seconds
    after the batch was submitted: the run's wall time is the last one's, so the share of ideal
    is at most 2.2 s over it, however early the others ended."""
    ends = sorted(r["updated"] - submitted for r in rows)
    return [round(ends[0], 3), round(ends[len(ends) // 2], 3), round(ends[-1], 3)] \
        if ends else []


# Where a task's time beyond the ideal 2.2 s went, from its row and its trace spans.
TASK_PARTS = {
    "admission": "submitted until the supervisor starts driving it",
    "dispatch": "until its agent's turn starts (invoke_agent)",
    "turn start": "until its first model call",
    "model calls": "the model calls' time beyond their 200 ms each",
    "between steps": "from each tool result to the next model call (checkpoint, loop)",
    "finish": "from the last answer to the task's end in the supervisor",
    "total": "the task's time beyond the ideal 2.2 s",
}


# How long `_task_times` waits for the sampled tasks' spans: each process writes its spans to
# the trace store every half second or so, so the last tasks' agent spans arrive after the run.
_SPANS_WAIT_S = 10.0


def _complete_spans(spans: list[dict[str, Any]]) -> bool:
    names = [str(s.get("name", "")) for s in spans]
    chats = sum(n.startswith("chat") for n in names)
    tools = sum(n.startswith("execute_tool") for n in names)
    return any(n.startswith("invoke_workflow") for n in names) and \
        any(n.startswith("invoke_agent") for n in names) and chats > 0 and tools >= chats - 1


async def _task_times(sup: Any, rows: list[dict[str, Any]], sample: int = 60
                      ) -> dict[str, list[float]]:
    """p50 and p90 over a sample of tasks (spread over the run's task durations) of each
    part of `TASK_PARTS`, in ms; empty if the tasks have no traces. A sampled task's spans are
    waited for (up to `_SPANS_WAIT_S` in all): taking only the tasks whose spans had all
    arrived would leave out the last ones to end. `left_out` counts the sampled tasks whose
    spans were still incomplete."""
    ranked = sorted(rows, key=lambda r: r["updated"] - r["created"])
    picked = ranked[::max(1, len(ranked) // sample)]
    parts: dict[str, list[float]] = {k: [] for k in TASK_PARTS}
    deadline = time.monotonic() + _SPANS_WAIT_S
    left_out = 0
    for row in picked:
        while True:
            try:
                spans = sorted(await sup.trace.remote(row["task_id"]), key=lambda s: s["start"])
            except Exception:  # no trace store: nothing to break down
                return {}
            complete = _complete_spans(spans)
            if complete or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)  # bounded by the deadline: the spans' next write

        def named(prefix: str, spans: list[dict[str, Any]] = spans) -> list[dict[str, Any]]:
            return [s for s in spans if str(s.get("name", "")).startswith(prefix)]

        flows, agents = named("invoke_workflow"), named("invoke_agent")
        chats, tools = named("chat"), named("execute_tool")
        if not complete:
            left_out += 1
            continue
        flow, agent = flows[0], agents[0]
        parts["admission"].append(flow["start"] - row["created"])
        parts["dispatch"].append(agent["start"] - flow["start"])
        parts["turn start"].append(chats[0]["start"] - agent["start"])
        parts["model calls"].append(sum(c["end"] - c["start"] - MODEL_LATENCY_S for c in chats))
        parts["between steps"].append(sum(chats[i + 1]["start"] - tools[i]["end"]
                                          for i in range(len(chats) - 1)))
        parts["finish"].append(flow["end"] - chats[-1]["end"])
        parts["total"].append(row["updated"] - row["created"] - TASK_IDEAL_S)
    out = {k: [round(pct(v, 50) * 1e3), round(pct(v, 90) * 1e3)]
           for k, v in parts.items() if v}
    if out and left_out:
        out["left_out"] = [left_out, len(picked)]
    return out
