"""The VM tier itself: a real kernel with ESP, and the lab working inside it.

These tests run only inside the guest (`make test` boots it once for the whole tier);
the host run deselects the `kernel` marker.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.fixtures.capture import Capture
from tests.fixtures.netns import in_netns, udp_exchange

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)

KEY = "0x" + "11" * 20  # AES-128 key + 4-byte salt, test-only
SPI_AB, SPI_BA = "0x4b570001", "0x4b570002"


def _ip_batch(netns: str, commands: list[str]) -> None:
    proc = subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_kernel_carries_esp_between_lab_sites(netns_hosts):
    plan = netns_hosts(2)
    a, b = plan.hosts
    for me, peer, out_spi, in_spi in ((a, b, SPI_AB, SPI_BA), (b, a, SPI_BA, SPI_AB)):
        _ip_batch(
            me.netns,
            [
                f"xfrm state add src {me.ipv4} dst {peer.ipv4} proto esp spi {out_spi} reqid 1 "
                f"mode tunnel aead 'rfc4106(gcm(aes))' {KEY} 128",
                f"xfrm state add src {peer.ipv4} dst {me.ipv4} proto esp spi {in_spi} reqid 1 "
                f"mode tunnel aead 'rfc4106(gcm(aes))' {KEY} 128",
                f"xfrm policy add src {me.site4} dst {peer.site4} dir out "
                f"tmpl src {me.ipv4} dst {peer.ipv4} proto esp reqid 1 mode tunnel",
                f"xfrm policy add src {peer.site4} dst {me.site4} dir in "
                f"tmpl src {peer.ipv4} dst {me.ipv4} proto esp reqid 1 mode tunnel",
                f"xfrm policy add src {peer.site4} dst {me.site4} dir fwd "
                f"tmpl src {peer.ipv4} dst {me.ipv4} proto esp reqid 1 mode tunnel",
                f"route add {peer.site4} via {peer.ipv4} src {me.site4_address}",
            ],
        )
    marker = b"keyway-vm-plaintext"
    with Capture(a.netns, "eth0", outgoing_only=True) as cap:
        reply = udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, marker)
    assert reply == marker[::-1]
    assert any(f.ip_proto == 50 for f in cap.frames), "no ESP frame left h1"
    assert not any(marker in f.data for f in cap.frames), "plaintext on the wire"
    stats = in_netns(b.netns, "ip", "-s", "xfrm", "state", "list").stdout
    # Both of b's SAs counted traffic: the request in, the reply out.
    packets = [int(n) for n in re.findall(r"(\d+)\(packets\)", stats)]
    assert len(packets) == 2 and all(n >= 1 for n in packets), stats
