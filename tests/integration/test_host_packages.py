"""keywayd on the distribution's own Python packages: the agent role installs them from
Debian 12's archive (this machine's distribution) and keywayd runs real tunnels on
/usr/bin/python3 with them; an interpreter without them fails the run with each one
named, before keywayd is installed or started."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest
import yaml

from tests.fixtures.ansible import ROOT, recap, run_playbook, task_results
from tests.fixtures.netns import in_netns

SYSTEM_PYTHON = "/usr/bin/python3"
KEYWAYD_TASK = "The agent installed and running (no systemd)"


def os_release() -> dict[str, str]:
    lines = Path("/etc/os-release").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def keywayd_cmdlines(netns: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    cmdlines = []
    for pid in pids.stdout.split():
        try:
            cmdlines.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "))
        except FileNotFoundError:
            continue
    return [c for c in cmdlines if "agent.keywayd" in c]


@pytest.mark.skipif(
    os_release().get("ID") != "debian" or os_release().get("VERSION_ID") != '"12"',
    reason="the package step is tested on Debian 12, this machine kind's distribution",
)
def test_keywayd_runs_tunnels_on_debian_12_s_own_packages(netns_hosts):
    installed = run_playbook("tests/integration/packages.yml")
    (step,) = task_results(installed, "The agent's Python packages from the distribution").values()
    assert not step.get("skipped"), step
    vars_file = ROOT / "roles/agent/vars/main.yml"
    wanted = yaml.safe_load(vars_file.read_text())["agent_os_packages"]["Debian-12"]
    for package in wanted:
        status = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", package],
                                capture_output=True, text=True).stdout  # fmt: skip
        assert status.startswith("install ok installed"), (package, status)
    # Debian's own builds, not the test venv's wheels.
    versions = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import cryptography, pyroute2; "
         "print(cryptography.__file__, pyroute2.__file__)"],
        capture_output=True, text=True, check=True, cwd="/",
    ).stdout  # fmt: skip
    assert versions.count("/usr/lib/python3/dist-packages/") == 2, versions

    plan = netns_hosts(2)
    run_playbook("playbooks/site.yml", plan, "-e", f"agent_python={SYSTEM_PYTHON}")
    for host in plan.hosts:
        (cmdline,) = keywayd_cmdlines(host.netns)
        assert cmdline.startswith(f"{SYSTEM_PYTHON} -m "), cmdline
    status = run_playbook("playbooks/lab_status.yml", plan)
    probes = task_results(status, "Site to site through the tunnels, encrypted on the wire")
    for host in plan.hosts:
        for probe in probes[host.name]["results"]:
            assert probe["received"] == probe["sent"] == 3
            assert probe["wire"]["cleartext"] == 0 and probe["wire"]["esp"] >= 3


def test_an_interpreter_without_keywayd_s_packages_fails_naming_them(netns_hosts, tmp_path):
    bare = tmp_path / "bare"
    venv.create(bare, with_pip=False)  # Python alone: none of keywayd's packages
    plan = netns_hosts(2)
    failed = run_playbook(
        "playbooks/site.yml", plan, "-e", f"agent_python={bare}/bin/python", check=False
    )
    assert failed.returncode != 0
    results = task_results(failed, KEYWAYD_TASK)
    assert set(results) == {h.name for h in plan.hosts}
    for host in plan.hosts:
        result = results[host.name]
        assert result["failed"]
        assert result["missing"] == [
            "cryptography missing (needs >= 38.0.4)",
            "pyroute2 missing (needs >= 0.7.2)",
            "PyYAML missing (needs >= 6.0)",
        ]
        assert f"keywayd cannot run on {bare}/bin/python" in result["msg"]
        # Nothing installed or started.
        assert not keywayd_cmdlines(host.netns)
        assert not (Path(host.state_dir) / "lib").exists()
        assert not in_netns(host.netns, "ip", "xfrm", "state").stdout
    assert all(s["failures"] == 1 for s in recap(failed).values())
