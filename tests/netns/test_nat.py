"""keywayd through real NATs (nftables in network namespaces, tests/fixtures/nat.py):
spokes behind a NAT that rewrites source ports, as home routers and carrier-grade NATs
do, tunnelled to a hub that sees them all at the NAT's one address and tells them apart
by identity (issue 16)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from tests.fixtures.capture import Capture
from tests.fixtures.keywayd import site_connection
from tests.fixtures.nat import flush_mappings, renumber_nat
from tests.fixtures.netns import in_netns, udp_exchange


def hub_connection(hub, spoke, nat_address: str) -> dict:
    conn = site_connection(hub, spoke, start=False)
    conn["remote_addrs"] = [nat_address]  # all the hub sees of a spoke
    return conn


def both_ways(a, b) -> bool:
    return (
        udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ping") == b"gnip"
        and udp_exchange(b.netns, a.netns, b.site4_address, a.site4_address, b"pong") == b"gnop"
    )


def up(agent, connection: str) -> bool:
    sas = agent.sas(connection)
    return bool(sas and sas[0]["children"])


def start(lab, agents, spoke_settings: dict | None = None, spoke_extra: dict | None = None):
    hub = lab.hub
    hub_agent = agents(
        hub,
        {s.name: hub_connection(hub, s, lab.public_nat_address)
         for s in lab.spokes},
    )  # fmt: skip
    spoke_agents = [
        agents(
            s,
            {"hub": {**site_connection(s, hub, start=True), **(spoke_extra or {})}},
            **(spoke_settings or {}),
        )
        for s in lab.spokes
    ]
    for spoke, agent in zip(lab.spokes, spoke_agents, strict=True):
        agent.wait_for(lambda agent=agent: up(agent, "hub"), f"{spoke.name} up")
        hub_agent.wait_for(lambda spoke=spoke: up(hub_agent, spoke.name), f"hub: {spoke.name}")
    return hub_agent, spoke_agents


def test_two_spokes_behind_a_port_rewriting_nat_both_reach_the_hub(nat_lab, agents):
    lab = nat_lab(spokes=2)
    hub, (s1, s2) = lab.hub, lab.spokes
    hub_agent, _unused = start(lab, agents, spoke_settings={"keepalive": 1})
    sas = {sa["connection"]: sa for sa in hub_agent.sas()}
    ports = {name: int(sa["remote"].rsplit(":", 1)[1]) for name, sa in sas.items()}
    # The hub answers each spoke at the NAT's address and the port the NAT gave it: the
    # NAT rewrote both (from 4500), differently.
    assert all(sa["remote"].startswith(f"{lab.public_nat_address}:") for sa in sas.values())
    assert ports["s1"] != ports["s2"] and not {ports["s1"], ports["s2"]} & {500, 4500}
    assert all(sa["children"][0]["encap"] for sa in sas.values())

    with Capture(hub.netns, "eth0") as wire:
        assert both_ways(s1, hub)
        # No cross-talk: s1's traffic went through s1's SAs only.
        counted = {sa["connection"]: sa["children"][0] for sa in hub_agent.sas()}
        assert counted["s1"]["packets_in"] >= 2 and counted["s1"]["packets_out"] >= 2
        assert counted["s2"]["packets_in"] == counted["s2"]["packets_out"] == 0
        assert both_ways(s2, hub)
        time.sleep(2.5)  # a window for the spokes' keepalives (1 s apart)
    esp_to = {
        int.from_bytes(f.l4[2:4], "big")
        for f in wire.frames
        if f.outgoing and (p := f.udp_payload(4500)) and len(p) > 8 and p[:4] != bytes(4)
    }
    assert {ports["s1"], ports["s2"]} <= esp_to  # ESP in UDP, to each spoke's mapping
    keepalives = [
        int.from_bytes(f.l4[0:2], "big")
        for f in wire.frames
        if not f.outgoing and f.udp_payload(4500) == b"\xff"
    ]
    # Each spoke, behind the NAT, keeps its mapping alive; the hub, not behind one, sends
    # none.
    assert keepalives.count(ports["s1"]) >= 2 and keepalives.count(ports["s2"]) >= 2
    assert not [f for f in wire.frames if f.outgoing and f.udp_payload(4500) == b"\xff"]


def test_a_spoke_behind_a_double_nat_reaches_the_hub(nat_lab, agents):
    """A carrier-grade NAT in front of the home NAT: two translations, both rewriting."""
    lab = nat_lab(spokes=1, double=True)
    start(lab, agents)
    assert both_ways(lab.spokes[0], lab.hub)


def test_a_nat_mapping_that_comes_back_on_another_port_is_followed(nat_lab, agents):
    """The NAT forgets its mappings (conntrack flushed): the spoke's next packets get a
    new port. The first authenticated IKE message from it (here the spoke's liveness
    check) moves the hub's IKE SA and its ESP in UDP there, without renegotiation."""
    lab = nat_lab(spokes=1)
    hub, (spoke,) = lab.hub, lab.spokes
    hub_agent, _unused = start(lab, agents, spoke_extra={"dpd_delay": 2})
    (before,) = hub_agent.sas("s1")
    flush_mappings(lab)
    hub_agent.wait_for(
        lambda: hub_agent.sas("s1") and hub_agent.sas("s1")[0]["remote"] != before["remote"],
        "the hub follows the new mapping",
        timeout=20,
    )
    (after,) = hub_agent.sas("s1")
    assert (after["spi_i"], after["children"][0]["spi_in"]) == (
        before["spi_i"],
        before["children"][0]["spi_in"],
    )  # the same SAs: nothing renegotiated
    assert both_ways(spoke, hub)
    assert "NAT mapping moved" in hub_agent.log()


def test_a_responder_for_any_address_tells_three_peers_apart_by_identity(netns_hosts, agents):
    """remote_addrs: [%any] (and a prefix): the hub knows no spoke's address, only its
    identity; each spoke's IKE SA lands on its own connection, with its own selectors."""
    hub, *spokes = netns_hosts(4).hosts
    hub_connections = {}
    for n, spoke in enumerate(spokes):
        conn = site_connection(hub, spoke, start=False)
        conn["remote_addrs"] = ["%any"] if n < 2 else ["192.0.2.0/24"]
        hub_connections[spoke.name] = conn
    hub_agent = agents(hub, hub_connections)
    for spoke in spokes:
        agent = agents(spoke, {"hub": site_connection(spoke, hub, start=True)})
        agent.wait_for(lambda agent=agent: up(agent, "hub"), f"{spoke.name} up")
    for spoke in spokes:
        (sa,) = hub_agent.sas(spoke.name)
        assert sa["remote"] == f"{spoke.ipv4}:500" and sa["remote_id"] == f"{spoke.name}.lab"
        assert sa["children"][0]["remote_ts"] == [spoke.site4]
        assert both_ways(spoke, hub)


def test_an_initiator_whose_first_remote_address_is_down_tries_the_next(netns_hosts, agents):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    conn = site_connection(a, b, start=True)
    conn["remote_addrs"] = ["192.0.2.99", b.ipv4]  # nobody answers at the first
    agent = agents(a, {"ab": conn}, retransmit_timeout=0.5, retransmit_tries=1)
    agent.wait_for(lambda: up(agent, "ab"), "ab up at the second address", timeout=20)
    assert agent.sas("ab")[0]["remote"] == f"{b.ipv4}:500"
    log = agent.log()
    assert log.index("initiating to 192.0.2.99") < log.index(f"initiating to {b.ipv4}")
    assert both_ways(a, b)


def test_an_initiator_whose_own_address_changes_comes_back_from_the_new_one(netns_hosts, agents):
    """A host without a configured local address (%any: DHCP, a cloud instance) gets a
    new one: its IKE SA, bound to the old, goes silent; DPD finds the peer unreachable,
    and the restart moves the connection to the address routing picks now and
    initiates from there (it initiated from the vanished address for good). The peer
    takes it from anywhere, by identity, and its INITIAL_CONTACT clears the old SA."""
    a, b = netns_hosts(2).hosts
    fast = {"retransmit_timeout": 0.3, "retransmit_base": 1.5, "retransmit_tries": 2}
    hub_conn = site_connection(b, a, start=False)
    hub_conn["remote_addrs"] = ["%any"]
    agent_b = agents(b, {"ab": hub_conn}, **fast)
    conn = site_connection(a, b, start=True, dpd_action="restart")
    del conn["local_addrs"]  # %any: the address routing picks towards b
    agent_a = agents(a, {"ab": {**conn, "dpd_delay": "1s"}}, **fast)
    agent_a.wait_for(lambda: up(agent_a, "ab"), "ab up")
    assert both_ways(a, b)
    moved = "192.0.2.31"
    for netns, argv in (
        (a.netns, ["address", "del", f"{a.ipv4}/{a.prefix4}", "dev", "eth0"]),
        (a.netns, ["address", "add", f"{moved}/{a.prefix4}", "dev", "eth0"]),
        # The old address is gone from the network too (the lab's neighbour entries are
        # static: without this b would still reach a's port there).
        (b.netns, ["neigh", "replace", a.ipv4, "lladdr", "02:00:00:00:00:99", "dev", "eth0",
                   "nud", "permanent"]),
    ):  # fmt: skip
        assert in_netns(netns, "ip", *argv).returncode == 0
    agent_a.wait_for(
        lambda: [sa["local"] for sa in agent_a.sas("ab")] == [moved],
        "ab up again from the new address", timeout=30,
    )  # fmt: skip
    assert f"our address towards the peer is {moved} now (was {a.ipv4}): moving" in agent_a.log()
    agent_b.wait_for(
        lambda: [sa["remote"] for sa in agent_b.sas("ab")] == [f"{moved}:500"],
        "b holds only the IKE SA from the new address",
    )
    assert both_ways(a, b)


@contextlib.contextmanager
def hosts_file(netns: str, text: str):
    """/etc/netns/NS/hosts: `ip netns exec` binds it over /etc/hosts for what runs there
    (so keywayd resolves names from it); later writes go to the same file."""
    folder = Path("/etc/netns") / netns
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hosts"
    path.write_text(text)
    try:
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_peer_named_by_dns_is_resolved_at_each_initiation(netns_hosts, agents):
    """remote_addrs: [a DNS name]: looked up when initiating, and again when that fails,
    so a peer whose name moved to another address is found there."""
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    conn = site_connection(a, b, start=True)
    conn["remote_addrs"] = ["peer.keyway.test"]
    with hosts_file(a.netns, "192.0.2.99 peer.keyway.test\n") as hosts:  # nobody there
        agent = agents(a, {"ab": conn}, retransmit_timeout=0.5, retransmit_tries=1)
        agent.wait_for(lambda: "initiating to 192.0.2.99 (peer.keyway.test)" in agent.log(),
                       "the first lookup")  # fmt: skip
        with open(hosts, "w") as rewrite:  # the same file, the bind mount sees it
            rewrite.write(f"{b.ipv4} peer.keyway.test\n")
        agent.wait_for(lambda: up(agent, "ab"), "ab up at the name's new address", timeout=30)
    assert f"initiating to {b.ipv4} (peer.keyway.test)" in agent.log()
    assert both_ways(a, b)


def test_esp_from_a_new_nat_mapping_moves_the_sas_without_any_ike_message(nat_lab, agents):
    """The NAT forgot the spoke's mapping and the spoke sends traffic before any IKE
    message: its ESP, authenticated by the hub's data plane, comes from the new port,
    and the hub's SAs (IKE and Child) follow it at once, as strongSwan does on the
    kernel's mapping events. The first answer already goes to the new port."""
    lab = nat_lab(spokes=1)
    hub, (spoke,) = lab.hub, lab.spokes
    hub_agent, _unused = start(lab, agents)  # no liveness checks (dpd_delay 0)
    (before,) = hub_agent.sas("s1")
    flush_mappings(lab)
    assert both_ways(spoke, hub)  # spoke first: its packet carries the new mapping
    (after,) = hub_agent.sas("s1")
    assert after["remote"] != before["remote"] and after["spi_i"] == before["spi_i"]
    assert "NAT mapping moved" in hub_agent.log()


def test_a_nat_that_gets_another_public_address_is_followed(nat_lab, agents):
    """The spoke's NAT is given another public address (its old one and every mapping
    gone). The spoke's next liveness check comes from there: the hub's IKE SA and Child
    SAs move to it, keys and counters kept, and the tunnel's policies lead there too,
    without renegotiation or a Child SA rekey."""
    lab = nat_lab(spokes=1)
    hub, (spoke,) = lab.hub, lab.spokes
    hub_agent, _unused = start(lab, agents, spoke_extra={"dpd_delay": 2})
    assert both_ways(spoke, hub)
    (before,) = hub_agent.sas("s1")
    renumber_nat(lab, "192.0.2.253")
    hub_agent.wait_for(
        lambda: hub_agent.sas("s1")[0]["remote"].startswith("192.0.2.253:"),
        "the hub follows the NAT's new address",
        timeout=20,
    )
    assert both_ways(spoke, hub) and both_ways(hub, spoke)
    (after,) = hub_agent.sas("s1")
    assert (after["spi_i"], after["children"][0]["spi_in"]) == (
        before["spi_i"],
        before["children"][0]["spi_in"],
    )  # the same SAs: nothing renegotiated
    # Counters went with the SAs: what came before the move is still counted.
    assert after["children"][0]["packets_in"] > before["children"][0]["packets_in"] >= 2
    held = hub_agent.ctl("list-policies")
    tunnel_ends = {t["dst"] for p in held if p["direction"] == "out" for t in p["templates"]}
    assert tunnel_ends == {"192.0.2.253"}
    assert "NAT mapping moved to 192.0.2.253" in hub_agent.log()


def test_encap_no_keeps_ike_on_500_and_esp_plain_through_a_nat(nat_lab, agents):
    """encap: no on the spoke (issue 16: honoured on both planes' terms, not refused):
    no NAT detection is sent, so neither end floats to 4500 or UDP-encapsulates. The
    spoke's IKE stays on port 500 (rewritten by the NAT, answered where it came from),
    its Child SAs carry plain ESP (IP protocol 50), and nftables' masquerade, which
    translates ESP by address, lets the one spoke through."""
    lab = nat_lab(spokes=1)
    hub_agent, (spoke_agent,) = start(lab, agents, spoke_extra={"encap": "no"})
    (sa,) = hub_agent.sas()
    assert not sa["children"][0]["encap"]
    assert int(sa["remote"].rsplit(":", 1)[1]) != 4500
    assert "NAT detected" not in spoke_agent.log() + hub_agent.log()
    with Capture(lab.hub.netns, "eth0") as wire:
        assert both_ways(lab.spokes[0], lab.hub)
    assert [f for f in wire.frames if f.ip_proto == 50 and f.outgoing]
    assert not [f for f in wire.frames if f.udp_payload(4500)]
