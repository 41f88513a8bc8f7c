"""swarm: agentic infrastructure on Ray.

Importing swarm starts no Ray, threads or network clients; those start when a swarm is run,
deployed or connected to. The names below are imported on first use (PEP 562), so a Ray
worker that imports one swarm module doesn't pay for the client and the config schema too:
that time is on the path of every actor restart.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "swarm.client": ("SwarmClient", "TaskHandle", "TaskInfo", "connect"),
    "swarm.config": ("SwarmConfig", "load_config", "parse_config"),
    "swarm.errors": (
        "BudgetError", "CheckpointError", "ConfigError", "ModelError", "OrchestrationError",
        "PolicyError", "RunError", "SwarmError", "SwarmNotFound", "TaskFailed", "TaskNotFound",
        "ToolError", "UserError",
    ),
    "swarm.events": (
        "Event", "Handoff", "ModelCalled", "StepFinished", "StepStarted", "TaskFinished",
        "TaskStateChanged", "ToolCalled",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "Event",
    "Handoff",
    "ModelCalled",
    "ModelError",
    "OrchestrationError",
    "PolicyError",
    "RunError",
    "StepFinished",
    "StepStarted",
    "SwarmClient",
    "SwarmConfig",
    "SwarmError",
    "SwarmNotFound",
    "TaskFailed",
    "TaskFinished",
    "TaskHandle",
    "TaskInfo",
    "TaskNotFound",
    "TaskStateChanged",
    "ToolCalled",
    "ToolError",
    "UserError",
    "connect",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:
    from swarm.client import SwarmClient, TaskHandle, TaskInfo, connect
    from swarm.config import SwarmConfig, load_config, parse_config
    from swarm.errors import (
        BudgetError,
        CheckpointError,
        ConfigError,
        ModelError,
        OrchestrationError,
        PolicyError,
        RunError,
        SwarmError,
        SwarmNotFound,
        TaskFailed,
        TaskNotFound,
        ToolError,
        UserError,
    )
    from swarm.events import (
        Event,
        Handoff,
        ModelCalled,
        StepFinished,
        StepStarted,
        TaskFinished,
        TaskStateChanged,
        ToolCalled,
    )
