"""Speed, side by side: every workload on swarm and, in the same run, on LangGraph.

Both get the same deterministic model behaviour (one `echo` tool call per model call, then an
answer; ~200-byte messages) and the same `echo` tool. LangGraph runs a two-node graph (model ->
tools -> model ...) over `MessagesState` with LangGraph's prebuilt `ToolNode` and a fake chat
model; its durable saver is SQLite (its Redis saver needs Redis Stack modules). swarm runs its
agent host with the Redis checkpointer on a private redis-server, tracing, metrics and the usage
ledger on. Each measurement runs in a fresh process.

1. step overhead: µs per step, a durable checkpoint every step, at 10, 100, 500 steps per task
   (swarm also 2,000); p50/p99 from consecutive model calls, and the wall time until the last
   checkpoint is durable divided by the steps. swarm also with the tool on an in-process MCP
   server, and with Redis fsyncing every write (as SQLite's WAL does every commit).
2. checkpoint growth: bytes stored for one task at steps 10, 100, 500 (and 2,000 for swarm).
3. concurrency: 10, 100, 1,000, 2,000 tasks at once, each 10 tool steps + answer with 200 ms
   per model call; steps/s against the ideal C x 10 / 2.2, CPU µs per step over every process
   involved, and memory (RSS growth) per session. swarm on a local Ray with 2 CPUs (supervisor
   and two agent replicas; the model a `provider: python` class, or with --ray-model scripted
   the scripted engine) and in one process; LangGraph with AsyncSqliteSaver and without; and
   the reference with no framework: plain asyncio coroutines, with and without swarm's Redis
   checkpointer writing each step, and with each step's write sent while the next model call
   runs (what LangGraph's default "async" durability does).
4. recovery: `scripts/recovery_scenarios.py actor-kill --json` (agent replicas killed mid-task).
5. sustained (only when named: `--only sustained`): the concurrency workload's tasks with
   1,000 and 2,000 kept in flight, as under a
   steady load, instead of started together: 20 groups each run their share, wait for it and
   run it again, a group's share of a task length apart; steps/s over a window of at least
   four task lengths, opened after two once every group has started again, against the same
   ideal, and CPU µs per step in that window. swarm on Ray as in 3, LangGraph with
   AsyncSqliteSaver and without (at 2,000 a round of LangGraph's tasks takes over a minute
   and a half, so its window takes minutes: about 12 minutes in all with --repeat 3).

    pip install -e '.[bench]'
    python scripts/bench_suite.py                      # everything (~15 minutes on 2 cores)
    python scripts/bench_suite.py --only step,growth   # some workloads
    python scripts/bench_suite.py --quick              # smaller levels, a smoke run
    python scripts/bench_suite.py --only concurrency --repeat 5   # each Ray level 5 times
    python scripts/bench_suite.py --only concurrency --ray-model scripted   # the scripted engine
    python scripts/bench_suite.py --only concurrency --ray-layers off   # no tracing, metrics,
                                                       # usage ledger or audit log on Ray
    python scripts/bench_suite.py --only concurrency --ray-layers off:tracing   # one layer off
    python scripts/bench_suite.py --only concurrency --ray-checkpoint phase   # durable at each
                                                       # turn's start and end only (or every_n:5)
    python scripts/bench_suite.py --only concurrency --levels 2000 --sides swarm   # one level,
                                                       # a fresh deployment, swarm alone
    python scripts/bench_suite.py --only sustained --levels 2000   # 2,000 kept in flight
    python scripts/bench_suite.py --only sustained --levels 2000 --ray-archive   # with finished
                                                       # tasks moved to an Arrow archive

Results go to bench-results/<timestamp>/ (results.json, table.txt, *.png).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKLOADS = ("step", "growth", "concurrency", "recovery", "sustained")
DEFAULT_WORKLOADS = WORKLOADS[:4]  # what a run without --only measures
SUSTAINED_LEVELS = [1000, 2000]
STEP_LEVELS = {10: 30, 100: 5, 500: 2, 2000: 1}  # steps per task -> tasks measured
LG_MAX_STEPS = 500  # LangGraph's storage grows with the square of the task length
GROWTH_MARKS = [10, 100, 500, 2000]
CONC_LEVELS = [10, 100, 1000, 2000]
SIDES = {"swarm", "langgraph"}  # which runtimes to measure (--sides)


def one(spec: dict[str, Any]) -> Any:
    """Run one measurement in this process (the child side of `measure`)."""
    what = spec["what"]
    if what.startswith("lg_"):
        from scripts.bench import langgraph_side as side
    else:
        from scripts.bench import swarm_side as side  # type: ignore[no-redef]
    fn = getattr(side, what.split("_", 1)[1])
    return fn(*spec.get("args", []), **spec.get("kwargs", {}))


def measure(what: str, *args: Any, timeout: float = 1800, **kwargs: Any) -> Any:
    """Run `one` in a fresh interpreter; its last stdout line is the JSON result."""
    spec = json.dumps({"what": what, "args": args, "kwargs": kwargs})
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True,
                              text=True, timeout=timeout, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("{", "["))]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    out = json.loads(lines[-1])
    print(f"  {what}{list(args)}{kwargs or ''}: {time.monotonic() - t0:.0f} s", flush=True)
    return out


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    from importlib.metadata import version

    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    pkgs = {}
    for name in ("ray", "redis", "msgspec", "mcp", "opentelemetry-sdk", "langgraph",
                 "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "langchain-core",
                 "aiosqlite"):
        try:
            pkgs[name] = version(name)
        except Exception:
            pkgs[name] = None
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "cpu": cpu,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "loadavg_at_start": [round(x, 2) for x in load], "packages": pkgs,
            "store_server": store_server()}


def store_server() -> str | None:
    """The version line of the server binary the embedded store (and so swarm's side) runs."""
    from swarm.state.embedded import redis_server_binary

    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    except Exception as exc:  # the suite reports it; the workloads then fail with the reason
        return f"unavailable: {exc}"
    return out.stdout.strip() or out.stderr.strip()[:200] or None


def run_step(quick: bool) -> list[dict[str, Any]]:
    levels = {10: 10, 100: 2, 500: 1} if quick else STEP_LEVELS
    rows = []
    for steps, tasks in levels.items():
        rows.append(measure("swarm_step_overhead", steps, tasks))
        if steps <= LG_MAX_STEPS and "langgraph" in SIDES:
            rows.append(measure("lg_step_overhead", steps, tasks))
    for steps, tasks in ((100, 2), (500, 1)) if not quick else ((100, 2),):
        rows.append(measure("swarm_step_overhead", steps, tasks, tool="mcp"))
        rows.append(measure("swarm_step_overhead", steps, tasks, fsync_always=True))
        # The stricter policy: the model's answer and the tool's result each durable at once,
        # two appends per step instead of the default's one.
        rows.append(measure("swarm_step_overhead", steps, tasks,
                            state={"checkpoint": "every_call"}))
    return [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]


def run_growth(quick: bool) -> list[dict[str, Any]]:
    marks = [10, 100] if quick else GROWTH_MARKS
    rows = [measure("swarm_growth", marks)]
    if "langgraph" in SIDES:
        rows.append(measure("lg_growth", [m for m in marks if m <= LG_MAX_STEPS]))
    return rows


def run_concurrency(quick: bool, repeat: int = 1, ray_model: str = "python",
                    levels: list[int] | None = None, ray_layers: str = "on",
                    ray_checkpoint: str = "every_step", ray_archive: bool = False
                    ) -> list[dict[str, Any]]:
    levels = levels or ([10, 100] if quick else CONC_LEVELS)
    rows: list[dict[str, Any]] = []
    ray_rows = measure("swarm_ray_concurrency", levels, timeout=3600, repeat=repeat,
                       model=ray_model, layers=ray_layers, checkpoint=ray_checkpoint,
                       archive=ray_archive)
    rows += ray_rows if isinstance(ray_rows, list) else \
        [{"impl": "swarm+redis, Ray", "sessions": 0, **ray_rows}]
    for c in levels:
        rows.append(measure("swarm_local_concurrency", c) | {"sessions": c})
    for c in levels:  # the reference: no framework, with and without the durable checkpoint,
        # and with each step's checkpoint written while the next model call runs
        for store, behind in ((False, False), (True, False), (True, True)):
            rows.append(measure("swarm_floor_concurrency", c, store, behind=behind)
                        | {"sessions": c})
    for c in levels if "langgraph" in SIDES else ():
        rows.append(measure("lg_concurrency", c, True) | {"sessions": c})
        rows.append(measure("lg_concurrency", c, False) | {"sessions": c})
    for r in rows:
        r.setdefault("impl", "?")
    from scripts.bench.common import marginal_kb

    marginal_kb(rows)
    return rows


def run_sustained(quick: bool, repeat: int = 1, levels: list[int] | None = None,
                  ray_archive: bool = False) -> list[dict[str, Any]]:
    levels = levels or ([10, 100] if quick else SUSTAINED_LEVELS)
    rows: list[dict[str, Any]] = []
    ray_rows = measure("swarm_ray_concurrency", levels, timeout=3600, repeat=repeat,
                       workload="sustained", archive=ray_archive)
    rows += ray_rows if isinstance(ray_rows, list) else \
        [{"impl": "swarm+redis, Ray", "sessions": 0, **ray_rows}]
    for c in levels if "langgraph" in SIDES else ():
        rows.append(measure("lg_sustained", c, True) | {"sessions": c})
        rows.append(measure("lg_sustained", c, False) | {"sessions": c})
    for r in rows:
        r.setdefault("impl", "?")
    return rows


def run_recovery() -> dict[str, Any]:
    script = ROOT / "scripts" / "recovery_scenarios.py"
    proc = subprocess.run([sys.executable, str(script), "actor-kill", "--json"],
                          capture_output=True, text=True, timeout=1200, check=False, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-600:]}"}
    data = json.loads(lines[-1])
    checks = data.get("checks", {})
    return {"ok": data.get("ok"), "figures": data.get("figures", {}), "checks": checks,
            "notes": data.get("notes", []),
            "failed_checks": [k for k, v in checks.items() if not v],
            # Every task took as many steps as an undisturbed run: none lost or redone.
            "steps_lost": 0 if checks.get("steps_as_undisturbed") else "see checks",
            "duplicated_effects": 0 if checks.get("effects_exactly_once") else "see checks"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT_WORKLOADS),
                    help=f"workloads, comma-separated: {', '.join(WORKLOADS)} (default all "
                    "but sustained)")
    ap.add_argument("--quick", action="store_true", help="small levels: a smoke run")
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="runs of each Ray concurrency (and sustained) level; the table "
                    "shows the median run "
                    "and lists them all (default 3)")
    ap.add_argument("--ray-model", choices=("python", "scripted"), default="python",
                    help="the model of the Ray concurrency workload: python, a model class "
                    "deciding from the turn's last messages as LangGraph's fake chat model does "
                    "(swarm.examples.models:RepeatTool), or scripted, the scripted engine "
                    "in-process (rules and templates: more CPU a call)")
    ap.add_argument("--ray-layers", default="on", metavar="on|off|off:LAYER,...",
                    help="the Ray concurrency workload's observability and governance layers: "
                    "on, as a deployed swarm has them (default); off: tracing, metrics, "
                    "the usage ledger and the audit log turned off in its config, to see what "
                    "they cost at scale; or off:LAYER[,LAYER] to turn off only those (tracing, "
                    "metrics, usage, audit), to see what each costs (budgets and durable "
                    "checkpoints stay; no target verdict is printed for these rows)")
    ap.add_argument("--ray-checkpoint", default="every_step", metavar="POLICY",
                    help="the Ray concurrency workload's checkpoint policy: every_step (a "
                    "durable append every step, written behind, the default, what the targets "
                    "are for), every_n:N (every N steps) or phase (at each turn's start and "
                    "end), to see what the per-step durability costs at scale; every_step:wait "
                    "or every_n:N:wait: each step waits for its append (state.write_behind: "
                    "false). No target verdict is printed for other policies")
    ap.add_argument("--ray-archive", action="store_true",
                    help="the Ray concurrency and sustained workloads with state.archive on a "
                    "directory of the run, as README advises for a steady load: each finished "
                    "task moves from Redis to an Arrow file (no target verdict is printed for "
                    "these rows)")
    ap.add_argument("--levels", metavar="C,C,...",
                    help="concurrency levels, comma-separated (default 10,100,1000,2000, and "
                    "1000,2000 for sustained; --quick 10,100). The Ray levels share one "
                    "deployment, one after the other: a single level is measured on a fresh "
                    "one, so its memory figure is the whole cost of its sessions, pools "
                    "included")
    ap.add_argument("--sides", default="swarm,langgraph", metavar="swarm,langgraph",
                    help="the runtimes to measure (default both; swarm alone is minutes "
                    "shorter, with no comparison)")
    ap.add_argument("--out", default="bench-results", help="results folder")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be 1 or more, not {args.repeat}")
    sides = {x.strip() for x in args.sides.split(",") if x.strip()}
    if not sides or not sides <= {"swarm", "langgraph"} or "swarm" not in sides:
        ap.error(f"--sides: swarm, or swarm,langgraph; not {args.sides!r}")
    SIDES.intersection_update(sides)
    from scripts.bench.swarm_side import checkpoint_policy, layers_off

    try:
        checkpoint_policy(args.ray_checkpoint)
    except ValueError as exc:
        ap.error(f"--ray-checkpoint: {exc}")
    try:
        layers_off(args.ray_layers)
    except ValueError as exc:
        ap.error(f"--ray-layers: {exc}")
    levels = None
    if args.levels:
        try:
            levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
        except ValueError:
            ap.error(f"--levels takes whole numbers separated by commas, not {args.levels!r}")
        if not levels or levels[0] < 1 or levels[-1] > 10_000:
            ap.error(f"--levels must be between 1 and 10000, not {args.levels!r}")
    if args.one:
        print(json.dumps(one(json.loads(args.one)), default=str), flush=True)
        return
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        ap.error(f"--only: unknown workload(s) {', '.join(unknown)}; known: "
                 f"{', '.join(WORKLOADS)}")
    try:
        import langgraph  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        sys.exit(f"{exc.name} is missing: install the bench extra (pip install -e '.[bench]')")
    from scripts.bench.report import plots, table

    folder = ROOT / args.out / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    res: dict[str, Any] = {"machine": machine(), "started": time.time(), "quick": args.quick}
    print(f"results: {folder}\nmachine: {json.dumps(res['machine'])}", flush=True)
    if "step" in only:
        res["step_overhead"] = run_step(args.quick)
    if "growth" in only:
        res["growth"] = [g for g in run_growth(args.quick) if "error" not in g]
    if "concurrency" in only:
        res["concurrency"] = run_concurrency(args.quick, 1 if args.quick else args.repeat,
                                             args.ray_model, levels, args.ray_layers,
                                             args.ray_checkpoint, args.ray_archive)
    if "sustained" in only:
        res["sustained"] = run_sustained(args.quick, 1 if args.quick else args.repeat, levels,
                                         args.ray_archive)
    if "recovery" in only:
        print("  recovery: scripts/recovery_scenarios.py actor-kill (~1-2 minutes)", flush=True)
        res["recovery"] = run_recovery()
    res["finished"] = time.time()
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (folder / "results.json").write_text(json.dumps(res, indent=1, default=str))
    text = table(res)
    (folder / "table.txt").write_text(text + "\n")
    made = plots(res, folder)
    print("\n" + text)
    errors = [r for k in ("step_overhead", "concurrency", "sustained") for r in res.get(k, [])
              if "error" in r]
    for r in errors:
        print(f"error: {r.get('impl', '?')}: {r['error']}")
    print(f"\nwrote {folder / 'results.json'}, table.txt, "
          f"{', '.join(p.name for p in made)}")


if __name__ == "__main__":
    main()
