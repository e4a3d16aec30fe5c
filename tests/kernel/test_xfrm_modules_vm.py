"""keyway.ipsec.xfrm_state and xfrm_policy through ansible-playbook against namespaces in
the VM: a manually keyed tunnel that carries traffic through the kernel, and a second
run that changes nothing."""

from __future__ import annotations

import os
import secrets

import pytest

from tests.fixtures.ansible import ROOT, recap, run_playbook
from tests.fixtures.netns import in_netns, udp_exchange

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)
PLAYBOOK = str(ROOT / "tests/integration/xfrm_manual.yml")


def test_manual_keying_playbook_carries_traffic_and_is_idempotent(netns_hosts):
    plan = netns_hosts(2)
    h1, h2 = plan.hosts
    keys = ("-e", f"key_h1={secrets.token_hex(20)} key_h2={secrets.token_hex(20)}")
    first = recap(run_playbook(PLAYBOOK, plan, *keys))
    assert all(s["changed"] == 4 and s["failures"] == 0 for s in first.values())
    for me, peer in ((h1, h2), (h2, h1)):
        route = in_netns(me.netns, "ip", "route", "replace", peer.site4, "via", peer.ipv4)
        assert route.returncode == 0, route.stderr
    reply = udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"manual",
                         timeout=60)  # fmt: skip
    assert reply == b"launam"
    assert "spi 0x00001001" in in_netns(h1.netns, "ip", "xfrm", "state").stdout
    second = recap(run_playbook(PLAYBOOK, plan, *keys))
    assert all(s["changed"] == 0 and s["failures"] == 0 for s in second.values())
