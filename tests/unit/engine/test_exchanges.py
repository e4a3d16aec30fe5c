"""Engine exchanges beyond the first Child SA: IKE fragments (RFC 7383), answers to
unknown SPIs, and further Child SAs on an established IKE SA."""

from __future__ import annotations

import dataclasses

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
    NotifyType,
    PayloadType,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import core
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import ChildParams
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    ChildSaDeleted,
    ChildSaReady,
    IkeSaDown,
    IkeSaRekeyed,
    IkeSaUp,
    NegotiationFailed,
)
from tests.fixtures.fakenet import Impairment
from tests.fixtures.pki import make_ca, make_cert
from tests.unit.engine.test_establish import A, B, Pair, cert_pair, established, lab_pair, of

FRAGMENT_SIZE = 576  # the IPv4 minimum; an ECDSA certificate exchange exceeds it


def _with(pair: Pair, **changes) -> Pair:
    for engine in (pair.a, pair.b):
        conn = engine.connections["h1-h2"]
        engine.add_connection(dataclasses.replace(conn, **changes))
    return pair


def _sent(pair: Pair, src) -> list[bytes]:
    return [e[3] for e in pair.net.log if e[1] == src]


def _first_payload(data: bytes) -> int:
    return data[16]


@pytest.mark.parametrize("seed", range(6))
def test_ike_auth_with_certificates_travels_in_fragments_through_loss(seed):
    ca = make_ca()
    pair = _with(
        cert_pair(ca, ca, make_cert(ca, "h1.lab"), make_cert(ca, "h2.lab")),
        fragment_size=FRAGMENT_SIZE,
    )
    pair.net.seed = seed
    pair.net.impairment = Impairment(loss=0.2, duplicate=0.2, reorder=0.3)
    pair.net.__post_init__()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=120)
    assert len(of(pair.events[A], ChildSaReady)) == len(of(pair.events[B], ChildSaReady)) == 1
    for src in (A, B):
        fragments = [d for d in _sent(pair, src) if _first_payload(d) == PayloadType.SKF]
        assert len(fragments) >= 2, "IKE_AUTH should have been fragmented both ways"
        # Every datagram fits fragment_size once IPv4 (20) and UDP (8) headers are added.
        assert max(len(d) for d in _sent(pair, src)) + 28 <= FRAGMENT_SIZE


def test_no_fragments_to_a_peer_that_did_not_announce_support():
    ca = make_ca()
    pair = cert_pair(ca, ca, make_cert(ca, "h1.lab"), make_cert(ca, "h2.lab"))
    pair.a.add_connection(
        dataclasses.replace(pair.a.connections["h1-h2"], fragment_size=FRAGMENT_SIZE)
    )
    pair.b.add_connection(dataclasses.replace(pair.b.connections["h1-h2"], fragment_size=0))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    init_response = next(
        codec.decode_message(d) for d in _sent(pair, B) if d[18] == ExchangeType.IKE_SA_INIT
    )
    assert not init_response.notifies(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)
    assert all(_first_payload(d) != PayloadType.SKF for d in _sent(pair, A) + _sent(pair, B))
    assert max(len(d) for d in _sent(pair, A)) + 28 > FRAGMENT_SIZE  # it was needed
    assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)


def test_a_forged_fragment_is_dropped_and_the_exchange_still_completes():
    ca = make_ca()
    pair = _with(
        cert_pair(ca, ca, make_cert(ca, "h1.lab"), make_cert(ca, "h2.lab")),
        fragment_size=FRAGMENT_SIZE,
    )
    forged = []

    def tamper(data, src, dst):
        if _first_payload(data) == PayloadType.SKF and not forged:
            forged.append(data[:-1] + bytes([data[-1] ^ 1]))  # bad ICV
            pair.b.receive(forged[0], src, pair.net.now)
        return False

    pair.net.impairment.drop_if = tamper
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert forged and of(pair.events[B], ChildSaReady)


def _request_with_unknown_spi(exchange=ExchangeType.INFORMATIONAL, response=False) -> bytes:
    flags = 0x08 | (0x20 if response else 0)
    header = codec.Header(b"\x11" * 8, b"\x22" * 8, exchange, flags, 7)
    return codec.encode_message(codec.Message(header, [codec.Encrypted(first=0, body=bytes(32))]))


def test_requests_for_unknown_ike_sas_get_invalid_ike_spi_and_no_state():
    pair = established()
    before = pair.b.sas()
    pair.b.receive(_request_with_unknown_spi(), A, pair.net.now)
    (reply,) = pair.b.pop_datagrams()
    msg = codec.decode_message(reply.data)
    assert reply.dst == A and msg.header.is_response
    assert (msg.header.spi_i, msg.header.spi_r, msg.header.message_id) == (
        b"\x11" * 8,
        b"\x22" * 8,
        7,
    )
    assert [n.type for n in msg.all(codec.Notify)] == [NotifyType.INVALID_IKE_SPI]
    assert pair.b.sas() == before
    # Responses are never answered, and a flood is answered at a bounded rate.
    pair.b.receive(_request_with_unknown_spi(response=True), A, pair.net.now)
    assert not pair.b.pop_datagrams()
    for _ in range(500):
        pair.b.receive(_request_with_unknown_spi(), A, pair.net.now)
    assert 0 < len(pair.b.pop_datagrams()) <= 20


def _two_children(pair_factory=lab_pair, **kw) -> Pair:
    pair = pair_factory(**kw)
    for engine, local, remote in ((pair.a, "10.1", "10.2"), (pair.b, "10.2", "10.1")):
        conn = engine.connections["h1-h2"]
        extra = ChildParams("voice", (f"{local}.9.0/24",), (f"{remote}.9.0/24",), ("aes128gcm16",))
        engine.add_connection(dataclasses.replace(conn, children=(*conn.children, extra)))
    return pair


def test_further_children_come_up_on_create_child_sa():
    pair = _two_children()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    for addr in (A, B):
        ready = {c.child: c for c in of(pair.events[addr], ChildSaReady)}
        assert set(ready) == {"sites", "voice"}
    voice_a = next(c for c in of(pair.events[A], ChildSaReady) if c.child == "voice")
    voice_b = next(c for c in of(pair.events[B], ChildSaReady) if c.child == "voice")
    assert (voice_a.spi_in, voice_a.key_in) == (voice_b.spi_out, voice_b.key_out)
    assert voice_a.local_ts == ("10.1.9.0/24",) and voice_b.local_ts == ("10.2.9.0/24",)
    assert voice_a.proposal == "aes128gcm16-noesn"
    assert len(pair.a.sas()) == len(pair.b.sas()) == 1
    assert len(pair.a.sas()[0].children) == len(pair.b.sas()[0].children) == 2


def test_a_child_the_responder_does_not_have_is_refused_and_the_others_stay():
    pair = _two_children()
    pair.b.add_connection(
        dataclasses.replace(
            pair.b.connections["h1-h2"], children=pair.b.connections["h1-h2"].children[:1]
        )
    )
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (failed,) = of(pair.events[A], NegotiationFailed)
    assert failed.reason == "child voice: NO_PROPOSAL_CHOSEN"  # sites has only AES-256
    assert [c.child for c in of(pair.events[A], ChildSaReady)] == ["sites"]
    assert of(pair.events[A], IkeSaUp)


def test_create_child_sa_on_demand_after_a_delete():
    pair = _two_children()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    sa = pair.b.sas()[0]
    voice = next(c for c in sa.children.values() if c.child == "voice")
    pair.b.delete_child_sa(sa, voice.spi_in, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert {c.child for c in pair.a.sas()[0].children.values()} == {"sites"}
    pair.b.create_child_sa(sa, "voice", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert {c.child for c in pair.a.sas()[0].children.values()} == {"sites", "voice"}
    new = next(c for c in pair.b.sas()[0].children.values() if c.child == "voice")
    assert new.initiated and new.spi_in != voice.spi_in
    with pytest.raises(ValueError, match="no child 'video'"):
        pair.b.create_child_sa(sa, "video", pair.net.now)


def test_reauthentication_is_make_before_break():
    pair = _two_children()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (old,) = pair.a.sas()
    old_children = set(old.children)
    new = pair.a.reauthenticate(old, pair.net.now)
    pair.pump(until=pair.net.now + 60)
    assert pair.a.sas() == [new] and new.state == "established"
    assert len(pair.b.sas()) == 1 and pair.b.sas()[0].spi_i == new.spi_i
    assert {c.child for c in new.children.values()} == {"sites", "voice"}
    assert not old_children & set(new.children)
    events = pair.events[A]
    # Every new Child SA was announced before the first old one went.
    last_ready = max(i for i, e in enumerate(events) if isinstance(e, ChildSaReady))
    first_gone = min(i for i, e in enumerate(events) if isinstance(e, ChildSaDeleted))
    assert last_ready < first_gone
    (down_a,), (down_b,) = of(events, IkeSaDown), of(pair.events[B], IkeSaDown)
    assert down_a.reason == "replaced by reauthentication"
    assert down_b.reason == "deleted by peer" and down_b.spi_i == old.spi_i
    assert {e.spi_in for e in of(events, ChildSaDeleted)} == old_children


def test_a_reauthentication_that_brings_no_child_keeps_the_old_ike_sa():
    pair = established()
    (old,) = pair.a.sas()
    pair.b.add_connection(dataclasses.replace(pair.b.connections["h1-h2"], children=()))
    pair.a.reauthenticate(old, pair.net.now)
    pair.pump(until=pair.net.now + 60)
    assert pair.a.sas() == [old] and old.state == "established" and old.children
    failed = of(pair.events[A], NegotiationFailed)
    assert failed[-1].reason == "reauthentication: no Child SA came up"
    assert [d.reason for d in of(pair.events[A], IkeSaDown)] == ["deleted by us"]
    assert len(pair.b.sas()) == 1


def test_a_half_open_responder_sa_is_dropped_after_the_timeout():
    pair = lab_pair()
    pair.net.impairment.drop_if = lambda data, src, dst: dst == B and data[18] == 35  # IKE_AUTH
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    (half_open,) = pair.b.sas()
    assert half_open.state == "auth"
    expiry = half_open.created_at + core.HALF_OPEN_TIMEOUT
    pair.b.tick(expiry - 1)
    assert len(pair.b.sas()) == 1 and pair.b.next_deadline() == expiry
    pair.b.tick(expiry)
    assert pair.b.sas() == [] and pair.b.next_deadline() is None
    assert not pair.b.pop_events()  # nobody was up, so nothing to report down


@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekeys_retry_in_the_ke_group_the_responder_asks_for(what):
    if what == "child":
        pair = lab_pair(esp=("aes256gcm16-x25519", "aes256gcm16-ecp256"))
        only = dataclasses.replace(
            pair.b.connections["h1-h2"].children[0], proposals=("aes256gcm16-ecp256",)
        )
        pair.b.add_connection(dataclasses.replace(pair.b.connections["h1-h2"], children=(only,)))
    else:
        pair = lab_pair(proposals=("aes256gcm16-prfsha384-x25519", "aes256gcm16-prfsha384-ecp256"))
        pair.b.add_connection(
            dataclasses.replace(
                pair.b.connections["h1-h2"], proposals=("aes256gcm16-prfsha384-ecp256",)
            )
        )
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    sa = pair.a.sas()[0]
    if what == "child":
        pair.a.rekey_child_sa(sa, next(iter(sa.children)), pair.net.now)
    else:
        pair.a.rekey_ike_sa(sa, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert not of(pair.events[A], NegotiationFailed)
    refusals = [d for d in _sent(pair, B) if d[18] == ExchangeType.CREATE_CHILD_SA and len(d) < 100]
    assert refusals, "B should have answered INVALID_KE_PAYLOAD first"
    if what == "child":
        new = of(pair.events[A], ChildSaReady)[-1]
        assert new.rekeyed_from and "ecp256" in new.proposal.lower()
        assert len(pair.a.sas()[0].children) == len(pair.b.sas()[0].children) == 1
    else:
        (rekeyed,) = of(pair.events[A], IkeSaRekeyed)
        assert rekeyed.proposal.lower().endswith("ecp256")
        assert len(pair.a.sas()) == len(pair.b.sas()) == 1


def test_childless_ike_auth_is_negotiated_in_ike_sa_init():
    pair = lab_pair()
    for engine in (pair.a, pair.b):
        engine.add_connection(dataclasses.replace(engine.connections["h1-h2"], children=()))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    for src in (A, B):
        init = next(
            codec.decode_message(d) for d in _sent(pair, src) if d[18] == ExchangeType.IKE_SA_INIT
        )
        assert init.notifies(NotifyType.CHILDLESS_IKEV2_SUPPORTED), src
    assert of(pair.events[A], IkeSaUp) and of(pair.events[B], IkeSaUp)
    assert not of(pair.events[A], ChildSaReady) and not of(pair.events[B], ChildSaReady)
    # Children can follow on CREATE_CHILD_SA once configured.
    child = ChildParams("late", ("10.1.5.0/24",), ("10.2.5.0/24",))
    for engine, mirror in ((pair.a, False), (pair.b, True)):
        params = (
            dataclasses.replace(child, local_ts=child.remote_ts, remote_ts=child.local_ts)
            if mirror
            else child
        )
        engine.add_connection(dataclasses.replace(engine.connections["h1-h2"], children=(params,)))
    sa = pair.a.sas()[0]
    sa.conn = pair.a.connections["h1-h2"]
    pair.b.sas()[0].conn = pair.b.connections["h1-h2"]
    pair.a.create_child_sa(sa, "late", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (late,) = of(pair.events[A], ChildSaReady)
    assert late.child == "late" and late.remote_ts == ("10.2.5.0/24",)


def test_invalid_spi_from_the_peer_replaces_the_child_it_names():
    pair = established()
    sa_a, sa_b = pair.a.sas()[0], pair.b.sas()[0]
    assert pair.b.sas_with(A[0]) == [sa_b] and pair.b.sas_with("192.0.2.99") == []
    (old_a,) = sa_a.children.values()
    (old_b,) = sa_b.children.values()
    pair.b.notify_invalid_spi(sa_b, 0x12345678, pair.net.now)  # not an SA of A's: ignored
    pair.pump(until=pair.net.now + 10)
    assert set(sa_a.children) == {old_a.spi_in} and not of(pair.events[A], ChildSaDeleted)
    # B got ESP on old_b.spi_in, which it says it does not hold: A sends on it (spi_out).
    pair.b.notify_invalid_spi(sa_b, old_b.spi_in, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (gone,) = of(pair.events[A], ChildSaDeleted)
    assert gone.spi_in == old_a.spi_in and gone.reason == "peer lost it"
    (new_a,) = sa_a.children.values()
    (new_b,) = sa_b.children.values()
    assert new_a.spi_in != old_a.spi_in and (new_a.spi_out, new_a.key_out) == (
        new_b.spi_in,
        new_b.key_in,
    )


def test_invalid_spi_notifications_waiting_on_an_ike_sa_are_bounded():
    pair = established()
    sa_b = pair.b.sas()[0]
    for spi in range(1000):
        pair.b.notify_invalid_spi(sa_b, 0x10000 + spi, pair.net.now)
    # One in flight, a few queued: a flood of reports does not grow the queue.
    assert len(sa_b.pending) == core.MAX_QUEUED_INVALID_SPI
    pair.pump(until=pair.net.now + 30)
    assert not sa_b.pending and sa_b.state == "established"
