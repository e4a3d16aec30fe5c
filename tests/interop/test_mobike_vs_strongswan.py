"""MOBIKE (RFC 4555) with Debian's charon as the mobile end (issue 16): charon's host is
given a new address and loses its old one, as a laptop moving from one network to
another; charon tells keywayd with UPDATE_SA_ADDRESSES, and keywayd, the responder,
follows: the IKE SA at once, the Child SAs once a request of its own is answered at the
new address (return routability), without renegotiation."""

from __future__ import annotations

import subprocess

import yaml

from tests.fixtures.keywayd import Keywayd
from tests.fixtures.netns import udp_exchange

PSK = "keywayd-mobike-psk-5e6f7a8b9c0d"
NEW_ADDRESS = "192.0.2.112"

# keywayd on a: a responder for a mobile peer, found by identity wherever it comes from.
KEYWAYD_YML = """
connections:
  kw:
    local_addrs: [{a.ipv4}]
    remote_addrs: ["%any"]
    local: {{id: {a.name}.lab, auth: psk}}
    remote: {{id: {b.name}.lab, auth: psk}}
    psk: {psk}
    encap: force            # charon's libipsec sends and expects ESP in UDP
    mobike: {mobike}
    dpd_delay: 0
    children:
      kw:
        local_ts: [{a.site4}]
        remote_ts: [{b.site4}]
        start_action: none
"""

# charon on b: the mobile initiator, from whatever address it has (no local_addrs).
SWANCTL_CONF = """
connections {{
    kw {{
        version = 2
        remote_addrs = {a.ipv4}
        proposals = aes256gcm16-prfsha384-x25519
        encap = yes
        mobike = yes
        local {{
            auth = psk
            id = {b.name}.lab
        }}
        remote {{
            auth = psk
            id = {a.name}.lab
        }}
        children {{
            kw {{
                local_ts = {b.site4}
                remote_ts = {a.site4}
                esp_proposals = aes256gcm16
            }}
        }}
    }}
}}
secrets {{
    ike-kw {{
        id-1 = {b.name}.lab
        id-2 = {a.name}.lab
        secret = "{psk}"
    }}
}}
"""


def _ip(netns: str, *argv: str) -> None:
    done = subprocess.run(["ip", "-n", netns, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _up(netns_hosts, charon_factory, tmp_path, mobike: bool):
    a, b = netns_hosts(2).hosts
    values = dict(a=a, b=b, psk=PSK, mobike="yes" if mobike else "no")
    charon = charon_factory(b.netns, SWANCTL_CONF.format(**values))
    config = yaml.safe_load(KEYWAYD_YML.format(**values))
    agent = Keywayd(a.netns, tmp_path / "a", config["connections"])
    charon.swanctl("--initiate", "--child", "kw", timeout=30)
    agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
    return a, b, agent, charon


def _move(b) -> None:
    """b's host moves: its old address gone, a new one on its link (the old one first:
    deleting a primary address deletes its secondaries too)."""
    _ip(b.netns, "addr", "del", f"{b.ipv4}/24", "dev", "eth0")
    _ip(b.netns, "addr", "add", f"{NEW_ADDRESS}/24", "dev", "eth0")


def test_charon_moving_to_a_new_address_keeps_its_sas_with_keywayd(
    netns_hosts, charon_factory, tmp_path
):
    a, b, agent, charon = _up(netns_hosts, charon_factory, tmp_path, mobike=True)
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"x") == b"x"[::-1]
    (before,) = agent.sas("kw")
    auth = [line for line in agent.log().splitlines() if "sending IKE_AUTH response" in line]
    assert "N(MOBIKE_SUPPORTED)" in auth[0]
    _move(b)
    agent.wait_for(
        lambda: "its Child SAs follow" in agent.log(), "the Child SAs follow charon", timeout=30
    )
    (after,) = agent.sas("kw")
    assert after["remote"].startswith(f"{NEW_ADDRESS}:")
    # The same IKE SA, moved, not renegotiated. keywayd moved its Child SAs too; charon
    # rekeys its own after a move (libipsec cannot change an SA's addresses).
    assert (after["spi_i"], after["spi_r"]) == (before["spi_i"], before["spi_r"])
    assert f"the peer moved (MOBIKE) to {NEW_ADDRESS}:4500: " in agent.log()
    assert "IKE SA up" not in agent.log().split("UPDATE_SA_ADDRESSES", 1)[1]
    held = agent.ctl("list-policies")
    assert {t["dst"] for p in held if p["direction"] == "out" for t in p["templates"]} == {
        NEW_ADDRESS
    }
    # Both ways through the moved SAs; charon lists its SA at the new address.
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"go") == b"og"
    assert udp_exchange(b.netns, a.netns, b.site4_address, a.site4_address, b"back") == b"kcab"
    assert f"local-host={NEW_ADDRESS} local-port=4500 local-id={b.name}.lab" in charon.list_sas()


def test_without_mobike_keywayd_says_nothing_of_it_and_charon_does_not_use_it(
    netns_hosts, charon_factory, tmp_path
):
    """mobike: no: keywayd's IKE_AUTH answer carries no MOBIKE_SUPPORTED, so charon may
    not send UPDATE_SA_ADDRESSES (its move then needs a new IKE SA)."""
    _a, _b, agent, _charon = _up(netns_hosts, charon_factory, tmp_path, mobike=False)
    auth = [line for line in agent.log().splitlines() if "sending IKE_AUTH response" in line]
    assert auth and "MOBIKE_SUPPORTED" not in auth[0]
    assert "MOBIKE_SUPPORTED" in next(
        line for line in agent.log().splitlines() if "received IKE_AUTH request" in line
    )
