"""IKE SA + Child SA setups per second between two keywayd, and between two charons
driven the same way in the same run (PSK, x25519, AES-GCM), as a ratio; and the
responder's memory per established SA.

Each side holds N connections to the other (distinct identities and /32 selectors); the
initiator starts them all at once (`start_action: start`, loaded on start), and the
clock runs from the initiator's start (keywayd: process spawn, Python start-up
included; charon: `swanctl --load-all`) until the responder holds N Child SAs. Memory is
the responder's RSS once all are up, minus its RSS with the same config loaded and no
SA. keywayd uses its userspace data plane and charon its kernel-libipsec (this kernel has
no ESP), so both install real SAs, policies and a route per Child SA (each /32 selector
address is assigned on the hosts: libipsec's routes need a local source inside it).

Run as root from the repository root after the test suite has created .collections:
    .venv/bin/python bench/keywayd_setup.py [N ...]      (default: 1000)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))
sys.path.insert(0, str(ROOT))

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    ControlError,
    request,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import (
    lab_down,
    lab_up,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import plan_lab

ENTRY = "ansible_collections.keyway.ipsec.plugins.module_utils.agent.keywayd"
PSK = "bench-psk-0123456789abcdef"
IKE, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
# keywayd's defaults: cookies above 100 half-open SAs, no per-peer cap.
CHARON_LIMITS = "block_threshold = 1000000\n cookie_threshold = 100"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def selector(n: int, side: int) -> str:
    return f"10.{100 + side}.{n >> 8 & 255}.{n & 255}/32"


def keywayd_config(me, peer, n: int, initiator: bool, folder: Path) -> Path:
    import yaml

    side = 0 if initiator else 1
    conns = {}
    for i in range(n):
        conns[f"c{i}"] = {
            "local_addrs": [me.ipv4],
            "remote_addrs": [peer.ipv4],
            "local": {"id": f"{'i' if initiator else 'r'}{i}.bench"},
            "remote": {"id": f"{'r' if initiator else 'i'}{i}.bench"},
            "psk": PSK,
            "proposals": [IKE],
            "dpd_delay": 0,
            "keyingtries": 0,
            "children": {
                "c": {
                    "local_ts": [selector(i, side)],
                    "remote_ts": [selector(i, 1 - side)],
                    "esp_proposals": [ESP],
                    "start_action": "start" if initiator else "none",
                }
            },
        }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "keywayd.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(
            {
                "dataplane": "userspace",
                "log_level": "warning",
                "control_socket": str(folder / "keywayd.sock"),
                "connections": conns,
            },
            handle,
        )
    return path


def start_keywayd(netns: str, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", ENTRY, "--config", str(config)],
        env=env,
        stderr=open(config.parent / "keywayd.log", "wb"),
    )


def wait_keywayd(socket: str, proc: subprocess.Popen, want: int | None, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keywayd exited {proc.returncode}")
        try:
            status = request(socket, "status", timeout=60)
            if want is None or status["child_sas"] >= want:
                return time.monotonic()
        except ControlError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"keywayd: not {want} child SAs within {timeout} s")


def keywayd_run(h1, h2, n: int, folder: Path) -> tuple[float, float]:
    responder_conf = keywayd_config(h2, h1, n, False, folder / "r")
    initiator_conf = keywayd_config(h1, h2, n, True, folder / "i")
    responder = start_keywayd(h2.netns, responder_conf)
    initiator = None
    try:
        wait_keywayd(str(folder / "r/keywayd.sock"), responder, None, 120)
        baseline = rss_kib(responder.pid)
        t0 = time.monotonic()
        initiator = start_keywayd(h1.netns, initiator_conf)
        t1 = wait_keywayd(str(folder / "r/keywayd.sock"), responder, n, 30 + n * 0.1)
        return t1 - t0, (rss_kib(responder.pid) - baseline) / n
    finally:
        for proc in (initiator, responder):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=120)


def charon_conf(me, peer, n: int, initiator: bool) -> str:
    side = 0 if initiator else 1
    start = "start_action = start" if initiator else ""
    conns, secrets = [], []
    for i in range(n):
        mine, theirs = (
            (f"i{i}.bench", f"r{i}.bench") if initiator else (f"r{i}.bench", f"i{i}.bench")
        )
        conns.append(
            f"c{i} {{ version = 2\n local_addrs = {me.ipv4}\n remote_addrs = {peer.ipv4}\n"
            f" proposals = {IKE}\n keyingtries = 0\n local {{ auth = psk\n id = {mine} }}\n"
            f" remote {{ auth = psk\n id = {theirs} }}\n children {{ c {{"
            f" local_ts = {selector(i, side)}\n remote_ts = {selector(i, 1 - side)}\n"
            f" esp_proposals = {ESP}\n {start} }} }} }}"
        )
    secrets.append(f'ike-all {{ secret = "{PSK}" }}')
    return "connections {\n" + "\n".join(conns) + "\n}\nsecrets {\n" + "\n".join(secrets) + "\n}\n"


def charon_child_sas(charon) -> int:
    """Established IKE SAs per `swanctl --stats`; -1 when charon is too busy to say."""
    try:
        out = charon.swanctl("--stats", timeout=30)
    except (subprocess.TimeoutExpired, RuntimeError):
        return -1
    for line in out.splitlines():
        if line.strip().startswith("IKE_SAs:"):
            total, half = line.split(":")[1].split(",")
            return int(total.split()[0]) - int(half.split()[0])
    return 0


def charon_run(h1, h2, n: int, folder: Path) -> tuple[float, float]:
    from tests.fixtures.strongswan import Charon

    charons = []
    try:
        responder = Charon(h2.netns, folder / "r")
        responder.folder.mkdir(parents=True)
        # charon refuses more than 5 half-open IKE SAs from one address by default
        # (block_threshold): lifted, as keywayd has no such per-peer limit.
        responder.write_config(
            charon_conf(h2, h1, n, False), ike_log_level=0, charon_settings=CHARON_LIMITS
        )
        responder.start(load_timeout=60 + n / 10)
        charons.append(responder)
        baseline = rss_kib(responder.process.pid)
        initiator = Charon(h1.netns, folder / "i")
        initiator.folder.mkdir(parents=True)
        # Loaded on start by the fixture (--load-all): the clock includes that.
        initiator.write_config(
            charon_conf(h1, h2, n, True), ike_log_level=0, charon_settings=CHARON_LIMITS
        )
        t0 = time.monotonic()
        initiator.start(load_timeout=60 + n / 10)
        charons.append(initiator)
        deadline = time.monotonic() + 30 + n * 0.1
        # Until all are up, or nothing moved for 20 s (then the count reached is said).
        up, t1 = 0, time.monotonic()
        while up < n and time.monotonic() < deadline:
            now_up = charon_child_sas(responder)  # cheap: established IKE SAs
            if now_up > up:
                up, t1 = now_up, time.monotonic()
            elif now_up >= 0 and time.monotonic() - t1 >= 20:
                break  # it answered, and nothing moved (too busy to answer is no stall)
            time.sleep(0.05)
        children = responder.swanctl("--list-sas", "--raw").count("state=INSTALLED")
        if up < n or children < n:
            print(f"       charon: {up} IKE SAs, {children} Child SAs of {n}; the rest stalled")
        return (t1 - t0) * n / max(up, 1), (rss_kib(responder.process.pid) - baseline) / max(up, 1)
    finally:
        for charon in reversed(charons):
            charon.stop()


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [1000]
    plan = plan_lab(2, f"kwb{os.getpid() % 10000}", tempfile.mkdtemp(prefix="kwbench"))
    lab_up(plan)
    h1, h2 = plan.hosts
    for side, host in enumerate((h1, h2)):
        batch = "".join(f"addr add {selector(i, side)} dev site0\n" for i in range(max(counts)))
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "ip", "-batch", "-"],
            input=batch,
            text=True,
            check=True,
        )
    try:
        print(f"IKE SA + Child SA setups, PSK, {IKE}, ESP {ESP}; 2 cores shared by both ends")
        print(f"{'N':>6} {'daemon':>8} {'seconds':>8} {'setups/s':>9} {'KiB/SA':>7}")
        for n in counts:
            results = {}
            with tempfile.TemporaryDirectory(prefix="kwbench") as tmp:
                for name, run in (("keywayd", keywayd_run), ("charon", charon_run)):
                    seconds, per_sa = results[name] = run(h1, h2, n, Path(tmp) / name)
                    print(f"{n:>6} {name:>8} {seconds:>8.2f} {n / seconds:>9.1f} {per_sa:>7.1f}")
            ratio = results["charon"][0] / results["keywayd"][0]
            mem = results["keywayd"][1] / max(results["charon"][1], 0.001)
            print(f"{n:>6} keywayd/charon: setup rate {ratio:.2f}, memory per SA {mem:.1f}x")
    finally:
        lab_down(plan.name, plan.root)


if __name__ == "__main__":
    main()
