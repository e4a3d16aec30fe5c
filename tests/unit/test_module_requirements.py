"""A module that needs a Python package the host lacks says which one (Ansible's
missing_required_lib), instead of a traceback."""

from __future__ import annotations

import sys

import pytest

from ansible_collections.keyway.ipsec.plugins.modules import xfrm_info, xfrm_policy, xfrm_state
from tests.fixtures.ansible import run_module

XFRM = "ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm"


@pytest.fixture
def no_pyroute2(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "pyroute2"] + ["pyroute2"]:
        monkeypatch.setitem(sys.modules, name, None)  # import pyroute2[.x] -> ImportError
    for name in [n for n in sys.modules if n == XFRM or n.startswith(f"{XFRM}.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize(
    ("module", "args"),
    [
        (xfrm_info, {}),
        (xfrm_state, {"src": "192.0.2.1", "dst": "192.0.2.2", "spi": 0x100, "reqid": 0x4B570001,
                      "enc_alg": "aes-gcm-16", "enc_key": "00" * 20, "state": "present"}),
        (xfrm_policy, {"selector": {"src": "10.1.0.0/24", "dst": "10.2.0.0/24"}, "dir": "out",
                       "action": "pass", "state": "absent"}),
    ],
    ids=["xfrm_info", "xfrm_state", "xfrm_policy"],
)  # fmt: skip
def test_the_xfrm_modules_name_pyroute2_when_the_host_lacks_it(no_pyroute2, module, args):
    result = run_module(module.main, args)
    assert result["failed"]
    assert "Failed to import the required Python library (pyroute2)" in result["msg"], result
