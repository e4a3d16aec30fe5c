# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inventory of the netns lab: one host per lab namespace."""

from __future__ import annotations

DOCUMENTATION = r"""
name: netns_lab
short_description: Hosts of Keyway's netns lab
description:
  - Lists the hosts of a Keyway lab (network namespaces on the controller, built by
    C(make lab-up)) with their namespace, addresses, site subnets and per-host
    config, state and run folders as host variables.
  - The hosts come from the lab's state file when the lab is up, otherwise from the
    lab plan for O(hosts) hosts (the same computation the lab builder uses).
  - Besides C(lab) (every host), the groups C(lab_core), C(lab_hub), C(lab_branches)
    and C(lab_external) give the demo's topologies their members. From 5 hosts on they
    are a meshed core of three (the first also the hub), branches, and the last host as
    an external strongSwan peer; with fewer hosts all are in C(lab_core).
  - The inventory file name must end in C(netns_lab.yml) or C(netns_lab.yaml).
author: Keyway developers (@keyway)
version_added: 0.1.0
options:
  plugin:
    description: The name of this plugin.
    required: true
    choices: [keyway.ipsec.netns_lab]
  lab:
    description: Name of the lab.
    type: str
    default: lab
    env:
      - name: KEYWAY_LAB_NAME
  root:
    description: Folder holding the lab's state and per-host folders.
    type: path
    default: /run/keyway-lab
    env:
      - name: KEYWAY_LAB_ROOT
  hosts:
    description: Number of hosts when the lab is not up yet.
    type: int
    default: 4
    env:
      - name: KEYWAY_LAB_HOSTS
"""

EXAMPLES = r"""
# inventory/lab/lab.netns_lab.yml
plugin: keyway.ipsec.netns_lab
lab: lab
"""

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import lab_plan_of
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import LabError, plan_lab

# With this many hosts the lab shows every kind of topology (see demo_roles).
DEMO_HOSTS = 5


def demo_roles(hosts: list[str]) -> dict[str, list[str]]:
    """The lab's groups for the demo's topologies (inventory/lab/group_vars/lab.yml).
    From DEMO_HOSTS hosts on: a core of three meshed hosts (the first is also the hub),
    branches dialling in to the hub, and the last host as an external strongSwan peer;
    with fewer hosts, all are core (a full mesh)."""
    if len(hosts) < DEMO_HOSTS:
        return {"core": hosts, "hub": [], "branches": [], "external": []}
    return {
        "core": hosts[:3],
        "hub": hosts[:1],
        "branches": hosts[3:-1],
        "external": hosts[-1:],
    }


class InventoryModule(BaseInventoryPlugin):
    NAME = "keyway.ipsec.netns_lab"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("netns_lab.yml", "netns_lab.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        name, root = self.get_option("lab"), self.get_option("root")
        try:
            plan = lab_plan_of(name, root) or plan_lab(self.get_option("hosts"), name, root)
        except LabError as exc:
            raise AnsibleParserError(f"keyway.ipsec.netns_lab: {exc}") from exc
        group = self.inventory.add_group("lab")
        roles = demo_roles([h.name for h in plan.hosts])
        for role in roles:
            self.inventory.add_group(f"lab_{role}")
        for host in plan.hosts:
            self.inventory.add_host(host.name, group=group)
            for role, members in roles.items():
                if host.name in members:
                    self.inventory.add_child(f"lab_{role}", host.name)
            for key, value in {
                "keyway_netns": host.netns,
                "keyway_lab_name": plan.name,
                "keyway_lab_index": host.index,
                "keyway_lab_ipv4": host.ipv4,
                "keyway_lab_ipv6": host.ipv6,
                "keyway_lab_site4": host.site4,
                "keyway_lab_site6": host.site6,
                "keyway_lab_site4_address": host.site4_address,
                "keyway_lab_site6_address": host.site6_address,
                "keyway_config_dir": host.config_dir,
                "keyway_state_dir": host.state_dir,
                "keyway_run_dir": host.run_dir,
            }.items():
                self.inventory.set_variable(host.name, key, value)
