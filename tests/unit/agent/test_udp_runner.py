"""The UDP shell around the engine, on loopback: what arrives on the NAT-T port."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import udp
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.udp import UdpRunner
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    NAT_KEEPALIVE,
    NON_ESP_MARKER,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import Engine


def test_a_burst_on_the_nat_t_port_is_read_in_batches_each_datagram_where_it_belongs() -> None:
    """ESP in UDP goes to the data plane, IKE (non-ESP marker) to the engine without its
    marker, keepalives nowhere; in the order they came. What was queued is read
    NAT_T_BATCH datagrams per readiness callback (asyncio's datagram transport read one
    per event loop iteration)."""
    received: list[tuple] = []
    bursts: list[int] = []

    async def scenario() -> None:
        engine = Engine(("127.0.0.1", 500))
        engine.receive = lambda data, src, now, nat_t=False: received.append(("ike", data, nat_t))
        runner = UdpRunner(
            engine, "127.0.0.1", ike_port=0, nat_t_port=0,
            esp_handler=lambda data, addr: received.append(("esp", data)),
        )  # fmt: skip
        await runner.start()
        try:
            nat_t = runner._nat_t
            readable = nat_t._readable

            def counted() -> None:
                before = len(received)
                readable()
                bursts.append(len(received) - before)

            loop = asyncio.get_running_loop()
            loop.remove_reader(nat_t.sock.fileno())
            loop.add_reader(nat_t.sock.fileno(), counted)
            port = nat_t.sock.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                # All queued before the loop looks (loopback delivers within sendto).
                for i in range(100):
                    peer.sendto(b"\x00\x00\x10\x01" + i.to_bytes(4, "big") + bytes(16),
                                ("127.0.0.1", port))  # fmt: skip
                    if i == 70:
                        peer.sendto(NAT_KEEPALIVE, ("127.0.0.1", port))
                        peer.sendto(NON_ESP_MARKER + b"ike message", ("127.0.0.1", port))
            for _unused in range(500):
                if len(received) == 101:
                    break
                await asyncio.sleep(0.01)
        finally:
            await runner.stop()

    asyncio.run(scenario())
    esp = [r[1] for r in received if r[0] == "esp"]
    assert [int.from_bytes(d[4:8], "big") for d in esp] == list(range(100))
    assert received[71] == ("ike", b"ike message", True)
    # 102 datagrams queued: a batch of 64 (all handed on), then the other 38 (the
    # keepalive among them handed to no one).
    assert bursts == [udp.NAT_T_BATCH, 101 - udp.NAT_T_BATCH]


def test_a_burst_leaves_as_one_gso_send_and_arrives_as_its_datagrams(caplog) -> None:
    """send_nat_t_burst: one sendmsg with UDP_SEGMENT, which the receiver gets as the
    datagrams, intact and in order; a refused burst goes one by one, and after
    GSO_GIVE_UP refusals in a row (a kernel without UDP GSO) every burst does (said
    once)."""
    got: list[bytes] = []

    async def scenario() -> None:
        runner = UdpRunner(Engine(("127.0.0.1", 500)), "127.0.0.1", ike_port=0, nat_t_port=0)
        await runner.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.setblocking(False)
            datagrams = [bytes([n]) * 300 for n in range(5)] + [b"\xee" * 120]
            runner.send_nat_t_burst(datagrams, peer.getsockname())
            sends = []

            class Refusing:  # a kernel without UDP GSO
                def __init__(self, real: socket.socket) -> None:
                    self.real = real

                def sendmsg(self, *args):
                    sends.append(args)
                    raise OSError(errno.EIO, "Input/output error")

                def sendto(self, *args):
                    return self.real.sendto(*args)

            sock = runner._nat_t.sock
            runner._nat_t.sock = Refusing(sock)
            for _unused in range(udp.GSO_GIVE_UP + 1):
                runner.send_nat_t_burst(datagrams[:2], peer.getsockname())
            runner._nat_t.sock = sock
            for _unused in range(200):
                try:
                    got.append(peer.recv(65535))
                except BlockingIOError:
                    if len(got) >= 6 + 2 * (udp.GSO_GIVE_UP + 1):
                        break
                    await asyncio.sleep(0.01)
            assert len(sends) == udp.GSO_GIVE_UP  # refused, and then not tried again
            assert got == datagrams + datagrams[:2] * (udp.GSO_GIVE_UP + 1)
        await runner.stop()

    with caplog.at_level(logging.INFO, logger="keyway.agent"):
        asyncio.run(scenario())
    assert caplog.text.count("UDP GSO refused") == 1


def test_a_gso_burst_reaches_a_gro_socket_whole_and_is_split_into_its_datagrams() -> None:
    """Between two agents on the userspace plane: the sender's burst leaves as one UDP
    GSO send, the receiver's NAT-T socket (UDP GRO on) takes it as one buffer with the
    segment size, and hands on each datagram, intact and in order."""
    got: list[bytes] = []
    reads: list[int] = []

    class Counting:  # the receiver's socket, counting what each read returned
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def recvmsg(self, *args):
            data, ancdata, flags, addr = self.sock.recvmsg(*args)
            reads.append(len(data))
            return data, ancdata, flags, addr

        def __getattr__(self, name):
            return getattr(self.sock, name)

    async def scenario() -> None:
        sender = UdpRunner(Engine(("127.0.0.1", 500)), "127.0.0.1", ike_port=0, nat_t_port=0)
        receiver = UdpRunner(
            Engine(("127.0.0.1", 500)), "127.0.0.1", ike_port=0, nat_t_port=0, udp_gro=True,
            esp_handler=lambda data, addr: got.append(data),
        )  # fmt: skip
        await sender.start()
        await receiver.start()
        receiver._nat_t.sock = Counting(receiver._nat_t.sock)
        assert receiver._nat_t.gro
        datagrams = [b"\0\0\x10\x01" + bytes([n]) * 296 for n in range(8)] + [b"\1" * 100]
        assert sender.send_nat_t_burst(datagrams, receiver._nat_t.sock.getsockname())
        for _unused in range(200):
            if len(got) == len(datagrams):
                break
            await asyncio.sleep(0.01)
        await sender.stop()
        await receiver.stop()
        assert got == datagrams

    asyncio.run(scenario())
    assert reads[0] == sum(300 for _n in range(8)) + 100  # one read: the whole burst
