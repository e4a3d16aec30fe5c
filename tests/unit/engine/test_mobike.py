"""MOBIKE as responder (RFC 4555): the peer moves its address with UPDATE_SA_ADDRESSES.
A, the initiator, plays the mobile peer here by hand (its engine does not move itself):
its host's address becomes A2, and it sends the update as charon does (with NAT
detection and a COOKIE2). tests/interop/test_mobike_vs_strongswan.py has charon move."""

from __future__ import annotations

import os

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
    NotifyType,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import _address_pair
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    IkeSaMoved,
    PeerDead,
)
from tests.fixtures.fakenet import Impairment, LoseFirst
from tests.unit.engine.test_establish import A, B, lab_pair, of

A2 = ("192.0.2.111", 500)


def _moving_pair(mobike: bool = True, impairment: Impairment | None = None):
    """An established pair; B took MOBIKE as negotiated (as with charon), A's host is at
    A2 from now on."""
    pair = lab_pair(impairment)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (sa_a,), (sa_b,) = pair.a.sas(), pair.b.sas()
    sa_b.mobike = mobike
    pair.a.local = A2
    pair.net.attach(A2, lambda d, s, _dst, now: pair.a.receive(d, s, now))
    pair.events = {A2: [], B: []}
    return pair, sa_a, sa_b


def _update(pair, sa_a, extra=()) -> None:
    """A's UPDATE_SA_ADDRESSES from A2, as charon sends it."""
    payloads = [
        codec.Notify(type=NotifyType.UPDATE_SA_ADDRESSES),
        *pair.a._nat_notifies(sa_a.spi_i, sa_a.spi_r, B),
        codec.Notify(type=NotifyType.COOKIE2, data=os.urandom(16)),
        *extra,
    ]
    sa_a._request(ExchangeType.INFORMATIONAL, payloads, pair.net.now, kind="dpd")
    pair.pump(until=pair.net.now + 60)


def _sent(pair, src, kind: int) -> list[bytes]:
    return [d for t, s, dst, d, how in pair.net.log if s == src and d[18] == kind]


def test_an_update_moves_the_ike_sa_at_once_and_the_child_sas_once_the_peer_answers_there():
    # B's first routability check is lost: the Child SAs must wait for its retransmission.
    check_lost = LoseFirst(lambda d, s, dst: s == B and d[18] == ExchangeType.INFORMATIONAL
                           and not d[19] & 0x20)  # fmt: skip
    pair, sa_a, sa_b = _moving_pair(impairment=Impairment(drop_if=check_lost))
    requests = len(_sent(pair, B, ExchangeType.INFORMATIONAL))
    payloads = [
        codec.Notify(type=NotifyType.UPDATE_SA_ADDRESSES),
        *pair.a._nat_notifies(sa_a.spi_i, sa_a.spi_r, B),
        codec.Notify(type=NotifyType.COOKIE2, data=os.urandom(16)),
    ]
    sa_a._request(ExchangeType.INFORMATIONAL, payloads, pair.net.now, kind="dpd")
    pair.pump(until=pair.net.now + 0.05)  # the update answered, the check lost
    assert sa_b.remote == A2  # the IKE SA sends there at once
    assert check_lost.lost and not of(pair.events[B], IkeSaMoved)
    pair.pump(until=pair.net.now + 60)
    (moved,) = of(pair.events[B], IkeSaMoved)
    assert (moved.remote, moved.previous, moved.nat, moved.mobike) == (A2, A, False, True)
    assert len(_sent(pair, B, ExchangeType.INFORMATIONAL)) > requests + 1  # answer, check(s)
    assert sa_b.state == sa_a.state == "established" and not of(pair.events[B], PeerDead)


def test_no_nats_allowed_that_the_headers_contradict_is_refused_and_nothing_moves():
    pair, sa_a, sa_b = _moving_pair()
    claimed = codec.Notify(type=NotifyType.NO_NATS_ALLOWED, data=_address_pair(A, B))
    _update(pair, sa_a, extra=[claimed])  # it came from A2, not from A
    assert sa_b.remote == A and not of(pair.events[B], IkeSaMoved)
    pair2, sa_a2, sa_b2 = _moving_pair()
    honest = codec.Notify(type=NotifyType.NO_NATS_ALLOWED, data=_address_pair(A2, B))
    _update(pair2, sa_a2, extra=[honest])
    assert sa_b2.remote == A2 and of(pair2.events[B], IkeSaMoved)


def test_with_mobike_other_requests_from_a_new_address_are_answered_there_but_move_nothing():
    """RFC 4555 3.8: without UPDATE_SA_ADDRESSES the IKE SA does not follow the IP
    header (an attacker replaying a request from elsewhere would move it), even with a
    NAT detected; the answer still goes where the request came from."""
    pair, sa_a, sa_b = _moving_pair()
    sa_b.nat = True
    pair.a.check_liveness(sa_a, pair.net.now)
    pair.pump(until=pair.net.now + 60)
    assert sa_a.request is None  # answered, at A2
    assert sa_b.remote == A and not of(pair.events[B], IkeSaMoved)


def test_without_mobike_an_update_is_an_ordinary_informational():
    pair, sa_a, sa_b = _moving_pair(mobike=False)
    checks = len(_sent(pair, B, ExchangeType.INFORMATIONAL))
    _update(pair, sa_a)
    # Answered (once), and no routability check of B's own, no move of the Child SAs.
    assert len(_sent(pair, B, ExchangeType.INFORMATIONAL)) == checks + 1
    assert sa_b.child_remote is None and not of(pair.events[B], IkeSaMoved)
