"""Print the pip requirements of pyproject.toml, one per line.

Usage: python tools/pydeps.py [EXTRA ...]
Keyway is not installed as a pip package (it is an Ansible collection), so the
Makefile installs its dependencies from here: pyproject.toml stays the one list.
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
