"""The keywayd module ships every file of the agent's packages: otherwise the library a
host runs lacks files the controller's fingerprint covers, and every run installs it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import library

MODULE_UTILS = Path(library.__file__).resolve().parent.parent


def test_the_shipped_library_imports_every_file_of_the_agent_packages():
    tree = ast.parse(inspect.getsource(library._shipped_library))
    imported = {
        f"{node.module.split('module_utils.')[1]}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    files = {
        ".".join(path.relative_to(MODULE_UTILS).with_suffix("").parts)
        for package in library.AGENT_PACKAGES
        for path in (MODULE_UTILS / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    # library.py itself ships: the keywayd module imports it.
    assert files - imported == {"agent.library"}, "add these to library._shipped_library"
    assert imported <= files


def test_the_fingerprint_covers_the_agent_packages_and_nothing_else():
    files = dict(library.payload_files())
    assert "agent/daemon.py" in files and "intent/topology.py" in files
    agent_only = {k: v for k, v in files.items() if k.split("/")[0] in library.AGENT_PACKAGES}
    assert library.agent_fingerprint() == library.fingerprint(agent_only.items())
    changed = {**agent_only, "ike/codec.py": agent_only["ike/codec.py"] + b"\n"}
    assert library.fingerprint(changed.items()) != library.agent_fingerprint()
