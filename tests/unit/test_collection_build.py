"""`ansible-galaxy collection build` gives a tarball that installs and loads."""

from __future__ import annotations

import subprocess
import tarfile

import yaml

from tests.fixtures.ansible import BIN, ROOT, ansible_env


def test_built_collection_installs_and_its_plugins_load(tmp_path):
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    build = subprocess.run(
        [
            str(BIN / "ansible-galaxy"),
            "collection",
            "build",
            "--output-path",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        env=ansible_env(),
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr
    tarball = tmp_path / f"keyway-ipsec-{galaxy['version']}.tar.gz"
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"MANIFEST.json", "FILES.json", "meta/runtime.yml", "README.md"} <= names
    assert "plugins/connection/netns.py" in names
    assert "plugins/module_utils/lab/plan.py" in names
    assert not any(n.startswith((".venv", ".collections", "tests/", ".git/")) for n in names)

    installed = tmp_path / "installed"
    install = subprocess.run(
        [
            str(BIN / "ansible-galaxy"),
            "collection",
            "install",
            "--force",
            "-p",
            str(installed),
            str(tarball),
        ],
        capture_output=True,
        text=True,
        env=ansible_env(),
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr
    env = ansible_env(ANSIBLE_COLLECTIONS_PATH=str(installed))
    for plugin_type, name in (("connection", "netns"), ("inventory", "netns_lab")):
        doc = subprocess.run(
            [str(BIN / "ansible-doc"), "-t", plugin_type, f"keyway.ipsec.{name}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert doc.returncode == 0, doc.stderr
        assert f"keyway.ipsec.{name}" in doc.stdout
