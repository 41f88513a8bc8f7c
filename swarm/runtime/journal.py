"""The step loop's write-ahead journal: what a session did, logged to a `Checkpointer`.

Per step it logs (a) the model's answer with its tool calls, plus a `started` ledger record per
tool call, before any tool runs, and (b) each tool's result, plus its `finished` ledger record,
as it completes. When they become durable is the checkpoint policy (`state.checkpoint`):

- `every_step`: a step's model answer and tool results are one atomic append when the step
  ends: one write per tool-call cycle. A turn's last step (its final answer) goes in one
  append with the turn's end, written at once after it.
- `every_call`: each of them is one atomic append at once (two or more writes per step).
- `every_n`: they are buffered and written in one atomic append every `checkpoint_every` steps.
- `phase`: they are buffered until the turn ends (or hands off, or needs input).

With `write_behind` (`state.write_behind`, on by default), the append of `every_step` and
`every_n` is sent when the step ends and the turn goes on to its next model call; the next write,
a tool with side effects and the turn's end wait for it first, so this log's appends stay one
at a time and in order, and one that failed stops the turn there (nothing but the turn's end
is written after it). A step whose append is written behind is reported finished
(`when_durable`) once that append is durable, as a step is whose append was waited for.

Under every policy the turn's start and end are durable at once, a due snapshot is a checkpoint,
and the step loop calls `checkpoint()` before a tool with side effects runs and again after its
result is logged, so such a call is never made without its `started` record being durable, and
after a crash the calls with no result are exactly those that started but may not have finished.
What a crash loses is only buffered work, which the resumed session does again. Snapshots are
written every `snapshot_every` steps, off the step's path, of durable state only.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from typing import Any

from swarm.config import CheckpointPolicy
from swarm.models.interface import ToolCall, Usage
from swarm.state.interface import Checkpointer, LedgerRecord, LogEntry, LostWrites, ledger_key
from swarm.state.replay import OpenTurn, TaskState, to_snapshot

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def args_hash(arguments: str) -> str:
    """A short stable hash of a tool call's raw arguments (the ledger stores no arguments).

    Cached: a call's arguments are hashed for its started and finished ledger records and its
    audit entry, and a str keeps its own hash, so the repeats cost a lookup."""
    return hashlib.blake2b(arguments.encode(), digest_size=8).hexdigest()


# Snapshots kept per task: the newest, and one to fall back on should it be unreadable (each
# holds the whole transcript, so more would make storage grow with the square of the length).
SNAPSHOTS_KEPT = 2


class Journal:
    """Logs one session's turn of one task; created per turn by the agent host."""

    def __init__(self, store: Checkpointer, log_id: str, agent: str, *, turn: str,
                 snapshot_every: int = 100, base: TaskState | None = None,
                 checkpoint: CheckpointPolicy = "every_step",
                 checkpoint_every: int | None = None, fence: int | None = None,
                 write_behind: bool = False) -> None:
        self.store = store
        # This writer's token (`Checkpointer.claim`): once another copy of the turn claims a
        # newer one, every append of this journal raises `Fenced` and the turn stops.
        self.fence = fence
        self.log_id = log_id
        self.agent = agent
        self.turn = turn
        self.snapshot_every = snapshot_every
        # What a snapshot needs beyond the session: task counters before this turn, handoffs,
        # the open turn. Fresh turns get it from the supervisor, resumed ones from the log.
        self.base = base or TaskState()
        self.seq = self.base.seq
        # Whether `seq` is the log's last entry for sure: for a turn resumed from the log, or
        # once this journal's first append landed (a fresh turn starts without knowing where
        # the turns before it left the log). From then on each append must land right after
        # the previous one (`LostWrites` if not).
        self._seq_known = self.seq >= 0
        self.open_turn: OpenTurn | None = self.base.open_turn
        self._snapshotting: asyncio.Task[None] | None = None
        # Called with each snapshot once it is durable (the agent actor publishes it to the
        # Ray object store, so a resume elsewhere needn't read it back from the store).
        self.on_snapshot: Any = None
        # Called with the seconds each durable append took (metrics: checkpoint latency).
        self.on_append: Any = None
        self.entries_written = 0
        self.policy = checkpoint
        # every_step is every_n with N = 1: the step's writes go as one append at its end.
        self.checkpoint_every = 1 if checkpoint == "every_step" else checkpoint_every or 1
        # Written but not yet durable, in order; ledger records by key, so a call's `finished`
        # record replaces its `started` one. `self.seq` stays the last durable entry's seq.
        self._entries: list[LogEntry] = []
        self._ledger: dict[str, LedgerRecord] = {}
        self._steps = 0  # steps ended since the last checkpoint
        # Called once what is buffered now is durable (`when_durable`).
        self._when_durable: list[Any] = []
        # A step's append is sent when the step ends and waited for before the next write
        # (or a tool with side effects, or the turn's end), not before the next model call.
        self.write_behind = write_behind
        self._behind: asyncio.Task[None] | None = None  # that append, while in flight
        self._behind_count = 0  # the entries it carries
        self._behind_waiting: list[Any] = []  # `when_durable` callbacks for it
        # What an append of this turn failed with: nothing but the turn's end is written after
        # it (`_append`), and nothing more is reported durable (`when_durable`).
        self._failure: BaseException | None = None

    @property
    def buffered(self) -> int:
        """Log entries written but not yet durable (an append in flight counts)."""
        behind = self._behind
        return len(self._entries) + (self._behind_count if behind is not None
                                     and not behind.done() else 0)

    async def _append(self, entries: list[LogEntry], ledger: list[LedgerRecord] | None = None,
                      *, now: bool = False) -> None:
        if self._failure is not None and not (len(entries) == 1
                                              and entries[0].kind == "turn_end"):
            # An earlier append failed (one written behind may only say so now, and a tool's
            # middleware may have taken it for the tool's error): the turn stops here, and
            # its log gets nothing after the gap but the turn's end, written alone.
            raise self._failure
        self._entries.extend(entries)
        for rec in ledger or ():
            self._ledger[rec.key] = rec
        if now or self.policy == "every_call":
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Make everything written so far durable, in one atomic append (a no-op if nothing is
        buffered), after the append in flight, if any."""
        self._steps = 0
        if self._behind is not None:
            await self._settle()
        if not self._entries and not self._ledger:
            return
        await self._write(*self._take())

    def _take(self) -> tuple[list[LogEntry], list[LedgerRecord], list[Any]]:
        # Taken out before the append: one that raised may still have been applied, so
        # writing these again later could log them twice (the turn fails instead).
        taken = self._entries, list(self._ledger.values()), self._when_durable
        self._entries, self._ledger, self._when_durable = [], {}, []
        return taken

    async def _write(self, entries: list[LogEntry], ledger: list[LedgerRecord],
                     waiting: list[Any]) -> None:
        t0 = time.perf_counter()
        try:
            seq = await self.store.append(self.log_id, entries, ledger or None,
                                          fence=self.fence)
        except BaseException as exc:
            # The callbacks are dropped, and later ones too (`when_durable`): what they wait
            # for may never be durable.
            self._failure = exc
            raise
        if self.on_append is not None:
            self.on_append(time.perf_counter() - t0)
        if entries:
            first = seq - len(entries) + 1
            if self._seq_known and first != self.seq + 1:
                # The log doesn't hold what it acknowledged: nothing more is reported durable,
                # and the turn stops at its next write (`_append`). Its end still goes where
                # the log is now, so a resume finds the turn ended rather than runs it again.
                self._failure = LostWrites(self.log_id, self.seq + 1, first, self.store)
                self.seq = seq
                raise self._failure
            self.seq, self._seq_known = seq, True
        self.entries_written += len(entries)
        for fn in waiting:  # a list `when_durable` may add to while this append is in flight
            try:
                fn()
            except Exception:  # the append is durable whatever a callback does
                log.exception("journal %s: a callback after a checkpoint failed", self.log_id)
        waiting.clear()

    def _write_behind(self) -> None:
        """Send what is buffered in one append without waiting for it (`write_behind`)."""
        entries, ledger, waiting = self._take()
        self._behind_count, self._behind_waiting = len(entries), waiting
        self._behind = asyncio.ensure_future(self._write(entries, ledger, waiting))
        self._behind.add_done_callback(_retrieved)

    async def _settle(self) -> None:
        """Wait for the append in flight; raises what it raised (the turn stops: its entries
        may or may not have been applied). What was written since is dropped then, as it is
        after a failed append that was waited for: the log must not hold a later step
        without the one before it (the turn's end, logged next, is written alone). A caller
        cancelled while it waits leaves the append going on, still in flight: the next write
        (the cancelled turn keeps its buffered steps) waits for it again."""
        behind = self._behind
        if behind is None:
            return
        try:
            await asyncio.shield(behind)
        except BaseException:
            if not behind.done():
                raise  # only this wait was cancelled
            self._entries, self._ledger, self._when_durable = [], {}, []
            raise
        finally:
            if behind.done() and self._behind is behind:
                self._behind, self._behind_count, self._behind_waiting = None, 0, []

    @property
    def failure(self) -> BaseException | None:
        """What an append of this turn failed with, if one did (nothing but the turn's end is
        written after it)."""
        return self._failure

    @property
    def sent_behind(self) -> bool:
        """Whether the last step's append was written behind and is still in flight, with
        nothing buffered since."""
        behind = self._behind
        return behind is not None and not behind.done() and not self._entries

    def when_durable(self, fn: Any) -> None:
        """Call `fn` once everything written so far is durable: now if it is, else after the
        checkpoint that makes it so (never, should that append, or one before it, fail)."""
        behind = self._behind
        if self._failure is not None:
            return  # after a failed append nothing is reported durable
        if self._entries or self._ledger:
            self._when_durable.append(fn)
        elif behind is not None and not behind.done():
            self._behind_waiting.append(fn)
        else:
            fn()

    async def end_step(self, step: int, *, last: bool = False) -> None:
        """Note that `step` ended; checkpoint if the policy (or a due snapshot) says so.

        `last`: the turn ended with this step (a final answer, no tool call), and its end is
        logged next (`turn_end`, durable at once), which takes this step with it: one append
        instead of two. Were the process to die in between, the resumed turn makes that last
        model call again, as with any step not yet durable."""
        self._steps += 1
        if not self._entries and not self._ledger:
            self._steps = 0  # everything up to here is durable already
            return
        # A snapshot may only hold durable state, so the step it is taken at is durable.
        snapshot_due = self.snapshot_every > 0 and step % self.snapshot_every == 0
        by_steps = self.policy in ("every_step", "every_n")
        if last and by_steps and not snapshot_due:
            return
        due = by_steps and self._steps >= self.checkpoint_every
        if due and self.write_behind and not snapshot_due:
            # The previous step's append (long done, a model call ago, as a rule) first: this
            # log's appends stay one at a time and in order.
            self._steps = 0
            if self._behind is not None:
                await self._settle()
            self._write_behind()
        elif due or snapshot_due:
            await self.checkpoint()

    async def turn_start(self, text: str, transcript_len: int, stuck_from: int = 0) -> None:
        """Log that this agent's turn began with `text` (at `transcript_len` in the transcript),
        its stuck detection counting from `stuck_from` in the transcript."""
        base, now = self.base, time.time()
        self.open_turn = OpenTurn(agent=self.agent, turn=self.turn, start=transcript_len,
                                  step_offset=base.step, base=base.totals(),
                                  stuck_from=stuck_from, started=now)
        base.turns += 1
        data: dict[str, Any] = {"input": text, "turn": self.turn}
        if stuck_from:
            data["stuck_from"] = stuck_from
        await self._append([LogEntry(kind="turn_start", agent=self.agent, step=base.step,
                                     ts=now, data=data)], now=True)

    async def model(self, step: int, message: dict[str, Any], usage: Usage,
                    calls: list[ToolCall]) -> None:
        """Log the model's answer and mark each tool call it asks for as started."""
        now = time.time()
        ledger = [
            LedgerRecord(key=ledger_key(self.log_id, self.agent, step, i), state="started",
                         tool=c.name, args_hash=args_hash(c.arguments), ts=now)
            for i, c in enumerate(calls)
        ]
        await self._append(
            [LogEntry(kind="model", agent=self.agent, step=step, ts=now,
                      data={"message": message, "usage": {
                          "input_tokens": usage.input_tokens,
                          "output_tokens": usage.output_tokens}})],
            ledger,
        )

    async def tool(self, step: int, index: int, call: ToolCall, message: dict[str, Any],
                   is_error: bool, *, handoff: bool = False) -> None:
        """Log a tool call's result and mark it finished in the ledger (a handoff is logged
        like a tool call but doesn't count as one)."""
        now = time.time()
        data: dict[str, Any] = {"message": message, "index": index}
        if handoff:
            data["handoff"] = True
        await self._append(
            [LogEntry(kind="tool", agent=self.agent, step=step, ts=now, data=data)],
            [LedgerRecord(key=ledger_key(self.log_id, self.agent, step, index), state="finished",
                          tool=call.name, args_hash=args_hash(call.arguments),
                          result=_preview(message.get("content")), is_error=is_error,
                          ts=now)],
        )

    async def not_run(self, step: int, index: int, call: ToolCall, message: dict[str, Any]
                      ) -> None:
        """Log the error answer to a tool call that a stopped turn never ran
        (`StepLoop.stopped`), as `tool` logs a result, marked so that it isn't counted as a
        call (the turn's own counter doesn't count it: a restored task must count the same)."""
        now = time.time()
        await self._append(
            [LogEntry(kind="tool", agent=self.agent, step=step, ts=now,
                      data={"message": message, "index": index, "not_run": True})],
            [LedgerRecord(key=ledger_key(self.log_id, self.agent, step, index), state="finished",
                          tool=call.name, args_hash=args_hash(call.arguments),
                          result=_preview(message.get("content")), is_error=True, ts=now)],
        )

    async def turn_end(self, step: int, outcome: dict[str, Any]) -> None:
        """Log how the turn ended (after `step`), durable with everything buffered before it."""
        await self._append([LogEntry(kind="turn_end", agent=self.agent, step=step,
                                     ts=time.time(), data=outcome)], now=True)
        await self.flush()

    def maybe_snapshot(self, messages: list[dict[str, Any]], step: int,
                       turn_counters: dict[str, int]) -> None:
        """Start a snapshot in the background every `snapshot_every` steps."""
        if self.snapshot_every <= 0 or step % self.snapshot_every or self.open_turn is None:
            return
        if self._snapshotting is not None and not self._snapshotting.done():
            return  # the previous one is still being written; the next interval will catch up
        base, turn = self.base, self.open_turn
        totals = {k: turn.base.get(k, 0) + v for k, v in turn_counters.items()}
        state = TaskState(
            transcript=list(messages[1:]), step=step, seq=self.seq, handoffs=base.handoffs,
            turns=base.turns, task_state=base.task_state, task_data=dict(base.task_data),
            open_turn=turn, questions=list(base.questions), **totals,
            by_agent=base.by_agent,  # ended turns' usage; this open one counts at its end
        )
        snap = to_snapshot(self.log_id, state, time.time())
        self._snapshotting = asyncio.create_task(self._put_snapshot(snap))

    async def _put_snapshot(self, snap: Any) -> None:
        try:
            await self.store.put_snapshot(snap, keep=SNAPSHOTS_KEPT)
        except Exception:
            # A snapshot is an optimisation: restore falls back to older ones plus the log.
            log.warning("snapshot of %s at seq %s failed", self.log_id, snap.seq, exc_info=True)
            return
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(snap)
            except Exception:
                log.debug("publishing the snapshot of %s failed", self.log_id, exc_info=True)

    async def flush(self) -> None:
        """Make buffered entries durable and wait for a snapshot in flight."""
        await self.checkpoint()
        if self._snapshotting is not None:
            await asyncio.gather(self._snapshotting, return_exceptions=True)


def _retrieved(task: asyncio.Task[None]) -> None:
    # A write-behind append that failed raises at the next write; if the turn ended first
    # (cancelled, say), its error is not "never retrieved".
    if not task.cancelled() and task.exception() is not None:
        log.debug("an append written behind failed", exc_info=task.exception())


_PREVIEW_CHARS = 64


def _preview(content: Any) -> str | None:
    # The full result is the log entry written atomically with this record; the ledger keeps
    # a preview, so storage stays about the size of the messages themselves.
    if content is None:
        return None
    text = str(content)
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…"
