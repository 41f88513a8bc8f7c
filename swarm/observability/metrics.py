"""Metrics for the Ray dashboard, through `ray.util.metrics`.

Ray exports every metric with a `ray_` prefix at its node's metrics export port (the counter
`swarm_steps` is scraped as `ray_swarm_steps_total`); Prometheus collects them and Grafana charts
them (`cluster/grafana/swarm-dashboard.json`). `SPECS` lists every name and its labels.

Nothing goes to Ray on the step path. The agent's metering layer (swarm.observability.metering)
and the supervisor's `TaskMeter` add updates up in memory, in a `Meter`, and a background task
pushes the sums every `metrics.flush_interval_s` to a `Recorder`: Ray's (`RayRecorder`) in a
process where Ray is initialised, none otherwise. So a `swarm.testing.LocalSwarm` or a unit test
creates no Ray metric; a test installs a `MemoryRecorder` with `use_recorder` and reads what would
have been recorded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from swarm.events import Event, TaskFinished, TaskStateChanged

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity: one object per metric
class MetricSpec:
    """One metric: its name (before Ray's `ray_` prefix), kind, help text and label names."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


_CHECKPOINT_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0)
_MODEL_MS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
             30000.0, 60000.0)

STEPS = MetricSpec("swarm_steps", "counter", "agent steps (one model call and its tool calls)",
                   ("swarm", "agent"))
MODEL_CALLS = MetricSpec("swarm_model_calls", "counter", "model calls, by outcome (ok, error)",
                         ("swarm", "agent", "model", "outcome"))
TOKENS = MetricSpec("swarm_tokens", "counter",
                    "tokens by type: input (cached ones included), output, cached",
                    ("swarm", "agent", "model", "type"))
COST = MetricSpec("swarm_cost_usd", "counter", "model cost in USD, by the config's prices",
                  ("swarm", "agent", "model"))
MODEL_LATENCY = MetricSpec("swarm_model_latency_ms", "histogram", "model call latency (ms)",
                           ("swarm", "agent", "model"), _MODEL_MS)
TOOL_CALLS = MetricSpec("swarm_tool_calls", "counter", "tool calls, by outcome (ok, error)",
                        ("swarm", "agent", "tool", "outcome"))
ERRORS = MetricSpec("swarm_errors", "counter",
                    "failures by error class; kind: model / tool (a failed call), task (a task "
                    "that ended FAILED)", ("swarm", "agent", "kind", "error_class"))
CHECKPOINT_LATENCY = MetricSpec("swarm_checkpoint_latency_ms", "histogram",
                                "time of one durable append of the step journal (ms)",
                                ("swarm", "agent"), _CHECKPOINT_MS)
TASKS = MetricSpec("swarm_tasks", "gauge",
                   "unfinished tasks: active (submitted or working), input_required (waiting "
                   "for an approval or an answer), stuck (flagged by stuck detection)",
                   ("swarm", "state"))
TASKS_FINISHED = MetricSpec("swarm_tasks_finished", "counter",
                            "tasks that ended, by state and error class",
                            ("swarm", "state", "error_class"))
ALERTS = MetricSpec("swarm_alerts", "counter",
                    "governance alerts (budget, stuck) and store outages (store_unavailable)",
                    ("swarm", "alert"))
QUEUE_DEPTH = MetricSpec("swarm_queue_depth", "gauge",
                         "sessions waiting for a free slot on an agent replica",
                         ("swarm", "agent", "replica"))
SESSIONS = MetricSpec("swarm_sessions", "gauge", "sessions running on an agent replica",
                      ("swarm", "agent", "replica"))

SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    STEPS, MODEL_CALLS, TOKENS, COST, MODEL_LATENCY, TOOL_CALLS, ERRORS, CHECKPOINT_LATENCY,
    TASKS, TASKS_FINISHED, ALERTS, QUEUE_DEPTH, SESSIONS)}

NONE = "none"  # the label value for "no error class" and the like (Ray wants a string)


# ---- recorders ----------------------------------------------------------------------------------


class Recorder(ABC):
    """Where flushed metric values go: Ray's metrics, memory (tests), ..."""

    @abstractmethod
    def inc(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Add `value` (> 0) to a counter."""

    @abstractmethod
    def set(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Set a gauge."""

    @abstractmethod
    def observe(self, spec: MetricSpec, tags: tuple[str, ...], values: list[float]) -> None:
        """Add observations to a histogram."""


class RayRecorder(Recorder):
    """Records into `ray.util.metrics`; creates each metric object once, at its first use."""

    def __init__(self) -> None:
        self._metrics: dict[str, Any] = {}

    def _get(self, spec: MetricSpec) -> Any:
        metric = self._metrics.get(spec.name)
        if metric is None:
            from ray.util import metrics as rm

            if spec.kind == "counter":
                metric = rm.Counter(spec.name, spec.description, spec.tag_keys)
            elif spec.kind == "gauge":
                metric = rm.Gauge(spec.name, spec.description, spec.tag_keys)
            else:
                metric = rm.Histogram(spec.name, spec.description, list(spec.boundaries),
                                      spec.tag_keys)
            self._metrics[spec.name] = metric
        return metric

    def inc(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Counter.inc with the label values as tags."""
        self._get(spec).inc(value, tags=dict(zip(spec.tag_keys, tags, strict=True)))

    def set(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Gauge.set with the label values as tags."""
        self._get(spec).set(value, tags=dict(zip(spec.tag_keys, tags, strict=True)))

    def observe(self, spec: MetricSpec, tags: tuple[str, ...], values: list[float]) -> None:
        """Histogram.observe once per value."""
        metric = self._get(spec)
        named = dict(zip(spec.tag_keys, tags, strict=True))
        for v in values:
            metric.observe(v, tags=named)


class MemoryRecorder(Recorder):
    """Keeps what would have been recorded, for tests: `value("swarm_steps", agent="a")`."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}

    @staticmethod
    def _key(spec: MetricSpec, tags: tuple[str, ...]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return spec.name, tuple(zip(spec.tag_keys, tags, strict=True))

    def inc(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Add to the counter's total."""
        if value <= 0:
            raise ValueError(f"counter {spec.name} incremented by {value}")
        key = self._key(spec, tags)
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, spec: MetricSpec, tags: tuple[str, ...], value: float) -> None:
        """Keep the gauge's latest value."""
        self.gauges[self._key(spec, tags)] = value

    def observe(self, spec: MetricSpec, tags: tuple[str, ...], values: list[float]) -> None:
        """Keep every observation."""
        self.histograms.setdefault(self._key(spec, tags), []).extend(values)

    def _matching(self, table: dict[Any, Any], name: str, tags: dict[str, str]) -> list[Any]:
        if name not in SPECS:
            raise KeyError(f"no metric named {name!r}; known: {sorted(SPECS)}")
        return [v for (n, labels), v in table.items()
                if n == name and all(dict(labels).get(k) == w for k, w in tags.items())]

    def value(self, name: str, **tags: str) -> float:
        """A counter's total (or a gauge's value) summed over the series matching `tags`."""
        table = self.gauges if SPECS.get(name, STEPS).kind == "gauge" else self.counters
        return float(sum(self._matching(table, name, tags)))

    def observations(self, name: str, **tags: str) -> list[float]:
        """A histogram's observations in the series matching `tags`."""
        return [v for vs in self._matching(self.histograms, name, tags) for v in vs]

    def series(self, name: str) -> list[dict[str, str]]:
        """The label sets recorded for a metric."""
        tables = (self.counters, self.gauges, self.histograms)
        return [dict(labels) for t in tables for (n, labels) in t if n == name]


_installed: Recorder | None = None
_ray_recorder: RayRecorder | None = None


def use_recorder(recorder: Recorder | None) -> Recorder | None:
    """Install a recorder for metering built from now on in this process (tests); None goes
    back to the default (Ray's inside Ray, else none). Returns the one installed before."""
    global _installed
    before, _installed = _installed, recorder
    return before


def active_recorder() -> Recorder | None:
    """The installed recorder, else Ray's in a Ray actor, else None.

    A driver (`swarm run`, a test, a notebook with `LocalSwarm`) records nothing even with Ray
    initialised: the swarm's metrics come from its actors.
    """
    global _ray_recorder
    if _installed is not None:
        return _installed
    # Only a process that imported Ray can have it initialised: don't import it to ask.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and \
            ray.get_runtime_context().get_actor_id() is not None:
        if _ray_recorder is None:
            _ray_recorder = RayRecorder()
        return _ray_recorder
    return None


def actor_identity() -> tuple[str | None, str]:
    """(deployment, replica) of the Ray actor this runs in, from its name, else (None, "0").

    Actor names are `<deployment>.<role>.<replica>` and `<deployment>.supervisor`
    (swarm.runtime.supervisor_actor); neither part may contain a dot.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, "0"
    try:
        name = ray.get_runtime_context().get_actor_name()
    except Exception:
        return None, "0"
    if not name:
        return None, "0"
    parts = name.split(".")
    return parts[0], parts[2] if len(parts) == 3 else "0"


# ---- aggregation --------------------------------------------------------------------------------

class Series:
    """One metric with bound label values: what a hot path updates (`value += n`,
    `samples.append(x)`), and `Meter.flush` pushes and resets."""

    __slots__ = ("samples", "spec", "tags", "value")

    def __init__(self, spec: MetricSpec, tags: tuple[str, ...]) -> None:
        if len(tags) != len(spec.tag_keys):
            raise ValueError(f"{spec.name} takes labels {spec.tag_keys}, got {tags}")
        self.spec = spec
        self.tags = tags
        self.value = 0.0  # a counter's sum since the last flush, or a gauge's value
        self.samples: list[float] = []  # a histogram's observations since the last flush


class Meter:
    """Metric series summed in memory; `flush` pushes them to the recorder.

    A hot path binds its series once (`meter.series(STEPS, swarm, agent)`) and then only adds
    to an attribute; gauges can also be computed at flush time by `samplers`.
    """

    __slots__ = ("_series", "histogram_cap", "lock", "recorder", "samplers")

    def __init__(self, recorder: Recorder, histogram_cap: int | None = None) -> None:
        self.recorder = recorder
        # At most this many observations of a histogram series go to the recorder per flush:
        # a uniform sample of them when there were more (see `MetricsConfig.histogram_cap`).
        self.histogram_cap = histogram_cap
        self._series: dict[tuple[str, tuple[str, ...]], Series] = {}
        self.samplers: list[Callable[[Meter], None]] = []
        # Held by `flush` and by writers on other threads (a metering layer's drain).
        self.lock = threading.Lock()

    def series(self, spec: MetricSpec, *tags: str) -> Series:
        """The series of `spec` with these label values (created once)."""
        key = (spec.name, tags)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(spec, tags)
        return found

    def add(self, spec: MetricSpec, *tags: str, value: float = 1.0) -> None:
        """Add to a counter (off hot paths: it looks the series up)."""
        self.series(spec, *tags).value += value

    def set(self, spec: MetricSpec, *tags: str, value: float) -> None:
        """Set a gauge; pushed again at every flush."""
        self.series(spec, *tags).value = value

    def observe(self, spec: MetricSpec, *tags: str, value: float) -> None:
        """Add a histogram observation (off hot paths)."""
        self.series(spec, *tags).samples.append(value)

    def flush(self) -> None:
        """Push everything summed since the last flush; a failing recorder loses only that."""
        for sampler in self.samplers:
            try:
                sampler(self)
            except Exception:
                log.debug("metrics sampler failed", exc_info=True)
        rec, cap = self.recorder, self.histogram_cap
        try:
            with self.lock:
                taken = []
                for s in list(self._series.values()):
                    kind = s.spec.kind
                    if kind == "counter":
                        v, s.value = s.value, 0.0
                        taken.append((s, v))
                    elif kind == "gauge":
                        taken.append((s, s.value))
                    elif s.samples:
                        vs, s.samples = s.samples, []
                        if cap is not None and len(vs) > cap:
                            vs = random.sample(vs, cap)
                        taken.append((s, vs))
            for s, v in taken:
                kind = s.spec.kind
                if kind == "counter":
                    if v > 0:  # Ray counters take positive steps only
                        rec.inc(s.spec, s.tags, v)
                elif kind == "gauge":
                    rec.set(s.spec, s.tags, v)
                else:
                    rec.observe(s.spec, s.tags, v)
        except Exception:
            log.warning("pushing metrics failed", exc_info=True)


class Periodic:
    """Runs `fn` every `interval_s` seconds in a background task, started by `ensure()` from
    inside the event loop (a cheap check on the hot path) and stopped by `aclose()`."""

    __slots__ = ("_task", "fn", "interval_s")

    def __init__(self, interval_s: float, fn: Callable[[], Any]) -> None:
        self.interval_s = interval_s
        self.fn = fn
        self._task: asyncio.Task[None] | None = None

    def ensure(self) -> None:
        """Start the background task if it isn't running."""
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                res = self.fn()
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.warning("periodic flush failed", exc_info=True)

    async def aclose(self) -> None:
        """Stop the background task (without running `fn` again)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# ---- the supervisor's task gauges ---------------------------------------------------------------

_TERMINAL = frozenset({"completed", "failed", "canceled", "rejected"})


class TaskMeter:
    """Task-level metrics of one supervisor, from the events it sees: tasks active, waiting in
    INPUT_REQUIRED and stuck (gauges), tasks finished and failed by class, alerts."""

    def __init__(self, swarm: str, recorder: Recorder, interval_s: float = 5.0) -> None:
        self.swarm = swarm
        self.meter = Meter(recorder)
        self.meter.samplers.append(self._gauges)
        self.periodic = Periodic(interval_s, self.meter.flush)
        self._state: dict[str, str] = {}  # unfinished task id -> its A2A state
        self._agent: dict[str, str] = {}  # unfinished task id -> the agent it is at
        self._stuck: set[str] = set()

    def saw(self, task_id: str, agent: str | None) -> None:
        """Note that `agent` sent events of a task: `on_event` for the kinds it doesn't count
        (steps, model and tool calls), once for a run of them."""
        if agent is not None and task_id in self._state:
            self._agent[task_id] = agent

    def on_event(self, ev: Event) -> None:
        """Note one event of a task (called by the supervisor for every event it keeps)."""
        kind = type(ev)
        if kind is TaskStateChanged:
            self._moved(ev.task_id, ev.state)  # type: ignore[attr-defined]
        elif kind is TaskFinished:
            tid, state = ev.task_id, ev.state  # type: ignore[attr-defined]
            cls = ev.error_class  # type: ignore[attr-defined]
            self.meter.add(TASKS_FINISHED, self.swarm, state, cls or NONE)
            if state == "failed":
                agent = ev.agent or self._agent.get(tid) or NONE
                self.meter.add(ERRORS, self.swarm, agent, "task", cls or "orchestration")
            self._moved(tid, state)
        elif kind.__name__ == "Alert":
            alert = str(getattr(ev, "alert", "") or "unknown")
            self.meter.add(ALERTS, self.swarm, alert)
            if alert.startswith("stuck") and ev.task_id in self._state:
                self._stuck.add(ev.task_id)
        else:
            if ev.agent is not None and ev.task_id in self._state:
                self._agent[ev.task_id] = ev.agent
            return
        self.periodic.ensure()

    def _moved(self, task_id: str, state: str) -> None:
        if state in _TERMINAL:
            self._state.pop(task_id, None)
            self._agent.pop(task_id, None)
            self._stuck.discard(task_id)
            return
        self._state[task_id] = state
        if state == "working":
            self._stuck.discard(task_id)  # an operator let it go on

    def resync(self, records: Iterable[Any]) -> None:
        """Take the states of a rebuilt task table (after a supervisor restart)."""
        for rec in records:
            self._moved(rec.id, rec.state)

    def _gauges(self, meter: Meter) -> None:
        active = waiting = 0
        for state in self._state.values():
            if state == "input_required":
                waiting += 1
            else:
                active += 1
        meter.set(TASKS, self.swarm, "active", value=active)
        meter.set(TASKS, self.swarm, "input_required", value=waiting)
        meter.set(TASKS, self.swarm, "stuck", value=len(self._stuck))

    async def aclose(self) -> None:
        """Stop the background flush and push what is left."""
        await self.periodic.aclose()
        self.meter.flush()


def task_meter(cfg: Any, swarm: str) -> TaskMeter | None:
    """The supervisor's task meter, or None when metrics are off or nothing would record them."""
    mcfg = getattr(cfg, "metrics", None)
    if mcfg is not None and not mcfg.enabled:
        return None
    recorder = active_recorder()
    if recorder is None:
        return None
    deployment, _ = actor_identity()
    return TaskMeter(deployment or swarm, recorder,
                     mcfg.flush_interval_s if mcfg is not None else 5.0)
