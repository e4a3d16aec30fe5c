"""teardown.yml leaves a host as it was before Keyway came, and its peers without the
links to it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from tests.fixtures.ansible import recap, run_playbook
from tests.fixtures.netns import in_netns, udp_exchange


def snapshot(host) -> dict:
    """What Keyway could leave behind on a lab host."""

    def ip(*args: str) -> str:
        return in_netns(host.netns, "ip", *args).stdout

    folders = (host.config_dir, host.state_dir, host.run_dir)
    return {
        "files": sorted(str(p) for f in folders if Path(f).exists() for p in Path(f).rglob("*"))
        + [f for f in folders if Path(f).exists()],
        "processes": sorted(
            Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in _pids(host.netns)
        ),
        "xfrm": ip("xfrm", "state") + ip("xfrm", "policy"),
        "routes": ip("route", "show", "table", "all") + ip("-6", "route", "show", "table", "all"),
        "rules": ip("rule") + ip("-6", "rule"),
        "links": ip("-brief", "link"),
    }


def _pids(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [p for p in out.split() if Path(f"/proc/{p}").exists()]


def test_teardown_leaves_nothing_and_peers_drop_the_links(netns_hosts, tmp_path):
    plan = netns_hosts(3)
    h1, h2, h3 = plan.hosts
    for host in plan.hosts:  # Keyway makes its own folders
        for folder in (host.config_dir, host.state_dir, host.run_dir):
            Path(folder).rmdir()
    before = snapshot(h3)
    run_playbook("playbooks/site.yml", plan)
    installed = snapshot(h3)
    assert installed["processes"] and installed["files"] and "kw-esp0" in installed["links"]

    gone = run_playbook(
        "playbooks/teardown.yml", plan, "-e", json.dumps({"keyway_teardown": ["h3"]})
    )
    assert recap(gone)["h3"]["changed"] > 0
    after = snapshot(h3)
    assert after == before
    for peer in (h1, h2):
        conns = control.request(f"{peer.run_dir}/keywayd.sock", "list-conns")
        assert [c["name"] for c in conns] == ["h1-h2"]
    assert udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"ok") == b"ko"
