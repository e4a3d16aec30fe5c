"""The asyncio shell around the sans-IO engine: UDP 500 and 4500, and the engine's timer.

    runner = UdpRunner(engine, "192.0.2.11", on_event=print)
    await runner.start(); ...; await runner.stop()

IKE on the NAT-T port carries a 4-byte zero non-ESP marker (RFC 3948); anything else
arriving there is ESP in UDP and goes to `esp_handler` (the userspace data plane), or
is dropped when there is none. keywayd grows from this (the agent issue).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ..ike.constants import IKE_PORT, NAT_KEEPALIVE, NAT_T_PORT, NON_ESP_MARKER
from ..ike.engine.core import Engine, untrusted
from ..ike.engine.events import Event

SOCKET_BUFFER = 4 << 20
# Datagrams read from the NAT-T socket per readiness callback: asyncio's datagram
# transport reads one per loop iteration, which costs ESP in UDP more than its crypto.
NAT_T_BATCH = 64


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        untrusted.info("UDP error: %s", exc)  # e.g. ICMP port unreachable: retransmits cope


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
    ):
        self.engine, self.host = engine, host
        self.ike_port, self.nat_t_port = ike_port, nat_t_port
        self.on_event = on_event or (lambda event: None)
        self.esp_handler = esp_handler
        self.prepare_socket = prepare_socket
        self.prepare_nat_t_socket = prepare_nat_t_socket or prepare_socket
        self._ike: _Endpoint | None = None
        self._nat_t: _Endpoint | None = None
        self._nat_t_sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _unused, self._ike = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self._on_ike), sock=self._socket(self.ike_port, self.prepare_socket)
        )
        nat_t = self._socket(self.nat_t_port, self.prepare_nat_t_socket)
        _unused, self._nat_t = await self._loop.create_datagram_endpoint(
            lambda: _Endpoint(self._on_nat_t_burst), sock=nat_t
        )
        self._nat_t_sock = nat_t

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
        for endpoint in (self._ike, self._nat_t):
            if endpoint and endpoint.transport:
                endpoint.transport.close()

    def now(self) -> float:
        return self._loop.time()

    def initiate(self, name: str, remote: tuple[str, int] | None = None) -> None:
        self.engine.initiate(name, self.now(), remote=remote)
        self.pump()

    def send_nat_t(self, data: bytes, dst: tuple) -> None:
        """Send a datagram from the NAT-T port as it is (ESP in UDP for the data plane)."""
        self._nat_t.transport.sendto(data, dst)

    def _on_ike(self, data: bytes, addr: tuple) -> None:
        self.engine.receive(data, (addr[0], addr[1]), self.now())
        self.pump()

    def _on_nat_t_burst(self, data: bytes, addr: tuple) -> None:
        """The datagram the transport read, then what else is queued (up to NAT_T_BATCH),
        read from the same non-blocking socket: the transport's next read finds it empty,
        which it expects."""
        self._on_nat_t(data, addr)
        sock = self._nat_t_sock
        for _unused in range(NAT_T_BATCH - 1):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # as the transport's error_received
                self._nat_t.error_received(exc)
                return
            self._on_nat_t(data, addr)

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
                self._nat_t.transport.sendto(dgram.data, dgram.dst)
            else:
                self._nat_t.transport.sendto(NON_ESP_MARKER + dgram.data, dgram.dst)
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
