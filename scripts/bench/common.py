"""What both sides of the suite share: the workload's messages, the deterministic model's
decision, figures, and CPU and memory of a set of processes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import psutil

# The echo argument and the final answer: with the JSON around them each message is ~200-300
# bytes, as the issue asks ("about 200 bytes each").
PAYLOAD = "x" * 190
_WORDS = ("the agent asked for a tool call and got back its result with some numbers and names "
          "from records of an order shipped to a customer in another city on a date next week "
          "while the model keeps track of what it has seen so far before it writes the answer "
          "about prices totals items delivery status account balance refund invoice address "
          "support ticket priority team queue").split()
_PAYLOADS: list[str] = []


def payload(step: int) -> str:
    """The echo argument of tool call `step`: 190 characters of words that differ from step to
    step (deterministic), so a transcript compresses about as prose does, not as one repeated
    string would."""
    while len(_PAYLOADS) <= step:
        rnd = random.Random(len(_PAYLOADS))
        text = f"{len(_PAYLOADS)}:"
        while len(text) < 190:
            text += " " + rnd.choice(_WORDS)
        _PAYLOADS.append(text[:190])
    return _PAYLOADS[step]

ANSWER = "done " + "y" * 190
MODEL_LATENCY_S = 0.2  # the concurrency workload's simulated model latency
TOOL_STEPS = 10  # the concurrency workload: 10 tool steps plus a final answer per task
TASK_IDEAL_S = (TOOL_STEPS + 1) * MODEL_LATENCY_S  # an undisturbed task: 2.2 s


def wants_tool(tool_results: int, steps: int) -> bool:
    """The deterministic policy, the same on both sides: call `echo` until `steps - 1` results
    are in, then answer (so a task is `steps` model calls). O(1): it is given the count."""
    return tool_results < steps - 1


def openai_messages_bytes(steps: int) -> int:
    """Bytes of the messages a task of `steps` model calls adds, as OpenAI-format JSON (the
    measure of "the bytes of the messages themselves" on both sides)."""
    call = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_00000", "type": "function",
        "function": {"name": "echo", "arguments": json.dumps({"text": PAYLOAD})}}]}
    result = {"role": "tool", "tool_call_id": "call_00000", "content": PAYLOAD}
    final = {"role": "assistant", "content": ANSWER}
    size = len(json.dumps(call)) + len(json.dumps(result))
    return (steps - 1) * size + len(json.dumps(final))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (inclusive method), or the only value."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def step_gaps_us(stamps: list[float]) -> list[float]:
    """Per-step µs from the times of consecutive model calls of one task: one full cycle of
    model call, tool call and the checkpoints between them."""
    return [(b - a) * 1e6 for a, b in itertools.pairwise(stamps)]


class Procs:
    """CPU seconds and RSS summed over this process, its descendants and extra pids (the
    store's server: its CPU includes the forks it waited for, see `cpu`)."""

    def __init__(self, extra: Iterable[int] = ()) -> None:
        self.me = psutil.Process(os.getpid())
        self.extra = list(extra)
        self.forking = set(self.extra)
        self._known: list[psutil.Process] | None = None
        self._shm_cache: tuple[tuple[int, ...], float,
                               dict[tuple[str, str], tuple[int, str, str]]] | None = None

    @classmethod
    def this_process(cls) -> Procs:
        """This process alone, without its children (a private redis-server, say)."""
        procs = cls()
        procs._known = [procs.me]
        return procs

    @classmethod
    def of(cls, pids: Iterable[int], forking: Iterable[int] = ()) -> Procs:
        """These processes alone; `forking` as the extra pids of the constructor are."""
        procs = cls()
        procs._known = [psutil.Process(pid) for pid in pids]
        procs.forking = set(forking)
        return procs

    def freeze(self) -> Procs:
        """Take the process list once (walking /proc for descendants on every sample costs
        CPU the figures would count); call when every process involved has started."""
        self._known = None
        self._known = self.processes()
        return self

    def processes(self) -> list[psutil.Process]:
        """This process, its descendants (Ray's workers, redis-server) and the extra pids."""
        if self._known is not None:
            return self._known
        out = [self.me, *self.me.children(recursive=True)]
        seen = {p.pid for p in out}
        for pid in self.extra:
            if pid not in seen:
                try:
                    out.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        return out

    def cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) of each process, by pid. A store server's (`forking`)
        includes its children that ended: redis-server rewrites its append-only file in a
        fork once the file has doubled, which the 2,000-session workload does in its second
        run or so, on the same two cores."""
        out = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
                if p.pid in self.forking:
                    out[p.pid] += t.children_user + t.children_system
            except psutil.Error:
                pass
        return out

    def rss(self, only: Iterable[int] | None = None) -> int:
        """Resident bytes of all the processes (or of those among them with a pid in `only`),
        shared memory counted once.

        Summing each process's RSS counts a page of shared memory once per process that maps
        it: on Ray, the object store's pages that the supervisor writes and an agent reads
        count twice, and at 2,000 sessions that summed 7.3 KB a session for 2.5 of them. So on
        Linux each process counts its private and file-backed pages (`RssAnon`, `RssFile` of
        /proc/PID/status), and the shared memory of the files in /dev/shm the processes map
        (Ray's object store) counts once: the pages those files hold (`_shm_files`), or the
        most any one process maps (`RssShmem`) if that is more. Shared memory elsewhere (no
        such file mapped, or one whose size can't be read: its mapping's link in
        /proc/PID/map_files needs root), other platforms, and a subset (`only`) count as
        `rss_sum` does."""
        if only is not None:
            return self.rss_sum(only)
        return self.resident()[0]

    def resident(self) -> tuple[int, int]:
        """All the processes' resident bytes both ways, from one reading of each: with shared
        memory counted once (`rss`) and summed (`rss_sum`)."""
        if not _PROC_STATUS:
            summed = self.rss_sum()
            return summed, summed
        private = shared = largest = 0
        mapping = []
        for p in self.processes():
            kinds = _rss_kinds(p.pid)
            if kinds is None:
                continue
            private += kinds[0] + kinds[1]
            shared += kinds[2]
            largest = max(largest, kinds[2])
            if kinds[2]:
                mapping.append(p.pid)
        summed = private + shared  # RssAnon + RssFile + RssShmem is each process's RSS
        pages = [_file_pages(*where) for where in self._mapped_shm(mapping).values()]
        if not pages or None in pages:
            return summed, summed
        return private + max(largest, sum(p for p in pages if p is not None)), summed

    def _mapped_shm(self, pids: list[int]) -> dict[tuple[str, str], tuple[int, str, str]]:
        """`_shm_files` of these processes, read again when the set of processes with shared
        memory changes or after a second (a Ray worker's maps run to a thousand lines)."""
        now, key = time.monotonic(), tuple(pids)
        cached = self._shm_cache
        if cached is None or cached[0] != key or now - cached[1] > 1.0:
            cached = self._shm_cache = (key, now, _shm_files(pids))
        return cached[2]

    def rss_sum(self, only: Iterable[int] | None = None) -> int:
        """Resident bytes of all the processes (or of those among them with a pid in `only`),
        each process's RSS summed (shared pages once per process that maps them)."""
        keep = None if only is None else set(only)
        total = 0
        for p in self.processes():
            if keep is not None and p.pid not in keep:
                continue
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total


_PROC_STATUS = os.path.exists(f"/proc/{os.getpid()}/status")
_RSS_KINDS = (b"RssAnon:", b"RssFile:", b"RssShmem:")


def _rss_kinds(pid: int) -> tuple[int, int, int] | None:
    """(private, file-backed, shared memory) resident bytes of a process, from
    /proc/PID/status; None if it is gone."""
    found = [0, 0, 0]
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                for i, key in enumerate(_RSS_KINDS):
                    if line.startswith(key):
                        found[i] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return found[0], found[1], found[2]


def _shm_files(pids: Iterable[int]) -> dict[tuple[str, str], tuple[int, str, str]]:
    """The files in /dev/shm that these processes map (Ray's object store is one, unlinked
    once mapped): (device, inode) -> (a pid, the mapping's address range, the path)."""
    found: dict[tuple[str, str], tuple[int, str, str]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except OSError:
            continue
        at = data.find(b" /dev/shm/")
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            fields = data[start: end if end >= 0 else len(data)].decode(errors="replace").split()
            if len(fields) >= 6:  # range, perms, offset, device, inode, path [(deleted)]
                found.setdefault((fields[3], fields[4]), (pid, fields[0], fields[5]))
            at = data.find(b" /dev/shm/", at + 1)
    return found


def _file_pages(pid: int, span: str, path: str) -> int | None:
    """Bytes of memory a file in /dev/shm (tmpfs) holds, its allocated blocks, read through
    the mapping (which reaches an unlinked file too); None if it can't be read."""
    for where in (f"/proc/{pid}/map_files/{span}", path):
        try:
            return os.stat(where).st_blocks * 512
        except OSError:
            continue
    return None


def process_role(proc: psutil.Process) -> str:
    """A short name for one process of a run: a Ray actor's class, Ray's own processes,
    redis-server, or this driver."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    if proc.pid == os.getpid():
        return "driver"
    for needle, role in (("SupervisorActor", "supervisor"), ("AgentActor", "agents"),
                         ("redis-server", "redis-server"), ("valkey-server", "redis-server"),
                         ("gcs_server", "ray gcs"),
                         ("raylet", "ray raylet"), ("DashboardAgent", "ray dashboard agent"),
                         ("dashboard", "ray dashboard"), ("ray::IDLE", "ray idle workers")):
        if needle in cmd:
            return role
    return "other"


def cpu_by_role(procs: Procs, before: dict[int, float], after: dict[int, float]
                ) -> dict[str, float]:
    """`cpu_delta` summed by `process_role`, largest first."""
    roles = {p.pid: process_role(p) for p in procs.processes()}
    out: dict[str, float] = {}
    for pid, v in after.items():
        role = roles.get(pid, "other")
        out[role] = out.get(role, 0.0) + v - before.get(pid, 0.0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `Procs.cpu` readings (processes that appeared count whole;
    those that exited in between are lost, so measure while they live)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


class _Sampler:
    """A thread that calls `_sample` every `every_s` while the `with` block runs, and once
    more at its end."""

    def __init__(self, procs: Procs, every_s: float, name: str) -> None:
        import threading

        self.procs, self.every = procs, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class PeakRss(_Sampler):
    """Samples `Procs.rss` every `every_s` from a thread; keeps the peak, and the store's part
    of the total at that peak (`store`: the pids of the durable store's processes). The same
    for `Procs.rss_sum` (`*_sum`), the first sample of each kept as its base."""

    def __init__(self, procs: Procs, every_s: float = 0.1, store: Iterable[int] = ()) -> None:
        super().__init__(procs, every_s, "bench-rss")
        self.store_pids = list(store)
        self.peak = self.store_at_peak = 0
        self.peak_sum = self.store_at_peak_sum = 0
        self.base_sum: int | None = None
        self.store_base = 0

    def __enter__(self) -> Any:
        self._sample()  # the bases: taken before the block's work starts
        return super().__enter__()

    def _sample(self) -> None:
        total, summed = self.procs.resident()
        store = self.procs.rss(self.store_pids) if self.store_pids else 0
        if self.base_sum is None:
            self.base_sum, self.store_base = summed, store
        if total > self.peak:
            self.peak, self.store_at_peak = total, store
        if summed > self.peak_sum:
            self.peak_sum, self.store_at_peak_sum = summed, store

    def orchestration_sum(self) -> int:
        """Growth of `Procs.rss_sum` from the first sample to its peak, less the store's."""
        return (self.peak_sum - (self.base_sum or 0)) - (self.store_at_peak_sum - self.store_base)


class CpuWindows(_Sampler):
    """CPU of each role (`process_role`) in windows of `every_s`, read by a thread with
    `Procs.cpu`: when in a run each process was busy (the supervisor at the start, say, the
    agents between)."""

    def __init__(self, procs: Procs, every_s: float = 0.25) -> None:
        super().__init__(procs, every_s, "bench-cpu")
        self.roles = {p.pid: process_role(p) for p in procs.processes()}
        self.windows: list[tuple[float, dict[str, float]]] = []
        self._t0: float | None = None
        self._prev: tuple[float, dict[int, float]] = (0.0, {})

    def _sample(self) -> None:
        cpu, t = self.procs.cpu(), time.perf_counter()
        if self._t0 is None:  # the first reading: where the windows start
            self._t0, self._prev = t, (t, cpu)
            return
        prev_t, prev = self._prev
        if t - prev_t <= 0:
            return
        by_role: dict[str, float] = {}
        for pid, v in cpu.items():
            role = self.roles.get(pid, "other")
            by_role[role] = by_role.get(role, 0.0) + (v - prev.get(pid, v)) / (t - prev_t)
        self.windows.append((round(t - self._t0, 2),
                             {k: round(v, 2) for k, v in by_role.items()}))
        self._prev = (t, cpu)


# The machine's CPU time by kind (psutil.cpu_times; the Linux ones).
CPU_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> dict[str, float]:
    """The machine's CPU seconds by kind since boot (`CPU_KINDS` the platform has); see
    `machine_cpu_split`."""
    times = psutil.cpu_times()
    return {k: getattr(times, k) for k in CPU_KINDS if hasattr(times, k)}


def machine_cpu_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Shares of the machine's CPU time between two `machine_cpu` readings: how much the run's
    processes got (user, nice, system), how much stayed idle, and how much the hypervisor kept
    (steal)."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in before if k in after}
    total = sum(d.values()) or 1
    return {k: round(v / total, 3) for k, v in d.items()}


def now() -> float:
    """perf_counter, named for readability."""
    return time.perf_counter()


def concurrency_row(impl: str, sessions: int, wall_s: float, steps: int, cpu_s: float,
                    rss_delta: int, store_delta: int | None = None,
                    peak: PeakRss | None = None, **extra: Any) -> dict[str, Any]:
    """Figures of one concurrency run, against the ideal of C x 10 / 2.2 steps/s.
    `store_delta` is the durable store's own part of `rss_delta` (redis-server holds every
    checkpoint in memory), reported apart as well. With `peak`, the absolute peak (and the
    store's part of it) is kept too, for the slope between levels (`marginal_kb`)."""
    ideal = sessions * TOOL_STEPS / TASK_IDEAL_S
    achieved = steps / wall_s
    return {"impl": impl, "sessions": sessions, "wall_s": wall_s, "steps": steps,
            "steps_per_s": achieved, "ideal_steps_per_s": ideal,
            "of_ideal": achieved / ideal, "cpu_us_per_step": cpu_s / steps * 1e6,
            "cpu_s": cpu_s, "mem_per_session_kb": rss_delta / sessions / 1024,
            **({} if store_delta is None else {
                "store_kb_per_session": store_delta / sessions / 1024,
                "orchestration_kb_per_session": (rss_delta - store_delta) / sessions / 1024}),
            **({} if peak is None else {
                "peak_kb": peak.peak / 1024, "store_peak_kb": peak.store_at_peak / 1024,
                # The same growth with each process's RSS summed (shared pages counted once
                # per process that maps them): the measure before `Procs.rss` counted them once.
                **({} if store_delta is None else {
                    "orchestration_rss_sum_kb_per_session":
                        peak.orchestration_sum() / sessions / 1024})}),
            **extra}


# The sustained workload (`--only sustained`): `sessions` tasks kept in flight, as a service
# under steady load has them, instead of started together. `SUSTAIN_GROUPS` groups each start
# their share of the tasks, wait for all of it and start as many again; the groups start a
# group's share of a task length apart, so tasks end (and new ones start) all the time rather
# than in waves. The figures are over a window that opens once `SUSTAIN_WARMUP` task lengths
# have passed and every group has started again, and closes once `SUSTAIN_WINDOW` task
# lengths have passed and every group has ended two more rounds (a runtime slower than the
# ideal gets a longer window): the tasks that ended in it, and the CPU used during it.
SUSTAIN_GROUPS = 20
SUSTAIN_WARMUP = 2
SUSTAIN_WINDOW = 4


async def sustain(run_group: Callable[[int, int, int], Awaitable[list[float]]], sessions: int,
                  procs: Procs, *, task_s: float = TASK_IDEAL_S, groups: int = SUSTAIN_GROUPS,
                  warmup: float = SUSTAIN_WARMUP, window: float = SUSTAIN_WINDOW
                  ) -> dict[str, Any]:
    """Keep `sessions` tasks in flight: `run_group(group, round, n)` runs `n` tasks and returns
    when each ended (`time.time()`). Returns the window (`window_s`, from its opening reading
    to its closing one), the tasks that ended in it, the CPU `procs` used in it, the machine's
    CPU split, the CPU by process role (`cpu_by_role`) and how many rounds each group ran. Once
    the window has closed the groups start no more rounds; the rounds then running are waited
    for."""
    groups = max(1, min(groups, sessions))
    shares = [sessions // groups + (1 if g < sessions % groups else 0) for g in range(groups)]
    start = time.time() + 0.05
    ends: list[float] = []
    rounds = [0] * groups
    progress = asyncio.Event()  # set whenever a group ends a round
    closed = False
    marks: dict[str, tuple[float, dict[int, float], dict[str, float]]] = {}

    async def group(g: int) -> None:
        await asyncio.sleep(max(0.0, start + g * task_s / groups - time.time()))
        while not closed:
            ends.extend(await run_group(g, rounds[g], shares[g]))
            rounds[g] += 1
            progress.set()

    async def until(done: Callable[[], bool]) -> None:
        while not done():
            progress.clear()
            await progress.wait()

    def reading() -> tuple[float, dict[int, float], dict[str, float]]:
        return time.time(), procs.cpu(), machine_cpu()

    async def control() -> None:
        nonlocal closed
        await asyncio.sleep(max(0.0, start + warmup * task_s - time.time()))
        await until(lambda: min(rounds) >= 1)
        marks["from"], opened = reading(), list(rounds)
        await asyncio.sleep(window * task_s)
        await until(lambda: all(r - o >= 2 for r, o in zip(rounds, opened, strict=True)))
        marks["to"], closed = reading(), True

    await asyncio.gather(control(), *(group(g) for g in range(groups)))
    (t0, cpu0, m0), (t1, cpu1, m1) = marks["from"], marks["to"]
    return {"window_s": t1 - t0, "tasks": sum(1 for e in ends if t0 <= e <= t1),
            "cpu_s": cpu_delta(cpu0, cpu1), "cpu_by_role": cpu_by_role(procs, cpu0, cpu1),
            "machine_cpu": machine_cpu_split(m0, m1), "groups": groups, "rounds": rounds}


def sustained_row(impl: str, sessions: int, window: dict[str, Any], **extra: Any
                  ) -> dict[str, Any]:
    """Figures of one sustained run (`sustain`'s window), against the same ideal as the
    concurrency workload's: C x 10 / 2.2 steps/s. CPU a step is the window's CPU over the steps
    of the tasks that ended in it (in a steady state, as many steps ran in it)."""
    steps = window["tasks"] * TOOL_STEPS
    ideal = sessions * TOOL_STEPS / TASK_IDEAL_S
    achieved = steps / window["window_s"]
    return {"impl": impl, "workload": "sustained", "sessions": sessions,
            "window_s": window["window_s"], "tasks_ended": window["tasks"], "steps": steps,
            "steps_per_s": achieved, "ideal_steps_per_s": ideal, "of_ideal": achieved / ideal,
            "cpu_s": window["cpu_s"],
            "cpu_us_per_step": window["cpu_s"] / steps * 1e6 if steps else None,
            "cpu_us_per_step_by_process": {
                role: round(v / steps * 1e6, 1) for role, v in window.get("cpu_by_role", {}).items()
            } if steps else {},
            "groups": window["groups"], "rounds": window["rounds"],
            "timeline": {"machine_cpu": window["machine_cpu"]}, **extra}


def marginal_kb(rows: list[dict[str, Any]]) -> None:
    """Add `marginal_kb_per_session` to each row after the first of its runtime: the slope of
    peak resident memory (without the store's) between its level and the one before, that
    is the memory each further session costs, without what a process allocates once."""
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "peak_kb" not in r:
            continue
        prev = last.get(r["impl"])
        if prev is not None and r["sessions"] > prev["sessions"]:
            grew = (r["peak_kb"] - r["store_peak_kb"]) - (prev["peak_kb"] - prev["store_peak_kb"])
            r["marginal_kb_per_session"] = grew / (r["sessions"] - prev["sessions"])
        last[r["impl"]] = r
