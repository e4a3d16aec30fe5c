"""ansible-playbook against the lab through the netns connection plugin."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tests.fixtures.ansible import ROOT, recap, run_playbook


def test_site_runs_inside_each_namespace_and_is_idempotent(netns_hosts):
    plan = netns_hosts(3)
    for host in plan.hosts:  # the playbook, not the lab, must create these
        Path(host.state_dir).rmdir()
    first = recap(run_playbook("playbooks/site.yml", plan))
    assert set(first) == {"h1", "h2", "h3"}
    for host in plan.hosts:
        stats = first[host.name]
        assert stats["failures"] == 0 and stats["unreachable"] == 0
        assert stats["changed"] == 1  # the state folder
        assert stat.S_IMODE(Path(host.state_dir).stat().st_mode) == 0o700
    second = recap(run_playbook("playbooks/site.yml", plan))
    assert all(s["changed"] == 0 and s["failures"] == 0 for s in second.values())


def test_facts_are_the_namespace_s_own(netns_hosts):
    plan = netns_hosts(2)
    facts_run = run_playbook(str(ROOT / "tests/integration/gather.yml"), plan)
    tasks = json.loads(facts_run.stdout)["plays"][0]["tasks"]
    results = tasks[-1]["hosts"]
    for host in plan.hosts:
        facts = results[host.name]["msg"]
        assert facts["eth0"] == host.ipv4
        assert facts["site0"] == host.site4_address
        assert "br0" not in facts["interfaces"]  # the switch is another namespace


def test_missing_namespace_is_a_clear_unreachable(netns_hosts):
    plan = netns_hosts(1)
    ghost = plan.hosts[0].netns + "x"
    proc = run_playbook(
        str(ROOT / "tests/integration/gather.yml"),
        plan,
        "-e",
        f"keyway_netns={ghost}",
        check=False,
    )
    assert proc.returncode != 0
    assert recap(proc)["h1"]["unreachable"] == 1
    assert f"network namespace {ghost!r} does not exist" in proc.stdout
