"""swarm's errors cross process boundaries (Ray pickles an actor's exception for its caller)
with their message, type and attributes intact."""

from __future__ import annotations

import pickle

import pytest

from swarm.errors import ConfigError, ModelCallError, TaskFailed, UserError
from swarm.governance.stuck import StuckError
from swarm.models.scripted.policy import PolicySpecError
from swarm.runtime.deploy import root_cause
from swarm.state.interface import CorruptRecord, Fenced


@pytest.mark.parametrize("exc", [
    ConfigError([("agents.writer.tools", "server 'research' has no tool 'nosuch'")],
                source="swarm.yaml"),
    PolicySpecError([("rules.0.when", "unknown condition 'sometimes'")]),
    TaskFailed("t-1", "failed", "tool", "the tool broke"),
    StuckError("queue_timeout", "waited 5 s for a session slot"),
    CorruptRecord("t-1", "log entry 3", "can't decode"),
    Fenced("t-1", 2, 3),
    ModelCallError("HTTP 503", status=503, attempts=3, transient=True),
    UserError("no such task"),
])
def test_an_error_survives_pickling_whole(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.__dict__ == exc.__dict__


def test_the_root_cause_is_found_through_the_errors_that_carried_it() -> None:
    class Carried(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__(str(cause))
            self.cause = cause

    inner = ConfigError([("agents.a.tools", "unknown tool server 'nosrv'")])
    assert root_cause(Carried(Carried(inner))) is inner
    plain = RuntimeError("x")
    assert root_cause(plain) is plain
