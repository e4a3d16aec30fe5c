"""The inventory's `keyway_behind_nat` through a real site.yml run (issue 16): two
branches behind a NAT that rewrites ports (tests/fixtures/nat.py), with the same kind of
private addresses home routers hand out, dial the hub, which takes them by identity from
whatever address and port the NAT gives them; they reach each other through the hub."""

from __future__ import annotations

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from tests.fixtures.ansible import ROOT, recap, run_playbook
from tests.fixtures.netns import in_netns, udp_exchange


def test_branches_behind_a_nat_come_up_from_the_inventory_alone(nat_lab, tmp_path):
    lab = nat_lab(spokes=2)
    hosts = {}
    for host in (lab.hub, *lab.spokes):
        folders = {
            f"keyway_{kind}_dir": str(tmp_path / host.name / kind)
            for kind in ("config", "state", "run")
        }
        hosts[host.name] = {
            "keyway_netns": host.netns,
            "keyway_address": host.ipv4,
            "keyway_sites": [host.site4],
            **folders,
            **({"keyway_behind_nat": True} if host is not lab.hub else {}),
        }
    inventory = {
        "all": {
            "hosts": hosts,
            "vars": {
                "ansible_connection": "keyway.ipsec.netns",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "agent_dataplane": "userspace",
                "keyway_master_secret": "nat-lab-master-secret-" + "x" * 24,
                "keyway_topologies": [
                    {"name": "home", "type": "hub_spoke", "hubs": ["hub"],
                     "spokes": [s.name for s in lab.spokes]},
                ],
            },
        }
    }  # fmt: skip
    (tmp_path / "inventory" / "lab").mkdir(parents=True)
    (tmp_path / "inventory" / "lab" / "hosts.yml").write_text(yaml.safe_dump(inventory))
    assert in_netns(lab.hub.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1").returncode == 0
    first = recap(run_playbook(str(ROOT / "playbooks/site.yml"), project=tmp_path))
    assert {h: s["failures"] for h, s in first.items()} == dict.fromkeys(first, 0)
    hub_sas = control.request(f"{tmp_path}/hub/run/keywayd.sock", "list-sas")
    assert sorted(sa["connection"] for sa in hub_sas) == ["hub-s1", "hub-s2"]
    for sa in hub_sas:  # both at the NAT's address, each on a port of its own
        assert sa["remote"].startswith(f"{lab.public_nat_address}:")
        assert sa["children"][0]["encap"]
    assert len({sa["remote"] for sa in hub_sas}) == 2
    s1, s2 = lab.spokes
    for a, b in ((s1, lab.hub), (s2, lab.hub), (s1, s2)):
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"x") == b"x"
    second = recap(run_playbook(str(ROOT / "playbooks/site.yml"), project=tmp_path))
    assert all(s["changed"] == 0 for s in second.values()), second
