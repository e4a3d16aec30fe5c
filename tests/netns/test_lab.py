"""The netns lab on the real kernel: build, idempotence, resize, teardown, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.lab import netns as labnet
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.netns import (
    existing_namespaces,
    lab_down,
    lab_up,
    load_state,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.lab.plan import LabError, plan_lab
from tests.conftest import ROOT, require_root
from tests.fixtures.netns import in_netns, udp_exchange, unique_lab_name


@pytest.fixture
def lab(tmp_path):
    require_root()
    plans = []

    def make(hosts: int):
        plan = plan_lab(hosts, plans[0].name if plans else unique_lab_name(), str(tmp_path))
        plans.append(plan)
        return plan, lab_up(plan)

    yield make
    if plans:
        lab_down(plans[0].name, str(tmp_path))


def test_lab_hosts_reach_each_other_over_ipv4_and_ipv6(lab):
    plan, result = lab(3)
    assert result["changed"] and len(result["created"]) == 4  # switch + 3 hosts
    h1, _, h3 = plan.hosts
    assert udp_exchange(h1.netns, h3.netns, h1.ipv4, h3.ipv4, b"keyway") == b"yawyek"
    assert udp_exchange(h3.netns, h1.netns, h3.ipv6, h1.ipv6, b"keyway") == b"yawyek"
    addrs = in_netns(h1.netns, "ip", "-brief", "address", "show", "site0").stdout
    assert "10.1.0.1/24" in addrs and "fd00:1::1/64" in addrs
    for host in plan.hosts:
        assert Path(host.config_dir).is_dir()
        assert Path(host.run_dir).stat().st_mode & 0o077 == 0


def test_second_up_changes_nothing_and_resize_adds_and_removes_hosts(lab):
    lab(2)
    _, again = lab(2)
    assert again == {"changed": False, "created": [], "removed": []}
    bigger, grown = lab(4)
    assert grown["created"] == [bigger.hosts[2].netns, bigger.hosts[3].netns]
    smaller, shrunk = lab(1)
    assert sorted(shrunk["removed"]) == sorted(h.netns for h in bigger.hosts[1:])
    assert not Path(smaller.lab_dir, "h2").exists()
    assert {h.netns for h in bigger.hosts[1:]}.isdisjoint(existing_namespaces())
    assert load_state(smaller.name, smaller.root)["owned_namespaces"] == sorted(
        smaller.namespaces()
    )


def test_down_removes_namespaces_processes_and_files(tmp_path):
    require_root()
    plan = plan_lab(2, unique_lab_name(), str(tmp_path))
    lab_up(plan)
    sleeper = subprocess.Popen(["ip", "netns", "exec", plan.hosts[0].netns, "sleep", "600"])
    try:
        result = lab_down(plan.name, plan.root)
        assert sorted(result["removed"]) == sorted(plan.namespaces())
        assert sleeper.wait(timeout=10) != 0  # ended by the teardown
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert set(plan.namespaces()).isdisjoint(existing_namespaces())
    assert not Path(plan.lab_dir).exists()
    assert lab_down(plan.name, plan.root) == {"changed": False, "removed": []}


def test_foreign_namespace_is_never_touched(tmp_path):
    require_root()
    plan = plan_lab(2, unique_lab_name(), str(tmp_path))
    foreign = plan.hosts[1].netns
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        with pytest.raises(LabError, match=f"{foreign}.*not part of lab"):
            lab_up(plan)
        assert foreign in existing_namespaces()
        assert plan.hosts[0].netns not in existing_namespaces()
        assert not Path(plan.lab_dir).exists()
    finally:
        subprocess.run(["ip", "netns", "delete", foreign], check=True)


def test_failure_midway_leaves_no_half_built_lab(tmp_path, monkeypatch):
    require_root()
    plan = plan_lab(3, unique_lab_name(), str(tmp_path))
    real_create = labnet._create_host

    def create_then_fail_on_third(plan_, host):
        real_create(plan_, host)
        if host.index == 3:
            raise LabError("injected failure")

    monkeypatch.setattr(labnet, "_create_host", create_then_fail_on_third)
    with pytest.raises(LabError, match="injected failure"):
        lab_up(plan)
    assert set(plan.namespaces()).isdisjoint(existing_namespaces())
    assert not Path(plan.lab_dir).exists()


def _lab_cli(*args: str, drop_caps: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ansible_collections.keyway.ipsec.plugins.module_utils.lab"]
    if drop_caps:
        # Still uid 0, but without the capabilities: what a locked-down container sees.
        cmd = ["setpriv", "--bounding-set=-sys_admin,-net_admin", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd="/")


@pytest.mark.parametrize(
    ("hosts", "message"),
    [("0", "lab size 0 is out of range"), ("245", "1 to 244 hosts"), ("four", "integer")],
)
def test_cli_refuses_bad_sizes_without_building(tmp_path, hosts, message):
    require_root()
    name = unique_lab_name()
    proc = _lab_cli("--name", name, "--root", str(tmp_path), "up", "--hosts", hosts)
    assert proc.returncode == 2 and message in proc.stderr
    assert not any(ns.startswith(f"kw-{name}-") for ns in existing_namespaces())


def test_cli_without_privileges_says_which_are_missing(tmp_path):
    require_root()
    name = unique_lab_name()
    proc = _lab_cli("--name", name, "--root", str(tmp_path), "up", drop_caps=True)
    assert proc.returncode == 2
    assert "the lab needs root privileges (CAP_SYS_ADMIN and CAP_NET_ADMIN missing" in proc.stderr
    assert not Path(tmp_path, name).exists()
