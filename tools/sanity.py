#!/usr/bin/env python3
"""ansible-test sanity on the collection as it ships: the tarball `make build` makes,
installed into a temporary collections tree, plus this checkout's tests/config.yml
and tests/sanity/ignore.txt (installed as the ignore file of the ansible-core in use).

ansible-test makes its own virtualenvs from PyPI. It bootstraps pip in them with a
script it downloads from ci-files.testing.ansible.com, a host these machines cannot
reach; when that script is not in ansible-test's cache, the cache gets a stand-in that
does the same with Python's own ensurepip and PyPI (tools/get_pip_standin.py).

    tools/sanity.py [ansible-test sanity options, e.g. --test pylint]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.build_collection import build


def ensure_pip_bootstrap() -> None:
    from ansible_test._internal.python_requirements import get_venv_packages

    version = sysconfig.get_python_version()
    pip = get_venv_packages(types.SimpleNamespace(version=version))["pip"]
    cache = Path.home() / ".ansible/test/cache" / f"get_pip_{pip.replace('.', '_')}.py"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "tools/get_pip_standin.py", cache)


def main() -> int:
    import ansible

    ensure_pip_bootstrap()
    core = ".".join(ansible.__version__.split(".")[:2])
    # Nothing of the checkout (make exports it as PYTHONPATH and the collections path):
    # ansible-galaxy would find keyway.ipsec installed there already and install nothing.
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("ANSIBLE_")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="keyway-sanity-") as tmp:
        tarball = build(Path(tmp) / "dist")
        installed = Path(tmp) / "installed"
        bindir = Path(sys.executable).parent
        subprocess.run(
            [str(bindir / "ansible-galaxy"), "collection", "install", "--force", "-p",
             str(installed), str(tarball)],
            check=True,
            capture_output=True,
            env=env,
        )  # fmt: skip
        tree = installed / "ansible_collections/keyway/ipsec"
        (tree / "tests/sanity").mkdir(parents=True)
        shutil.copy(ROOT / "tests/config.yml", tree / "tests/config.yml")
        shutil.copy(ROOT / "tests/sanity/ignore.txt", tree / f"tests/sanity/ignore-{core}.txt")
        python = sysconfig.get_python_version()
        done = subprocess.run(
            [str(bindir / "ansible-test"), "sanity", "--venv", "--python", python,
             "--color", "no", *sys.argv[1:]],
            cwd=tree,
            env=env,
            check=False,
        )  # fmt: skip
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
