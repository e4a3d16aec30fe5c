"""keyway.ipsec.link_status: every link as both of its ends see it (module_utils/intent)."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.filter.intent import _plain
from ansible_collections.keyway.ipsec.plugins.module_utils.intent.status import link_status


def _link_status(intent, hostvars):
    """`hostvars`: each managed host's keyway_agent fact (keyway.ipsec.agent_info), when
    it was gathered in this run."""
    intent = _plain(intent)
    sas = {}
    for host in intent.get("hosts", {}):
        agent = hostvars[host].get("keyway_agent") if host in hostvars else None
        sas[host] = _plain(agent["sas"]) if agent else None
    return link_status(intent, sas)


class FilterModule:
    def filters(self):
        return {"link_status": _link_status}
