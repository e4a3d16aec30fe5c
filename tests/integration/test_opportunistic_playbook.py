"""Issue 16, the Ansible half of a mesh defined by policy: an opportunistic topology in
the inventory, applied by real ansible-playbook runs to the lab. Each host gets one
connection for the underlay prefix and a certificate for its address from the
controller's CA; a second run changes nothing; every pair of hosts then reaches the
other through a tunnel made on its first packet, and an exempted host in the clear."""

from __future__ import annotations

from pathlib import Path

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from ansible_collections.keyway.ipsec.plugins.module_utils.ike import certs
from tests.fixtures.ansible import recap, run_playbook
from tests.fixtures.traffic import echo_servers, first_answers


def _sas(host) -> dict[str, list]:
    sas = control.request(f"{host.run_dir}/keywayd.sock", "list-sas")
    return {sa["connection"]: sa["children"] for sa in sas if sa["state"] == "established"}


def test_an_opportunistic_topology_from_the_inventory(netns_hosts, tmp_path):
    plan = netns_hosts(4)
    h1, h2, h3, h4 = plan.hosts
    extra = tmp_path / "oe.yml"
    extra.write_text(yaml.safe_dump({"keyway_topologies": [{
        "name": "oe", "type": "opportunistic", "members": ["h1", "h2", "h3"],
        "prefixes": ["192.0.2.0/24"], "clear": [f"{h4.ipv4}/32"],
        "overrides": {"esp_proposals": ["aes256gcm16"]},
    }]}))  # fmt: skip
    first = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}"))
    assert {h: s["failures"] for h, s in first.items()} == dict.fromkeys(first, 0)
    assert first["h4"]["changed"] == 0  # in no topology: left alone
    second = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}"))
    assert all(s["changed"] == 0 for s in second.values()), second

    for host in (h1, h2, h3):
        config = yaml.safe_load(Path(host.config_dir, "keywayd.yml").read_text())
        (conn,) = config["connections"].values()
        assert (conn["opportunistic"], conn["remote_addrs"]) == ("private-or-clear",
                                                                  ["192.0.2.0/24"])  # fmt: skip
        cert = certs.load_certificates(Path(conn["local"]["certs"][0]).read_bytes())[0]
        anchor = certs.load_certificates(Path(conn["remote"]["cacerts"][0]).read_bytes())
        certs.verify_peer([certs.der(cert)], anchor, host.ipv4)  # its address, by the CA

    with echo_servers(plan.hosts):
        for src in (h1, h2, h3):
            others = [h.ipv4 for h in (h1, h2, h3, h4) if h is not src]
            waits = first_answers(src, others, timeout=30)
            assert all(w is not None for w in waits), (src.name, waits)
    for host in (h1, h2, h3):
        sas = _sas(host)
        peers = {f"oe[{h.ipv4}]" for h in (h1, h2, h3) if h is not host}
        assert set(sas) == peers, sas
        assert all(c and c[0]["packets_out"] >= 1 for c in sas.values()), sas
