"""Inside the VM: load the kernel modules the tier uses (the stock kernel has them all)."""

from __future__ import annotations

import os
import subprocess

import pytest

MODULES = ("esp4", "esp6", "ah4", "ah6", "xfrm_user", "xfrm_interface", "tun")


@pytest.fixture(scope="session", autouse=True)
def vm_kernel_modules() -> None:
    if os.environ.get("KEYWAY_IN_VM") == "1":
        proc = subprocess.run(["modprobe", "-a", *MODULES], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
