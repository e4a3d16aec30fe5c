"""The userspace ESP/AH data plane: IPsec over a TUN device, for kernels without ESP.

How the agent uses it::

    plane = UserspacePlane(tun_name="kw-esp0")      # own_udp_port=4500 only in tests
    await plane.start(on_event)                      # opens TUN + raw ESP/AH sockets
    plane.install_sa(SaSpec(...)); plane.install_policy(PolicySpec(...))
    # the agent owns UDP 4500 (shared with IKE); for every datagram it receives there:
    plane.handle_udp_encap(datagram, src_ip, dst_ip)  # returns False if not ESP (IKE)
    plane.sa_counters(sa_id); plane.drops            # per-SA and per-reason counters
    await plane.stop()                               # closes sockets, removes routes

Outbound: PROTECT policies (direction OUT) put a route for their destination prefix into
the TUN device; every packet read from it is matched against the OUT policies (most
specific first): PROTECT seals it with the newest SA of the template's reqid and sends
it through a raw socket (or, for UDP-encapsulated SAs, through `udp_sender` or the
plane's own UDP socket); PASS sends it in the clear; DROP drops it. A PROTECT policy with
no SA raises an AcquireEvent. Inbound: ESP/AH from raw sockets and ESP-in-UDP handed in
are found by (dst, proto, SPI), verified, replay-checked, checked against the SA's
selector and written to the TUN device. Events (ExpireEvent soft/hard from the byte,
packet and time lifetimes, SeqOverflowEvent, AcquireEvent) go to the sink given to
start(). Bad packets never raise: they are counted in `drops` by reason.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import functools
import ipaddress
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..esp import packet as pk
from ..esp import tun
from .base import (
    SPI_RESERVATION,
    AcquireEvent,
    DataPlane,
    DataPlaneError,
    Direction,
    EventSink,
    ExpireEvent,
    IpsecProto,
    MappingEvent,
    Mode,
    PolicyAction,
    PolicyId,
    PolicySpec,
    SaCounters,
    SaId,
    SaSpec,
    Selector,
    SeqOverflowEvent,
    UdpEncap,
    UnknownSpiEvent,
    is_keyway_reqid,
)

BATCH = 64  # packets handled per readiness callback before yielding to the loop
UNKNOWN_SPI_INTERVAL = 10.0  # seconds between reports of one unknown SPI from one sender
UNKNOWN_SPI_MEMORY = 4096  # (sender, SPI) pairs remembered for that
ACQUIRED_KEPT = 4096  # (reqid, peer) pairs whose last acquire is remembered
# Rekey this many sequence numbers before the counter would run out (RFC 4303 3.3.3).
SEQ_OVERFLOW_MARGIN = 1 << 16

UdpSender = Callable[[bytes, str, int], None]  # (esp, peer address, peer port)
# (datagrams of one length but maybe the last, peer address, peer port): sent as one
# UDP GSO super-datagram where the kernel takes it (far less per-packet work).
UdpBurstSender = Callable[[list[bytes], str, int], None]
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS on older kernels
GSO_MAX_BYTES = 65000  # a UDP datagram's payload, with room for the headers


@dataclass
class _Sa:
    spec: SaSpec
    crypto: pk.SaCrypto = field(repr=False)
    add_time: float
    bytes: int = 0
    packets: int = 0
    replay_dropped: int = 0
    integrity_failed: int = 0
    use_time: float = 0.0
    soft_sent: bool = False
    overflow_sent: bool = False
    selector: _CompiledSelector | None = None
    mapping_sent: tuple[bytes, int] | None = None  # the new (source, port) reported
    # The spec's addresses as the per-packet paths need them, set by `addressed`.
    family: int = socket.AF_INET
    src_packed: bytes = b""
    dst_packed: bytes = b""

    def addressed(self) -> _Sa:
        """Derive the per-packet forms of the spec's addresses (after any change of it)."""
        self.family = _fam_str(self.spec.dst)
        self.src_packed = _packed(self.spec.src)
        self.dst_packed = _packed(self.spec.dst)
        self.crypto.set_outer(self.spec.src, self.spec.dst)
        return self


def _net(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(prefix, strict=False)


def _routed(policy: PolicySpec) -> bool:
    """OUT PROTECT policies route their destination into the TUN device."""
    return policy.direction == Direction.OUT and policy.action == PolicyAction.PROTECT


def _dst_prefix(policy: PolicySpec) -> str:
    return str(_net(policy.selector.dst))


def _policy_rank(entry: tuple[PolicySpec, _CompiledSelector]) -> tuple[int, int]:
    # Explicit priority (lower first, as XFRM), then the most specific selector.
    return (entry[0].priority or 0x10000, -entry[1].specificity())


class _CompiledSelector:
    """A selector as integers, so matching a packet costs a few masks and compares."""

    __slots__ = ("dmask", "dnet", "dport", "proto", "smask", "snet", "specific", "sport", "version")

    def __init__(self, sel: Selector) -> None:
        src, dst = _net(sel.src), _net(sel.dst)
        if src.version != dst.version:
            raise ValueError(f"{sel.src} and {sel.dst} are of different IP versions")
        self.version = src.version
        self.snet, self.smask = int(src.network_address), int(src.netmask)
        self.dnet, self.dmask = int(dst.network_address), int(dst.netmask)
        self.proto, self.sport, self.dport = sel.proto, sel.sport, sel.dport
        self.specific = src.prefixlen + dst.prefixlen + (8 if sel.proto else 0)

    def matches(self, ip: pk.IpPacket) -> bool:
        if self.version != ip.version:
            return False
        if int.from_bytes(ip.src) & self.smask != self.snet:
            return False
        if int.from_bytes(ip.dst) & self.dmask != self.dnet:
            return False
        if self.proto and self.proto != ip.proto:
            return False
        return not (self.sport and self.sport != ip.sport) and not (
            self.dport and self.dport != ip.dport
        )

    def specificity(self) -> int:
        return self.specific


class UserspacePlane(DataPlane):
    name = "userspace"

    def __init__(
        self,
        tun_name: str = "kw-esp0",
        own_udp_port: int | None = None,
        udp_sender: UdpSender | None = None,
        clock: Callable[[], float] = time.time,
        udp_burst_sender: UdpBurstSender | None = None,
    ) -> None:
        self.tun_name = tun_name
        self.own_udp_port = own_udp_port
        self.udp_sender = udp_sender
        self.udp_burst_sender = udp_burst_sender
        # While a TUN batch is read: the ESP-in-UDP datagrams it made, sent at its end
        # in runs to one peer (udp_burst_sender); None outside a batch.
        self._burst: list[tuple[str, int, bytes]] | None = None
        self.clock = clock
        self.drops: collections.Counter[str] = collections.Counter()
        self._sas: dict[SaId, _Sa] = {}
        self._reserved: dict[SaId, float] = {}  # allocate_spi's SPIs, with when (clock)
        self._inbound: dict[tuple[bytes, int, int], _Sa] = {}
        self._policies: dict[PolicyId, tuple[PolicySpec, _CompiledSelector]] = {}
        self._out_order: list[tuple[PolicySpec, _CompiledSelector]] = []
        self._in_order: list[tuple[PolicySpec, _CompiledSelector]] = []
        self._routes: set[str] = set()
        self._route_users: collections.Counter[str] = collections.Counter()
        self._events: EventSink = lambda event: None
        self._unknown_spi: dict[tuple[bytes, int, int], float] = {}  # last report times
        self._acquired: dict[tuple[int, str], float] = {}
        # (reqid, proto, template dst) -> outbound SA; cleared whenever SAs change.
        self._out_cache: dict[tuple[int, IpsecProto, str], _Sa] = {}
        self._encap_by_spi: dict[int, _Sa] = {}  # for ESP-in-UDP handed in without dst
        self._tun_fd = -1
        self._tun_dev = ""
        self._socks: list[socket.socket] = []
        self._senders: dict[int, socket.socket] = {}
        self._udp: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, events: EventSink) -> None:
        self._events = events
        loop = self._loop = asyncio.get_running_loop()
        try:
            self._tun_fd, self._tun_dev = tun.open_tun(self.tun_name)
        except tun.TunError as exc:
            raise DataPlaneError(str(exc)) from None
        for family in (socket.AF_INET, socket.AF_INET6):
            self._senders[family] = tun.raw_sender(family)
            for proto in (pk.IPPROTO_ESP, pk.IPPROTO_AH):
                sock = tun.raw_receiver(family, proto)
                self._socks.append(sock)
                loop.add_reader(sock.fileno(), self._on_raw, sock, family)
        if self.own_udp_port is not None:
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._udp.bind(("0.0.0.0", self.own_udp_port))
            self._udp.setblocking(False)
            tun.mark(self._udp)
            loop.add_reader(self._udp.fileno(), self._on_udp)
        loop.add_reader(self._tun_fd, self._on_tun)
        try:
            tun.add_rules()
        except tun.TunError as exc:
            await self.stop()
            raise DataPlaneError(str(exc)) from None
        for policy, _unused in self._out_order:
            self._route_for(policy)
        self._tick()

    async def stop(self) -> None:
        loop = self._loop
        if self._timer:
            self._timer.cancel()
        for sock in [*self._socks, *([self._udp] if self._udp else [])]:
            if loop:
                loop.remove_reader(sock.fileno())
            sock.close()
        for sock in self._senders.values():
            sock.close()
        self._socks.clear()
        self._senders.clear()
        self._udp = None
        for prefix in sorted(self._routes):
            tun.del_route(prefix, self._tun_dev)
        self._routes.clear()
        if self._tun_fd >= 0:
            tun.del_rules()
        if self._tun_fd >= 0:
            if loop:
                loop.remove_reader(self._tun_fd)
            os.close(self._tun_fd)  # the device disappears with its last fd
            self._tun_fd = -1

    def prepare_ike_socket(self, sock: socket.socket) -> None:
        tun.mark(sock)  # marked packets skip the plane's routing table (tun.add_rules)

    # -- SAs ---------------------------------------------------------------------------

    def allocate_spi(self, src: str, dst: str, proto: IpsecProto, reqid: int) -> int:
        now = self.clock()
        for stale in [k for k, t in self._reserved.items() if t < now - SPI_RESERVATION]:
            del self._reserved[stale]
        while True:
            spi = secrets.randbelow(0xFFFFFFFF - 0x100) + 0x100  # 1..255 are reserved
            sa_id = SaId(dst, proto, spi)
            if sa_id not in self._sas and sa_id not in self._reserved:
                self._reserved[sa_id] = now
                return spi

    def install_sa(self, sa: SaSpec) -> None:
        self._reserved.pop(sa.id, None)
        if sa.id in self._sas:
            raise DataPlaneError(f"SA {sa.dst}/{sa.proto}/0x{sa.spi:08x} exists")
        try:
            crypto = pk.SaCrypto(
                spi=sa.spi,
                ah=sa.proto == IpsecProto.AH,
                tunnel=sa.mode == Mode.TUNNEL,
                enc_alg=sa.enc_alg,
                enc_key=sa.enc_key,
                integ_alg=sa.integ_alg,
                integ_key=sa.integ_key,
                esn=sa.esn,
                replay_window=max(sa.replay_window, 32),
                icv_bits=sa.icv_bits,  # the outer addresses: _Sa.addressed, once
            )
        except pk.SaConfigError as exc:
            raise DataPlaneError(f"SA 0x{sa.spi:08x}: {exc}") from None
        try:
            selector = _CompiledSelector(sa.selector) if sa.selector else None
        except ValueError as exc:
            raise DataPlaneError(f"SA 0x{sa.spi:08x} selector: {exc}") from None
        entry = _Sa(sa, crypto, add_time=self.clock(), selector=selector).addressed()
        self._sas[sa.id] = entry
        self._out_cache.clear()
        if sa.encap is not None:
            self._encap_by_spi[sa.spi] = entry
        proto = pk.IPPROTO_AH if sa.proto == IpsecProto.AH else pk.IPPROTO_ESP
        self._inbound[(ipaddress.ip_address(sa.dst).packed, proto, sa.spi)] = entry

    def update_sa(self, sa: SaSpec) -> None:
        entry = self._sas.get(sa.id)
        if entry is None:
            raise DataPlaneError(f"no SA 0x{sa.spi:08x} to update")
        if (sa.enc_key, sa.integ_key, sa.enc_alg, sa.integ_alg) != (
            entry.spec.enc_key,
            entry.spec.integ_key,
            entry.spec.enc_alg,
            entry.spec.integ_alg,
        ):
            raise DataPlaneError(f"SA 0x{sa.spi:08x}: keys and algorithms cannot be updated")
        entry.spec = sa  # lifetimes and encapsulation; counters and the window stay
        entry.addressed()
        self._out_cache.clear()
        if sa.encap is not None:
            self._encap_by_spi[sa.spi] = entry
        elif self._encap_by_spi.get(sa.spi) is entry:
            del self._encap_by_spi[sa.spi]

    def move_sa(self, sa: SaId, src: str, dst: str, encap: UdpEncap | None) -> SaSpec:
        entry = self._sas.get(sa)
        if entry is None:
            raise DataPlaneError(f"no SA {sa.dst}/{sa.proto}/0x{sa.spi:08x} to move")
        moved = dataclasses.replace(entry.spec, src=src, dst=dst, encap=encap)
        if moved.id != sa and moved.id in self._sas:
            raise DataPlaneError(f"SA {dst}/{sa.proto}/0x{sa.spi:08x} exists")
        # The same entry under its new id: sequence numbers, the replay window and the
        # counters go with it.
        del self._sas[sa]
        proto = pk.IPPROTO_AH if sa.proto == IpsecProto.AH else pk.IPPROTO_ESP
        self._inbound.pop((ipaddress.ip_address(sa.dst).packed, proto, sa.spi), None)
        entry.spec = moved
        entry.addressed()
        entry.mapping_sent = None
        self._sas[moved.id] = entry
        self._inbound[(ipaddress.ip_address(dst).packed, proto, sa.spi)] = entry
        self._out_cache.clear()
        if encap is not None:
            self._encap_by_spi[sa.spi] = entry
        elif self._encap_by_spi.get(sa.spi) is entry:
            del self._encap_by_spi[sa.spi]
        return moved

    def delete_sa(self, sa: SaId) -> None:
        entry = self._sas.pop(sa, None)
        if entry is None:
            raise DataPlaneError(f"no SA {sa.dst}/{sa.proto}/0x{sa.spi:08x}")
        self._out_cache.clear()
        if self._encap_by_spi.get(sa.spi) is entry:
            del self._encap_by_spi[sa.spi]
        proto = pk.IPPROTO_AH if sa.proto == IpsecProto.AH else pk.IPPROTO_ESP
        self._inbound.pop((ipaddress.ip_address(sa.dst).packed, proto, sa.spi), None)

    def list_sas(self) -> list[SaSpec]:
        return [e.spec for e in self._sas.values() if is_keyway_reqid(e.spec.reqid)]

    def sa_counters(self, sa: SaId) -> SaCounters:
        e = self._sas.get(sa)
        if e is None:
            raise DataPlaneError(f"no SA {sa.dst}/{sa.proto}/0x{sa.spi:08x}")
        return SaCounters(
            e.bytes, e.packets, e.replay_dropped, e.integrity_failed, e.add_time, e.use_time
        )

    # -- policies ----------------------------------------------------------------------

    def install_policy(self, policy: PolicySpec) -> None:
        try:
            compiled = _CompiledSelector(policy.selector)
        except ValueError as exc:
            raise DataPlaneError(f"policy selector: {exc}") from None
        if policy.action == PolicyAction.PROTECT and not policy.templates:
            raise DataPlaneError("a PROTECT policy needs a template")
        if _routed(policy):
            # Counted before a policy it replaces lets go of the route: the route into
            # the TUN device never vanishes meanwhile (a packet would leave in the clear).
            self._route_users[_dst_prefix(policy)] += 1
            if self._tun_fd >= 0:
                self._route_for(policy)
        if policy.id in self._policies:
            self._unlist(policy.id)
        entry = (policy, compiled)
        self._policies[policy.id] = entry
        order = self._order_of(policy.direction)
        if order is not None:
            # Kept sorted on insertion (not re-sorted): thousands of policies are usual.
            bisect.insort(order, entry, key=_policy_rank)

    def update_policy(self, policy: PolicySpec) -> None:
        if policy.id not in self._policies:
            raise DataPlaneError(f"no policy {policy.selector} {policy.direction} to update")
        self.install_policy(policy)  # in place, between two packets, its route held

    def remove_policy(self, policy: PolicyId) -> None:
        if policy not in self._policies:
            raise DataPlaneError(f"no policy {policy.selector} {policy.direction}")
        self._unlist(policy)

    def _unlist(self, policy_id: PolicyId) -> None:
        entry = self._policies.pop(policy_id)
        order = self._order_of(policy_id.direction)
        if order is not None:
            # Find it by rank, then identity: no scan of every policy's fields.
            i = bisect.bisect_left(order, _policy_rank(entry), key=_policy_rank)
            while order[i] is not entry:
                i += 1
            del order[i]
        if _routed(entry[0]):
            prefix = _dst_prefix(entry[0])
            self._route_users[prefix] -= 1
            if self._route_users[prefix] <= 0:
                del self._route_users[prefix]
                if prefix in self._routes:
                    tun.del_route(prefix, self._tun_dev)
                    self._routes.discard(prefix)

    def _order_of(self, direction: Direction) -> list | None:
        return {Direction.OUT: self._out_order, Direction.IN: self._in_order}.get(direction)

    def list_policies(self) -> list[PolicySpec]:
        return [p for p, _unused in self._policies.values()]

    def flush_owned(self) -> None:
        for sa_id in [i for i, e in self._sas.items() if is_keyway_reqid(e.spec.reqid)]:
            self.delete_sa(sa_id)
        for pid in list(self._policies):
            self.remove_policy(pid)

    def _route_for(self, policy: PolicySpec) -> None:
        if not _routed(policy):
            return
        prefix = _dst_prefix(policy)
        if prefix not in self._routes:
            try:
                tun.add_route(prefix, self._tun_dev)
            except tun.TunError as exc:
                raise DataPlaneError(str(exc)) from None
            self._routes.add(prefix)

    # -- outbound ----------------------------------------------------------------------

    def _on_tun(self) -> None:
        if self.udp_burst_sender is not None:
            self._burst = []
        try:
            for _unused in range(BATCH):
                try:
                    data = os.read(self._tun_fd, 65535)
                except BlockingIOError:
                    return
                except OSError:
                    self.drops["tun_read"] += 1
                    return
                self.handle_outbound(data)
        finally:
            burst, self._burst = self._burst, None
            if burst:
                self._send_burst(burst)

    def _send_burst(self, burst: list[tuple[str, int, bytes]]) -> None:
        """The batch's ESP-in-UDP datagrams in order, each run to one peer of one length
        (the last may be shorter, as UDP GSO allows) as one burst."""
        i = 0
        while i < len(burst):
            dst, port, first = burst[i]
            run, size, total = [first], len(first), len(first)
            i += 1
            while i < len(burst) and len(run) < GSO_MAX_SEGMENTS and len(run[-1]) == size:
                next_dst, next_port, esp = burst[i]
                if (next_dst, next_port) != (dst, port) or len(esp) > size:
                    break
                if total + len(esp) > GSO_MAX_BYTES:
                    break
                run.append(esp)
                total += len(esp)
                i += 1
            if len(run) == 1:
                self.udp_sender(first, dst, port)
            else:
                self.udp_burst_sender(run, dst, port)

    def handle_outbound(self, data: bytes) -> None:
        """One packet the kernel routed into the TUN device: protect, pass or drop."""
        try:
            ip = pk.IpPacket(data)
        except pk.Drop as drop:
            self.drops[drop.reason] += 1
            return
        for policy, sel in self._out_order:
            if not sel.matches(ip):
                continue
            if policy.action == PolicyAction.DROP:
                self.drops[pk.POLICY] += 1
            elif policy.action == PolicyAction.PASS:
                self._send_raw(data, socket.inet_ntop(_fam(ip.dst), ip.dst), _fam(ip.dst))
            else:
                self._protect_out(policy, ip, data)
            return
        self.drops["no_policy"] += 1

    def _protect_out(self, policy: PolicySpec, ip: pk.IpPacket, data: bytes) -> None:
        tmpl = policy.templates[0]
        # Transport mode templates carry no address: the SA goes to the packet's destination.
        sa_dst = tmpl.dst or socket.inet_ntop(_fam(ip.dst), ip.dst)
        entry = self._outbound_sa(tmpl.reqid, tmpl.proto, sa_dst)
        if entry is not None and entry.selector is not None and not entry.selector.matches(ip):
            # As XFRM's state lookup: an SA's selector bounds what it carries. A trap
            # policy for the configured selectors shares the reqid of a Child SA the
            # peer narrowed; traffic outside the narrowed ones must not go into it (the
            # peer drops it): it is acquired, as if no SA were there.
            entry = self._outbound_sa_for(tmpl.reqid, tmpl.proto, sa_dst, ip)
        if entry is None:
            self.drops["no_sa"] += 1
            now = self.clock()
            # Rate-limited like XFRM's larval states: per policy template and peer (one
            # opportunistic policy serves every peer in its prefix).
            if now - self._acquired.get((tmpl.reqid, sa_dst), -1e9) > 1.0:
                if len(self._acquired) > ACQUIRED_KEPT:
                    self._acquired.clear()
                self._acquired[(tmpl.reqid, sa_dst)] = now
                # As XFRM's acquire: the packet's flow, and the SA's endpoints.
                src = socket.inet_ntop(_fam(ip.src), ip.src)
                dst = socket.inet_ntop(_fam(ip.dst), ip.dst)
                bits = 32 if ip.version == 4 else 128
                flow = Selector(f"{src}/{bits}", f"{dst}/{bits}", ip.proto, ip.sport, ip.dport)
                self._events(AcquireEvent(flow, tmpl.reqid, tmpl.src or src, sa_dst))
            return
        spec, crypto = entry.spec, entry.crypto
        try:
            seq = crypto.next_seq()
        except pk.Drop:
            self.drops[pk.SEQ_OVERFLOW] += 1
            self._overflow(entry)
            return
        if seq >= crypto.seq_limit - SEQ_OVERFLOW_MARGIN:
            self._overflow(entry)
        encap = spec.encap
        # ESP-in-UDP through a UDP socket: the ESP alone is sealed, no outer headers.
        udp_send = None
        if encap is not None and not crypto.is_ah:
            if self.udp_sender is not None:
                udp_send = self.udp_sender
            elif self._udp is not None and entry.family == socket.AF_INET:
                udp_send = self._send_udp
        try:
            if udp_send is not None:
                out = pk.seal_esp(crypto, ip, seq)
            else:
                ports = (encap.sport, encap.dport) if encap else None
                out = pk.protect(crypto, ip, ports, seq=seq)
        except pk.Drop as drop:
            self.drops[drop.reason] += 1
            return
        self._account(entry, len(data))
        if udp_send is not None:
            if self._burst is not None and udp_send is self.udp_sender:
                self._burst.append((spec.dst, encap.dport, out))
            else:
                udp_send(out, spec.dst, encap.dport)
        else:
            self._send_raw(out, spec.dst, entry.family)

    def _send_udp(self, esp: bytes, dst: str, port: int) -> None:
        try:
            self._udp.sendto(esp, (dst, port))
        except OSError:
            self.drops["send"] += 1

    def _outbound_sa(self, reqid: int, proto: IpsecProto, dst: str) -> _Sa | None:
        key = (reqid, proto, dst)
        cached = self._out_cache.get(key)
        if cached is not None:
            return cached
        best = None
        for entry in self._sas.values():
            s = entry.spec
            wanted = s.reqid == reqid and s.proto == proto and s.dst == dst
            # The newest SA wins (make-before-break rekeying).
            if wanted and (best is None or entry.add_time >= best.add_time):
                best = entry
        if best is not None:
            self._out_cache[key] = best
        return best

    def _outbound_sa_for(
        self, reqid: int, proto: IpsecProto, dst: str, ip: pk.IpPacket
    ) -> _Sa | None:
        """The newest outbound SA for the template whose selector takes this packet (the
        slow path, for a packet the cached SA's selector refuses)."""
        best = None
        for entry in self._sas.values():
            s = entry.spec
            if s.reqid != reqid or s.proto != proto or s.dst != dst:
                continue
            if entry.selector is not None and not entry.selector.matches(ip):
                continue
            if best is None or entry.add_time >= best.add_time:
                best = entry
        return best

    def _send_raw(self, data: bytes, dst: str, family: int) -> None:
        sock = self._senders.get(family)
        try:
            if sock is None:
                raise OSError("plane not started")
            sock.sendto(data, (dst, 0))
        except OSError:
            self.drops["send"] += 1

    # -- inbound -----------------------------------------------------------------------

    def _on_raw(self, sock: socket.socket, family: int) -> None:
        for _unused in range(BATCH):
            try:
                if family == socket.AF_INET:
                    data = sock.recv(65535)
                    self.handle_ipv4(data)
                else:
                    data, anc, _unused, addr = sock.recvmsg(65535, 64)
                    dst = next((a[2][:16] for a in anc if a[1] == socket.IPV6_PKTINFO), None)
                    if dst is None:
                        self.drops[pk.TRUNCATED] += 1
                        continue
                    self.handle_ipsec(
                        sock.proto, data, socket.inet_pton(family, addr[0]), dst, None
                    )
            except BlockingIOError:
                return
            except OSError:
                self.drops["recv"] += 1
                return

    def _on_udp(self) -> None:
        for _unused in range(BATCH):
            try:
                data, (src, port) = self._udp.recvfrom(65535)
            except (BlockingIOError, AttributeError):
                return
            except OSError:
                self.drops["recv"] += 1
                return
            # Bound to 0.0.0.0: the SA is found by its SPI among UDP-encapsulated ones.
            self.handle_udp_encap(data, src, None, port)

    def handle_ipv4(self, data: bytes) -> None:
        """A whole IPv4 packet carrying ESP or AH (as a raw IPv4 socket delivers it)."""
        try:
            ip = pk.IpPacket(data)
        except pk.Drop as drop:
            self.drops[drop.reason] += 1
            return
        header = bytes(ip.data[: ip.header_len])
        self.handle_ipsec(ip.proto, ip.payload, ip.src, ip.dst, header)

    def handle_udp_encap(
        self, datagram: bytes, src: str, dst: str | None, sport: int | None = None
    ) -> bool:
        """A UDP 4500 payload (no UDP header) from `src` (port `sport`) to local `dst`.
        Returns False if it is not ESP (IKE with the non-ESP marker, or a NAT keepalive):
        the caller keeps it. `dst` None: find the SA by SPI alone among UDP-encapsulated
        SAs. With `sport`, an authenticated packet from another source than its SA's
        encapsulation says is reported (MappingEvent), as the kernel does."""
        kind = pk.classify_udp_4500(datagram)
        if kind in ("ike", "keepalive"):
            return False
        if kind != "esp":
            self.drops[pk.TRUNCATED] += 1
            return True
        try:
            src_b = socket.inet_pton(_fam_str(src), src)
            if dst is None:
                entry = self._encap_by_spi.get(struct.unpack_from("!I", datagram, 0)[0])
                dst_b = entry.dst_packed if entry else src_b
            else:
                dst_b = socket.inet_pton(_fam_str(dst), dst)
        except OSError:
            self.drops["bad_address"] += 1
            return True
        self.handle_ipsec(pk.IPPROTO_ESP, datagram, src_b, dst_b, None, sport)
        return True

    def handle_ipsec(
        self,
        proto: int,
        data: bytes | memoryview,
        src: bytes,
        dst: bytes,
        header: bytes | None,
        sport: int | None = None,
    ) -> None:
        """ESP or AH (from its header on) addressed to `dst`: verify, decrypt, deliver."""
        if len(data) < 8:
            self.drops[pk.TRUNCATED] += 1
            return
        spi = struct.unpack_from("!I", data, 4 if proto == pk.IPPROTO_AH else 0)[0]
        entry = self._inbound.get((dst, proto, spi))
        if entry is None:
            self.drops[pk.BAD_SPI] += 1
            self._report_unknown_spi(proto, spi, src, dst)
            return
        try:
            if proto == pk.IPPROTO_AH:
                ip, _unused = pk.open_ah(entry.crypto, header, data, src, dst)
            else:
                ip, _unused = pk.open_esp(entry.crypto, data, src, dst)
        except pk.Drop as drop:
            self.drops[drop.reason] += 1
            if drop.reason == pk.REPLAY:
                entry.replay_dropped += 1
            elif drop.reason == pk.ICV:
                entry.integrity_failed += 1
            return
        if entry.selector is not None:
            if not entry.selector.matches(ip):
                self.drops[pk.SELECTOR] += 1  # RFC 4301 5.2: inner header must match the SA
                return
        elif not self._inbound_allowed(entry.spec.reqid, ip):
            # An SA without a selector carries several prefix pairs: as the kernel does,
            # the inner packet must match an IN policy whose template is this SA's reqid.
            self.drops[pk.SELECTOR] += 1
            return
        self._account(entry, len(ip.data))
        if sport is not None:
            self._check_mapping(entry, src, sport)
        try:
            os.write(self._tun_fd, ip.data)
        except OSError:
            self.drops["tun_write"] += 1

    def _check_mapping(self, entry: _Sa, src: bytes, sport: int) -> None:
        """Once per new mapping: the packet was authenticated, so its source is the
        peer's (until the daemon moves the SA's encapsulation there)."""
        encap, spec = entry.spec.encap, entry.spec
        if encap is None or (sport == encap.sport and src == entry.src_packed):
            return
        if entry.mapping_sent == (src, sport):
            return
        entry.mapping_sent = (src, sport)
        address = socket.inet_ntop(socket.AF_INET6 if len(src) == 16 else socket.AF_INET, src)
        self._events(MappingEvent(spec.id, spec.reqid, address, sport))

    def _report_unknown_spi(self, proto: int, spi: int, src: bytes, dst: bytes) -> None:
        """At most one report per sender and SPI every UNKNOWN_SPI_INTERVAL seconds, and
        a bounded memory of them: a flood of junk SPIs costs a counter, not state."""
        now = self.clock()
        key = (src, proto, spi)
        if now - self._unknown_spi.get(key, -UNKNOWN_SPI_INTERVAL) < UNKNOWN_SPI_INTERVAL:
            return
        if len(self._unknown_spi) >= UNKNOWN_SPI_MEMORY:
            self._unknown_spi.clear()
        self._unknown_spi[key] = now
        family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
        self._events(
            UnknownSpiEvent(
                proto, spi, socket.inet_ntop(family, src), socket.inet_ntop(family, dst)
            )
        )

    def _inbound_allowed(self, reqid: int, ip: pk.IpPacket) -> bool:
        for policy, compiled in self._in_order:
            if compiled.matches(ip):
                if policy.action == PolicyAction.PROTECT:
                    return any(t.reqid == reqid for t in policy.templates)
                return False  # the most specific IN policy is PASS/DROP, not this SA
        return False

    # -- lifetimes and events ------------------------------------------------------------

    def _account(self, entry: _Sa, size: int) -> None:
        entry.bytes += size
        entry.packets += 1
        if not entry.use_time:
            entry.use_time = self.clock()
        lt = entry.spec.lifetime
        if (lt.hard_bytes and entry.bytes >= lt.hard_bytes) or (
            lt.hard_packets and entry.packets >= lt.hard_packets
        ):
            self._expire(entry, hard=True)
        elif not entry.soft_sent and (
            (lt.soft_bytes and entry.bytes >= lt.soft_bytes)
            or (lt.soft_packets and entry.packets >= lt.soft_packets)
        ):
            self._expire(entry, hard=False)

    def _expire(self, entry: _Sa, hard: bool) -> None:
        sa_id = entry.spec.id
        if hard:
            if sa_id in self._sas:
                self.delete_sa(sa_id)
                self._events(ExpireEvent(sa_id, True, entry.spec.reqid))
        else:
            entry.soft_sent = True
            self._events(ExpireEvent(sa_id, False, entry.spec.reqid))

    def _overflow(self, entry: _Sa) -> None:
        if not entry.overflow_sent:
            entry.overflow_sent = True
            self._events(SeqOverflowEvent(entry.spec.id, entry.spec.reqid))

    def check_lifetimes(self) -> None:
        """Time-based soft and hard expiry (called every second by the plane's timer)."""
        now = self.clock()
        for entry in list(self._sas.values()):
            lt, age = entry.spec.lifetime, now - entry.add_time
            if lt.hard_seconds and age >= lt.hard_seconds:
                self._expire(entry, hard=True)
            elif lt.soft_seconds and age >= lt.soft_seconds and not entry.soft_sent:
                self._expire(entry, hard=False)

    def _tick(self) -> None:
        self.check_lifetimes()
        if self._loop is not None:
            self._timer = self._loop.call_later(1.0, self._tick)


def _fam(addr: bytes) -> int:
    return socket.AF_INET if len(addr) == 4 else socket.AF_INET6


def _fam_str(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


@functools.lru_cache(maxsize=4096)
def _packed(addr: str) -> bytes:
    """An address as the packets carry it (cached: checked per ESP-in-UDP packet)."""
    return socket.inet_pton(_fam_str(addr), addr)
