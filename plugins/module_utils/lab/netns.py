"""Build and remove a lab (see plan.py) with iproute2, idempotently.

Every namespace the lab makes is recorded in its state file before it is made, so a
teardown after a crash still finds it, and a namespace that exists but is not in the
state file is someone else's: the lab refuses to touch it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import string
import subprocess
import time
from pathlib import Path

from .plan import DEFAULT_LAB, DEFAULT_ROOT, LabError, LabHost, LabPlan

IP = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"
STOP_GRACE_SECONDS = 5.0


CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def _effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_privileges() -> None:
    """Raise LabError unless this process can create namespaces and links."""
    caps = _effective_capabilities()
    missing = [
        name
        for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
        if not caps & (1 << bit)
    ]
    if missing:
        raise LabError(
            f"the lab needs root privileges ({' and '.join(missing)} missing: namespaces "
            "take CAP_SYS_ADMIN, links CAP_NET_ADMIN); run it as root, e.g. sudo make demo"
        )
    if not os.path.exists(IP):
        raise LabError("iproute2's `ip` command is missing: apt-get install iproute2")


def _run(args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{' '.join(args)}` failed: {detail}")
    return proc.stdout


def _batch(netns: str, commands: list[str]) -> None:
    """Run iproute2 commands inside `netns` in one `ip -batch` process."""
    _run([IP, "-n", netns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def _sysctl(netns: str, settings: dict[str, str]) -> None:
    args = [IP, "netns", "exec", netns, "sysctl", "-q"]
    _run(args + [f"{key}={value}" for key, value in settings.items()])


def existing_namespaces() -> set[str]:
    out = _run([IP, "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def load_state(name: str = DEFAULT_LAB, root: str = DEFAULT_ROOT) -> dict | None:
    """The lab's state file as a dict, or None if there is no such lab."""
    path = Path(root) / name / "lab.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"lab state {path} is unreadable: {exc}") from exc


def _write_state(plan: LabPlan, owned: set[str], status: str) -> None:
    lab_dir = Path(plan.lab_dir)
    lab_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    state = {"status": status, "owned_namespaces": sorted(owned), "plan": plan.to_dict()}
    tmp = lab_dir / "lab.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, lab_dir / "lab.json")


def _create_switch(plan: LabPlan) -> None:
    _run([IP, "netns", "add", plan.switch_netns])
    # The switch carries frames only: no IPv6 on it, so no link-local or MLD noise.
    _sysctl(
        plan.switch_netns,
        {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"},
    )
    _batch(
        plan.switch_netns,
        [
            "link set lo up",
            f"link add {plan.bridge} type bridge",
            f"link set {plan.bridge} up",
        ],
    )


def _create_host(plan: LabPlan, host: LabHost) -> None:
    _run([IP, "netns", "add", host.netns])
    # Addresses must be usable at once: no duplicate address detection.
    _sysctl(
        host.netns,
        {
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv4.ip_forward": "1",
            "net.ipv6.conf.all.forwarding": "1",
        },
    )
    _batch(
        host.netns,
        [
            "link set lo up",
            f"link add eth0 type veth peer name {host.name} netns {plan.switch_netns}",
            f"address add {host.ipv4}/{host.prefix4} dev eth0",
            f"address add {host.ipv6}/{host.prefix6} dev eth0 nodad",
            "link set eth0 up",
            # The site LAN: a veth whose far end stays in the host (this kernel has no
            # dummy links); the host's site address is the gateway a tunnel protects.
            "link add site0 type veth peer name site0p",
            "link set site0p up",
            f"address add {host.site4_address}/{host.site4.split('/')[1]} dev site0",
            f"address add {host.site6_address}/{host.site6.split('/')[1]} dev site0 nodad",
            "link set site0 up",
        ],
    )
    _batch(plan.switch_netns, [f"link set {host.name} master {plan.bridge} up"])
    for folder in (host.config_dir, host.state_dir, host.run_dir):
        os.makedirs(folder, mode=0o700, exist_ok=True)


def _static_neighbours(plan: LabPlan) -> None:
    """Every host knows every other's MAC address for good (permanent entries). The
    kernel's neighbour tables are shared by all namespaces, with one garbage-collection
    ceiling (gc_thresh3, 1,024 by default): a 40-host lab that resolved its neighbours
    with ARP overflowed it and lost IKE packets. Permanent entries are not counted."""
    macs = {}
    for host in plan.hosts:
        (link,) = json.loads(_run([IP, "-n", host.netns, "-j", "link", "show", "eth0"]))
        macs[host.name] = link["address"]
    for host in plan.hosts:
        _batch(
            host.netns,
            [
                f"neigh replace {peer.ipv4} lladdr {macs[peer.name]} dev eth0 nud permanent"
                for peer in plan.hosts
                if peer is not host
            ]
            + [
                f"neigh replace {peer.ipv6} lladdr {macs[peer.name]} dev eth0 nud permanent"
                for peer in plan.hosts
                if peer is not host
            ],
        )


def _stop_processes(netns: str) -> None:
    """End every process inside `netns` (all of them are the lab's): TERM, then KILL."""
    proc = subprocess.run([IP, "netns", "pids", netns], capture_output=True, text=True, check=False)
    pids = [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []
    pidfds = {}
    for pid in pids:
        try:
            pidfds[pid] = os.pidfd_open(pid)
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pidfds.pop(pid, None)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    poller = select.poll()
    for fd in pidfds.values():
        poller.register(fd, select.POLLIN)
    remaining = dict(pidfds)
    while remaining and (left := deadline - time.monotonic()) > 0:
        # A pidfd becomes readable when its process exits: wait on that event.
        for fd, _unused in poller.poll(left * 1000):
            poller.unregister(fd)
            remaining = {p: f for p, f in remaining.items() if f != fd}
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for fd in pidfds.values():
        os.close(fd)


def _delete_namespace(netns: str) -> None:
    if netns not in existing_namespaces():
        return
    _stop_processes(netns)
    _run([IP, "netns", "delete", netns])


# The lab inventory's secrets (inventory/lab/group_vars/lab.yml reads them): the master
# secret every managed link's PSK is derived from, and the partner gateway's PSK. Made
# once, 0600, in the lab's folder (gone with the lab); in production both are vaulted.
LAB_SECRETS = {"mesh.secret": 48, "partner.psk": 40}


def _lab_secrets(plan: LabPlan) -> None:
    alphabet = string.ascii_letters + string.digits
    for name, length in LAB_SECRETS.items():
        path = os.path.join(plan.lab_dir, name)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write("".join(secrets.choice(alphabet) for _unused in range(length)))


def lab_up(plan: LabPlan) -> dict:
    """Make the lab match `plan`: create what is missing, remove hosts beyond it.

    Returns {"changed": bool, "created": [...], "removed": [...]}. On failure, what this
    call created is removed again and LabError says what went wrong.
    """
    require_privileges()
    state = load_state(plan.name, plan.root)
    owned = set(state["owned_namespaces"]) if state else set()
    existing = existing_namespaces()
    foreign = [ns for ns in plan.namespaces() if ns in existing and ns not in owned]
    if foreign:
        raise LabError(
            f"network namespace(s) {', '.join(foreign)} already exist and are not part of "
            f"lab {plan.name!r} (no record in {plan.state_file}); remove them or choose "
            "another lab name"
        )
    wanted = set(plan.namespaces())
    _write_state(plan, owned | wanted, "building")
    created: list[str] = []
    try:
        if plan.switch_netns not in existing:
            _create_switch(plan)
            created.append(plan.switch_netns)
        for host in plan.hosts:
            if host.netns not in existing:
                created.append(host.netns)
                _create_host(plan, host)
        if created:
            _static_neighbours(plan)
    except BaseException:
        for netns in reversed(created):
            with contextlib.suppress(LabError):
                _delete_namespace(netns)
        if state is None:
            shutil.rmtree(plan.lab_dir, ignore_errors=True)
        else:
            _write_state(LabPlan.from_dict(state["plan"]), owned, state["status"])
        raise
    _lab_secrets(plan)
    removed = []
    for netns in sorted((owned - wanted) & existing_namespaces()):
        _delete_namespace(netns)
        removed.append(netns)
    if state:
        kept = {h["name"] for h in state["plan"]["hosts"]} & {h.name for h in plan.hosts}
        for old in state["plan"]["hosts"]:
            if old["name"] not in kept:
                shutil.rmtree(Path(plan.lab_dir) / old["name"], ignore_errors=True)
    _write_state(plan, wanted, "ready")
    return {"changed": bool(created or removed), "created": created, "removed": removed}


def lab_down(name: str = DEFAULT_LAB, root: str = DEFAULT_ROOT) -> dict:
    """Remove lab `name` entirely: processes, namespaces (and so links), files."""
    require_privileges()
    state = load_state(name, root)
    if state is None:
        return {"changed": False, "removed": []}
    removed = []
    for netns in state["owned_namespaces"]:
        if netns in existing_namespaces():
            _delete_namespace(netns)
            removed.append(netns)
    shutil.rmtree(Path(root) / name, ignore_errors=True)
    with contextlib.suppress(OSError):  # the root folder goes with its last lab
        Path(root).rmdir()
    return {"changed": True, "removed": removed}


def lab_plan_of(name: str = DEFAULT_LAB, root: str = DEFAULT_ROOT) -> LabPlan | None:
    """The plan of the lab as built (from its state file), or None."""
    state = load_state(name, root)
    return LabPlan.from_dict(state["plan"]) if state else None
