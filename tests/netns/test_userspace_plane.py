"""The userspace ESP plane between two lab namespaces: site-to-site UDP and TCP through the
tunnel, ciphertext on the wire (AF_PACKET capture), replayed and corrupted packets dropped
and counted.

Each plane runs as `ip netns exec NS python -m ...esp.runner`: the whole process (TUN fd,
raw sockets, routes via `ip`) then lives in the namespace, with no setns juggling of a
multi-threaded interpreter, and it is killed by PID like any lab process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import KEYWAY_REQID_MIN
from tests.conftest import ROOT
from tests.fixtures.netns import in_netns, udp_exchange

RUNNER = "ansible_collections.keyway.ipsec.plugins.module_utils.esp.runner"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}

CAPTURE = r"""
import json, select, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
print("ready", flush=True)
frames = []
while True:
    r, _, _ = select.select([s, sys.stdin], [], [])
    if s in r:
        data, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            frames.append(data.hex())
    if sys.stdin in r:
        sys.stdin.readline()
        print(json.dumps(frames), flush=True)
        break
"""

TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); data = b""
while len(data) < int(sys.argv[3]):
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
c.sendall(data[::-1]); c.close()
"""
TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection(
    (sys.argv[2], int(sys.argv[3])), timeout=20, source_address=(sys.argv[1], 0))
payload = bytes.fromhex(sys.argv[4]) * int(sys.argv[5]); c.sendall(payload); data = b""
while len(data) < len(payload):
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
print("ok" if data == payload[::-1] else "mismatch %d" % len(data))
"""

INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for pkt in sys.argv[2:]:
    s.sendto(bytes.fromhex(pkt), (sys.argv[1], 0))
"""


def _sa(src, dst, spi, reqid, sel_src, sel_dst, key, udp):
    return {
        "src": src, "dst": dst, "spi": spi, "reqid": reqid, "mode": "tunnel",
        "enc_alg": "aes-gcm-16", "enc_key": key.hex(),
        "selector": {"src": sel_src, "dst": sel_dst},
        "encap": {"sport": 4500, "dport": 4500} if udp else None,
    }  # fmt: skip


def _config(me, peer, out_spi, in_spi, key_out, key_in, udp):
    reqid = KEYWAY_REQID_MIN + 1
    return {
        "tun": "kwesp0",
        "own_udp_port": 4500 if udp else None,
        "sas": [
            _sa(me.ipv4, peer.ipv4, out_spi, reqid, me.site4, peer.site4, key_out, udp),
            _sa(peer.ipv4, me.ipv4, in_spi, reqid, peer.site4, me.site4, key_in, udp),
        ],
        "policies": [
            {
                "selector": {"src": me.site4, "dst": peer.site4},
                "direction": "out",
                "templates": [{"reqid": reqid, "src": me.ipv4, "dst": peer.ipv4}],
            }
        ],
    }


class Runner:
    def __init__(self, netns: str, config: dict) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", RUNNER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        )  # fmt: skip
        self.proc.stdin.write(json.dumps(config) + "\n")  # keys via stdin, never argv
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"plane in {netns} did not start: {line!r}")

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _ip_packets(frames: list[str]) -> list[bytes]:
    out = []
    for f in frames:
        frame = bytes.fromhex(f)
        if frame[12:14] == b"\x08\x00":
            out.append(frame[14:])
    return out


@pytest.mark.parametrize("udp", [False, True], ids=["esp", "esp-in-udp"])
def test_site_to_site_through_userspace_esp(netns_hosts, udp: bool) -> None:
    plan = netns_hosts(2)
    h1, h2 = plan.hosts
    k12, k21 = os.urandom(20), os.urandom(20)
    runners = []
    capture = None
    try:
        runners.append(Runner(h1.netns, _config(h1, h2, 0x1001, 0x2001, k12, k21, udp)))
        runners.append(Runner(h2.netns, _config(h2, h1, 0x2001, 0x1001, k21, k12, udp)))
        capture = subprocess.Popen(
            ["ip", "netns", "exec", h1.netns, sys.executable, "-c", CAPTURE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert capture.stdout.readline().strip() == "ready"

        marker = b"KEYWAY-PLAINTEXT-MARKER"
        assert (
            udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, marker)
            == marker[::-1]
        )

        server = subprocess.Popen(
            ["ip", "netns", "exec", h2.netns, sys.executable, "-c", TCP_SERVER,
             h2.site4_address, "7008", str(len(marker) * 4000)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout.readline().strip() == "ready"
            client = in_netns(
                h1.netns, sys.executable, "-c", TCP_CLIENT, h1.site4_address,
                h2.site4_address, "7008", marker.hex(), "4000", timeout=60,
            )  # fmt: skip
            assert client.stdout.strip() == "ok", client.stderr
        finally:
            server.kill()
            server.wait()

        capture.stdin.write("stop\n")
        capture.stdin.flush()
        packets = _ip_packets(json.loads(capture.stdout.readline()))
        capture.wait()
        to_peer = [p for p in packets if p[16:20] == bytes(map(int, h2.ipv4.split(".")))]
        assert len(to_peer) > 20
        for p in packets:
            assert marker not in p and marker[::-1] not in p
            assert p[12:16] != bytes([10, 1, 0, 1]), "an inner address left in the clear"
        for p in to_peer:
            if udp:
                assert p[9] == 17 and p[20:24] == b"\x11\x94\x11\x94"  # UDP 4500 -> 4500
                assert p[28:32] == b"\0\0\x10\x01"  # SPI, not the non-ESP marker
            else:
                assert p[9] == 50 and p[20:24] == b"\0\0\x10\x01"

        before = runners[1].stats()
        replayed = to_peer[-1]
        # A fresh sequence number (so the window lets it by) on a flipped ciphertext byte.
        corrupted = bytearray(replayed)
        seq_at = 32 if udp else 24
        seq = int.from_bytes(corrupted[seq_at : seq_at + 4], "big")
        corrupted[seq_at : seq_at + 4] = (seq + 100).to_bytes(4, "big")
        corrupted[seq_at + 20] ^= 0x01
        if udp:  # veth offload leaves a partial UDP checksum in captures: send none (IPv4)
            replayed = replayed[:26] + b"\0\0" + replayed[28:]
            corrupted[26:28] = b"\0\0"
        inject = in_netns(
            h1.netns, sys.executable, "-c", INJECT, h2.ipv4, replayed.hex(), bytes(corrupted).hex()
        )
        assert inject.returncode == 0, inject.stderr
        # The injected packets queue ahead of this exchange on the same path and socket,
        # so once it is through they have been judged.
        assert (
            udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"after")
            == b"retfa"
        )
        after = runners[1].stats()
        assert after["drops"].get("replay", 0) == before["drops"].get("replay", 0) + 1
        assert after["drops"].get("icv", 0) == before["drops"].get("icv", 0) + 1
        inbound = after["sas"]["0x00001001"]
        assert inbound["replay_dropped"] == 1 and inbound["integrity_failed"] == 1
        assert inbound["packets"] > 20
    finally:
        if capture is not None and capture.poll() is None:
            capture.kill()
            capture.wait()
        for r in runners:
            r.close()
    # The routes went away with the planes.
    routes = in_netns(h1.netns, "ip", "route", "show", h2.site4).stdout
    assert "kwesp0" not in routes
