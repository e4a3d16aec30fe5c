"""Soak: two keywayd with N connections between them on short schedules (Child SA
rekeys, IKE SA rekeys, reauthentications), 10% of IKE datagrams dropped, bursts of
garbage at udp/500 and udp/4500, and counted UDP streams through a few of the tunnels,
for M minutes. Not part of `make test`.

Lab: three namespaces (plan_lab): h1 runs the initiating agent, h2 the responding one,
h3 sends the garbage. Connection i protects 10.100.0.i/32 (on h1) <-> 10.101.0.i/32 (on
h2), distinct identities; both ends keep the same schedules (IKE rekey 80 s, reauth
180 s, rand 20 s, over_time 90 s; Child rekey 45 s, life 90 s, rand 10 s). nftables in
h1 and h2 drops one in ten IKE datagrams (udp/500, udp/4500) they send to each other,
counted. Every 60 s h3 sends 1,000 garbage datagrams to each agent (tests.fixtures.flood).
Four connections carry a 50 packet/s stream of sequence-numbered datagrams, two each way.

Every 15 s it samples each keywayd: RSS and open fds (/proc), its log (lines, levels,
rekeys, reauthentications, warnings, errors, tracebacks), list-sas and status (IKE and
Child SAs per connection, which must be exactly one each: a count off in one sample only
is a make-before-break overlap; one that lasts 60 s or more, or is still there once the
run settles, is reported as persistent), the data plane's SAs and the plane's routes.

At the end it prints: duration, RSS and fd slopes per agent (least squares, whole run
and second half), log lines per minute, Child SA rekeys, IKE SA rekeys and
reauthentications seen, IKE datagrams dropped, each stream's sent/received/lost and its
longest gap, SA count anomalies, and WARNING/ERROR/traceback lines by message type.
Everything it made (namespaces, processes, nftables tables) goes, on Ctrl-C too;
Ctrl-C ends the soak early and still prints the figures gathered so far.

Run as root from the repository root after the test suite has created .collections:
    .venv/bin/python bench/soak.py [--minutes 30] [--connections 50]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))
sys.path.insert(0, str(ROOT))

from keywayd_setup import rss_kib, selector

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import ControlError
from ansible_collections.keyway.ipsec.plugins.module_utils.esp.tun import ROUTE_TABLE
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import (
    lab_down,
    lab_up,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import plan_lab
from tests.fixtures.keywayd import Keywayd, site_connection
from tests.fixtures.netns import in_netns

# over_time's default (10% of reauth_time: 18 s) would leave a rekey under 10% loss too
# few retransmissions (4 s, then x1.8) before the IKE SA is deleted: 90 s leaves five.
# rand_time is set too: its default is over_time, more than rekey_time here.
IKE_SCHEDULE = {"rekey_time": "80s", "reauth_time": "180s", "rand_time": "20s", "over_time": "90s"}
# life_time well above rekey_time for the same reason: a rekey that needs retransmits
# must not run into the hard limit.
CHILD_SCHEDULE = {"rekey_time": "45s", "life_time": "90s", "rand_time": "10s"}
LOSS_ONE_IN = 10
GARBAGE_EVERY, GARBAGE = 60.0, 1000
STREAMS, STREAM_GAP, STREAM_SIZE, STREAM_PORT = 4, 0.02, 200, 7200
SAMPLE_EVERY = 15.0
PERSISTENT = 60.0  # seconds a count may stay off before it is not an overlap
SETTLE_TIMEOUT = 120.0
NFT_TABLE = "keyway_soak"

# traffic.stream sends a fixed count and says only how many arrived; a soak needs
# streams that run for the whole soak and the timing of what was lost.
SENDER = """
import signal, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))
dst, gap, size = (sys.argv[2], int(sys.argv[3])), float(sys.argv[4]), int(sys.argv[6])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
sent = errors = 0
until = time.monotonic() + float(sys.argv[5])
due = time.monotonic()
while not stop and time.monotonic() < until:
    try:
        s.sendto(sent.to_bytes(4, "big") + bytes(size), dst)
    except OSError:
        errors += 1  # no route: a lost datagram like any other
    sent += 1
    due += gap  # an absolute schedule: a late wake-up does not lower the rate
    time.sleep(max(0.0, due - time.monotonic()))
time.sleep(1.0)
for _ in range(3):
    s.sendto(b"end", dst); time.sleep(0.1)
print(sent, errors, flush=True)
"""
RECEIVER = """
import json, signal, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
seen, dups, late = set(), 0, 0
first = last = None
top, gap, gap_at, gap_wall = -1, 0.0, 0.0, 0.0
print("ready", flush=True)
while not stop:
    try:
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        continue
    if data == b"end":
        break
    now, n = time.monotonic(), int.from_bytes(data[:4], "big")
    if n in seen:
        dups += 1
        continue
    seen.add(n)
    if first is None:
        first = now
    elif now - last > gap:
        gap, gap_at, gap_wall = now - last, last - first, time.time() - (now - last)
    last = now
    late += n < top
    top = max(top, n)
order = sorted(seen)
run = max((b - a - 1 for a, b in zip(order, order[1:])), default=0)
print(json.dumps({"received": len(seen), "duplicates": dups, "reordered": late,
                  "gap": gap, "gap_at": gap_at, "gap_wall": gap_wall, "run": run}), flush=True)
"""

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) (\S+): (.*)$")
# What each end logs (agent/daemon.py) for the events the soak counts.
EVENTS = {
    "Child SA rekeys": "Child SA rekeyed:",
    "Child SAs installed (not rekeys)": "Child SA installed:",
    "Child SAs deleted": "Child SA deleted",
    "Child SAs lost, made again": "Child SA lost",
    "Child SA hard limits": "hit its hard limit",
    "IKE SA rekeys due (this end starts)": "IKE SA rekey due",
    "IKE SA rekeys": "IKE SA rekeyed (",
    "reauthentications due (this end starts)": "reauthentication due",
    "IKE SAs up (first + reauthentications)": "IKE SA up with",
    "IKE SAs down": "IKE SA down:",
    "initiations": "] initiating",
    "garbage datagrams logged": "dropped datagram from",
}


def normalise(message: str) -> str:
    """A message's type: connection names, SPIs, addresses and numbers blanked."""
    message = re.sub(r"\[[^\]]*\]", "[*]", message)
    message = re.sub(r"\b\d{1,3}(\.\d{1,3}){3}(/\d+)?(:\d+)?\b", "<addr>", message)
    message = re.sub(r"\b[0-9a-f]{16}_[ir]\b", "<spi>", message)  # the trace's IKE SPIs
    message = re.sub(r"\b[0-9a-f]{8,}\b", "<hex>", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


class LogReader:
    """keywayd's log read as it grows: lines by level, events, problems by type."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""
        self.lines = 0
        self.levels: collections.Counter[str] = collections.Counter()
        self.events: collections.Counter[str] = collections.Counter()
        self.problems: collections.Counter[str] = collections.Counter()
        self.types: collections.Counter[str] = collections.Counter()
        self._traceback = False

    def read(self) -> None:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        for raw in complete:
            self._line(raw.decode(errors="replace"))

    def _line(self, line: str) -> None:
        self.lines += 1
        match = LOG_LINE.match(line)
        if match is None:  # a traceback's lines: its last unindented line names it
            if line.startswith("Traceback"):
                self._traceback = True
            elif self._traceback and line and not line.startswith((" ", "During", "The ")):
                self.problems[f"Traceback {normalise(line)}"] += 1
                self._traceback = False
            return
        self._traceback = False
        level, _unused, message = match.groups()
        self.levels[level] += 1
        for label, text in EVENTS.items():
            if text in message:
                self.events[label] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            self.problems[f"{level} {normalise(message)}"] += 1
        else:
            self.types[f"{level} {normalise(message)}"] += 1

    def above_debug(self) -> int:
        return self.lines - self.levels["DEBUG"]


def clock(wall: float) -> str:
    """A wall-clock time as the agents' logs write it, to find what happened then."""
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def run_ip(netns: str, batch: str) -> None:
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True)


def nft(netns: str, *args: str, script: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        input=script, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} in {netns}: {proc.stderr.strip()}")
    return proc.stdout


def drop_ike(host, peer) -> None:
    """Drop one in LOSS_ONE_IN IKE datagrams `host` sends to `peer`, counting them all."""
    ike = f"ip daddr {peer.ipv4} udp dport {{ 500, 4500 }}"
    nft(host.netns, "-f", "-", script=(
        f"table inet {NFT_TABLE} {{\n chain out {{\n"
        "  type filter hook output priority 0; policy accept;\n"
        f"  {ike} counter\n"
        f"  {ike} numgen random mod {LOSS_ONE_IN} == 0 counter drop\n }}\n}}\n"
    ))  # fmt: skip


def ike_counts(host) -> tuple[int, int]:
    """(IKE datagrams `host` sent to its peer, how many of them were dropped)."""
    listing = nft(host.netns, "list", "table", "inet", NFT_TABLE)
    sent, dropped = (int(n) for n in re.findall(r"counter packets (\d+)", listing))
    return sent, dropped


def soak_connections(me, peer, side: int, n: int) -> dict:
    """N connections from `me` to `peer`: distinct identities and /32 selectors (as in
    keywayd_setup), the soak's schedules on both ends; side 0 initiates."""
    mine, theirs = ("a", "b") if side == 0 else ("b", "a")
    conns = {}
    for i in range(n):
        conn = site_connection(me, peer, start=side == 0, **CHILD_SCHEDULE)
        conn.update(
            IKE_SCHEDULE, local={"id": f"{mine}{i}.soak"}, remote={"id": f"{theirs}{i}.soak"}
        )
        child = conn["children"]["sites"]
        child["local_ts"], child["remote_ts"] = [selector(i + 1, side)], [selector(i + 1, 1 - side)]
        conns[f"c{i}"] = conn
    return conns


def in_netns_popen(netns: str, script: str, *args: str) -> subprocess.Popen:
    # A session of its own: a Ctrl-C on the terminal must not kill a stream before it
    # has said what it counted (the soak stops it with SIGTERM).
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


class Stream:
    """A sequence-numbered UDP stream through connection c<index>, src -> dst."""

    def __init__(self, index: int, src, dst, src_side: int, port: int, seconds: float):
        self.name, self.way = f"c{index}", f"{src.name}->{dst.name}"
        src_addr = selector(index + 1, src_side).split("/")[0]
        dst_addr = selector(index + 1, 1 - src_side).split("/")[0]
        self.receiver = in_netns_popen(dst.netns, RECEIVER, dst_addr, str(port))
        self.sender: subprocess.Popen | None = None
        if self.receiver.stdout.readline().strip() != "ready":
            raise RuntimeError(f"stream receiver in {dst.netns} did not start")
        self.sender = in_netns_popen(
            src.netns, SENDER, src_addr, dst_addr, str(port), str(STREAM_GAP), str(seconds),
            str(STREAM_SIZE),
        )  # fmt: skip

    def stop(self) -> None:
        for proc in (self.sender, self.receiver):
            if proc is not None and proc.poll() is None:
                proc.terminate()

    def result(self, timeout: float) -> dict:
        """What the sender sent and the receiver counted (senders end on their own)."""
        result = {"sent": None, "send_errors": None}
        try:
            out, _ = self.sender.communicate(timeout=timeout)
            result["sent"], result["send_errors"] = (int(x) for x in out.split())
        except (subprocess.TimeoutExpired, ValueError):
            self.sender.kill()
            self.sender.communicate()
        try:  # the sender's "end" ends the receiver; SIGTERM if all three were lost
            out, _ = self.receiver.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.receiver.terminate()
            out, _ = self.receiver.communicate(timeout=10)
        with contextlib.suppress(ValueError, IndexError):
            result.update(json.loads(out.strip().splitlines()[-1]))
        return result

    def kill(self) -> None:
        for proc in (self.sender, self.receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


class Garbage(threading.Thread):
    """Every GARBAGE_EVERY s, GARBAGE datagrams from `source` to each target's udp/500
    and udp/4500 (half each, some behind the non-ESP marker): tests.fixtures.flood."""

    def __init__(self, source, targets):
        super().__init__(daemon=True)
        self.source, self.targets = source, targets
        self.done = threading.Event()
        self.bursts = self.datagrams = 0
        self.failures: list[str] = []

    def run(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT / ".collections"))
        while not self.done.wait(GARBAGE_EVERY):
            for target in self.targets:
                spec = {
                    "local": self.source.ipv4, "peer": target.ipv4,
                    "local_id": f"{self.source.name}.soak", "remote_id": f"{target.name}.soak",
                    "local_ts": self.source.site4, "remote_ts": target.site4,
                    "attempts": 0, "garbage": GARBAGE,
                }  # fmt: skip
                try:
                    proc = in_netns(
                        self.source.netns, sys.executable, "-m", "tests.fixtures.flood",
                        json.dumps(spec), cwd=ROOT, env=env, timeout=120,
                    )  # fmt: skip
                except subprocess.TimeoutExpired:
                    self.failures.append(f"burst to {target.name} timed out")
                    continue
                if proc.returncode == 0:
                    self.datagrams += json.loads(proc.stdout)["garbage"]
                elif not self.done.is_set():  # not the lab going away under it
                    self.failures.append(f"burst to {target.name}: {proc.stderr[-300:]}")
            self.bursts += 1


class Watched:
    """One keywayd under the soak: its samples and its log."""

    def __init__(self, name: str, agent: Keywayd, host, n: int):
        self.name, self.agent, self.host, self.n = name, agent, host, n
        self.log = LogReader(agent.log_path)
        self.samples: list[dict] = []
        self.lines_at_start = self.above_debug_at_start = 0

    def sample(self, t: float) -> dict:
        pid = self.agent.process.pid
        listed = self.agent.ctl("list-sas", timeout=60)
        status = self.agent.ctl("status", timeout=60)
        ike: collections.Counter[str] = collections.Counter()
        child: collections.Counter[str] = collections.Counter()
        pending = 0
        for sa in listed:
            if sa["state"] == "established":
                ike[sa["connection"]] += 1
            else:
                pending += 1  # IKE_SA_INIT/IKE_AUTH under way: a reauthentication's new SA
            child[sa["connection"]] += len(sa["children"])
        routes = subprocess.run(
            ["ip", "-4", "-n", self.host.netns, "route", "show", "table", str(ROUTE_TABLE)],
            capture_output=True, text=True, check=False,
        ).stdout.count("\n")  # fmt: skip
        self.log.read()
        sample = {
            "t": t,
            "rss": rss_kib(pid),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "ike": ike,
            "child": child,
            "pending": pending,
            "half_open": status["half_open"],
            "child_sas": status["child_sas"],
            # inbound SAs of rekeyed children stay DELETE_REKEYED_DELAY (5 s) for
            # stragglers: a few above 2 per Child SA is normal, a growing floor is not
            "plane_surplus": status["dataplane_sas"] - 2 * status["child_sas"],
            "routes": routes,
            "lines": self.log.lines,
        }
        return sample

    def offs(self, sample: dict) -> dict[tuple[str, str], int]:
        """What in `sample` is not exactly one IKE SA and one Child SA per connection,
        and one route per connection in the plane's table."""
        out = {}
        for i in range(self.n):
            conn = f"c{i}"
            if sample["ike"][conn] != 1:
                out[(self.name, f"{conn} IKE SAs")] = sample["ike"][conn]
            if sample["child"][conn] != 1:
                out[(self.name, f"{conn} Child SAs")] = sample["child"][conn]
        if sample["routes"] != self.n:
            out[(self.name, "routes")] = sample["routes"]
        return out


class Runs:
    """Consecutive samples in which something was off, per (agent, what)."""

    def __init__(self):
        self.open: dict[tuple[str, str], dict] = {}
        self.closed: list[dict] = []
        self.samples = self.off_samples = 0
        self.soak_samples = self.soak_off = 0  # the soak's own, not the settling polls

    def observe(self, t: float, offs: dict[tuple[str, str], int]) -> None:
        self.samples += 1
        self.off_samples += bool(offs)
        for key, value in offs.items():
            run = self.open.setdefault(key, {"key": key, "first": t, "samples": 0, "values": set()})
            run["last"] = t
            run["samples"] += 1
            run["values"].add(value)
        for key in [k for k in self.open if k not in offs]:
            self.closed.append(self.open.pop(key))


def slope(samples: list[dict], field: str) -> float:
    """Least-squares slope of `field` per minute."""
    xs, ys = [s["t"] / 60 for s in samples], [s[field] for s in samples]
    if len(xs) < 2 or len(set(xs)) < 2:
        return float("nan")
    return statistics.linear_regression(xs, ys).slope


def wait_established(
    watched: list[Watched], runs: Runs | None, timeout: float, t0: float = 0.0
) -> float | None:
    """Seconds until both ends hold exactly one IKE SA and one Child SA per connection
    (polled; each poll is fed to `runs`, timed from `t0`), or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        offs = {}
        for w in watched:
            offs.update(w.offs(w.sample(now - t0)))
        if runs is not None:
            runs.observe(now - t0, offs)
        if not offs:
            return now - start
        time.sleep(1.0)
    return None


def wait_each_exact(watched: list[Watched], runs: Runs, timeout: float, t0: float) -> float | None:
    """Seconds until every connection has been seen exact at both ends (one IKE SA, one
    Child SA each) at some poll, and the routes too, or None. Each, not all at once:
    the schedules go on after the soak, and with 50 connections rekeying every 40 s or
    so some make-before-break overlap is almost always under way somewhere."""
    start = time.monotonic()
    pending = {f"c{i}" for i in range(watched[0].n)} | {"routes"}
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        offs = {}
        for w in watched:
            offs.update(w.offs(w.sample(now - t0)))
        runs.observe(now - t0, offs)
        off_now = {what.split(" ")[0] for _agent, what in offs}
        pending -= {key for key in pending if key not in off_now}
        if not pending:
            return now - start
        time.sleep(1.0)
    return None


def soak(args: argparse.Namespace, plan, root: Path, started: dict) -> None:
    n, seconds = args.connections, args.minutes * 60
    h1, h2, h3 = plan.hosts
    for side, host, peer in ((0, h1, h2), (1, h2, h1)):
        # The selectors' addresses on the hosts: the streams' ends bind to them.
        run_ip(host.netns, "".join(f"address add {selector(i + 1, side)} dev site0\n"
                                   for i in range(n)))  # fmt: skip
        drop_ike(host, peer)
    print(
        f"soak: {n} connections h1 <-> h2, {args.minutes:g} min; IKE {IKE_SCHEDULE}, Child "
        f"{CHILD_SCHEDULE}; 1 in {LOSS_ONE_IN} IKE datagrams dropped; {GARBAGE} garbage "
        f"datagrams to each agent every {GARBAGE_EVERY:g} s; {STREAMS} streams at "
        f"{1 / STREAM_GAP:g} packets/s; samples every {SAMPLE_EVERY:g} s",
        flush=True,
    )
    agents = started["agents"]
    responder = Keywayd(h2.netns, root / "h2", soak_connections(h2, h1, 1, n), timeout=60)
    agents.append(responder)
    t_launch = time.monotonic()
    initiator = Keywayd(h1.netns, root / "h1", soak_connections(h1, h2, 0, n), timeout=60)
    agents.append(initiator)
    watched = [Watched("h1", initiator, h1, n), Watched("h2", responder, h2, n)]
    up = wait_established(watched, None, 300)
    if up is None:
        raise SystemExit(f"not all {n} connections up within 300 s:\n{initiator.log()[-3000:]}")
    print(f"all {n} up at both ends {time.monotonic() - t_launch:.1f} s after start", flush=True)

    t0 = time.monotonic()
    for w in watched:
        w.log.read()
        w.lines_at_start, w.above_debug_at_start = w.log.lines, w.log.above_debug()
    streams = started["streams"]
    for k in range(min(STREAMS, n)):
        index, forward = k * n // min(STREAMS, n), k % 2 == 0
        src, dst = (h1, h2) if forward else (h2, h1)
        streams.append(Stream(index, src, dst, 0 if forward else 1, STREAM_PORT + k, seconds))
    garbage = started["garbage"] = Garbage(h3, (h1, h2))
    garbage.start()
    runs = Runs()
    interrupted = died = None
    next_sample = t0
    try:
        while True:  # a sample at 0 (before the first rekey), then every SAMPLE_EVERY s
            t = time.monotonic() - t0
            offs, line = {}, [f"{t / 60:5.1f} min"]
            for w in watched:
                if w.agent.process.poll() is not None:
                    raise ControlError(f"{w.name}'s keywayd exited {w.agent.process.returncode}")
                s = w.sample(t)
                w.samples.append(s)
                offs.update(w.offs(s))
                line.append(
                    f"{w.name}: {s['rss'] / 1024:6.1f} MiB {s['fds']:3d} fds "
                    f"{sum(s['ike'].values()):3d} IKE {s['child_sas']:3d} Child "
                    f"plane+{s['plane_surplus']}"
                )
            runs.observe(t, offs)
            line.append(f"off: {len(offs)}" if offs else "exact")
            print("  ".join(line), flush=True)
            if next_sample >= t0 + seconds:
                break
            next_sample = min(next_sample + SAMPLE_EVERY, t0 + seconds)
            time.sleep(max(0.0, next_sample - time.monotonic()))
    except KeyboardInterrupt:
        interrupted = time.monotonic() - t0
        print(f"interrupted after {interrupted / 60:.1f} min: figures so far", flush=True)
    except ControlError as exc:  # an agent gone or not answering: that is a finding
        died = str(exc)
        print(f"{died}: figures so far", flush=True)
    duration = time.monotonic() - t0
    garbage.done.set()
    for stream in streams:
        if interrupted is not None or died is not None:
            stream.stop()  # a stopped sender still sends its "end" and reports
    results = [(stream, stream.result(timeout=60)) for stream in streams]
    garbage.join(timeout=150)
    runs.soak_samples, runs.soak_off = runs.samples, runs.off_samples
    settled = None
    if interrupted is None and died is None:
        settled = wait_each_exact(watched, runs, SETTLE_TIMEOUT, t0)
        for w in watched:
            w.log.read()
    report(args, watched, runs, results, garbage, duration, settled, interrupted, died)
    if interrupted is None:
        for w in watched:
            code = w.agent.stop(timeout=60)
            w.log.read()
            tail = w.agent.log().splitlines()[-20:]
            stopped = any("keywayd stopped" in line for line in tail)
            print(f"{w.name}: keywayd exit code {code} on SIGTERM, 'keywayd stopped' logged: "
                  f"{stopped}")  # fmt: skip
            if code != 0 or not stopped:  # what it said last, the log goes with the lab
                print("\n".join(f"    {line}" for line in tail))


def report(
    args: argparse.Namespace,
    watched: list[Watched],
    runs: Runs,
    results: list[tuple[Stream, dict]],
    garbage: Garbage,
    duration: float,
    settled: float | None,
    interrupted: float | None,
    died: str | None,
) -> None:
    minutes = duration / 60
    cut = " (interrupted)" if interrupted is not None else f" ({died})" if died else ""
    print(f"\n== {minutes:.1f} min soak, {args.connections} connections{cut}")
    print(f"{'':52}" + "".join(f"{w.name:>16}" for w in watched))

    def row(label: str, value) -> None:
        """One figure per agent: value(w) for each watched agent."""
        print(f"{label:52}" + "".join(f"{value(w)!s:>16}" for w in watched))

    def halves(w: Watched) -> tuple[list[dict], list[dict]]:
        first = [s for s in w.samples if s["t"] < duration / 2]
        return first, w.samples[len(first) :]

    def spread(samples: list[dict], field: str) -> str:
        values = [s[field] for s in samples]
        return f"{min(values)}..{max(values)}" if values else "-"

    def peak_lines(w: Watched) -> str:
        pairs = zip(w.samples, w.samples[1:], strict=False)
        rates = [(b["lines"] - a["lines"]) * 60 / (b["t"] - a["t"]) for a, b in pairs]
        return f"{max(rates, default=0):.0f}"

    def ike_loss(w: Watched) -> str:
        sent, dropped = ike_counts(w.host)
        return f"{sent}/{dropped} {100 * dropped / max(sent, 1):.1f}%"

    if not all(w.samples for w in watched):
        print("(no samples)")
        return
    row("RSS at start / end (kB)", lambda w: f"{w.samples[0]['rss']}/{w.samples[-1]['rss']}")
    row("RSS slope, whole run (kB/min)", lambda w: f"{slope(w.samples, 'rss'):+.1f}")
    row("RSS slope, second half (kB/min)", lambda w: f"{slope(halves(w)[1], 'rss'):+.1f}")
    row("open fds at start / end", lambda w: f"{w.samples[0]['fds']}/{w.samples[-1]['fds']}")
    row("fd slope, whole run (/min)", lambda w: f"{slope(w.samples, 'fds'):+.2f}")
    row("fd slope, second half (/min)", lambda w: f"{slope(halves(w)[1], 'fds'):+.2f}")
    row(
        "log lines/min (all; the agents run at debug)",
        lambda w: f"{(w.log.lines - w.lines_at_start) / minutes:.0f}",
    )
    row(
        "log lines/min at info and above",
        lambda w: f"{(w.log.above_debug() - w.above_debug_at_start) / minutes:.1f}",
    )
    row("log lines/min, most in one sample interval", peak_lines)
    print("seen in the logs (each end logs its side of every event; setup included):")
    for label in EVENTS:
        row(f"  {label}", lambda w, label=label: w.log.events[label])
    row("IKE datagrams to the peer / dropped", ike_loss)
    row("most half-open IKE SAs in a sample", lambda w: max(s["half_open"] for s in w.samples))
    row("most IKE SAs being set up in a sample", lambda w: max(s["pending"] for s in w.samples))
    row("plane SAs above 2 per Child SA, 1st half", lambda w: spread(halves(w)[0], "plane_surplus"))
    row("plane SAs above 2 per Child SA, 2nd half", lambda w: spread(halves(w)[1], "plane_surplus"))
    row("routes in the plane's table", lambda w: spread(w.samples, "routes"))
    print(f"garbage: {garbage.bursts} bursts, {garbage.datagrams} datagrams"
          + (f"; failures: {garbage.failures}" if garbage.failures else ""))  # fmt: skip

    print(f"streams ({1 / STREAM_GAP:g} packets/s, {STREAM_SIZE + 4}-byte datagrams):")
    total_sent = total_lost = 0
    longest = 0.0
    for stream, r in results:
        if r["sent"] is None or "received" not in r:
            print(f"  {stream.name} {stream.way}: no result ({r})")
            continue
        lost = r["sent"] - r["received"]
        total_sent, total_lost = total_sent + r["sent"], total_lost + lost
        longest = max(longest, r["gap"])
        print(
            f"  {stream.name} {stream.way}: sent {r['sent']}, received {r['received']}, lost "
            f"{lost} ({100 * lost / max(r['sent'], 1):.2f}%), longest gap {r['gap'] * 1000:.0f} "
            f"ms ({r['gap_at']:.0f} s in, from {clock(r['gap_wall'])}), most lost in a row "
            f"{r['run']}, duplicates {r['duplicates']}, reordered {r['reordered']}, send errors "
            f"{r['send_errors']}"
        )
    print(f"  all: sent {total_sent}, lost {total_lost}, longest gap {longest * 1000:.0f} ms")

    print(
        f"SA counts (one IKE SA, one Child SA, one route per connection at each end): "
        f"{runs.soak_samples} samples in the soak, {runs.soak_off} with something off"
    )
    finished = [dict(r, open=False) for r in runs.closed]
    finished += [dict(r, open=True) for r in runs.open.values()]
    overlaps = [r for r in finished if not r["open"] and r["last"] - r["first"] < PERSISTENT
                and 0 not in r["values"]]  # fmt: skip
    # "c3 IKE SAs" -> IKE, "c3 Child SAs" -> Child, "routes" -> routes
    kinds = collections.Counter((r["key"][1].split()[-2:] * 2)[0] for r in overlaps)
    print(
        f"  transient surpluses (make-before-break, gone within {PERSISTENT:g} s): "
        f"{len(overlaps)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or '-'}), "
        f"lasting at most {max((r['last'] - r['first'] for r in overlaps), default=0):.0f} s "
        f"between samples that saw them"
    )
    odd = [r for r in finished if r not in overlaps]
    for r in odd:
        why = "still off at the end" if r["open"] else (
            "missing" if 0 in r["values"] else "persistent"
        )  # fmt: skip
        print(
            f"  {why}: {r['key'][0]} {r['key'][1]} = {sorted(r['values'])}, seen from "
            f"{r['first']:.0f} s to {r['last']:.0f} s"
        )
    if not odd:
        print("  no missing, persistent or lasting count")
    if interrupted is None and died is None:
        print(
            f"  each connection exact at both ends within {settled:.1f} s after the soak"
            if settled is not None
            else f"  NOT each connection exact at both ends within {SETTLE_TIMEOUT:g} s "
            "after the soak"
        )

    print("other log lines by message type (setup included):")
    types = collections.Counter()
    for w in watched:
        types.update({f"{w.name} {m}": c for m, c in w.log.types.items()})
    for message, count in sorted(types.items(), key=lambda item: item[0][3:]):
        print(f"  {message[:2]} {count:6d}x {message[3:]}")
    print("WARNING, ERROR and Traceback lines by message type:")
    problems = [(w.name, m, c) for w in watched for m, c in w.log.problems.most_common()]
    for name, message, count in problems:
        print(f"  {name} {count:6d}x {message}")
    if not problems:
        print("  none")


def cleanup(plan, root: Path, started: dict, logs: Path | None) -> None:
    """Remove what the soak made, whatever state it got to (the logs copied first)."""
    if started["garbage"] is not None:
        started["garbage"].done.set()
    for stream in started["streams"]:
        stream.kill()
    for agent in started["agents"]:
        with contextlib.suppress(Exception):
            agent.stop()
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        for agent in started["agents"]:
            with contextlib.suppress(OSError):
                shutil.copy(agent.log_path, logs / f"{agent.workdir.name}-keywayd.log")
    for host in plan.hosts[:2]:
        with contextlib.suppress(RuntimeError):
            nft(host.netns, "delete", "table", "inet", NFT_TABLE)
    lab_down(plan.name, plan.root)  # also ends anything still running in the namespaces
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--connections", type=int, default=50, help="connections (default 50)")
    parser.add_argument("--logs", type=Path, help="copy the agents' logs into this folder")
    args = parser.parse_args()
    if not 1 <= args.connections <= 250:
        parser.error("--connections: 1 to 250 (one 10.10x.0.0/24 address each)")
    if os.geteuid() != 0:
        raise SystemExit("the soak needs root (network namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the lab is taken down
    root = Path(tempfile.mkdtemp(prefix="kw-soak-"))
    plan = plan_lab(3, f"soak{os.getpid() % 0x10000:04x}", str(root / "lab"))
    started: dict = {"agents": [], "streams": [], "garbage": None}
    try:
        lab_up(plan)
        soak(args, plan, root, started)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop cleanup
        cleanup(plan, root, started, args.logs)


if __name__ == "__main__":
    main()
