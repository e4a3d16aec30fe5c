"""keywayd telling a peer that it sent ESP on an SPI we do not hold (issue 14, item 24):
the INVALID_SPI goes on every IKE SA shared with that peer, so the connection the SPI
belongs to replaces its Child SA whichever connection comes first."""

from __future__ import annotations

import dataclasses
import os
import socket

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import Agent
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import base
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    ChildSaDeleted,
    ChildSaReady,
)
from tests.fixtures.fakenet import FakeNetwork
from tests.unit.agent.test_daemon_install import Timers
from tests.unit.engine.test_establish import A, B, Pair, conn, of


class Runner:
    def pump(self) -> None:  # the test's Pair moves the datagrams
        pass


def test_invalid_spi_reaches_the_connection_the_spi_belongs_to(tmp_path):
    def second(local_id, remote_id, remote, lts, rts):
        return dataclasses.replace(conn(local_id, remote_id, remote, lts, rts), name="voice")

    pair = Pair(
        FakeNetwork(),
        conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",)),
        conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",)),
    )
    pair.a.add_connection(second("v1.lab", "v2.lab", B, ("10.1.9.0/24",), ("10.2.9.0/24",)))
    pair.b.add_connection(second("v2.lab", "v1.lab", A, ("10.2.9.0/24",), ("10.1.9.0/24",)))
    pair.a.initiate("h1-h2", 0.0)
    pair.a.initiate("voice", 0.0)
    pair.pump()
    assert [sa.conn.name for sa in pair.b.sas_with(A[0])] == ["h1-h2", "voice"]
    (voice,) = pair.a.sas_of("voice")[0].children.values()
    (sites,) = pair.a.sas_of("h1-h2")[0].children.values()

    path = tmp_path / "keywayd.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump({"connections": {}}, handle)
    agent = Agent(path, plane=RecordingPlane())  # B's keywayd, around B's engine
    agent.engines, agent.runners = {B[0]: pair.b}, {B[0]: Runner()}
    agent._local_towards[A[0]] = B[0]
    agent._loop = Timers()
    # ESP from A on the SPI of voice's child, which B (say) lost.
    agent._tell_invalid_spi(base.UnknownSpiEvent(socket.IPPROTO_ESP, voice.spi_out, A[0], B[0]))
    pair.pump(until=pair.net.now + 30)
    (gone,) = of(pair.events[A], ChildSaDeleted)
    assert (gone.connection, gone.spi_in, gone.reason) == ("voice", voice.spi_in, "peer lost it")
    replaced = of(pair.events[A], ChildSaReady)[-1]
    assert replaced.connection == "voice" and replaced.spi_in != voice.spi_in
    assert pair.a.sas_of("h1-h2")[0].children == {sites.spi_in: sites}  # untouched
