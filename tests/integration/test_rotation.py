"""Rotating a link's PSK through the inventory and playbooks/rekey.yml, the way an
operator does it: raise psk_version, converge one end (--limit), try to retire too early
(refused, nothing touched), converge all, then retire the old version. A counted stream
runs across all of it: nothing may be lost."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.topology import link_psk
from tests.fixtures.ansible import recap, run_playbook, task_results
from tests.fixtures.traffic import stream


def _vars(tmp_path: Path, name: str, defaults: dict) -> str:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump({"keyway_defaults": defaults}))
    return f"@{path}"


def test_a_psk_rotation_in_parts_loses_nothing(netns_hosts, tmp_path):
    plan = netns_hosts(2)
    h1, h2 = plan.hosts
    run_playbook("playbooks/site.yml", plan)
    counted: list[int] = []
    sender = threading.Thread(target=lambda: counted.append(stream(h1, h2, 4000, 0.01)))
    sender.start()
    rotate = _vars(tmp_path, "rotate", {"psk_version": 2})
    retire = _vars(tmp_path, "retire", {"psk_version": 2, "psk_accept_previous": False})
    rekey = "playbooks/rekey.yml"
    runs = [run_playbook(rekey, plan, "-e", rotate, "--limit", "h1")]
    secrets = {host.name: Path(host.config_dir) / "secrets" for host in plan.hosts}
    held = {name: sorted(p.name for p in path.iterdir()) for name, path in secrets.items()}
    assert held == {"h1": ["h1-h2.psk", "h1-h2.psk-1"], "h2": ["h1-h2.psk"]}
    h2_psk = (secrets["h2"] / "h1-h2.psk").read_text()
    early = run_playbook(rekey, plan, "-e", retire, check=False)
    # (checked here, before the runs that follow change them)
    assert {n: sorted(p.name for p in path.iterdir()) for n, path in secrets.items()} == held
    assert (secrets["h2"] / "h1-h2.psk").read_text() == h2_psk
    runs += [run_playbook(rekey, plan, "-e", rotate), run_playbook(rekey, plan, "-e", retire)]
    assert sender.is_alive(), "the stream must outlast the rotation to count it"
    sender.join()
    # Retiring before h2 sent the new PSK would have cut the link: refused, h2 named,
    # before any host was touched.
    assert early.returncode != 0
    (gate,) = task_results(
        early, "Every end that loses a previous PSK already sends the newest one"
    ).values()
    assert gate["failed"] and "h1-h2: h2 still sends the previous PSK" in str(gate["msg"])
    with pytest.raises(AssertionError, match="no task"):  # the play stopped there
        task_results(early, "What keywayd holds after the run")
    # The full rotate run reports the link ready to retire: both ends send version 2.
    (report,) = task_results(runs[1], "Each rotating link as its ends authenticate it").values()
    lines = [line.split() for line in report["msg"]]
    assert [row[:5] for row in lines[1:3]] == [
        ["h1-h2", "h1", "v2", "2", "yes"],
        ["h1-h2", "h2", "v2", "2", "yes"],
    ]
    assert report["msg"][-1].startswith("1 of 1 rotating links")
    # The --limit h1 run says which link waits for a peer outside it.
    written = task_results(
        runs[0], "The agent's config (validated by keywayd's parser; PSKs in 0600 files)"
    )["h1"]
    assert written["waiting_for_peers"] == {"h1-h2": "h2"}
    assert "h1-h2 changes here, but h2 is not in this run" in runs[0].stdout
    stats = [recap(r) for r in runs]
    assert set(stats[0]) == {"h1"} and stats[0]["h1"]["changed"] > 0
    assert stats[1]["h2"]["changed"] > 0 and stats[1]["h1"]["changed"] == 0
    assert all(s["changed"] > 0 for s in stats[2].values())
    assert counted == [4000], f"{4000 - counted[0]} packets lost across the rotation"
    # h1 moved first: its new PSK was refused by h2, and it fell back to the old one.
    log = (Path(h1.run_dir) / "keywayd.log").read_text()
    assert "trying the previous one" in log
    # Retired: each end holds version 2 only.
    master = (Path(plan.root) / plan.name / "mesh.secret").read_text().strip()
    for host in plan.hosts:
        secrets = Path(host.config_dir) / "secrets"
        assert sorted(p.name for p in secrets.iterdir()) == ["h1-h2.psk"]
        assert (secrets / "h1-h2.psk").read_text() == link_psk(master, "h1", "h2", 2)
