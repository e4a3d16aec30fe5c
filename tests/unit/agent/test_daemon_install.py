"""keywayd's handling of engine events against the recording data plane: what is
installed when, so that rekeys are make-before-break on both sides of the exchange."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import daemon
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import load_config
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import Agent
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import base
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import core
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    ChildSaDeleted,
    ChildSaReady,
)

ME, PEER = "192.0.2.11", "192.0.2.12"


class Timers:
    """The agent's loop as far as timers go: callbacks run when the test says."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[list] = []  # [due, callback, args, cancelled]

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback, *args):
        entry = [self.now + delay, callback, args, False]
        self.pending.append(entry)

        class Handle:
            def cancel(self) -> None:
                entry[3] = True

        return Handle()

    def call_at(self, when: float, callback, *args):
        return self.call_later(when - self.now, callback, *args)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [e for e in self.pending if e[0] <= self.now and not e[3]]
        self.pending = [e for e in self.pending if e not in due]
        for _, callback, args, _ in due:
            callback(*args)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    config = {
        "connections": {
            "ab": {
                "local_addrs": [ME],
                "remote_addrs": [PEER],
                "local": {"id": "a"},
                "remote": {"id": "b"},
                "psk": "unit-test-psk-0123456789",
                "children": {
                    "sites": {
                        "local_ts": ["10.1.0.0/24", "fd00:1::/64"],
                        "remote_ts": ["10.2.0.0/24", "fd00:2::/64"],
                    }
                },
            }
        }
    }
    path = tmp_path / "keywayd.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle)
    agent = Agent(path, plane=RecordingPlane())
    agent.config = load_config(path)
    agent.local_of["ab"] = ME  # as _add_connection would, without sockets
    agent._loop = Timers()
    return agent


def ready(
    spi_in: int, spi_out: int, rekeyed_from: int = 0, initiated: bool = True, redundant=False
):
    return ChildSaReady(
        connection="ab", child="sites", protocol="esp", mode="tunnel",
        spi_in=spi_in, spi_out=spi_out,
        local_ts=("10.1.0.0/24", "fd00:1::/64"), remote_ts=("10.2.0.0/24", "fd00:2::/64"),
        proposal="aes256gcm16", encr_id=20, encr_key_bits=256, integ_id=0,
        key_out=b"o" * 36, integ_key_out=b"", key_in=b"i" * 36, integ_key_in=b"",
        rekeyed_from=rekeyed_from, local_address=ME, remote_address=PEER,
        initiated=initiated, redundant=redundant,
    )  # fmt: skip


def installed_spis(plane: RecordingPlane) -> set[int]:
    return {sa.spi for sa in plane.sas.values()}


def test_a_new_child_installs_its_sa_pair_inbound_first_and_its_policies(agent):
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    sa_calls = [arg for name, arg in plane.calls if name == "install_sa"]
    assert [sa.spi for sa in sa_calls] == [0x100, 0x200]  # inbound first
    inbound, out = sa_calls
    assert (inbound.src, inbound.dst, out.src, out.dst) == (PEER, ME, ME, PEER)
    # Two prefix pairs (IPv4 and IPv6): no SA selector; OUT, IN and FWD for each pair.
    assert inbound.selector is None and out.selector is None
    directions = sorted((p.direction.value, p.selector.dst) for p in plane.policies.values())
    assert directions == [
        ("fwd", "10.1.0.0/24"), ("fwd", "fd00:1::/64"), ("in", "10.1.0.0/24"),
        ("in", "fd00:1::/64"), ("out", "10.2.0.0/24"), ("out", "fd00:2::/64"),
    ]  # fmt: skip
    assert all(base.is_keyway_reqid(sa.reqid) for sa in plane.sas.values())


def test_the_rekey_initiator_switches_outbound_at_once(agent):
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ready(0x101, 0x201, rekeyed_from=0x100, initiated=True))
    assert installed_spis(plane) == {0x100, 0x200, 0x101, 0x201}


def test_the_rekey_responder_keeps_the_old_outbound_sa_until_the_old_child_goes(agent):
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ready(0x101, 0x201, rekeyed_from=0x100, initiated=False))
    # The peer may not hold 0x201's inbound side yet: only our new inbound SA is in.
    assert installed_spis(plane) == {0x100, 0x200, 0x101}
    policies = dict(plane.policies)
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by peer"))
    assert installed_spis(plane) == {0x100, 0x101, 0x201}
    agent._loop.advance(daemon.DELETE_REKEYED_DELAY)
    assert installed_spis(plane) == {0x101, 0x201}
    # The new outbound SA went in before the old pair was removed.
    calls = [(name, getattr(arg, "spi", None)) for name, arg in plane.calls]
    first_delete = next(i for i, (name, _) in enumerate(calls) if name == "delete_sa")
    assert calls.index(("install_sa", 0x201)) < first_delete
    assert plane.policies == policies  # the child lives on: its policies stay


def test_a_rekey_collision_s_surplus_sas_are_never_sent_on(agent):
    """Both ends rekeyed 0x100 at once. We answered the peer's rekey (0x101, its
    outbound half deferred) and made our own (0x102), which lost: redundant."""
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ready(0x101, 0x201, rekeyed_from=0x100, initiated=False))
    agent._on_engine_event(ready(0x102, 0x202, rekeyed_from=0x100, redundant=True))
    assert installed_spis(plane) == {0x100, 0x200, 0x101, 0x102}  # no 0x202: never used
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x102, 0x202, core.REDUNDANT_CHILD))
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by peer"))
    agent._loop.advance(daemon.DELETE_REKEYED_DELAY)
    assert installed_spis(plane) == {0x101, 0x201}
    assert not [c for c in plane.calls if c[0] == "delete_sa" and c[1].spi == 0x202]


def test_a_successor_deleted_before_the_sa_it_replaces_is_never_installed(agent):
    """We answered the peer's rekey (0x101, outbound deferred), won the collision with
    our own (0x102): the peer deletes its surplus 0x101, then we delete the old 0x100."""
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ready(0x101, 0x201, rekeyed_from=0x100, initiated=False))
    agent._on_engine_event(ready(0x102, 0x202, rekeyed_from=0x100, initiated=True))
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x101, 0x201, "deleted by peer"))
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by us"))
    agent._loop.advance(daemon.DELETE_REKEYED_DELAY)
    assert installed_spis(plane) == {0x102, 0x202}  # 0x201 stayed out: it is gone


def test_a_replaced_inbound_sa_takes_the_stragglers_for_a_few_seconds(agent):
    """The peer's Delete of the old SA can overtake packets it sent on it just before
    switching; its outbound half goes at once, its inbound half a little later."""
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ready(0x101, 0x201, rekeyed_from=0x100, initiated=True))
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by us"))
    assert installed_spis(plane) == {0x100, 0x101, 0x201}
    agent._loop.advance(daemon.DELETE_REKEYED_DELAY - 0.1)
    assert 0x100 in installed_spis(plane)
    agent._loop.advance(0.1)
    assert installed_spis(plane) == {0x101, 0x201}


def test_the_last_sa_of_a_child_takes_its_policies_with_it(agent):
    plane = agent.plane
    agent._on_engine_event(ready(0x100, 0x200))
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by peer"))
    assert not plane.sas and not plane.policies


def test_a_refused_install_leaves_nothing_half_done(agent):
    plane = agent.plane
    taken = dataclasses.replace(_placeholder(), spi=0x200)
    plane.sas[taken.id] = taken  # an SA already there: the outbound install fails
    agent._on_engine_event(ready(0x100, 0x200))
    assert base.SaId(ME, base.IpsecProto.ESP, 0x100) not in plane.sas  # inbound rolled back
    assert agent.stats["install_failures"] == 1
    assert not plane.policies


def _placeholder() -> base.SaSpec:
    return base.SaSpec(
        src=ME, dst=PEER, proto=base.IpsecProto.ESP, spi=1, mode=base.Mode.TUNNEL,
        reqid=base.KEYWAY_REQID_MIN + 99,
    )  # fmt: skip


def test_a_watcher_that_does_not_read_has_its_stream_ended_not_hung(agent):
    import asyncio

    from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import WATCH_QUEUE

    async def overflow() -> int:
        stream = agent._subscribe()
        for n in range(WATCH_QUEUE + 1):
            agent._publish({"event": "X", "n": n})
        received = [record async for record in stream]  # ends: does not wait forever
        return len(received)

    assert asyncio.run(asyncio.wait_for(overflow(), 5)) == WATCH_QUEUE - 1
    assert not agent._watchers


def test_policies_follow_the_selectors_negotiated_and_a_trap_keeps_its_own(agent):
    """Issue 14, item 15: the peer narrowed the child to 10.2.0.0/25 (IPv4 only)."""
    plane = agent.plane
    narrowed = dataclasses.replace(
        ready(0x100, 0x200), local_ts=("10.1.0.0/24",), remote_ts=("10.2.0.0/25",)
    )
    agent._on_engine_event(narrowed)
    assert sorted((p.direction.value, p.selector.src, p.selector.dst)
                  for p in plane.policies.values()) == [
        ("fwd", "10.2.0.0/25", "10.1.0.0/24"), ("in", "10.2.0.0/25", "10.1.0.0/24"),
        ("out", "10.1.0.0/24", "10.2.0.0/25"),
    ]  # fmt: skip
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x100, 0x200, "deleted by us"))
    assert not plane.policies  # a `none` child: nothing left

    state = agent._child_state("ab", "sites")
    state.trap = True  # as _add_connection makes a `trap` child
    agent._sync_policies(
        agent.config.connection("ab"),
        agent.config.connection("ab").children[0],
        state,
        (("10.1.0.0/24", "fd00:1::/64"), ("10.2.0.0/24", "fd00:2::/64")),
    )
    trapped = set(plane.policies)
    agent._on_engine_event(dataclasses.replace(narrowed, spi_in=0x101, spi_out=0x201))
    # The negotiated ones beside the trap's, which stay: the rest still acquires.
    assert trapped < set(plane.policies) and len(plane.policies) == len(trapped) + 3
    agent._on_engine_event(ChildSaDeleted("ab", "sites", 0x101, 0x201, "deleted by us"))
    assert set(plane.policies) == trapped


@pytest.mark.parametrize(
    ("any_", "peer"), [("%any", "127.0.0.1"), ("%any4", "127.0.0.1"), ("%any6", "::1")]
)
def test_a_local_address_of_any_is_the_one_routing_picks_towards_the_peer(any_, peer):
    """%any4 and %any6 were taken for addresses: keywayd tried to bind "%any4"."""
    from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import parse_config

    config = parse_config({"connections": {"c": {
        "local_addrs": [any_], "remote_addrs": [peer], "local": {"id": "a"},
        "remote": {"id": "b"}, "psk": "p" * 32,
        "children": {"s": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}},
    }}})  # fmt: skip
    assert daemon.resolve_local_address(config.connections[0]) == peer
