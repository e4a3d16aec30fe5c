"""The inventory model through real ansible-playbook runs against the lab: hub and
spokes, site to site and explicit links in one inventory, traffic proven on the wire,
hosts in no topology left alone, and bad inventories refused before any host is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from tests.fixtures.ansible import recap, run_playbook, task_results

TOPOLOGIES = {
    "keyway_topologies": [
        {"name": "wan", "type": "hub_spoke", "hubs": ["h1"], "spokes": ["h2", "h3", "h4"]},
        {"name": "dc", "type": "site_to_site", "pairs": [["h1", "h5"]]},
        {
            "name": "backup",
            "type": "links",
            "links": [{"ends": ["h4", "h5"], "esp_proposals": ["chacha20poly1305"]}],
        },
    ]
}


def _list_sas(host) -> list[dict]:
    """keywayd's SAs through its control socket (a path on the shared filesystem)."""
    return control.request(f"{host.run_dir}/keywayd.sock", "list-sas")


def test_hub_spoke_site_to_site_and_links_in_one_inventory(netns_hosts, tmp_path):
    plan = netns_hosts(6)  # h6 takes part in no topology
    for host in plan.hosts:
        Path(host.state_dir).rmdir()
    extra = tmp_path / "topologies.yml"
    extra.write_text(yaml.safe_dump(TOPOLOGIES))
    first = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}"))
    assert {h: s["failures"] for h, s in first.items()} == dict.fromkeys(first, 0)
    # Hosts in no topology are left alone: nothing made, nothing changed.
    assert first["h6"]["changed"] == 0 and not Path(plan.hosts[5].state_dir).exists()
    second = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}"))
    assert all(s["changed"] == 0 for s in second.values()), second

    connections = {h.name: {sa["connection"] for sa in _list_sas(h)} for h in plan.hosts[:5]}
    assert connections == {
        "h1": {"h1-h2", "h1-h3", "h1-h4", "h1-h5"},
        "h2": {"h1-h2"},  # other spokes through the hub, no SA of their own
        "h3": {"h1-h3"},
        "h4": {"h1-h4", "h4-h5"},
        "h5": {"h1-h5", "h4-h5"},
    }
    (backup,) = [sa for sa in _list_sas(plan.hosts[4]) if sa["connection"] == "h4-h5"]
    assert backup["children"][0]["proposal"].startswith("chacha20poly1305")

    status = run_playbook("playbooks/lab_status.yml", plan, "-e", f"@{extra}")
    probes = task_results(status, "Site to site through the tunnels, encrypted on the wire")
    reached = {
        host: sorted((r["item"][0], r["item"][1]) for r in result["results"] if "sent" in r)
        for host, result in probes.items()
    }
    both = ("4", "6")
    assert reached == {
        "h1": [(h, v) for h in ("h2", "h3", "h4", "h5") for v in both],
        "h2": [(h, v) for h in ("h1", "h3", "h4") for v in both],  # h3, h4 via the hub
        "h3": [(h, v) for h in ("h1", "h2", "h4") for v in both],
        "h4": [(h, v) for h in ("h1", "h2", "h3", "h5") for v in both],
        "h5": [(h, v) for h in ("h1", "h4") for v in both],
    }
    for result in probes.values():
        for probe in result["results"]:
            if "sent" in probe:
                assert probe["received"] == probe["sent"] == 3, probe
                assert probe["wire"]["cleartext"] == 0 and probe["wire"]["esp"] >= 3


BAD = [
    ({"keyway_topologies": [{"name": "t", "type": "mesh", "members": "nope"}]},
     "topology t.members: unknown group 'nope'"),
    ({"keyway_topologies": [{"name": "t", "type": "links", "links": [{"ends": ["h1", "h1"]}]}]},
     "a link from h1 to itself"),
    ({"keyway_topologies": [{"name": "t", "type": "mesh", "members": "lab",
                             "overrides": {"rekey_tme": "1h"}}]},
     "topology t.overrides.rekey_tme: unknown override key"),
    ({"keyway_master_secret": "short"},
     "keyway_master_secret: 5 characters; links between managed hosts derive"),
    ({"keyway_topologies": [{"name": "t", "type": "mesh", "members": "lab",
                             "overrides": {"esp_proposals": ["rot13"]}}]},
     "topology t: link h1-h2 on host h1:"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "expected"), BAD)
def test_a_bad_inventory_fails_with_its_reason_and_touches_no_host(
    netns_hosts, tmp_path, extra, expected
):
    plan = netns_hosts(2)
    for host in plan.hosts:
        Path(host.state_dir).rmdir()
    vars_file = tmp_path / "bad.yml"
    vars_file.write_text(yaml.safe_dump(extra))
    proc = run_playbook("playbooks/site.yml", plan, "-e", f"@{vars_file}", check=False)
    assert proc.returncode != 0
    failed = task_results(proc, "Every host's links, from the whole inventory, validated")
    messages = {r.get("msg", "") for r in failed.values()}
    assert any(expected in m for m in messages), messages
    for host in plan.hosts:
        assert not Path(host.state_dir).exists()
        assert not (Path(host.config_dir) / "keywayd.yml").exists()
