"""keywayd in lab namespaces over real UDP, carrying traffic through the userspace plane:
establish, rekeys under traffic (lost packets counted), byte limits, reload, restarts,
INITIAL_CONTACT, trap policies, bad input next to good tunnels, and SIGTERM."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import keywayctl
from ansible_collections.keyway.ipsec.plugins.modules import tunnel as tunnel_module
from tests.fixtures.ansible import run_module
from tests.fixtures.capture import Capture
from tests.fixtures.keywayd import PSK, Keywayd, Watch, site_connection
from tests.fixtures.netns import in_netns, udp_exchange
from tests.fixtures.traffic import stream


def traffic_flows(a, b) -> bool:
    return udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ping") == b"gnip"


def pair(netns_hosts, agents, **child):
    a, b = netns_hosts(2).hosts
    agent_b = agents(b, {"ab": site_connection(b, a, start=False, **child)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True, **child)})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    agent_b.wait_for(lambda: agent_b.sas("ab"), "ab established on b")
    return a, b, agent_a, agent_b


def test_two_agents_establish_carry_traffic_and_agree_on_their_sas(netns_hosts, agents):
    a, b, agent_a, agent_b = pair(netns_hosts, agents)
    assert traffic_flows(a, b) and traffic_flows(b, a)
    (sa_a,), (sa_b,) = agent_a.sas(), agent_b.sas()
    assert (sa_a["spi_i"], sa_a["spi_r"]) == (sa_b["spi_i"], sa_b["spi_r"])
    assert sa_a["initiator"] and not sa_b["initiator"]
    assert sa_a["proposal"] == sa_b["proposal"] == "aes256gcm16-prfsha384-x25519"
    (child_a,), (child_b,) = sa_a["children"], sa_b["children"]
    assert (child_a["spi_in"], child_a["spi_out"]) == (child_b["spi_out"], child_b["spi_in"])
    assert child_a["local_ts"] == [a.site4] and child_a["remote_ts"] == [b.site4]
    # Both exchanges were counted on both SAs of each side.
    assert child_a["packets_out"] >= 2 and child_a["packets_in"] >= 2
    assert child_b["packets_in"] >= 2
    # Keys and the PSK never leave the daemon: not in the socket's answers, not in logs.
    everything = json.dumps(agent_a.ctl("list-sas")) + json.dumps(agent_a.ctl("list-conns"))
    for agent in (agent_a, agent_b):
        assert PSK not in agent.log() and PSK.encode().hex() not in agent.log()
    # The fixture's `--log-level debug` wins over the config's (default) info: the
    # exchange-by-exchange trace is there.
    assert "ab: sending IKE_AUTH request #1 [" in agent_a.log()
    # Until IKE_AUTH authenticates the peer, which connection it is is not known: the
    # responder traces the peer's address (a soak's trace named the first connection).
    assert f"{a.ipv4}:500: received IKE_AUTH request #1 [" in agent_b.log()
    assert "ab: sending IKE_AUTH response #1 [" in agent_b.log()
    assert PSK not in everything and "key" not in everything
    status = agent_a.ctl("status")
    assert status["ike_sas"] == 1 and status["child_sas"] == 1
    assert status["dataplane"] == "userspace"
    metrics = agent_a.ctl("metrics")
    assert (
        "keyway_ike_sas 1" in metrics and 'keyway_child_sa_packets_out{connection="ab"' in metrics
    )


def _stream_through_rekeys(netns_hosts, agents, count: int, **child):
    """Two agents with `child` settings; a stream of `count` packets a -> b at 15 ms
    gaps; returns the agents, how many arrived, and each end's rekeyed Child SAs."""
    a, b, agent_a, agent_b = pair(netns_hosts, agents, **child)
    watch_a, watch_b = Watch(agent_a), Watch(agent_b)
    arrived = stream(a, b, count=count, gap=0.015)
    rekeys = [
        [e for e in _drain(watch) if e["event"] == "ChildSaReady" and e["rekeyed_from"]]
        for watch in (watch_a, watch_b)
    ]
    return agent_a, agent_b, arrived, rekeys


def test_rekeys_on_a_short_schedule_lose_no_packets(netns_hosts, agents):
    agent_a, _, arrived, (rekeys_a, rekeys_b) = _stream_through_rekeys(
        netns_hosts, agents, 600, rekey_time="3s", life_time="6s", rand_time="1s"
    )  # about 10 s: three rekeys or more
    assert len(rekeys_a) >= 2 and len(rekeys_b) >= 2
    assert arrived == 600, f"{600 - arrived} packets lost across {len(rekeys_a)} rekeys"
    assert len(agent_a.child_spis("ab")) == 1  # old SAs deleted after each rekey


def test_both_ends_rekeying_at_the_same_moments_lose_no_packets(netns_hosts, agents):
    """rand_time 0 on both ends: their Child SA rekeys fall due together and cross on
    the wire; the collision rules leave one SA pair and the stream loses nothing."""
    agent_a, agent_b, arrived, (ready_a, ready_b) = _stream_through_rekeys(
        netns_hosts, agents, 500, rekey_time="2s", life_time="20s", rand_time="0s"
    )  # about 7.5 s: three rounds or more
    settled = [
        line
        for line in (agent_a.log() + agent_b.log()).splitlines()
        if "collision" in line or "for now" in line
    ]
    assert arrived == 500, f"{500 - arrived} packets lost; collisions: {settled}"
    # Both ends started rekeys (each saw Child SAs made by exchanges it initiated).
    assert any(e["initiated"] for e in ready_a) and any(e["initiated"] for e in ready_b)
    agent_a.wait_for(
        lambda: (
            len(agent_a.child_spis("ab")) == 1
            and {(i, o) for o, i in agent_b.child_spis("ab")} == agent_a.child_spis("ab")
        ),
        "one agreed SA pair",
    )


def _drain(watch: Watch) -> list[dict]:
    items = []
    while not watch.events.empty():
        items.append(watch.events.get())
    return items


def test_a_byte_limit_rekeys_the_child(netns_hosts, agents):
    a, b, agent_a, agent_b = pair(netns_hosts, agents, rekey_bytes="20k", life_bytes="10m")
    before = agent_a.child_spis("ab")
    watch = Watch(agent_b)
    arrived = stream(a, b, count=200, gap=0.002, size=400)  # 80 kB: several soft limits
    rekeyed = watch.next("ChildSaReady", timeout=10)
    assert rekeyed["rekeyed_from"]
    assert agent_a.child_spis("ab") != before
    assert arrived == 200


def test_reload_changes_one_connection_and_leaves_the_other_untouched(netns_hosts, agents):
    a, b, c = netns_hosts(3).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_c = agents(c, {"ac": site_connection(c, a, start=False)})
    conns = {"ab": site_connection(a, b, start=True), "ac": site_connection(a, c, start=True)}
    agent_a = agents(a, conns)
    for name in ("ab", "ac"):
        agent_a.wait_for(lambda name=name: agent_a.sas(name), f"{name} established")
    ab_before = agent_a.sas("ab")[0]
    ac_before = agent_a.sas("ac")[0]

    # A bad file changes nothing, and says what is wrong where.
    broken = {**conns, "ac": {**conns["ac"], "proposals": ["aes256gcm16-prfsha384-nosuch"]}}
    agent_a.write_config(broken)
    with pytest.raises(Exception, match=r"connections\.ac\.proposals"):
        agent_a.ctl("reload")
    assert agent_a.sas("ac")[0]["spi_i"] == ac_before["spi_i"]

    # ac moves to another proposal (on both ends); ab is not touched.
    new_ac = "aes128gcm16-prfsha256-ecp256"
    agent_c.write_config({"ac": {**site_connection(c, a, start=False), "proposals": [new_ac]}})
    assert agent_c.ctl("reload")["changed"] == ["ac"]
    agent_a.write_config({**conns, "ac": {**conns["ac"], "proposals": [new_ac]}})
    result = agent_a.ctl("reload")
    assert result["changed"] == ["ac"] and result["unchanged"] == ["ab"]
    agent_a.wait_for(
        lambda: [s for s in agent_a.sas("ac") if s["proposal"] == new_ac], "ac re-established"
    )
    assert agent_a.sas("ab") == [
        {**ab_before, "children": agent_a.sas("ab")[0]["children"]}
    ]  # same IKE SA ...
    assert [(c["spi_in"], c["spi_out"]) for c in agent_a.sas("ab")[0]["children"]] == [
        (c["spi_in"], c["spi_out"]) for c in ab_before["children"]
    ]  # ... and the same Child SA
    assert traffic_flows(a, b) and traffic_flows(a, c)
    # Removing a connection closes it at the peer too.
    agent_a.write_config({"ab": conns["ab"]})
    assert agent_a.ctl("reload")["removed"] == ["ac"]
    agent_c.wait_for(lambda: not agent_c.sas("ac"), "ac closed at c")
    assert agent_a.sas("ab")[0]["spi_i"] == ab_before["spi_i"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"esp_proposals": ["aes128gcm16"]}, "aes128gcm16"),
        ({"remote_ts_extra": "10.250.0.0/24"}, "aes256gcm16"),
    ],
    ids=["proposal", "selectors"],
)
def test_a_changed_connection_is_renegotiated_make_before_break(
    netns_hosts, agents, change, expected
):
    """Both ends reload a changed connection (one after the other, as a rolling playbook
    run does) under a counted stream: a new IKE SA and Child SA first, then the old ones
    go; nothing is lost."""
    a, b, agent_a, agent_b = pair(netns_hosts, agents)
    before = agent_a.child_spis("ab")
    extra = change.pop("remote_ts_extra", None)
    conn_b = site_connection(b, a, start=False, **change)
    conn_a = site_connection(a, b, start=True, **change)
    if extra:  # a's side also protects a second prefix (b's view mirrors it)
        conn_a["children"]["sites"]["local_ts"].append(extra)
        conn_b["children"]["sites"]["remote_ts"].append(extra)
    results = []

    def reload_both() -> None:
        time.sleep(1.5)
        agent_b.write_config({"ab": conn_b})
        results.append(agent_b.ctl("reload"))
        agent_a.write_config({"ab": conn_a})
        results.append(agent_a.ctl("reload"))

    worker = threading.Thread(target=reload_both)
    worker.start()
    arrived = stream(a, b, count=400, gap=0.015)
    worker.join()
    assert [r["changed"] for r in results] == [["ab"], ["ab"]]
    assert results[1]["reauthenticated"] == ["ab"]
    assert arrived == 400, f"{400 - arrived} packets lost across the change"
    agent_a.wait_for(lambda: len(agent_a.sas("ab")) == 1, "one IKE SA left at a")
    (sa,) = agent_a.sas("ab")
    (child,) = sa["children"]
    assert child["proposal"].startswith(expected)
    assert (child["spi_in"], child["spi_out"]) not in before
    if extra:
        assert extra in child["local_ts"]


def test_keywayctl_initiate_brings_a_connection_up_and_reports_it(netns_hosts, agents, capsys):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=False)})
    assert keywayctl.main(["--socket", agent_a.socket, "initiate", "ab", "--timeout", "20"]) == 0
    assert json.loads(capsys.readouterr().out)["up"] is True
    assert agent_a.sas("ab")
    assert keywayctl.main(["--socket", agent_a.socket, "initiate", "ab", "--no-wait"]) == 0
    assert json.loads(capsys.readouterr().out) == {"up": True, "already": True}
    # --json before or after the command; without it, list-sas is a table.
    for argv in (["--json", "list-sas"], ["list-sas", "--json"]):
        assert keywayctl.main(["--socket", agent_a.socket, *argv]) == 0
        assert [sa["connection"] for sa in json.loads(capsys.readouterr().out)] == ["ab"]
    assert keywayctl.main(["--socket", agent_a.socket, "list-sas"]) == 0
    assert capsys.readouterr().out.startswith("ab: established")


def test_kill_9_and_restart_converges_and_initial_contact_clears_the_stale_sa(netns_hosts, agents):
    a, b, agent_a, agent_b = pair(netns_hosts, agents)
    old = agent_b.sas("ab")[0]["spi_i"]
    agent_a.kill()
    agent_a.start()  # same config: it initiates again, with INITIAL_CONTACT
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab re-established")
    agent_b.wait_for(
        lambda: [s["spi_i"] for s in agent_b.sas("ab")] == [agent_a.sas("ab")[0]["spi_i"]],
        "b holding only the new IKE SA",
    )
    assert agent_b.sas("ab")[0]["spi_i"] != old
    assert "peer restarted (INITIAL_CONTACT)" in agent_b.log()
    assert traffic_flows(a, b) and traffic_flows(b, a)


def test_a_trap_policy_starts_the_tunnel_on_the_first_packet(netns_hosts, agents):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=False, start_action="trap")})
    assert not agent_a.sas()
    udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"knock", timeout=1)
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established by the acquire")
    assert "acquire" in agent_a.log()
    assert traffic_flows(a, b)


def test_a_wrong_psk_fails_that_tunnel_only(netns_hosts, agents):
    a, b, c = netns_hosts(3).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_c = agents(c, {"ac": site_connection(c, a, start=False, psk="not-the-same-psk-at-all")})
    agent_a = agents(
        a, {"ab": site_connection(a, b, start=True), "ac": site_connection(a, c, start=False)}
    )
    watch = Watch(agent_a)
    with pytest.raises(Exception, match="authentication failed"):
        agent_a.ctl("initiate", connection="ac", timeout=20)
    assert watch.next("AuthFailed", connection="ac")
    assert "AUTHENTICATION_FAILED" in agent_a.log() or "authentication failed" in agent_a.log()
    assert "not-the-same-psk-at-all" not in agent_c.log()
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    assert traffic_flows(a, b)
    assert not agent_a.sas("ac")


def test_list_conns_says_why_a_connection_is_down_and_when_it_is_tried_again(netns_hosts, agents):
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False, psk="not-the-same-psk-at-all")})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    (conn,) = agent_a.wait_for(
        lambda: [c for c in agent_a.ctl("list-conns") if c["retry_in"] is not None],
        "a retry scheduled",
    )
    assert conn["state"] == "down"
    assert conn["last_error"].startswith("authentication failed: peer reports AUTHENTICATION")
    assert 0 < conn["retry_in"] <= 1.2  # the first backoff: 1 s, jittered


def test_sigterm_deletes_at_the_peer_and_leaves_nothing(netns_hosts, agents):
    a, _, agent_a, agent_b = pair(netns_hosts, agents)
    watch = Watch(agent_b)
    assert agent_a.stop() == 0
    assert watch.next("IkeSaDown", timeout=10)["reason"] == "deleted by peer"
    assert not agent_b.sas()
    links = in_netns(a.netns, "ip", "-brief", "link").stdout
    assert "kw-esp0" not in links
    assert "19287" not in in_netns(a.netns, "ip", "rule").stdout  # 0x4B57: the plane's rule
    # The peer's retries stay quiet: b has start_action none and the close was asked for.
    assert not agent_b.sas()


def test_ten_agents_in_a_star_all_carry_traffic(netns_hosts, agents):
    hub, *spokes = netns_hosts(10).hosts
    agent_hub = agents(hub, {s.name: site_connection(hub, s, start=False) for s in spokes})
    for spoke in spokes:
        agents(spoke, {"hub": site_connection(spoke, hub, start=True)})
    agent_hub.wait_for(lambda: len(agent_hub.sas()) == 9, "nine IKE SAs at the hub", 60)
    for spoke in spokes:
        assert traffic_flows(spoke, hub)
    assert agent_hub.ctl("status")["child_sas"] == 9


def test_transport_mode_between_hosts_keeps_ike_outside_the_tunnel(netns_hosts, agents):
    a, b = netns_hosts(2).hosts

    def transport(me, peer, start):
        conn = site_connection(me, peer, start=start)
        child = conn["children"]["sites"]
        child.update(mode="transport", local_ts=[f"{me.ipv4}/32"], remote_ts=[f"{peer.ipv4}/32"])
        return {"ab": conn}

    agent_b = agents(b, transport(b, a, False))
    agent_a = agents(a, transport(a, b, True))
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    (child,) = agent_a.sas("ab")[0]["children"]
    assert child["mode"] == "transport"
    echo = udp_exchange(a.netns, b.netns, a.ipv4, b.ipv4, b"host to host")
    assert echo == b"tsoh ot tsoh"
    # IKE itself still flows between the same two addresses, in the clear: a rekey
    # completes and the new SA carries the traffic.
    before = agent_a.child_spis("ab")
    agent_a.ctl("rekey", connection="ab", child="sites")
    agent_a.wait_for(
        lambda: len(spis := agent_a.child_spis("ab")) == 1 and spis != before,
        "rekeyed over IKE beside the transport-mode SA",
    )
    agent_b.wait_for(lambda: len(agent_b.child_spis("ab")) == 1, "old SA gone at b")
    assert udp_exchange(a.netns, b.netns, a.ipv4, b.ipv4, b"again") == b"niaga"


@pytest.mark.parametrize("schedule", ["rekey_time", "reauth_time"])
def test_ike_sa_rekey_and_reauthentication_on_schedule_lose_no_packets(
    netns_hosts, agents, schedule
):
    a, b = netns_hosts(2).hosts
    conn_b = {**site_connection(b, a, start=False), schedule: "3s", "rand_time": "1s"}
    conn_a = {**site_connection(a, b, start=True), schedule: "3s", "rand_time": "1s"}
    agent_b = agents(b, {"ab": conn_b})
    agent_a = agents(a, {"ab": conn_a})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    first = agent_a.sas("ab")[0]["spi_i"]
    arrived = stream(a, b, count=400, gap=0.015)  # 6 s: at least one of each
    now = agent_a.sas("ab")
    assert now and now[0]["spi_i"] != first
    assert arrived == 400, f"{400 - arrived} packets lost across {schedule} renewals"
    due = "IKE SA rekey due" if schedule == "rekey_time" else "reauthentication due"
    # Both ends keep both schedules; the end whose (jittered) time comes first renews,
    # and the engine settles any collision.
    assert due in agent_a.log() + agent_b.log()
    # One IKE SA and one Child SA each side at the end: old ones were deleted.
    agent_b.wait_for(lambda: len(agent_b.ctl("list-sas")) == 1, "one IKE SA at b")
    assert len(agent_a.sas("ab")[0]["children"]) == 1


def test_reauthentication_comes_due_through_rekeys_on_either_end(netns_hosts, agents):
    """Issue 14, item 21: with IKE rekeys every 2 s and reauth_time 5 s, the
    reauthentication still comes within its time: the deadline survives each rekey
    (it was reset, so rekeys more frequent than it postponed it forever)."""
    a, b = netns_hosts(2).hosts
    times = {"rekey_time": "2s", "reauth_time": "5s", "rand_time": "0s", "over_time": "3s"}
    agent_b = agents(b, {"ab": {**site_connection(b, a, start=False), **times}})
    agent_a = agents(a, {"ab": {**site_connection(a, b, start=True), **times}})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    both = lambda: agent_a.log() + agent_b.log()  # noqa: E731
    agent_a.wait_for(lambda: "IKE SA rekey due" in both(), "a rekey", timeout=10)
    # Reset by each rekey (every 2 s), a 5 s deadline would never come.
    agent_a.wait_for(lambda: "reauthentication due" in both(), "the reauthentication",
                     timeout=10)  # fmt: skip
    # The reauthentication made a new IKE SA from IKE_SA_INIT; nothing expired.
    agent_a.wait_for(lambda: both().count("IKE SA up with") >= 4, "the new IKE SA at both ends")
    assert "not rekeyed within over_time" not in both()
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"re") == b"er"


# a's CREATE_CHILD_SA requests to b dropped: the exchange type, byte 18 of the IKE
# header, after the 8-byte UDP header (IKE on port 500, no NAT here).
DROP_CREATE_CHILD_SA = """
table inet kwtest {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {peer} udp dport 500 @th,208,8 36 drop
  }}
}}
"""


def test_an_ike_sa_past_over_time_goes_and_a_start_connection_comes_back(netns_hosts, agents):
    """Issue 14 (the soak's c38 and c2): the IKE rekey's answers are lost until over_time.
    The SA goes then without waiting minutes for its unanswered request, and the start
    connection comes back with a new IKE SA (before, nothing brought it back)."""
    a, b = netns_hosts(2).hosts
    ours = {"rekey_time": "3s", "over_time": "3s", "rand_time": "0s"}
    agent_b = agents(b, {"ab": site_connection(b, a, start=False)})  # b never rekeys
    agent_a = agents(a, {"ab": {**site_connection(a, b, start=True), **ours}})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    first = agent_a.sas("ab")[0]["spi_i"]
    rules = DROP_CREATE_CHILD_SA.format(peer=b.ipv4)
    done = in_netns(a.netns, "nft", "-f", "-", input=rules)
    assert done.returncode == 0, done.stderr
    agent_a.wait_for(lambda: "not rekeyed within over_time" in agent_a.log(), "expiry", 20)
    assert "dropped without a Delete" in agent_a.log()  # its rekey was still unanswered
    assert in_netns(a.netns, "nft", "delete", "table", "inet", "kwtest").returncode == 0
    agent_a.wait_for(
        lambda: (sas := agent_a.sas("ab")) and sas[0]["spi_i"] != first and sas[0]["children"],
        "a new IKE SA",
        timeout=30,
    )
    assert "IKE SA expired (not rekeyed within over_time); initiating again" in agent_a.log()
    # The new IKE SA's INITIAL_CONTACT made b drop the one a dropped without a Delete.
    agent_b.wait_for(lambda: len(agent_b.ctl("list-sas")) == 1, "one IKE SA at b")
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"up") == b"pu"


def test_updown_runs_when_a_child_comes_up_and_goes_down_not_on_rekeys(
    netns_hosts, agents, tmp_path
):
    a, b = netns_hosts(2).hosts
    record = tmp_path / "updown.log"
    script = tmp_path / "updown.sh"
    script.write_text(
        f'#!/bin/sh\necho "$KEYWAY_VERB $KEYWAY_CONNECTION $KEYWAY_CHILD $KEYWAY_SPI_IN '
        f'$KEYWAY_LOCAL_TS" >> {record}\n'
    )
    script.chmod(0o700)
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True, updown=str(script))})
    agent_a.wait_for(lambda: record.exists(), "updown up")
    (sa,) = agent_a.sas("ab")
    spi_in = sa["children"][0]["spi_in"]
    agent_a.ctl("rekey", connection="ab", child="sites")  # no updown for a rekey
    agent_a.wait_for(lambda: agent_a.child_spis("ab") != {(spi_in, sa["children"][0]["spi_out"])}
                     and len(agent_a.child_spis("ab")) == 1, "rekeyed")  # fmt: skip
    agent_a.ctl("terminate", connection="ab")
    agent_a.wait_for(lambda: len(record.read_text().splitlines()) == 2, "updown down")
    up, down = record.read_text().splitlines()
    assert up == f"up ab sites {spi_in} {a.site4}"
    assert down.startswith("down ab sites ")
    assert down.split()[3] != spi_in  # the SA that was live when it went down


def test_dataplane_auto_falls_back_with_the_kernel_s_reason(netns_hosts, agents, tmp_path):
    a, b = netns_hosts(2).hosts
    agent = agents(a, {"ab": site_connection(a, b, start=False)}, dataplane="auto")
    assert agent.ctl("status")["dataplane"] == "userspace"
    # This host's kernel has XFRM but no ESP: the probe's refusal is what auto logs.
    assert "data plane: userspace, because the kernel refuses ESP SAs" in agent.log()
    assert "errno" in agent.log()
    with pytest.raises(RuntimeError, match="dataplane kernel: the kernel refuses ESP SAs"):
        Keywayd(b.netns, tmp_path / "kernel", {}, dataplane="kernel")


def test_a_dead_peer_s_sas_leave_the_data_plane(netns_hosts, agents):
    """kill -9 leaves no Delete behind: DPD finds the peer gone, and its IKE SA and Child
    SAs are removed, from the engine and from the data plane."""
    a, b = netns_hosts(2).hosts
    fast = {"retransmit_timeout": 0.3, "retransmit_base": 1.5, "retransmit_tries": 2}
    agent_b = agents(b, {"ab": site_connection(b, a, start=False)}, **fast)
    conn = {**site_connection(a, b, start=True), "dpd_delay": "1s"}
    agent_a = agents(a, {"ab": conn}, **fast)
    agent_a.wait_for(lambda: agent_a.ctl("status")["dataplane_sas"] == 2, "one SA pair")
    agent_b.kill()
    agent_a.wait_for(lambda: not agent_a.sas("ab"), "peer found dead")
    status = agent_a.ctl("status")
    assert status["ike_sas"] == status["child_sas"] == status["dataplane_sas"] == 0
    assert "peer dead" in agent_a.log()


@pytest.mark.parametrize("hint", ["dpd", "esp"])
def test_a_responder_only_peer_that_restarts_is_back_within_seconds(netns_hosts, agents, hint):
    """Issue 14, item 3. `dpd`: the restarted peer answers our liveness check (every
    2 s) with an unprotected INVALID_IKE_SPI; we negotiate a new IKE SA make-before-break
    at once instead of retransmitting to it for minutes (4 s, x1.8, 5 tries: 186 s).
    `esp`: sooner than any liveness check (300 s here), the restarted peer gets our ESP
    on an SPI it forgot and, sharing no IKE SA with us, says INVALID_SPI unprotected; we
    check liveness at once."""
    a, b = netns_hosts(2).hosts
    agent_b = agents(b, {"ab": site_connection(b, a, start=False)})
    dpd_delay = "2s" if hint == "dpd" else "300s"
    agent_a = agents(a, {"ab": {**site_connection(a, b, start=True), "dpd_delay": dpd_delay}})
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established")
    agent_b.kill()
    agent_b.start()  # start_action none: it waits for us, knowing nothing of the old SAs
    if hint == "esp":  # a packet from a's site goes into the SA b forgot: the hint
        udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"lost", timeout=1)
    agent_a.wait_for(
        lambda: agent_b.child_spis("ab")
        and agent_a.child_spis("ab") == {(o, i) for i, o in agent_b.child_spis("ab")},
        "ab back with the restarted peer", timeout=15,
    )  # fmt: skip
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"back") == b"kcab"
    assert "does not know this IKE SA (restarted?)" in agent_a.log()
    if hint == "esp":
        assert "INVALID_SPI unprotected" in agent_b.log()
        assert "unprotected INVALID_SPI): checking its liveness" in agent_a.log()
    assert "peer dead" not in agent_a.log()
    assert len(agent_a.sas("ab")) == 1
    assert len(agent_a.ctl("list-sas")) == 1  # the old IKE SA is gone, not left retrying


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_ah_children_carry_authenticated_traffic(netns_hosts, agents, mode):
    """Issue 14, item 6: ah_proposals negotiate AH; the userspace plane sends it (IP
    protocol 51: authenticated, not encrypted, so the payload shows on the wire)."""
    a, b = netns_hosts(2).hosts

    def ah_connection(me, peer, start: bool) -> dict:
        conn = site_connection(me, peer, start=start)
        child = {k: v for k, v in conn["children"]["sites"].items() if k != "esp_proposals"}
        child.update(ah_proposals=["sha256"], mode=mode)
        if mode == "transport":  # the hosts' own addresses, end to end
            child.update(local_ts=[f"{me.ipv4}/32"], remote_ts=[f"{peer.ipv4}/32"])
        return {**conn, "children": {"sites": child}}

    conn_a, conn_b = ah_connection(a, b, True), ah_connection(b, a, False)
    agents(b, {"ab": conn_b})
    agent_a = agents(a, {"ab": conn_a})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    ((child,),) = [sa["children"] for sa in agent_a.sas("ab")]
    assert (child["protocol"], child["mode"], child["proposal"]) == ("ah", mode, "sha256-noesn")
    src, dst = (a.site4_address, b.site4_address) if mode == "tunnel" else (a.ipv4, b.ipv4)
    marker = b"authenticated-not-secret"
    with Capture(a.netns, "eth0") as cap:
        assert udp_exchange(a.netns, b.netns, src, dst, marker) == marker[::-1]
    ah_frames = [f for f in cap.frames if f.ip_proto == 51]
    assert any(f.outgoing for f in ah_frames) and any(not f.outgoing for f in ah_frames)
    assert any(marker in f.data for f in ah_frames if f.outgoing)
    assert not [f for f in cap.frames if f.ip_proto == 17 and marker in f.data]


def test_a_child_whose_hard_lifetime_came_without_a_rekey_comes_back(netns_hosts, agents):
    """Issue 14, item 20: the responder's Child SA reaches its hard lifetime (4 s) before
    anyone rekeys it (the initiator has no rekey schedule). Both ends delete it; the
    `start` end creates it again on the same IKE SA, and list-conns says so."""
    a, b = netns_hosts(2).hosts
    agent_b = agents(b, {"ab": site_connection(b, a, start=False, life_time="4s",
                                               rekey_time="0s")})  # fmt: skip
    agent_a = agents(a, {"ab": site_connection(a, b, start=True, rekey_time="0s")})
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established")
    (ike,) = agent_a.sas("ab")
    first = agent_a.child_spis("ab")
    agent_a.wait_for(lambda: "hard lifetime reached" in agent_b.log(), "b's hard lifetime")
    agent_a.wait_for(
        lambda: agent_a.child_spis("ab") and agent_a.child_spis("ab") != first,
        "the child created again",
    )  # fmt: skip
    assert [sa["spi_i"] for sa in agent_a.sas("ab")] == [ike["spi_i"]]  # the same IKE SA
    assert "Child SA lost (deleted by peer): creating it again" in agent_a.log()
    (conn,) = agent_a.ctl("list-conns")
    assert conn["state"] == "established" and conn["children"][0]["child_sas"] == 1
    assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"back") == b"kcab"


def test_initiate_answers_for_a_connection_without_children_and_names_a_refused_child(
    netns_hosts, agents
):
    """Issue 14, item 17: IKE_AUTH without a Child SA (RFC 6023) is the whole
    connection; a Child SA refused on an IKE SA that came up says that the IKE SA is up."""
    a, b = netns_hosts(2).hosts
    # Identities of its own: a responder tells connections to one address apart by them.
    ids_a, ids_b = {"id": "bare-a.lab"}, {"id": "bare-b.lab"}
    bare_b = {**site_connection(b, a, start=False), "children": {}, "local": ids_b, "remote": ids_a}
    bare_a = {**site_connection(a, b, start=False), "children": {}, "local": ids_a, "remote": ids_b}
    refusing = site_connection(b, a, start=False, esp_proposals=["chacha20poly1305"])
    agents(b, {"bare": bare_b, "ab": refusing})
    agent_a = agents(a, {"bare": bare_a, "ab": site_connection(a, b, start=False)})
    assert agent_a.ctl("initiate", connection="bare", timeout=10) == {"up": True, "ike_only": True}
    with pytest.raises(Exception, match=r"NO_PROPOSAL_CHOSEN \(the IKE SA is up\)"):
        agent_a.ctl("initiate", connection="ab", timeout=10)


@pytest.mark.parametrize("start_action", ["start", "trap", "close_action"])
def test_a_child_sa_the_peer_deletes_comes_back_on_the_same_ike_sa(
    netns_hosts, agents, start_action
):
    """Issue 14, item 2: `start` children come back at once on CREATE_CHILD_SA, `trap`
    ones on their next packet; the IKE SA stays. `close_action: start` brings back a
    child the operator initiated (`start_action: none`) the same way."""
    a, b = netns_hosts(2).hosts
    agent_b = agents(b, {"ab": site_connection(b, a, start=False)})
    if start_action == "close_action":
        conn_a = site_connection(a, b, start=False, close_action="start")
    else:
        conn_a = site_connection(a, b, start=True, start_action=start_action)
    agent_a = agents(a, {"ab": conn_a})
    if start_action == "close_action":
        agent_a.ctl("initiate", connection="ab", timeout=10)

    def knock() -> None:  # a packet for the trap policy: its acquire starts the SA
        udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"knock", timeout=1)

    if start_action == "trap":
        knock()  # the first packet brings the tunnel up
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab established")
    ike, first = agent_a.sas("ab")[0]["spi_i"], agent_a.child_spis("ab")
    agent_b.ctl("terminate", connection="ab", child="sites")  # the peer deletes the child
    if start_action == "trap":
        agent_a.wait_for(lambda: not agent_a.child_spis("ab"), "the child gone at a")
        assert agent_a.sas("ab")  # the IKE SA lives on
        knock()  # its next packet brings it back
    agent_a.wait_for(
        lambda: agent_a.child_spis("ab") and agent_a.child_spis("ab") != first,
        "a new Child SA",
        timeout=15,
    )
    assert agent_a.sas("ab")[0]["spi_i"] == ike  # on the same IKE SA
    assert traffic_flows(a, b)


def test_the_tunnel_module_brings_a_connection_up_down_and_rekeys_it(netns_hosts, agents):
    """keyway.ipsec.tunnel against real agents: up and down idempotent, check mode
    changes nothing, a connection taken down stays down, rekeys make new SAs."""
    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)})
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")

    def tunnel(check=False, **args):
        return run_module(tunnel_module.main, {"socket": agent_a.socket, **args}, check=check)

    up = tunnel(name="ab")
    assert not up["changed"] and up["connection"]["state"] == "established"
    assert not tunnel(name="ab", state="down", check=True).get("failed")
    assert agent_a.sas("ab"), "check mode took it down"
    down = tunnel(name="ab", state="down")
    assert down["changed"] and down["sas"] == [] and down["connection"]["state"] == "down"
    assert not tunnel(name="ab", state="down")["changed"]
    assert agent_a.sas("ab") == []  # start_action start, yet it stays down
    up = tunnel(name="ab", timeout=20)
    assert up["changed"] and up["connection"]["state"] == "established"
    ike_spi = up["sas"][0]["spi_i"]
    (child,) = up["sas"][0]["children"]

    def child_spis() -> list[str]:
        return [c["spi_in"] for sa in agent_a.sas("ab") for c in sa["children"]]

    def ike_spis() -> list[str]:
        return [sa["spi_i"] for sa in agent_a.sas("ab")]

    def replaced(old: str, spis) -> bool:  # a successor there, the old one gone
        now = spis()
        return bool(now) and old not in now

    assert tunnel(name="ab", child="sites", state="rekeyed")["changed"]
    agent_a.wait_for(lambda: replaced(child["spi_in"], child_spis), "the child rekeyed")
    assert tunnel(name="ab", state="rekeyed")["changed"]
    agent_a.wait_for(lambda: replaced(ike_spi, ike_spis), "the IKE SA rekeyed")
    assert traffic_flows(a, b)
    # Bad input names what is wrong.
    assert "has no connection 'nope' (it has: ab)" in tunnel(name="nope")["msg"]
    assert "has no child 'x'" in tunnel(name="ab", child="x", state="down")["msg"]


def test_metrics_over_http_parse_as_prometheus_text_and_match_keywayctl(netns_hosts, agents):
    """metrics_listen: GET /metrics from another namespace, read by prometheus_client's
    own parser; other paths and methods get their HTTP error."""
    from prometheus_client.parser import text_string_to_metric_families

    a, b = netns_hosts(2).hosts
    agents(b, {"ab": site_connection(b, a, start=False)})
    agent_a = agents(a, {"ab": site_connection(a, b, start=True)},
                     metrics_listen=f"{a.ipv4}:9571")  # fmt: skip
    agent_a.wait_for(lambda: agent_a.sas("ab"), "ab established")
    assert traffic_flows(a, b)
    fetch = (
        "import sys, urllib.request, urllib.error\n"
        "req = urllib.request.Request(sys.argv[1], method=sys.argv[2])\n"
        "try:\n"
        "    r = urllib.request.urlopen(req, timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )

    def get(path: str, method: str = "GET") -> tuple[int, str]:
        url = f"http://{a.ipv4}:9571{path}"
        out = in_netns(b.netns, sys.executable, "-c", fetch, url, method)
        assert out.returncode == 0, out.stderr
        code, _, body = out.stdout.partition("\n")
        return int(code), body

    code, body = get("/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["keyway_ike_sas"].samples[0].value == 1
    assert families["keyway_child_sas"].samples[0].value == 1
    (sent,) = families["keyway_child_sa_bytes_out"].samples
    assert sent.labels["connection"] == "ab" and sent.value > 0
    assert families["keyway_child_sa_bytes_out"].type == "counter"
    # The same text as keywayctl metrics (counters may have moved in between: names only).
    assert {f.name for f in text_string_to_metric_families(agent_a.ctl("metrics"))} == set(families)
    assert get("/")[0] == 404 and get("/metrics", "POST")[0] == 405


def test_a_burst_of_esp_in_udp_leaves_as_gso_sends_and_arrives_whole(netns_hosts, agents):
    """Issue 18: what one TUN read batch protects for one peer leaves as one UDP GSO
    send (the kernel cuts it into the ESP-in-UDP datagrams); each arrives, authenticated,
    at the other agent, which decrypts every one."""
    a, b = netns_hosts(2).hosts
    conn_b, conn_a = site_connection(b, a, start=False), site_connection(a, b, start=True)
    conn_a["encap"] = conn_b["encap"] = "force"  # ESP in UDP without a NAT
    agent_b = agents(b, {"ab": conn_b}, log_level="info")
    agent_a = agents(a, {"ab": conn_a}, log_level="info")
    agent_a.wait_for(lambda: agent_b.sas("ab") and agent_a.sas("ab"), "ab established")
    assert stream(a, b, 150, 0.0, size=1000) == 150  # back to back: the TUN queues them
    events = agent_a.ctl("stats")["events"]
    assert events.get("esp_udp_gso_sends", 0) >= 1
    assert events["esp_udp_gso_datagrams"] > events["esp_udp_gso_sends"]
    assert agent_b.ctl("stats").get("dataplane_drops", {}).get("icv", 0) == 0
