"""The asyncio shell around the sans-IO engine: UDP 500 and 4500, and the engine's timer.

    runner = UdpRunner(engine, "192.0.2.11", on_event=print)
    await runner.start(); ...; await runner.stop()

IKE on the NAT-T port carries a 4-byte zero non-ESP marker (RFC 3948); anything else
arriving there is ESP in UDP and goes to `esp_handler` (the userspace data plane), or
is dropped when there is none. keywayd grows from this (the agent issue).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable

from ..ike.constants import IKE_PORT, NAT_KEEPALIVE, NAT_T_PORT, NON_ESP_MARKER
from ..ike.engine.core import Engine, untrusted
from ..ike.engine.events import Event

log = logging.getLogger("keyway.agent")
SOCKET_BUFFER = 4 << 20
# Reads from the NAT-T socket per readiness callback (asyncio's datagram transport
# reads one per loop iteration, which cost ESP in UDP more than its crypto).
NAT_T_BATCH = 64
UDP_SEGMENT = 103  # linux/udp.h: the cmsg giving a UDP GSO send's segment size
UDP_GRO = 104  # linux/udp.h: receive datagrams of one flow coalesced, with their size
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)  # the segment size, an int
NAT_T_QUEUE = 1024  # datagrams held while the NAT-T socket's buffer is full
# UDP GSO refusals in a row after which a runner stops trying: a kernel without it. One
# refusal alone may be a burst's own (segments above the path MTU: EINVAL too).
GSO_GIVE_UP = 3


def _udp_error(exc: OSError) -> None:
    untrusted.info("UDP error: %s", exc)  # e.g. ICMP port unreachable: retransmits cope


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        _udp_error(exc)


class _NatTSocket:
    """The NAT-T socket without asyncio's datagram transport, which reads one datagram
    per loop iteration with recvfrom: read in batches with recvmsg, so that with UDP GRO
    (`gro`: the kernel hands over many ESP-in-UDP datagrams of one flow at once, as
    one buffer) each is split off by the segment size the kernel gives. Sent with
    sendto; while the socket's buffer is full, held (up to NAT_T_QUEUE) until it drains."""

    def __init__(self, sock: socket.socket, on_datagram: Callable[[bytes, tuple], None], gro: bool):
        self.sock, self.on_datagram = sock, on_datagram
        self.gro = False
        if gro:
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass  # a kernel without UDP GRO: one datagram per read
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[tuple[bytes, tuple]] = collections.deque()
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _unused in range(NAT_T_BATCH):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(65535, GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
                return
            size = next(
                (int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
                 if level == socket.SOL_UDP and kind == UDP_GRO),
                0,
            )  # fmt: skip
            if size and len(data) > size:
                for offset in range(0, len(data), size):
                    self.on_datagram(data[offset : offset + size], addr)
            else:
                self.on_datagram(data, addr)

    def sendto(self, data: bytes, addr: tuple) -> None:
        if self.closed:
            return  # the runner stopped: as a closed asyncio transport, nothing goes out
        if not self._queue:
            try:
                self.sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self.sock.fileno(), self._writable)
            except OSError as exc:
                self.error_received(exc)
                return
        if len(self._queue) < NAT_T_QUEUE:
            self._queue.append((data, addr))

    def _writable(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.error_received(exc)
            self._queue.popleft()
        self._loop.remove_writer(self.sock.fileno())

    def error_received(self, exc: OSError) -> None:
        _udp_error(exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._loop.remove_writer(self.sock.fileno())
        self.sock.close()


class UdpRunner:
    def __init__(
        self,
        engine: Engine,
        host: str,
        *,
        ike_port: int = IKE_PORT,
        nat_t_port: int = NAT_T_PORT,
        on_event: Callable[[Event], None] | None = None,
        esp_handler: Callable[[bytes, tuple], None] | None = None,
        prepare_socket: Callable[[socket.socket], None] | None = None,
        prepare_nat_t_socket: Callable[[socket.socket], None] | None = None,
        udp_gro: bool = False,
    ):
        self.engine, self.host = engine, host
        self.ike_port, self.nat_t_port = ike_port, nat_t_port
        self.on_event = on_event or (lambda event: None)
        self.esp_handler = esp_handler
        self.prepare_socket = prepare_socket
        self.prepare_nat_t_socket = prepare_nat_t_socket or prepare_socket
        self._ike: _Endpoint | None = None
        self.udp_gro = udp_gro  # ESP in UDP is read here (userspace plane): coalesce it
        self._nat_t: _NatTSocket | None = None
        self._gso_refusals = 0  # UDP GSO sends refused in a row (GSO_GIVE_UP: none since)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _unused, self._ike = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self._on_ike), sock=self._socket(self.ike_port, self.prepare_socket)
        )
        nat_t = self._socket(self.nat_t_port, self.prepare_nat_t_socket)
        self._nat_t = _NatTSocket(nat_t, self._on_nat_t, gro=self.udp_gro)

    def _socket(self, port: int, prepare: Callable[[socket.socket], None] | None):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # Room for bursts: an agent with thousands of tunnels gets many at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            if prepare is not None:
                prepare(sock)  # before bind: no packet escapes unprepared
            sock.bind((self.host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._ike and self._ike.transport:
            self._ike.transport.close()
        if self._nat_t:
            self._nat_t.close()

    def now(self) -> float:
        return self._loop.time()

    def initiate(self, name: str, remote: tuple[str, int] | None = None) -> None:
        self.engine.initiate(name, self.now(), remote=remote)
        self.pump()

    def send_nat_t(self, data: bytes, dst: tuple) -> None:
        """Send a datagram from the NAT-T port as it is (ESP in UDP for the data plane)."""
        self._nat_t.sendto(data, dst)

    def send_nat_t_burst(self, datagrams: list[bytes], dst: tuple) -> bool:
        """Datagrams of one length (the last may be shorter) to one peer from the NAT-T
        port: one UDP GSO send (the kernel cuts it into the datagrams: one route lookup
        and one trip through the stack instead of one each), else one by one. True if
        it was one GSO send."""
        if self._gso_refusals < GSO_GIVE_UP and not self._nat_t.closed:
            size = struct.pack("=H", len(datagrams[0]))
            try:
                self._nat_t.sock.sendmsg(
                    [b"".join(datagrams)], [(socket.SOL_UDP, UDP_SEGMENT, size)], 0, dst
                )
                self._gso_refusals = 0
                return True
            except BlockingIOError:
                pass  # queued one by one below
            except OSError as exc:
                if exc.errno not in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self._nat_t.error_received(exc)
                    return False
                self._gso_refusals += 1
                if self._gso_refusals == GSO_GIVE_UP:
                    log.info("UDP GSO refused (%s): ESP in UDP goes one datagram at a time", exc)
        for data in datagrams:
            self._nat_t.sendto(data, dst)
        return False

    def _on_ike(self, data: bytes, addr: tuple) -> None:
        self.engine.receive(data, (addr[0], addr[1]), self.now())
        self.pump()

    def _on_nat_t(self, data: bytes, addr: tuple) -> None:
        if data[:4] == NON_ESP_MARKER:
            self.engine.receive(data[4:], (addr[0], addr[1]), self.now(), nat_t=True)
            self.pump()
        elif data == NAT_KEEPALIVE:
            return  # it kept the NAT's mapping alive on its way; nothing to do here
        elif self.esp_handler is not None:
            self.esp_handler(data, addr)

    def pump(self) -> None:
        """Deliver the engine's events, send what it queued, re-arm its timer.

        Events go first: a Child SA the engine just agreed to is installed before the
        answer that lets the peer use it leaves (make-before-break)."""
        for event in self.engine.pop_events():
            self.on_event(event)
        for dgram in self.engine.pop_datagrams():
            if not dgram.nat_t:
                self._ike.transport.sendto(dgram.data, dgram.dst)
            elif dgram.data == NAT_KEEPALIVE:
                self._nat_t.sendto(dgram.data, dgram.dst)
            else:
                self._nat_t.sendto(NON_ESP_MARKER + dgram.data, dgram.dst)
        if self._timer:
            self._timer.cancel()
            self._timer = None
        deadline = self.engine.next_deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.engine.tick(self.now())
        self.pump()
