"""keywayd's library as the modules ship it to a host, and its fingerprint.

A module that imports this file carries keywayd's whole library in its payload (see
`_shipped_library`): `keyway.ipsec.keywayd` installs it from there, and
`keyway.ipsec.agent_config` compares its fingerprint with the one a running keywayd
reports in `status`, so that a run whose agent already runs this library skips the
install step (one module call per host less on every run that changes nothing).

Both sides hash the same files only if the two payloads are the same: a module that
imports a module_utils file outside this closure makes them differ, which costs the
skip (keywayd is checked on every run), never correctness.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterable, Iterator

PACKAGE = "ansible_collections.keyway.ipsec.plugins.module_utils"
ENTRY = f"{PACKAGE}.agent.keywayd"


def _shipped_library() -> None:
    """Never called. Ansible ships what a module imports, wherever the import stands;
    these make it ship keywayd's whole library in the payload of every module that
    imports this file. Importing them when the module runs would only cost time."""
    from ansible_collections.keyway.ipsec.plugins.module_utils.agent import (  # noqa: F401
        daemon,
        keywayctl,
        keywayd,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import (  # noqa: F401
        userspace,
    )


def payload_files() -> Iterator[tuple[str, bytes]]:
    """(path relative to the package, content) of every Python file of the library as
    this process has it: a module's payload, or the folder keywayd runs from."""
    root = importlib.resources.files(PACKAGE)

    def walk(node, prefix: str) -> Iterator[tuple[str, bytes]]:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                if child.name != "__pycache__":
                    yield from walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".py"):
                yield prefix + child.name, child.read_bytes()

    yield from walk(root, "")


def fingerprint(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over the files' paths and contents, in path order."""
    digest = hashlib.sha256()
    for rel, data in sorted(files):
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
