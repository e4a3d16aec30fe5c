"""The collection as users get it: a tarball of tracked files that installs into an
empty path, where ansible-doc shows every module, plugin and role without an error or a
warning. (tests/integration/test_installed.py runs the playbooks from such a path.)"""

from __future__ import annotations

import subprocess
import tarfile

import yaml

from tests.fixtures.ansible import BIN, ROOT, ansible_env, build_and_install
from tools.build_collection import tracked_files


def test_the_tarball_holds_tracked_files_a_user_needs_and_nothing_else(tmp_path):
    installed = build_and_install(tmp_path)
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    with tarfile.open(tmp_path / f"keyway-ipsec-{galaxy['version']}.tar.gz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert {"MANIFEST.json", "FILES.json", "meta/runtime.yml", "README.md"} <= names
    assert {"plugins/connection/netns.py", "playbooks/site.yml", "roles/agent/tasks/main.yml",
            "roles/agent/meta/argument_specs.yml"} <= names  # fmt: skip
    assert names - {"MANIFEST.json", "FILES.json"} <= set(tracked_files())
    assert not any(n.startswith(("tests/", "bench/", "tools/", ".ci/", ".venv")) for n in names)
    assert (installed / "ansible_collections/keyway/ipsec/plugins/modules/keywayd.py").is_file()


def _plugins(collection):
    """(type, name) of every documented plugin and role of the installed collection."""
    plugins = collection / "plugins"
    yield from (("module", p.stem) for p in (plugins / "modules").glob("*.py"))
    yield from (("filter", p.stem) for p in (plugins / "filter").glob("*.yml"))
    yield from (("lookup", p.stem) for p in (plugins / "lookup").glob("*.py"))
    yield from (("connection", p.stem) for p in (plugins / "connection").glob("*.py"))
    yield from (("inventory", p.stem) for p in (plugins / "inventory").glob("*.py"))
    yield from (("role", p.name) for p in (collection / "roles").iterdir())


def test_ansible_doc_shows_every_module_plugin_and_role_of_the_installed_tarball(tmp_path):
    installed = build_and_install(tmp_path)
    collection = installed / "ansible_collections/keyway/ipsec"
    env = ansible_env(ANSIBLE_COLLECTIONS_PATH=str(installed))
    shown = []
    for plugin_type, name in sorted(_plugins(collection)):
        doc = subprocess.run(
            [str(BIN / "ansible-doc"), "-t", plugin_type, f"keyway.ipsec.{name}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert doc.returncode == 0, (plugin_type, name, doc.stderr)
        assert "[WARNING]" not in doc.stderr and "[ERROR]" not in doc.stderr, doc.stderr
        assert f"keyway.ipsec.{name}" in doc.stdout
        assert "UNDOCUMENTED" not in doc.stdout
        shown.append((plugin_type, name))
    kinds = {kind for kind, _ in shown}
    assert kinds == {"module", "filter", "lookup", "connection", "inventory", "role"}
    assert ("role", "agent") in shown and ("module", "agent_config") in shown
