"""The swarm's A2A agent card: one skill per agent of the config, both HTTP bindings, streaming."""

from __future__ import annotations

from a2a.client.card_resolver import parse_agent_card
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import validate_proto_required_fields

from swarm.config import SwarmConfig
from swarm.errors import UserError

JSONRPC_PATH = "/"
REST_PATH = "/rest"
_MAX_DESCRIPTION = 500


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DESCRIPTION else text[: _MAX_DESCRIPTION - 1] + "…"


def build_agent_card(cfg: SwarmConfig, *, name: str, base_url: str) -> AgentCard:
    """The card of the swarm deployed as `name`, whose A2A app clients reach at `base_url`.

    Each agent of the config is a skill (its instructions as the description, its tool servers
    as tags); the entry agents carry the config's `example_task` as an example. The card is
    checked as a2a-sdk's client reads it (its required fields, and a round trip through the
    client's parser), so a card that fails validation is never served.
    """
    from swarm import __version__

    base = base_url.rstrip("/")
    entries = set(cfg.entry_agents())
    skills = []
    for role, agent in cfg.agents.items():
        servers = sorted({grant.split(".", 1)[0] for grant in agent.tools})
        skills.append(AgentSkill(
            id=role, name=role,
            description=_clip(agent.instructions) or f"the {role} agent of swarm {cfg.name}",
            tags=["swarm", "entry" if role in entries else "member", *servers],
            examples=[cfg.example_task] if role in entries and cfg.example_task else [],
        ))
    agents = ", ".join(cfg.agents)
    card = AgentCard(
        name=name,
        description=_clip(cfg.description) or f"swarm {cfg.name} (agents: {agents})",
        version=__version__,
        supported_interfaces=[
            AgentInterface(url=base + JSONRPC_PATH, protocol_binding=TransportProtocol.JSONRPC,
                           protocol_version=PROTOCOL_VERSION_1_0),
            AgentInterface(url=base + REST_PATH, protocol_binding=TransportProtocol.HTTP_JSON,
                           protocol_version=PROTOCOL_VERSION_1_0),
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain"],
        skills=skills,
    )
    try:
        validate_proto_required_fields(card)
    except InvalidParamsError as exc:
        raise UserError(f"the agent card of swarm {name!r} is invalid: {exc.data}") from None
    if parse_agent_card(agent_card_to_dict(card)) != card:
        raise UserError(f"the agent card of swarm {name!r} does not survive a2a-sdk's parser")
    return card
