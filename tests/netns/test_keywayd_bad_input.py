"""keywayd facing what anyone who reaches its ports or its host can do: floods of wrong
credentials and garbage, and a second keywayd started with the same config. The
tunnels it serves must not notice, and nothing it keeps or logs may grow with the flood."""

from __future__ import annotations

import json
import sys

import pytest

from tests.fixtures.keywayd import ENTRY, ROOT, site_connection
from tests.fixtures.netns import in_netns, udp_exchange

GARBAGE = 6000
WRONG_PSK_ATTEMPTS = 300


def traffic_flows(a, b) -> bool:
    return udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ping") == b"gnip"


def test_wrong_psks_and_garbage_leave_no_state_and_cost_a_few_log_lines(netns_hosts, agents):
    a, b, c = netns_hosts(3).hosts
    agent_b = agents(
        b,
        {
            "ab": site_connection(b, a, start=False),
            "bc": site_connection(b, c, start=False),  # c's address is configured: IKE_AUTH runs
        },
        log_level=None,  # the config's: info, as in production (debug traces every message)
    )
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.wait_for(lambda: agent_b.sas("ab"), "ab established")
    spis = agent_b.child_spis("ab")
    lines_before = len(agent_b.log().splitlines())
    spec = {
        "local": c.ipv4,
        "peer": b.ipv4,
        "local_id": f"{c.name}.lab",
        "remote_id": f"{b.name}.lab",
        "local_ts": c.site4,
        "remote_ts": b.site4,
        "attempts": WRONG_PSK_ATTEMPTS,
        "garbage": GARBAGE,
        "stranger": c.site4_address,  # no connection of b's names it
        "strangers": 3000,
    }
    flood = in_netns(
        c.netns, sys.executable, "-m", "tests.fixtures.flood", json.dumps(spec), cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert flood.returncode == 0, flood.stderr
    assert json.loads(flood.stdout)["auth_failed"] == WRONG_PSK_ATTEMPTS
    # Every failed IKE SA was freed at once: only the real tunnel is listed.
    listed = agent_b.ctl("list-sas")
    assert [(sa["connection"], sa["state"]) for sa in listed] == [("ab", "established")]
    flood_log = agent_b.log().splitlines()[lines_before:]
    # Each message template passes 10 times a minute; the flood sent 9,300 provocations.
    assert 0 < len(flood_log) <= 100, "\n".join(flood_log[:200])
    assert any("IKE_AUTH from" in line and "failed" in line for line in flood_log)
    assert any("dropped datagram from" in line for line in flood_log)
    assert any(f"IKE_SA_INIT from ('{c.site4_address}'" in line for line in flood_log)
    assert any("matches no connection" in line for line in flood_log)
    # The junk to 4500 is ESP on unknown SPIs from c, with which b shares no IKE SA.
    assert any("ESP for unknown SPI" in line for line in flood_log)
    assert agent_b.child_spis("ab") == spis
    assert traffic_flows(a, b)


def test_half_open_sas_from_a_peer_s_address_neither_list_nor_block_its_connection(
    netns_hosts, agents
):
    """Issue 14, item 24: IKE_SA_INITs from a configured peer's address that never go on
    are the responder's half-open SAs: counted in status, not listed under a connection
    (none is theirs before IKE_AUTH), and not taken for that connection coming up."""
    b, c = netns_hosts(2).hosts
    agent_b = agents(b, {"bc": site_connection(b, c, start=False)})
    spec = {
        "local": c.ipv4, "peer": b.ipv4, "local_id": f"{c.name}.lab",
        "remote_id": f"{b.name}.lab", "local_ts": c.site4, "remote_ts": b.site4,
        "attempts": 0, "half_open": 20, "garbage": 0,
    }  # fmt: skip
    flood = in_netns(c.netns, sys.executable, "-m", "tests.fixtures.flood", json.dumps(spec),
                     cwd=ROOT, timeout=120)  # fmt: skip
    assert flood.returncode == 0, flood.stderr
    agent_b.wait_for(lambda: agent_b.ctl("status")["half_open"] == 20, "20 half-open SAs")
    assert agent_b.ctl("list-sas") == []
    (conn,) = agent_b.ctl("list-conns")
    assert conn["state"] == "down"
    agents(c, {"bc": site_connection(c, b, start=False)})
    # The real c now answers: b's initiation is not mistaken for one on its way.
    assert agent_b.ctl("initiate", connection="bc", timeout=10)["up"]
    assert [sa["connection"] for sa in agent_b.ctl("list-sas")] == ["bc"]
    assert udp_exchange(b.netns, c.netns, b.site4_address, c.site4_address, b"hi") == b"ih"


def test_a_second_keywayd_with_the_same_config_refuses_and_takes_nothing(netns_hosts, agents):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    spis = agent_a.child_spis("ab")
    second = in_netns(
        a.netns, sys.executable, "-m", ENTRY, "--config", str(agent_a.config_path),
        cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1, second.stderr
    assert f"another keywayd (pid {agent_a.process.pid}) is running" in second.stderr
    assert agent_a.ctl("status")  # its control socket is still its own
    assert agent_a.child_spis("ab") == spis
    assert traffic_flows(a, b)
    # Stopped cleanly, it leaves neither socket nor lock; a new one starts at once.
    assert agent_a.stop() == 0
    assert not list(agent_a.workdir.glob("keywayd.sock*"))
    agent_a.start()
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established again")


def test_a_keywayd_killed_with_sigkill_does_not_block_its_restart(netns_hosts, agents):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.kill()
    assert agent_a.process.returncode == -9
    agent_a.start()  # raises if the dead daemon's lock or socket were in the way
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established after the restart")


@pytest.mark.parametrize("group", ["modp768", "modp1024"])
def test_weak_groups_allowed_by_config_work_at_both_ends(netns_hosts, agents, group):
    """Issue 14, item 5, through keywayd's config: modp768/1024 with allow_weak killed an
    initiating keywayd at start (a traceback, its control socket left behind) and made a
    responder log a traceback per IKE_SA_INIT. Both ends now negotiate them."""
    a, b = netns_hosts(2).hosts

    def weak(conn: dict) -> dict:
        return {**conn, "allow_weak": True, "proposals": [f"aes128-sha256-{group}"]}

    agent_b = agents(b, {"ab": weak(site_connection(b, a, start=False))})
    agent_a = agents(a, {"ab": weak(site_connection(a, b, start=True))})
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established on the weak group")
    assert agent_a.sas("ab")[0]["proposal"].endswith(group)
    assert traffic_flows(a, b)
    for agent in (agent_a, agent_b):
        assert "Traceback" not in agent.log()


@pytest.mark.parametrize(("unique", "kept"), [("no", 1), ("never", 2)])
def test_unique_through_keywayd_decides_what_initial_contact_does(
    netns_hosts, agents, unique, kept
):
    """Issue 14, item 7 (`unique` was parsed and ignored), through keywayd's config: a
    restarted initiator's new IKE SA carries INITIAL_CONTACT; under swanctl's default
    `no` the responder deletes the old IKE SA of that identity, under `never` it keeps
    it (until it times out)."""
    a, b = netns_hosts(2).hosts
    agent_b = agents(b, {"ab": {**site_connection(b, a, start=False), "unique": unique}})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established")
    (first,) = agent_b.sas("ab")
    agent_a.kill()  # no Delete sent: b still holds the first IKE SA
    agent_a.start()
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established again")
    agent_b.wait_for(
        lambda: (
            len(agent_b.sas("ab")) == kept
            and any(sa["spi_i"] != first["spi_i"] for sa in agent_b.sas("ab"))
        ),
        f"{kept} IKE SA(s) at the responder",
    )
    assert (first["spi_i"] in [sa["spi_i"] for sa in agent_b.sas("ab")]) == (unique == "never")
    assert traffic_flows(a, b)


def test_log_level_debug_from_the_config_traces_each_message(netns_hosts, agents):
    """Issue 14, item 19, through the config key (no --log-level on the command line):
    info logs no message trace; `log_level: debug`, applied by a reload, does."""
    a, b = netns_hosts(2).hosts
    conns = {"ab": site_connection(b, a, start=False)}
    agent_b = agents(b, conns, log_level=None)
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.wait_for(lambda: agent_b.child_spis("ab"), "ab established")
    assert "DEBUG" not in agent_b.log()
    agent_b.write_config(conns, log_level="debug")
    agent_b.ctl("reload")
    agent_a.ctl("rekey", connection="ab", child="sites")
    # The response is traced after the new SA is installed, a moment after the
    # request's line: wait for the last line, then check both.
    agent_b.wait_for(lambda: "ab: sending CREATE_CHILD_SA response" in agent_b.log(), "a trace")
    assert "ab: received CREATE_CHILD_SA request" in agent_b.log()
