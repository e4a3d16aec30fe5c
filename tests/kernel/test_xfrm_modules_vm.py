"""keyway.ipsec.xfrm_state and xfrm_policy against the VM's kernel, through Ansible's
module protocol (args in, JSON result out, as on a managed host): a manually keyed
tunnel that carries traffic, a second run that changes nothing, check mode that
changes nothing, and results that never show a key.

ansible-playbook itself runs these modules in tests/integration (policies, on the host):
a controller in this emulated guest takes over ten minutes per run.
"""

from __future__ import annotations

import json
import os
import secrets

import pytest

from ansible_collections.keyway.ipsec.plugins.modules import xfrm_policy, xfrm_state
from tests.fixtures.ansible import run_module
from tests.fixtures.netns import in_netns, udp_exchange

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)
REQID = 0x4B570001


def _tasks(me, peer, key_out: str, key_in: str) -> list[tuple]:
    def tmpl(src, dst):
        return [{"proto": "esp", "mode": "tunnel", "reqid": REQID, "src": src, "dst": dst}]

    sa = dict(netns=me.netns, reqid=REQID, enc_alg="aes-gcm-16", esn=False)
    spi_out, spi_in = (0x1001, 0x1002) if me.name == "h1" else (0x1002, 0x1001)
    return [
        (xfrm_state.main, {**sa, "src": me.ipv4, "dst": peer.ipv4, "spi": spi_out,
                           "enc_key": key_out}),
        (xfrm_state.main, {**sa, "src": peer.ipv4, "dst": me.ipv4, "spi": spi_in,
                           "enc_key": key_in}),
        (xfrm_policy.main, {"netns": me.netns, "dir": "out",
                            "selector": {"src": me.site4, "dst": peer.site4},
                            "templates": tmpl(me.ipv4, peer.ipv4)}),
        *[(xfrm_policy.main, {"netns": me.netns, "dir": d,
                              "selector": {"src": peer.site4, "dst": me.site4},
                              "templates": tmpl(peer.ipv4, me.ipv4)}) for d in ("in", "fwd")],
    ]  # fmt: skip


def test_manual_keying_through_the_modules_carries_traffic_and_is_idempotent(netns_hosts):
    h1, h2 = netns_hosts(2).hosts
    k12, k21 = secrets.token_hex(20), secrets.token_hex(20)
    tasks = _tasks(h1, h2, k12, k21) + _tasks(h2, h1, k21, k12)
    first = [run_module(main, args) for main, args in tasks]
    assert all(r["changed"] and not r.get("failed") for r in first), first
    for me, peer in ((h1, h2), (h2, h1)):
        route = in_netns(me.netns, "ip", "route", "replace", peer.site4, "via", peer.ipv4)
        assert route.returncode == 0, route.stderr
    reply = udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"manual",
                         timeout=60)  # fmt: skip
    assert reply == b"launam"
    second = [run_module(main, args) for main, args in tasks]
    differences = [
        {k: (r["diff"]["before"].get(k), v) for k, v in r["diff"]["after"].items()
         if r["diff"]["before"].get(k) != v}
        for r in second if r["changed"]
    ]  # fmt: skip
    assert not differences, differences
    # A new key in check mode: reported as a change, the kernel left alone; no key shown.
    main, args = tasks[0]
    checked = run_module(main, {**args, "enc_key": secrets.token_hex(20)}, check=True)
    assert checked["changed"] and checked["diff"]["before"]["enc_key"] == "<20 bytes>"
    assert k12 not in json.dumps(first + second + [checked])
    assert udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"again",
                        timeout=60) == b"niaga"  # fmt: skip
