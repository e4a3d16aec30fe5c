"""What keywayd's interpreter must have, and how a lacking one is told."""

from __future__ import annotations

import re
import sys
import tomllib
import venv
from pathlib import Path

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.requirements import (
    MINIMUM_PYTHON,
    MINIMUM_VERSIONS,
    interpreter_problems,
    missing_requirements,
    version_key,
)

ROOT = Path(__file__).resolve().parents[3]


def test_the_minimums_are_pyproject_s_lower_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = dict(re.fullmatch(r"([\w-]+)>=(.+)", r).groups() for r in project["dependencies"])
    for name, minimum in MINIMUM_VERSIONS.items():
        assert bounds[name.lower()] == minimum, name
    assert project["requires-python"] == ">=" + ".".join(map(str, MINIMUM_PYTHON))


def test_versions_compare_by_their_numeric_release():
    assert version_key("38.0.4") < version_key("41.0.7") < version_key("43.0.0")
    assert version_key("0.7.2.post1") == (0, 7, 2)  # at least the release it follows
    assert version_key("0.7.11") > version_key("0.7.2")
    assert version_key("6.0b1") == (6, 0)


def test_each_lack_is_named_with_what_is_needed():
    ubuntu_2204 = {
        "python": [3, 10, 12],
        "packages": {"cryptography": "3.4.8", "pyroute2": None, "PyYAML": "5.4.1"},
    }
    assert missing_requirements(ubuntu_2204) == [
        "Python 3.10.12 (keywayd needs >= 3.11)",
        "cryptography 3.4.8 (needs >= 38.0.4)",
        "pyroute2 missing (needs >= 0.7.2)",
        "PyYAML 5.4.1 (needs >= 6.0)",
    ]
    debian_12 = {
        "python": [3, 11, 2],
        "packages": {"cryptography": "38.0.4", "pyroute2": "0.7.2", "PyYAML": "6.0"},
    }
    assert missing_requirements(debian_12) == []


def test_a_real_interpreter_is_asked(tmp_path):
    assert interpreter_problems(sys.executable) == []  # this venv has them all
    venv.create(tmp_path / "bare", with_pip=False)
    assert interpreter_problems(str(tmp_path / "bare/bin/python")) == [
        "cryptography missing (needs >= 38.0.4)",
        "pyroute2 missing (needs >= 0.7.2)",
        "PyYAML missing (needs >= 6.0)",
    ]
    (problem,) = interpreter_problems(str(tmp_path / "no-such-python"))
    assert problem.startswith(f"{tmp_path}/no-such-python does not run (")
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'no module named json' >&2\nexit 1\n")
    broken.chmod(0o755)
    assert interpreter_problems(str(broken)) == [
        f"{broken} fails to report its packages (no module named json)"
    ]
