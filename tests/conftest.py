"""Tiers, and the rules that keep them honest.

A test's tier follows from its folder (tests/unit, tests/netns, ...). Tiers that need
root, namespaces or Debian packages skip outside CI when those are missing, but in CI
(CI=true) such a skip is a failure: those tiers must run there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIER_OF_FOLDER = {
    "unit": "unit",
    "netns": "netns",
    "integration": "netns",
    "interop": "interop",
    "kernel": "kernel",
}
PRIVILEGED_TIERS = {"netns", "interop", "kernel"}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _ensure_collection_path() -> None:
    """Make ansible_collections.keyway.ipsec importable from this checkout."""
    link = ROOT / ".collections" / "ansible_collections" / "keyway" / "ipsec"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)


_ensure_collection_path()

from tests.fixtures.keywayd import agents  # noqa: F401
from tests.fixtures.libreswan import pluto_factory  # noqa: F401
from tests.fixtures.nat import nat_lab  # noqa: F401
from tests.fixtures.netns import netns_hosts  # noqa: F401  (a fixture for every tier)
from tests.fixtures.strongswan import charon_factory  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = TIER_OF_FOLDER.get(parts[0]) if len(parts) > 1 else None
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of {sorted(TIER_OF_FOLDER)}")
        item.add_marker(getattr(pytest.mark, tier))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    tiers = {m.name for m in item.iter_markers()} & PRIVILEGED_TIERS
    if IN_CI and report.skipped and tiers and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"tier {sorted(tiers)} must run in CI, but skipped: {reason}"


def require_root() -> None:
    """Skip (a failure in CI) unless running as root."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
