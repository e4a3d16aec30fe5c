"""Print the pip requirements of pyproject.toml, one per line.

Usage: python tools/pydeps.py [--oldest] [EXTRA ...]
Keyway is not installed as a pip package (it is an Ansible collection), so the
Makefile installs its dependencies from here: pyproject.toml stays the one list.
--oldest pins each dependency to the lowest version pyproject.toml admits (its >=
bound): what the min-deps tier installs (Debian 12's cryptography and pyroute2).
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
args = sys.argv[1:]
oldest = "--oldest" in args
requirements = list(project["dependencies"])
if oldest:
    requirements = [r.replace(">=", "==") for r in requirements]
for extra in (a for a in args if a != "--oldest"):
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
