"""ansible-playbook against the lab through the netns connection plugin."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.graph import UP_COLOUR
from tests.fixtures.ansible import ROOT, recap, run_playbook, task_results

SVG = "{http://www.w3.org/2000/svg}"
CONFIG_TASK = "The agent's config (validated by keywayd's parser; PSKs in 0600 files)"
INSTALL_TASK = "The agent installed and running"  # includes KEYWAYD_TASK when needed
KEYWAYD_TASK = "The agent installed and running (no systemd)"


def wait_gone(pid: int, timeout: float = 15.0) -> None:
    """Until process `pid` has exited (keywayd's SIGTERM handler tells its peers)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout} s"
        time.sleep(0.05)


def test_site_builds_the_mesh_idempotently_and_traffic_is_encrypted(netns_hosts):
    plan = netns_hosts(3)
    for host in plan.hosts:  # the playbook, not the lab, must create these
        Path(host.state_dir).rmdir()
    first_run = run_playbook("playbooks/site.yml", plan)
    first = recap(first_run)
    assert set(first) == {"h1", "h2", "h3"}
    for host in plan.hosts:
        stats = first[host.name]
        assert stats["failures"] == 0 and stats["unreachable"] == 0
        assert stats["changed"] == 2  # the config; keywayd installed (state folder too), started
        assert stat.S_IMODE(Path(host.state_dir).stat().st_mode) == 0o700
        config = Path(host.config_dir) / "keywayd.yml"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        # The config names its PSK files; the secrets are only in them (0600).
        assert "psk:" not in config.read_text()
        for psk in (Path(host.config_dir) / "secrets").iterdir():
            assert stat.S_IMODE(psk.stat().st_mode) == 0o600
            assert psk.read_text() not in first_run.stdout
    started = task_results(first_run, "Its tunnels established")
    # Each host initiates towards the hosts whose names sort after its own, and the task
    # (once every host's keywayd runs) waits for those.
    assert {"h1-h2", "h1-h3"} <= set(started["h1"]["established"])
    assert {"h2-h3"} <= set(started["h2"]["established"])
    second_run = run_playbook("playbooks/site.yml", plan)
    # Nothing changed: nothing to wait for.
    assert all(
        r.get("skipped") for r in task_results(second_run, "Its tunnels established").values()
    )
    second = recap(second_run)
    assert all(s["changed"] == 0 and s["failures"] == 0 for s in second.values()), (
        second_run.stdout[-6000:]
    )
    # Each keywayd runs this config and this library: nothing for the keywayd module.
    assert all(r["agent"]["running"] for r in task_results(second_run, CONFIG_TASK).values())
    assert all(r.get("skipped") for r in task_results(second_run, INSTALL_TASK).values())
    checked = recap(run_playbook("playbooks/site.yml", plan, "--check", "--diff"))
    assert all(s["changed"] == 0 for s in checked.values())
    # The role keyway.ipsec.tunnels returns each link's state when asked.
    reported = run_playbook("playbooks/site.yml", plan, "-e", "tunnels_status=true")
    rows = task_results(reported, "Each link of this host, as both of its ends see it")
    for host in plan.hosts:
        links = rows[host.name]["ansible_facts"]["tunnels_link_status"]
        assert sorted(r["link"] for r in links) == sorted(
            "-".join(sorted((host.name, peer.name))) for peer in plan.hosts if peer != host
        )
        assert all(r["state"] == "up" and r["spi_in"] for r in links)

    status = run_playbook("playbooks/lab_status.yml", plan)
    probes = task_results(status, "Site to site through the tunnels, encrypted on the wire")
    for host in plan.hosts:
        results = probes[host.name]["results"]
        assert len(results) == 4  # two peers, IPv4 and IPv6
        for probe in results:
            assert probe["received"] == probe["sent"] == 3
            assert probe["wire"]["cleartext"] == 0
            assert probe["wire"]["esp"] >= 3

    # h1's keywayd stopped: the next run starts it again (and only it), and waits for
    # the tunnels h1 initiates.
    h1 = plan.hosts[0]
    pid = int((Path(h1.run_dir) / "keywayd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    # The probes through h1's tunnels fail, and so does the play (make demo's exit code
    # tells the truth: issue 14, item 16).
    broken = run_playbook("playbooks/lab_status.yml", plan, check=False)
    assert broken.returncode != 0
    failed = task_results(broken, "Site to site through the tunnels, encrypted on the wire")
    outcome = {tuple(r["item"]): bool(r.get("failed")) for r in failed["h2"]["results"]}
    assert outcome == {("h1", "4"): True, ("h1", "6"): True, ("h3", "4"): False, ("h3", "6"): False}
    third_run = run_playbook("playbooks/site.yml", plan)
    keywayd = task_results(third_run, KEYWAYD_TASK)
    assert set(keywayd) == {"h1"} and keywayd["h1"]["changed"] and keywayd["h1"]["pid"] != pid
    install = task_results(third_run, INSTALL_TASK)
    assert install["h2"].get("skipped") and install["h3"].get("skipped")
    assert {"h1-h2", "h1-h3"} <= set(
        task_results(third_run, "Its tunnels established")["h1"]["established"]
    )


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


def test_an_inconsistent_inventory_fails_before_any_host_is_touched(netns_hosts, tmp_path):
    plan = netns_hosts(3)
    for host in plan.hosts:
        Path(host.state_dir).rmdir()
    bad = tmp_path / "bad.yml"  # one host with a site that is not a prefix
    bad.write_text("all:\n  hosts:\n    h2:\n      keyway_sites: [10.2.0.0/33]\n")
    proc = run_playbook("playbooks/site.yml", plan, "-i", str(bad), check=False)
    assert proc.returncode != 0
    failed = task_results(proc, "Every host's links, from the whole inventory, validated")
    (message,) = {result["msg"] for result in failed.values()}  # computed once, for all
    # The failure says which host's which variable is wrong.
    assert "host h2: keyway_sites: '10.2.0.0/33' is not a prefix" in message
    for host in plan.hosts:  # nothing was made on any host
        assert not Path(host.state_dir).exists()
        assert not (Path(host.config_dir) / "keywayd.yml").exists()


def test_the_demo_lab_shows_every_topology_with_an_external_strongswan(netns_hosts, tmp_path):
    """From 5 lab hosts on the lab inventory is the demo: h1-h3 meshed, branches dialling
    in to h1 and reaching each other through it, and the last host running charon as an
    unmanaged partner gateway of h2. Every link carries traffic, encrypted."""
    plan = netns_hosts(6)
    partner = run_playbook("playbooks/lab_partner.yml", plan)
    assert recap(partner)["h6"]["failures"] == 0
    site = recap(run_playbook("playbooks/site.yml", plan))
    assert set(site) == {"h1", "h2", "h3", "h4", "h5", "h6"}
    assert site["h6"]["changed"] == 0  # the partner is not Keyway's
    status = run_playbook("playbooks/lab_status.yml", plan)
    probes = task_results(status, "Site to site through the tunnels, encrypted on the wire")
    seen = {
        (host, probe["item"][0], probe["item"][1]): probe
        for host, result in probes.items()
        for probe in result["results"]
        if "sent" in probe
    }
    both = ("4", "6")
    expected = {
        *(
            (a, b, v)
            for a in ("h1", "h2", "h3")
            for b in ("h1", "h2", "h3")
            if a != b
            for v in both
        ),
        *((s, h, v) for s in ("h4", "h5") for h in ("h1", "h4", "h5") if s != h for v in both),
        *(("h1", s, v) for s in ("h4", "h5") for v in both),
        *(("h2", "h6", v) for v in both),
    }
    assert set(seen) == expected
    for (host, peer, _), probe in seen.items():
        assert probe["received"] == probe["sent"] == 3, (host, peer, probe)
        assert probe["wire"]["cleartext"] == 0
        # charon's userspace ESP (libipsec) always encapsulates in UDP
        assert probe["wire"]["esp_in_udp" if peer == "h6" else "esp"] >= 3

    # status.yml: every link as both ends see it; all up, both ends on one SA pair; and
    # the picture of it, every link green.
    picture = tmp_path / "tunnels"
    status = run_playbook("playbooks/status.yml", plan, "-e", f"keyway_status_graph={picture}")
    table = task_results(status, "Every link, both ends' view")
    svg = ET.parse(f"{picture}.svg").getroot()
    titles = {t.text for t in svg.iter(f"{SVG}title")}
    assert {"h1", "h2", "h3", "h4", "h5", "partner", "h2->partner", "h4->h1"} <= titles
    edges = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(edges) == 6 and all(
        p.get("stroke") == UP_COLOUR for g in edges for p in g.iter(f"{SVG}path")
    )
    (shown,) = table.values()  # run once, for all
    rows = [line.split() for line in shown["msg"][1:]]
    assert {(r[0], r[1]) for r in rows} == {
        ("h1-h2", "h1"), ("h1-h2", "h2"), ("h1-h3", "h1"), ("h1-h3", "h3"), ("h2-h3", "h2"),
        ("h2-h3", "h3"), ("h1-h4", "h1"), ("h1-h4", "h4"), ("h1-h5", "h1"), ("h1-h5", "h5"),
        ("h2-partner", "h2"),
    }  # fmt: skip
    assert all(r[2] == "up" for r in rows)
    # A host whose keywayd is gone: status fails and names its links.
    (Path(plan.hosts[2].run_dir) / "keywayd.sock").unlink()
    broken = run_playbook("playbooks/status.yml", plan, check=False)
    assert broken.returncode != 0
    failed = task_results(broken, "Every link is up at both ends, on the same SA pair")
    (message,) = {str(r.get("msg")) for r in failed.values()}
    assert "h1-h3 (core): not seen at h3" in message and "h2-h3 (core): not seen at h3" in message


def test_a_20_host_mesh_comes_up_and_a_second_run_changes_nothing(netns_hosts, tmp_path):
    """190 links: every one up at both ends on one SA pair (status.yml), then a second
    run with nothing to change, no module call but the config's on any host."""
    plan = netns_hosts(20)
    mesh = tmp_path / "mesh.yml"
    mesh.write_text("keyway_topologies: [{name: mesh, type: mesh, members: lab}]\n")
    first = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{mesh}"))
    assert len(first) == 20 and all(s["failures"] == 0 for s in first.values())
    status = run_playbook("playbooks/status.yml", plan, "-e", f"@{mesh}")
    (shown,) = task_results(status, "Every link, both ends' view").values()
    links = {line.split()[0] for line in shown["msg"][1:] if line.split()}
    names = [f"h{i}" for i in range(1, 21)]
    assert {"-".join(sorted((a, b))) for a in names for b in names if a < b} <= links
    second_run = run_playbook("playbooks/site.yml", plan, "-e", f"@{mesh}")
    assert all(s["changed"] == 0 and s["failures"] == 0 for s in recap(second_run).values())
    assert all(r.get("skipped") for r in task_results(second_run, INSTALL_TASK).values())
