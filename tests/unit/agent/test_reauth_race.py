"""Both ends schedule reauthentication (issue 14, item 21). When the peer's comes
first, ours must not follow it for the same IKE SA: the two new IKE SAs would not be
twins (one was up before the other began), so nothing would settle them and the
connection would keep two IKE SAs for good, as a CI run of the netns schedule test
showed."""

from __future__ import annotations

import os

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import Agent
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import ExchangeType
from tests.unit.agent.test_daemon_install import Timers
from tests.unit.engine.test_establish import A, established


def test_no_reauthentication_of_an_ike_sa_the_peer_already_reauthenticated(tmp_path):
    pair = established()
    (old_a,), (old_b,) = pair.a.sas(), pair.b.sas()
    # B reauthenticates; its Delete of the old IKE SA is lost once on the way to A.
    lost = []

    def drop_first_delete(data: bytes, src, dst) -> bool:
        if dst == A and data[18] == ExchangeType.INFORMATIONAL and not lost:
            lost.append(data)
            return True
        return False

    pair.net.impairment.drop_if = drop_first_delete
    new_b = pair.b.reauthenticate(old_b, pair.net.now)
    pair.pump(until=pair.net.now + 0.1)
    assert lost and new_b.state == "established"
    assert old_a.state == "established" and len(pair.a.sas()) == 2

    path = tmp_path / "keywayd.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump({"connections": {}}, handle)
    agent = Agent(path, plane=RecordingPlane())  # A's keywayd, around A's engine

    class Runner:  # the test's Pair moves the datagrams
        def now(self) -> float:
            return pair.net.now

        def pump(self) -> None:
            pass

    agent.engines, agent.runners = {A[0]: pair.a}, {A[0]: Runner()}
    agent.local_of["h1-h2"] = A[0]
    agent._loop = Timers()
    agent._reauth(old_a)  # A's own reauthentication comes due now
    assert not [sa for sa in pair.a.sas() if sa.reauth_of is old_a]

    pair.pump(until=pair.net.now + 30)  # the Delete is retransmitted
    assert [sa.spi_i for sa in pair.a.sas()] == [new_b.spi_i]
    assert [sa.spi_i for sa in pair.b.sas()] == [new_b.spi_i]
