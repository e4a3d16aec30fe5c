"""Userspace ESP throughput: packets/s and Mbit/s through the tunnel between two lab
namespaces (64- and 1400-byte UDP payloads, plain ESP and ESP-in-UDP, AES-GCM-128), plus
the in-process cost of the packet layer per algorithm; and strongSwan's kernel-libipsec
between the same namespaces in the same run (SAs negotiated by two charons), as a ratio.
Two rows each: the plane alone (hand-installed SAs, its own UDP socket), and two keywayd
agents (SAs negotiated, ESP-in-UDP through the IKE NAT-T socket as in production), the
one to compare with two charons.

Run as root from the repository root after the test suite has created .collections:
    .venv/bin/python bench/esp_throughput.py [seconds]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.esp import packet as pk
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import (
    lab_down,
    lab_up,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import plan_lab

RUNNER = "tests.fixtures.plane_runner"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}

RECEIVER = r"""
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], 9000)); s.setblocking(False); print("ready", flush=True)
n = nbytes = 0; stopping = False
while True:
    watch = [s] if stopping else [s, sys.stdin]
    r, _, _ = select.select(watch, [], [], 0.5 if stopping else None)
    if not r: break
    if sys.stdin in r and not stopping:
        sys.stdin.readline(); stopping = True; continue
    try:
        while True:
            d = s.recv(65535); n += 1; nbytes += len(d)
    except BlockingIOError:
        pass
print(n, nbytes, flush=True)
"""
SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))
payload = b"\xab" * int(sys.argv[3]); end = time.monotonic() + float(sys.argv[4]); n = 0
while time.monotonic() < end:
    for _ in range(32):
        try:
            s.sendto(payload, (sys.argv[2], 9000)); n += 1
        except OSError:
            pass
print(n)
"""


def _config(me, peer, out_spi, in_spi, k_out, k_in, udp):
    reqid = KEYWAY_REQID_MIN + 1

    def sa(src, dst, spi, key, ssrc, sdst):
        return {
            "src": src, "dst": dst, "spi": spi, "reqid": reqid, "enc_alg": "aes-gcm-16",
            "enc_key": key.hex(), "selector": {"src": ssrc, "dst": sdst},
            "encap": {"sport": 4500, "dport": 4500} if udp else None,
        }  # fmt: skip

    return {
        "tun": "kwesp0",
        "own_udp_port": 4500 if udp else None,
        "sas": [
            sa(me.ipv4, peer.ipv4, out_spi, k_out, me.site4, peer.site4),
            sa(peer.ipv4, me.ipv4, in_spi, k_in, peer.site4, me.site4),
        ],
        "policies": [
            {
                "selector": {"src": me.site4, "dst": peer.site4},
                "direction": "out",
                "templates": [{"reqid": reqid, "src": me.ipv4, "dst": peer.ipv4}],
            }
        ],
    }


def _start(netns: str, config: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", RUNNER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
    )  # fmt: skip
    proc.stdin.write(json.dumps(config) + "\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"plane in {netns} did not start")
    return proc


def _stop(proc: subprocess.Popen) -> dict:
    proc.stdin.write("stats\n")
    proc.stdin.flush()
    stats = json.loads(proc.stdout.readline())
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait(timeout=10)
    return stats


def tunnel_run(h1, h2, size: int, seconds: float) -> tuple[int, int, int]:
    recv = subprocess.Popen(
        ["ip", "netns", "exec", h2.netns, sys.executable, "-c", RECEIVER, h2.site4_address],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert recv.stdout.readline().strip() == "ready"
    sent = subprocess.run(
        ["ip", "netns", "exec", h1.netns, sys.executable, "-c", SENDER,
         h1.site4_address, h2.site4_address, str(size), str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    recv.stdin.write("stop\n")
    recv.stdin.flush()
    n, nbytes = map(int, recv.stdout.readline().split())
    recv.wait()
    return int(sent), n, nbytes


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measured_run(h1, h2, seconds: float, pids: list[int], counters=None) -> dict[int, dict]:
    """tunnel_run at 64 and 1400 B: received packets/s, and the CPU the two ends (`pids`)
    spent per packet received; with `counters` (a callable giving (sent, decrypted) SA
    packet counts), the packets/s the sender's end protected and the receiver's decrypted,
    which shows where packets were dropped."""
    figures = {}
    for size in (64, 1400):
        cpu0 = sum(_cpu_seconds(pid) for pid in pids)
        c0 = counters() if counters else None
        _sent, n, _nbytes = tunnel_run(h1, h2, size, seconds)
        cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu0
        figures[size] = {"rate": n / seconds, "cpu_us": cpu / n * 1e6 if n else float("nan")}
        if counters:
            c1 = counters()
            figures[size]["protected"] = (c1[0] - c0[0]) / seconds
            figures[size]["decrypted"] = (c1[1] - c0[1]) / seconds
    return figures


def libipsec_run(h1, h2, seconds: float) -> dict[int, dict]:
    """Through two charons (kernel-libipsec), AES-GCM-128, PSK: _measured_run's figures."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.strongswan import Charon, site_connection

    folder = Path(tempfile.mkdtemp(prefix="kwbench-charon"))
    charons = []
    try:
        for me, peer in ((h2, h1), (h1, h2)):
            charon = Charon(me.netns, folder / me.name)
            charon.folder.mkdir(parents=True)
            charon.write_config(
                site_connection(
                    me,
                    peer,
                    psk="bench-psk-0123456789abcdef",
                    proposals="aes128gcm16-prfsha256-x25519",
                    esp_proposals="aes128gcm16",
                )
            )
            charons.append(charon)
            charon.start()
        charons[1].swanctl("--initiate", "--child", "kw", timeout=30)
        return _measured_run(h1, h2, seconds, [c.process.pid for c in charons])
    finally:
        for charon in charons:
            charon.stop()


def keywayd_run(h1, h2, seconds: float) -> dict[int, dict]:
    """Through two keywayd agents (userspace plane, `encap: force`: ESP-in-UDP as
    libipsec always does), AES-GCM-128, PSK: _measured_run's figures."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.keywayd import Keywayd, site_connection

    folder = Path(tempfile.mkdtemp(prefix="kwbench-keywayd"))
    agents = []
    try:
        for me, peer in ((h2, h1), (h1, h2)):
            conn = site_connection(me, peer, start=False, esp_proposals=["aes128gcm16"])
            conn["encap"] = "force"
            agents.append(Keywayd(me.netns, folder / me.name, {"kw": conn}, log_level="info"))
        receiver, sender = agents
        sender.ctl("initiate", connection="kw")

        def packets(agent, key: str) -> int:
            return sum(c.get(key, 0) for sa in agent.sas("kw") for c in sa["children"])

        def counters() -> tuple[int, int]:
            return packets(sender, "packets_out"), packets(receiver, "packets_in")

        return _measured_run(h1, h2, seconds, [a.process.pid for a in agents], counters)
    finally:
        for agent in agents:
            agent.stop()


def packet_layer(seconds: float = 0.5) -> None:
    print("\npacket layer, in process (protect + unprotect of one tunnel-mode packet):")
    for enc, klen, integ, ilen in [
        ("aes-gcm-16", 20, None, 0),
        ("chacha20-poly1305", 36, None, 0),
        ("aes-cbc", 16, "hmac-sha2-256-128", 32),
    ]:
        key, ikey = os.urandom(klen), os.urandom(ilen)

        def make(enc=enc, key=key, integ=integ, ikey=ikey) -> pk.SaCrypto:
            return pk.SaCrypto(
                spi=1, ah=False, tunnel=True, enc_alg=enc, enc_key=key, integ_alg=integ,
                integ_key=ikey, outer_src="192.0.2.1", outer_dst="192.0.2.2",
            )  # fmt: skip

        for size in (64, 1400):
            tx, rx = make(), make()
            inner = pk.ipv4_header(b"\n\1\0\1", b"\n\2\0\1", 17, size) + bytes(size)
            n, end = 0, time.perf_counter() + seconds
            src, dst = b"\xc0\0\2\1", b"\xc0\0\2\2"
            while time.perf_counter() < end:
                out = pk.protect(tx, inner)
                pk.unprotect_esp(rx, memoryview(out)[20:], src, dst)
                n += 1
            rate = n / seconds
            print(
                f"  {enc:<18} {size:>5} B: {rate:>9.0f} pkt/s  {rate * size * 8 / 1e6:8.1f} Mbit/s"
            )


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    plan = plan_lab(2, f"kwb{os.getpid() % 10000}", tempfile.mkdtemp(prefix="kwbench"))
    lab_up(plan)
    try:
        h1, h2 = plan.hosts
        print(
            f"userspace ESP plane, AES-GCM-128, {seconds:.0f} s UDP blast per row, "
            "10.1.0.1 -> 10.2.0.1 (Mbit/s of UDP payload received)"
        )
        print(
            f"{'mode':<11} {'payload':>7} {'sent pkt/s':>11} {'recv pkt/s':>11} "
            f"{'Mbit/s':>8} {'loss':>6}"
        )
        ours: dict[int, float] = {}
        for udp in (False, True):
            k12, k21 = os.urandom(20), os.urandom(20)
            p1 = _start(h1.netns, _config(h1, h2, 0x1001, 0x2001, k12, k21, udp))
            p2 = _start(h2.netns, _config(h2, h1, 0x2001, 0x1001, k21, k12, udp))
            try:
                for size in (64, 1400):
                    sent, n, nbytes = tunnel_run(h1, h2, size, seconds)
                    mode = "esp-in-udp" if udp else "esp"
                    loss = 1 - n / sent if sent else 0
                    if udp:
                        ours[size] = n / seconds
                    print(f"{mode:<11} {size:>7} {sent / seconds:>11.0f} {n / seconds:>11.0f} "
                          f"{nbytes * 8 / seconds / 1e6:>8.1f} {loss:>6.1%}")  # fmt: skip
            finally:
                _stop(p1)
                _stop(p2)
        agents = keywayd_run(h1, h2, seconds)
        theirs = libipsec_run(h1, h2, seconds)
        print(
            "\nnegotiated, ESP-in-UDP, same hosts: two keywayd (userspace plane, encap: force),"
            "\nand two strongSwan 5.9.8 charons with kernel-libipsec (always ESP-in-UDP). CPU: of"
            "\nboth ends' agents per packet received; these 2 cores also run the sender and"
            "\nthe receiver, so an agent's CPU is the receiver's loss."
        )
        print(f"{'agent':<11} {'payload':>7} {'recv pkt/s':>11} {'CPU us/pkt':>11}  where")
        for size in (64, 1400):
            kw, ss = agents[size], theirs[size]
            print(f"{'keywayd':<11} {size:>7} {kw['rate']:>11.0f} {kw['cpu_us']:>11.1f}  "
                  f"sender's SA protected {kw['protected']:.0f}/s, receiver's decrypted "
                  f"{kw['decrypted']:.0f}/s")  # fmt: skip
            print(f"{'libipsec':<11} {size:>7} {ss['rate']:>11.0f} {ss['cpu_us']:>11.1f}")
            rate = ss["rate"]
            print(
                f"{'':<11} {size:>7} keywayd/libipsec = "
                f"{kw['rate'] / rate if rate else float('nan'):.2f} (received), CPU per "
                f"packet {kw['cpu_us'] / ss['cpu_us']:.2f}x; plane alone/libipsec = "
                f"{ours[size] / rate if rate else float('nan'):.2f}"
            )
        packet_layer()
    finally:
        lab_down(plan.name, plan.root)


if __name__ == "__main__":
    main()
