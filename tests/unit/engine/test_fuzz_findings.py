"""What fuzzing the engine found (tools/fuzz_ike.py --target engine), replayed through
the fuzz harness: the engine, in the state it had when a real message of a session
arrived, receives a variant of that message sealed under the right keys."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
    ProtocolId,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    NegotiationFailed,
)
from tests.fixtures import fuzz_targets

PROTECTED = (ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL)


def _inner(capture: fuzz_targets.Capture) -> list[codec.Payload]:
    return codec.decode_payloads(capture.plaintext, capture.first, where="SK")


def test_a_response_of_another_exchange_type_than_the_request_is_dropped():
    """An INFORMATIONAL response turned CREATE_CHILD_SA reached the Child SA response
    handler with a Delete's request and raised TypeError out of Engine.receive."""
    responses = [c for c in fuzz_targets.captures() if c.header.is_response and c.protected]
    assert {c.header.exchange for c in responses} == set(PROTECTED)
    for capture in responses:
        h = capture.header
        for exchange in set(PROTECTED) - {h.exchange}:
            engine = capture.receiver.clone()
            message = fuzz_targets.message(capture, exchange, capture.first, capture.plaintext)
            engine.receive(message, capture.src, capture.now)
            sa = engine.sa_by_spi(h.spi_r if h.is_initiator else h.spi_i)
            assert not engine.pop_events() and not engine.pop_datagrams()
            assert sa.request is not None and sa.request.message_id == h.message_id


def test_a_child_sa_response_with_an_inverted_selector_is_dropped():
    """A CREATE_CHILD_SA response whose selector ends before it starts raised ValueError
    out of Engine.receive (ipaddress.summarize_address_range); it is malformed."""
    capture, inner = next(
        (c, inner)
        for c in fuzz_targets.captures()
        if c.header.exchange == ExchangeType.CREATE_CHILD_SA and c.header.is_response
        for inner in [_inner(c)]
        if any(isinstance(p, codec.TSr) for p in inner)
    )
    (tsr,) = [p for p in inner if isinstance(p, codec.TSr)]
    ts = tsr.selectors[0]
    tsr.selectors[0] = codec.TrafficSelector(
        ts.ts_type, ts.ip_proto, ts.start_port, ts.end_port, ts.end_addr, ts.start_addr
    )
    first, chain = codec.encode_payloads(inner)
    engine = capture.receiver.clone()
    message = fuzz_targets.message(capture, ExchangeType.CREATE_CHILD_SA, first, chain)
    engine.receive(message, capture.src, capture.now)
    assert not engine.pop_events()  # no Child SA from it: dropped


def test_a_child_sa_chosen_with_another_protocol_is_refused_with_a_valid_delete():
    """A CREATE_CHILD_SA response choosing protocol IKE for a Child SA made the engine
    refuse it with a Delete of protocol IKE carrying an SPI: malformed (RFC 7296 3.11),
    the peer rejects it; the Delete names the protocol of the Child SA offered."""
    capture, inner = next(
        (c, inner)
        for c in fuzz_targets.captures()
        if c.header.exchange == ExchangeType.CREATE_CHILD_SA and c.header.is_response
        for inner in [_inner(c)]
        if any(isinstance(p, codec.TSr) for p in inner)
    )
    (sa,) = [p for p in inner if isinstance(p, codec.SA)]
    sa.proposals[0].protocol = ProtocolId.IKE
    first, chain = codec.encode_payloads(inner)
    engine = capture.receiver.clone()
    message = fuzz_targets.message(capture, ExchangeType.CREATE_CHILD_SA, first, chain)
    engine.receive(message, capture.src, capture.now)
    assert [type(e) for e in engine.pop_events()] == [NegotiationFailed]
    (sent,) = engine.pop_datagrams()
    (delete,) = codec.open_encrypted(sent.data, codec.decode_message(sent.data), capture.open)
    assert isinstance(delete, codec.Delete) and delete.protocol == ProtocolId.ESP
    assert len(delete.spis) == 1
