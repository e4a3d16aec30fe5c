"""A mesh of N lab hosts defined by policy (one opportunistic connection per host, the
same on every host) against the same mesh enumerated (one trapped connection per peer,
N - 1 per host), in the same run: how long the first packet of each ordered pair waits
for its tunnel, how long until every pair has answered, and what each host holds.

Every host runs keywayd (userspace data plane, certificates for its address from one
CA, ECDSA P-384) and a UDP echo server; then all hosts at once send a datagram every
0.1 s to every other host until it answers. Both ends of each pair therefore initiate
together, as in a real mesh waking up; the surplus IKE SAs are settled by the engine.

Run as root from the repository root after the test suite has created .collections:
    .venv/bin/python bench/opportunistic_mesh.py [--hosts 30] [--runs 1]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))
sys.path.insert(0, str(ROOT))

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import lab_down, lab_up
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import plan_lab
from tests.fixtures.keywayd import Keywayd
from tests.fixtures.opportunistic import credentials, mesh
from tests.fixtures.traffic import echo_servers, first_answers


def enumerated(host, folder: Path, peers) -> dict:
    """The same mesh written out: a trapped transport connection to each peer."""
    template = mesh(host, folder, "private")["mesh"]
    connections = {}
    for peer in peers:
        conn = {k: v for k, v in template.items() if k not in ("opportunistic", "shunt_lifetime")}
        conn["remote_addrs"] = [peer.ipv4]
        conn["local"] = {**conn["local"], "id": host.ipv4}
        conn["remote"] = {**conn["remote"], "id": peer.ipv4}
        conn["children"] = {"host": {
            "mode": "transport", "esp_proposals": ["aes256gcm16"], "start_action": "trap",
            "local_ts": [f"{host.ipv4}/32"], "remote_ts": [f"{peer.ipv4}/32"],
        }}  # fmt: skip
        connections[peer.name] = conn
    return connections


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(kind: str, n: int) -> dict:
    plan = plan_lab(n, f"kwo{os.getpid() % 10000}", tempfile.mkdtemp(prefix="kwbench"))
    lab_up(plan)
    agents: list[Keywayd] = []
    try:
        work = Path(plan.root) / "bench"
        ca = pki.CertificateAuthority(work / "ca")
        ca.create("Keyway bench CA", 3650)
        for host in plan.hosts:
            folder = credentials(ca, host, work)
            peers = [p for p in plan.hosts if p is not host]
            config = (
                mesh(host, folder, "private")
                if kind == "opportunistic"
                else enumerated(host, folder, peers)
            )
            agents.append(Keywayd(host.netns, folder / "agent", config, log_level="info"))
        with echo_servers(plan.hosts), concurrent.futures.ThreadPoolExecutor(n) as pool:
            start = time.monotonic()
            waits = list(
                pool.map(
                    lambda h: first_answers(
                        h, [p.ipv4 for p in plan.hosts if p is not h], timeout=120
                    ),
                    plan.hosts,
                )
            )
            elapsed = time.monotonic() - start
        firsts = [w for row in waits for w in row if w is not None]
        policies = [len(a.ctl("list-policies")) for a in agents]
        sas = [len(a.sas()) for a in agents]
        return {
            "pairs": n * (n - 1),
            "answered": len(firsts),
            "median": statistics.median(firsts),
            "p90": statistics.quantiles(firsts, n=10)[-1],
            "max": max(firsts),
            "all_answered_s": elapsed,
            "connections": sum(len(a.ctl("list-conns")) for a in agents) / n,
            "policies": statistics.mean(policies),
            "ike_sas": statistics.mean(sas),
            "rss_mib": statistics.mean(rss_kib(a.process.pid) for a in agents) / 1024,
        }
    finally:
        for agent in agents:
            agent.stop()
        lab_down(plan.name, plan.root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=30)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(f"{args.hosts} hosts, every ordered pair sending at once")
    for n in range(args.runs):
        rows = {kind: run(kind, args.hosts) for kind in ("opportunistic", "enumerated")}
        print(f"run {n + 1}:")
        print(f"  {'':34} {'opportunistic':>14} {'enumerated':>12} {'ratio':>7}")
        for key, label in (
            ("answered", "pairs answered"),
            ("median", "first answer, median (s)"),
            ("p90", "first answer, 90th pct (s)"),
            ("max", "first answer, slowest (s)"),
            ("all_answered_s", "until every pair answered (s)"),
            ("connections", "connections per host (shown)"),
            ("policies", "policies per host"),
            ("ike_sas", "IKE SAs per host"),
            ("rss_mib", "keywayd RSS per host (MiB)"),
        ):
            a, b = rows["opportunistic"][key], rows["enumerated"][key]
            ratio = f"{a / b:7.2f}" if b else "      -"
            print(f"  {label:34} {a:14.3f} {b:12.3f} {ratio}")


if __name__ == "__main__":
    main()
