"""Two keywayd with the kernel data plane in the VM: IKE negotiated by keywayd, traffic
through the real kernel's ESP (plain and in UDP), a rekey under traffic, and a clean
SIGTERM that leaves no Keyway SA, policy or route behind."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from ansible_collections.keyway.ipsec.plugins.module_utils.esp.tun import ROUTE_TABLE
from tests.fixtures.capture import Capture
from tests.fixtures.keywayd import ENTRY, ROOT, Keywayd, site_connection
from tests.fixtures.nat import flush_mappings, renumber_nat
from tests.fixtures.netns import in_netns, udp_exchange
from tests.fixtures.opportunistic import FAST, credentials, mesh
from tests.fixtures.traffic import echo_servers, first_answers

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)
SLOW = 300  # seconds: Python in the emulated guest is 10 to 25 times slower


def _with_protocol(conn: dict, protocol: str) -> dict:
    if protocol == "esp":
        return conn
    child = {k: v for k, v in conn["children"]["sites"].items() if k != "esp_proposals"}
    return {**conn, "children": {"sites": {**child, "ah_proposals": ["sha256"]}}}


@pytest.mark.parametrize(
    ("protocol", "encap"),
    [("esp", "auto"), ("esp", "force"), ("ah", "auto")],
    ids=["esp", "esp-in-udp", "ah"],
)
def test_keywayd_pair_on_the_kernel_plane(netns_hosts, tmp_path, protocol, encap):
    a, b = netns_hosts(2).hosts
    conn_b = {**_with_protocol(site_connection(b, a, start=False), protocol), "encap": encap}
    conn_a = {**_with_protocol(site_connection(a, b, start=True), protocol), "encap": encap}
    agent_b = Keywayd(b.netns, tmp_path / "b", {"ab": conn_b}, dataplane="kernel", timeout=SLOW)
    agent_a = Keywayd(a.netns, tmp_path / "a", {"ab": conn_a}, dataplane="kernel", timeout=SLOW)
    try:
        assert agent_a.ctl("status")["dataplane"] == "kernel"
        agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established", SLOW)
        (child,) = agent_a.sas("ab")[0]["children"]
        kernel = in_netns(a.netns, "ip", "xfrm", "state").stdout
        assert f"spi 0x{child['spi_out']}" in kernel and f"spi 0x{child['spi_in']}" in kernel
        assert ("encap type espinudp" in kernel) == (encap == "force")
        with Capture(a.netns, "eth0") as cap:
            reply = udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"k1",
                                 timeout=60)  # fmt: skip
        assert reply == b"1k"
        if encap == "force":
            assert any(f.udp_payload(4500) for f in cap.frames if f.outgoing)
        else:  # ESP, or AH (issue 14, item 6)
            wire_proto = 50 if protocol == "esp" else 51
            assert any(f.ip_proto == wire_proto for f in cap.frames if f.outgoing)
            assert f"proto {protocol} " in kernel
        (child,) = agent_a.sas("ab")[0]["children"]
        assert child["packets_out"] >= 1 and child["packets_in"] >= 1  # the kernel's counters

        agent_a.ctl("rekey", connection="ab", child="sites")
        agent_a.wait_for(
            lambda: [c["spi_in"] for c in agent_a.sas("ab")[0]["children"]] not in
            ([child["spi_in"]], []) and len(agent_a.sas("ab")[0]["children"]) == 1,
            "rekeyed", SLOW,
        )  # fmt: skip
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"k2",
                            timeout=60) == b"2k"  # fmt: skip
        if encap == "auto" and protocol == "esp":
            # Issue 14, item 9, on the kernel plane: a second keywayd with the same config
            # refuses before it touches XFRM (it would have flushed a's SAs and policies).
            env = dict(os.environ, PYTHONPATH=str(ROOT / ".collections"))
            config = str(agent_a.config_path)
            second = in_netns(a.netns, sys.executable, "-m", ENTRY, "--config", config,
                              cwd=ROOT, timeout=SLOW, env=env)  # fmt: skip
            assert second.returncode == 1, second.stderr
            assert f"another keywayd (pid {agent_a.process.pid}) is running" in second.stderr
            (now,) = agent_a.sas("ab")[0]["children"]
            kernel = in_netns(a.netns, "ip", "xfrm", "state").stdout
            assert f"spi 0x{now['spi_out']}" in kernel and f"spi 0x{now['spi_in']}" in kernel
            assert "reqid" in in_netns(a.netns, "ip", "xfrm", "policy").stdout
        # The old SAs go after the new ones (its inbound half DELETE_REKEYED_DELAY later).
        agent_a.wait_for(
            lambda: f"spi 0x{child['spi_in']}" not in
            in_netns(a.netns, "ip", "xfrm", "state").stdout,
            "the old inbound SA gone", SLOW,
        )  # fmt: skip

        assert agent_a.stop(timeout=SLOW) == 0
        assert not re.search(r"reqid 126399\d+", in_netns(a.netns, "ip", "xfrm", "state").stdout)
        assert "reqid" not in in_netns(a.netns, "ip", "xfrm", "policy").stdout
        assert b.site4 not in in_netns(a.netns, "ip", "route", "show", "table", "all").stdout
    finally:
        agent_a.stop(timeout=SLOW)
        agent_b.stop(timeout=SLOW)


def test_keywayd_with_an_xfrm_interface_leaves_the_routing_to_it(netns_hosts, tmp_path):
    """Issue 14, item 11: with if_id, traffic is routed into the XFRM interface. keywayd
    routed the remote site itself too, in its table looked up before main: out eth0,
    where a policy with an if_id matches nothing, so the traffic left in the clear.
    Like strongSwan (install_routes_xfrmi = no), keywayd routes no if_id child."""
    a, b = netns_hosts(2).hosts
    agents = []
    try:
        for me, peer in ((b, a), (a, b)):
            in_netns(me.netns, "ip", "link", "add", "ipsec1", "type", "xfrm", "dev", "eth0",
                     "if_id", "42")  # fmt: skip
            in_netns(me.netns, "ip", "link", "set", "ipsec1", "up")
            in_netns(me.netns, "ip", "route", "add", peer.site4, "dev", "ipsec1")
            conn = {**site_connection(me, peer, start=me is a), "if_id_in": 42, "if_id_out": 42}
            agents.append(Keywayd(me.netns, tmp_path / me.name, {"ab": conn},
                                  dataplane="kernel", timeout=SLOW))  # fmt: skip
        agent_a = agents[-1]
        agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established", SLOW)
        own = in_netns(a.netns, "ip", "route", "show", "table", str(ROUTE_TABLE)).stdout
        assert b.site4 not in own
        with Capture(a.netns, "eth0") as cap:
            reply = udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"xi",
                                 timeout=60)  # fmt: skip
        assert reply == b"ix"
        sent = [f for f in cap.frames if f.outgoing]
        assert any(f.ip_proto == 50 for f in sent)
        assert not any(f.udp_payload() == b"xi" for f in sent)  # nothing in the clear
        shown = in_netns(a.netns, "ip", "-s", "-j", "link", "show", "ipsec1").stdout
        assert json.loads(shown)[0]["stats64"]["tx"]["packets"] >= 1
    finally:
        for agent in agents:
            agent.stop(timeout=SLOW)


def test_two_spokes_behind_a_port_rewriting_nat_on_the_kernel_plane(nat_lab, tmp_path):
    """Issue 16 on the real kernel: the hub's XFRM SAs send ESP in UDP to the port the NAT
    mapped each spoke's 4500 to, and take it from there; a flushed NAT mapping is
    followed by updating them in place: s1's liveness check carries it, and s2 (no
    liveness checks) its ESP, which the kernel reports (XFRM_MSG_MAPPING) once it
    authenticated it."""
    lab = nat_lab(spokes=2)
    hub, spokes = lab.hub, lab.spokes
    hub_conns = {}
    for spoke in spokes:
        conn = site_connection(hub, spoke, start=False)
        conn["remote_addrs"] = [lab.public_nat_address]
        hub_conns[spoke.name] = conn
    agents = [Keywayd(hub.netns, tmp_path / "hub", hub_conns, dataplane="kernel", timeout=SLOW)]
    try:
        for spoke, dpd in zip(spokes, (5, 0), strict=True):
            conn = {**site_connection(spoke, hub, start=True), "dpd_delay": dpd}
            agents.append(Keywayd(spoke.netns, tmp_path / spoke.name, {"hub": conn},
                                  dataplane="kernel", timeout=SLOW))  # fmt: skip
        hub_agent = agents[0]
        for spoke in spokes:
            hub_agent.wait_for(
                lambda spoke=spoke: (
                    hub_agent.sas(spoke.name) and hub_agent.sas(spoke.name)[0]["children"]
                ),
                f"{spoke.name} up",
                timeout=SLOW,
            )
        ports = {s.name: hub_agent.sas(s.name)[0]["remote"].rsplit(":", 1)[1] for s in spokes}
        assert len(set(ports.values())) == 2 and not set(ports.values()) & {"500", "4500"}
        xfrm = in_netns(hub.netns, "ip", "xfrm", "state").stdout
        for port in ports.values():
            assert f"encap type espinudp sport 4500 dport {port}" in xfrm
            assert f"encap type espinudp sport {port} dport 4500" in xfrm
        for spoke in spokes:
            assert udp_exchange(spoke.netns, hub.netns, spoke.site4_address, hub.site4_address,
                                b"in", timeout=30) == b"ni"  # fmt: skip
        before = {s.name: hub_agent.sas(s.name)[0]["remote"] for s in spokes}
        flush_mappings(lab)
        # s2's ESP brings its new mapping (the echo's answer may still take the old one).
        udp_exchange(spokes[1].netns, hub.netns, spokes[1].site4_address, hub.site4_address,
                     b"knock", timeout=5)  # fmt: skip
        for spoke in spokes:
            hub_agent.wait_for(
                lambda spoke=spoke: hub_agent.sas(spoke.name)[0]["remote"] != before[spoke.name],
                f"{spoke.name}'s new mapping",
                timeout=SLOW,
            )
            port = hub_agent.sas(spoke.name)[0]["remote"].rsplit(":", 1)[1]
            hub_agent.wait_for(
                lambda port=port: (
                    f"dport {port}" in in_netns(hub.netns, "ip", "xfrm", "state").stdout
                ),
                "the hub's SAs follow",
                timeout=SLOW,
            )
            assert udp_exchange(hub.netns, spoke.netns, hub.site4_address, spoke.site4_address,
                                b"out", timeout=30) == b"tuo"  # fmt: skip
    finally:
        for agent in agents:
            agent.stop()


def _oseq_towards(netns: str, dst: str) -> int:
    """The outbound sequence number of the (one) SA to `dst`, as `ip xfrm state` shows."""
    states = in_netns(netns, "ip", "xfrm", "state").stdout.split("\nsrc ")
    (block,) = [b for b in states if re.match(rf"(src )?\S+ dst {re.escape(dst)}\n", b)]
    return int(re.search(r"oseq (0x[0-9a-f]+)", block).group(1), 16)


def test_a_nat_that_gets_another_public_address_is_followed_on_the_kernel_plane(nat_lab, tmp_path):
    """Issue 16 on the real kernel: the spoke's NAT gets another public address. The
    hub's XFRM SAs are added anew at it with their sequence numbers (an outbound one
    counting from 1 again would be dropped by the spoke as replays), the old ones go,
    and the tunnel's policy templates point there; no renegotiation."""
    lab = nat_lab(spokes=1)
    hub, (spoke,) = lab.hub, lab.spokes
    conn = site_connection(hub, spoke, start=False)
    conn["remote_addrs"] = [lab.public_nat_address]
    agents = [Keywayd(hub.netns, tmp_path / "hub", {"s1": conn}, dataplane="kernel",
                      timeout=SLOW)]  # fmt: skip
    try:
        spoke_conn = {**site_connection(spoke, hub, start=True), "dpd_delay": 5}
        agents.append(Keywayd(spoke.netns, tmp_path / "s1", {"hub": spoke_conn},
                              dataplane="kernel", timeout=SLOW))  # fmt: skip
        hub_agent = agents[0]
        hub_agent.wait_for(
            lambda: hub_agent.sas("s1") and hub_agent.sas("s1")[0]["children"], "up", SLOW
        )
        for _unused in range(3):
            assert udp_exchange(hub.netns, spoke.netns, hub.site4_address, spoke.site4_address,
                                b"out", timeout=30) == b"tuo"  # fmt: skip
        sent = _oseq_towards(hub.netns, "192.0.2.254")
        assert sent >= 3
        (before,) = hub_agent.sas("s1")
        renumber_nat(lab, "192.0.2.253")
        hub_agent.wait_for(
            lambda: hub_agent.sas("s1")[0]["remote"].startswith("192.0.2.253:"),
            "the hub follows the NAT's new address",
            timeout=SLOW,
        )
        states = in_netns(hub.netns, "ip", "xfrm", "state").stdout
        assert "192.0.2.254" not in states
        assert "src 192.0.2.1 dst 192.0.2.253" in states
        assert "src 192.0.2.253 dst 192.0.2.1" in states
        assert _oseq_towards(hub.netns, "192.0.2.253") == sent  # carried, not reset
        policies = in_netns(hub.netns, "ip", "xfrm", "policy").stdout
        assert "tmpl src 192.0.2.1 dst 192.0.2.253" in policies
        assert "192.0.2.254" not in policies
        assert udp_exchange(hub.netns, spoke.netns, hub.site4_address, spoke.site4_address,
                            b"out", timeout=30) == b"tuo"  # fmt: skip
        assert udp_exchange(spoke.netns, hub.netns, spoke.site4_address, hub.site4_address,
                            b"in", timeout=30) == b"ni"  # fmt: skip
        (after,) = hub_agent.sas("s1")
        assert (after["spi_i"], after["children"][0]["spi_in"]) == (
            before["spi_i"],
            before["children"][0]["spi_in"],
        )
    finally:
        for agent in agents:
            agent.stop()


def test_a_mesh_defined_by_policy_on_the_kernel_plane(netns_hosts, tmp_path):
    """Issue 16: opportunistic connections on the kernel's XFRM: one transport policy
    pair for the prefix, without template addresses; the kernel's acquire names the
    peer, both ends' SAs share the prefix policy's reqid, traffic is ESP on the wire; a
    host without keywayd gets a pass shunt (private-or-clear) and is reached in the
    clear."""
    h1, h2, h3 = netns_hosts(3).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    agents = []
    try:
        for host in (h2, h1):
            config = mesh(host, credentials(ca, host, tmp_path), "private-or-clear")
            agents.append(Keywayd(host.netns, tmp_path / host.name / "agent", config,
                                  dataplane="kernel", timeout=SLOW, **FAST))  # fmt: skip
        agent2, agent1 = agents
        policies = in_netns(h1.netns, "ip", "xfrm", "policy").stdout
        assert "src 192.0.2.11/32 dst 192.0.2.0/24" in policies, policies
        with echo_servers((h2, h3)), Capture(h1.netns, "eth0") as cap:
            [to_h2] = first_answers(h1, [h2.ipv4], timeout=SLOW)
            assert to_h2 is not None
            # h3 speaks no IKE: h1 gives up within the retransmissions, then the clear.
            [to_h3] = first_answers(h1, [h3.ipv4], timeout=SLOW)
            assert to_h3 is not None
        sent = [f for f in cap.frames if f.outgoing]
        assert any(f.ip_proto == 50 for f in sent)  # to h2: h3 has no SA
        assert not any(f.udp_payload() == h2.ipv4.encode() for f in sent)  # none in clear
        assert any(f.udp_payload() == h3.ipv4.encode() for f in sent)  # the shunt's clear
        agent1.wait_for(lambda: agent1.sas(f"mesh[{h2.ipv4}]"), "h1's instance up", SLOW)
        agent2.wait_for(lambda: agent2.sas(f"mesh[{h1.ipv4}]"), "h2's instance up", SLOW)
        [child] = agent1.sas(f"mesh[{h2.ipv4}]")[0]["children"]
        states = in_netns(h1.netns, "ip", "xfrm", "state").stdout
        assert f"spi 0x{child['spi_out']}" in states and "mode transport" in states
        policies = in_netns(h1.netns, "ip", "xfrm", "policy").stdout
        assert f"src 192.0.2.11/32 dst {h3.ipv4}/32" in policies  # the pass shunt
        assert f"dst {h2.ipv4}/32" not in policies  # no policy per peer
    finally:
        for agent in agents:
            agent.stop(timeout=SLOW)
