"""The userspace plane and the real kernel's ESP agree on the wire (issue 6).

h1 runs keyway's userspace plane, h2 the VM kernel's XFRM with the same keys: a UDP
exchange between their sites only comes back if each side decrypts what the other
encrypted, in both directions.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
)
from tests.fixtures.capture import Capture
from tests.fixtures.netns import in_netns, udp_exchange
from tests.netns.test_userspace_plane import Runner

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)

SUITES = {
    # userspace names, kernel `ip xfrm` algorithm arguments (key as hex)
    "aes-gcm-16": ({"enc_alg": "aes-gcm-16"}, 20, "aead 'rfc4106(gcm(aes))' 0x{key} 128"),
    "aes-cbc+hmac-sha2-256": (
        {"enc_alg": "aes-cbc", "integ_alg": "hmac-sha2-256-128"},
        16 + 32,
        "enc 'cbc(aes)' 0x{key16} auth-trunc 'hmac(sha256)' 0x{key32} 128",
    ),
}


def _user_sa(src, dst, spi, sel_src, sel_dst, alg: dict, key: bytes) -> dict:
    keys = (
        {"enc_key": key.hex()}
        if "integ_alg" not in alg
        else {"enc_key": key[:16].hex(), "integ_key": key[16:].hex()}
    )
    return {
        "src": src,
        "dst": dst,
        "spi": spi,
        "reqid": KEYWAY_REQID_MIN + 1,
        "mode": "tunnel",
        "proto": "esp",
        "esn": False,  # the kernel SAs below are added without `flag esn`
        **alg,
        **keys,
        "selector": {"src": sel_src, "dst": sel_dst},
    }


def _kernel_alg(template: str, key: bytes) -> str:
    return template.format(key=key.hex(), key16=key[:16].hex(), key32=key[16:].hex())


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_userspace_and_kernel_esp_interoperate(netns_hosts, suite):
    alg, key_len, kernel_tmpl = SUITES[suite]
    h1, h2 = netns_hosts(2).hosts
    k12, k21 = os.urandom(key_len), os.urandom(key_len)
    config = {
        "tun": "kwesp0",
        "own_udp_port": None,
        "sas": [
            _user_sa(h1.ipv4, h2.ipv4, 0x1001, h1.site4, h2.site4, alg, k12),
            _user_sa(h2.ipv4, h1.ipv4, 0x2001, h2.site4, h1.site4, alg, k21),
        ],
        "policies": [
            {
                "selector": {"src": h1.site4, "dst": h2.site4},
                "direction": "out",
                "templates": [
                    {
                        "reqid": KEYWAY_REQID_MIN + 1,
                        "proto": "esp",
                        "mode": "tunnel",
                        "src": h1.ipv4,
                        "dst": h2.ipv4,
                    }
                ],
            }
        ],
    }
    tmpl = "tmpl src {s} dst {d} proto esp reqid 1 mode tunnel"
    commands = [
        f"xfrm state add src {h2.ipv4} dst {h1.ipv4} proto esp spi 0x2001 reqid 1 mode tunnel "
        + _kernel_alg(kernel_tmpl, k21),
        f"xfrm state add src {h1.ipv4} dst {h2.ipv4} proto esp spi 0x1001 reqid 1 mode tunnel "
        + _kernel_alg(kernel_tmpl, k12),
        f"xfrm policy add src {h2.site4} dst {h1.site4} dir out "
        + tmpl.format(s=h2.ipv4, d=h1.ipv4),
        f"xfrm policy add src {h1.site4} dst {h2.site4} dir in "
        + tmpl.format(s=h1.ipv4, d=h2.ipv4),
        f"xfrm policy add src {h1.site4} dst {h2.site4} dir fwd "
        + tmpl.format(s=h1.ipv4, d=h2.ipv4),
        f"route add {h1.site4} via {h1.ipv4} src {h2.site4_address}",
    ]
    proc = subprocess.run(
        ["ip", "-n", h2.netns, "-batch", "-"],
        input="\n".join(commands),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    plane = Runner(h1.netns, config)
    try:
        marker = b"planes-agree-" + suite.encode()
        with Capture(h1.netns, "eth0") as cap:
            reply = udp_exchange(
                h1.netns, h2.netns, h1.site4_address, h2.site4_address, marker, timeout=30
            )
        stats = plane.stats()
        kernel = in_netns(h2.netns, "ip", "-s", "xfrm", "state", "list").stdout
        kernel += in_netns(h2.netns, "cat", "/proc/net/xfrm_stat").stdout
        esp_dirs = [("out" if f.outgoing else "in", f.ip_proto) for f in cap.frames]
        assert reply == marker[::-1], (esp_dirs, stats, kernel)
    finally:
        plane.close()
    esp = [f for f in cap.frames if f.ip_proto == 50]
    assert any(f.outgoing for f in esp) and any(not f.outgoing for f in esp)
    assert not any(marker in f.data or marker[::-1] in f.data for f in cap.frames)
    assert not stats["drops"].get("icv") and not stats["drops"].get("bad_spi"), stats
    # The kernel's two SAs each carried the exchange: in (h1's request), out (the reply).
    packets = [int(n) for n in re.findall(r"(\d+)\(packets\)", kernel)]
    assert len(packets) == 2 and all(n >= 1 for n in packets), kernel
