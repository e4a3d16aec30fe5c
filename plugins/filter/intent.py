"""Filters computing Keyway's intent from the inventory (see module_utils/intent).

    hostvars | keyway.ipsec.mesh_connections(members, inventory_hostname)
    keyway_mesh_secret | keyway.ipsec.mesh_psks(inventory_hostname, members)

Each member declares `keyway_address` (outer address), `keyway_sites` (prefixes it
protects) and optionally `keyway_ike_id` (default: its inventory name).
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import (
    ConfigError,
    parse_config,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.intent.mesh import (
    IntentError,
    mesh_connections,
    mesh_psks,
)


def _mesh_connections(hostvars, members, me, **kwargs):
    hosts = {}
    for name in members:
        host = hostvars[name]
        if "keyway_sites" not in host:
            continue  # not part of the mesh
        if "keyway_address" not in host:
            raise AnsibleFilterError(f"keyway.ipsec.mesh_connections: {name}: no keyway_address")
        sites = host["keyway_sites"]
        if isinstance(sites, str) or not isinstance(sites, list | tuple):
            raise AnsibleFilterError(
                f"keyway.ipsec.mesh_connections: {name}: keyway_sites must be a list"
            )
        hosts[name] = {
            "address": str(host["keyway_address"]),
            "sites": [str(s) for s in sites],
            "id": str(host.get("keyway_ike_id", name)),
        }
    try:
        connections = mesh_connections(me, hosts, **kwargs)
    except IntentError as exc:
        raise AnsibleFilterError(f"keyway.ipsec.mesh_connections: {exc}") from None
    # Validate here, on the controller, with keywayd's own parser: a bad inventory fails
    # the play before any host is touched (the PSK is a placeholder: it lives elsewhere).
    placeholder = {name: {**conn, "psk": "p" * 32} for name, conn in connections.items()}
    try:
        parse_config({"connections": placeholder}, source=f"{me}'s mesh connections")
    except ConfigError as exc:
        raise AnsibleFilterError(f"keyway.ipsec.mesh_connections: {exc}") from None
    return connections


def _mesh_psks(master, me, members):
    try:
        return mesh_psks(me, list(members), master)
    except IntentError as exc:
        raise AnsibleFilterError(f"keyway.ipsec.mesh_psks: {exc}") from None


class FilterModule:
    def filters(self):
        return {"mesh_connections": _mesh_connections, "mesh_psks": _mesh_psks}
