"""The UDP shell around the engine, on loopback: what arrives on the NAT-T port."""

from __future__ import annotations

import asyncio
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
    NAT_T_BATCH datagrams per readiness callback, not one per event loop iteration."""
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
            on_datagram = runner._nat_t.on_datagram

            def counted(data: bytes, addr: tuple) -> None:
                before = len(received)
                on_datagram(data, addr)
                bursts.append(len(received) - before)

            runner._nat_t.on_datagram = counted
            port = runner._nat_t_sock.getsockname()[1]
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
