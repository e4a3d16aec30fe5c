"""The demo's playbooks from the collection as a user installs it: the built tarball in
an empty collections path, playbooks called by their FQCN, no checkout on any path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.fixtures.ansible import BIN, ROOT, ansible_env, build_and_install, recap, task_results


def test_the_installed_tarball_builds_and_proves_the_lab_mesh(netns_hosts, tmp_path):
    plan = netns_hosts(2)
    installed = build_and_install(tmp_path)
    collection = installed / "ansible_collections/keyway/ipsec"
    # What a user's ansible.cfg needs for the lab: its inventory plugin enabled.
    config = tmp_path / "ansible.cfg"
    config.write_text(
        "[defaults]\nforks = 10\n[inventory]\n"
        "enable_plugins = keyway.ipsec.netns_lab, ansible.builtin.yaml\n"
    )
    env = ansible_env(
        plan,
        ANSIBLE_COLLECTIONS_PATH=str(installed),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_STDOUT_CALLBACK="keyway_json",
        ANSIBLE_CALLBACK_PLUGINS=str(ROOT / "tests/fixtures/callback"),
    )
    assert "PYTHONPATH" not in env

    def playbook(name: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(collection / "inventory/lab"), name],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return proc

    site = playbook("keyway.ipsec.site")
    assert all(s["failures"] == 0 and s["changed"] > 0 for s in recap(site).values())
    # keywayd runs from the library the installed collection's module shipped.
    for host in plan.hosts:
        pid = int((Path(host.run_dir) / "keywayd.pid").read_text())
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        (path,) = [v for v in environ if v.startswith(b"PYTHONPATH=")]
        assert path == f"PYTHONPATH={host.state_dir}/lib".encode()
        assert b".collections" not in b"".join(environ)
    probes = task_results(
        playbook("keyway.ipsec.lab_status"),
        "Site to site through the tunnels, encrypted on the wire",
    )
    assert set(probes) == {"h1", "h2"}
    for result in probes.values():
        assert len(result["results"]) == 2  # the peer's IPv4 and IPv6 sites
        for probe in result["results"]:
            assert probe["received"] == probe["sent"] == 3
            assert probe["wire"]["cleartext"] == 0 and probe["wire"]["esp"] >= 3
    assert all(s["changed"] == 0 for s in recap(playbook("keyway.ipsec.site")).values())
    assert os.path.isdir(collection)
