"""The agent role's teardown on the kernel data plane: a host whose keywayd had kernel
ESP SAs, policies and routes is, after the role's absent tasks, as it was before Keyway
came (the snapshot of tests/integration/test_teardown.py, which runs teardown.yml on
the userspace plane), and its peer has dropped the link.

The modules run as the lab's netns connection runs them, one process in the host's
namespace; not under ansible-playbook, whose controller in this emulated guest takes
over six minutes for a two-host site.yml. The absent step runs the role's own module
tasks (roles/agent/tasks/absent.yml), rendered with the role's variables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from tests.fixtures.ansible import ROOT, run_module_in_netns
from tests.fixtures.keywayd import PSK, Keywayd, site_connection
from tests.fixtures.netns import in_netns, udp_exchange
from tests.integration.test_teardown import snapshot

pytestmark = pytest.mark.skipif(
    os.environ.get("KEYWAY_IN_VM") != "1", reason="runs inside the VM tier (tools/vm_run.py)"
)
SLOW = 300  # seconds: Python in the emulated guest is 10 to 25 times slower


def role_vars(host) -> dict:
    return {
        "agent_config": f"{host.config_dir}/keywayd.yml",
        "agent_lib_dir": f"{host.state_dir}/lib",
        "agent_run_dir": host.run_dir,
    }


def install(host, peer) -> dict:
    """What the role's present tasks do on a lab host: the config, then keywayd."""
    paths = role_vars(host)
    run_module_in_netns(host.netns, "agent_config", {
        "path": paths["agent_config"],
        "settings": {"dataplane": "kernel",
                     "control_socket": f"{host.run_dir}/keywayd.sock"},
        "connections": {"link": {k: v for k, v in site_connection(host, peer, start=False)
                                 .items() if k != "psk"}},
        "psks": {"link": PSK},
        "reload": False,
    })  # fmt: skip
    return run_module_in_netns(host.netns, "keywayd", {
        "config": paths["agent_config"], "lib_dir": paths["agent_lib_dir"],
        "run_dir": paths["agent_run_dir"], "python": sys.executable,
        "wait": 0, "ready_timeout": SLOW,
    }, timeout=2 * SLOW)  # fmt: skip


def absent_tasks(host) -> list[tuple[str, dict]]:
    """The role's absent tasks that run on a lab host (not the systemd ones), as
    (module, args) with the role's variables rendered."""
    tasks = yaml.safe_load((ROOT / "roles/agent/tasks/absent.yml").read_text())
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    found = []
    for task in tasks:
        for key, args in task.items():
            if key.startswith("keyway.ipsec."):
                rendered = {k: env.from_string(str(v)).render(role_vars(host))
                            for k, v in args.items()}  # fmt: skip
                found.append((key.removeprefix("keyway.ipsec."), rendered))
    return found


def test_the_role_s_teardown_on_the_kernel_plane_leaves_nothing(netns_hosts, tmp_path):
    plan = netns_hosts(2)
    h1, h2 = plan.hosts
    for folder in (h2.config_dir, h2.state_dir, h2.run_dir):  # Keyway makes its own
        Path(folder).rmdir()
    before = snapshot(h2)
    install(h2, h1)
    # The peer, not under test, runs from the tests' fixture.
    peer = Keywayd(h1.netns, tmp_path / "h1", {"link": site_connection(h1, h2, start=True)},
                   dataplane="kernel", timeout=SLOW)  # fmt: skip
    peer.wait_for(lambda: peer.sas("link"), "link established", SLOW)
    assert control.request(f"{h2.run_dir}/keywayd.sock", "status")["dataplane"] == "kernel"
    reply = udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"k1",
                         timeout=60)  # fmt: skip
    assert reply == b"1k"
    installed = snapshot(h2)
    assert "proto esp" in installed["xfrm"] and installed["processes"] and installed["files"]

    tasks = absent_tasks(h2)
    assert [name for name, _args in tasks] == ["keywayd", "agent_config"]
    for name, args in tasks:
        assert args["state"] == "absent"
        assert run_module_in_netns(h2.netns, name, args, timeout=2 * SLOW)["changed"]
    assert snapshot(h2) == before
    # h2's keywayd told h1 on its way out: h1 holds no SA of the link any more (its
    # start_action has it try again, in vain).
    assert not [sa for sa in peer.ctl("list-sas") if sa["state"] == "established"
                or sa["children"]]  # fmt: skip
    assert "proto esp" not in in_netns(h1.netns, "ip", "xfrm", "state").stdout
    peer.stop(timeout=SLOW)
