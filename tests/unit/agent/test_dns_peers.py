"""A peer named by DNS (issue 16): the address its name resolves to at an initiation is
where it may come from, and once the name points elsewhere the old address is no
longer accepted (it was until a reload)."""

from __future__ import annotations

import asyncio
import ipaddress

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import parse_config
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import (
    Agent,
    ike_connection,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import Engine
from tests.unit.agent.test_daemon_install import Timers


class Resolving(Timers):
    """The agent's loop: timers, and getaddrinfo answering from `names`."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, str] = {}

    async def getaddrinfo(self, host, port, family=0, type=0):
        return [(family, type, 17, "", (self.names[host], port))]


class Runner:
    def __init__(self) -> None:
        self.initiated: list[tuple[str, tuple[str, int]]] = []

    def initiate(self, name, address) -> None:
        self.initiated.append((name, address))


def test_a_name_that_moves_leaves_its_old_address_behind(tmp_path):
    agent = Agent(tmp_path / "keywayd.yml", plane=RecordingPlane())
    agent.config = parse_config(
        {"connections": {"ab": {
            "local_addrs": ["192.0.2.11"], "remote_addrs": ["peer.lab", "198.51.100.7"],
            "local": {"id": "a.lab"}, "remote": {"id": "b.lab"}, "psk": "p" * 32,
            "children": {"sites": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}},
        }}},
    )  # fmt: skip
    engine = Engine(("192.0.2.11", 500))
    engine.add_connection(ike_connection(agent.config.connection("ab"), agent.config))
    agent.engines, agent.runners = {"192.0.2.11": engine}, {"192.0.2.11": Runner()}
    agent.local_of["ab"] = "192.0.2.11"
    agent._loop = loop = Resolving()

    def ranges():
        return {str(r) for r in engine.connections["ab"].peer_ranges}

    loop.names["peer.lab"] = "192.0.2.50"
    asyncio.run(agent._resolve_and_initiate("ab", "peer.lab", 500))
    assert ranges() == {"198.51.100.7/32", "192.0.2.50/32"}
    loop.names["peer.lab"] = "192.0.2.60"  # the name moved
    asyncio.run(agent._resolve_and_initiate("ab", "peer.lab", 500))
    assert ranges() == {"198.51.100.7/32", "192.0.2.60/32"}  # the configured one stays
    assert [a for _n, a in agent.runners["192.0.2.11"].initiated] == [
        ("192.0.2.50", 500),
        ("192.0.2.60", 500),
    ]
    assert engine._connections_for(("192.0.2.50", 500)) == []
    assert [c.name for c in engine._connections_for(("192.0.2.60", 500))] == ["ab"]
    assert ipaddress.ip_network("192.0.2.60") in engine.connections["ab"].peer_ranges
