"""The collection's checks as nox sessions (`nox --list`), the way Ansible collections run
them: antsibull-nox's lint, docs-check, extra-checks and ansible-lint sessions, configured
in antsibull-nox.toml; each session makes its own virtualenv from PyPI.

ansible-test sanity is the exception. antsibull-nox's ansible-test-sanity-* sessions
install ansible-core from github.com and run ansible-test with --docker (a container
runtime and images from quay.io), and these machines reach PyPI only; so each
sanity-X.Y session here runs tools/sanity.py, as `make sanity` does (the built tarball,
ansible-test --venv, PyPI only), under ansible-core X.Y from PyPI.
"""

from __future__ import annotations

import sys

import nox

try:
    import antsibull_nox
except ImportError:
    print("You need to install antsibull-nox in the same Python environment as nox.")
    sys.exit(1)

antsibull_nox.load_antsibull_nox_toml()

# The ansible-core releases meta/runtime.yml admits (requires_ansible) that run on the
# project's Python (3.11): ansible-core 2.20 and newer need 3.12 on the controller.
SANITY_CORE_VERSIONS = ["2.17", "2.18", "2.19"]


def _sanity_session(core: str) -> None:
    major, minor = core.split(".")

    def sanity(session: nox.Session) -> None:
        session.install(f"ansible-core>={core},<{major}.{int(minor) + 1}")
        session.run("python", "tools/sanity.py", *session.posargs)

    sanity.__doc__ = f"ansible-test sanity from ansible-core {core} on the built tarball"
    nox.session(name=f"sanity-{core}", default=False)(sanity)


for _core in SANITY_CORE_VERSIONS:
    _sanity_session(_core)

if __name__ == "__main__":
    nox.main()
