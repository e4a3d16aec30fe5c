"""ESP/AH packet layer: published packets (sources in vectors.json), round trips over every
mode, family and algorithm, and every drop reason."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.keyway.ipsec.plugins.module_utils.esp import packet as pk
from ansible_collections.keyway.ipsec.plugins.module_utils.esp.packet import Drop, SaCrypto
from ansible_collections.keyway.ipsec.plugins.module_utils.esp.replay import ReplayWindow

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())
GCM = VECTORS["aes_gcm_esp"]["cases"]


def _esp_sa(
    enc: str, key: bytes, spi: int, esn: bool, integ: str | None = None, ikey: bytes = b""
) -> SaCrypto:
    return SaCrypto(
        spi=spi, ah=False, tunnel=True, enc_alg=enc, enc_key=key, integ_alg=integ, integ_key=ikey,
        esn=esn, outer_src="192.0.2.11", outer_dst="192.0.2.12",
    )  # fmt: skip


def _check_published(enc: str, case: dict) -> None:
    key, plain, packet = (bytes.fromhex(case[k]) for k in ("key", "plain", "packet"))
    spi, seq = int(case["spi"], 16), int(case["seq"], 16)
    pad_len, next_header = plain[-2], plain[-1]
    payload = plain[: len(plain) - 2 - pad_len]
    sender = _esp_sa(enc, key, spi, case["esn"])
    assert sender.esp_seal(payload, next_header, seq, iv=packet[8:16]) == packet
    receiver = _esp_sa(enc, key, spi, case["esn"])
    receiver.replay.top = seq - 1  # the window sits just below, so the high bits are inferred
    assert receiver.esp_open(packet) == (next_header, payload, seq)
    corrupted = bytearray(packet)
    corrupted[-1] ^= 1
    fresh = _esp_sa(enc, key, spi, case["esn"])
    fresh.replay.top = seq - 1
    with pytest.raises(Drop) as info:
        fresh.esp_open(bytes(corrupted))
    assert info.value.reason == pk.ICV


@pytest.mark.parametrize("name", sorted(GCM))
def test_draft_mcgrew_gcm_test_01_esp_packets(name: str) -> None:
    _check_published("aes-gcm-16", GCM[name])


def test_rfc7634_appendix_a_esp_packet() -> None:
    _check_published("chacha20-poly1305", VECTORS["chacha20_poly1305_esp"]["case"])


def test_rfc3602_case5_transport_mode_packet() -> None:
    case = VECTORS["aes_cbc_esp"]["case5"]
    ikey = bytes(range(32))
    sa = SaCrypto(
        spi=0x4321, ah=False, tunnel=False, enc_alg="aes-cbc", enc_key=bytes.fromhex(case["key"]),
        integ_alg="hmac-sha2-256-128", integ_key=ikey, esn=False,
    )  # fmt: skip
    out = pk.protect(sa, bytes.fromhex(case["original"]), iv=bytes.fromhex(case["iv"]))
    # RFC 3602's packet carries no ICV; ours appends 16 bytes (and the IPv4 total length
    # and checksum count them); everything else is byte for byte the RFC's.
    expected = bytes.fromhex(case["protected"])
    assert out[20:-16] == expected[20:]
    assert out[:2] + out[4:10] + out[12:20] == expected[:2] + expected[4:10] + expected[12:20]
    assert struct.unpack("!H", out[2:4])[0] == len(expected) + 16
    assert pk._checksum(out[:20]) == 0
    peer = SaCrypto(
        spi=0x4321, ah=False, tunnel=False, enc_alg="aes-cbc", enc_key=bytes.fromhex(case["key"]),
        integ_alg="hmac-sha2-256-128", integ_key=ikey, esn=False,
    )  # fmt: skip
    inner, seq = pk.unprotect_esp(peer, out[20:], out[12:16], out[16:20])
    assert seq == 1
    assert inner[20:] == bytes.fromhex(case["original"])[20:]
    assert inner[9] == 1  # ICMP restored as the protocol


# -- round trips ---------------------------------------------------------------------

ALGS = [
    ("aes-gcm-16", 20, None, 0),
    ("aes-gcm-16", 36, None, 0),
    ("chacha20-poly1305", 36, None, 0),
    ("aes-cbc", 16, "hmac-sha2-256-128", 32),
    ("aes-cbc", 32, "hmac-sha2-384-192", 48),
    ("aes-cbc", 32, "hmac-sha2-512-256", 64),
]
FAMILIES = {
    4: ("192.0.2.11", "192.0.2.12", "10.1.0.1", "10.2.0.1"),
    6: ("2001:db8::11", "2001:db8::12", "fd00:1::1", "fd00:2::1"),
}


def udp_packet(src: str, dst: str, payload: bytes, sport: int = 1234, dport: int = 7) -> bytes:
    s, d = pk._addr(src), pk._addr(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if len(s) == 4:
        return pk.ipv4_header(s, d, 17, len(udp), ident=7) + udp
    return pk.ipv6_header(s, d, 17, len(udp)) + udp


def pair(proto: str, alg: tuple, tunnel: bool, family: int, esn: bool = True, window: int = 128):
    enc, klen, integ, ilen = alg
    key, ikey = os.urandom(klen), os.urandom(ilen)
    osrc, odst, _, _ = FAMILIES[family]

    def make() -> SaCrypto:
        if proto == "ah":
            return SaCrypto(
                spi=0xC0FFEE, ah=True, tunnel=tunnel, enc_alg=None, enc_key=b"",
                integ_alg=integ, integ_key=ikey,
                esn=esn, replay_window=window, outer_src=osrc, outer_dst=odst,
            )  # fmt: skip
        return SaCrypto(
            spi=0xC0FFEE, ah=False, tunnel=tunnel, enc_alg=enc, enc_key=key, integ_alg=integ,
            integ_key=ikey, esn=esn, replay_window=window, outer_src=osrc, outer_dst=odst,
        )  # fmt: skip

    return make(), make()


def receive(sa: SaCrypto, outer: bytes) -> bytes:
    ip = pk.IpPacket(outer)
    if ip.proto == pk.IPPROTO_AH:
        header = bytes(outer[:20]) if ip.version == 4 else None
        return pk.unprotect_ah(sa, header, ip.payload, ip.src, ip.dst)[0]
    if ip.proto == pk.IPPROTO_UDP:
        return pk.unprotect_esp(sa, pk.parse_esp_in_udp(ip.payload), ip.src, ip.dst)[0]
    assert ip.proto == pk.IPPROTO_ESP
    return pk.unprotect_esp(sa, ip.payload, ip.src, ip.dst)[0]


@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel", "transport"])
@pytest.mark.parametrize("family", [4, 6])
def test_seal_esp_is_what_esp_in_udp_carries_and_the_outer_addresses_follow_set_outer(
    tunnel: bool, family: int
) -> None:
    """The plane sends seal_esp's bytes as an ESP-in-UDP datagram's payload: they must be
    what protect() puts after the outer IP and UDP headers (same SA, sequence number and
    IV). And set_outer (the plane's move_sa) changes the tunnel's outer header."""
    tx, rx = pair("esp", ALGS[0], tunnel, family)
    isrc, idst = FAMILIES[family][2:] if tunnel else FAMILIES[family][:2]
    inner = udp_packet(isrc, idst, b"sealed alone" * 3)
    iv = os.urandom(8)
    outer = pk.protect(tx, inner, udp_ports=(4500, 4500), seq=5, iv=iv)
    header = 20 if family == 4 else 40
    assert pk.seal_esp(tx, pk.IpPacket(inner), seq=5, iv=iv) == outer[header + 8 :]
    assert pk.protect(tx, pk.IpPacket(inner), seq=6, iv=iv) == pk.protect(
        tx, inner, seq=6, iv=iv
    )  # an IpPacket already parsed is taken as it is
    ip = pk.IpPacket(outer)
    packet, seq = pk.open_esp(rx, outer[header + 8 :], ip.src, ip.dst)
    assert seq == 5 and packet.proto == 17
    assert bytes(packet.payload) == pk.IpPacket(inner).payload
    if tunnel:
        moved = "192.0.2.99" if family == 4 else "2001:db8::99"
        tx.set_outer(FAMILIES[family][0], moved)
        assert pk.IpPacket(pk.protect(tx, inner)).dst == pk._addr(moved)


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: f"{a[0]}-{a[1]}-{a[2]}")
@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel", "transport"])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("udp", [False, True], ids=["esp", "esp-in-udp"])
def test_esp_round_trip(alg, tunnel: bool, family: int, udp: bool) -> None:
    tx, rx = pair("esp", alg, tunnel, family)
    _, _, isrc, idst = FAMILIES[family]
    if not tunnel:
        isrc, idst = FAMILIES[family][:2]
    inner = udp_packet(isrc, idst, b"hello through ESP" * 3)
    outer = pk.protect(tx, inner, udp_ports=(4500, 4500) if udp else None)
    ip = pk.IpPacket(outer)
    assert ip.proto == (pk.IPPROTO_UDP if udp else pk.IPPROTO_ESP)
    assert b"hello through ESP" not in outer
    got = receive(rx, outer)
    if tunnel:
        assert got == inner
    else:  # transport: same payload and addresses, protocol restored
        assert pk.IpPacket(got).payload == pk.IpPacket(inner).payload
        assert pk.IpPacket(got).proto == 17
    with pytest.raises(Drop) as info:
        receive(rx, outer)
    assert info.value.reason == pk.REPLAY


@pytest.mark.parametrize("integ", ["hmac-sha2-256-128", "hmac-sha2-384-192", "hmac-sha2-512-256"])
@pytest.mark.parametrize("tunnel", [True, False], ids=["tunnel", "transport"])
@pytest.mark.parametrize("family", [4, 6])
def test_ah_round_trip_and_mutable_fields(integ: str, tunnel: bool, family: int) -> None:
    ilen = {"hmac-sha2-256-128": 32, "hmac-sha2-384-192": 48, "hmac-sha2-512-256": 64}[integ]
    tx, rx = pair("ah", (None, 0, integ, ilen), tunnel, family)
    _, _, isrc, idst = (
        FAMILIES[family] if tunnel else (*FAMILIES[family][:2], *FAMILIES[family][:2])
    )
    inner = udp_packet(isrc, idst, b"authenticated only")
    outer = bytearray(pk.protect(tx, inner))
    assert b"authenticated only" in outer  # AH does not encrypt
    # Routers may change the mutable fields: TTL / hop limit, TOS / traffic class.
    if family == 4:
        outer[8] -= 3
        outer[1] = 0x10
        struct.pack_into("!H", outer, 10, 0)
    else:
        outer[7] -= 3
        outer[1] |= 0x0F  # flow label bits
    assert receive(rx, bytes(outer))[-len(b"authenticated only") :] == b"authenticated only"
    # ...but not the immutable ones: the payload.
    outer2 = bytearray(pk.protect(tx, inner))
    outer2[-1] ^= 0xFF
    with pytest.raises(Drop) as info:
        receive(rx, bytes(outer2))
    assert info.value.reason == pk.ICV
    if family == 4:  # the IPv4 identification is immutable too
        outer3 = bytearray(pk.protect(tx, inner))
        outer3[4] ^= 1
        with pytest.raises(Drop) as info:
            receive(rx, bytes(outer3))
        assert info.value.reason == pk.ICV


# -- drops -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: f"{a[0]}-{a[1]}-{a[2]}")
def test_bad_packets_drop_with_their_reason(alg) -> None:
    tx, rx = pair("esp", alg, True, 4)
    inner = udp_packet("10.1.0.1", "10.2.0.1", b"x" * 40)
    esp = pk.protect(tx, inner)[20:]
    src, dst = pk._addr("192.0.2.11"), pk._addr("192.0.2.12")

    def reason(data: bytes) -> str:
        with pytest.raises(Drop) as info:
            pk.unprotect_esp(rx, data, src, dst)
        return info.value.reason

    assert reason(esp[:20]) == pk.TRUNCATED
    assert reason(b"\0\0\0\1" + esp[4:]) == pk.BAD_SPI
    flipped = bytearray(esp)
    flipped[30] ^= 0x40
    assert reason(bytes(flipped)) == pk.ICV
    assert rx.replay.top == 0  # a forged packet does not move the window
    if alg[0] == "aes-cbc":
        assert reason(esp[:-17] + esp[-16:]) in (pk.TRUNCATED, pk.ICV)
    pk.unprotect_esp(rx, esp, src, dst)
    assert reason(esp) == pk.REPLAY


def test_bad_padding_is_detected_after_authentication() -> None:
    key = os.urandom(20)
    tx = _esp_sa("aes-gcm-16", key, 7, False)
    rx = _esp_sa("aes-gcm-16", key, 7, False)
    # Build a packet whose (authentic) trailer claims padding bytes that are not 1, 2, ...
    body = b"payload!" + b"\x09\x09" + b"\x02\x04"
    nonce_iv = struct.pack("!Q", 1)
    ct = tx._aead.encrypt(tx._salt + nonce_iv, body, struct.pack("!II", 7, 1))
    with pytest.raises(Drop) as info:
        rx.esp_open(struct.pack("!II", 7, 1) + nonce_iv + ct)
    assert info.value.reason == pk.BAD_PADDING
    body = b"pay" + b"\x40\x04"  # pad length beyond the payload
    ct = tx._aead.encrypt(tx._salt + nonce_iv, b"\0" * 3 + body, struct.pack("!II", 7, 1))
    with pytest.raises(Drop) as info:
        rx.esp_open(struct.pack("!II", 7, 1) + nonce_iv + ct)
    assert info.value.reason == pk.BAD_PADDING


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_drop(data: bytes) -> None:
    _tx, rx = pair("esp", ALGS[0], True, 4)
    with contextlib.suppress(Drop):
        pk.unprotect_esp(rx, data, b"\0" * 4, b"\0" * 4)
    with contextlib.suppress(Drop):
        pk.IpPacket(data)


def test_bad_sa_configuration_is_a_typed_error_without_keys() -> None:
    key = bytes(range(7))
    with pytest.raises(pk.SaConfigError, match="aes-gcm-16 needs") as info:
        _esp_sa("aes-gcm-16", key, 1, True)
    assert key.hex() not in str(info.value)
    with pytest.raises(pk.SaConfigError, match="unsupported integrity"):
        _esp_sa("aes-cbc", bytes(16), 1, True, "hmac-md5", bytes(16))
    with pytest.raises(pk.SaConfigError, match="below the RFC 4303 minimum"):
        SaCrypto(spi=1, ah=False, tunnel=True, enc_alg="aes-gcm-16", enc_key=bytes(20),
                 integ_alg=None, integ_key=b"", replay_window=8)  # fmt: skip
    assert "key" not in repr(_esp_sa("aes-gcm-16", bytes(20), 1, True)).lower()


# -- sequence numbers and the replay window ------------------------------------------


def test_outbound_sequence_refuses_to_wrap() -> None:
    sa = _esp_sa("aes-gcm-16", bytes(20), 1, esn=False)
    sa.seq = 0xFFFFFFFE
    assert sa.next_seq() == 0xFFFFFFFF
    with pytest.raises(Drop) as info:
        sa.next_seq()
    assert info.value.reason == pk.SEQ_OVERFLOW
    esn_sa = _esp_sa("aes-gcm-16", bytes(20), 1, esn=True)
    esn_sa.seq = 0xFFFFFFFF
    assert esn_sa.next_seq() == 1 << 32  # ESN carries on into the high bits


def test_esn_crosses_the_32_bit_boundary_and_high_bits_are_authenticated() -> None:
    key = os.urandom(36)
    tx = _esp_sa("chacha20-poly1305", key, 9, esn=True)
    rx = _esp_sa("chacha20-poly1305", key, 9, esn=True)
    tx.seq = rx.replay.top = 0xFFFFFFF0
    inner = udp_packet("10.1.0.1", "10.2.0.1", b"esn")
    for _ in range(40):  # crosses 2^32
        outer = pk.protect(tx, inner)
        assert receive(rx, outer) == inner
    assert rx.replay.top == 0xFFFFFFF0 + 40
    # Same low bits, wrong high bits: the ICV (AAD has seq_hi) fails.
    stale = _esp_sa("chacha20-poly1305", key, 9, esn=True)
    stale.seq = 0xFFFFFFF0 + 41 - (1 << 32) + (1 << 33)  # another epoch
    with pytest.raises(Drop) as info:
        receive(rx, pk.protect(stale, inner))
    assert info.value.reason == pk.ICV


@settings(max_examples=60, deadline=None)
@given(
    window=st.sampled_from([32, 64, 128, 1024]),
    start=st.integers(min_value=1, max_value=(1 << 33)),
    steps=st.lists(st.integers(min_value=-1200, max_value=1200), min_size=1, max_size=60),
)
def test_replay_window_matches_a_model(window: int, start: int, steps: list[int]) -> None:
    """Against a set-based model: accept iff never accepted and within `window` of the
    highest accepted; ESN inference recovers the full number from its low 32 bits."""
    w = ReplayWindow(window, esn=True)
    w.top = top = start
    seen: set[int] = set()
    for step in steps:
        seq = max(1, top + step)
        assert w.infer(seq & 0xFFFFFFFF) == seq or top - seq >= window
        expect = seq not in seen and (seq > top or top - seq < window)
        assert w.check(seq) == expect, (seq, top)
        if expect:
            w.update(seq)
            seen.add(seq)
            top = max(top, seq)


@pytest.mark.parametrize(
    ("top", "low", "full"),
    [
        (1000, 1001, 1001),  # case A, ahead
        (1000, 900, 900),  # case A, inside
        ((5 << 32) | 0xFFFFFFF0, 3, (6 << 32) | 3),  # case A, wrapped ahead into the next
        ((6 << 32) | 5, 0xFFFFFFF0, (5 << 32) | 0xFFFFFFF0),  # case B, behind the wrap
        ((6 << 32) | 5, 9, (6 << 32) | 9),  # case B, ahead
    ],
)
def test_esn_inference_rfc4303_appendix_a(top: int, low: int, full: int) -> None:
    w = ReplayWindow(128, esn=True)
    w.top = top
    assert w.infer(low) == full


def test_udp_4500_classification_and_keepalive() -> None:
    assert pk.classify_udp_4500(pk.NAT_KEEPALIVE) == "keepalive"
    assert pk.classify_udp_4500(b"\0\0\0\0" + b"ike message") == "ike"
    assert pk.classify_udp_4500(b"\0\0\1\0" + b"\0" * 20) == "esp"
    assert pk.classify_udp_4500(b"\1\2") == "invalid"
    dgram = pk.esp_in_udp(b"\0\0\1\0" + bytes(20))
    assert struct.unpack("!HHHH", dgram[:8]) == (4500, 4500, 32, 0)
    assert bytes(pk.parse_esp_in_udp(dgram)) == b"\0\0\1\0" + bytes(20)
    with pytest.raises(Drop):
        pk.parse_esp_in_udp(pk.esp_in_udp(b"\0\0\0\0ike"))
