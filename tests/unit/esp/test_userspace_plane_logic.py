"""UserspacePlane logic without I/O: the TUN device is a pipe, ESP-in-UDP goes through the
udp_sender hook, the clock is fake. Policies, SA lookup, selectors, lifetimes, events and
per-reason drop counters."""

from __future__ import annotations

import dataclasses
import os
import socket
import struct

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import userspace
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
    SPI_RESERVATION,
    AcquireEvent,
    DataPlaneError,
    Direction,
    ExpireEvent,
    IpsecProto,
    Lifetime,
    MappingEvent,
    Mode,
    PolicyAction,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    SeqOverflowEvent,
    Template,
    UdpEncap,
    UnknownSpiEvent,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.userspace import (
    UserspacePlane,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.esp import packet as pk

REQID = KEYWAY_REQID_MIN + 7
A, B = "192.0.2.11", "192.0.2.12"
NO_LIMIT = Lifetime()


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def udp_packet(src: str, dst: str, payload: bytes, dport: int = 7) -> bytes:
    udp = struct.pack("!HHHH", 1234, dport, 8 + len(payload), 0) + payload
    return pk.ipv4_header(pk._addr(src), pk._addr(dst), 17, len(udp)) + udp


def sa(src, dst, spi, key, sel_src, sel_dst, lifetime=NO_LIMIT, esn=True) -> SaSpec:
    return SaSpec(
        src=src, dst=dst, proto=IpsecProto.ESP, spi=spi, mode=Mode.TUNNEL, reqid=REQID,
        enc_alg="aes-gcm-16", enc_key=key, selector=Selector(sel_src, sel_dst),
        encap=UdpEncap(), lifetime=lifetime, esn=esn,
    )  # fmt: skip


class Pair:
    """Two planes wired back to back through their udp_sender hooks."""

    def __init__(self, lifetime: Lifetime = NO_LIMIT, esn: bool = True) -> None:
        self.clock = Clock()
        self.events: list = []
        self.wire: list[tuple[bytes, str, int]] = []
        self.a = UserspacePlane(udp_sender=lambda *x: self.wire.append(x), clock=self.clock)
        self.b = UserspacePlane(udp_sender=lambda *x: self.wire.append(x), clock=self.clock)
        self.a._events = self.events.append
        k1, k2 = os.urandom(20), os.urandom(20)
        self.a.install_sa(sa(A, B, 0x1001, k1, "10.1.0.0/24", "10.2.0.0/24", lifetime, esn))
        self.b.install_sa(sa(A, B, 0x1001, k1, "10.1.0.0/24", "10.2.0.0/24", lifetime, esn))
        self.b.install_sa(sa(B, A, 0x2001, k2, "10.2.0.0/24", "10.1.0.0/24"))
        self.a.install_sa(sa(B, A, 0x2001, k2, "10.2.0.0/24", "10.1.0.0/24"))
        self.a.install_policy(
            PolicySpec(Selector("10.1.0.0/24", "10.2.0.0/24"), Direction.OUT,
                       templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, A, B),))
        )  # fmt: skip
        self.r, w = os.pipe()
        os.set_blocking(self.r, False)
        self.b._tun_fd = w

    def send(self, inner: bytes) -> bytes | None:
        """a -> wire -> b; the packet b wrote to its TUN, or None."""
        self.a.handle_outbound(inner)
        while self.wire:
            esp, dst, port = self.wire.pop(0)
            assert (dst, port) == (B, 4500)
            self.last = esp
            self.b.handle_udp_encap(esp, A, B)
        try:
            return os.read(self.r, 65535)
        except BlockingIOError:
            return None

    def close(self) -> None:
        os.close(self.r)
        os.close(self.b._tun_fd)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_protected_packet_arrives_and_counters_count(pair: Pair) -> None:
    inner = udp_packet("10.1.0.1", "10.2.0.1", b"hello")
    assert pair.send(inner) == inner
    c = pair.b.sa_counters(SaId(B, IpsecProto.ESP, 0x1001))
    assert (c.packets, c.bytes, c.use_time) == (1, len(inner), 1000.0)
    # Replay of the same datagram: dropped, counted per reason and per SA.
    pair.b.handle_udp_encap(pair.last, A, B)
    assert pair.b.drops["replay"] == 1
    assert pair.b.sa_counters(SaId(B, IpsecProto.ESP, 0x1001)).replay_dropped == 1


def test_unknown_spi_bad_icv_and_garbage_are_counted_never_raised(pair: Pair) -> None:
    pair.a.handle_outbound(udp_packet("10.1.0.1", "10.2.0.1", b"x"))
    esp = bytearray(pair.wire.pop()[0])
    esp[-1] ^= 1
    pair.b.handle_udp_encap(bytes(esp), A, B)
    pair.b.handle_udp_encap(b"\0\0\x99\x99" + bytes(40), A, B)
    pair.b.handle_udp_encap(b"\1\2\3", A, B)
    pair.b.handle_ipv4(b"\x45\0\0\x05")
    pair.a.handle_outbound(b"\x99garbage")
    assert pair.b.drops["icv"] == 1 and pair.b.drops["bad_spi"] == 1
    assert pair.b.drops["truncated"] == 2
    assert pair.a.drops["unsupported"] == 1


def test_ike_and_keepalives_are_handed_back(pair: Pair) -> None:
    assert pair.b.handle_udp_encap(b"\0\0\0\0ike...", A, B) is False
    assert pair.b.handle_udp_encap(b"\xff", A, B) is False
    assert not pair.b.drops


def test_selector_mismatch_inside_a_valid_sa_is_dropped(pair: Pair) -> None:
    # The sender's policy is wide and its SA has no selector (as one for several prefix
    # pairs); the receiving SA only admits 10.1/24 -> 10.2/24.
    out = pair.a._sas[SaId(B, IpsecProto.ESP, 0x1001)].spec
    pair.a.delete_sa(out.id)
    pair.a.install_sa(dataclasses.replace(out, selector=None))
    pair.a.install_policy(
        PolicySpec(Selector("10.9.0.0/24", "10.2.0.0/24"), Direction.OUT,
                   templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, A, B),))
    )  # fmt: skip
    assert pair.send(udp_packet("10.9.0.1", "10.2.0.1", b"spoof")) is None
    assert pair.b.drops["selector"] == 1


def test_policy_actions_and_acquire(pair: Pair) -> None:
    pair.a.install_policy(
        PolicySpec(Selector("10.1.0.0/24", "10.2.0.5/32"), Direction.OUT, PolicyAction.DROP)
    )
    assert pair.send(udp_packet("10.1.0.1", "10.2.0.5", b"no")) is None
    assert pair.a.drops["policy"] == 1  # the /32 DROP beats the /24 PROTECT
    pair.a.handle_outbound(udp_packet("10.7.0.1", "10.8.0.1", b"?"))
    assert pair.a.drops["no_policy"] == 1
    pair.a.install_policy(
        PolicySpec(Selector("10.1.0.0/24", "10.3.0.0/24"), Direction.OUT,
                   templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID + 1, A, B),))
    )  # fmt: skip
    pair.a.handle_outbound(udp_packet("10.1.0.1", "10.3.0.1", b"?"))
    pair.a.handle_outbound(udp_packet("10.1.0.1", "10.3.0.1", b"?"))
    acquires = [e for e in pair.events if isinstance(e, AcquireEvent)]
    assert len(acquires) == 1 and acquires[0].reqid == REQID + 1  # rate-limited
    assert pair.a.drops["no_sa"] == 2


def test_an_sa_s_selector_bounds_what_a_wider_policy_of_its_reqid_sends_into_it(
    pair: Pair,
) -> None:
    """Issue 14, item 15, as XFRM does: a trap policy for the configured selectors
    shares its reqid with the Child SA the peer narrowed; a packet outside the SA's
    selector is acquired, not sent into the SA (the peer would drop it)."""
    pair.a.install_policy(
        PolicySpec(Selector("10.1.0.0/16", "10.2.0.0/16"), Direction.OUT,
                   templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, A, B),))
    )  # fmt: skip
    inside = udp_packet("10.1.0.1", "10.2.0.1", b"in")
    assert pair.send(inside) == inside
    assert pair.send(udp_packet("10.1.0.1", "10.2.9.1", b"out")) is None
    assert not pair.wire and pair.a.drops["no_sa"] == 1
    (acquire,) = [e for e in pair.events if isinstance(e, AcquireEvent)]
    # As XFRM's: the packet's flow, and the SA's endpoints (the tunnel's).
    assert acquire == AcquireEvent(Selector("10.1.0.1/32", "10.2.9.1/32", 17, 1234, 7), REQID, A, B)
    assert pair.send(inside) == inside  # the cached SA still serves its own selector


def test_packet_and_byte_lifetimes_raise_soft_then_hard_expire() -> None:
    p = Pair(Lifetime(soft_packets=2, hard_packets=3))
    try:
        inner = udp_packet("10.1.0.1", "10.2.0.1", b"life")
        p.send(inner)
        assert p.events == []
        p.send(inner)
        assert [(type(e), e.hard) for e in p.events] == [(ExpireEvent, False)]
        p.send(inner)
        assert [(type(e), e.hard) for e in p.events][-1] == (ExpireEvent, True)
        assert p.send(inner) is None  # the SA is gone: acquire
        assert isinstance(p.events[-1], AcquireEvent)
    finally:
        p.close()


def test_time_lifetimes() -> None:
    p = Pair(Lifetime(soft_seconds=10, hard_seconds=20))
    try:
        p.a.check_lifetimes()
        assert p.events == []
        p.clock.now += 10
        p.a.check_lifetimes()
        p.a.check_lifetimes()
        assert [e.hard for e in p.events] == [False]
        p.clock.now += 10
        p.a.check_lifetimes()
        assert [e.hard for e in p.events] == [False, True]
        assert [s.spi for s in p.a.list_sas()] == [0x2001]
    finally:
        p.close()


def test_sequence_overflow_raises_rekey_event_and_refuses_to_wrap() -> None:
    p = Pair(esn=False)
    try:
        entry = next(e for e in p.a._sas.values() if e.spec.spi == 0x1001)
        entry.crypto.seq = 0xFFFFFFFF - 2
        inner = udp_packet("10.1.0.1", "10.2.0.1", b"s")
        p.a.handle_outbound(inner)
        assert [type(e) for e in p.events] == [SeqOverflowEvent]
        p.a.handle_outbound(inner)
        p.a.handle_outbound(inner)
        assert p.a.drops["seq_overflow"] == 1
        assert len(p.wire) == 2 and entry.crypto.seq == 0xFFFFFFFF
    finally:
        p.close()


def test_errors_are_typed_and_keyless(pair: Pair) -> None:
    key = bytes(range(5))
    with pytest.raises(DataPlaneError, match="aes-gcm-16 needs") as info:
        pair.a.install_sa(sa(A, B, 0x3001, key, "10.1.0.0/24", "10.2.0.0/24"))
    assert key.hex() not in str(info.value)
    with pytest.raises(DataPlaneError, match="exists"):
        pair.a.install_sa(sa(A, B, 0x1001, os.urandom(20), "10.1.0.0/24", "10.2.0.0/24"))
    with pytest.raises(DataPlaneError, match="selector"):
        pair.a.install_policy(
            PolicySpec(Selector("10.1.0.0/33", "x"), Direction.OUT, PolicyAction.PASS)
        )
    for entry in pair.a._sas.values():
        assert entry.spec.enc_key.hex() not in repr(entry)
    pair.a.flush_owned()
    assert pair.a.list_sas() == [] and pair.a.list_policies() == []


def test_update_sa_keeps_counters_and_window_and_refuses_new_keys(pair: Pair) -> None:
    import dataclasses

    inner = udp_packet("10.1.0.1", "10.2.0.1", b"u")
    assert pair.send(inner) == inner
    sa_id = SaId(B, IpsecProto.ESP, 0x1001)
    old = next(s for s in pair.b.list_sas() if s.id == sa_id)
    pair.b.update_sa(dataclasses.replace(old, lifetime=Lifetime(hard_packets=2)))
    assert pair.b.sa_counters(sa_id).packets == 1
    pair.b.handle_udp_encap(pair.last, A, B)  # still a replay after the update
    assert pair.b.drops["replay"] == 1
    assert pair.send(inner) == inner  # second packet hits the new hard limit
    assert sa_id not in {s.id for s in pair.b.list_sas()}
    with pytest.raises(DataPlaneError, match="cannot be updated"):
        pair.a.update_sa(dataclasses.replace(old, enc_key=os.urandom(20)))


def test_esp_for_an_unknown_spi_is_reported_at_a_bounded_rate(pair: Pair) -> None:
    reports: list = []
    pair.b._events = reports.append
    junk = b"\0\0\x99\x99" + bytes(40)
    for _ in range(50):
        pair.b.handle_udp_encap(junk, A, B)
    assert reports == [UnknownSpiEvent(pk.IPPROTO_ESP, 0x9999, A, B)]
    assert pair.b.drops["bad_spi"] == 50  # every packet counted, one report
    pair.clock.now += 11  # the next report for the same SPI after the interval
    pair.b.handle_udp_encap(junk, A, B)
    assert len(reports) == 2


def test_allocate_spi_reserves_until_installed_or_long_unused(monkeypatch) -> None:
    """Issue 14, item 10: an SPI handed out is not handed out again while its
    negotiation runs (before: only installed SAs were checked), nor one in 1-255."""
    clock = Clock()
    plane = UserspacePlane(clock=clock)
    draws = iter([0, 0, 1, 1, 0, 2, 1])
    monkeypatch.setattr(userspace.secrets, "randbelow", lambda _n: next(draws))

    def allocate() -> int:
        return plane.allocate_spi(A, B, IpsecProto.ESP, REQID)

    assert (allocate(), allocate()) == (0x100, 0x101)  # 0x100 drawn twice
    plane.install_sa(sa(A, B, 0x100, bytes(20), "10.1.0.0/24", "10.2.0.0/24"))
    assert allocate() == 0x102  # 0x101 reserved, 0x100 installed
    clock.now += SPI_RESERVATION + 1  # those negotiations failed long ago
    assert allocate() == 0x101


def test_an_authenticated_packet_from_a_new_port_reports_the_mapping_once(pair: Pair) -> None:
    """As the kernel's XFRM_MSG_MAPPING: only a packet whose ICV verified may say the
    peer's NAT mapping moved (a forged one from anywhere says nothing), once per mapping."""
    events: list = []
    pair.b._events = events.append
    inner = udp_packet("10.1.0.1", "10.2.0.1", b"hello")
    pair.a.handle_outbound(inner)
    esp = pair.wire.pop()[0]
    forged = bytearray(esp)
    forged[-1] ^= 1
    pair.b.handle_udp_encap(bytes(forged), A, B, 40001)  # from a new port, but forged
    assert not events
    pair.b.handle_udp_encap(esp, A, B, 4500)  # its SA's own port: nothing moved
    assert not events
    for _unused in range(2):
        pair.a.handle_outbound(inner)
        pair.b.handle_udp_encap(pair.wire.pop()[0], A, B, 40001)
    assert events == [MappingEvent(SaId(B, IpsecProto.ESP, 0x1001), REQID, A, 40001)]


def test_move_sa_keeps_sequence_numbers_window_and_counters(pair: Pair) -> None:
    """The peer's NAT moved it to another address (issue 16): its SAs go with it, and
    neither end starts counting again (a sequence number reused would be a replay)."""
    inner = udp_packet("10.1.0.1", "10.2.0.1", b"m")
    assert pair.send(inner) == inner
    replayed = pair.last
    c = "192.0.2.99"
    moved = pair.a.move_sa(SaId(B, IpsecProto.ESP, 0x1001), A, c, UdpEncap(4500, 40001))
    assert (moved.src, moved.dst, moved.encap, moved.spi) == (A, c, UdpEncap(4500, 40001), 0x1001)
    pair.a.update_policy(
        PolicySpec(Selector("10.1.0.0/24", "10.2.0.0/24"), Direction.OUT,
                   templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, A, c),))
    )  # fmt: skip
    assert pair.a.sa_counters(moved.id).packets == 1  # the counters moved too
    with pytest.raises(DataPlaneError):
        pair.a.sa_counters(SaId(B, IpsecProto.ESP, 0x1001))
    pair.a.handle_outbound(inner)
    esp, dst, port = pair.wire.pop()
    assert (dst, port) == (c, 40001)
    assert int.from_bytes(esp[4:8], "big") == 2  # its sequence number goes on from 1
    # The receiving end's inbound SA moves its source; its replay window stays.
    pair.b.move_sa(SaId(B, IpsecProto.ESP, 0x1001), c, B, UdpEncap(40001, 4500))
    pair.b.handle_udp_encap(replayed, c, B, 40001)
    assert pair.b.drops["replay"] == 1
    pair.b.handle_udp_encap(esp, c, B, 40001)
    assert os.read(pair.r, 65535) == inner
    with pytest.raises(DataPlaneError, match="to move"):
        pair.a.move_sa(SaId(B, IpsecProto.ESP, 0x1001), A, c, None)


def test_an_sa_moved_off_udp_sends_plain_esp_from_and_to_its_new_addresses(pair: Pair) -> None:
    """The outer addresses are packed once per SA (not per packet): a move must repack
    them, or plain ESP would still go to the old address."""
    sent: list[tuple[bytes, tuple]] = []

    class RawSender:
        def sendto(self, data: bytes, addr: tuple) -> None:
            sent.append((data, addr))

    pair.a._senders[socket.AF_INET] = RawSender()
    c = "192.0.2.99"
    pair.a.move_sa(SaId(B, IpsecProto.ESP, 0x1001), A, c, None)
    pair.a.update_policy(
        PolicySpec(Selector("10.1.0.0/24", "10.2.0.0/24"), Direction.OUT,
                   templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, A, c),))
    )  # fmt: skip
    pair.a.handle_outbound(udp_packet("10.1.0.1", "10.2.0.1", b"plain"))
    ((outer, addr),) = sent
    ip = pk.IpPacket(outer)
    assert (ip.proto, ip.src, ip.dst, addr) == (pk.IPPROTO_ESP, pk._addr(A), pk._addr(c), (c, 0))
    assert pair.wire == []


def test_a_tun_batch_s_esp_in_udp_leaves_in_runs_to_one_peer_of_one_length() -> None:
    """What one TUN readiness callback read goes out at its end, in order: each run of
    datagrams to one peer whose lengths UDP GSO takes (equal, the last maybe shorter)
    as one burst, anything else one by one."""
    single: list[tuple] = []
    bursts: list[tuple] = []
    plane = UserspacePlane(
        udp_sender=lambda *x: single.append(x),
        udp_burst_sender=lambda datagrams, dst, port: bursts.append((datagrams, dst)),
    )
    c = "192.0.2.13"
    for peer, site, spi, reqid in (
        (B, "10.2.0.0/24", 0x1001, REQID),
        (c, "10.3.0.0/24", 0x1002, REQID + 1),
    ):
        plane.install_sa(
            dataclasses.replace(sa(A, peer, spi, os.urandom(20), "10.1.0.0/24", site), reqid=reqid)
        )
        plane.install_policy(
            PolicySpec(Selector("10.1.0.0/24", site), Direction.OUT,
                       templates=(Template(IpsecProto.ESP, Mode.TUNNEL, reqid, A, peer),))
        )  # fmt: skip
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    plane._tun_fd = tun.fileno()
    to_b = [udp_packet("10.1.0.1", "10.2.0.1", bytes(n)) for n in (100, 100, 100, 60, 100)]
    for packet in [*to_b, udp_packet("10.1.0.1", "10.3.0.1", bytes(100)), to_b[0]]:
        kernel.send(packet)
    plane._on_tun()
    # Three of one length and a shorter one end a run; the next starts another, of one.
    ((run, dst),) = bursts
    assert dst == B and [int.from_bytes(esp[4:8], "big") for esp in run] == [1, 2, 3, 4]
    assert len(run[0]) == len(run[1]) == len(run[2]) > len(run[3])
    assert [dst for _esp, dst, _port in single] == [B, c, B]
    assert [int.from_bytes(esp[4:8], "big") for esp, dst, _port in single] == [5, 1, 6]
    tun.close()
    kernel.close()
