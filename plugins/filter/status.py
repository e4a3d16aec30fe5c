"""keyway.ipsec.link_status, psk_rotation, intent_dot: links as their ends see them, and
as a picture (module_utils/intent)."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.filter.intent import _plain
from ansible_collections.keyway.ipsec.plugins.module_utils.intent.graph import (
    intent_dot,
    link_states,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.intent.status import (
    link_status,
    psk_rotation,
)


def _link_status(intent, hostvars):
    """`hostvars`: each managed host's keyway_agent fact (keyway.ipsec.agent_info), when
    it was gathered in this run."""
    intent = _plain(intent)
    sas = {}
    for host in intent.get("hosts", {}):
        agent = hostvars[host].get("keyway_agent") if host in hostvars else None
        sas[host] = _plain(agent["sas"]) if agent else None
    return link_status(intent, sas)


def _psk_rotation(intent, hostvars):
    """`hostvars`: each managed host's agent_config_result (the agent role's
    config task) and keyway_agent fact, when this run has them; else not seen."""
    intent = _plain(intent)
    states, sas = {}, {}
    for host in intent.get("hosts", {}):
        facts = hostvars.get(host, {})
        config = facts.get("agent_config_result") or {}
        states[host] = _plain(config["psk_state"]) if "psk_state" in config else None
        agent = facts.get("keyway_agent")
        sas[host] = _plain(agent["sas"]) if agent else None
    return psk_rotation(intent, states, sas)


def _intent_dot(intent, hostvars=None):
    """The picture (DOT); with `hostvars`, links coloured by the state link_status finds."""
    states = None
    if hostvars is not None:
        states = link_states(_link_status(intent, hostvars)["rows"])
    return intent_dot(_plain(intent), states)


class FilterModule:
    def filters(self):
        return {
            "link_status": _link_status,
            "psk_rotation": _psk_rotation,
            "intent_dot": _intent_dot,
        }
