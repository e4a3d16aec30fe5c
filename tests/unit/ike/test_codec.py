"""The IKEv2 codec: round trips over generated messages, strict and typed failures."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec, crypto
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    EncrId,
    ExchangeType,
    HeaderFlag,
    NotifyType,
    PayloadType,
    PrfId,
)

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

spi8 = st.binary(min_size=8, max_size=8)
small = st.binary(max_size=40)
u8, u16 = st.integers(0, 255), st.integers(0, 0xFFFF)
transform = st.builds(
    codec.Transform,
    type=st.integers(1, 5),
    id=u16,
    key_length=st.none() | st.sampled_from([128, 192, 256]),
    attributes=st.lists(st.tuples(st.integers(1, 13), small), max_size=2),
)
proposal = st.builds(
    codec.Proposal,
    number=st.integers(1, 255),
    protocol=st.integers(1, 3),
    spi=st.sampled_from([b"", b"\1\2\3\4", b"\0" * 8]),
    transforms=st.lists(transform, min_size=1, max_size=5),
)


def _ts(ts_type):
    import ipaddress

    size = 4 if ts_type == 7 else 16
    addr = st.binary(min_size=size, max_size=size)
    # A range ends at or after its start (a reversed one is malformed).
    ends = st.lists(addr, min_size=2, max_size=2).map(
        lambda pair: [str(ipaddress.ip_address(b)) for b in sorted(pair)]
    )
    return st.builds(
        lambda proto, sport, eport, ends: codec.TrafficSelector(
            ts_type, proto, sport, eport, *ends
        ),
        u8,
        u16,
        u16,
        ends,
    )


selector = _ts(7) | _ts(8)
payload = st.one_of(
    st.builds(codec.SA, proposals=st.lists(proposal, min_size=1, max_size=3)),
    st.builds(codec.KE, group=u16, data=small),
    st.builds(codec.IDi, id_type=u8, data=small),
    st.builds(codec.IDr, id_type=u8, data=small),
    st.builds(codec.CERT, kind=u8, data=small),
    st.builds(codec.CERTREQ, kind=u8, data=small),
    st.builds(codec.AUTH, kind=u8, data=small),
    st.builds(codec.Nonce, data=st.binary(min_size=16, max_size=64)),
    st.builds(
        codec.Notify,
        type=u16,
        protocol=st.integers(0, 3),
        spi=st.sampled_from([b"", b"\1\2\3\4", b"\5" * 8]),
        data=small,
    ),
    st.builds(
        codec.Delete,
        protocol=st.just(3),
        spis=st.lists(st.binary(min_size=4, max_size=4), max_size=4),
    ),
    st.builds(codec.Delete, protocol=st.just(1), spis=st.just([])),
    st.builds(codec.VendorID, data=small),
    st.builds(codec.TSi, selectors=st.lists(selector, max_size=3)),
    st.builds(codec.TSr, selectors=st.lists(selector, max_size=3)),
    st.builds(
        codec.CP, cfg_type=u8, attributes=st.lists(st.tuples(st.integers(1, 15), small), max_size=3)
    ),
    st.builds(codec.EAP, data=small),
    st.builds(codec.Unknown, type=st.integers(100, 200), data=small),
)
header = st.builds(
    codec.Header,
    spi_i=spi8,
    spi_r=spi8,
    exchange=st.sampled_from(list(ExchangeType)),
    flags=st.sampled_from([0, 0x08, 0x20, 0x28]),
    message_id=st.integers(0, 2**32 - 1),
)
message = st.builds(codec.Message, header=header, payloads=st.lists(payload, max_size=6))


def _normal(msg: codec.Message) -> list:
    return [(type(p), p) for p in msg.payloads]


@SETTINGS
@given(message)
def test_decode_encode_round_trip(msg):
    data = codec.encode_message(msg)
    back = codec.decode_message(data)
    assert _normal(back) == _normal(msg)
    assert (back.header.spi_i, back.header.exchange, back.header.message_id) == (
        msg.header.spi_i,
        msg.header.exchange,
        msg.header.message_id,
    )
    assert codec.encode_message(back) == data


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_the_typed_error(data):
    with contextlib.suppress(codec.IkeDecodeError):
        codec.decode_message(data)


@SETTINGS
@given(message, st.data())
def test_mutated_messages_only_raise_the_typed_error(msg, data):
    raw = bytearray(codec.encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(codec.IkeDecodeError):
        codec.decode_message(bytes(raw))


def _plain(*payloads, **hdr) -> bytes:
    h = codec.Header(b"\1" * 8, b"\0" * 8, ExchangeType.IKE_SA_INIT, HeaderFlag.INITIATOR, 0)
    for k, v in hdr.items():
        setattr(h, k, v)
    return codec.encode_message(codec.Message(h, list(payloads)))


def test_unknown_critical_payload_names_its_notify():
    data = _plain(codec.Unknown(type=150, data=b"x", critical=True))
    with pytest.raises(codec.IkeDecodeError) as caught:
        codec.decode_message(data)
    assert caught.value.notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD
    assert caught.value.notify_data == bytes([150])
    skipped = codec.decode_message(_plain(codec.Unknown(type=150, data=b"x")))
    assert isinstance(skipped.payloads[0], codec.Unknown)


def test_wrong_major_version():
    data = bytearray(_plain(codec.Nonce(data=b"n" * 16)))
    data[17] = 0x30
    with pytest.raises(codec.IkeDecodeError, match="major version 3") as caught:
        codec.decode_message(bytes(data))
    assert caught.value.notify == NotifyType.INVALID_MAJOR_VERSION


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-1], "header length"),
        (lambda d: d[:20], "shorter than the IKE header"),
        (
            lambda d: d[:24] + struct.pack("!I", len(d) + 4) + d[28:] + b"\0\0\0\0",
            "bytes after the last payload",
        ),
        (lambda d: d[:30] + b"\xff\xff" + d[32:], "has length 65535"),
    ],
)
def test_malformed_lengths_say_what_is_wrong(mutate, message):
    data = _plain(codec.Nonce(data=b"n" * 16), codec.Notify(type=NotifyType.COOKIE, data=b"c"))
    with pytest.raises(codec.IkeDecodeError, match=message):
        codec.decode_message(mutate(data))


def test_nonce_bounds_and_size_cap():
    with pytest.raises(codec.IkeDecodeError, match="16 to 256"):
        codec.decode_message(_plain(codec.Nonce(data=b"n" * 15)))
    big = _plain(codec.VendorID(data=b"v" * 3000))
    with pytest.raises(codec.IkeDecodeError, match="cap") as caught:
        codec.decode_message(big, max_size=2048)
    assert caught.value.notify is None  # dropped, not answered


def _aead_pair():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    encr = crypto.encr_for(EncrId.AES_GCM_16, 128)
    keys = crypto.derive_ike_keys(
        prf, encr, None, b"s" * 32, b"i" * 32, b"r" * 32, b"\1" * 8, b"\2" * 8
    )
    return crypto.sk_ciphers(keys, encr, None, initiator=True)[0], crypto.sk_ciphers(
        keys, encr, None, initiator=False
    )[1]


INNER = [
    codec.IDi(id_type=2, data=b"a.lab"),
    codec.AUTH(kind=2, data=b"a" * 32),
    codec.TSi(selectors=[codec.TrafficSelector(7, 0, 0, 65535, "10.1.0.0", "10.1.0.255")]),
]


def test_sealed_messages_open_to_their_inner_payloads():
    out, inbound = _aead_pair()
    h = codec.Header(b"\1" * 8, b"\2" * 8, ExchangeType.IKE_AUTH, HeaderFlag.INITIATOR, 1)
    data = codec.seal_message(h, INNER, out)
    msg = codec.decode_message(data)
    assert isinstance(msg.payloads[0], codec.Encrypted) and msg.header.length == len(data)
    assert codec.open_encrypted(data, msg, inbound) == INNER
    tampered = data[:40] + bytes([data[40] ^ 1]) + data[41:]
    with pytest.raises(codec.IkeIntegrityError):
        codec.open_encrypted(tampered, codec.decode_message(tampered), inbound)


def test_fragments_reassemble_in_any_order_and_ignore_duplicates():
    out, inbound = _aead_pair()
    h = codec.Header(b"\1" * 8, b"\2" * 8, ExchangeType.IKE_AUTH, HeaderFlag.INITIATOR, 1)
    inner = [*INNER, codec.CERT(kind=4, data=bytes(range(256)) * 8)]
    frags = codec.seal_fragments(h, inner, out, max_datagram=576)
    assert len(frags) > 3 and all(len(f) <= 576 for f in frags)
    order = [*list(reversed(frags)), frags[1]]
    reassembler = codec.Reassembler()
    results = [reassembler.add(f, codec.decode_message(f), inbound) for f in order]
    assert results[: len(frags) - 1] == [None] * (len(frags) - 1)
    assert results[len(frags) - 1] == inner
    too_many = codec.Reassembler(max_fragments=2)
    with pytest.raises(codec.IkeDecodeError, match="exceed the limit"):
        too_many.add(frags[0], codec.decode_message(frags[0]), inbound)


def test_payload_type_names_in_errors():
    data = bytearray(
        _plain(codec.SA(proposals=[codec.Proposal(1, 1, b"", [codec.Transform(1, 20, 128)])]))
    )
    data[40] = 9  # the transform header's "last" field: neither 0 nor 3
    with pytest.raises(codec.IkeDecodeError, match="SA: proposal 1"):
        codec.decode_message(bytes(data))
    assert PayloadType.SA == 33


def test_a_selector_that_ends_before_it_starts_is_malformed():
    """Fuzzing the engine found it: such a selector in a CREATE_CHILD_SA response raised
    ValueError out of Engine.receive (tests/unit/engine/test_fuzz_findings.py)."""
    reversed_ = codec.TrafficSelector(7, 0, 0, 65535, "10.1.0.255", "10.1.0.0")
    with pytest.raises(codec.IkeDecodeError, match="TSi: selector 0 ends before it starts"):
        codec.decode_message(_plain(codec.TSi(selectors=[reversed_])))
    single = codec.TrafficSelector(7, 0, 0, 65535, "10.1.0.1", "10.1.0.1")
    assert codec.decode_message(_plain(codec.TSi(selectors=[single]))).payloads[0].selectors == [
        single
    ]


def test_an_encrypted_payload_inside_one_is_malformed():
    """Fuzzing the inner decoder found it: SK decoded inside SK, and lost its first
    payload type when encoded again (decode(encode(chain)) != chain)."""
    out, inbound = _aead_pair()
    h = codec.Header(b"\1" * 8, b"\2" * 8, ExchangeType.INFORMATIONAL, HeaderFlag.INITIATOR, 2)
    nested = codec.Encrypted(first=PayloadType.NONCE, body=b"x" * 24)
    data = codec.seal_message(h, [codec.Nonce(data=b"n" * 16), nested], out)
    with pytest.raises(codec.IkeDecodeError, match="SK: SK inside an encrypted payload"):
        codec.open_encrypted(data, codec.decode_message(data), inbound)
