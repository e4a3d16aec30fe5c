"""keyway.ipsec.xfrm_policy, xfrm_state and xfrm_info through ansible-playbook against
lab namespaces on this host's kernel (policies; SAs are refused here, precisely)."""

from __future__ import annotations

import json
import secrets

from tests.fixtures.ansible import ROOT, recap, run_playbook
from tests.fixtures.netns import in_netns

PLAYBOOK = str(ROOT / "tests/integration/xfrm_manual.yml")


def _keys() -> tuple[str, ...]:
    return ("-e", f"key_h1={secrets.token_hex(20)} key_h2={secrets.token_hex(20)}")


def _task(proc, name: str) -> dict:
    for play in json.loads(proc.stdout)["plays"]:
        for task in play["tasks"]:
            if task["name"] == name:
                return task["hosts"]
    raise AssertionError(name)


def test_policies_are_declarative_idempotent_and_foreign_ones_untouched(netns_hosts):
    plan = netns_hosts(2)
    h1 = plan.hosts[0]
    # A foreign daemon's policy on h1: never listed, never touched.
    foreign_policy = "src 10.9.0.0/24 dst 10.8.0.0/24 dir out tmpl proto esp reqid 7"
    foreign = in_netns(h1.netns, "ip", "xfrm", "policy", "add", *foreign_policy.split())
    assert foreign.returncode == 0, foreign.stderr
    first = run_playbook(PLAYBOOK, plan, "-e", "with_sas=false", *_keys())
    assert all(s["changed"] == 3 and s["failures"] == 0 for s in recap(first).values())
    info = _task(first, "What Keyway holds")["h1"]["ansible_facts"]["keyway_xfrm"]
    dirs = sorted((p["dir"], p["action"]) for p in info["policies"])
    assert dirs == [("fwd", "protect"), ("in", "protect"), ("out", "pass"), ("out", "protect")]
    kernel = in_netns(h1.netns, "ip", "xfrm", "policy").stdout
    assert "reqid 1263992833" in kernel and "reqid 7" in kernel
    # Second run: nothing to do; check mode with diff: nothing either.
    again = run_playbook(PLAYBOOK, plan, "-e", "with_sas=false", *_keys())
    assert all(s["changed"] == 0 for s in recap(again).values())
    checked = run_playbook(PLAYBOOK, plan, "-e", "with_sas=false", "--check", "--diff", *_keys())
    assert all(s["changed"] == 0 for s in recap(checked).values())


def test_an_sa_the_kernel_refuses_fails_with_its_reason_and_no_key_shown(netns_hosts):
    plan = netns_hosts(2)
    keys = _keys()
    proc = run_playbook(PLAYBOOK, plan, *keys, check=False)
    assert proc.returncode != 0
    failed = _task(proc, "SAs")["h1"]
    message = json.dumps(failed)
    assert "kernel refused" in message and "errno 38" in message  # no AEAD on this kernel
    for key in keys[1].split():
        assert key.split("=")[1] not in proc.stdout  # no_log: keys never in task output
