"""The suite's table (printed), its targets and its PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.bench.common import TASK_IDEAL_S

TARGET_P50_US = 800.0
TARGET_VS_LG = {100: 3.0, 500: 7.0}
TARGET_STORED_RATIO = 2.0
TARGET_OF_IDEAL = 0.9
TARGET_MEM_KB = 64.0


def _f(v: Any, fmt: str = ".0f") -> str:
    return "-" if v is None else format(v, fmt)


def table(res: dict[str, Any]) -> str:
    """The results as plain-text tables, with each target's verdict."""
    out: list[str] = []
    steps = [r for r in res.get("step_overhead", []) if "error" not in r]
    if steps:
        out.append("== 1. step overhead: µs per step, durable checkpoint every step, tracing on "
                   "(one task at a time)")
        out.append(f"{'runtime':<40} {'steps':>6} {'p50 µs':>8} {'p99 µs':>8} "
                   f"{'to durable µs/step':>19}")
        for r in steps:
            out.append(f"{r['impl']:<40} {r['steps']:>6} {_f(r['p50_us']):>8} "
                       f"{_f(r['p99_us']):>8} {_f(r['durable_us_per_step']):>19}")
        out.append("")
    growth = res.get("growth", [])
    if growth:
        out.append("== 2. checkpoint growth: bytes stored for one task")
        out.append(f"{'runtime':<22} {'step':>6} {'stored KB':>10} {'messages KB':>12} "
                   f"{'stored/msg':>11} {'bytes/step since last':>22}")
        for g in growth:
            prev = None
            for r in g["rows"]:
                per = "-" if prev is None else \
                    f"{(r['stored_bytes'] - prev['stored_bytes']) / (r['step'] - prev['step']):.0f}"
                out.append(f"{g['impl']:<22} {r['step']:>6} {r['stored_bytes'] / 1024:>10.0f} "
                           f"{r['message_bytes'] / 1024:>12.0f} "
                           f"{r['stored_bytes'] / r['message_bytes']:>10.2f}x {per:>22}")
                prev = r
            if g.get("breakdown"):
                parts = ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in g["breakdown"].items())
                out.append(f"{'':<22} at the last step: {parts}")
        out.append("")
    conc = res.get("concurrency", [])
    if conc:
        out.append("== 3. concurrency: tasks of 10 tool steps + answer, 200 ms per model call "
                   "(ideal: C x 10 / 2.2 steps/s)")
        w, head = _rate_header(conc)
        out.append(f"{head} {'KB/session':>11} {'of it store':>12} {'marginal KB':>12}")
        for r in conc:
            if "error" in r:
                out.append(_failed(r, w))
                continue
            out.append(f"{_rate_cells(r, w)} {r['mem_per_session_kb']:>11.1f} "
                       f"{_kb(r.get('store_kb_per_session')):>12} "
                       f"{_kb(r.get('marginal_kb_per_session')):>12}")
        for r in conc:
            if r.get("cpu_us_per_step_by_process") and r["sessions"] >= 1000:
                out.append(_by_process_line(r))
            if len(r.get("runs", ())) > 1:
                memory = "" if r.get("memory_of") is None else \
                    f" (its memory figures are {r['memory_of']}'s: each later run starts " \
                    "from the memory the runs before it left)"
                out.append(_runs_line(r, memory))
            if r.get("timeline") and r["sessions"] >= 1000:
                out += _timeline(r)
        out.append("(KB/session: peak resident memory during the level less that before it, "
                   "over every process of the run with shared memory (Ray's object store) "
                   "counted once, per session; 'of it store' is "
                   "redis-server's part, the checkpoints it holds in memory, which LangGraph "
                   "keeps in its SQLite file instead; 'marginal KB': what each further session "
                   "costs without the store, the slope of peak memory from the level before)")
        out.append("")
    held = res.get("sustained", [])
    if held:
        out.append("== 5. sustained: C tasks kept in flight, as under a steady load (same tasks "
                   "and ideal as 3; figures over a window of at least 4 task lengths, after 2)")
        w, head = _rate_header(held)
        out.append(f"{head} {'machine busy':>13}")
        for r in held:
            if "error" in r:
                out.append(_failed(r, w))
                continue
            split = (r.get("timeline") or {}).get("machine_cpu") or {}
            busy = "" if not split else f"{1 - split.get('idle', 0) - split.get('iowait', 0):.0%}"
            out.append(f"{_rate_cells(r, w)} {busy:>13}")
        for r in held:
            if r.get("cpu_us_per_step_by_process"):
                out.append(_by_process_line(r))
            if len(r.get("runs", ())) > 1:
                out.append(_runs_line(r))
        out.append("")
    rec = res.get("recovery")
    if rec:
        out.append("== 4. recovery: agent actor killed mid-task (scripts/recovery_scenarios.py "
                   "actor-kill)")
        if "error" in rec:
            out.append(f"failed: {rec['error']}")
        else:
            f = rec["figures"]
            out.append(f"time to resume: median {f.get('recovery_ms_median')} ms, max "
                       f"{f.get('recovery_ms_max')} ms over {len(f.get('recovery_ms_each', []))} "
                       f"kills; steps lost: {rec['steps_lost']}; duplicated tool effects: "
                       f"{rec['duplicated_effects']} ({f.get('repeated_invocations_absorbed')} "
                       "repeated invocations absorbed by the idempotency ledger); checks "
                       f"{'passed' if rec['ok'] else 'FAILED: ' + str(rec['failed_checks'])}")
    found = verdicts(res)
    if found:
        out.append("== targets")
        out.extend(found)
    return "\n".join(out)


def _timeline(r: dict[str, Any]) -> list[str]:
    """Where the run's time went: the machine's CPU, each role's CPU over the run, and a
    task's time beyond the ideal by part (`swarm_side.TASK_PARTS`)."""
    tl, out = r["timeline"], []
    head = f"  {r['impl']} at {r['sessions']}"
    split = tl.get("machine_cpu") or {}
    if split:
        busy = split.get("user", 0) + split.get("nice", 0) + split.get("system", 0) + \
            split.get("irq", 0) + split.get("softirq", 0)
        out.append(f"{head}: the machine's CPU during the run: {busy:.0%} busy, "
                   f"{split.get('idle', 0) + split.get('iowait', 0):.0%} idle, "
                   f"{split.get('steal', 0):.0%} taken by the hypervisor (steal)")
    windows = tl.get("cpu_windows") or []
    if windows:
        roles = [k for k in ("supervisor", "agents", "redis-server") if any(
            k in w for _, w in windows)]
        step = max(1, len(windows) // 12)
        cells = " ".join(f"{t:.1f}s:" + "/".join(f"{w.get(k, 0):.2f}" for k in roles)
                         for t, w in windows[::step])
        out.append(f"{head}: cores busy over the run ({'/'.join(roles)}): {cells}")
    ends = tl.get("task_end_s") or []
    if len(ends) == 3:
        out.append(f"{head}: tasks ended {ends[0]:.2f} s (the first), {ends[1]:.2f} s (the "
                   f"median) and {ends[2]:.2f} s (the last) after submission; undisturbed, "
                   f"each takes {TASK_IDEAL_S:.1f} s, and {TARGET_OF_IDEAL:.0%} of ideal needs "
                   f"the last by {TASK_IDEAL_S / TARGET_OF_IDEAL:.2f} s")
    parts = dict(tl.get("task_ms") or {})
    left_out = parts.pop("left_out", None)
    if parts:
        cells = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in parts.items())
        missing = f" ({left_out[0]} of the {left_out[1]} sampled left out: their spans had " \
            "not all arrived)" if left_out else ""
        out.append(f"{head}: a task's time beyond the ideal, ms p50/p90 over a sample of "
                   f"tasks{missing}: {cells}")
    return out


def _by_process_line(r: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_step_by_process"].items()
                      if v >= 1)
    return f"  {r['impl']} at {r['sessions']}: CPU µs a step by process: {parts}"


def _rate_header(rows: list[dict[str, Any]]) -> tuple[int, str]:
    """The runtime column's width, and the header of the columns the concurrency and sustained
    tables share (runtime, C, steps/s, ideal, of ideal, CPU µs/step)."""
    w = max(46, *(len(r["impl"]) for r in rows))
    return w, (f"{'runtime':<{w}} {'C':>5} {'steps/s':>8} {'ideal':>7} {'of ideal':>9} "
               f"{'CPU µs/step':>12}")


def _rate_cells(r: dict[str, Any], w: int) -> str:
    """A row's cells under `_rate_header`."""
    return (f"{r['impl']:<{w}} {r['sessions']:>5} {r['steps_per_s']:>8.0f} "
            f"{r['ideal_steps_per_s']:>7.0f} {r['of_ideal'] * 100:>8.1f}% "
            f"{_f(r['cpu_us_per_step']):>12}")


def _failed(r: dict[str, Any], w: int) -> str:
    """The line of a row whose measurement failed."""
    return f"{r['impl']:<{w}} {r['sessions']:>5} failed: {r['error'][:60]}"


def _runs_line(r: dict[str, Any], memory: str = "") -> str:
    """Every run of a repeated level, under its median row."""
    runs = ", ".join(f"{x['of_ideal']:.1%} at {_f(x['cpu_us_per_step'])} µs" for x in r["runs"])
    return (f"  {r['impl']} at {r['sessions']}: the median of {len(r['runs'])} runs is "
            f"shown{memory}; all: {runs}")


def _kb(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def cpu_bound(row: dict[str, Any], res: dict[str, Any]) -> str:
    """What the row's CPU a step allows on the machine's cores (one, for a row that runs in one
    process): the share of ideal that the cores, fully busy, would give at that CPU a step,
    and the CPU a step at which they would give the target; '' without the figures."""
    cores = 1 if "one process" in row["impl"] else (res.get("machine") or {}).get("nproc")
    cpu, ideal = row.get("cpu_us_per_step"), row.get("ideal_steps_per_s")
    if not cores or not cpu or not ideal:
        return ""
    most = min(1.0, cores * 1e6 / (cpu * ideal))
    need = cores * 1e6 / (TARGET_OF_IDEAL * ideal)
    busy = f"{cores} busy cores allow" if cores > 1 else "1 busy core allows"
    return (f" (at {cpu:.0f} µs of CPU a step, {busy} at most {most:.0%}; "
            f"{TARGET_OF_IDEAL:.0%} needs at most {need:.0f} µs)")


def verdicts(res: dict[str, Any]) -> list[str]:
    """Targets 1-3 against the figures, one line each."""
    out = []
    steps = [r for r in res.get("step_overhead", []) if "error" not in r]
    sw = {r["steps"]: r for r in steps if r["impl"] == "swarm+redis"}
    lg = {r["steps"]: r for r in steps if r["impl"] == "langgraph+sqlite"}
    if sw:
        worst = max(sw.values(), key=lambda r: r["p50_us"])
        ok = worst["p50_us"] <= TARGET_P50_US
        out.append(f"target p50 <= {TARGET_P50_US:.0f} µs at every length: worst "
                   f"{worst['p50_us']:.0f} µs at {worst['steps']} steps: "
                   f"{'met' if ok else 'MISSED'}")
    for n, want in TARGET_VS_LG.items():
        if n in sw and n in lg:
            for key, what in (("p50_us", "p50"), ("durable_us_per_step", "to durable")):
                ratio = lg[n][key] / sw[n][key]
                out.append(f"target >= {want:g}x lower than LangGraph+SQLite at {n} steps "
                           f"({what}): {ratio:.1f}x: {'met' if ratio >= want else 'MISSED'}")
    for g in res.get("growth", []):
        last = g["rows"][-1]
        ratio = last["stored_bytes"] / last["message_bytes"]
        out.append(f"target stored <= {TARGET_STORED_RATIO:g}x message bytes ({g['impl']}, "
                   f"step {last['step']}): {ratio:.2f}x: "
                   f"{'met' if ratio <= TARGET_STORED_RATIO else 'MISSED'}")
    for r in res.get("concurrency", []):
        if r.get("sessions") == 2000 and r["impl"].startswith("swarm") and "error" not in r \
                and not r.get("layers_off") and "layers off" not in r["impl"] \
                and "checkpoint:" not in r["impl"] and "archive on" not in r["impl"]:
            # The targets are for the default layers, with a durable append every step.
            orch = r.get("marginal_kb_per_session",
                         r.get("orchestration_kb_per_session", r["mem_per_session_kb"]))
            out.append(f"target >= {TARGET_OF_IDEAL:.0%} of ideal at 2,000 ({r['impl']}): "
                       f"{r['of_ideal']:.1%}{cpu_bound(r, res)}: "
                       f"{'met' if r['of_ideal'] >= TARGET_OF_IDEAL else 'MISSED'}")
            how = "each further session (slope from the level before)" \
                if "marginal_kb_per_session" in r else "per session"
            store = "" if "store_kb_per_session" not in r else \
                f"; the level's own growth: {r['orchestration_kb_per_session']:.1f} KB, " \
                f"{r['mem_per_session_kb']:.1f} KB with redis-server's copy of the checkpoints"
            if "orchestration_rss_sum_kb_per_session" in r:
                store += (f"; {r['orchestration_rss_sum_kb_per_session']:.1f} KB with each "
                          "process's RSS summed (shared pages once per process)")
            out.append(f"target <= {TARGET_MEM_KB:.0f} KB of orchestration memory per session "
                       f"at 2,000 ({r['impl']}): {orch:.1f} KB {how}{store}: "
                       f"{'met' if orch <= TARGET_MEM_KB else 'MISSED'}")
    for r in res.get("sustained", []):
        if r.get("sessions") == 2000 and r["impl"].startswith("swarm") and "error" not in r:
            # Not the target's reading (tasks started together, above): the same share of
            # ideal with 2,000 tasks in flight all along, where neither end of a burst counts.
            reached = r["of_ideal"] >= TARGET_OF_IDEAL
            out.append(f"alongside: {TARGET_OF_IDEAL:.0%} of ideal with 2,000 kept in flight "
                       f"({r['impl']}): {r['of_ideal']:.1%}{cpu_bound(r, res)}: "
                       f"{'reached' if reached else 'not reached'} (the target is read on "
                       "tasks started together)")
    return out


def plots(res: dict[str, Any], folder: Path) -> list[Path]:
    """step_overhead.png, growth.png, concurrency.png (whatever the results hold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    steps = [r for r in res.get("step_overhead", []) if "error" not in r]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for impl in dict.fromkeys(r["impl"] for r in steps):
            rows = sorted((r for r in steps if r["impl"] == impl), key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rows], [r["p50_us"] for r in rows], marker="o",
                    label=impl)
        ax.axhline(TARGET_P50_US, ls="--", c="grey", lw=1, label="target 800 µs")
        ax.set(xscale="log", yscale="log", xlabel="steps per task",
               ylabel="p50 µs per step (durable, traced)", title="Step overhead")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        made.append(_save(fig, folder / "step_overhead.png"))
    growth = res.get("growth", [])
    if growth:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for g in growth:
            rows = g["rows"]
            ax.plot([r["step"] for r in rows], [r["stored_bytes"] / r["step"] for r in rows],
                    marker="o", label=f"{g['impl']}: stored / step")
        rows = growth[0]["rows"]
        ax.plot([r["step"] for r in rows], [r["message_bytes"] / r["step"] for r in rows],
                ls="--", c="grey", label="the messages themselves / step")
        ax.set(xscale="log", yscale="log", xlabel="steps so far", ylabel="bytes per step",
               title="Checkpoint growth")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        made.append(_save(fig, folder / "growth.png"))
    conc = [r for r in res.get("concurrency", []) if "error" not in r]
    if conc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in dict.fromkeys(r["impl"] for r in conc):
            rows = sorted((r for r in conc if r["impl"] == impl), key=lambda r: r["sessions"])
            xs = [r["sessions"] for r in rows]
            a1.plot(xs, [r["of_ideal"] * 100 for r in rows], marker="o", label=impl)
            a2.plot(xs, [r["cpu_us_per_step"] for r in rows], marker="o", label=impl)
        a1.axhline(TARGET_OF_IDEAL * 100, ls="--", c="grey", lw=1, label="target 90%")
        a1.set(xscale="log", xlabel="concurrent tasks", ylabel="% of ideal steps/s",
               title="Throughput (2 cores)", ylim=(0, 105))
        a2.set(xscale="log", yscale="log", xlabel="concurrent tasks", ylabel="CPU µs per step",
               title="CPU per step (all processes)")
        for a in (a1, a2):
            a.grid(alpha=0.3, which="both")
        a1.legend(fontsize=7)
        made.append(_save(fig, folder / "concurrency.png"))
    return made


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
