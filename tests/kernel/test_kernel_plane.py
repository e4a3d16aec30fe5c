"""keyway's XFRM layer (KernelPlane) against the VM's real kernel: ESP in tunnel and
transport mode with each algorithm family, AH, IPv6, counters, soft and hard expire
events by bytes and by time, and an XFRM interface with if_id."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import install
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import base
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.messages import (
    SPI_MAX,
    SPI_MIN,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import KernelPlane
from tests.fixtures.capture import Capture
from tests.fixtures.netns import in_netns, udp_exchange

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)
REQID = base.KEYWAY_REQID_MIN + 1
SUITES = {
    # name: (proto, enc_alg, enc key bytes, integ_alg, integ key bytes)
    "aes-gcm-16": ("esp", "aes-gcm-16", 20, None, 0),
    "chacha20-poly1305": ("esp", "chacha20-poly1305", 36, None, 0),
    "aes-cbc+sha256": ("esp", "aes-cbc", 16, "hmac-sha2-256-128", 32),
    "ah-sha384": ("ah", None, 0, "hmac-sha2-384-192", 48),
}


def _ip(netns: str, *argv: str) -> None:
    proc = subprocess.run(["ip", "-n", netns, *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _sa(src, dst, spi, suite, keys, mode, selector=None, **extra) -> base.SaSpec:
    proto, enc, _, integ, _ = SUITES[suite]
    return base.SaSpec(
        src=src, dst=dst, proto=base.IpsecProto(proto), spi=spi, mode=base.Mode(mode),
        reqid=REQID, enc_alg=enc, enc_key=keys[0], integ_alg=integ, integ_key=keys[1],
        selector=selector, esn=False, **extra,
    )  # fmt: skip


def _tunnel(h1, h2, suite: str, mode: str = "tunnel", v6: bool = False, **extra):
    """SAs and policies on both hosts for h1 <-> h2 (sites in tunnel mode, the hosts'
    own addresses in transport mode); returns the two planes."""
    _, _, enc_len, _, integ_len = SUITES[suite]
    outer = (h1.ipv6, h2.ipv6) if v6 else (h1.ipv4, h2.ipv4)
    if mode == "tunnel":
        inner = (h1.site6, h2.site6) if v6 else (h1.site4, h2.site4)
    else:
        bits = 128 if v6 else 32
        inner = (f"{outer[0]}/{bits}", f"{outer[1]}/{bits}")
    keys = {d: (secrets.token_bytes(enc_len), secrets.token_bytes(integ_len)) for d in "ab"}
    planes = []
    for me, (lo, re), (mine, theirs), (out_spi, in_spi) in (
        (h1, inner, outer, (0x1001, 0x2001)),
        (h2, inner[::-1], outer[::-1], (0x2001, 0x1001)),
    ):
        plane = KernelPlane(netns=me.netns)
        k_out, k_in = (keys["a"], keys["b"]) if me is h1 else (keys["b"], keys["a"])
        plane.install_sa(_sa(mine, theirs, out_spi, suite, k_out, mode, **extra))
        plane.install_sa(_sa(theirs, mine, in_spi, suite, k_in, mode, **extra))
        for policy in install.child_policies(
            [lo], [re], reqid=REQID, local_address=mine, remote_address=theirs,
            mode=mode, protocol=SUITES[suite][0],
        ):  # fmt: skip
            plane.install_policy(policy)
        if mode == "tunnel":
            _ip(me.netns, "route", "replace", re, "via", theirs)
        planes.append(plane)
    return planes


@pytest.mark.parametrize(
    ("suite", "mode", "v6"),
    [
        ("aes-gcm-16", "tunnel", False),
        ("chacha20-poly1305", "tunnel", False),
        ("aes-cbc+sha256", "tunnel", False),
        ("aes-gcm-16", "transport", False),
        ("ah-sha384", "tunnel", False),
        ("aes-gcm-16", "tunnel", True),
    ],
)
def test_traffic_through_the_kernel_with_keyway_s_sas(netns_hosts, suite, mode, v6):
    h1, h2 = netns_hosts(2).hosts
    p1, p2 = _tunnel(h1, h2, suite, mode, v6)
    if mode == "tunnel":
        src, dst = (
            (h1.site6_address, h2.site6_address) if v6 else (h1.site4_address, h2.site4_address)
        )
    else:
        src, dst = (h1.ipv6, h2.ipv6) if v6 else (h1.ipv4, h2.ipv4)
    with Capture(h1.netns, "eth0") as cap:
        assert udp_exchange(h1.netns, h2.netns, src, dst, b"xfrm", timeout=60) == b"mrfx"
    proto = 51 if suite.startswith("ah") else 50
    assert any(f.ip_proto == proto for f in cap.frames if f.outgoing)
    assert any(f.ip_proto == proto for f in cap.frames if not f.outgoing)
    if proto == 50:
        # Only what leaves: the kernel re-injects decapsulated tunnel packets through
        # eth0's receive path, where a packet socket sees them in the clear.
        assert not any(b"xfrm" in f.data or b"mrfx" in f.data for f in cap.frames if f.outgoing)
    for plane, out_spi in ((p1, 0x1001), (p2, 0x2001)):
        (sa,) = [s for s in plane.list_sas() if s.spi == out_spi]
        assert plane.sa_counters(sa.id).packets >= 1  # counters rise with traffic
        assert sa.enc_key == _sa_key(plane, out_spi)  # keys read back as installed
    for plane in (p1, p2):
        plane.flush_owned()
        assert not plane.list_sas() and not plane.list_policies()


def _sa_key(plane, spi):
    return next(s.enc_key for s in plane.list_sas() if s.spi == spi)


def test_soft_and_hard_expire_events_by_bytes_and_time(netns_hosts):
    h1, h2 = netns_hosts(2).hosts
    bytes_limit = base.Lifetime(soft_bytes=300, hard_bytes=100_000)
    p1, _ = _tunnel(h1, h2, "aes-gcm-16", lifetime=bytes_limit)
    timed = KernelPlane(netns=h1.netns)
    key = (secrets.token_bytes(20), b"")
    timed.install_sa(_sa(h1.ipv4, "192.0.2.99", 0x3001, "aes-gcm-16", key, "tunnel",
                         lifetime=base.Lifetime(soft_seconds=2, hard_seconds=4)))  # fmt: skip

    async def collect() -> list:
        events: list = []
        await p1.start(events.append)
        loop = asyncio.get_running_loop()
        for n in range(3):  # ~1 kB through the byte-limited SA
            await loop.run_in_executor(
                None, udp_exchange, h1.netns, h2.netns, h1.site4_address, h2.site4_address,
                b"x" * 300, 7100 + n, 30,
            )  # fmt: skip
        for _ in range(200):  # the time limits: events within ~5 s of wall time
            if any(e.sa.spi == 0x3001 and e.hard for e in events if hasattr(e, "sa")):
                break
            await asyncio.sleep(0.1)
        await p1.stop()
        return events

    events = asyncio.run(collect())
    expires = [(e.sa.spi, e.hard) for e in events if isinstance(e, base.ExpireEvent)]
    assert (0x1001, False) in expires  # soft, by bytes, on the outbound SA
    assert (0x1001, True) not in expires  # far from the hard limit
    assert (0x3001, False) in expires and (0x3001, True) in expires  # by time: soft, hard
    assert all(e.reqid == REQID for e in events if isinstance(e, base.ExpireEvent))
    assert not [s for s in timed.list_sas() if s.spi == 0x3001]  # the kernel removed it


def test_an_sa_s_selector_bounds_what_a_wider_policy_of_its_reqid_sends_into_it(netns_hosts):
    """Issue 14, item 15, as the userspace plane now does it too: a trap policy for the
    configured sites shares its reqid with the Child SA the peer narrowed to half of
    h2's site. The kernel's state lookup takes the SA's selector into account: a packet
    to the other half is not sent into the SA (the peer would drop it) but acquired."""
    h1, h2 = netns_hosts(2).hosts
    p1, _p2 = _tunnel(h1, h2, "aes-gcm-16")  # policies for the whole sites
    halves = list(ipaddress.ip_network(h2.site4).subnets())
    (out,) = [s for s in p1.list_sas() if s.spi == 0x1001]
    p1.delete_sa(out.id)
    p1.install_sa(dataclasses.replace(out, selector=base.Selector(h1.site4, str(halves[0]))))
    other = str(list(halves[1].hosts())[-1])
    send = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind((sys.argv[1], 0)); s.sendto(b'outside', (sys.argv[2], 9))"
    )

    async def run() -> list:
        events: list = []
        await p1.start(events.append)
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(
            None, udp_exchange, h1.netns, h2.netns, h1.site4_address, h2.site4_address,
            b"half", 7007, 30,
        )  # fmt: skip
        assert answer == b"flah"  # the narrowed half goes through the SA
        with Capture(h1.netns, "eth0", outgoing_only=True) as cap:
            for _unused in range(3):
                in_netns(h1.netns, sys.executable, "-c", send, h1.site4_address, other)
            for _unused in range(50):
                if any(isinstance(e, base.AcquireEvent) for e in events):
                    break
                await asyncio.sleep(0.1)
        await p1.stop()
        assert not [f for f in cap.frames if f.ip_proto == 50 or b"outside" in f.data]
        return events

    acquires = [e for e in asyncio.run(run()) if isinstance(e, base.AcquireEvent)]
    assert acquires and acquires[0].reqid == REQID
    assert acquires[0].selector.dst.split("/")[0] == other  # the flow the kernel acquires
    p1.flush_owned()


def test_xfrm_interface_with_if_id(netns_hosts):
    h1, h2 = netns_hosts(2).hosts
    key_ab, key_ba = secrets.token_bytes(20), secrets.token_bytes(20)
    for me, peer, k_out, k_in, spis in ((h1, h2, key_ab, key_ba, (0x51, 0x52)),
                                        (h2, h1, key_ba, key_ab, (0x52, 0x51))):  # fmt: skip
        _ip(me.netns, "link", "add", "ipsec1", "type", "xfrm", "dev", "eth0", "if_id", "42")
        _ip(me.netns, "link", "set", "ipsec1", "up")
        plane = KernelPlane(netns=me.netns)
        for src, dst, spi, key in ((me.ipv4, peer.ipv4, spis[0], k_out),
                                   (peer.ipv4, me.ipv4, spis[1], k_in)):  # fmt: skip
            plane.install_sa(_sa(src, dst, spi, "aes-gcm-16", (key, b""), "tunnel", if_id=42))
        for policy in install.child_policies(
            ["0.0.0.0/0"], ["0.0.0.0/0"], reqid=REQID, local_address=me.ipv4,
            remote_address=peer.ipv4, if_id_in=42, if_id_out=42,
        ):  # fmt: skip
            plane.install_policy(policy)
        _ip(me.netns, "route", "replace", peer.site4, "dev", "ipsec1")
        assert all(p.if_id == 42 for p in plane.list_policies())
    reply = udp_exchange(
        h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"if_id", timeout=60
    )
    assert reply == b"di_fi"
    shown = in_netns(h1.netns, "ip", "-s", "-j", "link", "show", "ipsec1").stdout
    stats = json.loads(shown)[0]["stats64"]
    assert stats["tx"]["packets"] >= 1 and stats["rx"]["packets"] >= 1  # through ipsec1


def test_an_sa_fills_the_spi_allocate_spi_reserved(netns_hosts):
    """Issue 14, item 10: keywayd takes inbound SPIs from the kernel (ALLOCSPI, a larval
    SA); installing the SA fills that larval SA in place, or adds the SA anew once the
    kernel has expired it (a negotiation slower than net.core.xfrm_acq_expires)."""
    h1, h2 = netns_hosts(2).hosts
    plane = KernelPlane(netns=h2.netns)
    key = (secrets.token_bytes(20), b"")

    def states(spi: int) -> list[str]:
        shown = in_netns(h2.netns, "ip", "xfrm", "state").stdout
        return [s for s in shown.split("src ")[1:] if f"spi 0x{spi:08x} " in s]

    filled = plane.allocate_spi(h1.ipv4, h2.ipv4, base.IpsecProto.ESP, REQID)
    (larval,) = states(filled)
    assert "aead" not in larval
    plane.install_sa(_sa(h1.ipv4, h2.ipv4, filled, "aes-gcm-16", key, "tunnel"))
    (state,) = states(filled)
    assert "aead rfc4106(gcm(aes))" in state and "mode tunnel" in state

    in_netns(h2.netns, "sh", "-c", "echo 1 > /proc/sys/net/core/xfrm_acq_expires")
    late = plane.allocate_spi(h1.ipv4, h2.ipv4, base.IpsecProto.ESP, REQID)
    for _ in range(100):  # the kernel's timer removes the larval SA after ~1 s
        if not states(late):
            break
        time.sleep(0.1)
    assert not states(late)
    plane.install_sa(_sa(h1.ipv4, h2.ipv4, late, "aes-gcm-16", key, "tunnel"))
    assert {sa.spi for sa in plane.list_sas()} == {filled, late}
    assert all(SPI_MIN <= spi <= SPI_MAX for spi in (filled, late))
