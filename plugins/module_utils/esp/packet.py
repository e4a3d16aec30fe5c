"""ESP (RFC 4303) and AH (RFC 4302) packet transforms: pure functions over bytes, no I/O.

One `SaCrypto` per SA holds everything precomputed (AEAD object, HMAC key, ICV length,
alignment) plus the outbound sequence counter and the inbound replay window. `protect`
turns an inner IP packet into the outer packet; `unprotect` the reverse. Anything wrong
with a received packet raises `Drop(reason)`, which the plane counts and swallows.

Algorithms: aes-gcm-16 (RFC 4106), chacha20-poly1305 (RFC 7634), aes-cbc with
hmac-sha2-256-128/384-192/512-256 (RFC 3602, RFC 4868), AH with those HMACs, and
ESP-in-UDP (RFC 3948). ESN (RFC 4303 appendix A): the high 32 bits are inferred from the
replay window, go into the AAD (AEAD: SPI || seq_hi || seq_lo) or are appended to the
ICV input (HMAC), and are never sent.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .replay import ReplayWindow

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_UDP = 17
IPPROTO_ESP = 50
IPPROTO_AH = 51

# Drop reasons: the plane keeps one counter per reason.
TRUNCATED = "truncated"
BAD_PADDING = "bad_padding"
REPLAY = "replay"
BAD_SPI = "bad_spi"
ICV = "icv"
UNSUPPORTED = "unsupported"
SELECTOR = "selector"
POLICY = "policy"
SEQ_OVERFLOW = "seq_overflow"
EXPIRED = "expired"

_HMACS = {
    "hmac-sha2-256-128": ("sha256", 16, 32),
    "hmac-sha2-384-192": ("sha384", 24, 48),
    "hmac-sha2-512-256": ("sha512", 32, 64),
}
_AEADS = {"aes-gcm-16": AESGCM, "chacha20-poly1305": ChaCha20Poly1305}


def _aead_takes_buffers() -> bool:
    """cryptography 39 and newer decrypt from a memoryview; 38 (Debian 12's) wants bytes."""
    try:
        AESGCM(bytes(16)).encrypt(bytes(12), memoryview(b""), None)
    except TypeError:
        return False
    return True


# Ciphertext as the AEAD takes it: the packet's own buffer where it can (no copy).
_aead_input = (lambda data: data) if _aead_takes_buffers() else bytes
_SPI_SEQ = struct.Struct("!II")
_SEQ_HI = struct.Struct("!I")


class Drop(Exception):
    """A received packet rejected for `reason` (one of the constants above)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SaConfigError(ValueError):
    """An SA whose algorithms or keys cannot be used; the message says which."""


class SaCrypto:
    """Per-SA precomputed transform, outbound counter and inbound replay window."""

    __slots__ = (
        "_aead",
        "_cbc_key",
        "_mac_key",
        "_mac_name",
        "_salt",
        "_spi_bytes",
        "align",
        "esn",
        "icv_len",
        "is_ah",
        "iv_len",
        "outer",
        "replay",
        "seq",
        "seq_limit",
        "spi",
        "tunnel",
    )

    def __init__(
        self,
        *,
        spi: int,
        ah: bool,
        tunnel: bool,
        enc_alg: str | None,
        enc_key: bytes,
        integ_alg: str | None,
        integ_key: bytes,
        esn: bool = True,
        replay_window: int = 128,
        outer_src: str = "",
        outer_dst: str = "",
        icv_bits: int = 128,
    ) -> None:
        self.spi = spi
        self._spi_bytes = struct.pack("!I", spi)
        self.is_ah = ah
        self.tunnel = tunnel
        self.esn = esn
        self.set_outer(outer_src, outer_dst)
        self._aead = None
        self._salt = b""
        self._cbc_key = b""
        self._mac_key = b""
        self._mac_name = ""
        self.seq = 0  # last sequence number sent
        self.seq_limit = 0xFFFFFFFFFFFFFFFF if esn else 0xFFFFFFFF
        try:
            self.replay = ReplayWindow(replay_window, esn)
        except ValueError as exc:
            raise SaConfigError(str(exc)) from None
        if ah:
            if enc_alg not in (None, "null"):
                raise SaConfigError(f"AH takes no encryption algorithm, got {enc_alg!r}")
            self._set_mac(integ_alg, integ_key)
            self.icv_len = _HMACS[integ_alg][1]
            self.align, self.iv_len = 4, 0
            return
        if enc_alg in _AEADS:
            if integ_alg is not None:
                raise SaConfigError(f"{enc_alg} is AEAD: no integrity algorithm, got one")
            if icv_bits != 128:
                raise SaConfigError(f"{enc_alg}: only a 128-bit ICV is supported")
            key_len = len(enc_key) - 4
            if enc_alg == "aes-gcm-16" and key_len not in (16, 24, 32):
                raise SaConfigError(
                    f"aes-gcm-16 needs a 16/24/32-byte key + 4-byte salt, got {len(enc_key)} bytes"
                )
            if enc_alg == "chacha20-poly1305" and key_len != 32:
                raise SaConfigError(
                    f"chacha20-poly1305 needs a 32-byte key + 4-byte salt, got {len(enc_key)} bytes"
                )
            self._aead = _AEADS[enc_alg](enc_key[:key_len])
            self._salt = enc_key[key_len:]
            self.icv_len, self.align, self.iv_len = 16, 4, 8
        elif enc_alg == "aes-cbc":
            if len(enc_key) not in (16, 24, 32):
                raise SaConfigError(f"aes-cbc needs a 16/24/32-byte key, got {len(enc_key)} bytes")
            self._cbc_key = enc_key
            self._set_mac(integ_alg, integ_key)
            self.icv_len = _HMACS[integ_alg][1]
            self.align, self.iv_len = 16, 16
        else:
            raise SaConfigError(f"unsupported ESP encryption algorithm {enc_alg!r}")

    def _set_mac(self, integ_alg: str | None, integ_key: bytes) -> None:
        if integ_alg not in _HMACS:
            raise SaConfigError(f"unsupported integrity algorithm {integ_alg!r}")
        name, _unused, key_len = _HMACS[integ_alg]
        if len(integ_key) != key_len:
            raise SaConfigError(f"{integ_alg} needs a {key_len}-byte key, got {len(integ_key)}")
        self._mac_key, self._mac_name = integ_key, name

    def set_outer(self, src: str, dst: str) -> None:
        """The tunnel's outer addresses, packed once here rather than per packet."""
        self.outer = (_addr(src) if src else b"", _addr(dst) if dst else b"")

    def __repr__(self) -> str:  # keys never appear
        return f"SaCrypto(spi=0x{self.spi:08x}, ah={self.is_ah}, tunnel={self.tunnel})"

    # -- outbound sequence numbers -------------------------------------------------

    def next_seq(self) -> int:
        """The next outbound sequence number; Drop(SEQ_OVERFLOW) rather than wrap."""
        if self.seq >= self.seq_limit:
            raise Drop(SEQ_OVERFLOW, "SA must be rekeyed")
        self.seq += 1
        return self.seq

    # -- ESP ---------------------------------------------------------------------

    def esp_seal(
        self, payload: bytes, next_header: int, seq: int, iv: bytes | None = None
    ) -> bytes:
        """SPI || seq || IV || E(payload || pad || pad_len || nh) || ICV."""
        body_len = len(payload) + 2
        pad_len = -body_len % self.align
        trailer = bytes(range(1, pad_len + 1)) + bytes((pad_len, next_header))
        header = self._spi_bytes + _SEQ_HI.pack(seq & 0xFFFFFFFF)
        seq_hi = _SEQ_HI.pack(seq >> 32) if self.esn else b""
        if self._aead is not None:
            if iv is None:
                iv = struct.pack("!Q", seq)  # unique per SA: the sequence number
            aad = self._spi_bytes + seq_hi + header[4:] if self.esn else header
            return header + iv + self._aead.encrypt(self._salt + iv, payload + trailer, aad)
        if iv is None:
            iv = os.urandom(16)  # CBC needs an unpredictable IV (RFC 3602 section 3)
        enc = Cipher(algorithms.AES(self._cbc_key), modes.CBC(iv)).encryptor()
        ciphertext = enc.update(payload + trailer) + enc.finalize()
        signed = header + iv + ciphertext
        icv = hmac.digest(self._mac_key, signed + seq_hi, self._mac_name)[: self.icv_len]
        return signed + icv

    def esp_open(self, esp: bytes | memoryview) -> tuple[int, bytes, int]:
        """Check and decrypt one ESP packet (from the SPI on): (next_header, payload, seq).

        The replay window moves only after the ICV verified."""
        n = len(esp)
        if n < 8 + self.iv_len + self.icv_len + max(self.align, 4):
            raise Drop(TRUNCATED, f"{n} bytes")
        spi, seq_low = _SPI_SEQ.unpack_from(esp, 0)
        if spi != self.spi:
            raise Drop(BAD_SPI, f"0x{spi:08x}")
        seq = self.replay.infer(seq_low)
        if not self.replay.check(seq):
            raise Drop(REPLAY, f"seq {seq}")
        mv = memoryview(esp)
        seq_hi = _SEQ_HI.pack(seq >> 32) if self.esn else b""
        if self._aead is not None:
            iv = bytes(mv[8:16])
            aad = self._spi_bytes + seq_hi + bytes(mv[4:8]) if self.esn else bytes(mv[0:8])
            try:
                plain = self._aead.decrypt(self._salt + iv, _aead_input(mv[16:]), aad)
            except InvalidTag:
                raise Drop(ICV) from None
        else:
            body_end = n - self.icv_len
            if (body_end - 8 - 16) % 16:
                raise Drop(TRUNCATED, "ciphertext not a multiple of the block size")
            expect = hmac.digest(self._mac_key, bytes(mv[:body_end]) + seq_hi, self._mac_name)
            if not hmac.compare_digest(expect[: self.icv_len], mv[body_end:]):
                raise Drop(ICV)
            dec = Cipher(algorithms.AES(self._cbc_key), modes.CBC(bytes(mv[8:24]))).decryptor()
            plain = dec.update(mv[24:body_end]) + dec.finalize()
        pad_len, next_header = plain[-2], plain[-1]
        if pad_len + 2 > len(plain):
            raise Drop(BAD_PADDING, "pad length exceeds payload")
        end = len(plain) - 2 - pad_len
        if plain[end:-2] != bytes(range(1, pad_len + 1)):
            raise Drop(BAD_PADDING, "padding bytes are not 1, 2, 3, ...")
        self.replay.update(seq)
        return next_header, plain[:end], seq

    # -- AH ----------------------------------------------------------------------

    def ah_icv(
        self, zeroed_header: bytes, ah_zeroed: bytes, payload: bytes | memoryview, seq: int
    ) -> bytes:
        seq_hi = _SEQ_HI.pack(seq >> 32) if self.esn else b""
        msg = b"".join((zeroed_header, ah_zeroed, payload, seq_hi))
        return hmac.digest(self._mac_key, msg, self._mac_name)[: self.icv_len]

    def ah_header(self, next_header: int, seq: int, icv: bytes) -> bytes:
        length_words = (12 + self.icv_len) // 4 - 2
        return struct.pack("!BBHII", next_header, length_words, 0, self.spi, seq & 0xFFFFFFFF) + icv


# -- IP headers ------------------------------------------------------------------------


def _checksum(data: bytes | memoryview) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ident: int = 0,
    ttl: int = 64,
    tos: int = 0,
) -> bytes:
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, tos, 20 + payload_len, ident, 0x4000, ttl, proto, 0, src, dst
        )
    )
    struct.pack_into("!H", hdr, 10, _checksum(hdr))
    return bytes(hdr)


def ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    tclass_flow: int = 0,
) -> bytes:
    return struct.pack(
        "!IHBB16s16s", (6 << 28) | tclass_flow, payload_len, next_header, hop_limit, src, dst
    )


class IpPacket:
    """The parts of an IP packet the plane needs: version, addresses, protocol, payload.

    Only the fixed IPv6 header is understood (extension headers other than the
    protected protocol are reported as the next header, i.e. the selector sees them)."""

    __slots__ = ("data", "dport", "dst", "header_len", "proto", "sport", "src", "version")

    def __init__(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n < 1:
            raise Drop(TRUNCATED, "empty packet")
        version = data[0] >> 4
        if version == 4:
            if n < 20:
                raise Drop(TRUNCATED, "IPv4 header")
            ihl = (data[0] & 0x0F) * 4
            total = struct.unpack_from("!H", data, 2)[0]
            if ihl < 20 or total < ihl or total > n:
                raise Drop(TRUNCATED, "IPv4 lengths")
            self.header_len, self.proto = ihl, data[9]
            self.src, self.dst = bytes(data[12:16]), bytes(data[16:20])
            if total != n:
                data = data[:total]
        elif version == 6:
            if n < 40:
                raise Drop(TRUNCATED, "IPv6 header")
            plen = struct.unpack_from("!H", data, 4)[0]
            if 40 + plen > n:
                raise Drop(TRUNCATED, "IPv6 payload length")
            self.header_len, self.proto = 40, data[6]
            self.src, self.dst = bytes(data[8:24]), bytes(data[24:40])
            if 40 + plen != n:
                data = data[: 40 + plen]
        else:
            raise Drop(UNSUPPORTED, f"IP version {version}")
        self.version = version
        self.data = data
        self.sport = self.dport = 0
        if self.proto in (6, 17, 132) and len(data) >= self.header_len + 4:
            self.sport, self.dport = struct.unpack_from("!HH", data, self.header_len)

    @property
    def payload(self) -> bytes | memoryview:
        return self.data[self.header_len :]


def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


# -- ESP / AH protect and unprotect ----------------------------------------------------


def _outer_header(sa: SaCrypto, inner: IpPacket, proto: int, payload_len: int) -> bytes:
    if sa.tunnel:
        src, dst = sa.outer
        if len(src) == 4:
            return ipv4_header(src, dst, proto, payload_len)
        return ipv6_header(src, dst, proto, payload_len)
    # Transport mode keeps the original header (identification, TTL, flags; RFC 4303
    # section 3.1.1) with the protocol and length changed. IPv4 options are dropped.
    hdr = bytearray(inner.data[:20] if inner.version == 4 else inner.data[:40])
    if inner.version == 4:
        hdr[0] = 0x45
        struct.pack_into("!H", hdr, 2, 20 + payload_len)
        hdr[9] = proto
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, _checksum(hdr))
    else:
        struct.pack_into("!HB", hdr, 4, payload_len, proto)
    return bytes(hdr)


def protect(
    sa: SaCrypto,
    packet: bytes | memoryview | IpPacket,
    udp_ports: tuple[int, int] | None = None,
    seq: int | None = None,
    iv: bytes | None = None,
) -> bytes:
    """Inner IP packet (raw, or as parsed already) -> outer IP packet (ESP, ESP-in-UDP
    when `udp_ports`, or AH). `seq` and `iv` are for published test vectors; normally the
    SA chooses them."""
    inner = packet if isinstance(packet, IpPacket) else IpPacket(packet)
    if seq is None:
        seq = sa.next_seq()
    if sa.is_ah:
        next_header, payload = _inner_payload(sa, inner)
        return _ah_protect(sa, inner, next_header, payload, seq)
    esp = seal_esp(sa, inner, seq, iv)
    if udp_ports is None:
        return _outer_header(sa, inner, IPPROTO_ESP, len(esp)) + esp
    header = _outer_header(sa, inner, IPPROTO_UDP, 8 + len(esp))
    return header + udp_header(udp_ports[0], udp_ports[1], esp, header) + esp


def seal_esp(sa: SaCrypto, inner: IpPacket, seq: int, iv: bytes | None = None) -> bytes:
    """`inner` in ESP, from the SPI on: what follows the outer IP header, or an
    ESP-in-UDP datagram's payload as a UDP socket sends it (no outer header built and
    cut off again)."""
    next_header, payload = _inner_payload(sa, inner)
    return sa.esp_seal(payload, next_header, seq, iv)


def _inner_payload(sa: SaCrypto, inner: IpPacket) -> tuple[int, bytes]:
    """What the SA protects of `inner`, with its next header: the whole packet in
    tunnel mode, the transport payload in transport mode. (bytes() of a bytes object is
    that object: no copy for what a TUN read returns.)"""
    if sa.tunnel:
        return (IPPROTO_IPIP if inner.version == 4 else IPPROTO_IPV6), bytes(inner.data)
    return inner.proto, bytes(inner.payload)


def _ah_protect(sa: SaCrypto, inner: IpPacket, next_header: int, payload: bytes, seq: int) -> bytes:
    ah_len = 12 + sa.icv_len
    header = _outer_header(sa, inner, IPPROTO_AH, ah_len + len(payload))
    icv = sa.ah_icv(
        zero_mutable(header), sa.ah_header(next_header, seq, bytes(sa.icv_len)), payload, seq
    )
    return header + sa.ah_header(next_header, seq, icv) + payload


def zero_mutable(header: bytes | memoryview) -> bytes:
    """The outer IP header with the fields RFC 4302 section 3.3.3.1 calls mutable zeroed:
    IPv4 TOS, flags + fragment offset, TTL, checksum; IPv6 class, flow label, hop limit."""
    out = bytearray(header)
    if out[0] >> 4 == 4:
        if len(out) != 20:
            raise Drop(UNSUPPORTED, "IPv4 options with AH")
        out[1] = 0
        out[6:8] = b"\0\0"
        out[8] = 0
        out[10:12] = b"\0\0"
    else:
        out[0:4] = b"\x60\0\0\0"
        out[7] = 0
    return bytes(out)


def unprotect_esp(
    sa: SaCrypto, esp: bytes | memoryview, outer_src: bytes, outer_dst: bytes
) -> tuple[bytes, int]:
    """ESP (from the SPI on) -> (inner IP packet, seq). Transport mode rebuilds the header
    from the outer addresses."""
    inner, seq = open_esp(sa, esp, outer_src, outer_dst)
    return bytes(inner.data), seq


def open_esp(
    sa: SaCrypto, esp: bytes | memoryview, outer_src: bytes, outer_dst: bytes
) -> tuple[IpPacket, int]:
    """As unprotect_esp, the inner packet parsed (the plane checks its selectors)."""
    next_header, payload, seq = sa.esp_open(esp)
    return _inner_from(sa, next_header, payload, outer_src, outer_dst), seq


def unprotect_ah(
    sa: SaCrypto,
    outer_header: bytes | None,
    ah: bytes | memoryview,
    outer_src: bytes,
    outer_dst: bytes,
) -> tuple[bytes, int]:
    """AH (from its header on) -> (inner IP packet, seq). `outer_header` is the received
    IPv4 header (its identification is protected); IPv6 raw sockets do not deliver one,
    so it is rebuilt (no extension headers supported)."""
    inner, seq = open_ah(sa, outer_header, ah, outer_src, outer_dst)
    return bytes(inner.data), seq


def open_ah(
    sa: SaCrypto,
    outer_header: bytes | None,
    ah: bytes | memoryview,
    outer_src: bytes,
    outer_dst: bytes,
) -> tuple[IpPacket, int]:
    """As unprotect_ah, the inner packet parsed."""
    n = len(ah)
    if n < 12 + sa.icv_len:
        raise Drop(TRUNCATED, f"AH {n} bytes")
    next_header, length_words, _unused, spi, seq_low = struct.unpack_from("!BBHII", ah, 0)
    if spi != sa.spi:
        raise Drop(BAD_SPI, f"0x{spi:08x}")
    ah_len = (length_words + 2) * 4
    if ah_len != 12 + sa.icv_len or ah_len > n:
        raise Drop(TRUNCATED, "AH length")
    seq = sa.replay.infer(seq_low)
    if not sa.replay.check(seq):
        raise Drop(REPLAY, f"seq {seq}")
    if outer_header is None:
        outer_header = ipv6_header(outer_src, outer_dst, IPPROTO_AH, n, 0)
    mv = memoryview(ah)
    icv = bytes(mv[12:ah_len])
    zeroed_ah = bytes(mv[:12]) + bytes(sa.icv_len)
    payload = mv[ah_len:]
    if not hmac.compare_digest(sa.ah_icv(zero_mutable(outer_header), zeroed_ah, payload, seq), icv):
        raise Drop(ICV)
    sa.replay.update(seq)
    return _inner_from(sa, next_header, bytes(payload), outer_src, outer_dst), seq


def _inner_from(sa: SaCrypto, next_header: int, payload: bytes, src: bytes, dst: bytes) -> IpPacket:
    """The inner packet, parsed: which validates its lengths before it reaches the TUN
    device, and gives the plane what its selector checks need."""
    if sa.tunnel:
        if next_header not in (IPPROTO_IPIP, IPPROTO_IPV6):
            raise Drop(UNSUPPORTED, f"tunnel mode next header {next_header}")
        return IpPacket(payload)
    if len(src) == 4:
        return IpPacket(ipv4_header(src, dst, next_header, len(payload)) + payload)
    return IpPacket(ipv6_header(src, dst, next_header, len(payload)) + payload)


# -- RFC 3948 UDP encapsulation --------------------------------------------------------

NAT_KEEPALIVE = b"\xff"
NON_ESP_MARKER = b"\0\0\0\0"


def udp_header(sport: int, dport: int, payload: bytes, ip_header: bytes) -> bytes:
    """UDP header for ESP-in-UDP: checksum 0 over IPv4 (RFC 3948 section 2.1), computed
    over IPv6 (where zero is not allowed)."""
    length = 8 + len(payload)
    if ip_header[0] >> 4 == 4:
        return struct.pack("!HHHH", sport, dport, length, 0)
    pseudo = ip_header[8:40] + struct.pack("!I3xB", length, IPPROTO_UDP)
    csum = _checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, csum)


def classify_udp_4500(datagram: bytes | memoryview) -> str:
    """What arrived on UDP 4500 (RFC 3948 section 2.2): "keepalive" (one 0xFF byte),
    "ike" (non-ESP marker: four zero bytes), "esp", or "invalid" (too short)."""
    if len(datagram) == 1 and datagram[0] == 0xFF:
        return "keepalive"
    if len(datagram) >= 4 and bytes(datagram[:4]) == NON_ESP_MARKER:
        return "ike"
    if len(datagram) >= 8:
        return "esp"
    return "invalid"


def esp_in_udp(
    esp: bytes, sport: int = 4500, dport: int = 4500, ip_header: bytes = b"\x45"
) -> bytes:
    """A UDP datagram (header + ESP) as RFC 3948 section 2.1 builds it."""
    return udp_header(sport, dport, esp, ip_header) + esp


def parse_esp_in_udp(udp: bytes | memoryview) -> memoryview:
    """The ESP packet inside a UDP datagram (header included); Drop if it is not ESP."""
    if len(udp) < 8:
        raise Drop(TRUNCATED, "UDP header")
    body = memoryview(udp)[8:]
    kind = classify_udp_4500(body)
    if kind != "esp":
        raise Drop(UNSUPPORTED, f"UDP 4500 payload is {kind}, not ESP")
    return body


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


__all__ = [
    "Drop",
    "SaConfigError",
    "SaCrypto",
    "open_ah",
    "open_esp",
    "protect",
    "seal_esp",
    "unprotect_ah",
    "unprotect_esp",
]
