"""What the interpreter that runs keywayd must have: a Python and the distributions keywayd
imports, at the oldest versions it supports (pyproject.toml's lower bounds, the min-deps
tier's pins; tests/unit/agent/test_requirements.py holds the two equal).

The keywayd module asks the interpreter itself (it may not be the one running the
module) before it installs or starts keywayd, so that a host without them fails with
what is missing named, not with a traceback in keywayd's log.
"""

from __future__ import annotations

import json
import re
import subprocess

MINIMUM_PYTHON = (3, 11)
# Distribution names (as pip and importlib.metadata know them) and their oldest versions.
MINIMUM_VERSIONS = {"cryptography": "38.0.4", "pyroute2": "0.7.2", "PyYAML": "6.0"}

# Run by the interpreter under test: its version and each distribution's (None: missing).
_PROBE = """
import json, sys
try:
    from importlib import metadata
except ImportError:  # Python < 3.8: its version is reason enough
    metadata = None
found = {}
for name in NAMES:
    try:
        found[name] = metadata.version(name)
    except Exception:
        found[name] = None
print(json.dumps({"python": list(sys.version_info[:3]), "packages": found}))
"""


def version_key(version: str) -> tuple[int, ...]:
    """The numeric release of a version ('0.7.2.post1' and '38.0.4' compare as numbers)."""
    release = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in release.group(0).split(".")) if release else ()


def missing_requirements(found: dict) -> list[str]:
    """What a probe's answer lacks, one phrase each (empty: keywayd can run)."""
    problems = []
    python = tuple(found["python"])
    if python[:2] < MINIMUM_PYTHON:
        wanted = ".".join(map(str, MINIMUM_PYTHON))
        problems.append(f"Python {'.'.join(map(str, python))} (keywayd needs >= {wanted})")
    for name, minimum in MINIMUM_VERSIONS.items():
        version = found["packages"].get(name)
        if version is None:
            problems.append(f"{name} missing (needs >= {minimum})")
        elif version_key(version) < version_key(minimum):
            problems.append(f"{name} {version} (needs >= {minimum})")
    return problems


def probe_interpreter(python: str, timeout: float = 60.0) -> dict:
    """Ask `python` for its version and those of keywayd's distributions. Raises
    OSError when it does not run, ValueError when it answers something else."""
    script = f"NAMES = {sorted(MINIMUM_VERSIONS)!r}\n{_PROBE}"
    proc = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise ValueError(last[0])
    return json.loads(proc.stdout)


def interpreter_problems(python: str) -> list[str]:
    """Why `python` cannot run keywayd (empty: it can)."""
    try:
        return missing_requirements(probe_interpreter(python))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"{python} does not run ({exc})"]
    except ValueError as exc:
        return [f"{python} fails to report its packages ({exc})"]
