"""Issue 16: a mesh defined by policy (opportunistic encryption) between lab hosts: one
trap policy per prefix on each host, a tunnel to any host there on its first packet,
authenticated by certificates whose identity is each host's address; private-or-clear
falls back to the clear with a host that speaks no IKE, private drops its traffic, and a
pass child exempts a range."""

from __future__ import annotations

import concurrent.futures

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from tests.fixtures.opportunistic import FAST, credentials, mesh
from tests.fixtures.traffic import echo_servers, first_answers


def answered(src, dst, timeout: float = 10.0) -> float | None:
    """Seconds until dst's echo server first answered src (datagrams every 0.1 s; the
    first ones may be dropped while a tunnel comes up), or None."""
    return first_answers(src, [dst.ipv4], timeout=timeout)[0]


def child_packets(agent, name: str) -> tuple[int, int]:
    """Packets in and out of the established Child SAs of connection `name`."""
    children = [c for sa in agent.sas(name) for c in sa["children"]]
    return sum(c["packets_in"] for c in children), sum(c["packets_out"] for c in children)


def test_hosts_in_a_prefix_are_tunnelled_on_their_first_packet_by_their_addresses(
    netns_hosts, agents, tmp_path
):
    h1, h2, h3, h4 = netns_hosts(4).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    agent = {}
    for host in (h1, h2, h3):
        folder = credentials(ca, host, tmp_path)
        policy = "private" if host is h3 else "private-or-clear"
        # h2 exempts h4 from the mesh (clear); h4 speaks no IKE at all.
        extra = {"clear": {"mode": "pass", "remote_ts": [f"{h4.ipv4}/32"]}} if host is h2 else {}
        agent[host.name] = agents(host, mesh(host, folder, policy, **extra), **FAST)
    a1, a2, a3 = agent["h1"], agent["h2"], agent["h3"]
    with echo_servers((h1, h2, h3, h4)):
        _prove_the_mesh(h1, h2, h3, h4, a1, a2, a3)


def _prove_the_mesh(h1, h2, h3, h4, a1, a2, a3) -> None:
    # The first packet from h1 to h2 brings up their tunnel: an instance at each end,
    # named by the peer's address, and their traffic goes through it.
    assert answered(h1, h2) is not None
    name12, name21 = f"mesh[{h2.ipv4}]", f"mesh[{h1.ipv4}]"
    a1.wait_for(lambda: a1.sas(name12), "h1's instance for h2 up")
    a2.wait_for(lambda: a2.sas(name21), "h2's instance for h1 up")
    [sa] = a1.sas(name12)
    assert (sa["local"], sa["remote_id"]) == (h1.ipv4, h2.ipv4)
    before = child_packets(a1, name12)
    for _unused in range(5):
        assert answered(h1, h2) is not None
    after = child_packets(a1, name12)
    assert after[0] - before[0] >= 5 and after[1] - before[1] >= 5, (before, after)
    conns = {c["name"]: c for c in a2.ctl("list-conns")}
    assert conns[name21]["instance_of"] == "mesh"
    assert conns["mesh"]["opportunistic"] == "private-or-clear"

    # Either end may begin: h3 to h2, and to h1 (its first packet each time).
    assert answered(h3, h2) is not None and answered(h3, h1) is not None
    a3.wait_for(lambda: a3.sas(f"mesh[{h1.ipv4}]") and a3.sas(f"mesh[{h2.ipv4}]"), "h3 up")

    # The policies stay one set per prefix however many peers: no per-peer policy.
    policies = a1.ctl("list-policies")
    assert {(p["connection"], p["direction"], p["dst"]) for p in policies} == {
        ("mesh", "out", "192.0.2.0/24"),
        ("mesh", "in", f"{h1.ipv4}/32"),
    }, policies

    # h4 speaks no IKE. private-or-clear (h1): the first datagrams wait on IKE; once
    # it has failed, a pass shunt lets them through in the clear.
    waited = answered(h1, h4)
    assert waited is not None and waited > 1.0, waited
    shunts = [p for p in a1.ctl("list-policies") if p["child"] == f"shunt for {h4.ipv4}"]
    assert {p["action"] for p in shunts} == {"pass"}, shunts
    assert f"mesh[{h4.ipv4}]" not in {c["name"] for c in a1.ctl("list-conns")}
    # private (h3): its traffic to h4 is dropped, before and after the failure.
    assert answered(h3, h4, timeout=5.0) is None
    shunts = [p for p in a3.ctl("list-policies") if p["child"] == f"shunt for {h4.ipv4}"]
    assert {p["action"] for p in shunts} == {"drop"}, shunts
    assert answered(h3, h4, timeout=1.0) is None
    # h2 exempts h4 by a pass child: in the clear from the first packet, no negotiation.
    waited = answered(h2, h4)
    assert waited is not None and waited < 0.5, waited
    assert f"mesh[{h4.ipv4}]" not in {c["name"] for c in a2.ctl("list-conns")}
    assert "negotiation failed" not in a2.log()


MESH_HOSTS = 30


def test_thirty_hosts_with_the_same_config_reach_every_other_through_a_tunnel(
    netns_hosts, agents, tmp_path
):
    """Every pair of 30 hosts exchanges traffic, all starting at once (so both ends of
    each pair initiate together); each host holds the same one connection and policy
    pair, and ends with one IKE SA per peer. bench/opportunistic_mesh.py times it."""
    hosts = netns_hosts(MESH_HOSTS).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    started = [
        agents(h, mesh(h, credentials(ca, h, tmp_path), "private"), log_level="info") for h in hosts
    ]
    with echo_servers(hosts), concurrent.futures.ThreadPoolExecutor(MESH_HOSTS) as pool:
        waits = list(
            pool.map(
                lambda h: first_answers(h, [p.ipv4 for p in hosts if p is not h], timeout=60),
                hosts,
            )
        )
    missing = [
        (h.name, p.name)
        for h, row in zip(hosts, waits, strict=True)
        for p, wait in zip([p for p in hosts if p is not h], row, strict=True)
        if wait is None
    ]
    assert not missing, missing
    for host, agent in zip(hosts, started, strict=True):
        # Transient surplus IKE SAs from the crossed initiations are settled: one each.
        peers = sorted(f"mesh[{p.ipv4}]" for p in hosts if p is not host)
        agent.wait_for(
            lambda agent=agent, peers=peers: (
                sorted(sa["connection"] for sa in agent.sas()) == peers
            ),
            f"{host.name}: one IKE SA per peer",
        )
        assert len(agent.ctl("list-policies")) == 2
        assert "ERROR" not in agent.log()
