"""keyway.ipsec.link_status and psk_rotation: links as their ends see them (module_utils/intent)."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.filter.intent import _plain
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


class FilterModule:
    def filters(self):
        return {"link_status": _link_status, "psk_rotation": _psk_rotation}
