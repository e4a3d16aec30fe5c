"""Two engines establish IKE and Child SAs through a fake network with a fake clock."""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
    IntegId,
    NotifyType,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import core
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import (
    ChildParams,
    Engine,
    IkeConnection,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    AuthFailed,
    ChildSaDeleted,
    ChildSaReady,
    IkeSaDown,
    IkeSaRekeyed,
    IkeSaUp,
    NegotiationFailed,
    PeerDead,
    RevocationWanted,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.retransmit import (
    RetransmitPolicy,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.proposals import (
    describe,
    parse_proposal_string,
)
from tests.fixtures.fakenet import FakeNetwork, Impairment, LoseFirst
from tests.fixtures.pki import make_ca, make_cert

A, B = ("192.0.2.11", 500), ("192.0.2.12", 500)
PSK = b"fake-network-psk-0123456789"


def conn(local_id, remote_id, remote, local_ts, remote_ts, **kw) -> IkeConnection:
    kw.setdefault("proposals", ("aes256gcm16-prfsha384-x25519",))
    child = ChildParams(
        "sites", local_ts, remote_ts, kw.pop("esp", ("aes256gcm16",)), kw.pop("mode", "tunnel"),
        protocol=kw.pop("child_protocol", "esp"),
    )  # fmt: skip
    return IkeConnection(
        "h1-h2",
        remote,
        local_id,
        remote_id,
        kw.pop("psk", PSK),
        children=(child,),
        **{"retransmit": RetransmitPolicy(0.5, 2.0, 4), **kw},
    )


class Pair:
    def __init__(self, net: FakeNetwork, conn_a: IkeConnection, conn_b: IkeConnection):
        self.net = net
        self.a, self.b = Engine(A), Engine(B)
        # Their jitter and retry delays from the network's seed too: a run replays.
        self.a.rng.seed(net.seed * 2)
        self.b.rng.seed(net.seed * 2 + 1)
        self.a.add_connection(conn_a)
        self.b.add_connection(conn_b)
        self.events = {A: [], B: []}
        net.attach(A, lambda d, s, _dst, now: self.a.receive(d, s, now))
        net.attach(B, lambda d, s, _dst, now: self.b.receive(d, s, now))

    def pump(self, until: float = 60.0) -> None:
        """Run network and timers until nothing is left to do (or `until`)."""
        while True:
            for engine in (self.a, self.b):
                for dgram in engine.pop_datagrams():
                    self.net.send(dgram.data, dgram.src, dgram.dst)
                self.events[engine.local] += engine.pop_events()
            nxt = [
                t
                for t in (self.net.next_delivery(), self.a.next_deadline(), self.b.next_deadline())
                if t is not None
            ]
            if not nxt or min(nxt) > until:
                return
            step = min(nxt)
            self.net.deliver_until(step)
            self.a.tick(self.net.now)
            self.b.tick(self.net.now)


def lab_pair(impairment=None, **overrides) -> Pair:
    net = FakeNetwork(seed=overrides.pop("seed", 1), impairment=impairment or Impairment())
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",), **overrides)
    cb = conn(
        "h2.lab",
        "h1.lab",
        A,
        ("10.2.0.0/24",),
        ("10.1.0.0/24",),
        **{k: v for k, v in overrides.items() if k != "psk_b"},
    )
    return Pair(net, ca, cb)


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


@pytest.mark.parametrize(
    "suite",
    ["aes256gcm16-prfsha384-x25519", "aes128-sha256-ecp256", "chacha20poly1305-prfsha256-x448"],
)
def test_establish_ike_and_child_sa(suite):
    pair = lab_pair(proposals=(suite,))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    ups_a, ups_b = of(pair.events[A], IkeSaUp), of(pair.events[B], IkeSaUp)
    canonical = describe(parse_proposal_string(suite, "ike").to_proposal())
    assert len(ups_a) == len(ups_b) == 1 and ups_a[0].proposal == canonical
    assert (ups_a[0].spi_i, ups_a[0].spi_r) == (ups_b[0].spi_i, ups_b[0].spi_r)
    (ca,), (cb,) = of(pair.events[A], ChildSaReady), of(pair.events[B], ChildSaReady)
    assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in)
    assert (ca.key_out, ca.key_in) == (cb.key_in, cb.key_out)
    assert ca.local_ts == ("10.1.0.0/24",) and cb.local_ts == ("10.2.0.0/24",)
    assert ca.mode == cb.mode == "tunnel"


def test_debug_logging_traces_every_message_and_never_a_secret(caplog):
    """log_level debug (issue 14, item 19): each message both ways, with exchange,
    request or response, message ID, payload and notify types; no key, PSK or nonce."""
    caplog.set_level(logging.DEBUG, logger="keyway.ike")
    pair = lab_pair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (child,) = of(pair.events[A], ChildSaReady)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(
        line.startswith("h1-h2: sending IKE_SA_INIT request #0 [SA KE NONCE N(NAT_DETECTION_")
        for line in lines
    ), lines
    assert any(": received IKE_SA_INIT request #0 [SA KE NONCE" in line for line in lines)
    assert any(line.startswith("h1-h2: sending IKE_AUTH request #1 [IDi") for line in lines)
    assert any(line.startswith("h1-h2: received IKE_AUTH response #1 [IDr AUTH") for line in lines)
    # The proposals chosen, as the info lines and `list-sas` name them, and the selectors.
    (sa,) = pair.a.sas()
    spis = f"{sa.spi_i.hex()}_i {sa.spi_r.hex()}_r"
    assert f"h1-h2: selected IKE proposal aes256gcm16-prfsha384-x25519 {spis}" in lines
    assert (
        f"h1-h2: selected ESP proposal {child.proposal}, TS 10.1.0.0/24 === 10.2.0.0/24 {spis}"
        in lines
    )
    text = caplog.text
    assert PSK.decode() not in text
    secrets = [PSK, child.key_in, child.key_out, child.integ_key_in, child.integ_key_out]
    secrets += [sa.nonce_i, sa.nonce_r, *dataclasses.astuple(sa.keys)]
    for secret in filter(None, secrets):  # (AEAD suites have no integrity keys)
        assert secret.hex() not in text and repr(secret) not in text


def test_debug_trace_names_the_ike_sa_and_shows_retransmissions(caplog):
    """A soak's stuck request could not be read from the trace: the lines did not say
    which of a connection's IKE SAs a message was on, nor whether a request was sent
    again or a retransmission answered from the cache."""
    caplog.set_level(logging.DEBUG, logger="keyway.ike")
    # The first IKE_AUTH answer is lost: A sends its request again, B answers again.
    lose = LoseFirst(lambda data, src, dst: dst == A and data[18] == ExchangeType.IKE_AUTH)
    pair = lab_pair(Impairment(drop_if=lose))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert lose.lost
    (sa,) = pair.a.sas()
    spis = f"{sa.spi_i.hex()}_i {sa.spi_r.hex()}_r"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert f"h1-h2: received IKE_AUTH response #1 [IDr AUTH SA TSi TSr] {spis}" in lines
    assert f"h1-h2: sending IKE_AUTH request #1 again (retransmission 1 of 4) {spis}" in lines
    assert f"h1-h2: received IKE_AUTH request #1 again (answered from the cache) {spis}" in lines
    # The IKE_SA_INIT request went out before the responder's SPI was known.
    assert any(
        line.startswith("h1-h2: sending IKE_SA_INIT request #0 [")
        and line.endswith(f"{sa.spi_i.hex()}_i {bytes(8).hex()}_r")
        for line in lines
    )


def test_establish_through_loss_duplication_and_reordering():
    for seed in range(10):
        pair = lab_pair(Impairment(loss=0.25, duplicate=0.3, reorder=0.4), seed=seed)
        pair.a.initiate("h1-h2", 0.0)
        pair.pump()
        ready = of(pair.events[A], ChildSaReady), of(pair.events[B], ChildSaReady)
        # Exactly one Child SA each side: duplicates and retransmissions create none.
        assert len(ready[0]) == len(ready[1]) == 1, seed
        assert ready[0][0].key_out == ready[1][0].key_in
        assert len(of(pair.events[B], IkeSaUp)) == 1


def test_invalid_ke_payload_retry_in_the_responder_s_group():
    net = FakeNetwork()
    ca = conn(
        "h1.lab",
        "h2.lab",
        B,
        ("10.1.0.0/24",),
        ("10.2.0.0/24",),
        proposals=("aes256gcm16-prfsha384-x25519-ecp384",),
    )
    cb = conn(
        "h2.lab",
        "h1.lab",
        A,
        ("10.2.0.0/24",),
        ("10.1.0.0/24",),
        proposals=("aes256gcm16-prfsha384-ecp384",),
    )
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (up,) = of(pair.events[A], IkeSaUp)
    assert up.proposal == "aes256gcm16-prfsha384-ecp384"


def test_wrong_psk_fails_on_both_sides_with_a_reason():
    net = FakeNetwork()
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn(
        "h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",), psk=b"another-psk-entirely-0000"
    )
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (fail_b,) = of(pair.events[B], AuthFailed)
    assert "does not verify with the PSK" in fail_b.reason
    (fail_a,) = of(pair.events[A], AuthFailed)
    assert "AUTHENTICATION_FAILED" in fail_a.reason
    assert not of(pair.events[A], IkeSaUp) and not of(pair.events[B], IkeSaUp)
    assert not pair.a.sas() and not pair.b.sas() and pair.b.next_deadline() is None


def test_a_flood_of_wrong_psks_leaves_the_responder_no_state():
    net = FakeNetwork()
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    liar = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",), psk=b"guess" * 5)
    pair = Pair(net, liar, cb)
    for attempt in range(300):
        pair.a.initiate("h1-h2", float(attempt))
        pair.pump(until=float(attempt) + 0.5)
    assert len(of(pair.events[B], AuthFailed)) == 300
    assert not pair.b.sas() and not pair.b.sas_of("h1-h2")
    assert not pair.b._half_open and not pair.b._by_spi


def test_a_proposal_chosen_for_another_connection_is_refused_in_ike_auth():
    """A responder picks the IKE proposal from every connection to the peer's address;
    the identity in IKE_AUTH then selects one that must accept it (no downgrade)."""
    net = FakeNetwork()
    weak = "aes128-sha1-modp1536"
    strict = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    legacy = dataclasses.replace(
        strict, name="legacy", remote_id="old.lab", proposals=(weak,), allow_weak=True
    )
    attacker = conn(
        "h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",), proposals=(weak,),
        allow_weak=True,
    )  # fmt: skip
    pair = Pair(net, attacker, strict)
    pair.b.add_connection(legacy)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (refused,) = of(pair.events[B], AuthFailed)
    assert "aes128-prfsha1-sha1-modp1536 chosen in IKE_SA_INIT" in refused.reason
    assert "h1-h2" in refused.reason
    assert "AUTHENTICATION_FAILED" in of(pair.events[A], AuthFailed)[0].reason
    assert not of(pair.events[B], IkeSaUp) and not pair.b.sas()


def test_the_connection_the_identity_names_is_used_when_it_accepts_the_proposal():
    net = FakeNetwork()
    weak = "aes128-sha1-modp1536"
    strict = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    legacy = dataclasses.replace(
        strict, name="legacy", remote_id="old.lab", proposals=(weak,), allow_weak=True
    )
    old_peer = dataclasses.replace(
        conn("old.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",)),
        name="legacy", proposals=(weak,), allow_weak=True,
    )  # fmt: skip
    pair = Pair(net, old_peer, strict)
    pair.b.add_connection(legacy)
    pair.a.initiate("legacy", 0.0)
    pair.pump()
    (up,) = of(pair.events[B], IkeSaUp)
    assert up.connection == "legacy" and up.proposal == "aes128-prfsha1-sha1-modp1536"


def test_no_common_proposal():
    net = FakeNetwork()
    ca = conn(
        "h1.lab",
        "h2.lab",
        B,
        ("10.1.0.0/24",),
        ("10.2.0.0/24",),
        proposals=("aes128gcm16-prfsha256-x25519",),
    )
    cb = conn(
        "h2.lab",
        "h1.lab",
        A,
        ("10.2.0.0/24",),
        ("10.1.0.0/24",),
        proposals=("aes256gcm16-prfsha384-ecp384",),
    )
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (failed,) = of(pair.events[A], NegotiationFailed)
    assert "NO_PROPOSAL_CHOSEN" in failed.reason
    assert not pair.b.sas()  # the responder kept no state


def test_traffic_selectors_are_narrowed_and_mismatches_refused():
    net = FakeNetwork()
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/16",), ("10.2.0.0/16",))
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (child,) = of(pair.events[A], ChildSaReady)
    assert (child.local_ts, child.remote_ts) == (("10.1.0.0/24",), ("10.2.0.0/24",))

    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.9.0.0/24",))
    pair = Pair(FakeNetwork(), ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert of(pair.events[A], IkeSaUp)  # the IKE SA stands
    (failed,) = of(pair.events[A], NegotiationFailed)
    assert "TS_UNACCEPTABLE" in failed.reason


def test_silent_peer_is_declared_dead_after_the_retransmissions():
    pair = lab_pair(Impairment(drop_if=lambda d, s, dst: dst == B))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=100)
    (dead,) = of(pair.events[A], PeerDead)
    sent = [entry for entry in pair.net.log if entry[1] == A]
    assert len(sent) == 1 + 4  # first send and four retransmissions
    assert pair.net.now == pytest.approx(0.5 * (1 + 2 + 4 + 8 + 16), abs=0.1)
    assert dead.connection == "h1-h2"


def test_garbage_and_replays_leave_state_alone():
    pair = lab_pair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    sas_before = [(s.spi_i, s.spi_r, s.state) for s in pair.b.sas()]
    for junk in (b"", b"\x00" * 28, bytes(range(200))):
        pair.b.receive(junk, A, 100.0)
    first_request = next(e[3] for e in pair.net.log if e[1] == A)
    pair.b.receive(first_request, A, 101.0)  # a stale IKE_SA_INIT retransmission
    assert [(s.spi_i, s.spi_r, s.state) for s in pair.b.sas()] >= sas_before
    assert not of(pair.b.pop_events(), ChildSaReady)


def established() -> Pair:
    pair = lab_pair()
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)
    return pair


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_delete_ike_sa_from_either_side_removes_everything(side):
    pair = established()
    assert pair.a.sas_of("h1-h2") == pair.a.sas() and pair.b.sas_of("h1-h2") == pair.b.sas()
    engine = pair.a if side == "initiator" else pair.b
    engine.delete_ike_sa(engine.sas()[0], pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert pair.a.sas_of("h1-h2") == pair.b.sas_of("h1-h2") == []
    for addr, engine_ in ((A, pair.a), (B, pair.b)):
        (down,) = of(pair.events[addr], IkeSaDown)
        assert down.reason == ("deleted by us" if engine_ is engine else "deleted by peer")
        assert len(of(pair.events[addr], ChildSaDeleted)) == 1
        assert not engine_.sas()


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_delete_child_sa_keeps_the_ike_sa(side):
    pair = established()
    engine = pair.a if side == "initiator" else pair.b
    sa = engine.sas()[0]
    (spi_in,) = sa.children
    engine.delete_child_sa(sa, spi_in, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (gone_a,), (gone_b,) = of(pair.events[A], ChildSaDeleted), of(pair.events[B], ChildSaDeleted)
    assert (gone_a.spi_in, gone_a.spi_out) == (gone_b.spi_out, gone_b.spi_in)
    assert not of(pair.events[A], IkeSaDown) and not of(pair.events[B], IkeSaDown)
    assert pair.a.sas()[0].state == pair.b.sas()[0].state == "established"
    assert not pair.a.sas()[0].children and not pair.b.sas()[0].children


def test_dead_peer_detection():
    pair = established()
    pair.a.check_liveness(pair.a.sas()[0], pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert not of(pair.events[A], PeerDead)  # answered
    pair.net.impairment.drop_if = lambda d, s, dst: dst == A  # now B's answers vanish
    pair.a.check_liveness(pair.a.sas()[0], pair.net.now)
    pair.pump(until=pair.net.now + 100)
    (dead,) = of(pair.events[A], PeerDead)
    assert dead.connection == "h1-h2" and not pair.a.sas()
    # Its Child SAs are reported gone, so the shell removes them from the data plane.
    (gone,) = of(pair.events[A], ChildSaDeleted)
    (down,) = of(pair.events[A], IkeSaDown)
    assert gone.reason == down.reason == "peer dead"


def test_liveness_checks_come_every_dpd_delay_and_wait_for_a_request_under_way():
    """dpd_delay is the engine's own schedule (issue 17: protocol policy in the sans-IO
    layer; keywayd polled every SA each second): an empty INFORMATIONAL every dpd_delay
    seconds on an established IKE SA, none while another request of ours is unanswered
    (its answer tells as much), and a peer that stops answering is dead within dpd_delay
    and the retransmission schedule."""
    pair = lab_pair(dpd_delay=10)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (sa,) = pair.a.sas()
    up = pair.net.now
    checks: list[float] = []

    def watch(data: bytes, src, dst) -> bool:
        request = data[18] == ExchangeType.INFORMATIONAL and not data[19] & 0x20
        if src == A and request and sa.request is not None and sa.request.kind == "dpd":
            checks.append(pair.net.now)  # not the Delete of a rekeyed Child SA
        return False

    pair.net.impairment.drop_if = watch
    pair.pump(until=up + 25)
    assert [round(t - up) for t in checks] == [10, 20]
    # A Child SA rekey at 29 s whose answers are lost until 31 s: the check due at
    # 30 s waits for it, then goes out.
    pair.pump(until=up + 29)
    pair.net.deliver_until(up + 29)  # the clock moves on to 29 s (nothing is due)
    (spi_in,) = sa.children
    pair.a.rekey_child_sa(sa, spi_in, pair.net.now)
    pair.net.impairment.drop_if = lambda data, src, dst: (
        watch(data, src, dst) or (dst == A and pair.net.now < up + 31)
    )
    pair.pump(until=up + 36)
    assert sa.request is None and len(sa.children) == 1  # the rekey is done
    # Postponed, not skipped (the next regular one is at 40 s), and not sent meanwhile.
    (late,) = [t for t in checks if t > up + 25]
    assert up + 31 <= late < up + 36
    pair.net.impairment.drop_if = lambda data, src, dst: dst == A  # B goes silent
    pair.pump(until=up + 200)
    assert of(pair.events[A], PeerDead)
    assert not pair.a.sas()


def test_a_replaced_ike_sa_waiting_for_the_peer_s_delete_gets_no_liveness_checks():
    """Issue 14, item 18: an IKE SA kept only until the peer deletes it (here B's Delete
    after its rekey is lost) is no connection's carrier: it gets no liveness checks
    (they kept the peer's redundant SA busy, and pluto dropped them); its successor
    does."""
    pair = lab_pair(dpd_delay=30)
    pair.b.add_connection(dataclasses.replace(pair.b.connections["h1-h2"], dpd_delay=0))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1)
    (old,) = pair.a.sas()

    def on_old(data: bytes, src, dst) -> bool:
        return src == B and data[:8] == old.spi_i and data[18] == ExchangeType.INFORMATIONAL

    lose = LoseFirst(on_old, 9)
    pair.net.impairment.drop_if = lose
    pair.b.rekey_ike_sa(pair.b.sas()[0], pair.net.now)
    pair.pump(until=pair.net.now + 1)
    new = next(sa for sa in pair.a.sas() if sa is not old)
    assert old.replaced and old.state == "established" and old.request is None
    sent: list[bytes] = []

    def watch(data: bytes, src, dst) -> bool:
        if src == A:
            sent.append(data)
        return lose(data, src, dst)  # B's Delete and its retransmissions stay lost

    pair.net.impairment.drop_if = watch
    pair.pump(until=pair.net.now + 31)  # dpd_delay from either SA's start
    assert len(lose.lost) == 5 and old.state == "established"  # B gave up on its Delete
    checked = {d[:8] for d in sent if d[18] == ExchangeType.INFORMATIONAL and not d[19] & 0x20}
    assert checked == {new.spi_i}


def test_a_responder_s_answer_to_an_address_is_worked_out_once_and_again_after_a_change():
    """Issue 18: an IKE_SA_INIT was answered from every connection the address may be
    for, walked per request (a hub with 10,000 connections to one address spent 62% of
    its time there; bench/keywayd_setup.py). Now once per address, and anew when a
    connection changes: a proposal the reloaded connection has is what B offers."""
    pair = lab_pair()
    first = pair.b._answering_for(A)
    assert pair.b._answering_for(A) is first
    assert first.proposals == (("aes256gcm16-prfsha384-x25519", False),)
    other = ("aes128gcm16-prfsha256-ecp256",)
    for engine in (pair.a, pair.b):
        engine.add_connection(dataclasses.replace(engine.connections["h1-h2"], proposals=other))
    assert pair.b._answering_for(A).proposals == ((other[0], False),)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=5)
    (sa,) = pair.b.sas()
    assert sa.state == "established" and describe(sa.chosen_ike) == "aes128gcm16-prfsha256-ecp256"


def test_queued_requests_wait_for_the_window():
    pair = established()
    sa = pair.a.sas()[0]
    (spi_in,) = sa.children
    pair.a.check_liveness(sa, pair.net.now)
    pair.a.delete_child_sa(sa, spi_in, pair.net.now)  # queued behind the DPD
    pair.a.delete_ike_sa(sa, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert [type(e).__name__ for e in pair.events[B][-2:]] == ["ChildSaDeleted", "IkeSaDown"]


@pytest.mark.parametrize("side", ["initiator", "responder"])
@pytest.mark.parametrize("esp", [("aes256gcm16",), ("aes128gcm16-x25519",)])
def test_child_rekey_make_before_break(side, esp):
    pair = lab_pair(esp=esp)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    engine = pair.a if side == "initiator" else pair.b
    sa = engine.sas()[0]
    (old_spi,) = sa.children
    first = {addr: of(pair.events[addr], ChildSaReady)[0] for addr in (A, B)}
    engine.rekey_child_sa(sa, old_spi, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    new = {addr: of(pair.events[addr], ChildSaReady)[1] for addr in (A, B)}
    assert (new[A].spi_in, new[A].spi_out) == (new[B].spi_out, new[B].spi_in)
    assert new[A].key_out == new[B].key_in and new[A].key_out != first[A].key_out
    assert new[A].rekeyed_from == first[A].spi_in and new[B].rekeyed_from == first[B].spi_in
    for addr, eng in ((A, pair.a), (B, pair.b)):
        (gone,) = of(pair.events[addr], ChildSaDeleted)
        assert gone.spi_in == first[addr].spi_in
        # The new SA was announced before the old one went (make-before-break).
        kinds = [type(e).__name__ for e in pair.events[addr]]
        assert kinds.index("ChildSaDeleted") > len(kinds) - 1 - kinds[::-1].index("ChildSaReady")
        assert list(eng.sas()[0].children) == [new[addr].spi_in]


def test_rekey_of_a_child_the_peer_does_not_know_replaces_it_with_a_new_one():
    pair = established()
    sa_a = pair.a.sas()[0]
    (spi,) = sa_a.children
    real = sa_a.children[spi]
    sa_a.children[spi] = type(real)(**{**real.__dict__, "spi_in": 1})  # peer can't know it
    sa_a.children = {1: sa_a.children[spi]}
    b_before = set(pair.b.sas()[0].children)
    pair.a.rekey_child_sa(sa_a, 1, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    # B answered CHILD_SA_NOT_FOUND and changed nothing; A dropped the useless Child SA
    # and negotiated a fresh one (not a rekey) in its place.
    assert not of(pair.events[A], NegotiationFailed)
    assert of(pair.events[A], ChildSaDeleted)[-1].reason == "peer lost it"
    fresh_a, fresh_b = of(pair.events[A], ChildSaReady)[-1], of(pair.events[B], ChildSaReady)[-1]
    assert fresh_a.rekeyed_from == 0 and (fresh_a.spi_in, fresh_a.key_in) == (
        fresh_b.spi_out,
        fresh_b.key_out,
    )
    assert set(pair.a.sas()[0].children) == {fresh_a.spi_in}
    assert set(pair.b.sas()[0].children) == b_before | {fresh_b.spi_in}


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_ike_rekey_moves_children_and_retires_the_old_sa(side):
    pair = established()
    engine = pair.a if side == "initiator" else pair.b
    old = engine.sas()[0]
    children_before = {addr: set(e.sas()[0].children) for addr, e in ((A, pair.a), (B, pair.b))}
    engine.rekey_ike_sa(old, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    rekeyed = {addr: of(pair.events[addr], IkeSaRekeyed) for addr in (A, B)}
    assert len(rekeyed[A]) == len(rekeyed[B]) == 1
    assert (rekeyed[A][0].spi_i, rekeyed[A][0].spi_r) == (rekeyed[B][0].spi_i, rekeyed[B][0].spi_r)
    assert rekeyed[A][0].spi_i not in (old.spi_i, old.spi_r)
    for addr, eng in ((A, pair.a), (B, pair.b)):
        (down,) = of(pair.events[addr], IkeSaDown)
        assert down.reason == "replaced by rekey"
        assert not of(pair.events[addr], ChildSaDeleted)
        (current,) = eng.sas()
        assert set(current.children) == children_before[addr]
    # The new IKE SA works: a child rekey and a liveness check through it.
    new_a = pair.a.sas()[0]
    pair.a.rekey_child_sa(new_a, next(iter(new_a.children)), pair.net.now)
    pair.a.check_liveness(new_a, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert len(of(pair.events[B], ChildSaReady)) == 2
    assert not of(pair.events[A], PeerDead)


def cert_pair(ca_a, ca_b, cert_a, cert_b, ids=("h1.lab", "h2.lab")) -> Pair:
    def make(local_id, remote_id, remote, lts, rts, mine, trust):
        return dataclasses.replace(
            conn(local_id, remote_id, remote, lts, rts),
            auth="pubkey",
            certs=(mine.der,),
            private_key=mine.key,
            cacerts=(trust.cert,),
            psk=b"",
        )

    return Pair(
        FakeNetwork(),
        make(ids[0], ids[1], B, ("10.1.0.0/24",), ("10.2.0.0/24",), cert_a, ca_a),
        make(ids[1], ids[0], A, ("10.2.0.0/24",), ("10.1.0.0/24",), cert_b, ca_b),
    )


def test_certificates_authenticate_both_ways():
    ca = make_ca()
    pair = cert_pair(ca, ca, make_cert(ca, "h1.lab", ec.SECP384R1), make_cert(ca, "h2.lab"))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)
    assert of(pair.events[B], IkeSaUp)[0].remote_id == "h1.lab"


@pytest.mark.parametrize(
    ("bits", "peer_hashes", "expected"),
    [
        (2048, {2, 3, 4, 5}, ("rsa-pss", "sha256")),
        (3072, {2, 3, 4, 5}, ("rsa-pss", "sha384")),
        (3072, {2}, ("rsa-pss", "sha256")),  # the strongest the peer announced
        (8192, set(), ("rsa-pss", "sha512")),  # none announced: the key's own
    ],
)
def test_rsa_keys_sign_with_pss_and_a_hash_the_peer_announced(bits, peer_hashes, expected):
    key = _rsa_key(bits)
    assert core._signature_scheme(key, frozenset(peer_hashes)) == expected


@functools.cache
def _rsa_key(bits: int):
    return rsa.generate_private_key(65537, bits)


def test_rsa_certificates_authenticate_with_pss_both_ways():
    ca = make_ca()
    cert_a = make_cert(ca, "h1.lab", key=_rsa_key(3072))
    cert_b = make_cert(ca, "h2.lab", key=_rsa_key(2048))
    pair = cert_pair(ca, ca, cert_a, cert_b)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    # Both verified (PKCS#1 v1.5 would be refused: not allow_weak), so both used PSS.
    assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)
    assert pair.a.sas()[0].peer_sig_hashes == pair.b.sas()[0].peer_sig_hashes == {2, 3, 4, 5}


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("unknown CA", "is issued by 'CN=Other CA,O=Keyway tests', not by a configured CA"),
        ("wrong name", "does not verify for identity 'h1.lab': not among its subjectAltNames"),
        ("expired", "'CN=h1.lab,O=Keyway tests' expired 20"),
    ],
)
def test_certificate_problems_fail_authentication_with_the_reason(problem, reason):
    ca, other = make_ca(), make_ca("Other CA")
    cert_a = {
        "unknown CA": make_cert(other, "h1.lab"),
        "wrong name": make_cert(ca, "h9.lab"),
        "expired": make_cert(ca, "h1.lab", valid_days=(-30, -1)),
    }[problem]
    pair = cert_pair(ca, ca, cert_a, make_cert(ca, "h2.lab"))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (failed,) = of(pair.events[B], AuthFailed)
    assert reason in failed.reason
    assert not of(pair.events[B], IkeSaUp) and of(pair.events[A], AuthFailed)


@pytest.mark.parametrize(("accepted", "up"), [(("ecdsa",), True), (("ed25519", "rsa-pss"), False)])
def test_remote_auth_constrains_the_peer_s_signature_scheme(accepted, up):
    """remote auth: rsa/pss, ecdsa, ed25519... (strongSwan's constraints): a signature
    that verifies but is of another scheme is refused, saying which."""
    ca = make_ca()
    pair = cert_pair(ca, ca, make_cert(ca, "h1.lab"), make_cert(ca, "h2.lab"))
    pair.b.add_connection(
        dataclasses.replace(pair.b.connections["h1-h2"], peer_signatures=accepted)
    )
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    if up:
        assert of(pair.events[B], ChildSaReady)
    else:
        (failed,) = of(pair.events[B], AuthFailed)
        assert failed.reason.endswith(
            "the peer signed with ecdsa; remote auth accepts ed25519, rsa-pss"
        )
        assert not of(pair.events[B], IkeSaUp)


def test_cookies_under_load_cost_the_responder_no_state():
    pair = lab_pair()
    pair.b.cookie_threshold = 0  # every IKE_SA_INIT must bring a cookie first
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)
    sent_by_a = [e[3] for e in pair.net.log if e[1] == A]
    assert b"\x40\x06" in sent_by_a[1][28:80]  # the retried IKE_SA_INIT starts with COOKIE
    # A spoofed flood without cookies leaves no half-open state behind.
    before = len(pair.b.sas())
    first = sent_by_a[0]
    for i in range(50):
        spoofed = bytes([i]) + first[1:]  # another initiator SPI each time
        pair.b.receive(spoofed, ("198.51.100.7", 500), pair.net.now)
    pair.b.add_connection(
        dataclasses.replace(
            pair.b.connections["h1-h2"], name="spoof", remote_address=("198.51.100.7", 500)
        )
    )
    for i in range(50):
        pair.b.receive(bytes([i]) + first[1:], ("198.51.100.7", 500), pair.net.now)
    assert len(pair.b.sas()) == before
    assert len(pair.b.pop_datagrams()) == 50  # a COOKIE answer each, nothing more


def test_child_sas_rekey_on_schedule_with_jitter_and_keep_traffic_keys_paired():
    net = FakeNetwork()
    child = dict(rekey_time=100.0, rand_time=10.0, life_time=120.0)
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    ca = dataclasses.replace(ca, children=(dataclasses.replace(ca.children[0], **child),))
    cb = dataclasses.replace(cb, children=(dataclasses.replace(cb.children[0], **child),))
    pair = Pair(net, ca, cb)
    # Both ends' jitter seeded: unseeded, B's rekey crossed A's in about 1 run in 100
    # (a rekey collision, tests/unit/engine/test_collisions.py), one more SA each.
    pair.a.rng.seed(7)
    pair.b.rng.seed(11)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=350.0)
    ready_a = of(pair.events[A], ChildSaReady)
    ready_b = of(pair.events[B], ChildSaReady)
    # Established at ~0, then rekeyed every 90 to 100 s: three rekeys by t=350.
    assert len(ready_a) == len(ready_b) == 4
    assert all(r.rekeyed_from for r in ready_a[1:])
    assert [a.key_out for a in ready_a] == [b.key_in for b in ready_b]
    # Each old SA was deleted after its successor came; none hit the hard lifetime.
    assert len(of(pair.events[B], ChildSaDeleted)) == 3
    assert all(e.reason != "expired" for e in of(pair.events[B], ChildSaDeleted))
    assert len(pair.a.sas()[0].children) == 1 and len(pair.b.sas()[0].children) == 1


def test_hard_lifetime_deletes_a_child_the_initiator_cannot_rekey():
    net = FakeNetwork()
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    # The responder's Child SA lives 50 s; the initiator never rekeys (no rekey_time).
    cb = dataclasses.replace(cb, children=(dataclasses.replace(cb.children[0], life_time=50.0),))
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=100.0)
    (gone_b,) = of(pair.events[B], ChildSaDeleted)
    (gone_a,) = of(pair.events[A], ChildSaDeleted)
    # The end whose lifetime ran out says why; keywayd re-creates such a Child SA.
    assert gone_b.reason == "hard lifetime reached" and gone_a.reason == "deleted by peer"
    assert pair.a.sas()[0].state == "established"  # the IKE SA stays


def test_a_child_past_its_hard_lifetime_leaves_the_data_plane_before_its_delete_is_answered():
    """Found by bench/soak.py: a Child SA reached its hard lifetime while its Delete went
    unanswered (lost answers), and stayed installed for 39 s more, its keys still
    accepted. It goes at its hard lifetime (ChildSaDeleted, once); the Delete still
    tells the peer."""
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    cb = dataclasses.replace(cb, children=(dataclasses.replace(cb.children[0], life_time=50.0),))
    pair = Pair(FakeNetwork(), ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    # A's answers to B's Delete are lost twice: it gets through 1.5 s later.
    lose = LoseFirst(lambda data, src, dst: src == A and data[18] == 37 and data[19] & 0x20, 2)
    pair.net.impairment.drop_if = lose
    pair.pump(until=50.1)
    (gone,) = of(pair.events[B], ChildSaDeleted)
    assert gone.reason == "hard lifetime reached"
    assert pair.b.sas()[0].children  # its Delete not answered yet
    pair.pump(until=100.0)
    assert len(lose.lost) == 2 and not pair.b.sas()[0].children
    assert len(of(pair.events[B], ChildSaDeleted)) == 1  # announced once
    assert [e.reason for e in of(pair.events[A], ChildSaDeleted)] == ["deleted by peer"]


def test_a_child_the_peer_rekeyed_outlives_its_hard_lifetime_until_the_peer_deletes_it():
    """Issue 14, item 22: B answered A's rekey, the answer was lost, and B's hard
    lifetime came before A's retransmission got through. B deleting the old Child SA
    then left A nothing to send on (2.6 to 4.7 s in a soak); B keeps it for A's Delete,
    two retransmissions at most."""
    net = FakeNetwork()
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    ca = dataclasses.replace(
        ca, children=(dataclasses.replace(ca.children[0], rekey_time=100.0, life_time=200.0),)
    )
    cb = dataclasses.replace(cb, children=(dataclasses.replace(cb.children[0], life_time=100.2),))
    pair = Pair(net, ca, cb)
    lose = LoseFirst(lambda data, src, dst: dst == A and data[18] == ExchangeType.CREATE_CHILD_SA)
    pair.net.impairment.drop_if = lose
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=130.0)
    assert lose.lost  # A retransmitted its rekey 0.5 s later, after B's hard lifetime
    (first, second) = of(pair.events[A], ChildSaReady)
    assert second.rekeyed_from == first.spi_in
    (gone_a,), (gone_b,) = of(pair.events[A], ChildSaDeleted), of(pair.events[B], ChildSaDeleted)
    assert gone_a.spi_in == first.spi_in and gone_a.reason == "deleted by us"
    assert gone_b.spi_in == first.spi_out and gone_b.reason == "deleted by peer"
    # A held a Child SA throughout: the old one went only after the new one came.
    kinds = [type(e) for e in pair.events[A] if isinstance(e, (ChildSaReady, ChildSaDeleted))]
    assert kinds == [ChildSaReady, ChildSaReady, ChildSaDeleted]


def test_initial_contact_from_a_restarted_peer_replaces_its_stale_ike_sa():
    pair = established()
    (old,) = pair.b.sas()
    first = of(pair.events[B], ChildSaReady)[0]
    # A restarts: a fresh engine (no memory of its IKE SA) at the same address.
    restarted = Engine(A)
    restarted.add_connection(pair.a.connections["h1-h2"])
    pair.a = restarted
    pair.net.attach(A, lambda d, s, _dst, now: restarted.receive(d, s, now))
    pair.events[A] = []
    restarted.initiate("h1-h2", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (down,) = of(pair.events[B], IkeSaDown)
    assert down.reason == "peer restarted (INITIAL_CONTACT)" and down.spi_i == old.spi_i
    (gone,) = of(pair.events[B], ChildSaDeleted)
    assert gone.spi_in == first.spi_in
    (now_sa,) = pair.b.sas()
    assert now_sa is not old and now_sa.state == "established"


def restart_b(pair: Pair) -> Engine:
    """B restarts, knowing nothing of its SAs: a fresh engine at its address with its
    connection (which only answers). A's events so far are cleared."""
    restarted = Engine(B)
    restarted.add_connection(pair.b.connections["h1-h2"])
    pair.b = restarted
    pair.net.attach(B, lambda d, s, _dst, now: restarted.receive(d, s, now))
    pair.events[A] = []
    return restarted


@pytest.mark.parametrize("rtt", [0.01, 0.2])
def test_a_responder_that_restarted_is_back_within_a_liveness_check_and_two_round_trips(rtt):
    pair = lab_pair(impairment=Impairment(delay=rtt / 2))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (old,) = pair.a.sas()
    (old_child,) = old.children.values()
    # B restarts and waits for peers (responder only): a fresh engine at its address.
    restarted = restart_b(pair)
    checked_at = pair.net.now
    pair.a.check_liveness(old, checked_at)  # A's next DPD: B answers INVALID_IKE_SPI
    pair.pump(until=checked_at + 60)
    (new,) = pair.a.sas()
    (child,) = new.children.values()
    (ready,) = of(pair.events[A], ChildSaReady)
    (peer_child,) = restarted.sas()[0].children.values()
    assert (child.spi_out, child.key_out) == (peer_child.spi_in, peer_child.key_in)
    # The liveness check's round trip, then IKE_SA_INIT's and IKE_AUTH's: three in all
    # (fake time; without the hint, the retransmission schedule: minutes).
    assert ready.spi_in == child.spi_in
    assert new.established_at - checked_at <= 3 * rtt + 0.01
    ups = of(pair.events[A], IkeSaUp)
    assert len(ups) == 1
    (down,) = of(pair.events[A], IkeSaDown)
    assert down.spi_i == old.spi_i and down.reason == "replaced by reauthentication"
    assert not of(pair.events[A], PeerDead)
    (gone,) = of(pair.events[A], ChildSaDeleted)
    assert gone.spi_in == old_child.spi_in
    assert pair.events[A].index(ready) < pair.events[A].index(gone)  # make-before-break


def test_esp_at_a_peer_that_restarted_brings_the_tunnel_back_without_waiting_for_dpd():
    """Issue 14, item 3: B restarted; A still sends ESP on the Child SA B forgot, and
    A's next liveness check may be minutes away. B has no IKE SA with A to tell it under,
    so it says INVALID_SPI unprotected (RFC 7296 1.5); A takes that as a hint, checks
    liveness at once, gets INVALID_IKE_SPI and negotiates a new IKE SA make-before-break.
    The hint changes nothing by itself, gets no answer, and is acted on once per
    HINT_INTERVAL; one naming an SPI we do not send on is ignored."""
    pair = established()
    (old,) = pair.a.sas()
    (old_child,) = old.children.values()
    restarted = restart_b(pair)
    sent: list[bytes] = []
    pair.net.impairment.drop_if = lambda data, src, dst: src == A and sent.append(data) and False

    # A forged hint (an SPI A sends on no Child SA of) changes nothing and is not answered.
    start = pair.net.now
    assert restarted.tell_unknown_spi(A[0], old_child.spi_out ^ 1, start)
    pair.pump(until=start + 1)
    assert not sent and pair.a.sas() == [old] and old.request is None

    # ESP of A's on the Child SA B lost: the hint. A checks liveness, once per interval.
    assert restarted.tell_unknown_spi(A[0], old_child.spi_out, pair.net.now)
    assert restarted.tell_unknown_spi(A[0], old_child.spi_out, pair.net.now)
    hinted = pair.net.now
    pair.pump(until=hinted + 30)
    (new,) = pair.a.sas()
    assert new is not old and new.state == "established"
    assert new.established_at - hinted < 0.1  # three round trips of fake time
    informational = {
        d[20:24] for d in sent if d[:8] == old.spi_i and d[18] == ExchangeType.INFORMATIONAL
    }
    assert len(informational) == 2  # one liveness check for two hints, then the Delete
    (down,) = of(pair.events[A], IkeSaDown)
    assert down.reason == "replaced by reauthentication"
    assert not of(pair.events[A], PeerDead)
    (peer_child,) = restarted.sas()[0].children.values()
    (child,) = new.children.values()
    assert (child.spi_out, child.key_out) == (peer_child.spi_in, peer_child.key_in)


def test_invalid_spi_outside_an_ike_sa_goes_only_to_a_configured_peer_and_is_rate_limited():
    engine = Engine(B)
    engine.add_connection(lab_pair().b.connections["h1-h2"])
    assert not engine.tell_unknown_spi("198.51.100.9", 0x1234, 0.0)  # no connection names it
    told = [engine.tell_unknown_spi(A[0], 0x1234 + n, 1.0) for n in range(50)]
    assert told.count(True) == core.INVALID_SPI_ANSWERS_PER_SECOND
    datagrams = engine.pop_datagrams()
    assert len(datagrams) == core.INVALID_SPI_ANSWERS_PER_SECOND
    msg = codec.decode_message(datagrams[0].data)
    (notify,) = msg.payloads
    assert (notify.type, notify.data) == (NotifyType.INVALID_SPI, (0x1234).to_bytes(4, "big"))
    assert datagrams[0].dst == A and not msg.header.is_response
    assert engine.tell_unknown_spi(A[0], 0x1234, 2.0)  # the next second


def test_an_older_ike_sa_the_peer_dropped_is_not_renewed_when_a_newer_one_lives():
    """The peer answers for an older IKE SA with INVALID_IKE_SPI while a newer one with it
    is up (a reauthentication's race): it did not restart, so no new IKE SA is made; the
    older one ends quietly, without a PeerDead."""
    pair = established()
    (old,) = pair.a.sas()
    pair.a.initiate("h1-h2", pair.net.now)  # a second IKE SA (no INITIAL_CONTACT)
    pair.pump(until=pair.net.now + 30)
    newer = next(sa for sa in pair.a.sas() if sa is not old)
    old_b = next(sa for sa in pair.b.sas() if sa.spi_i == old.spi_i)
    pair.b._forget(old_b)  # B drops the older one without a word
    pair.events[A] = []
    pair.a.check_liveness(old, pair.net.now)
    pair.pump(until=pair.net.now + 120)
    assert pair.a.sas() == [newer] and not of(pair.events[A], IkeSaUp)
    assert not of(pair.events[A], PeerDead)
    (down,) = of(pair.events[A], IkeSaDown)
    assert down.spi_i == old.spi_i and down.reason == "replaced by a newer IKE SA with the peer"


def test_a_spoofed_invalid_ike_spi_deletes_nothing():
    pair = established()
    (sa,) = pair.a.sas()
    (child,) = sa.children.values()
    pair.a.check_liveness(sa, pair.net.now)
    (dpd,) = pair.a.pop_datagrams()
    # An answer from anyone on the path, unprotected, before the peer's own.
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
        HeaderFlag,
        NotifyType,
    )

    h = codec.decode_message(dpd.data).header
    spoof = codec.Header(h.spi_i, h.spi_r, h.exchange, HeaderFlag.RESPONSE, h.message_id)
    pair.a.receive(
        codec.encode_message(codec.Message(spoof, [codec.Notify(type=NotifyType.INVALID_IKE_SPI)])),
        B, pair.net.now,
    )  # fmt: skip
    pair.net.send(dpd.data, dpd.src, dpd.dst)  # the real DPD reaches B, which answers
    pair.pump(until=pair.net.now + 60)
    # At most a reauthentication: a working IKE SA and Child SA replaced by new ones.
    (now_a,), (now_b,) = pair.a.sas(), pair.b.sas()
    assert (now_a.spi_i, now_a.spi_r) == (now_b.spi_i, now_b.spi_r)
    assert now_a.state == now_b.state == "established" and len(now_a.children) == 1
    (child_a,), (child_b,) = now_a.children.values(), now_b.children.values()
    assert (child_a.spi_in, child_a.spi_out) == (child_b.spi_out, child_b.spi_in)
    assert not of(pair.events[A], PeerDead) and not of(pair.events[B], PeerDead)
    assert child.spi_in != child_a.spi_in or now_a is sa


def test_a_second_ike_sa_with_the_same_peer_keeps_the_first():
    pair = established()
    pair.a.initiate("h1-h2", pair.net.now)  # no INITIAL_CONTACT: A still has its first
    pair.pump(until=pair.net.now + 30)
    assert not of(pair.events[B], IkeSaDown)
    assert len(pair.b.sas()) == 2


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_ah_child_sas_are_negotiated_rekeyed_and_deleted(mode):
    """Issue 14, item 6: AH (integrity only) as the child's protocol, end to end."""
    pair = lab_pair(esp=("sha256", "sha384"), child_protocol="ah", mode=mode)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (ca,), (cb,) = of(pair.events[A], ChildSaReady), of(pair.events[B], ChildSaReady)
    assert ca.protocol == cb.protocol == "ah" and ca.mode == mode
    assert ca.integ_id == IntegId.HMAC_SHA2_256_128 and ca.encr_id == 0
    assert ca.key_out == ca.key_in == b"" and len(ca.integ_key_out) == 32
    assert (ca.integ_key_out, ca.integ_key_in) == (cb.integ_key_in, cb.integ_key_out)
    assert (ca.spi_in, ca.spi_out) == (cb.spi_out, cb.spi_in)
    sa_a = pair.a.sas()[0]
    pair.a.rekey_child_sa(sa_a, ca.spi_in, pair.net.now)  # REKEY_SA names the AH SA
    pair.pump(until=pair.net.now + 30)
    (new_a,) = sa_a.children.values()
    (new_b,) = pair.b.sas()[0].children.values()
    assert new_a.rekeyed_from == ca.spi_in and new_a.protocol == new_b.protocol == "ah"
    assert {d.spi_in for d in of(pair.events[B], ChildSaDeleted)} == {cb.spi_in}
    pair.b.delete_child_sa(pair.b.sas()[0], new_b.spi_in, pair.net.now)  # an AH Delete
    pair.pump(until=pair.net.now + 30)
    assert not sa_a.children and not pair.b.sas()[0].children


def test_an_esp_offer_gets_no_ah_child_and_the_reverse():
    for a_wants, b_wants in (("ah", "esp"), ("esp", "ah")):
        offers = {"ah": {"esp": ("sha256",), "child_protocol": "ah"}, "esp": {}}
        pair = Pair(
            FakeNetwork(),
            conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",), **offers[a_wants]),
            conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",), **offers[b_wants]),
        )
        pair.a.initiate("h1-h2", 0.0)
        pair.pump()
        assert not of(pair.events[A], ChildSaReady) and not of(pair.events[B], ChildSaReady)
        (failed,) = of(pair.events[A], NegotiationFailed)
        assert failed.reason == "child sites: NO_PROPOSAL_CHOSEN"


def test_a_child_proposal_we_did_not_offer_is_refused_and_deleted(monkeypatch):
    """A responder that picks a proposal outside our offer (here AES-CBC with SHA-256
    for an offer of AES-GCM only) gets no Child SA installed and a Delete for it."""
    pair = lab_pair()
    select = core.IkeSa._select_child

    def unoffered(self, candidates, sa, tsi, tsr):
        params, chosen, new_tsi, new_tsr = select(self, candidates, sa, tsi, tsr)
        cbc = parse_proposal_string("aes128-sha256", "esp").to_proposal(chosen.number, chosen.spi)
        return params, cbc, new_tsi, new_tsr

    monkeypatch.setattr(core.IkeSa, "_select_child", unoffered)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert not of(pair.events[A], ChildSaReady)
    (failed,) = of(pair.events[A], NegotiationFailed)
    assert failed.reason.startswith("child sites: the peer chose a proposal we did not offer")
    assert failed.reason.endswith(": aes128-sha256-noesn")
    # B made it, then deleted it at A's request; the IKE SA stays up at both ends.
    (made,) = of(pair.events[B], ChildSaReady)
    (gone,) = of(pair.events[B], ChildSaDeleted)
    assert gone.spi_in == made.spi_in and gone.reason == "deleted by peer"
    assert pair.a.sas()[0].state == pair.b.sas()[0].state == "established"


@pytest.mark.parametrize("exchange", ["IKE_AUTH", "CREATE_CHILD_SA"])
def test_selectors_the_responder_widened_are_refused_and_deleted(monkeypatch, exchange):
    """A responder may narrow the initiator's traffic selectors, never widen them (RFC
    7296 2.9): keywayd installs its policies from the negotiated ones, so a widened
    0.0.0.0/0 would pull all of the host's traffic into the peer's tunnel. Found by the
    engine fuzzer's harness review."""
    pair = lab_pair()
    if exchange == "CREATE_CHILD_SA":
        pair.a.initiate("h1-h2", 0.0)
        pair.pump()
        pair.events = {A: [], B: []}
    select = core.IkeSa._select_child

    def widened(self, candidates, sa, tsi, tsr):
        params, chosen, new_tsi, _tsr = select(self, candidates, sa, tsi, tsr)
        return params, chosen, new_tsi, [core._ts_from_prefix("0.0.0.0/0")]

    monkeypatch.setattr(core.IkeSa, "_select_child", widened)
    if exchange == "IKE_AUTH":
        pair.a.initiate("h1-h2", 0.0)
    else:
        sa = pair.a.sas()[0]
        pair.a.rekey_child_sa(sa, next(iter(sa.children)), pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert not of(pair.events[A], ChildSaReady)
    (failed,) = of(pair.events[A], NegotiationFailed)
    assert failed.reason == (
        "child sites: the peer's traffic selectors 10.1.0.0/24 === 0.0.0.0/0 are not within ours"
    )
    (made,) = of(pair.events[B], ChildSaReady)
    gone = [e for e in of(pair.events[B], ChildSaDeleted) if e.spi_in == made.spi_in]
    assert [e.reason for e in gone] == ["deleted by peer"]
    assert pair.a.sas()[0].state == pair.b.sas()[0].state == "established"


def unique_pair(unique: str) -> Pair:
    pair = lab_pair(unique=unique)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert len(pair.a.sas()) == len(pair.b.sas()) == 1
    return pair


@pytest.mark.parametrize("initiator", ["same", "other"])
def test_unique_replace_deletes_the_older_ike_sa_at_either_end(initiator):
    pair = unique_pair("replace")
    (old,) = pair.a.sas()
    engine = pair.a if initiator == "same" else pair.b
    engine.initiate("h1-h2", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (kept_a,), (kept_b,) = pair.a.sas(), pair.b.sas()
    assert kept_a is not old and (kept_a.spi_i, kept_a.spi_r) == (kept_b.spi_i, kept_b.spi_r)
    assert kept_a.state == kept_b.state == "established"
    downs = of(pair.events[A], IkeSaDown) + of(pair.events[B], IkeSaDown)
    assert {d.spi_i for d in downs} == {old.spi_i} and len(downs) == 2
    # The new IKE SA carries the child: one Child SA per end, the pair's SPIs crossed.
    (child_a,), (child_b,) = kept_a.children.values(), kept_b.children.values()
    assert (child_a.spi_in, child_a.spi_out) == (child_b.spi_out, child_b.spi_in)


def test_unique_keep_refuses_a_second_ike_sa_at_the_responder():
    pair = unique_pair("keep")
    (first,) = pair.b.sas()
    pair.a.initiate("h1-h2", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (failed,) = of(pair.events[A], AuthFailed)
    assert "AUTHENTICATION_FAILED" in failed.reason
    assert pair.b.sas() == [first] and first.state == "established"
    assert [sa.spi_i for sa in pair.a.sas()] == [first.spi_i]
    assert not of(pair.events[B], IkeSaDown)


@pytest.mark.parametrize(("unique", "refused"), [("keep", True), ("replace", False)])
def test_a_peer_s_reauthentication_under_keep_is_refused_and_the_old_sa_stays(unique, refused):
    pair = unique_pair(unique)
    (old,) = pair.a.sas()
    pair.a.reauthenticate(old, pair.net.now)
    pair.pump(until=pair.net.now + 30)
    (kept_a,), (kept_b,) = pair.a.sas(), pair.b.sas()
    assert (kept_a is old) == refused and kept_a.state == kept_b.state == "established"
    assert (kept_a.spi_i, kept_a.spi_r) == (kept_b.spi_i, kept_b.spi_r)
    assert bool(of(pair.events[A], AuthFailed)) == refused


@pytest.mark.parametrize(("unique", "dropped"), [("no", True), ("never", False)])
def test_unique_never_keeps_an_ike_sa_despite_initial_contact(unique, dropped):
    pair = unique_pair(unique)
    restarted = Engine(A)  # A restarts: INITIAL_CONTACT in its next IKE_AUTH
    restarted.add_connection(pair.a.connections["h1-h2"])
    pair.a = restarted
    pair.net.attach(A, lambda d, s, _dst, now: restarted.receive(d, s, now))
    restarted.initiate("h1-h2", pair.net.now)
    pair.pump(until=pair.net.now + 30)
    assert len(pair.b.sas()) == (1 if dropped else 2)
    assert bool(of(pair.events[B], IkeSaDown)) == dropped


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_child_sa_events_say_which_side_started_the_exchange(side):
    pair = established()
    assert of(pair.events[A], ChildSaReady)[0].initiated
    assert not of(pair.events[B], ChildSaReady)[0].initiated
    engine = pair.a if side == "initiator" else pair.b
    sa = engine.sas()[0]
    engine.rekey_child_sa(sa, next(iter(sa.children)), pair.net.now)
    pair.pump(until=pair.net.now + 30)
    rekeyed = {addr: of(pair.events[addr], ChildSaReady)[1] for addr in (A, B)}
    assert rekeyed[engine.local].initiated
    assert not rekeyed[B if engine is pair.a else A].initiated
    assert rekeyed[A].ike_initiator and not rekeyed[B].ike_initiator
    assert rekeyed[A].local_address == A[0] and rekeyed[A].remote_address == B[0]


NEW_PSK, OLD_PSK = b"rotated-psk-version-2-0123456789", b"the-psk-of-version-1-0123456789"


@pytest.mark.parametrize(
    ("psks_a", "psks_b", "refused_at_b"),
    [
        ((NEW_PSK, OLD_PSK), (OLD_PSK,), 1),  # the initiator rotated first: falls back
        ((OLD_PSK,), (NEW_PSK, OLD_PSK), 0),  # the responder rotated first: accepts v1
        ((NEW_PSK, OLD_PSK), (NEW_PSK, OLD_PSK), 0),  # both rotated: v2 at once
        ((NEW_PSK,), (NEW_PSK, OLD_PSK), 0),  # both converged, the responder not retired
    ],
    ids=["initiator-first", "responder-first", "both", "retired-initiator"],
)
def test_a_rotation_keeps_the_link_whichever_end_moves_first(psks_a, psks_b, refused_at_b):
    def rotating(psks, *args):
        made = conn(*args, psk=psks[0])
        return dataclasses.replace(made, previous_psks=psks[1:])

    pair = Pair(
        FakeNetwork(),
        rotating(psks_a, "h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",)),
        rotating(psks_b, "h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",)),
    )
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert len(of(pair.events[A], IkeSaUp)) == len(of(pair.events[B], IkeSaUp)) == 1
    assert not of(pair.events[A], AuthFailed)
    assert len(of(pair.events[B], AuthFailed)) == refused_at_b
    (ca,), (cb,) = of(pair.events[A], ChildSaReady), of(pair.events[B], ChildSaReady)
    assert ca.key_out == cb.key_in
    assert len(pair.a.sas()) == len(pair.b.sas()) == 1


def test_a_rotation_whose_psks_all_fail_reports_one_failure():
    net = FakeNetwork()
    ca = dataclasses.replace(
        conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",), psk=NEW_PSK),
        previous_psks=(OLD_PSK,),
    )
    cb = conn("h2.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",), psk=b"x" * 32)
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (failed,) = of(pair.events[A], AuthFailed)
    assert "AUTHENTICATION_FAILED" in failed.reason
    assert len(of(pair.events[B], AuthFailed)) == 2  # each PSK was tried once
    assert not pair.a.sas() and not pair.b.sas()


@pytest.mark.parametrize("group", ["modp768", "modp1024", "ecp192", "ecp224"])
def test_weak_groups_negotiate_when_allowed(group):
    suite = f"aes128-sha256-{group}"
    pair = lab_pair(proposals=(suite,), allow_weak=True)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (up,) = of(pair.events[A], IkeSaUp)
    assert up.proposal.endswith(group)
    assert of(pair.events[B], ChildSaReady)


def test_a_rekey_of_a_child_already_replaced_or_going_is_refused_to_the_caller():
    pair = established()
    (sa,) = pair.a.sas()
    (old,) = sa.children
    pair.a.rekey_child_sa(sa, old, pair.net.now)
    pair.pump(until=pair.net.now + 10)
    (new,) = sa.live_children()
    assert new != old
    with pytest.raises(ValueError, match=f"Child SA {old:08x} is unknown"):
        pair.a.rekey_child_sa(sa, old, pair.net.now)
    pair.a.delete_child_sa(sa, new, pair.net.now)  # its Delete is now in flight
    assert new in sa.children and not sa.live_children()
    with pytest.raises(ValueError, match="already replaced or going"):
        pair.a.rekey_child_sa(sa, new, pair.net.now)


def test_an_initiator_that_refuses_the_responder_says_so_and_the_responder_lets_go():
    """RFC 7296 2.21.2: the responder answered IKE_AUTH (its IKE SA and Child SA up),
    but its identity is not the one the initiator expects."""
    net = FakeNetwork()
    ca = conn("h1.lab", "h2.lab", B, ("10.1.0.0/24",), ("10.2.0.0/24",))
    cb = conn("imposter.lab", "h1.lab", A, ("10.2.0.0/24",), ("10.1.0.0/24",))
    pair = Pair(net, ca, cb)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=5.0)
    (refused,) = of(pair.events[A], AuthFailed)
    assert "'imposter.lab' is not 'h2.lab'" in refused.reason
    # The responder had it up, learned it was refused, and dropped all of it.
    assert of(pair.events[B], IkeSaUp) and of(pair.events[B], ChildSaReady)
    (told,) = of(pair.events[B], AuthFailed)
    assert "AUTHENTICATION_FAILED" in told.reason and told.initiator is False
    (down,) = of(pair.events[B], IkeSaDown)
    (gone,) = of(pair.events[B], ChildSaDeleted)
    assert "refused our authentication" in down.reason and gone.reason == down.reason
    assert not pair.a.sas() and not pair.b.sas()


def test_a_child_sa_being_created_is_known_until_it_is_up():
    pair = established()
    (sa,) = pair.a.sas()
    assert not sa.creating("sites")
    pair.a.create_child_sa(sa, "sites", pair.net.now)
    pair.a.create_child_sa(sa, "sites", pair.net.now)  # the second one waits its turn
    assert sa.creating("sites") and not sa.creating("other")
    pair.pump(until=pair.net.now + 10)
    assert not sa.creating("sites") and len(sa.live_children()) == 3


@pytest.mark.parametrize("waiting", ["initiator", "responder"])
def test_ike_auth_waits_for_a_distribution_point_s_crl_then_decides(waiting):
    """Issue 15: the peer's certificate names a CRL distribution point and no current CRL
    is at hand: the end verifying it asks its shell for the CRL (RevocationWanted, once)
    and leaves the message unanswered; the retransmission that follows finds the CRL
    the shell stored and goes through (or is refused, if the CRL revokes the peer)."""
    from cryptography import x509

    from tests.fixtures.pki import issue
    from tests.unit.ike.test_certs import CDP, crl_of

    for revoked in (False, True):
        ca = make_ca()
        cert_a = issue(ca, "h1", sans=[x509.DNSName("h1.lab")], key_usage="sign",
                       extra=[(CDP, False)] if waiting == "responder" else None)  # fmt: skip
        cert_b = issue(ca, "h2", sans=[x509.DNSName("h2.lab")], key_usage="sign",
                       extra=[(CDP, False)] if waiting == "initiator" else None)  # fmt: skip
        pair = cert_pair(ca, ca, cert_a, cert_b)
        checker, peer = (pair.a, pair.b) if waiting == "initiator" else (pair.b, pair.a)
        strict = dataclasses.replace(checker.connections["h1-h2"], revocation="strict")
        checker.add_connection(strict)
        checked = cert_b if waiting == "initiator" else cert_a
        pair.a.initiate("h1-h2", 0.0)
        pair.pump(until=0.3)  # before the first retransmission (0.5 s)
        (wanted,) = of(pair.events[checker.local], RevocationWanted)
        assert wanted.uris == ("http://ca.lab/ca.crl",)
        assert not of(pair.events[checker.local], IkeSaUp)
        checker.revocation_cache.store(wanted.uris[0], crl_of(ca, [checked] if revoked else []))
        pair.pump(until=10)
        assert len(of(pair.events[checker.local], RevocationWanted)) == 1
        if revoked:
            (failed,) = of(pair.events[checker.local], AuthFailed)
            assert "is revoked since" in failed.reason
            assert not checker.sas() and not peer.sas()
        else:
            assert of(pair.events[A], ChildSaReady) and of(pair.events[B], ChildSaReady)


def test_a_peer_without_the_certificate_s_key_makes_us_fetch_nothing():
    """Certificates are public: a peer sending one whose key it does not hold (its AUTH
    signed with another key) is refused at once, before any CRL or OCSP fetch it could
    otherwise make us start."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec as ec_keys

    from tests.fixtures.pki import issue
    from tests.unit.ike.test_certs import CDP

    ca = make_ca()
    cert_a = issue(ca, "h1", sans=[x509.DNSName("h1.lab")], key_usage="sign")
    cert_b = issue(ca, "h2", sans=[x509.DNSName("h2.lab")], key_usage="sign", extra=[(CDP, False)])
    pair = cert_pair(ca, ca, cert_a, cert_b)
    stolen = dataclasses.replace(
        pair.b.connections["h1-h2"], private_key=ec_keys.generate_private_key(ec_keys.SECP256R1())
    )
    pair.b.add_connection(stolen)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=10)
    assert not of(pair.events[A], RevocationWanted) and not pair.a.revocation_cache.wanted
    (failed,) = of(pair.events[A], AuthFailed)
    assert "signature" in failed.reason.lower()


def rekeying_pair(rekey_time: float, life_time: float) -> Pair:
    """A pair up since 1 s, whose A rekeys its Child SA on the schedule given (no jitter)
    and whose B keeps no Child SA schedule."""
    pair = lab_pair()
    a_conn, b_conn = pair.a.connections["h1-h2"], pair.b.connections["h1-h2"]
    quick = dataclasses.replace(a_conn.children[0], rekey_time=rekey_time, life_time=life_time)
    pair.a.add_connection(dataclasses.replace(a_conn, children=(quick,)))
    slow = dataclasses.replace(b_conn.children[0], rekey_time=0.0, life_time=0.0)
    pair.b.add_connection(dataclasses.replace(b_conn, children=(slow,)))
    pair.a.initiate("h1-h2", 0.0)
    pair.pump(until=1.0)
    return pair


def test_our_rekey_unanswered_at_the_hard_lifetime_keeps_the_old_child_until_it_ends():
    """Issue 14, item 22, the rekey's initiator: A rekeys at 10 s with its hard lifetime
    at 11 s; its first three requests are lost, the fourth (13.5 s) gets through. The old
    Child SA stays until then: an end never holds no Child SA both ends hold (deleted at
    11 s, both had none until 13.5 s). Its hard lifetime deletes it only once the
    rekey's exchange is over."""
    pair = rekeying_pair(rekey_time=10.0, life_time=11.0)
    (sa_a,), (sa_b,) = pair.a.sas(), pair.b.sas()
    (old,) = sa_a.children.values()
    lose = LoseFirst(
        lambda data, src, dst: src == A and data[18] == ExchangeType.CREATE_CHILD_SA
        and not data[19] & 0x20, 3
    )  # fmt: skip
    pair.net.impairment.drop_if = lose
    t = 1.0
    while t < 20.0:
        t += 0.05
        pair.pump(until=t)
        pair.net.deliver_until(t)
        shared = [c for c in sa_a.children.values() if c.spi_out in sa_b.children]
        live = [c for c in shared if c.spi_in not in sa_a.expired_children]
        assert live, f"no Child SA both ends hold at {t:.2f} s"
    assert len(lose.lost) == 3
    (new,) = sa_a.children.values()
    assert new.spi_in != old.spi_in and list(sa_b.children) == [new.spi_out]
    reasons = [e.reason for e in of(pair.events[A], ChildSaDeleted)]
    assert reasons == ["deleted by us"]
