"""swarm: agentic infrastructure on Ray.

Importing swarm starts no Ray, threads or network clients; those start when a swarm is run,
deployed or connected to.
"""

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

__version__ = "0.1.0"

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
