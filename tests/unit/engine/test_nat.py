"""NAT traversal in the engine (RFC 7296 2.23, RFC 3948), through a translating network
of our own: the initiator sits behind a NAT that maps each of its ports to a port of its
choosing on the NAT's one public address, as `masquerade random` does. (tests/netns/
test_nat.py proves the same through nftables.)"""

from __future__ import annotations

import itertools

from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    NAT_KEEPALIVE,
    NAT_T_PORT,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import Engine
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    ChildSaReady,
    IkeSaMoved,
)
from tests.unit.engine.test_establish import conn, of

INSIDE, HUB, PUBLIC = "172.16.0.11", ("192.0.2.1", 500), "192.0.2.254"


class NattedPair:
    """a (inside a NAT) and b (public); mapping[inside port] = public port."""

    def __init__(self, keepalive: float = 20.0, nat_traversal=(True, True)):
        self.a, self.b = Engine((INSIDE, 500)), Engine(HUB)
        self.a.add_connection(
            conn("a.lab", "b.lab", HUB, ("10.11.0.0/24",), ("10.1.0.0/24",), keepalive=keepalive,
                 nat_traversal=nat_traversal[0])
        )  # fmt: skip
        self.b.add_connection(
            conn("b.lab", "a.lab", (PUBLIC, 500), ("10.1.0.0/24",), ("10.11.0.0/24",),
                 nat_traversal=nat_traversal[1])
        )  # fmt: skip
        self.ports = itertools.count(40000, 1111)
        self.mapping: dict[int, int] = {}
        self.events: dict[str, list] = {"a": [], "b": []}
        self.to_hub: list[tuple[float, bytes, int]] = []  # (time, data, public source port)
        self.now = 0.0

    def remap(self) -> None:
        """The NAT forgets its mappings: the next packets get new ports."""
        self.mapping.clear()

    def pump(self, until: float) -> None:
        while True:
            for dgram in self.a.pop_datagrams():
                inner = NAT_T_PORT if dgram.nat_t else 500
                port = self.mapping.setdefault(inner, next(self.ports))
                self.to_hub.append((self.now, dgram.data, port))
                if dgram.data != NAT_KEEPALIVE:
                    self.b.receive(dgram.data, (PUBLIC, port), self.now, nat_t=dgram.nat_t)
            for dgram in self.b.pop_datagrams():
                assert dgram.dst[0] == PUBLIC
                inner = {v: k for k, v in self.mapping.items()}.get(dgram.dst[1])
                if inner is not None:  # else the NAT has no such mapping: dropped
                    assert dgram.nat_t == (inner == NAT_T_PORT)
                    source = (HUB[0], NAT_T_PORT if dgram.nat_t else 500)
                    self.a.receive(dgram.data, source, self.now, nat_t=dgram.nat_t)
            self.events["a"] += self.a.pop_events()
            self.events["b"] += self.b.pop_events()
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d]
            pending = self.a._datagrams or self.b._datagrams
            if pending:
                continue
            if not deadlines or min(deadlines) > until:
                self.now = until
                return
            self.now = min(deadlines)
            self.a.tick(self.now)
            self.b.tick(self.now)


def test_the_responder_detects_the_nat_and_answers_the_mapped_nat_t_port():
    pair = NattedPair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    (ours,), (theirs,) = of(pair.events["a"], ChildSaReady), of(pair.events["b"], ChildSaReady)
    # The initiator floated to 4500; the responder saw the NAT too, and answers at the
    # port the NAT mapped 4500 to, with ESP in UDP there.
    assert ours.udp_encap and ours.encap_port == NAT_T_PORT
    assert theirs.udp_encap and theirs.encap_port == pair.mapping[NAT_T_PORT] != NAT_T_PORT
    (sa_b,) = pair.b.sas()
    assert sa_b.remote == (PUBLIC, pair.mapping[NAT_T_PORT]) and sa_b.nat and not sa_b.behind_nat
    (sa_a,) = pair.a.sas()
    assert sa_a.behind_nat  # its own address is the translated one


def test_only_the_end_behind_the_nat_sends_keepalives_every_interval():
    pair = NattedPair(keepalive=20.0)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=65.0)
    sent = [at for at, data, _port in pair.to_hub if data == NAT_KEEPALIVE]
    assert sent == [20.0, 40.0, 60.0]  # from the NAT-T port's mapping, every 20 s
    assert all(port == pair.mapping[NAT_T_PORT] for _at, d, port in pair.to_hub if d == b"\xff")


def test_a_new_mapping_seen_on_an_authenticated_message_moves_the_ike_sa():
    pair = NattedPair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    old_port = pair.mapping[NAT_T_PORT]
    pair.remap()
    (sa_a,) = pair.a.sas()
    pair.a.check_liveness(sa_a, pair.now)  # an authenticated request from the new port
    pair.pump(until=2.0)
    (moved,) = of(pair.events["b"], IkeSaMoved)
    new_port = pair.mapping[NAT_T_PORT]
    assert moved.previous == (PUBLIC, old_port) and moved.remote == (PUBLIC, new_port)
    (sa_b,) = pair.b.sas()
    assert sa_b.remote == (PUBLIC, new_port)


def test_an_unauthenticated_message_from_a_new_port_moves_nothing():
    """Anyone may send an IKE message with the SA's SPIs from anywhere: only one that
    decrypts and verifies may move the SA (else a spoofed datagram hijacks it)."""
    pair = NattedPair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    (sa_b,) = pair.b.sas()
    before = sa_b.remote
    (sa_a,) = pair.a.sas()
    pair.a.check_liveness(sa_a, pair.now)
    (request,) = pair.a.pop_datagrams()
    forged = request.data[:-1] + bytes([request.data[-1] ^ 1])  # its ICV broken
    pair.b.receive(forged, (PUBLIC, 1234), pair.now, nat_t=True)
    assert sa_b.remote == before and not of(pair.b.pop_events(), IkeSaMoved)


def test_encap_no_at_either_end_keeps_ike_on_500_and_esp_plain():
    """encap: no (nat_traversal False) sends no NAT detection notifies and heeds none:
    whichever end says it, neither floats to 4500 nor UDP-encapsulates ESP (the operator
    asked for plain ESP; across this NAT it would not pass, which is theirs to know)."""
    for setting in ((False, True), (True, False)):
        pair = NattedPair(nat_traversal=setting)
        pair.a.initiate("h1-h2", 0.0)
        pair.pump(until=1.0)
        (ours,), (theirs,) = of(pair.events["a"], ChildSaReady), of(pair.events["b"], ChildSaReady)
        assert not ours.udp_encap and not theirs.udp_encap, setting
        assert set(pair.mapping) == {500}  # nothing ever left from the NAT-T port
        (sa_a,), (sa_b,) = pair.a.sas(), pair.b.sas()
        assert not (sa_a.nat or sa_a.behind_nat or sa_a.nat_t or sa_b.nat or sa_b.nat_t)
        pair.pump(until=60.0)
        assert not [d for _t, d, _p in pair.to_hub if d == NAT_KEEPALIVE]
