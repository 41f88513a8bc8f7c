"""Guards around calls to a tool server: a circuit breaker, retry back-off and a result cap.

Plain classes with an injected clock and random source, so their behaviour is tested without
waiting; `MCPToolSource` wires them around each call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from swarm.tools.interface import ToolResult

# Longest wait between two attempts of one call, however many retries are configured.
MAX_BACKOFF_S = 10.0


class CircuitBreaker:
    """Fails calls to a server at once while it is known to be broken.

    Closed: calls go through; `failures` consecutive failures open it. Open: `allow` refuses
    every call until `cooldown_s` has passed. Half-open: one trial call goes through (the rest are
    still refused); its success closes the breaker, its failure opens it for another cool-down.
    `failures=0` turns the breaker off.
    """

    def __init__(self, failures: int = 5, cooldown_s: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._wall = wall
        self.consecutive = 0
        self.last_error = ""
        self._open_until: float | None = None
        self._trial = False  # a half-open trial call is in flight

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open`."""
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def allow(self) -> bool:
        """Whether a call may go out now; a True in half-open state makes it the trial call."""
        if self._open_until is None:
            return True
        if self._clock() < self._open_until or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        """The server answered (even with an error the tool reported): close the breaker."""
        self.consecutive = 0
        self._open_until = None
        self._trial = False

    def failure(self, error: str) -> None:
        """A call timed out, lost its connection or got garbage back."""
        self.consecutive += 1
        self.last_error = error
        if self._trial or (self.threshold and self.consecutive >= self.threshold):
            self._open_until = self._clock() + self.cooldown_s
        self._trial = False

    def abandon(self) -> None:
        """A call that `allow`ed ended with neither outcome (cancelled): free the trial slot."""
        self._trial = False

    def refusal(self, server: str) -> str:
        """Why `allow` said no, for the model and the operator."""
        until = self._open_until if self._open_until is not None else self._clock()
        remaining = max(0.0, until - self._clock())
        when = datetime.fromtimestamp(self._wall() + remaining, UTC).strftime("%H:%M:%S UTC")
        why = ("a trial call is in flight" if remaining == 0 else
               f"{self.consecutive} consecutive failures")
        return (f"circuit open for MCP server {server!r} until {when} (in {remaining:.1f}s; "
                f"{why}; last: {self.last_error})")


def backoff_delays(retries: int, base_s: float, *,
                   rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Waits before each of `retries` retries: exponential (`base_s`, doubling, capped at
    `MAX_BACKOFF_S`) with full jitter, so clients that failed together don't retry together."""
    for attempt in range(retries):
        yield rng() * min(MAX_BACKOFF_S, base_s * 2 ** attempt)


def cap_text(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars`, with a note saying how much of it is shown; as it is if it
    fits."""
    total = len(text)
    if total <= max_chars:
        return text
    return f"{text[:max_chars]}\n[truncated: {max_chars} of {total} characters shown]"


def cap_result(result: ToolResult, max_chars: int) -> ToolResult:
    """`result` with its text cut to `max_chars` and a note saying so (structured content, which
    is at least as large, is dropped then); unchanged if it fits."""
    if len(result.content) <= max_chars:
        return result
    return ToolResult(cap_text(result.content, max_chars), is_error=result.is_error)
