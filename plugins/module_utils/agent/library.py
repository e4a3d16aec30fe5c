"""keywayd's library as the keywayd module ships it to a host, and its fingerprint.

The library is every Python file of the agent's packages (AGENT_PACKAGES). The module
`keyway.ipsec.keywayd` carries all of them in its payload (see `_shipped_library`) and
installs them from there; a running keywayd reports the fingerprint of the files it runs
from in `status`; on the controller, the lookup `keyway.ipsec.agent_library` computes
the same fingerprint over the collection's own files. Equal fingerprints: the host runs
this collection's library, and a run skips the install step (one module call per host
less on every run that changes nothing).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterable, Iterator

PACKAGE = "ansible_collections.keyway.ipsec.plugins.module_utils"
ENTRY = f"{PACKAGE}.agent.keywayd"
AGENT_PACKAGES = ("agent", "dataplane", "esp", "ike")


def _shipped_library() -> None:
    """Never called. Ansible ships what a module imports, wherever the import stands;
    these make a module that imports this file ship every file of the agent's packages
    (tests/unit/agent/test_library.py checks that none is missing). Importing them when
    the module runs would only cost time."""
    from ansible_collections.keyway.ipsec.plugins.module_utils.agent import (  # noqa: F401
        config,
        control,
        daemon,
        install,
        keywayctl,
        keywayd,
        opportunistic,
        requirements,
        udp,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import (  # noqa: F401
        base,
        fake,
        params,
        userspace,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm import (  # noqa: F401
        codec as xfrm_codec,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm import (  # noqa: F401
        messages,
        plane,
        routes,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.esp import (  # noqa: F401
        packet,
        replay,
        tun,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike import (  # noqa: F401
        certs,
        codec,
        constants,
        crypto,
        defaults,
        identity,
        proposals,
    )
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import (  # noqa: F401
        cookies,
        core,
        events,
        retransmit,
        schedule,
    )


def payload_files() -> Iterator[tuple[str, bytes]]:
    """(path relative to module_utils, content) of every Python file of module_utils as
    this process has them: a module's payload, the folder keywayd runs from, or the
    collection on the controller."""
    root = importlib.resources.files(PACKAGE)

    def walk(node, prefix: str) -> Iterator[tuple[str, bytes]]:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                if child.name != "__pycache__":
                    yield from walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".py"):
                yield prefix + child.name, child.read_bytes()

    yield from walk(root, "")


def agent_fingerprint() -> str:
    """The fingerprint of the agent's packages as this process has them (the files
    outside them differ between a payload and the collection)."""
    return fingerprint(f for f in payload_files() if f[0].split("/")[0] in AGENT_PACKAGES)


def fingerprint(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over the files' paths and contents, in path order."""
    digest = hashlib.sha256()
    for rel, data in sorted(files):
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
