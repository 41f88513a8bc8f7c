"""The supervisor: owns the task table (A2A `Task`s), routes turns between agents, streams events.

`Supervisor` is plain asyncio code over an `AgentPool`, so it runs the same over Ray actors
(`RayAgentPool`) and over in-process hosts (`LocalAgentPool`, for tests and debugging).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import time
import uuid
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from swarm._text import MAX_LABEL_CHARS, check_chars
from swarm._urls import redact_url
from swarm.config import SwarmConfig
from swarm.errors import CheckpointError, RunError, TaskExists, TaskNotFound, UserError
from swarm.events import (
    FILED_ONE_BY_ONE,
    Alert,
    Event,
    ModelCalled,
    StepFinished,
    TaskFinished,
    TaskStateChanged,
    ToolCalled,
    concat_packed,
    progress,
    unpack_runs,
)
from swarm.events import pack as pack_events
from swarm.events import unpack as unpack_events
from swarm.governance import stuck
from swarm.governance.budget import SwarmUsage, Usage, swarm_exhausted, task_usage, turn_allowance
from swarm.governance.stuck import StuckError, WaitGraph, bounces
from swarm.models.interface import Model, ModelRequest
from swarm.protocol import a2a
from swarm.runtime.agent import AgentHost, TurnRequest, TurnResult
from swarm.state.interface import Checkpointer, StoreUnavailable, TaskRow
from swarm.state.replay import AgentUsage, TaskState, restore

log = logging.getLogger(__name__)

_MAX_EVENTS_PER_TASK = 20_000
# Packed event bytes a running task gathers before they are compressed (`TaskRecord.squeeze`).
_SQUEEZE_AT = 2048
_REASK_WAIT_S = 30.0  # how long an answer waits for a reloaded task to ask its question again
_RESTART_WAIT_S = 120.0  # how long a turn waits for a dead replica to come back
# Posts gathered for one replica that are sent at once, without waiting for the post call in
# flight: a burst of new tasks reaches the agents while the supervisor still starts the rest.
_POST_BATCH = 64
_SUBMIT_CHUNK = 256  # new tasks of a `submit_many` stored (and started) together
# A task's metadata as JSON: small facts, kept in every row, listing and audit entry of it.
_MAX_METADATA_CHARS = 64 * 1024
# While the durable store is down, it is asked whether it answers again this often at most
# (`Supervisor._store_answers`: one probe for every task that waits for it).
_PROBE_MAX_DELAY_S = 2.0


class AgentPool(ABC):
    """How the supervisor reaches agent roles; a session sticks to one replica of a role."""

    @abstractmethod
    async def turn(self, role: str, key: str, req: TurnRequest, attempt: int = 0) -> TurnResult:
        """Run one turn on the replica that `key` maps to; a retry after that replica died
        (`attempt` > 0) moves to the next one, so a turn resumes without waiting for the dead
        replica to restart."""

    @abstractmethod
    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Cancel a task's running turn on that replica."""

    def bind(self, emit: Callable[[list[Event]], None]) -> None:
        """Called by the supervisor with where live events go (agents that run elsewhere send
        theirs by other means); a no-op by default."""
        return None


def replica_for(key: str, replicas: int) -> int:
    """The replica a session key sticks to (stable across processes and restarts)."""
    return zlib.crc32(key.encode()) % replicas if replicas > 1 else 0


class LocalAgentPool(AgentPool):
    """Agent hosts in this process, one per role (no Ray)."""

    def __init__(self, hosts: dict[str, AgentHost]) -> None:
        self.hosts = hosts

    async def turn(self, role: str, key: str, req: TurnRequest, attempt: int = 0) -> TurnResult:
        """Run the turn in-process."""
        return await self.hosts[role].run_turn(req)

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Cancel the in-process turn."""
        self.hosts[role].cancel(task_id)


@dataclass(slots=True)
class _Post:
    """A turn posted to an agent replica, until its result comes back."""

    replica: _Replica
    future: asyncio.Future[TurnResult]
    task_id: str = ""  # the task whose turn it is: a result for another is not this one's
    incarnation: str | None = None  # the replica instance that took it (from the post's ack)


@dataclass(slots=True)
class _Replica:
    """One agent replica as the pool sees it: posts waiting to be sent (while one post call is
    in flight, the next ones gather, up to `_POST_BATCH`) and the instance its `watch` call
    follows."""

    role: str
    handle: Any
    outbox: list[tuple[str, TurnRequest]] = field(default_factory=list)
    poster: asyncio.Task[None] | None = None  # sends the outbox while it isn't empty
    watched: str | None = None
    watcher: asyncio.Task[None] | None = None


class RayAgentPool(AgentPool):
    """Agent roles as Ray actor replicas.

    A turn is posted (`AgentActor.post_turns`, batched per replica) and its result delivered
    by the replica (`deliver`, from `SupervisorActor.turns_done`), so no Ray call stays open
    for the length of a turn; a replica's death reaches the turns it was running through one
    long-lived `watch` call per replica, as an orchestration error (`_ActorLost`) that the
    supervisor retries on the next replica.
    """

    def __init__(self, handles: dict[str, list[Any]]) -> None:
        self.handles = handles
        self._where: dict[str, Any] = {}  # task id -> the replica running its turn now
        self._replicas = {id(h): _Replica(role, h) for role, hs in handles.items() for h in hs}
        self._posts: dict[str, _Post] = {}  # by post id
        # Post ids are this pool's own: replicas deliver the results of turns a supervisor
        # posted before it restarted to the new one, whose counter starts again at 0.
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._sending: set[asyncio.Future[None]] = set()  # post calls sent by `_post_now`

    def _pick(self, role: str, key: str, attempt: int = 0) -> Any:
        replicas = self.handles[role]
        return replicas[(replica_for(key, len(replicas)) + attempt) % len(replicas)]

    async def turn(self, role: str, key: str, req: TurnRequest, attempt: int = 0) -> TurnResult:
        """Post the turn to the sticky replica (the next one on a retry) and wait for its
        result; a replica that dies meanwhile is an orchestration error."""
        handle = self._pick(role, key, attempt)
        self._where[req.task_id] = handle
        post_id = f"{self._prefix}-{next(self._ids)}"
        try:
            if attempt:
                await self._until_alive(role, handle)
            rep = self._replicas[id(handle)]
            post = self._posts[post_id] = _Post(rep, asyncio.get_running_loop().create_future(),
                                                req.task_id)
            rep.outbox.append((post_id, req))
            if len(rep.outbox) >= _POST_BATCH:
                # A burst (many tasks started at once): send these now rather than after
                # every other task's first slice has run, which is when the poster would.
                self._post_now(rep)
            elif rep.poster is None or rep.poster.done():
                rep.poster = asyncio.create_task(self._send_posts(rep))
            return await post.future
        finally:
            self._posts.pop(post_id, None)
            if self._where.get(req.task_id) is handle:
                del self._where[req.task_id]

    def deliver(self, batch: list[tuple[str, TurnResult | str]]) -> None:
        """Results of posted turns, from the replica that ran them; a result nobody waits for
        any more (the turn was given up on, or posted before a supervisor restart) is
        dropped."""
        for post_id, outcome in batch:
            post = self._posts.get(post_id)
            if post is None or post.future.done():
                continue
            if not isinstance(outcome, str) and outcome.task_id != post.task_id:
                log.error("a turn result of task %s came under the post id of task %s's "
                          "turn (%s); dropped", outcome.task_id, post.task_id, post_id)
                continue
            if isinstance(outcome, str):  # the turn raised in the replica
                post.future.set_exception(RunError(outcome))
            else:
                post.future.set_result(outcome)

    def _taken_by(self, rep: _Replica, incarnation: str | None) -> list[_Post]:
        return [p for p in self._posts.values()
                if p.replica is rep and p.incarnation == incarnation]

    def _fail(self, posts: list[_Post], error: str, kind: type[RunError] | None = None
              ) -> None:
        for post in posts:
            if not post.future.done():
                post.future.set_exception((kind or _ActorLost)(error))

    async def _send_posts(self, rep: _Replica) -> None:
        while rep.outbox:
            batch = self._take(rep)
            if batch:
                await self._posted(rep, batch, self._submit(rep, batch))

    def _post_now(self, rep: _Replica) -> None:
        """Send the replica's gathered posts in a call of their own, now (`turn`)."""
        batch = self._take(rep)
        if batch:
            task = asyncio.ensure_future(self._posted(rep, batch, self._submit(rep, batch)))
            self._sending.add(task)  # held: the loop keeps only a weak reference
            task.add_done_callback(self._sending.discard)

    def _take(self, rep: _Replica) -> list[tuple[str, TurnRequest]]:
        # Turns given up on while they waited here (a cancelled task) are not sent.
        batch = [(i, r) for i, r in rep.outbox if i in self._posts]
        rep.outbox = []
        return batch

    @staticmethod
    def _submit(rep: _Replica, batch: list[tuple[str, TurnRequest]]) -> Any:
        """The post call, submitted (Ray sends it from its own thread), or what submitting it
        raised."""
        try:
            return rep.handle.post_turns.remote(batch)
        except Exception as exc:
            return exc

    async def _posted(self, rep: _Replica, batch: list[tuple[str, TurnRequest]], call: Any
                      ) -> None:
        """Wait for a post call's answer: the instance that took the turns, or a failure that
        fails them."""
        import ray

        try:
            if isinstance(call, Exception):
                raise call
            incarnation = await call
        except ray.exceptions.RayActorError as exc:
            self._fail(self._waiting(batch),
                       f"agent {rep.role} replica died during the turn: {exc}")
            return
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # Ray's RayTaskError holds the raised
            if isinstance(cause, StoreUnavailable):
                # The replica could not start: it can't reach the store. The supervisor waits
                # for the store as for a turn that stopped on it (`Supervisor._turn`).
                self._fail(self._waiting(batch), f"agent {rep.role} could not start a turn: "
                           f"{cause}", StoreUnavailable)
                return
            self._fail(self._waiting(batch),
                       f"posting a turn to agent {rep.role} failed: {exc}", RunError)
            return
        for post in self._waiting(batch):
            post.incarnation = incarnation
        if rep.watcher is None or rep.watcher.done():
            rep.watched = incarnation
            rep.watcher = asyncio.create_task(self._watch(rep))

    def _waiting(self, batch: list[tuple[str, TurnRequest]]) -> list[_Post]:
        """The posts of a batch that are still waited for."""
        return [p for i, _ in batch if (p := self._posts.get(i)) is not None]

    async def _watch(self, rep: _Replica) -> None:
        # Follows one replica while turns posted to it run: its `watch` call failing (the
        # actor died) or returning another incarnation (it restarted) fails the turns the
        # lost instance took.
        import ray

        delay = 0.02
        while True:
            lost = rep.watched
            if not any(p.replica is rep and p.incarnation for p in self._posts.values()):
                return
            try:
                now = await rep.handle.watch.remote(lost)
            except ray.exceptions.RayActorError as exc:
                # Every turn the lost instance took, including those posted while this call
                # was open.
                self._fail(self._taken_by(rep, lost),
                           f"agent {rep.role} replica died during the turn: {exc}")
                await asyncio.sleep(delay)  # it may be restarting: ask again, backing off
                delay = min(delay * 2, 1.0)
                continue
            except Exception:
                log.warning("watching agent %s failed", rep.role, exc_info=True)
                await asyncio.sleep(1.0)
                continue
            delay = 0.02
            why = "restarted" if now is not None else "shut down"
            self._fail(self._taken_by(rep, lost), f"agent {rep.role} replica {why} during the turn")
            if now is None:
                return
            rep.watched = now

    async def _until_alive(self, role: str, replica: Any) -> None:
        # A replica that is restarting refuses calls at once; wait (bounded) until it answers,
        # so a retry isn't spent on it. A live replica answers in one round trip.
        import ray

        delay, deadline = 0.02, time.monotonic() + _RESTART_WAIT_S
        while True:
            try:
                await replica.stats.remote()
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise _ActorLost(f"agent {role} replica did not come back in "
                                     f"{_RESTART_WAIT_S:g} s") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except ray.exceptions.RayActorError as exc:
                raise _ActorLost(f"agent {role} replica is gone: {exc}") from None

    async def cancel(self, role: str, key: str, task_id: str) -> None:
        """Ask the replica running the turn to cancel; one that is gone has nothing to cancel."""
        try:
            await self._where.get(task_id, self._pick(role, key)).cancel.remote(task_id)
        except Exception:
            log.debug("cancel of %s on %s failed", task_id, role, exc_info=True)


class _ActorLost(RunError):
    error_class = "orchestration"


class _Flag:
    """`asyncio.Event`'s `is_set`, `set`, `clear` and `wait`, the Event itself (with its
    waiters' deque, about 700 bytes) made only once something waits: most tasks' flags are
    never waited on, and a swarm holds thousands of tasks."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: asyncio.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            # Its waiters are woken and hold it until they run; the flag no longer needs it
            # (a finished task's `done` is set for good, and kept for long).
            self._event.set()
            self._event = None

    def clear(self) -> None:
        self._set = False
        if self._event is not None:
            self._event.clear()

    async def wait(self) -> bool:
        if self._set:
            return True
        if self._event is None:
            self._event = asyncio.Event()
        return await self._event.wait()


class _Deadlines:
    """The running tasks' wall-clock hard stops, on one timer for them all.

    Each task used to run under its own `asyncio.timeout`: a `Timeout`, a timer handle and
    its callback in the event loop's heap per running task, about 0.7 KB each at 2,000 tasks,
    and a timer scheduled and cancelled per task. Here a task's due time goes in a heap and a
    dict; one loop timer is set for the earliest due time. A task that finishes first drops
    out of the dict (its heap entry is skipped when reached, and the heap is rebuilt from the
    dict once stale entries outnumber live ones). At its due time the task's `asyncio.Task`
    is cancelled and marked, and `clear` tells its driver that the cancellation was the
    deadline, as `asyncio.timeout` turns it into a `TimeoutError`. Entries and marks belong to
    the `asyncio.Task` that set them: a second driver of the same key never takes or drops
    another's."""

    __slots__ = ("_due", "_expired", "_heap", "_loop", "_timer", "_timer_at")

    # A timer may run a little before its time (the loop's clock resolution): entries due
    # within this much count as due, so the timer is never set again for the same instant.
    _EARLY_S = 0.001

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []  # (loop time, key), stale ones included
        self._due: dict[str, tuple[float, asyncio.Task[Any]]] = {}  # key -> (time, its task)
        self._expired: dict[str, asyncio.Task[Any]] = {}  # key -> the task it cancelled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: str, delay: float, task: asyncio.Task[Any]) -> None:
        """Cancel `task` in `delay` seconds unless `clear(key, task)` comes first."""
        loop = task.get_loop()
        if loop is not self._loop:  # a new event loop (a test's): the old timer is gone
            self._loop, self._timer, self._timer_at = loop, None, float("inf")
        when = loop.time() + delay
        self._due[key] = (when, task)
        if self._expired.get(key) is task:
            del self._expired[key]
        heapq.heappush(self._heap, (when, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(w, k) for k, (w, _) in self._due.items()]
            heapq.heapify(self._heap)
        if when < self._timer_at:
            self._arm(loop, when)

    def clear(self, key: str, task: asyncio.Task[Any]) -> bool:
        """Drop the deadline `task` set for `key`; True if it had expired (and cancelled
        `task`)."""
        held = self._due.get(key)
        if held is not None and held[1] is task:
            del self._due[key]
        if self._expired.get(key) is task:
            del self._expired[key]
            return True
        return False

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._fire, loop), when

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, float("inf")
        now, heap, due = loop.time() + self._EARLY_S, self._heap, self._due
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            held = due.get(key)
            if held is None or held[0] != when:
                continue  # finished, or set again for later
            del due[key]
            if not held[1].done():
                self._expired[key] = held[1]
                held[1].cancel()
        while heap and heap[0][1] not in due:
            heapq.heappop(heap)
        if heap:
            self._arm(loop, heap[0][0])


@functools.cache
def _lz4_codec() -> Any:
    """pyarrow's LZ4 codec, made once (`pa.compress` makes one a call)."""
    import pyarrow as pa

    return pa.Codec("lz4")


def _lz4(data: bytes) -> tuple[bytes, int]:
    """Packed events compressed (LZ4, through pyarrow), with their size uncompressed."""
    return _lz4_codec().compress(data, asbytes=True), len(data)


def _unlz4(blob: bytes, size: int) -> bytes:
    """What `_lz4` compressed."""
    return _lz4_codec().decompress(blob, decompressed_size=size, asbytes=True)


# Stuck detectors that end a turn (inside it), which stuck.action escalate asks an operator
# about; the other detectors stop the task, or (ping_pong) are the supervisor's own.
_ESCALATED = ("same_call", "no_progress")

# The counters `TaskRecord.waiting` holds for a turn that waits for input.
_WAITING = ("steps", "input_tokens", "output_tokens", "model_calls", "tool_calls", "cost_usd")
# The counters a running turn's progress adds to, in `swarm.events.progress`'s order.
_RUNNING = ("steps", "model_calls", "tool_calls", "input_tokens", "output_tokens")


# Metadata values a protobuf Struct (the A2A task's metadata) gives back as they were set.
_EXACT = frozenset({str, bool, type(None)})


def _check_user(user: Any) -> None:
    """A submitter's label: a non-empty string of at most `MAX_LABEL_CHARS`, no control
    characters; a `UserError` naming what is wrong."""
    if not isinstance(user, str) or not user:
        raise UserError("user must be a non-empty string")
    if len(user) > MAX_LABEL_CHARS:
        raise UserError(f"user is {len(user)} characters; at most {MAX_LABEL_CHARS}")
    check_chars(user, "user")


def _meta_json(meta: dict[str, Any]) -> str | None:
    """A task's metadata as the JSON text its record keeps (`TaskRecord.meta_json`), or None
    when the A2A task's Struct gives it back exactly (strings, booleans and nulls only, as
    most tasks' metadata: nothing to encode or keep). Raises TypeError or ValueError for
    what isn't JSON, NaN and the infinities included (json.dumps would write them, but no
    JSON reader takes them, nor protobuf's JSON writer a Struct holding one: the A2A server's
    GetTask of such a task failed)."""
    if all(type(v) in _EXACT for v in meta.values()):
        return None
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _unsqueeze(chunks: list[tuple[bytes, int]]) -> list[bytes]:
    """The packed event lists of `TaskRecord.squeeze`'s chunks."""
    return [_unlz4(blob, size) for blob, size in chunks]


@dataclass(slots=True)
class TaskRecord:
    """One row of the task table: the A2A task plus what the runtime tracks about it.

    Slotted: the supervisor holds one per task, and an instance dict of this many fields was
    over a kilobyte of each."""

    # The A2A task (a2a.types.Task); None while it is parked as its wire bytes (`park`): read
    # it through `task`, change it through `live()`.
    _task: Any
    user: str
    created: float
    transcript: list[dict[str, Any]] = field(default_factory=list)
    # The task's events; once it has finished, kept packed (`compact`) until read.
    # In order: events, and agents' runs of events still packed (`swarm.events.pack_runs`),
    # decoded when first read.
    _events: list[Event | bytes] = field(default_factory=list)
    _runs: bool = False  # whether `_events` holds packed runs
    _packed: bytes | None = None
    _packed_size: int = 0
    # While the task runs: its earliest events, compressed (`squeeze`), before `_events`;
    # each chunk with its size unpacked. `_tail` counts the packed bytes in `_events` since.
    _squeezed: list[tuple[bytes, int]] | None = None
    _tail: int = 0
    _read: bool = False  # its events were read while it ran: kept as objects from then on
    event_count: int = 0
    # Set (and dropped) when the task gets events; made only while an `events` call waits, so
    # a task nobody follows costs no Event and its events no wake-up.
    changed: asyncio.Event | None = None
    done: _Flag = field(default_factory=_Flag)
    driver: asyncio.Task[None] | None = None
    active: set[str] = field(default_factory=set)
    agent: str | None = None
    text: str = ""
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    turns: int = 0
    handoffs: int = 0
    question: str | None = None
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # open approval gates
    answer_waiter: asyncio.Future[str] | None = None
    # Set while `answer_waiter` waits: a restarted supervisor asks its question again a
    # moment after loading the task, and an answer sent meanwhile waits for it.
    asking: _Flag = field(default_factory=_Flag)
    updated: float = 0.0
    answer: str | None = None
    error_class: str | None = None
    error: str | None = None
    # Governance (swarm.governance): cost so far, the limit that cut the task short, the stuck
    # detector that fired, each agent's usage in this task, and what a question accepts.
    cost_usd: float = 0.0
    budget_exhausted: str | None = None
    stuck: str | None = None
    by_agent: dict[str, Usage] = field(default_factory=dict)
    choices: tuple[str, ...] = ("rerun", "skip")
    # Failed model and tool calls by error class, including the ones the task recovered from.
    errors: dict[str, int] = field(default_factory=dict)
    # The task whose tool submitted this one (its `parent_task` metadata), for deadlocks.
    parent: str | None = None
    # What turns stopped at a question (input required) ran so far, by log id (each
    # parallel branch has its own): the counters of `_WAITING`, and the turn's id under
    # "turn". Such a turn hasn't ended, so the counters above don't count it yet; listings
    # and the row add it (`total`). When the turn ends, its report, which counts the whole
    # turn (a resumed turn's too, from the turn's start in the log), is added and this
    # dropped (`Supervisor._turn`); a task that ends while it waits keeps it (`settle`).
    # None while no turn waits (most tasks: no dict each).
    waiting: dict[str, dict[str, Any]] | None = None
    # What each agent's turn still running has done so far, as its step events say
    # (`swarm.events.progress`): listings show it (`summary`) until the turn's report is
    # counted. None while no running turn has reported progress.
    running: dict[str, list[int]] | None = None
    # The task's metadata as JSON text (`_meta_json`): what was submitted, and what the
    # supervisor added. The A2A task keeps it as a protobuf Struct, whose numbers are all
    # doubles, so an int submitted would come back a float (a big one rounded). None when the
    # Struct gives it back exactly, and in rows stored before this was kept. Read it through
    # `metadata()`.
    meta_json: str | None = None

    _wire: bytes | None = None  # the parked task's wire bytes
    _parked_state: str = ""  # its state when parked
    # The A2A task's ids (read on every event and turn: kept, not read from the protobuf).
    id: str = field(init=False)
    context_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = str(self._task.id)
        self.context_id = str(self._task.context_id)

    @property
    def task(self) -> Any:
        """The A2A task, to read: a parked one is parsed for the caller and stays parked (a
        listing of many tasks doesn't bring them all back). To change it, use `live()`."""
        task = self._task
        return task if task is not None else a2a.loads_task(self._wire or b"")

    def live(self) -> Any:
        """The A2A task, to change: a parked one is parsed and kept as an object again."""
        task = self._task
        if task is None:
            task = self._task = a2a.loads_task(self._wire or b"")
            self._wire = None
        return task

    def park(self) -> None:
        """Keep the A2A task as its wire bytes while nothing changes it (during an agent's
        turn, and once it has finished): a protobuf task with its messages holds about 5 KB of
        memory (upb arenas), its wire bytes under 1 KB."""
        task = self._task
        if task is not None:
            self._parked_state = a2a.state_of(task)
            self._wire, self._task = a2a.dumps(task), None

    def wire(self) -> bytes:
        """The A2A task's wire bytes."""
        task = self._task
        return a2a.dumps(task) if task is not None else self._wire or b""

    @property
    def events(self) -> list[Event]:
        """The task's events in order, each with its `seq` (a packed record's are decoded for
        the caller)."""
        return _numbered(self._raw_events(), 0)

    def events_from(self, cursor: int) -> list[Event]:
        """The task's events from index `cursor` on, with their `seq`."""
        return _numbered(self._raw_events()[cursor:], cursor)

    def _raw_events(self) -> list[Event]:
        # Kept as they came, `seq` unset: it is the index, set when they are read (agents
        # send thousands a second, most never read while the task runs).
        if self._packed is not None:
            return unpack_events(_unlz4(self._packed, self._packed_size))  # type: ignore[return-value]
        # Read: its events stay objects from now on (a follower polls: squeezing and decoding
        # again between its reads would cost the whole history each time).
        self._read, self._tail = True, 0
        if self._squeezed:
            head: list[Event | bytes] = []
            for part in _unsqueeze(self._squeezed):
                head += unpack_events(part)
            self._events, self._squeezed = head + self._events, None
        if self._runs:
            out: list[Event | bytes] = []
            for part in self._events:
                if isinstance(part, bytes):
                    out += unpack_events(part)
                else:
                    out.append(part)
            self._events, self._runs = out, False
        return self._events  # type: ignore[return-value]

    def _writable_events(self) -> list[Event | bytes]:
        """The event list to add to (packed runs stay packed); `event_count` is its length
        in events."""
        if self._packed is not None:
            self._events, self._packed = list(self._raw_events()), None
        return self._events

    def compact(self, durable: bool) -> None:
        """Once the task has finished: keep its events as one compressed msgpack blob (a
        finished task's events are read rarely, and as objects they cost several KB a task);
        with a durable store, let go of the transcript too: it only drives turns, and the
        store has the task's history. LZ4 (through pyarrow): a tenth of zlib's time for about
        a third more bytes (a 10-step task's 44 events: 6.8 KB packed, 1.0 KB compressed, in
        6 µs against zlib's 0.7 KB in 85 µs)."""
        if self._events or self._squeezed:
            if self._squeezed:
                data = concat_packed([*_unsqueeze(self._squeezed), *self._events])
            else:
                data = concat_packed(self._events) if self._runs else \
                    pack_events(self._events)  # type: ignore[arg-type]
            self._packed, self._packed_size = _lz4(data)
            self._events, self._runs, self._squeezed, self._tail = [], False, None, 0
        if durable:
            self.transcript = []

    def squeeze(self) -> None:
        """While the task runs: compress its packed events so far into a chunk of their own
        (LZ4, as `compact` does), new ones going on after it. A running task's events are
        rarely read, and a 10-step task's come to about 7 KB packed, the largest part of what
        the supervisor holds for it (about 1 KB compressed). Events the supervisor filed
        itself (state changes) are packed with them; reading the task's events undoes it, and
        a task whose events were read is not squeezed again."""
        if not self._runs or self._read:
            return
        chunk = _lz4(concat_packed(self._events))
        if self._squeezed is None:
            self._squeezed = [chunk]
        else:
            self._squeezed.append(chunk)
        self._events, self._runs, self._tail = [], False, 0

    def watch(self) -> asyncio.Event:
        """An Event set at the task's next change: new events, or its end."""
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    @property
    def state(self) -> str:
        task = self._task
        return a2a.state_of(task) if task is not None else self._parked_state

    def total(self, name: str) -> Any:
        """A counter (steps, tokens, calls, cost_usd) with what turns waiting for input ran."""
        value = getattr(self, name)
        if self.waiting:
            value += sum(used[name] for used in self.waiting.values())
        return value

    def settle(self) -> None:
        """Count what turns waiting for input ran in the counters, as the task ends while
        they wait (canceled, timed out): they won't report it."""
        if self.waiting:
            for name in _WAITING:
                setattr(self, name, self.total(name))
            self.waiting = None
        # A running turn's progress was counted as the task ended (`Supervisor._finish`);
        # a push of its events after that is not.
        self.running = None

    def metadata(self) -> dict[str, Any]:
        """The task's metadata as plain JSON data (a fresh copy), as it was submitted."""
        text = self.meta_json
        if text is not None:
            return json.loads(text)
        return a2a.json_data(self.task.metadata)

    def set_metadata(self, key: str, value: Any) -> None:
        """Set one key of the task's metadata: on the A2A task, and in `meta_json`."""
        if self.meta_json is not None or type(value) not in _EXACT:
            self.meta_json = _meta_json({**self.metadata(), key: value})
        a2a.set_metadata(self.live().metadata, {key: value})

    def summary(self) -> dict[str, Any]:
        """A JSON-ready row for listings and the client."""
        out = {
            "task_id": self.id,
            "context_id": self.context_id,
            "state": self.state,
            "user": self.user,
            "agent": self.agent,
            "steps": self.steps,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "model_calls": self.model_calls,
            "tool_calls": self.tool_calls,
            "created": self.created,
            "updated": self.updated,
            "answer": self.answer,
            "error_class": self.error_class,
            "error": self.error,
            "question": self.question,
            "cost_usd": self.cost_usd,
            "budget_exhausted": self.budget_exhausted,
            "stuck": self.stuck,
            "errors": dict(self.errors),
            "gates": list(self.gates.values()),
            "metadata": self.metadata(),
        }
        if self.waiting:  # what turns waiting for input ran (most tasks have none)
            for name in _WAITING:
                out[name] = self.total(name)
        if self.running:  # turns still running
            for done in self.running.values():
                for name, n in zip(_RUNNING, done[:5], strict=True):  # (cached tokens last)
                    out[name] += n
        return out

    def add(self, used: TurnResult) -> None:
        """Count a turn's steps, tokens and calls (its report, or what it ran as its events
        said) in the task's counters."""
        self.steps += used.steps
        self.input_tokens += used.input_tokens
        self.output_tokens += used.output_tokens
        self.model_calls += used.model_calls
        self.tool_calls += used.tool_calls

    def ran(self, agent: str | None, done: list[int]) -> None:
        """Add what an agent's running turn did (`swarm.events.progress`) to its progress;
        not if the agent runs no turn of the task now (a late push after its report)."""
        if agent is None or agent not in self.active:
            return
        running = self.running
        if running is None:
            running = self.running = {}
        mine = running.get(agent)
        if mine is None:
            running[agent] = list(done)
        else:
            for i, n in enumerate(done):
                mine[i] += n

    def turn_counted(self, agent: str) -> None:
        """An agent's turn was counted (its report, or what it ran before a question): its
        running progress goes."""
        if self.running is not None:
            self.running.pop(agent, None)
            self.running = self.running or None

    def finished_event(self) -> TaskFinished:
        """The task's last event, from its final state (set by `Supervisor._finish`)."""
        return TaskFinished(
            task_id=self.id, ts=self.updated, agent=self.agent, state=self.state,
            answer=self.answer, error_class=self.error_class, error=self.error,
            steps=self.steps, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            budget_exhausted=self.budget_exhausted)

    def totals(self) -> dict[str, int]:
        """Counters an agent's snapshots need."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "model_calls": self.model_calls, "tool_calls": self.tool_calls,
                "handoffs": self.handoffs, "turns": self.turns}

    def to_row(self, swarm: str) -> TaskRow:
        """The durable row of this task: the A2A task (its ids, state, messages, answer and
        metadata) and the record's own fields (what `from_row` restores, and the open gates;
        the metadata's JSON text when the A2A task can't give it back exactly).
        Written at least twice a task, so built directly: not from `summary`, whose metadata
        conversion from the protobuf alone costs more than the rest of the row."""
        data = {
            "a2a": self.wire(), "user": self.user, "agent": self.agent,
            "text": self.text, "created": self.created, "updated": self.updated,
            "answer": self.answer, "error_class": self.error_class, "error": self.error,
            "question": self.question, "cost_usd": self.cost_usd,
            "budget_exhausted": self.budget_exhausted, "stuck": self.stuck,
            "errors": dict(self.errors), "gates": list(self.gates.values()),
            "steps": self.steps, **self.totals()}
        if self.waiting:
            data["waiting"] = {k: dict(v) for k, v in self.waiting.items()}
        if self.meta_json is not None:
            data["metadata"] = self.meta_json
        return TaskRow(task_id=self.id, swarm=swarm, state=self.state, data=data,
                       updated=self.updated)

    @classmethod
    def from_row(cls, row: TaskRow) -> TaskRecord:
        """Rebuild a record from its durable row (after a supervisor restart)."""
        d = row.data
        rec = cls(_task=a2a.loads_task(d["a2a"]), user=d.get("user", ""),
                  created=d.get("created", row.updated))
        for name in ("agent", "text", "steps", "input_tokens", "output_tokens", "model_calls",
                     "tool_calls", "turns", "handoffs", "answer", "error_class", "error",
                     "question", "updated", "cost_usd", "budget_exhausted", "stuck",
                     "errors"):
            if name in d:
                setattr(rec, name, d[name])
        if isinstance(d.get("metadata"), str):
            rec.meta_json = d["metadata"]
        if d.get("waiting") and rec.state not in a2a.TERMINAL:
            rec.waiting = {k: dict(v) for k, v in d["waiting"].items()}
        if rec.state in a2a.TERMINAL:
            # Its events stayed with the supervisor that ran it; its end is the one kept, so
            # a reader of the task's events still sees how it ended.
            rec._events, rec.event_count = [rec.finished_event()], 1
            rec.done.set()
            rec.park()  # finished: read now and then, changed no more
        return rec


class Supervisor:
    """Owns the task table of one swarm and drives each task through its agents."""

    def __init__(
        self,
        cfg: SwarmConfig,
        pool: AgentPool,
        router_model: Model | None = None,
        clock: Any = time.time,
        store: Checkpointer | None = None,
        swarm_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        pool.bind(self.push_events)
        self.router_model = router_model
        self.clock = clock
        self.started = clock()  # when this supervisor (instance) started
        self.store = store
        self.swarm_id = swarm_id or cfg.name
        self.tasks: dict[str, TaskRecord] = {}
        # Finished tasks whose final rows are stored, oldest first: beyond
        # limits.finished_in_memory they leave `tasks` and are read back from the store by id.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._dropped = 0  # finished tasks dropped from memory so far
        self._deadlines = _Deadlines()  # the running tasks' max_wall_s hard stops
        # New tasks whose rows are being written: a retry of the same submission meanwhile
        # waits for that write instead of making the task a second time.
        self._storing: dict[str, tuple[TaskRecord, asyncio.Future[None]]] = {}
        # Tasks whose deletion (`forget`) is under way: submissions naming them are refused.
        self._forgetting: dict[str, asyncio.Future[None]] = {}
        self.restore_problems: list[str] = []
        # Set by `stop` (the swarm going down): no task is finished from then on.
        self.stopping = False
        # Latest snapshot per log id, held where agents can't lose it (the supervisor actor
        # keeps Ray object refs here): (seq, [ref]). A resumed turn gets it in its request.
        self.hot: dict[str, tuple[int, list[Any]]] = {}
        self._hot_logs: dict[str, list[str]] = {}  # task id -> its log ids in `hot`
        # While the store is unreachable: the one probe that waits for it to answer again,
        # and how many wait on it (`_store_answers`).
        self._probe: asyncio.Task[None] | None = None
        self._probe_waiters = 0
        # Whether the store was last seen unreachable (by a turn, a row write or the probe)
        # and not seen answering since: rows are then left to `_write_rows_later` at once.
        self._seen_down = False
        # Tasks whose row could not be stored (the store unreachable): their newest rows are
        # written once it answers again (`_persist_soon`, `_write_rows_later`).
        # By task id: the record and the count of the deferral, so a row deferred again
        # while an older one was being written is written again.
        self._unstored: dict[str, tuple[TaskRecord, int]] = {}
        self._deferrals = itertools.count()
        # Finished tasks whose row the writer stored while `_finish` was still under way.
        self._stored_late: set[str] = set()
        # The store's epoch as this supervisor first found it (`mark_store`): a resume is
        # refused once the store answers another one (it came back without its data).
        self._epoch: str | None = None
        # When (`clock`) this supervisor last found the epoch changed: tasks created before
        # then had their logs in the store that was lost; those created since are in the
        # new one, and resume as usual.
        self._epoch_since = float("-inf")
        self._row_writer: asyncio.Task[None] | None = None
        # Archives finished tasks a crash left in Redis (a tiered store), after `load`.
        self._sweep: asyncio.Task[None] | None = None
        from swarm.observability.metrics import task_meter

        self.meter = task_meter(cfg, self.swarm_id)  # None when nothing records metrics
        from swarm.observability.tracing import swarm_tracer

        self._tracer = swarm_tracer(cfg)  # None when tracing is off
        # Governance: the swarm's usage over every task, and who waits on whom (deadlocks).
        self.swarm_usage = SwarmUsage(cfg.budgets.swarm.window_s, clock)
        self.waits = WaitGraph()
        from swarm.governance.approvals import ApprovalDesk

        self.approvals = ApprovalDesk(self)
        from swarm.governance.audit import audit_log

        self.audit = audit_log(cfg, store)  # None when audit is off
        from swarm.memory.service import session_recorder

        self.session_memory = session_recorder(cfg, store)  # None: no agent keeps sessions
        if self.audit is not None:
            self.approvals.on_record = self.audit.record

    # ---- API -------------------------------------------------------------------------------

    def check_text(self, text: Any) -> None:
        """Raise `UserError` unless `text` is a task text this swarm accepts."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("task text must be a non-empty string")
        limit = self.cfg.limits.max_task_chars
        if len(text) > limit:
            raise UserError(
                f"task text is {len(text)} characters; this swarm accepts at most "
                f"{limit} (limits.max_task_chars)"
            )
        check_chars(text, "task text")  # no NUL or other control characters (swarm._text)

    async def submit(
        self,
        text: str,
        *,
        user: str = "anonymous",
        metadata: dict[str, Any] | None = None,
        context_id: str | None = None,
        task_id: str | None = None,
        message_id: str | None = None,
    ) -> str:
        """Create a task and start driving it; returns its id at once. `message_id` names the
        task's first message (an A2A client's own id for the message it sent)."""
        if task_id is not None:
            await self._recall([task_id])
            self._not_forgetting([task_id])
        rec = self._prepare(text, user, metadata, context_id, task_id, message_id)
        self._drop_finished()  # the recalled ones have been looked at
        if isinstance(rec, str):
            await self._stored(rec)
            return rec
        # Durable before it is acknowledged: a store that is down rejects the submission.
        (failed,) = await self._store_and_start([rec])
        if failed is not None:
            raise failed
        return rec.id

    async def _store_and_start(self, recs: list[TaskRecord]) -> list[BaseException | None]:
        """Store new tasks' rows together (one group-committed write) and start the tasks
        whose rows were stored; what each failed with, or None. A retry of one of these
        submissions meanwhile waits for its write (`_stored`), and hears how it went, also
        when this call is cancelled before it knows."""
        self._hold(recs)
        out: list[BaseException | None] = []
        try:
            try:
                stored = await self._put_rows(recs)
            except Exception as exc:  # the store's put_tasks raised for them all
                stored = [exc] * len(recs)
            for rec, failed in zip(recs, stored, strict=True):
                if failed is None:
                    try:
                        self._admit(rec)
                    except Exception as exc:  # its waiters must hear of it; the others go on
                        log.exception("task %s: stored but could not start", rec.id)
                        failed = exc
                self._done_storing(rec, failed)
                out.append(failed)
            return out
        finally:
            self._unhold(recs)

    def _hold(self, recs: list[TaskRecord]) -> None:
        """Mark new tasks as being stored (`_stored`), if they aren't yet."""
        loop = asyncio.get_running_loop()
        for rec in recs:
            if rec.id not in self._storing:
                self._storing[rec.id] = (rec, loop.create_future())

    def _unhold(self, recs: list[TaskRecord]) -> None:
        """Tell the waiters of tasks still marked as being stored that storing them was
        interrupted (a call cancelled before its write's outcome was known)."""
        for rec in recs:
            if rec.id in self._storing:
                self._done_storing(rec, StoreUnavailable(f"storing task {rec.id} was interrupted"))

    async def _put_rows(self, recs: list[TaskRecord]) -> list[BaseException | None]:
        """Store new tasks' rows in one `put_tasks` call; what each failed with, or None (a
        row that can't be made fails alone)."""
        if self.store is None:
            return [None] * len(recs)
        out: list[BaseException | None] = [None] * len(recs)
        rows, where = [], []
        for i, rec in enumerate(recs):
            try:
                rows.append(rec.to_row(self.swarm_id))
            except Exception as exc:
                out[i] = exc
                continue
            where.append(i)
        for i, failed in zip(where, await self.store.put_tasks(rows), strict=True):
            out[i] = failed
        return out

    async def _stored(self, task_id: str) -> None:
        """Wait while another call is still storing this task's row (a client's retry sent
        while the first try waits for its write); raises what that write raised."""
        held = self._storing.get(task_id)
        if held is not None:
            await asyncio.shield(held[1])

    def _done_storing(self, rec: TaskRecord, exc: BaseException | None) -> None:
        _, fut = self._storing.pop(rec.id)
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc if isinstance(exc, Exception) else
                              StoreUnavailable(f"storing task {rec.id} was interrupted"))
            fut.exception()  # retrieved: a write nobody else waited for is not an error twice

    async def submit_many(self, texts: list[str], *, user: str = "anonymous",
                          task_ids: list[str | None] | None = None) -> list[str]:
        """`submit` for each text (with its id from `task_ids`, if given), the new tasks' rows
        stored together: one group-committed write for the batch, not a round trip a task.
        Every text is checked before any task is made. Should some rows fail to store, the
        tasks whose rows were stored still start, and the error is raised: the same call
        again (same ids) makes only the missing ones."""
        ids = task_ids if task_ids is not None else [None] * len(texts)
        if len(ids) != len(texts):
            raise UserError(f"submit_many: {len(texts)} texts but {len(ids)} task ids")
        for i, text in enumerate(texts):
            try:
                self.check_text(text)
            except UserError as exc:
                raise UserError(f"submit_many: text {i}: {exc}") from None
        named = [t for t in ids if t is not None]
        await self._recall(named)
        self._not_forgetting(named)
        out: list[str | TaskRecord] = []
        batch: dict[str, TaskRecord] = {}
        try:
            for text, tid in zip(texts, ids, strict=True):
                rec = self._prepare(text, user, None, None, tid, None, batch)
                if not isinstance(rec, str):
                    batch[rec.id] = rec
                out.append(rec)
        finally:
            self._drop_finished()  # the recalled ones have been looked at
        fresh = list(batch.values())
        errors: list[BaseException] = []
        # In chunks: while one chunk's rows are written, the tasks of the chunks before it
        # take their first steps, so a large batch keeps the agents busy from its start. All
        # are marked as being stored from the start, for a retry of this call meanwhile.
        self._hold(fresh)
        try:
            for i in range(0, len(fresh), _SUBMIT_CHUNK):
                chunk = fresh[i:i + _SUBMIT_CHUNK]
                refused = [e for e in await self._store_and_start(chunk) if e is not None]
                errors += refused
                if len(refused) == len(chunk):
                    # Nothing of this chunk was stored (the store is down, say): the rest is
                    # not tried, each chunk waiting out the same failure; its tasks fail with
                    # it, counted in the note below.
                    for rec in fresh[i + len(chunk):]:
                        self._done_storing(rec, refused[0])
                        errors.append(refused[0])
                    break
        finally:
            self._unhold(fresh)
        if errors:
            failed, lost = errors[0], len(errors)
            if isinstance(failed, Exception):
                failed.add_note(f"submit_many: {lost} of {len(fresh)} new tasks could not be "
                                "stored (the others were created; the same call again with "
                                "the same task ids makes only the missing ones)")
            raise failed
        for r in out:  # ids other calls were still storing: theirs must have been stored
            if isinstance(r, str):
                await self._stored(r)
        return [r if isinstance(r, str) else r.id for r in out]

    def _prepare(self, text: str, user: str, metadata: dict[str, Any] | None,
                 context_id: str | None, task_id: str | None, message_id: str | None,
                 batch: dict[str, TaskRecord] | None = None) -> TaskRecord | str:
        """A new task's record, not yet stored; or the id of the task this submission made
        already (a client's retry), here or earlier in `batch`."""
        self.check_text(text)
        _check_user(user)
        if metadata is not None and not isinstance(metadata, dict):
            raise UserError(f"metadata must be a dict (a JSON object), not "
                            f"{type(metadata).__name__}")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) for k in meta):
            raise UserError("metadata keys must be strings, not "
                            + ", ".join(sorted({type(k).__name__ for k in meta
                                                if not isinstance(k, str)})))
        meta.setdefault("user", user)
        try:
            meta_json = _meta_json(meta)  # also checks that it is JSON
        except (TypeError, ValueError) as e:
            raise UserError(f"metadata must be JSON-serialisable: {e}") from None
        size = len(meta_json) if meta_json is not None else sum(  # about its JSON's length
            len(k) + (len(v) if type(v) is str else 5) + 6 for k, v in meta.items())
        if size > _MAX_METADATA_CHARS:
            raise UserError(f"metadata is about {size} characters as JSON; a task's metadata "
                            f"may be at most {_MAX_METADATA_CHARS}")
        if meta:
            check_chars(meta, "metadata")
        for what, value in (("context_id", context_id), ("message_id", message_id)):
            if value is None:
                continue
            if not isinstance(value, str) or not 1 <= len(value) <= 256:
                raise UserError(f"{what} must be a string of 1 to 256 characters, not "
                                f"{type(value).__name__}"
                                + (f" of {len(value)}" if isinstance(value, str) else ""))
            check_chars(value, what)
        if not task_id:
            task_id = a2a.new_id()  # hex: nothing to check
        elif not isinstance(task_id, str) or not 8 <= len(task_id) <= 64:
            raise UserError("task_id must be a string of 8 to 64 characters")
        else:
            check_chars(task_id, "task_id")
        existing = self.tasks.get(task_id) or (batch or {}).get(task_id)
        if existing is None and task_id in self._storing:
            existing = self._storing[task_id][0]  # another call is storing its row now
        if existing is not None:
            if existing.text == text and existing.user == user:
                return task_id  # the same submission sent again (a client retry)
            raise TaskExists(f"task {task_id} already exists")
        context_id = context_id or a2a.new_id()
        first = a2a.text_message(
            text, role="user", task_id=task_id, context_id=context_id, metadata={"user": user}
        )
        if message_id:
            first.message_id = message_id
        rec = TaskRecord(
            _task=a2a.new_task(task_id, context_id, first, meta), user=user, created=self.clock()
        )
        rec.updated = rec.created
        rec.text, rec.meta_json = text, meta_json
        parent = meta.get("parent_task")
        rec.parent = parent if isinstance(parent, str) else None
        self._evict(len(batch or ()))
        return rec

    def _admit(self, rec: TaskRecord) -> str:
        """Start a stored new task: register it, tell its followers, drive it."""
        task_id = rec.id
        self.tasks[task_id] = rec
        self._emit(rec, TaskStateChanged(task_id=task_id, ts=rec.created, state="submitted"))
        if self.audit is not None:
            self.audit.record("task.submitted", task_id=task_id, user=rec.user, detail=rec.text)
        if rec.parent is not None and rec.parent in self.tasks:
            self.waits.parent[task_id] = rec.parent  # its tool waits for this one (deadlocks)
        rec.driver = asyncio.create_task(self._drive(rec), name=f"task-{task_id}")
        return task_id

    async def respond(self, task_id: str, text: str) -> dict[str, Any]:
        """Answer a task waiting in INPUT_REQUIRED ("rerun" or "skip" an interrupted call)."""
        rec = await self.find(task_id)
        if rec.gates and rec.answer_waiter is None:
            raise UserError(f"task {task_id} waits for approval of gate {', '.join(rec.gates)}: "
                            "answer with approve or deny (swarm approve / swarm deny)")
        if rec.state == "input_required" and rec.answer_waiter is None and \
                rec.driver is not None and not rec.driver.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.asking.wait(), _REASK_WAIT_S)
        if rec.state != "input_required" or rec.answer_waiter is None:
            raise UserError(f"task {task_id} is {rec.state}, not waiting for input")
        if isinstance(text, str):
            check_chars(text, "answer")
        answer = text.strip().lower() if isinstance(text, str) else ""
        if answer not in rec.choices:
            raise UserError(f"answer {' or '.join(map(repr, rec.choices))} (got {text!r}): "
                            f"{rec.question}")
        if rec.answer_waiter.done():  # answered a moment ago; the task hasn't moved on yet
            if rec.answer_waiter.cancelled():  # stopped waiting (canceled, timed out)
                raise UserError(f"task {task_id} is no longer waiting for an answer")
            raise UserError(f"task {task_id}'s question was answered already "
                            f"({rec.answer_waiter.result()!r}); one answer is taken")
        rec.answer_waiter.set_result(answer)
        return rec.summary()

    async def approve(self, task_id: str, gate: str, *, approver: str,
                      args: dict[str, Any] | str | None = None) -> dict[str, Any]:
        """Approve an open approval gate, optionally with edited arguments (what then runs)."""
        return await self.approvals.decide(task_id, gate, "approved", by=approver, args=args)

    async def deny(self, task_id: str, gate: str, *, approver: str,
                   reason: str | None = None) -> dict[str, Any]:
        """Deny an open approval gate; the model gets "denied by <approver>: <reason>"."""
        return await self.approvals.decide(task_id, gate, "denied", by=approver, reason=reason)

    # ---- time travel -------------------------------------------------------------------------

    def _require_store(self) -> Checkpointer:
        if self.store is None:
            raise UserError(f"swarm {self.cfg.name} keeps no durable state (state.store: none)")
        return self.store

    async def history(self, task_id: str, *, full: bool = False) -> list[dict[str, Any]]:
        """The task's checkpoints in order: one row per log entry (with messages if `full`)."""
        store = self._require_store()
        await self.find(task_id)
        snaps = set(await store.snapshots(task_id))
        rows = []
        for e in await store.read(task_id):
            row: dict[str, Any] = {"seq": e.seq, "kind": e.kind, "agent": e.agent,
                                   "step": e.step, "ts": e.ts, "snapshot": e.seq in snaps,
                                   "summary": _describe(e)}
            if full:
                row["data"] = e.data
            rows.append(row)
        return rows

    async def trace(self, task_id: str) -> list[dict[str, Any]]:
        """The task's spans from the trace store (swarm.observability), in start order."""
        await self.find(task_id)
        from swarm.observability.tracing import active

        tracing = active()
        if not self.cfg.tracing.enabled or tracing is None or tracing.store is None:
            raise UserError(f"swarm {self.cfg.name} keeps no traces (tracing.enabled and "
                            "tracing.store must be on)")
        rows = await asyncio.to_thread(tracing.read, task_id)
        return sorted(rows, key=lambda r: r["start"])

    async def fork(self, task_id: str, step: int, *, user: str | None = None) -> str:
        """A new task that starts from the state of `task_id` after step `step` and runs on.

        The new task's log is a copy of the old one up to that step, so nothing before it runs
        again; from there the agents continue as if the original had been interrupted.
        """
        store = self._require_store()
        if type(step) is not int:
            raise UserError(f"fork: step must be an integer, not {type(step).__name__}")
        if user is not None:
            _check_user(user)
        src = await self.find(task_id)
        entries = await store.read(task_id)
        if step < 0 or (entries and step > max(e.step for e in entries)):
            last = max((e.step for e in entries), default=0)
            raise UserError(f"task {task_id} has steps 0..{last}; can't fork at step {step}")
        # Turn boundaries carry the step they follow, so "everything up to step k" is exact.
        kept = [msgspec.structs.replace(e, seq=-1) for e in entries
                if e.step <= step and e.kind not in ("task", "approval")]
        from swarm.governance.approvals import reopened_gates

        kept += reopened_gates(entries, step, self.clock())  # a fork asks for approval again
        new_id = a2a.new_id()
        if kept:
            await store.append(new_id, kept)
        # What the swarm added to the source about how it ended is not the fork's.
        meta = {**{k: v for k, v in src.metadata().items() if k != "budget_exhausted"},
                "forked_from": task_id, "forked_at_step": step}
        first = a2a.text_message(src.text, role="user", task_id=new_id,
                                 context_id=src.context_id, metadata={"user": src.user})
        rec = TaskRecord(_task=a2a.new_task(new_id, src.context_id, first, meta),
                         user=user or src.user, created=self.clock())
        rec.text, rec.updated, rec.meta_json = src.text, rec.created, _meta_json(meta)
        await self._persist(rec)
        self.tasks[new_id] = rec
        self._emit(rec, TaskStateChanged(task_id=new_id, ts=rec.created, state="submitted",
                                         detail=f"forked from {task_id} at step {step}"))
        rec.driver = asyncio.create_task(self._drive(rec, resume=True), name=f"task-{new_id}")
        return new_id

    async def forget(self, task_id: str) -> None:
        """Delete a finished task's durable state and drop it from the table."""
        rec = await self.find(task_id)
        if rec.state not in a2a.TERMINAL:
            raise UserError(f"task {task_id} is {rec.state}; cancel it before deleting it")
        under_way = self._forgetting.get(task_id)
        if under_way is not None:  # another call is deleting it now: done when it is
            await asyncio.shield(under_way)
            return
        deleting = self._forgetting[task_id] = asyncio.get_running_loop().create_future()
        # A row waiting to be written (`_write_rows_later`) would bring the task back.
        unstored = self._unstored.pop(task_id, None)
        try:
            if self.store is not None:
                await self.store.delete(task_id)
            self.tasks.pop(task_id, None)
            self._finished.pop(task_id, None)
        except BaseException as exc:
            if unstored is not None and task_id not in self._unstored:
                self._defer(unstored[0])  # not deleted: its row is still to be written
            deleting.set_exception(exc if isinstance(exc, Exception) else
                                   UserError(f"deleting task {task_id} was interrupted"))
            deleting.exception()  # retrieved: no "never retrieved" warning without a waiter
            raise
        else:
            deleting.set_result(None)
        finally:
            del self._forgetting[task_id]

    def _not_forgetting(self, task_ids: list[str]) -> None:
        """Refuse a submission naming a task that is being deleted: made now, it could lose
        its stored state to the deletion, or be taken for a retry of the deleted task."""
        if self._forgetting:
            for tid in task_ids:
                if tid in self._forgetting:
                    raise UserError(f"task {tid} is being deleted; submit it again once "
                                    "the deletion is done")

    async def mark_store(self) -> None:
        """Remember the durable store's epoch (`Checkpointer.epoch`), once: before any turn
        can be resumed, so that a store that later comes back without its data is told from
        one that kept it. `load` calls it; so does `LocalSwarm` as it starts."""
        if self.store is not None and self._epoch is None:
            self._epoch = await self.store.epoch()

    async def _store_lost(self, rec: TaskRecord) -> str | None:
        """Why a turn of `rec` can't be resumed from the store, if the store lost its data
        since the task was created (its epoch changed since `mark_store`, or since the last
        change this supervisor saw); None if it kept it, or can't tell."""
        if self.store is None or self._epoch is None:
            return None
        try:
            now = await self.store.epoch()
        except StoreUnavailable:
            return None  # down again: the resumed turn stops on it, and is checked again then
        if now is None:
            return None
        if now != self._epoch:  # lost now: tasks created from here on are in the new store
            self._epoch, self._epoch_since = now, self.clock()
        if rec.created >= self._epoch_since:
            return None
        return (f"the durable store {store_name(self.store)} lost its data (its epoch changed: "
                "a Redis server restarted without its append-only file, or its database was "
                "flushed); the turn is not resumed, since from an empty log it would run "
                "finished tool calls again. Run Redis with appendonly yes")

    async def load(self) -> int:
        """Rebuild the task table from the durable store and resume unfinished tasks."""
        if self.store is None:
            return 0
        await self.mark_store()
        resumed = 0
        stored = await self.store.list_tasks(self.swarm_id)
        self._sweep_later(stored)
        rows = [r for r in stored if r.task_id not in self.tasks]
        # Only the newest finished tasks are made into records (limits.finished_in_memory):
        # the others are read back by id when asked for.
        ended = [r for r in rows if r.state in a2a.TERMINAL]
        keep = self.cfg.limits.finished_in_memory
        if len(ended) > keep:
            newest = {id(r) for r in heapq.nlargest(keep, ended, key=lambda r: r.updated)}
            rows = [r for r in rows if r.state not in a2a.TERMINAL or id(r) in newest]
            self._dropped += len(ended) - keep
        for row in rows:
            try:
                rec = TaskRecord.from_row(row)
            except Exception as exc:
                self.restore_problems.append(f"task {row.task_id}: row unusable: {exc}")
                continue
            self.tasks[rec.id] = rec
            if rec.state not in a2a.TERMINAL:
                rec.driver = asyncio.create_task(self._drive(rec, resume=True),
                                                 name=f"task-{rec.id}")
                resumed += 1
        # The finished ones in the order they finished; only the newest stay in memory.
        for rec in sorted((r for r in self.tasks.values() if r.done.is_set()),
                          key=lambda r: r.updated):
            self._finished[rec.id] = None
        self._drop_finished()
        if self.meter is not None:
            self.meter.resync(self.tasks.values())
        return resumed

    def _sweep_later(self, rows: list[TaskRow]) -> None:
        """With an archive (`state.archive`): move the finished tasks Redis still holds to it
        in the background. A task is archived as it finishes, by the process that stored its
        end; one whose run failed, or was lost with a process that died, would stay in Redis
        for good without this."""
        sweep = getattr(self.store, "archive_finished", None)
        if sweep is None or (self._sweep is not None and not self._sweep.done()):
            return

        async def run() -> None:
            try:
                moved = await sweep(self.swarm_id, rows)
            except Exception:
                log.warning("archiving the finished tasks left in redis failed; the next "
                            "start tries again", exc_info=True)
                return
            if moved:
                log.info("archived %d finished tasks left in redis", moved)

        self._sweep = asyncio.create_task(run(), name="archive-sweep")

    def get(self, task_id: str) -> TaskRecord:
        """The record of a task in memory, or `TaskNotFound` (`find` also reads the store)."""
        rec = self.tasks.get(task_id)
        if rec is None:
            raise TaskNotFound(f"no task {task_id!r} in swarm {self.cfg.name}")
        return rec

    async def find(self, task_id: str) -> TaskRecord:
        """The record of a task: from memory, or, for a finished task no longer kept there
        (limits.finished_in_memory), rebuilt from its stored row, without its live events.
        `TaskNotFound` if neither has it."""
        rec = self.tasks.get(task_id)
        if rec is not None:
            return rec
        if task_id in self._storing:  # a new task whose row is being written: wait for it
            with contextlib.suppress(Exception):
                await self._stored(task_id)
            rec = self.tasks.get(task_id)
            if rec is not None:
                return rec
        if self.store is not None and isinstance(task_id, str):
            rec = self._from_stored(task_id, await self.store.get_task(task_id))
            if rec is not None:
                return rec
        raise TaskNotFound(f"no task {task_id!r} in swarm {self.cfg.name}")

    def _from_stored(self, task_id: str, row: TaskRow | None) -> TaskRecord | None:
        """A finished task's record rebuilt from its stored row, or None: no row, another
        swarm's, or a task that hasn't finished (those are all in memory; a row of one that
        isn't is left over, and is not made into a record nothing drives)."""
        if row is None or row.swarm != self.swarm_id or row.state not in a2a.TERMINAL:
            return None
        try:
            return TaskRecord.from_row(row)
        except Exception as exc:
            raise UserError(f"task {task_id}: its stored row can't be read: {exc}") from None

    async def _recall(self, task_ids: list[str]) -> None:
        """Put finished tasks that were dropped from memory back into it, for these ids that a
        caller chose: a submission with the id of such a task must be recognised as a retry,
        or refused, not made again over its stored row."""
        if not self._dropped or self.store is None:
            return
        wanted = [t for t in dict.fromkeys(task_ids) if isinstance(t, str)
                  and t not in self.tasks and t not in self._storing]
        rows = await asyncio.gather(*(self.store.get_task(t) for t in wanted))
        for tid, row in zip(wanted, rows, strict=True):
            rec = self._from_stored(tid, row)
            if rec is not None and tid not in self.tasks:
                self.tasks[tid] = rec
                self._finished[tid] = None  # the newest: the caller trims after looking

    def _drop_finished(self) -> None:
        """Drop the oldest finished tasks from memory beyond limits.finished_in_memory (with a
        durable store, which has their final rows)."""
        if self.store is None:
            return
        over = len(self._finished) - self.cfg.limits.finished_in_memory
        if over <= 0:
            return
        finished, tasks = self._finished, self.tasks
        for _ in range(over):
            tid, _none = finished.popitem(last=False)
            rec = tasks.get(tid)
            if rec is not None and rec.done.is_set():
                del tasks[tid]
                self._dropped += 1

    def list(self, state: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """Summaries of tasks, newest first, optionally filtered."""
        if state is not None and state not in a2a.STATES:
            raise UserError(f"unknown state {state!r}; one of {sorted(a2a.STATES)}")
        rows = [
            r.summary()
            for r in self.tasks.values()
            if (state is None or r.state == state) and (user is None or r.user == user)
        ]
        return sorted(rows, key=lambda r: r["created"], reverse=True)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task that hasn't finished; a finished task is left as it is."""
        rec = await self.find(task_id)
        if rec.state in a2a.TERMINAL:
            return rec.summary()
        if rec.driver is not None:
            rec.driver.cancel()
        for role in list(rec.active):
            await self.pool.cancel(role, rec.context_id, task_id)
        if rec.state not in a2a.TERMINAL:
            await self._finish(rec, "canceled", error_class=None, error="canceled by request")
        return rec.summary()

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """Wait until the task is terminal (or the timeout passes) and return its summary."""
        return (await self.wait_many([task_id], timeout))[0]

    async def wait_many(self, task_ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
        """`wait` for several tasks under one deadline; their summaries in the order given.
        The tasks are waited for one after another in this task (the wait ends with the last
        to finish either way), not in a Task each. An unknown id fails the call at once."""
        # The records in memory are taken before any await: one may leave memory meanwhile.
        recs = [self.tasks.get(t) for t in task_ids]
        missing = list(dict.fromkeys(t for t, r in zip(task_ids, recs, strict=True)
                                     if r is None))
        if missing:
            found = dict(zip(missing, await asyncio.gather(*(self.find(t) for t in missing)),
                             strict=True))
            recs = [r or found[t] for t, r in zip(task_ids, recs, strict=True)]
        rows: list[dict[str, Any] | None] = [None] * len(recs)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for i, rec in enumerate(recs):
                    if not rec.done.is_set():
                        await rec.done.wait()
                    # Made as the wait passes it (a finished task's row changes no more): when
                    # the last task ends, the rows of those that ended before it are ready.
                    rows[i] = rec.summary()
        return [row if row is not None else rec.summary()
                for row, rec in zip(rows, recs, strict=True)]

    async def events(self, task_id: str, cursor: int, timeout: float) -> tuple[list[Event], bool]:
        """Events from `cursor` on, waiting up to `timeout` s for new ones; and whether it ended.
        A finished task read back from the store (one no longer kept in memory, see
        limits.finished_in_memory, or one a restarted supervisor loaded) has only its
        TaskFinished."""
        rec = await self.find(task_id)
        if cursor >= rec.event_count and not rec.done.is_set():
            waiter = rec.watch()
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except TimeoutError:
                pass
        if cursor >= rec.event_count:
            return [], rec.done.is_set()
        return rec.events_from(cursor), rec.done.is_set()

    def push_events(self, batch: list[Event]) -> None:
        """Events flushed by agents during their turns (an agent sends each task's as a run)."""
        tasks, i, n = self.tasks, 0, len(batch)
        while i < n:
            task_id = batch[i].task_id
            j = i + 1
            while j < n and batch[j].task_id == task_id:
                j += 1
            rec = tasks.get(task_id)
            if rec is not None:
                self._emit_run(rec, batch[i:j] if i or j < n else batch)
            i = j

    def _emit_run(self, rec: TaskRecord, run: list[Event], *, running: bool = True) -> None:
        """`_emit` for a run of one task's events, its followers woken once: the agents' step
        events (thousands a second) take a path of their own, as the task meter needs only
        their agent (`TaskMeter.saw`); other kinds go through `_emit`. `running`: the events
        of a turn still running, whose progress listings show (not those a report brought)."""
        if running:
            done = progress(run)
            if done is not None:
                rec.ran(run[-1].agent, done)
        events = rec._writable_events()
        if rec.state in a2a.TERMINAL or rec.event_count + len(run) >= _MAX_EVENTS_PER_TASK:
            for ev in run:
                self._emit(rec, ev, wake=False)
            self._wake(rec)
            return
        append, errors, added = events.append, rec.errors, 0
        for ev in run:
            kind = type(ev)
            if kind in FILED_ONE_BY_ONE:
                self._emit(rec, ev, wake=False)
                continue
            append(ev)
            added += 1
            if (kind is ToolCalled or kind is ModelCalled) and ev.error_class:  # type: ignore[attr-defined]
                cls = ev.error_class  # type: ignore[attr-defined]
                errors[cls] = errors.get(cls, 0) + 1
        rec.event_count += added
        if self.meter is not None:
            self.meter.saw(rec.id, run[-1].agent)
        self._wake(rec)

    def push_packed(self, batch: bytes) -> None:
        """Events flushed by agent replicas (`swarm.events.pack_runs`): each task's run is
        kept packed until someone reads the task's events (most are never read while the
        task runs), with its count and failed calls filed now."""
        runs, loose = unpack_runs(batch)
        tasks = self.tasks
        for task_id, agent, n, errors, blob, done in runs:
            rec = tasks.get(task_id)
            if rec is None:
                continue
            # Terminal already (`done` is set a moment later, after `_finish`'s last await):
            # the careful path keeps TaskFinished last.
            if rec.state in a2a.TERMINAL or rec.event_count + n >= _MAX_EVENTS_PER_TASK:
                self._emit_run(rec, unpack_events(blob))  # the careful path
                continue
            rec._writable_events().append(blob)
            rec._runs = True
            rec.event_count += n
            if done is not None:
                rec.ran(agent, done)
            rec._tail += len(blob)
            if rec._tail >= _SQUEEZE_AT and not rec._read:  # nobody has read it yet
                rec.squeeze()
            if errors:
                mine = rec.errors
                for cls, k in errors.items():
                    mine[cls] = mine.get(cls, 0) + k
            if self.meter is not None:
                self.meter.saw(task_id, agent)
            self._wake(rec)
        if loose:
            self.push_events(loose)

    # ---- driving -----------------------------------------------------------------------------

    async def _drive(self, rec: TaskRecord, *, resume: bool = False) -> None:
        budget = self.cfg.budgets.task
        trace = None if self._tracer is None else self._tracer.start_workflow(
            rec.id, rec.context_id, rec.user, resume)
        try:
            if rec.state == "submitted":
                # Not stored: a restarted supervisor resumes a submitted task as it does a
                # working one, so the row written at submission serves until the next state
                # (one write of the task's row fewer, of three).
                await self._set_state(rec, "working", persist=False)
            remaining = rec.created + budget.max_wall_s - self.clock()
            if self.cfg.budgets.on_exhausted == "wrap_up":
                # The turn stops itself at max_wall_s and wraps up; this is the hard stop.
                remaining += self.cfg.budgets.wrap_up_grace_s
            # The hard stop cancels this task (`_Deadlines`): not `asyncio.wait_for`, which on
            # Python 3.11 runs `_run` in a Task of its own, nor a timer of its own per task.
            me = asyncio.current_task()
            assert me is not None
            cancelling = me.cancelling()
            self._deadlines.set(rec.id, max(remaining, 0.001), me)
            try:
                result = await self._run(rec, resume)
            except asyncio.CancelledError:
                if not self._deadlines.clear(rec.id, me) or me.uncancel() > cancelling:
                    raise  # cancelled by request (or by both: the request wins)
                for role in list(rec.active):
                    await self.pool.cancel(role, rec.context_id, rec.id)
                why = f"task max_wall_s ({budget.max_wall_s:g})"
                self._alert(rec, "budget_exhausted", "fail", why)
                await self._finish(rec, "failed", "budget", f"budget exhausted: {why}",
                                   budget_exhausted=why)
                return
            finally:
                # Whatever ended `_run`; a deadline that passed as it returned (its
                # cancellation swallowed) is withdrawn, as `asyncio.timeout` does.
                if self._deadlines.clear(rec.id, me):
                    me.uncancel()
            if result.kind == "final":
                await self._finish(rec, "completed", answer=result.text,
                                   budget_exhausted=result.budget_exhausted)
            elif result.kind == "canceled":
                await self._finish(rec, "canceled", None, "canceled")
            else:
                await self._finish(rec, "failed", result.error_class or "orchestration",
                                   result.error or "turn failed",
                                   budget_exhausted=result.budget_exhausted)
        except asyncio.CancelledError:
            if rec.state not in a2a.TERMINAL:
                await self._finish(rec, "canceled", None, "canceled by request")
        except RunError as exc:
            await self._finish(rec, "failed", exc.error_class, str(exc))
        except Exception as exc:  # one task's bug must never take the supervisor down
            log.exception("task %s crashed in the supervisor", rec.id)
            await self._finish(rec, "failed", "orchestration", f"{type(exc).__name__}: {exc}")
        finally:
            if trace is not None:
                self._tracer.end_workflow(trace, rec)
            if rec.driver is asyncio.current_task():
                rec.driver = None  # a finished task keeps no asyncio.Task (about 0.3 KB)

    async def _run(self, rec: TaskRecord, resume: bool) -> TurnResult:
        """Run the task by its strategy; after a restart, continue from where its log ends."""
        strategy = self.cfg.supervisor.strategy
        if strategy == "parallel":
            return await self._parallel(rec, rec.text, resume=resume)
        if resume and self.store is not None:
            state, problems = await restore(self.store, rec.id)
            for problem in problems:
                log.warning("task %s: %s", rec.id, problem)
            rec.handoffs, rec.turns = state.handoffs, state.turns
            turn = state.open_turn
            # The task's counters as of the open turn's start, or of the log's end.
            rec.steps = turn.step_offset if turn is not None else state.step
            for k, v in (turn.base if turn is not None else state.totals()).items():
                setattr(rec, k, v)
            # Each agent's ended turns, for its per-agent budget (an open turn counts when its
            # resume ends, as the task's counters do).
            rec.by_agent = {agent: self._agent_usage(agent, used)
                            for agent, used in state.by_agent.items()}
            waited = rec.waiting.get(rec.id) if rec.waiting is not None else None
            if waited is not None and (turn is None or turn.turn != waited.get("turn")):
                # The turn that waited (as the row says) has ended in the log since: the
                # counters just read count it.
                del rec.waiting[rec.id]
                rec.waiting = rec.waiting or None
            result = await self._from_log(rec, state, rec.transcript, rec.id)
            if result is not None:
                return result
        if strategy == "router":
            return await self._route(rec, rec.text)
        return await self._chain(rec, self.cfg.supervisor.entry or "", rec.text, rec.transcript)

    async def _chain(self, rec: TaskRecord, agent: str, text: str,
                     transcript: list[dict[str, Any]], *, resume: bool = False,
                     log_id: str | None = None, ended: TurnResult | None = None,
                     stuck_from: int = 0) -> TurnResult:
        """Run turns from `agent`, following handoffs, until one ends the task. `ended`: the
        result of `agent`'s turn that had ended before a restart (read from the log), taken
        as the chain's first turn instead of running one. `stuck_from`: where in the
        transcript stuck detection counts from (past the start after an operator's
        "continue"; a chain carried on from the log goes on from where it was)."""
        trail = [agent]  # for stuck detection: agents in turn order
        while True:
            if ended is not None:
                result, ended = ended, None
            else:
                result = await self._turn(rec, agent, text, transcript, resume=resume,
                                          log_id=log_id, stuck_from=stuck_from)
            resume = False
            if result.stuck in _ESCALATED and self.cfg.stuck.action == "escalate":
                if not await self._escalate(rec, result.error or str(result.stuck)):
                    return result
                trail, stuck_from = [agent], len(transcript)
                text = ("An operator reviewed this task, which looked stuck "
                        f"({result.error}), and asked you to continue without repeating it.")
                continue
            if result.kind != "handoff":
                return result
            rec.handoffs += 1
            if rec.handoffs > self.cfg.supervisor.max_handoffs:
                return _failed(rec.id, agent, "orchestration",
                               f"too many handoffs ({self.cfg.supervisor.max_handoffs} allowed)")
            assert result.target is not None
            trail.append(result.target)
            limit = self.cfg.stuck.ping_pong
            if limit is not None and bounces(trail) >= limit:
                cause = (f"{bounces(trail)} handoffs in a row between {agent} and "
                         f"{result.target} (stuck.ping_pong is {limit})")
                if self.cfg.stuck.action == "stop":
                    return self._stuck(rec, agent, "ping_pong", cause)
                stuck.record(self.swarm_id, "ping_pong")
                self._alert(rec, "stuck.ping_pong", "escalate", cause)
                rec.stuck = "ping_pong"
                await self._log_escalation(rec, log_id or rec.id, agent, cause)
                if not await self._escalate(rec, cause):
                    return self._stuck(rec, agent, "ping_pong", cause, counted=True)
                trail = [result.target]
            agent = result.target
            text = _handoff_text(result.text, result.agent)

    async def _turn(self, rec: TaskRecord, agent: str, text: str,
                    transcript: list[dict[str, Any]], *, resume: bool = False,
                    log_id: str | None = None, stuck_from: int = 0) -> TurnResult:
        cfg, budget = self.cfg, self.cfg.budgets.task
        swarm_used = self.swarm_usage.current()
        gone = swarm_exhausted(cfg, swarm_used)
        if gone is not None:
            # No new work once the swarm's budget is spent (a wrap-up would spend more of it).
            self._alert(rec, "budget_exhausted", "fail", gone)
            res = _failed(rec.id, agent, "budget", f"budget exhausted: {gone}")
            res.budget_exhausted = gone
            return res
        mine = rec.by_agent.setdefault(agent, Usage())
        started = self.clock()
        allowance, steps_left, steps_why = turn_allowance(
            cfg, agent, task_usage(rec), mine, swarm_used, now=started,
            task_deadline=rec.created + budget.max_wall_s)
        max_steps = per_turn = cfg.agents[agent].max_steps_per_turn
        if steps_left is not None and steps_left <= per_turn:
            max_steps = steps_left
        else:
            steps_why = f"agents.{agent}.max_steps_per_turn ({per_turn})"
        context_id = rec.context_id
        msg = a2a.text_message(text, role="user", task_id=rec.id, context_id=context_id,
                               metadata={"to_agent": agent})
        rec.live().history.append(msg)
        rec.agent = agent
        req = TurnRequest(
            task_id=rec.id, context_id=context_id, message=a2a.dumps(msg), transcript=transcript,
            step_offset=rec.steps, max_steps=max_steps, deadline=rec.created + budget.max_wall_s,
            log_id=log_id or rec.id, turn_id=str(rec.turns), resume=resume, totals=rec.totals(),
            user=rec.user, added_at_end=self.store is None,
            guard={"budget": allowance, "steps_why": steps_why, "stuck_from": stuck_from},
            by_agent={} if self.store is None else {
                name: {f: getattr(u, f) for f in AgentUsage.__struct_fields__}
                for name, u in rec.by_agent.items() if u.model_calls or u.steps},
        )
        del msg  # in the task's history and the request: not held while the turn runs
        rec.park()  # nothing changes the A2A task until the turn is over
        retries = 0
        outage_waited = 0.0  # time this turn waited for an unreachable store, in all
        # While the turn keeps stopping on the store right after it answered the supervisor
        # (a replica that can't reach it, an outage that came back): when it was last sent
        # again, and the pause before the next resend.
        resent: float | None = None
        pause = 0.0
        reported: TurnResult | None = None  # the turn's last report (each counts it all)
        rec.active.add(agent)
        replica = (agent, replica_for(context_id, cfg.agents[agent].replicas))
        self.waits.enter(rec.id, replica, cfg.agents[agent].max_sessions)
        reports = False  # whether the turn leaves the loop below with a report to count
        try:
            cycle = self.waits.cycle(rec.id) if cfg.stuck.deadlock else None
            if cycle is not None:
                return self._stuck(rec, agent, "deadlock", (
                    f"a cycle of tasks waiting on each other: {' -> '.join(cycle)} -> "
                    f"{cycle[0]} (a sub-task waits for a session slot of agent {agent} held "
                    "by a task that waits for it)"))
            while True:
                down: str | None = None  # why the turn stopped on an unreachable store
                attempt: TurnResult | None = None
                try:
                    result = attempt = await self._send(agent, context_id, req, retries)
                except StuckError as exc:
                    return self._stuck(rec, agent, exc.detector, str(exc))
                except _ActorLost as exc:
                    # The replica died mid-turn; Ray restarts it, and it resumes the turn from
                    # the durable log. Without a store there is nothing to resume from.
                    retries += 1
                    if self.store is None or retries > self.cfg.state.max_turn_retries:
                        raise
                    lost = await self._store_lost(rec)
                    if lost is not None:
                        raise CheckpointError(lost) from exc
                    log.warning("task %s: %s; resuming (attempt %d)", rec.id, exc, retries)
                    self._resume_req(rec, agent, req)
                    continue
                except StoreUnavailable as exc:  # a replica that can't reach it to start
                    if self.store is None:
                        raise
                    down = str(exc)
                else:
                    reported = result
                    if result.store_unavailable and self.store is not None:
                        down = result.error or "the store is unreachable"
                if down is not None:
                    # The turn stopped, its end not logged: once the store answers again it
                    # resumes from its log (finished tool calls are not run again), as after
                    # a replica crash; the attempt's usage is the log's, counted then.
                    if attempt is not None and attempt.events:
                        self._emit_run(rec, attempt.events)
                    t0 = time.monotonic()
                    if resent is None:
                        pause = 0.0
                    else:  # stopped again: what the store made it wait counts, and resends
                        # back off (a replica that refuses at once would be sent it in a loop)
                        outage_waited += min(t0 - resent, cfg.state.outage_timeout_s)
                        pause = min(max(2 * pause, 0.05), _PROBE_MAX_DELAY_S)
                    failure = await self._outlast_outage(rec, agent, down, outage_waited, pause)
                    outage_waited += time.monotonic() - t0
                    if failure is None:
                        self._resume_req(rec, agent, req)
                        resent = time.monotonic()
                        continue
                    if attempt is None:  # refused as it was sent
                        result = _failed(rec.id, agent, "checkpoint", failure)
                        if reported is not None:  # what the turn ran up to its last report
                            for name in ("steps", "input_tokens", "output_tokens",
                                         "cached_tokens", "model_calls", "tool_calls"):
                                setattr(result, name, getattr(reported, name))
                    else:
                        result = dataclasses.replace(
                            attempt, error=failure, store_unavailable=False, events=[],
                            message=a2a.dumps(a2a.text_message(failure, role="agent",
                                                               task_id=rec.id)))
                    reports = True
                    break
                resent = None  # past the outage
                if result.kind != "input_required":
                    reports = True
                    break
                # What the turn ran up to its question counts while it waits (listings, the
                # row stored as it parks), replaced by each later report of the same turn.
                waiting = rec.waiting if rec.waiting is not None else {}
                waiting[req.log_id] = {
                    "steps": result.steps, "input_tokens": result.input_tokens,
                    "output_tokens": result.output_tokens, "model_calls": result.model_calls,
                    "tool_calls": result.tool_calls, "cost_usd": self._cost(agent, result),
                    "turn": req.turn_id}
                rec.waiting = waiting
                if result.events:
                    self._emit_run(rec, result.events, running=False)
                rec.turn_counted(agent)  # `waiting` holds what it ran
                # No turn of this agent runs while the task waits: step events of the turn
                # that arrive after its report are not progress to count again.
                rec.active.discard(agent)
                if result.gate is not None:
                    # An approval gate: the decision goes into the log, where the resumed
                    # turn finds it (swarm.governance.approvals).
                    await self._await_gate(rec, result.gate)
                    req.decision = None
                else:
                    req.decision = await self._ask(rec, result.text)
                req.resume = True
                rec.active.add(agent)
        finally:
            rec.active.discard(agent)
            self.waits.leave(rec.id, replica)
            if not reports:  # cut short (canceled, out of time, stuck, its replica lost)
                self._count_unreported(rec, agent, started)
        if rec.waiting is not None:  # its report below counts the whole turn
            rec.waiting.pop(req.log_id, None)
            rec.waiting = rec.waiting or None
        rec.turns += 1
        rec.live().history.append(a2a.loads_message(result.message))
        transcript.extend(result.added)
        rec.add(result)
        if result.events:
            self._emit_run(rec, result.events, running=False)
        rec.turn_counted(agent)
        self._account(rec, agent, result, started)
        return result

    def _count_unreported(self, rec: TaskRecord, agent: str, started: float | None) -> None:
        """Count what a turn that ends without its report ran, as its step events said
        (`TaskRecord.running`), for the task, the agent and the swarm: a task canceled, or
        stopped at max_wall_s, while a turn runs gets no report of it, and its calls must
        still count (its counters, its cost, the agent's and the swarm's budgets). Calls made
        after the agent's last push of events (every 50-250 ms) are not counted; the usage
        ledger has every call. A swarm going down counts nothing: the next supervisor resumes
        the turn, and its report counts it all. Nor does a task that has ended (`_finish`
        counted its running turns as it ended). `started`: when the turn started, if known
        (the agent's wall time in the task)."""
        running = rec.running
        done = None if running is None else running.pop(agent, None)
        if running is not None and not running:
            rec.running = None
        if done is None or (self.stopping and self.store is not None) or \
                rec.state in a2a.TERMINAL:
            return
        steps, models, tools, tokens_in, tokens_out, cached = done
        ran = TurnResult(task_id=rec.id, agent=agent, kind="canceled", message=b"", steps=steps,
                         input_tokens=tokens_in, output_tokens=tokens_out, cached_tokens=cached,
                         model_calls=models, tool_calls=tools)
        rec.add(ran)
        self._account(rec, agent, ran, self.clock() if started is None else started)

    def _resume_req(self, rec: TaskRecord, agent: str, req: TurnRequest) -> None:
        """Make `req` the resume of its turn from the durable log (after the replica died, or
        the turn stopped on an unreachable store): the log must reach every step reported
        durable, and the held hot snapshot goes with it."""
        req.resume, req.decision = True, None
        # What the turn ran before stays in its progress (a cut now counts it; its report
        # counts the whole turn): a step the resumed turn redoes is shown and counted twice
        # until then, as its model call was made twice.
        req.durable_step = max(req.durable_step, self._durable_step(rec, agent, req.step_offset))
        held = self.hot.get(req.log_id)
        req.hot = held[1] if held is not None else None

    async def _outlast_outage(self, rec: TaskRecord, agent: str, why: str, waited: float,
                              pause: float = 0.0) -> str | None:
        """Wait for the durable store to answer again after agent `agent`'s turn stopped on it
        (`why`), for what is left of state.outage_wait_s after the `waited` seconds this turn
        waited already; None once it answers, else the task's error, naming the store.
        `pause` (the turn stopped again as soon as it was resumed): wait that long first, and
        log it without a new alert."""
        assert self.store is not None
        limit = self.cfg.state.outage_wait_s
        left = limit - waited
        where = store_name(self.store)
        self._seen_down = True
        if left > 0:
            log.log(logging.INFO if pause else logging.WARNING,
                    "task %s: the turn of agent %s stopped, the durable store %s is "
                    "unreachable (%s); waiting up to %g s more for it (state.outage_wait_s), "
                    "then the turn resumes from its log", rec.id, agent, where, why, left)
            if not pause:
                self._alert(rec, "store_unavailable", "wait",
                            f"the store {where} is unreachable: waiting up to {left:g} s for it "
                            f"(state.outage_wait_s), then agent {agent}'s turn resumes ({why})")
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(left):
                    if pause:
                        await asyncio.sleep(pause)
                    await self._store_answers()
            except TimeoutError:
                waited += time.monotonic() - t0
            else:
                lost = await self._store_lost(rec)
                if lost is not None:
                    log.warning("task %s fails: %s", rec.id, lost)
                    self._alert(rec, "store_unavailable", "fail", lost)
                    return lost
                log.info("task %s: the store %s answers again after %.1f s; resuming the turn "
                         "of agent %s from its log", rec.id, where, time.monotonic() - t0,
                         agent)
                return None
        error = (f"the durable store {where} was unreachable: agent {agent}'s turn stopped on it "
                 f"({why}), and the task waited {waited:.3g} s more for it to answer "
                 f"(state.outage_wait_s is {limit:g} s)")
        log.warning("task %s fails: %s", rec.id, error)
        self._alert(rec, "store_unavailable", "fail", error)
        return error

    async def _store_answers(self) -> None:
        """Return once the durable store answers again. One probe (`Checkpointer.start`, which
        fails at once while the store is down), backing off to `_PROBE_MAX_DELAY_S`, serves
        every task that waits; each caller bounds its own wait, and the probe stops when
        nobody waits any more."""
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.ensure_future(self._probe_store())
        self._probe_waiters += 1
        try:
            await asyncio.shield(probe)
        finally:
            self._probe_waiters -= 1
            if not self._probe_waiters and not probe.done():
                probe.cancel()
                if self._probe is probe:
                    self._probe = None

    async def _probe_store(self) -> None:
        assert self.store is not None
        delay, t0 = 0.05, time.monotonic()
        while True:
            try:
                await self.store.start()
            except Exception as exc:
                log.debug("the store %s does not answer yet: %s", store_name(self.store), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _PROBE_MAX_DELAY_S)
                continue
            log.info("the durable store %s answers again (probed for %.1f s)",
                     store_name(self.store), time.monotonic() - t0)
            self._seen_down = False
            return

    async def close(self) -> None:
        """Cancel the supervisor's own background work: the row writer and the store probe
        (rows not stored stay as they were: see `stop`)."""
        for task in (self._row_writer, self._probe, self._sweep):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _durable_step(self, rec: TaskRecord, agent: str, since: int) -> int:
        """The last step after `since` that `agent`'s events reported finished, where that
        means durable (every_step, every_call: a step is reported once its append is); 0 if
        none. A turn resumed after its replica died must find its log reach that step."""
        if self.cfg.state.checkpoint not in ("every_step", "every_call"):
            return 0
        return max((ev.step for ev in rec.events if type(ev) is StepFinished
                    and ev.agent == agent and ev.step > since), default=0)

    def _account(self, rec: TaskRecord, agent: str, result: TurnResult, started: float) -> None:
        """Count a turn's usage for the task, the agent and the swarm; alert on a stop."""
        cfg = self.cfg
        cost = self._cost(agent, result)
        used = Usage(result.steps, result.model_calls, result.tool_calls, result.input_tokens,
                     result.output_tokens, cost, self.clock() - started)
        rec.cost_usd += used.cost_usd
        rec.by_agent[agent].add(used)
        self.swarm_usage.add(used)
        if result.budget_exhausted is not None:
            self._alert(rec, "budget_exhausted", "wrap_up" if result.kind == "final" else "fail",
                        result.budget_exhausted)
        if result.stuck is not None:
            stuck.record(self.swarm_id, result.stuck)
            rec.stuck = result.stuck
            self._alert(rec, f"stuck.{result.stuck}", cfg.stuck.action, result.error or "")

    def _agent_usage(self, agent: str, used: AgentUsage) -> Usage:
        """An agent's usage in a task as its log records it (`TaskState.by_agent`), priced at
        its model's price (cached input tokens are not logged: counted at the full price)."""
        model = self.cfg.agents[agent].model if agent in self.cfg.agents else None
        cost = 0.0 if model is None else self.cfg.models[model].price.cost(
            used.input_tokens, used.output_tokens, 0)
        return Usage(used.steps, used.model_calls, used.tool_calls, used.input_tokens,
                     used.output_tokens, cost, used.wall_s)

    def _cost(self, agent: str, result: TurnResult) -> float:
        """What a turn's model usage cost, at its agent's model's price."""
        model = self.cfg.agents[agent].model  # None for a remote A2A member: no usage
        return 0.0 if model is None else self.cfg.models[model].price.cost(
            result.input_tokens, result.output_tokens, result.cached_tokens)

    def _alert(self, rec: TaskRecord, alert: str, action: str, detail: str) -> None:
        self._emit(rec, Alert(task_id=rec.id, ts=self.clock(), agent=rec.agent, alert=alert,
                              action=action, detail=detail))

    def _stuck(self, rec: TaskRecord, agent: str | None, detector: str, cause: str, *,
               counted: bool = False) -> TurnResult:
        """A task found stuck outside a turn: count it, alert, and the failed result."""
        if not counted:
            stuck.record(self.swarm_id, detector)
            self._alert(rec, f"stuck.{detector}", "stop", cause)
        rec.stuck = detector
        msg = cause if cause.startswith("stuck (") else f"stuck ({detector}): {cause}"
        res = _failed(rec.id, agent, stuck.ERROR_CLASS[detector], msg)
        res.stuck = detector
        return res

    async def _log_escalation(self, rec: TaskRecord, log_id: str, agent: str, cause: str
                              ) -> None:
        """Log a ping-pong escalation (an `approval` entry, see `swarm.state.replay`) after
        the handoff that closed it, whose turn was `agent`'s last: a restarted supervisor
        finds it there (`_from_log`) and asks again. A detector that ends a turn is named by
        the turn's end instead."""
        if self.store is None:
            return
        from swarm.state.interface import LogEntry

        now = self.clock()
        data = {"escalation": "ping_pong", "cause": cause, "agent": agent,
                "turn": str(rec.turns - 1), "ts": now}  # the turn `_turn` just counted
        try:
            await self.store.append(log_id, [LogEntry(kind="approval", agent=agent,
                                                      step=rec.steps, ts=now, data=data)])
        except Exception:
            # Asked all the same; a supervisor restarted before the answer won't know to ask.
            log.warning("task %s: could not log its ping-pong escalation", rec.id,
                        exc_info=True)

    async def _escalate(self, rec: TaskRecord, cause: str) -> bool:
        """Ask an operator about a stuck task; True to continue, False to stop it."""
        rec.choices = ("continue", "stop")
        try:
            answer = await self._ask(rec, f"The task looks stuck: {cause}. Answer 'continue' "
                                          "to let it go on, or 'stop' to fail it.")
        finally:
            rec.choices = ("rerun", "skip")
        if answer == "continue":
            rec.stuck = None
        return answer == "continue"

    async def _send(self, agent: str, key: str, req: TurnRequest, attempt: int) -> TurnResult:
        """Send one turn to an agent (an A2A message): traced as an A2A client span whose
        traceparent rides in the request and the message metadata."""
        if self._tracer is None:
            return await self.pool.turn(agent, key, req, attempt=attempt)
        span, req.traceparent = self._tracer.start_send(req.task_id, req.context_id, agent)
        msg = a2a.loads_message(req.message)
        msg.metadata["traceparent"] = req.traceparent
        req.message = a2a.dumps(msg)
        try:
            result = await self.pool.turn(agent, key, req, attempt=attempt)
        except BaseException as exc:
            self._tracer.end_send(span, exc=exc)
            raise
        self._tracer.end_send(span, result)
        return result

    async def _await_gate(self, rec: TaskRecord, gate: dict[str, Any]) -> str:
        """Wait for an approval gate's decision (`ApprovalDesk.wait`: denied after
        approvals.timeout_s); a stuck.input_timeout_s shorter than that fails the task when it
        passes, as an unanswered question does."""
        timeout = self.cfg.stuck.input_timeout_s
        if timeout is None or timeout >= self.approvals.timeout_s:
            return await self.approvals.wait(rec, gate)
        try:
            async with asyncio.timeout(timeout):
                return await self.approvals.wait(rec, gate)
        except TimeoutError:
            cause = (f"no decision in {timeout:g} s (stuck.input_timeout_s) on gate "
                     f"{gate.get('gate')} ({gate.get('tool')})")
            stuck.record(self.swarm_id, "input_timeout")
            self._alert(rec, "stuck.input_timeout", "stop", cause)
            rec.stuck = "input_timeout"
            raise StuckError("input_timeout", f"stuck (input_timeout): {cause}") from None

    async def _ask(self, rec: TaskRecord, question: str) -> str:
        """Park the task in INPUT_REQUIRED until `respond` answers `question`."""
        rec.question = question
        rec.answer_waiter = asyncio.get_running_loop().create_future()
        await self._set_state(rec, "input_required", question)
        rec.asking.set()
        timeout = self.cfg.stuck.input_timeout_s
        try:
            answer = await asyncio.wait_for(rec.answer_waiter, timeout)
        except TimeoutError:
            cause = f"no answer in {timeout:g} s (stuck.input_timeout_s) to: {question}"
            stuck.record(self.swarm_id, "input_timeout")
            self._alert(rec, "stuck.input_timeout", "stop", cause)
            rec.stuck = "input_timeout"
            raise StuckError("input_timeout", f"stuck (input_timeout): {cause}") from None
        finally:
            rec.answer_waiter = None
            rec.asking.clear()
        rec.question = None
        await self._set_state(rec, "working", f"operator answered {answer!r}")
        return answer

    async def _parallel(self, rec: TaskRecord, text: str, *, resume: bool = False) -> TurnResult:
        """Fan the task out to every configured agent, then join the answers."""
        sup = self.cfg.supervisor
        branches = [list(rec.transcript) for _ in sup.agents]
        results = await asyncio.gather(
            *(self._branch(rec, a, text, t, f"{rec.id}/{a}", resume)
              for a, t in zip(sup.agents, branches, strict=True)),
            return_exceptions=True,
        )
        parts, failures = [], []
        for agent, res in zip(sup.agents, results, strict=True):
            if isinstance(res, BaseException):
                failures.append(f"{agent}: {res}")
            elif res.kind != "final":
                failures.append(f"{agent}: {res.error or res.kind}")
            else:
                parts.append((agent, res.text))
        if sup.join is None:
            if failures:
                return _failed(
                    rec.id, None, "orchestration", "parallel branch failed: " + "; ".join(failures)
                )
            return _final(rec.id, "\n\n".join(f"[{a}] {t}" for a, t in parts))
        if not parts:
            return _failed(
                rec.id,
                None,
                "orchestration",
                "every parallel branch failed: " + "; ".join(failures),
            )
        joined = "\n\n".join(
            [
                f"Task: {text}",
                *(f"## Result from {a}\n{t}" for a, t in parts),
                *(f"## Branch failed\n{f}" for f in failures),
            ]
        )
        return await self._branch(rec, sup.join, joined, rec.transcript, f"{rec.id}/join",
                                  resume)

    async def _branch(self, rec: TaskRecord, agent: str, text: str,
                      transcript: list[dict[str, Any]], log_id: str, resume: bool
                      ) -> TurnResult:
        """Run one branch (its own log) from `agent`; after a restart, from where its log
        ends: an open turn resumes with its agent, an ended one is not run again."""
        if not resume or self.store is None:
            return await self._chain(rec, agent, text, transcript, log_id=log_id)
        state, problems = await restore(self.store, log_id)
        for problem in problems:
            log.warning("task %s, branch %s: %s", rec.id, log_id, problem)
        result = await self._from_log(rec, state, transcript, log_id)
        if result is not None:
            return result
        return await self._chain(rec, agent, text, transcript, log_id=log_id)

    async def _from_log(self, rec: TaskRecord, state: TaskState,
                        transcript: list[dict[str, Any]], log_id: str) -> TurnResult | None:
        """Carry on a chain of turns from its restored log: resume the open turn, follow a
        logged handoff, or return a logged final answer or failure without running anything.
        None if the log holds no turn to carry on from (the chain starts afresh)."""
        turn = state.open_turn
        if turn is not None:
            transcript[:] = state.transcript[: turn.start]
            text = state.transcript[turn.start].get("content") or ""
            return await self._chain(rec, turn.agent, text, transcript, resume=True,
                                     log_id=log_id, stuck_from=turn.stuck_from)
        done = state.last_outcome
        if done is None:
            return None
        transcript[:] = state.transcript
        outcome = done.get("outcome")
        if outcome == "handoff" and done.get("target"):
            asked = _ping_pong_asked(state, done)
            if asked is not None and self.cfg.stuck.action == "escalate":
                # The handoff closed a ping-pong the task waited on an operator about when
                # the supervisor went (`_chain`): asked again, answered as it would have been.
                cause = str(asked.get("cause") or "")
                rec.stuck = "ping_pong"
                if not await self._escalate(rec, cause):
                    return self._stuck(rec, done.get("agent"), "ping_pong", cause, counted=True)
            ended = state.last_turn
            return await self._chain(rec, done["target"],
                                     _handoff_text(done.get("text"), done.get("agent", "")),
                                     transcript, log_id=log_id,
                                     stuck_from=ended.stuck_from if ended is not None else 0)
        if outcome not in ("final", "failed"):
            return None  # no other outcome is logged (a canceled turn writes no turn_end)
        result = TurnResult(
            task_id=rec.id, agent=done.get("agent", ""), kind=outcome,
            message=a2a.dumps(a2a.text_message(done.get("text") or "", role="agent")),
            text=done.get("text") or "", error_class=done.get("error_class"),
            error=done.get("error"), stuck=done.get("stuck"))
        if result.stuck in _ESCALATED and self.cfg.stuck.action == "escalate":
            # Stopped by a stuck detector, the task waited for an operator's answer (or was
            # about to ask) when the supervisor went: it asks again, and goes on from the
            # answer as `_chain` does after a turn. That turn's usage and its detection were
            # counted then (the counters above, its row); the question alone is asked anew.
            rec.stuck = result.stuck
            return await self._chain(rec, result.agent, "", transcript, log_id=log_id,
                                     ended=result)
        return result

    async def _route(self, rec: TaskRecord, text: str) -> TurnResult:
        """Ask the router model which agent should take the task, then run from there."""
        candidates = list(self.cfg.supervisor.agents)
        if self.router_model is None:
            return _failed(rec.id, None, "orchestration", "router strategy has no router model")
        tool = {
            "type": "function",
            "function": {
                "name": "route_to",
                "description": "Choose the agent that should handle the task.",
                "parameters": {
                    "type": "object",
                    "properties": {"agent": {"type": "string", "enum": candidates}},
                    "required": ["agent"],
                },
            },
        }
        desc = "\n".join(f"- {a}: {self.cfg.agents[a].instructions or a}" for a in candidates)
        resp = await self.router_model.complete(
            ModelRequest(
                messages=[
                    {"role": "system", "content": f"Route the task to one of:\n{desc}"},
                    {"role": "user", "content": text},
                ],
                tools=[tool],
                session_id=rec.context_id,
                agent="router",
            )
        )
        rec.input_tokens += resp.usage.input_tokens
        rec.output_tokens += resp.usage.output_tokens
        assert self.cfg.supervisor.router_model is not None
        rec.cost_usd += self.cfg.models[self.cfg.supervisor.router_model].price.cost(
            resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.cached_input_tokens)
        chosen = None
        for call in resp.tool_calls:
            if call.name == "route_to":
                try:
                    chosen = json.loads(call.arguments or "{}").get("agent")
                except (json.JSONDecodeError, AttributeError):
                    chosen = None
                break
        if chosen not in candidates:
            return _failed(
                rec.id, None, "model", f"router chose {chosen!r}, which is not one of {candidates}"
            )
        return await self._chain(rec, chosen, text, rec.transcript)

    # ---- table bookkeeping -------------------------------------------------------------------

    @staticmethod
    def _wake(rec: TaskRecord) -> None:
        waiter = rec.changed
        if waiter is not None:
            rec.changed = None
            waiter.set()

    def _emit(self, rec: TaskRecord, ev: Event, wake: bool = True) -> None:
        events = rec._writable_events()
        if rec.event_count >= _MAX_EVENTS_PER_TASK and not isinstance(ev, TaskFinished):
            return
        if events and isinstance(events[-1], TaskFinished) and rec.state in a2a.TERMINAL:
            events.insert(len(events) - 1, ev)  # a late batch from an agent: TaskFinished last
        else:
            events.append(ev)
        rec.event_count += 1
        if wake:
            self._wake(rec)
        kind = type(ev)
        if (kind is ToolCalled or kind is ModelCalled) and ev.error_class:  # type: ignore[attr-defined]
            cls = ev.error_class  # type: ignore[attr-defined]
            rec.errors[cls] = rec.errors.get(cls, 0) + 1
        if self.meter is not None:
            self.meter.on_event(ev)

    async def _persist(self, rec: TaskRecord) -> None:
        if self.store is not None:
            await self.store.put_task(rec.to_row(self.swarm_id))

    async def _persist_soon(self, rec: TaskRecord) -> bool:
        """Store the task's row, now if the store answers; whether it was stored now. If it is
        unreachable (or known to be), the task goes on as it is, and its newest row is written
        once the store answers again (`_write_rows_later`): a store outage delays the row, it
        doesn't change the task's outcome. Other errors are raised."""
        if self.store is None:
            return True
        if not self._seen_down:  # else this write would wait out the outage first
            try:
                await self._persist(rec)
            except StoreUnavailable as exc:
                self._seen_down, why = True, str(exc)
            else:
                self._unstored.pop(rec.id, None)
                return True
        else:
            why = "it was unreachable when last tried"
        log.warning("task %s: its row (%s) is not stored yet, the store %s is unreachable (%s); "
                    "it is written once the store answers again", rec.id, rec.state,
                    store_name(self.store), why)
        self._defer(rec)
        return False

    def _defer(self, rec: TaskRecord) -> None:
        """Leave the task's row to `_write_rows_later`."""
        self._unstored[rec.id] = (rec, next(self._deferrals))
        writer = self._row_writer
        if writer is None or writer.done():
            self._row_writer = asyncio.ensure_future(self._write_rows_later())

    async def _write_rows_later(self) -> None:
        """Write the rows `_persist_soon` could not, each task's newest, whenever the store
        answers again, until none is left (or the supervisor stops)."""
        while self._unstored and not self.stopping:
            await self._store_answers()
            held = list(self._unstored.values())
            recs = [rec for rec, _ in held]
            try:
                failed = await self._put_rows(recs)
            except Exception as exc:
                failed = [exc] * len(recs)
            for (rec, n), exc in zip(held, failed, strict=True):
                if isinstance(exc, StoreUnavailable):
                    # Down again: the next round writes it, and rows meanwhile are left to
                    # this writer at once instead of each waiting out the outage first.
                    self._seen_down = True
                    continue
                if exc is not None:
                    log.error("task %s: its row could not be stored: %s", rec.id, exc)
                now = self._unstored.get(rec.id)
                if now is not None and now[0] is rec and now[1] == n:  # not deferred again
                    del self._unstored[rec.id]
                    if exc is None and rec.done.is_set():  # its end is stored: it may go
                        self._finished[rec.id] = None
                    elif exc is None and rec.state in a2a.TERMINAL:
                        self._stored_late.add(rec.id)  # `_finish` is still on it
            self._drop_finished()

    async def _set_state(self, rec: TaskRecord, state: str, detail: str = "", *,
                         persist: bool = True) -> None:
        message = None
        if state == "input_required":
            message = a2a.text_message(detail, role="agent", task_id=rec.id,
                                       context_id=rec.context_id)
            # The same question for programs: the open gates, or the answers it accepts.
            wanted = {"gates": list(rec.gates.values())} if rec.gates else \
                {"choices": list(rec.choices)}
            message.parts.append(a2a.data_part(wanted))
        a2a.set_state(rec.live(), state, message)
        rec.updated = self.clock()
        if persist:
            await self._persist_soon(rec)
        self._emit(rec, TaskStateChanged(task_id=rec.id, ts=rec.updated, state=state,
                                         detail=detail))

    async def _finish(self, rec: TaskRecord, state: str, error_class: str | None = None,
                      error: str | None = None, answer: str | None = None,
                      budget_exhausted: str | None = None) -> None:
        if rec.state in a2a.TERMINAL:
            return
        if self.stopping and self.store is not None:
            # Going down (`stop`): the task stays as its row says, and the next supervisor of
            # this swarm resumes it from its log (a turn that ended is finished from there).
            return
        self.waits.parent.pop(rec.id, None)
        for agent in list(rec.running or ()):  # a turn cut short by a cancel, say
            self._count_unreported(rec, agent, None)
        # Closed with the task (its turn may not have unwound yet), and its question too.
        rec.gates.clear()
        rec.question = None
        if budget_exhausted is not None:
            rec.budget_exhausted = budget_exhausted
            rec.set_metadata("budget_exhausted", budget_exhausted)
        reply = a2a.text_message(answer if answer is not None else (error or ""), role="agent",
                                 task_id=rec.id, context_id=rec.context_id)
        a2a.set_state(rec.live(), state, reply)
        if answer is not None:
            a2a.add_answer(rec.live(), answer)
        rec.answer, rec.error_class, rec.error = answer, error_class, error
        rec.settle()  # a turn that waited for input and never ended: what it ran counts
        rec.updated = self.clock()
        for log_id in self._hot_logs.pop(rec.id, ()):
            self.hot.pop(log_id, None)  # a finished task resumes nothing
        rec.park()  # finished: read now and then, changed no more (its row uses the bytes)
        stored = False
        try:
            # An unreachable store leaves the row to `_write_rows_later`; the task stays in
            # memory until it is written.
            stored = await self._persist_soon(rec)
        except Exception:
            # The log still holds the turn's outcome, so a restarted supervisor finishes the
            # task again from it; the caller learns the outcome now either way.
            log.exception("task %s: could not store its final state", rec.id)
        deferred = not stored and rec.id in self._unstored  # left to `_write_rows_later`
        try:
            self._emit(rec, TaskStateChanged(task_id=rec.id, ts=rec.updated, state=state,
                                             detail=error or ""))
            self._emit(rec, rec.finished_event())
            if self.audit is not None:
                self.audit.record(f"task.{state}", task_id=rec.id, user=rec.user,
                                  agent=rec.agent, error_class=error_class,
                                  outcome=rec.budget_exhausted or rec.stuck, detail=error)
            if self.session_memory is not None and state == "completed" and \
                    answer is not None:
                # Before `done`: the user's next task in this session starts with this
                # exchange.
                await self.session_memory.record_exchange(rec.user, rec.context_id, rec.text,
                                                          answer, rec.id)
            rec.compact(durable=self.store is not None)
        finally:
            # Its end is set (the state, the row) whatever failed above: its waiters must
            # hear of it, else they wait out their timeouts for a task that has ended.
            rec.done.set()
            self._wake(rec)  # a follower that read TaskFinished before `done` was set
        if deferred and rec.id in self._stored_late:
            # The writer stored it while this awaited (the session memory, say): before
            # `done`, so it left the task to this.
            stored = True
        self._stored_late.discard(rec.id)
        if stored and self.store is not None:  # its row has its end: it may leave memory
            self._finished[rec.id] = None
            self._drop_finished()

    async def stop(self, timeout: float = 10.0) -> int:
        """Stop driving tasks, as the swarm goes down (`swarm down`); returns how many were
        unfinished. With a durable store they are left as they are stored (working, or
        waiting for input or an approval), not finished: the next supervisor of this swarm
        (`swarm up` with the same name) resumes each from its log. Without one there is
        nothing to resume from, and they end as canceled."""
        self.stopping = True
        # Rows not stored stay as they were: the next supervisor resumes those tasks from
        # their logs, where a turn that ended is finished again without running.
        await self.close()
        drivers = [r.driver for r in self.tasks.values()
                   if r.driver is not None and not r.driver.done()]
        unfinished = sum(1 for r in self.tasks.values() if r.state not in a2a.TERMINAL)
        for d in drivers:
            d.cancel()
        if drivers:
            await asyncio.wait(drivers, timeout=timeout)
        return unfinished

    def hold_hot(self, log_id: str, seq: int, make_ref: Callable[[], Any]) -> bool:
        """Hold a snapshot of a log for its task's next resume, if it is newer than the one
        held: `make_ref()` puts it in the object store and is called only then. False if the
        task is unknown or has ended (nothing will resume it), or the snapshot is older."""
        # A log is its task's own (its id) or a branch's ("<task id>/<agent>", agent names
        # have no "/"); a task id may contain "/".
        task_id = log_id if log_id in self.tasks else log_id.rsplit("/", 1)[0]
        rec = self.tasks.get(task_id)
        if rec is None or rec.state in a2a.TERMINAL:
            return False
        held = self.hot.get(log_id)
        if held is not None and held[0] >= seq:
            return False
        if held is None:
            self._hot_logs.setdefault(task_id, []).append(log_id)
        self.hot[log_id] = (seq, [make_ref()])
        return True

    def _evict(self, pending: int = 0) -> None:
        """Drop the oldest finished tasks once the table (with `pending` new tasks not yet in
        it) is full."""
        # Tasks whose rows are being stored count too: they will be in the table.
        limit = self.cfg.limits.max_tasks - pending - len(self._storing)
        if len(self.tasks) < limit:
            return
        # A tenth below the limit at once: a full table is scanned once every max_tasks / 10
        # new tasks, not for each one (a scan of the whole table a submission, under a steady
        # load with no durable store, whose finished tasks stay here until then).
        room = limit - self.cfg.limits.max_tasks // 10
        # Not one whose row waits to be stored (`_unstored`): the store doesn't have its end.
        for tid in [t for t, r in self.tasks.items()
                    if r.done.is_set() and t not in self._unstored]:
            if len(self.tasks) < room:
                break
            del self.tasks[tid]
            self._finished.pop(tid, None)
            self._dropped += 1  # with a store, `_recall` looks for its id again
        if len(self.tasks) >= limit:
            held = sum(1 for t in self._unstored if t in self.tasks
                       and self.tasks[t].done.is_set())
            what = (f"tasks it can't drop yet ({held} of them finished, their rows not "
                    "stored while the store is unreachable)") if held else "unfinished tasks"
            raise UserError(
                f"swarm {self.cfg.name} has {len(self.tasks) + pending + len(self._storing)} "
                f"{what}; limits.max_tasks is {self.cfg.limits.max_tasks}"
            )


def _numbered(events: list[Event], start: int) -> list[Event]:
    """Events with `seq` set to their index, from `start`."""
    replace = msgspec.structs.replace
    return [ev if ev.seq == i else replace(ev, seq=i) for i, ev in enumerate(events, start)]


def store_name(store: Any) -> str:
    """A store for messages: its URL (a tiered store's Redis tier), credentials hidden."""
    for candidate in (store, getattr(store, "hot", None)):
        url = getattr(candidate, "url", None) or getattr(candidate, "uri", None)
        if isinstance(url, str) and url:
            return redact_url(url)
    return str(getattr(store, "name", None) or type(store).__name__)


def _handoff_text(text: str | None, by: str) -> str:
    """The message a handed-over turn starts with: the handoff's, or a default."""
    return text or f"Continue the task (handed over by {by})."


def _ping_pong_asked(state: TaskState, done: dict[str, Any]) -> dict[str, Any] | None:
    """The ping-pong escalation logged after the handoff `done` (the log's last turn end),
    if there is one (`Supervisor._log_escalation`)."""
    for q in reversed(state.questions):
        if q.get("escalation") == "ping_pong":
            if q.get("turn") == done.get("turn") and q.get("agent") == done.get("agent"):
                return q
            return None  # an earlier one, answered
    return None


def _failed(task_id: str, agent: str | None, error_class: str, error: str) -> TurnResult:
    return TurnResult(
        task_id=task_id,
        agent=agent or "",
        kind="failed",
        message=a2a.dumps(a2a.text_message(error, role="agent", task_id=task_id)),
        error_class=error_class,
        error=error,
    )


def _final(task_id: str, text: str) -> TurnResult:
    return TurnResult(
        task_id=task_id,
        agent="",
        kind="final",
        text=text,
        message=a2a.dumps(a2a.text_message(text, role="agent", task_id=task_id)),
    )


def _describe(e: Any) -> str:
    """One line about a log entry, for `swarm history`."""
    d = e.data
    if e.kind == "model":
        msg = d.get("message") or {}
        calls = [(c.get("function") or {}).get("name") for c in msg.get("tool_calls") or ()]
        usage = d.get("usage") or {}
        what = f"calls {', '.join(calls)}" if calls else f"answers {str(msg.get('content'))[:60]!r}"
        return f"model {what} ({usage.get('input_tokens', 0)}/{usage.get('output_tokens', 0)} tok)"
    if e.kind == "tool":
        content = str((d.get("message") or {}).get("content", ""))
        return f"tool result #{d.get('index', 0)}: {content[:70]!r}"
    if e.kind == "turn_start":
        return f"turn {d.get('turn')} starts: {str(d.get('input', ''))[:70]!r}"
    if e.kind == "turn_end":
        extra = f" → {d['target']}" if d.get("target") else ""
        return f"turn {d.get('turn')} ends: {d.get('outcome')}{extra}"
    return f"{e.kind}: {str(d)[:70]}"
