"""KernelPlane against this host's XFRM (which has no ESP/AH/GCM): policies, ownership,
SPI allocation, precise refusal of ESP SAs, and ACQUIRE events.

Every test gets a fresh namespace (kwx-<random>) deleted at teardown. The plane runs in
the test process: KernelPlane(netns=...) opens its netlink sockets inside the namespace
(pyroute2 creates them in a forked child), so no thread of this process changes
namespace. Packets are sent from sockets created in the namespace the same way."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import secrets
import socket
import subprocess
from dataclasses import replace

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
    AcquireEvent,
    DataPlaneError,
    Direction,
    IpsecProto,
    Mode,
    PolicyAction,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.codec import (
    effective_priority,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.messages import (
    SPI_MAX,
    SPI_MIN,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import (
    KernelPlane,
    ike_socket_bypass,
    socket_in_netns,
    udp_encap_socket,
)
from tests.conftest import require_root
from tests.fixtures.netns import in_netns

REQID = KEYWAY_REQID_MIN + 0x21
A, B = "192.0.2.11", "192.0.2.12"


def ip(ns: str, *args: str) -> str:
    proc = in_netns(ns, "ip", *args)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def ns():
    require_root()
    name = f"kwx-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def plane(ns):
    p = KernelPlane(netns=ns)
    yield p
    p.close()


def tunnel_policy(src: str, dst: str, a: str, b: str, direction=Direction.OUT, **kw) -> PolicySpec:
    tmpl = Template(IpsecProto.ESP, Mode.TUNNEL, REQID, a, b)
    return PolicySpec(Selector(src, dst), direction, templates=(tmpl,), **kw)


POLICIES = [
    tunnel_policy("10.1.0.0/24", "10.2.0.0/24", A, B),
    tunnel_policy("10.2.0.0/24", "10.1.0.0/24", B, A, Direction.IN),
    tunnel_policy("10.2.0.0/24", "10.1.0.0/24", B, A, Direction.FWD),
    tunnel_policy("fd00:1::/64", "fd00:2::/64", "2001:db8::11", "2001:db8::12", mark=(7, 0xFF)),
    PolicySpec(
        Selector("2001:db8::11/128", "2001:db8::12/128", proto=17, dport=7007),
        Direction.OUT,
        templates=(Template(IpsecProto.ESP, Mode.TRANSPORT, REQID + 1),),
        if_id=9,
    ),
    PolicySpec(Selector("10.1.0.0/24", "10.1.0.0/24"), Direction.OUT, PolicyAction.PASS),
    PolicySpec(Selector("0.0.0.0/0", "10.2.0.0/16"), Direction.OUT, PolicyAction.DROP),
]


def test_policies_install_list_remove(ns, plane):
    for p in POLICIES:
        plane.install_policy(p)
    expected = {replace(p, priority=effective_priority(p)) for p in POLICIES}
    assert set(plane.list_policies()) == expected

    shown = ip(ns, "xfrm", "policy")
    assert "src 10.1.0.0/24 dst 10.2.0.0/24" in shown
    assert "src fd00:1::/64 dst fd00:2::/64" in shown
    assert "src 2001:db8::11/128 dst 2001:db8::12/128 proto udp dport 7007" in shown
    assert f"reqid {REQID} mode tunnel" in shown and f"reqid {REQID + 1} mode transport" in shown
    assert "mark 0x7/0xff" in shown and "if_id 0x9" in shown
    assert "action block" in shown
    assert shown.count("dir out") == 5 and shown.count("dir fwd") == 1
    # derived priorities: the narrower selector wins (lower number)
    assert f"priority {effective_priority(POLICIES[4])} " in shown
    assert effective_priority(POLICIES[4]) < effective_priority(POLICIES[0])

    with pytest.raises(DataPlaneError, match=r"errno 17\)"):  # EEXIST, not swallowed
        plane.install_policy(POLICIES[0])
    for p in POLICIES:
        plane.remove_policy(p.id)
    assert plane.list_policies() == []
    assert ip(ns, "xfrm", "policy").strip() == ""
    with pytest.raises(DataPlaneError) as err:
        plane.remove_policy(POLICIES[0].id)
    assert str(err.value) == (
        "remove_policy out 10.1.0.0/24 -> 10.2.0.0/24: kernel refused: "
        f"{os.strerror(errno.ENOENT)} (errno {errno.ENOENT})"
    )


def test_foreign_state_is_not_listed_nor_flushed(ns, plane):
    ip(ns, "xfrm", "policy", "add", "src", "10.9.0.0/24", "dst", "10.8.0.0/24", "dir", "out",
       "tmpl", "src", A, "dst", B, "proto", "esp", "reqid", "7", "mode", "tunnel")  # fmt: skip
    ip(ns, "xfrm", "policy", "add", "src", "10.9.0.0/24", "dst", "10.7.0.0/24", "dir", "out",
       "priority", "1000")  # a foreign PASS policy outside Keyway's band  # fmt: skip
    foreign_spi = plane.allocate_spi(A, B, IpsecProto.ESP, 7)  # a foreign larval SA
    for p in POLICIES[:2]:
        plane.install_policy(p)
    own_spi = plane.allocate_spi(A, B, IpsecProto.ESP, REQID)
    assert {p.selector.dst for p in plane.list_policies()} == {"10.2.0.0/24", "10.1.0.0/24"}

    plane.flush_owned()

    assert plane.list_policies() == []
    policies = ip(ns, "xfrm", "policy")
    assert "reqid 7 mode tunnel" in policies and "dst 10.8.0.0/24" in policies
    assert "dst 10.7.0.0/24" in policies
    assert "10.2.0.0/24" not in policies
    states = ip(ns, "xfrm", "state")
    assert f"spi 0x{foreign_spi:08x} reqid 7 " in states
    assert f"spi 0x{own_spi:08x}" not in states


def test_allocate_spi(ns, plane):
    spis = [plane.allocate_spi(A, B, IpsecProto.ESP, REQID) for _ in range(2)]
    spis.append(plane.allocate_spi("2001:db8::11", "2001:db8::12", IpsecProto.ESP, REQID))
    assert all(SPI_MIN <= s <= SPI_MAX for s in spis)
    assert len(set(spis)) == 3
    states = ip(ns, "xfrm", "state")
    for s in spis:
        assert f"spi 0x{s:08x} reqid {REQID}" in states
    assert plane.list_sas() == []  # larval states (no algorithms) are not SAs yet
    counters = plane.sa_counters(SaId(B, IpsecProto.ESP, spis[0]))
    assert (counters.bytes, counters.packets, counters.use_time) == (0, 0, 0.0)
    assert counters.add_time > 0
    plane.flush_owned()
    assert ip(ns, "xfrm", "state").strip() == ""


REFUSED = re.compile(
    r"^install_sa esp spi 0x00005000 192\.0\.2\.12: kernel refused: (?P<text>[^(]+) "
    r"\(errno (?P<errno>\d+)\)"
)


@pytest.mark.parametrize(
    "enc_alg,key_len,integ_alg,expected_errno",
    [
        # no ESP type in this kernel: the state cannot be built
        ("aes-cbc", 16, "hmac-sha2-256-128", errno.EPROTONOSUPPORT),
        # no GCM: the AEAD algorithm is looked up (and missing) before the ESP type
        ("aes-gcm-16", 20, None, errno.ENOSYS),
    ],
)
def test_install_esp_sa_refused_precisely(ns, plane, enc_alg, key_len, integ_alg, expected_errno):
    sa = SaSpec(A, B, IpsecProto.ESP, 0x5000, Mode.TUNNEL, REQID, enc_alg=enc_alg,
                enc_key=bytes(range(key_len)), integ_alg=integ_alg,
                integ_key=bytes(32))  # fmt: skip
    try:
        plane.install_sa(sa)
    except DataPlaneError as exc:
        m = REFUSED.match(str(exc))
        assert m, str(exc)
        assert int(m["errno"]) == expected_errno, str(exc)
        assert m["text"] == os.strerror(expected_errno)
    else:  # a kernel with ESP (the VM tier): then it must read back intact
        assert plane.list_sas() == [sa]
        plane.delete_sa(sa.id)
    assert plane.list_sas() == []


def test_delete_missing_sa_names_it(ns, plane):
    with pytest.raises(DataPlaneError) as err:
        plane.delete_sa(SaId(B, IpsecProto.ESP, 0xABCD))
    assert str(err.value) == (
        f"delete_sa esp spi 0x0000abcd {B}: kernel refused: "
        f"{os.strerror(errno.ESRCH)} (errno {errno.ESRCH})"
    )


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_acquire_event(ns, plane, family):
    if family == "ipv4":
        local, peer, plen, fam = "192.0.2.1", "192.0.2.50", 24, socket.AF_INET
    else:
        local, peer, plen, fam = "2001:db8::1", "2001:db8::50", 64, socket.AF_INET6
    # (this kernel has no dummy driver: a veth pair gives the route to the peer)
    ip(ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ip(ns, "addr", "add", f"{local}/{plen}", "dev", "v0", "nodad")
    ip(ns, "link", "set", "v1", "up")
    ip(ns, "link", "set", "v0", "up")
    host = 32 if fam == socket.AF_INET else 128
    trap = PolicySpec(
        Selector(f"{local}/{host}", f"{peer}/{host}", proto=17, dport=7007),
        Direction.OUT,
        templates=(Template(IpsecProto.ESP, Mode.TRANSPORT, REQID),),
    )
    plane.install_policy(trap)

    async def run() -> list:
        events: list = []
        got = asyncio.Event()

        def sink(event) -> None:
            events.append(event)
            got.set()

        await plane.start(sink)
        try:
            sock = socket_in_netns(ns, fam, socket.SOCK_DGRAM)
            with sock:
                sock.bind((local, 40123))
                try:
                    sock.sendto(b"hello", (peer, 7007))
                except OSError as exc:  # EAGAIN while the SA is being acquired
                    assert exc.errno == errno.EAGAIN
            await asyncio.wait_for(got.wait(), 10)
        finally:
            await plane.stop()
        return events

    events = asyncio.run(run())
    assert events[0] == AcquireEvent(
        selector=Selector(f"{local}/{host}", f"{peer}/{host}", proto=17, sport=40123, dport=7007),
        reqid=REQID,
        src=local,
        dst=peer,
    )
    assert plane._events_sock is None  # stop() closed the event socket


def test_socket_helpers(ns):
    for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket_in_netns(ns, fam, socket.SOCK_DGRAM)
        with sock:
            sock.bind((addr, 0))
            ike_socket_bypass(sock)
            udp_encap_socket(sock)
            assert sock.getsockopt(17, 100) == 2  # UDP_ENCAP reads back ESPINUDP


def test_missing_namespace_is_an_error_not_created():
    require_root()
    name = f"kwx-{secrets.token_hex(4)}"
    with pytest.raises(DataPlaneError, match=rf"netns {name}: No such file or directory"):
        KernelPlane(netns=name)
    assert not os.path.exists(f"/run/netns/{name}")


def test_update_and_guards_refuse_precisely(ns, plane):
    spi = plane.allocate_spi(A, B, IpsecProto.ESP, REQID)
    sa = SaSpec(A, B, IpsecProto.ESP, spi, Mode.TRANSPORT, REQID, enc_alg="aes-cbc",
                enc_key=bytes(16), integ_alg="hmac-sha2-256-128", integ_key=bytes(32))  # fmt: skip
    try:
        plane.update_sa(sa)  # fills the larval state allocate_spi made
    except DataPlaneError as exc:
        assert str(exc).startswith(f"update_sa esp spi 0x{spi:08x} {B}: kernel refused: ")
        assert f"{os.strerror(errno.EPROTONOSUPPORT)} (errno {errno.EPROTONOSUPPORT})" in str(exc)
    else:
        assert plane.list_sas() == [sa]
    sel = Selector("10.0.0.0/8", "10.0.0.0/8")
    with pytest.raises(DataPlaneError, match="pass priority 5 outside Keyway's band"):
        plane.install_policy(PolicySpec(sel, Direction.OUT, PolicyAction.PASS, priority=5))
    foreign = Template(IpsecProto.ESP, Mode.TUNNEL, 7, A, B)
    with pytest.raises(DataPlaneError, match="template reqid outside Keyway's range"):
        plane.install_policy(PolicySpec(sel, Direction.OUT, templates=(foreign,)))
    assert ip(ns, "xfrm", "policy").strip() == ""


def test_kernel_counts_follow_the_policies(ns, plane):
    assert plane.kernel_counts() == {"sas": 0, "policies": {"in": 0, "out": 0, "fwd": 0}}
    for p in POLICIES:
        plane.install_policy(p)
    counts = plane.kernel_counts()
    assert counts["policies"] == {"in": 1, "out": 5, "fwd": 1}
    plane.allocate_spi(A, B, IpsecProto.ESP, REQID)  # a larval state counts as an SA
    assert plane.kernel_counts()["sas"] == 1


def test_install_policies_in_batches_attributes_each_refusal_to_its_policy(ns, plane):
    """install_policies sends many policies at once (issue 18) and asks the kernel for
    one ACK per send: a refusal anywhere in a send, its last message included, is still
    the refused policy's own error, and the rest are in."""
    many = [
        tunnel_policy(f"10.1.{i >> 8}.{i & 255}/32", f"10.2.{i >> 8}.{i & 255}/32", A, B)
        for i in range(300)
    ]
    taken = [many[5], many[127], many[299]]  # inside, last of the first send, last of all
    for policy in taken:
        plane.install_policy(policy)
    bad_band = PolicySpec(Selector("10.9.0.0/16", "10.8.0.0/16"), Direction.OUT,
                          PolicyAction.PASS, priority=5)  # fmt: skip
    failed = plane.install_policies([*many[:200], bad_band, *many[200:]])
    assert [policy for policy, _error in failed] == [many[5], many[127], bad_band, many[299]]
    for policy, error in failed:
        if policy is bad_band:
            assert "outside Keyway's band" in str(error)
        else:
            assert str(error) == (
                f"install_policy out {policy.selector.src} -> {policy.selector.dst}: kernel "
                f"refused: {os.strerror(errno.EEXIST)} (errno {errno.EEXIST})"
            )
    assert {p.id for p in plane.list_policies()} == {p.id for p in many}
    assert plane.install_policies([]) == []
