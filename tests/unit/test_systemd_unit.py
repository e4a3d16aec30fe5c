"""keywayd's systemd unit: valid, hardened (systemd-analyze's offline security score),
and limited to the capabilities XFRM, TUN, raw ESP and UDP 500/4500 need."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles/agent/templates/keywayd.service.j2"
MAX_EXPOSURE = 3.0  # systemd's scale: 0 (locked down) .. 10 (unprotected)


@pytest.fixture
def unit(tmp_path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["dirname"] = os.path.dirname  # as Ansible's filter of that name
    text = env.from_string(TEMPLATE.read_text()).render(
        agent_lib_dir="/usr/local/lib/keyway",
        agent_python="/usr/bin/python3",
        agent_config="/etc/keyway/keywayd.yml",
    )
    path = tmp_path / "keywayd.service"
    path.write_text(text)
    return path


def test_the_unit_scores_well_offline(unit):
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out)[1])
    assert exposure <= MAX_EXPOSURE, out


def test_the_unit_keeps_only_the_network_capabilities(unit):
    settings = dict(
        line.split("=", 1) for line in unit.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    wanted = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(settings["CapabilityBoundingSet"].split()) == wanted
    assert set(settings["AmbientCapabilities"].split()) == wanted
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "keywayd --config /etc/keyway/keywayd.yml" in settings["ExecStart"]


def test_systemd_accepts_the_unit(unit):
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    problems = [
        line
        for line in proc.stderr.splitlines()
        if str(unit) in line and "Failed to" not in line  # no running systemd here
    ]
    assert not problems, proc.stderr
