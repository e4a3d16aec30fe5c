"""The userspace ESP plane between two lab namespaces: site-to-site UDP and TCP through the
tunnel, ciphertext on the wire (AF_PACKET capture), replayed and corrupted packets dropped
and counted.

Each plane runs as `ip netns exec NS python -m tests.fixtures.plane_runner`: the whole
process (TUN fd, raw sockets, routes via `ip`) then lives in the namespace, with no setns
juggling of a multi-threaded interpreter, and it is killed by PID like any lab process."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import KEYWAY_REQID_MIN
from ansible_collections.keyway.ipsec.plugins.module_utils.esp.tun import FWMARK, ROUTE_TABLE
from tests.conftest import ROOT
from tests.fixtures.netns import in_netns, udp_exchange

RUNNER = "tests.fixtures.plane_runner"
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
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[2], 16))  # not into the TUN
for pkt in sys.argv[3:]:
    s.sendto(bytes.fromhex(pkt), (sys.argv[1], 0))
"""


CASES = {  # name: (proto, ESP-in-UDP, IP version, mode)
    "esp4": ("esp", False, 4, "tunnel"),
    "esp-in-udp4": ("esp", True, 4, "tunnel"),
    "ah4": ("ah", False, 4, "tunnel"),
    "esp6": ("esp", False, 6, "tunnel"),
    "esp4-transport": ("esp", False, 4, "transport"),
}


def _sa(src, dst, spi, reqid, sel_src, sel_dst, key, proto, udp, mode):
    keys = (
        {"integ_alg": "hmac-sha2-256-128", "integ_key": key.hex()}
        if proto == "ah"
        else {"enc_alg": "aes-gcm-16", "enc_key": key[:20].hex()}
    )
    return {
        "src": src, "dst": dst, "spi": spi, "reqid": reqid, "mode": mode, "proto": proto,
        **keys, "selector": {"src": sel_src, "dst": sel_dst},
        "encap": {"sport": 4500, "dport": 4500} if udp else None,
    }  # fmt: skip


def _addrs(host, version, mode="tunnel"):
    """(outer address, protected prefix, inner address) of a lab host."""
    if mode == "transport":
        return (host.ipv4, f"{host.ipv4}/32", host.ipv4) if version == 4 else (
            host.ipv6, f"{host.ipv6}/128", host.ipv6)  # fmt: skip
    if version == 4:
        return host.ipv4, host.site4, host.site4_address
    return host.ipv6, host.site6, host.site6_address


def _config(me, peer, out_spi, in_spi, key_out, key_in, case):
    proto, udp, version, mode = CASES[case]
    reqid = KEYWAY_REQID_MIN + 1
    (me_ip, me_site, _), (peer_ip, peer_site, _) = (
        _addrs(me, version, mode),
        _addrs(peer, version, mode),
    )
    return {
        "tun": "kwesp0",
        "own_udp_port": 4500 if udp else None,
        "sas": [
            _sa(me_ip, peer_ip, out_spi, reqid, me_site, peer_site, key_out, proto, udp, mode),
            _sa(peer_ip, me_ip, in_spi, reqid, peer_site, me_site, key_in, proto, udp, mode),
        ],
        "policies": [
            {
                "selector": {"src": me_site, "dst": peer_site},
                "direction": "out",
                "templates": [
                    {"reqid": reqid, "proto": proto, "mode": mode}
                    | ({"src": me_ip, "dst": peer_ip} if mode == "tunnel" else {})
                ],
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
    """IPv4 and IPv6 packets (Ethernet header removed) from captured frames."""
    return [
        frame[14:]
        for frame in map(bytes.fromhex, frames)
        if frame[12:14] in (b"\x08\x00", b"\x86\xdd")
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_site_to_site_through_userspace_plane(netns_hosts, case: str) -> None:
    proto, udp, version, mode = CASES[case]
    plan = netns_hosts(2)
    h1, h2 = plan.hosts
    (_, _, h1_site), (h2_ip, _, h2_site) = (
        _addrs(h1, version, mode),
        _addrs(h2, version, mode),
    )
    k12, k21 = os.urandom(32), os.urandom(32)
    runners = []
    capture = None
    try:
        runners.append(Runner(h1.netns, _config(h1, h2, 0x1001, 0x2001, k12, k21, case)))
        runners.append(Runner(h2.netns, _config(h2, h1, 0x2001, 0x1001, k21, k12, case)))
        capture = subprocess.Popen(
            ["ip", "netns", "exec", h1.netns, sys.executable, "-c", CAPTURE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert capture.stdout.readline().strip() == "ready"

        marker = b"KEYWAY-PLAINTEXT-MARKER"
        assert udp_exchange(h1.netns, h2.netns, h1_site, h2_site, marker) == marker[::-1]

        server = subprocess.Popen(
            ["ip", "netns", "exec", h2.netns, sys.executable, "-c", TCP_SERVER,
             h2_site, "7008", str(len(marker) * 4000)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout.readline().strip() == "ready"
            client = in_netns(
                h1.netns, sys.executable, "-c", TCP_CLIENT, h1_site,
                h2_site, "7008", marker.hex(), "4000", timeout=60,
            )  # fmt: skip
            assert client.stdout.strip() == "ok", client.stderr
        finally:
            server.kill()
            server.wait()

        capture.stdin.write("stop\n")
        capture.stdin.flush()
        packets = _ip_packets(json.loads(capture.stdout.readline()))
        capture.wait()
        peer = ipaddress.ip_address(h2_ip).packed
        hlen = 20 if version == 4 else 40
        to_peer = [p for p in packets if (p[16:20] if version == 4 else p[24:40]) == peer]
        assert len(to_peer) > 20
        inner_src = ipaddress.ip_address(h1_site).packed
        for p in to_peer:
            next_header = p[9] if version == 4 else p[6]
            if udp:
                assert next_header == 17 and p[20:24] == b"\x11\x94\x11\x94"  # 4500 -> 4500
                assert p[28:32] == b"\0\0\x10\x01"  # SPI, not the non-ESP marker
            elif proto == "ah":
                assert next_header == 51 and p[hlen + 4 : hlen + 8] == b"\0\0\x10\x01"
            else:
                assert next_header == 50 and p[hlen : hlen + 4] == b"\0\0\x10\x01"
        if proto == "esp":  # encrypted: neither the payload nor the inner header shows
            for p in packets:
                assert marker not in p and marker[::-1] not in p
                if mode == "tunnel":
                    assert inner_src not in p, "an inner address left in the clear"
        else:  # AH authenticates only: the payload is visible, but only inside AH
            assert any(marker in p for p in to_peer)

        before = runners[1].stats()
        replayed = to_peer[-1]
        # A fresh sequence number (so the window lets it by) on a flipped payload byte.
        corrupted = bytearray(replayed)
        seq_at = {"esp": hlen + 4, "ah": hlen + 8}[proto] + (8 if udp else 0)
        seq = int.from_bytes(corrupted[seq_at : seq_at + 4], "big")
        corrupted[seq_at : seq_at + 4] = (seq + 100).to_bytes(4, "big")
        corrupted[-20] ^= 0x01
        if udp:  # veth offload leaves a partial UDP checksum in captures: send none (IPv4)
            replayed = replayed[:26] + b"\0\0" + replayed[28:]
            corrupted[26:28] = b"\0\0"
        inject = in_netns(
            h1.netns,
            sys.executable,
            "-c",
            INJECT,
            h2_ip,
            hex(FWMARK),
            replayed.hex(),
            bytes(corrupted).hex(),
        )
        assert inject.returncode == 0, inject.stderr
        # The injected packets queue ahead of this exchange on the same path and socket,
        # so once it is through they have been judged.
        assert udp_exchange(h1.netns, h2.netns, h1_site, h2_site, b"after") == b"retfa"
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
    # The routes and the rule went away with the planes.
    table = str(ROUTE_TABLE)
    assert in_netns(h1.netns, "ip", f"-{version}", "route", "show", "table", table).stdout == ""
    assert table not in in_netns(h1.netns, "ip", f"-{version}", "rule", "show").stdout
