"""Error families: misuse (`ConfigError`, `UserError`) and run errors classified by layer.

A run error's `error_class` is the label that events, metrics and task statuses report, so every
failed step is exactly one of: model, tool, orchestration, budget, policy, checkpoint.
"""

from __future__ import annotations

from typing import ClassVar


class SwarmError(Exception):
    """Base class of every error swarm raises on purpose.

    Pickled as its message and attributes, not by calling the class with its `args` again:
    Ray carries an actor's exception to the caller pickled, and errors whose constructors
    take other arguments than the message (`ConfigError`'s problems, say) would otherwise
    arrive as an unreadable "failed to deserialize exception"."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[SwarmError], args: tuple[object, ...], state: dict[str, object]
             ) -> SwarmError:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ConfigError(SwarmError):
    """A swarm config is invalid; `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {path or '<root>'}: {msg}" for path, msg in problems)
        super().__init__(f"invalid swarm config{where}:\n{lines}")


class UserError(SwarmError):
    """The caller asked for something that can't be done (bad argument, unknown task, ...)."""


class TaskExists(UserError):
    """A submission names a task id another submission (another text or sender) made."""


class TaskNotFound(UserError):
    """No task with this id exists in the swarm."""


class SwarmNotFound(UserError):
    """No deployed swarm with this name is running on the cluster."""


class RunError(SwarmError):
    """A failure while running a task, classified by the layer that failed."""

    error_class: ClassVar[str] = "orchestration"


class ModelError(RunError):
    """The model call failed or returned something unusable."""

    error_class = "model"


class ModelCallError(ModelError):
    """A model server call failed after its retries: `status` is the last HTTP status (None
    for a timeout or connection error) and `attempts` how many requests were sent.

    `transient` says another model may succeed where this one failed (timeouts, connection
    errors, 408, 429 and 5xx answers): a fallback chain moves on only for those.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.transient = transient


class ContextLimitError(ModelError):
    """A prompt is larger than the agent's context window (estimated before the call, or
    reported by the server as a context-length error)."""


class ToolError(RunError):
    """A tool could not be reached or failed in transport (a tool's own error is a result)."""

    error_class = "tool"


class OrchestrationError(RunError):
    """Routing, handoff or actor failure inside the runtime."""

    error_class = "orchestration"


class BudgetError(RunError):
    """A task, agent or swarm limit was reached."""

    error_class = "budget"


class PolicyError(RunError):
    """A call was refused by access control, approval or rate-limit policy."""

    error_class = "policy"


class RateLimited(PolicyError):
    """A call a rate limit refused before it ran (swarm.governance.ratelimit)."""


class CheckpointError(RunError):
    """State could not be saved or restored."""

    error_class = "checkpoint"


class TaskFailed(SwarmError):
    """Raised by `TaskHandle.result()` when the task ended FAILED, CANCELED or REJECTED."""

    def __init__(self, task_id: str, state: str, error_class: str | None, message: str) -> None:
        self.task_id = task_id
        self.state = state
        self.error_class = error_class
        super().__init__(
            f"task {task_id} ended {state}"
            + (f" ({error_class}): " if error_class else ": ")
            + message
        )


ERROR_CLASSES = ("model", "tool", "orchestration", "budget", "policy", "checkpoint")


def classify(exc: BaseException) -> str:
    """Return the error class of an exception; anything unclassified is orchestration."""
    if isinstance(exc, RunError):
        return exc.error_class
    return "orchestration"
