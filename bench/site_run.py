"""site.yml at scale: wall times of real ansible-playbook runs against netns labs of
N hosts in a full mesh, against a no-op play on the same hosts in the same run; and the
controller-side intent for large meshes without running any host.

For each lab size it prints the first run, the time from the end of that run until
every host's connections are established, the second run (nothing to change), a no-op
play that gathers facts, and second run / no-op as a ratio (the goal is at most 1.5).
For each intent size it prints the seconds to compute, validate and render every host's
connections and PSK references through the keyway.ipsec.intent filter.

Run as root from the repository root after `make test` or `make demo` made .venv and
.collections:
    .venv/bin/python bench/site_run.py [--hosts 5,10,20,40] [--intent 100,1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.keyway.ipsec.plugins.filter.intent import FilterModule
from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import (
    lab_down,
    lab_up,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import (
    plan_lab,
)

# The lab inventory's own topologies need the demo's strongSwan partner; the bench
# measures a plain full mesh of every lab host.
MESH = """
keyway_topologies:
  - {name: mesh, type: mesh, members: lab}
"""
NOOP = """
- name: No-op with facts
  hosts: all
  gather_facts: true
  tasks:
    - name: Nothing
      ansible.builtin.meta: noop
"""


def intent_seconds(hosts: int) -> tuple[float, int]:
    hostvars = {
        f"h{i}": {
            "keyway_address": f"10.{i >> 8}.{i & 255}.1",
            "keyway_sites": [f"172.{16 + (i >> 8)}.{i & 255}.0/24"],
        }
        for i in range(1, hosts + 1)
    }
    groups = {"all": list(hostvars), "mesh": list(hostvars)}
    intent = FilterModule().filters()["intent"]
    start = time.perf_counter()
    result = intent(
        hostvars, groups, [{"name": "m", "type": "mesh", "members": "mesh"}],
        master_secret_length=48,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    return elapsed, len(result["links"])


def playbook(plan, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "KEYWAY_LAB"))}
    env.pop("PYTHONPATH", None)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".collections"),
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        KEYWAY_LAB_NAME=plan.name,
        KEYWAY_LAB_ROOT=plan.root,
        KEYWAY_LAB_HOSTS=str(len(plan.hosts)),
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(ROOT / "inventory/lab"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        why = "\n".join(line for line in proc.stdout.splitlines() if "msg:" in line)
        raise SystemExit(f"{args[-1]} failed:\n{why[-4000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def all_established(plan) -> bool:
    for host in plan.hosts:
        conns = control.request(f"{host.run_dir}/keywayd.sock", "list-conns")
        if len(conns) != len(plan.hosts) - 1 or any(c["state"] != "established" for c in conns):
            return False
    return True


def lab_figures(size: int, noop: Path, mesh: Path) -> None:
    root = tempfile.mkdtemp(prefix="kw-bench-")
    plan = plan_lab(size, f"b{os.getpid() % 0x10000:04x}", root)
    lab_up(plan)
    try:
        first = playbook(plan, "-e", f"@{mesh}", "playbooks/site.yml")
        end = time.perf_counter()
        while not all_established(plan):
            time.sleep(0.1)
        settled = time.perf_counter() - end
        second = playbook(plan, "-e", f"@{mesh}", "playbooks/site.yml")
        baseline = playbook(plan, str(noop))
        print(
            f"{size:>3} hosts ({size * (size - 1) // 2} links): first run {first:6.1f} s, "
            f"all up {settled:4.1f} s after it, second run {second:5.1f} s, no-op play "
            f"{baseline:5.1f} s, second/no-op {second / baseline:4.2f}",
            flush=True,
        )
    finally:
        lab_down(plan.name, plan.root)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="5,10,20,40", help="lab sizes (comma-separated)")
    parser.add_argument("--intent", default="100,1000", help="mesh sizes for the intent alone")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that labs are taken down
    for size in filter(None, args.intent.split(",")):
        seconds, links = intent_seconds(int(size))
        print(f"intent, {int(size):>5}-host mesh ({links} links): {seconds:6.2f} s", flush=True)
    files = tempfile.mkdtemp(prefix="kw-bench-plays-")
    noop, mesh = Path(files) / "noop.yml", Path(files) / "mesh.yml"
    noop.write_text(NOOP)
    mesh.write_text(MESH)
    try:
        for size in filter(None, args.hosts.split(",")):
            lab_figures(int(size), noop, mesh)
    finally:
        shutil.rmtree(files, ignore_errors=True)


if __name__ == "__main__":
    main()
