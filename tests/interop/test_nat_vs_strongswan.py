"""keywayd and charon across a NAT that rewrites ports (nftables `masquerade random`,
tests/fixtures/nat.py), each on either side of it (issue 16): keywayd behind the NAT
dialling charon (kernel-libipsec, answering for %any), and charon behind the NAT
dialling keywayd, which knows it only as the NAT's address."""

from __future__ import annotations

import pytest

from tests.fixtures.keywayd import PSK, site_connection
from tests.fixtures.netns import udp_exchange
from tests.fixtures.strongswan import psk_connection


def both_ways(a, b) -> bool:
    return (
        udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ping") == b"gnip"
        and udp_exchange(b.netns, a.netns, b.site4_address, a.site4_address, b"pong") == b"gnop"
    )


def charon_conf(me, peer_id: str, peer_addrs: str, peer_site: str, *, initiate: bool) -> str:
    return psk_connection(
        name="kw",
        local_addr=me.ipv4,
        remote_addr=peer_addrs,
        local_id=f"{me.name}.lab",
        remote_id=peer_id,
        psk=PSK,
        proposals="aes256gcm16-prfsha384-x25519",
        local_ts=me.site4,
        remote_ts=peer_site,
        esp_proposals="aes256gcm16",
        child_extra="start_action = start" if initiate else "",
    )


@pytest.mark.parametrize("keywayd_behind_nat", [True, False], ids=["keywayd-nat", "charon-nat"])
def test_keywayd_and_charon_across_a_port_rewriting_nat(
    nat_lab, agents, charon_factory, keywayd_behind_nat
):
    lab = nat_lab(spokes=1)
    hub, (spoke,) = lab.hub, lab.spokes
    if keywayd_behind_nat:
        charon = charon_factory(
            hub.netns, charon_conf(hub, f"{spoke.name}.lab", "%any", spoke.site4, initiate=False)
        )
        agent = agents(spoke, {"kw": site_connection(spoke, hub, start=True)})
    else:
        conn = site_connection(hub, spoke, start=False)
        conn["remote_addrs"] = [lab.public_nat_address]
        agent = agents(hub, {"kw": conn})
        charon = charon_factory(
            spoke.netns, charon_conf(spoke, f"{hub.name}.lab", hub.ipv4, hub.site4, initiate=True)
        )
    agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
    (sa,) = agent.sas("kw")
    assert sa["children"][0]["encap"]
    if not keywayd_behind_nat:
        # charon came from the NAT's address and a port the NAT chose for its 4500.
        address, port = sa["remote"].rsplit(":", 1)
        assert address == lab.public_nat_address and int(port) not in (500, 4500)
    assert "ESTABLISHED" in charon.list_sas() and "INSTALLED" in charon.list_sas()
    assert both_ways(spoke, hub)
