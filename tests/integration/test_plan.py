"""plan.yml shows what site.yml would do, link by link, and changes nothing; site.yml
then changes only those links, make-before-break, and a second run changes nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from tests.fixtures.ansible import recap, run_playbook, task_results
from tests.fixtures.traffic import stream

CHANGED = {
    "keyway_topologies": [
        {"name": "core", "type": "mesh", "members": ["h1", "h2"]},
        {
            "name": "edges",
            "type": "links",
            "links": [
                {"ends": ["h1", "h3"], "psk_version": 2},
                {"ends": ["h2", "h3"], "esp_proposals": ["aes128gcm16"]},
            ],
        },
    ]
}


def _plan(proc) -> dict[str, dict[str, str]]:
    return {h: r["msg"] for h, r in task_results(proc, "The plan, link by link").items()}


def _child_spis(host) -> dict[str, tuple[str, str]]:
    sas = control.request(f"{host.run_dir}/keywayd.sock", "list-sas")
    return {sa["connection"]: (c["spi_in"], c["spi_out"]) for sa in sas for c in sa["children"]}


def _host_files(plan) -> dict[str, float]:
    return {
        str(p): p.stat().st_mtime
        for host in plan.hosts
        for p in Path(host.config_dir).rglob("*")
        if p.is_file()
    }


def test_plan_then_site_changes_only_the_links_it_showed(netns_hosts, tmp_path):
    lab = netns_hosts(3)
    _, h2, h3 = lab.hosts
    fresh = _plan(run_playbook("playbooks/plan.yml", lab))
    assert fresh["h1"] == {"h1-h2": "created", "h1-h3": "created"}
    assert _host_files(lab) == {}  # nothing written on a fresh host
    run_playbook("playbooks/site.yml", lab)
    before_files, before_spis = _host_files(lab), {h.name: _child_spis(h) for h in lab.hosts}

    changes = tmp_path / "changes.yml"
    changes.write_text(yaml.safe_dump(CHANGED))
    shown = _plan(run_playbook("playbooks/plan.yml", lab, "-e", f"@{changes}"))
    assert shown["h1"] == {
        "h1-h2": "unchanged",
        "h1-h3": "changed (PSK only): reauthenticated make-before-break",
    }
    assert shown["h3"]["h2-h3"] == "changed (settings): reauthenticated make-before-break"
    assert _host_files(lab) == before_files  # the plan touched nothing
    assert {h.name: _child_spis(h) for h in lab.hosts} == before_spis

    counted: list[int] = []
    sender = threading.Thread(target=lambda: counted.append(stream(h2, h3, 1200, 0.01)))
    sender.start()
    applied = run_playbook("playbooks/site.yml", lab, "-e", f"@{changes}")
    assert sender.is_alive()
    sender.join()
    assert counted == [1200], f"{1200 - counted[0]} packets lost while h2-h3 changed"
    assert all(s["failures"] == 0 for s in recap(applied).values())
    after = {h.name: _child_spis(h) for h in lab.hosts}
    assert after["h1"]["h1-h2"] == before_spis["h1"]["h1-h2"]  # untouched
    assert after["h1"]["h1-h3"] != before_spis["h1"]["h1-h3"]
    assert after["h2"]["h2-h3"] != before_spis["h2"]["h2-h3"]
    again = recap(run_playbook("playbooks/site.yml", lab, "-e", f"@{changes}"))
    assert all(s["changed"] == 0 for s in again.values()), again
