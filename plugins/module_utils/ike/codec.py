"""IKEv2 wire format (RFC 7296 section 3, RFC 7383 fragments): bytes <-> typed messages.

Public API:
    decode_message(data, max_size=...) -> Message
        Header and payload chain. An SK/SKF payload stays opaque (`Encrypted`,
        `EncryptedFragment`): decrypt it with `open_encrypted(data, message, cipher)`.
    encode_message(message) -> bytes
        Plain messages (IKE_SA_INIT, errors). Lengths and next-payload chains are
        computed; the header's `length` field is ignored on input.
    seal_message(header, inner_payloads, cipher) -> bytes
        A protected message: the inner payloads go into SK, encrypted with `cipher`
        (see SkCipher), the ICV covering the whole message.
    open_encrypted(data, message, cipher) -> list[Payload]
        The inner payloads of a decoded message's SK payload.
    fragment_payloads / seal_fragments / Reassembler: RFC 7383.

Every malformed input raises IkeDecodeError, and nothing else: it says what was wrong
and which notify a responder should answer with (None: drop silently).
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from . import identity
from .constants import (
    GENERIC_PAYLOAD_HEADER_SIZE,
    IKE_HEADER_SIZE,
    IKE_MAJOR_VERSION,
    HeaderFlag,
    NotifyType,
    PayloadType,
    TransformAttribute,
    TsType,
)

DEFAULT_MAX_MESSAGE_SIZE = 65535
MAX_PAYLOADS = 256  # a message with more is garbage, not work to do
_HEADER = struct.Struct("!8s8sBBBBII")
_GENERIC = struct.Struct("!BBH")


@functools.lru_cache(maxsize=4096)
def ip_address(value: str | bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ipaddress.ip_address, cached: an agent parses the same few addresses over and over
    (traffic selectors, NAT detection), and parsing is most of a selector's cost."""
    return ipaddress.ip_address(value)


class IkeDecodeError(Exception):
    """Malformed IKE data: `notify` is what a responder answers (None: drop)."""

    def __init__(
        self,
        message: str,
        notify: NotifyType | None = NotifyType.INVALID_SYNTAX,
        notify_data: bytes = b"",
    ):
        super().__init__(message)
        self.notify = notify
        self.notify_data = notify_data


class IkeIntegrityError(IkeDecodeError):
    """An SK payload failed its ICV or padding check: drop, never answer (RFC 7296 2.21)."""

    def __init__(self, message: str):
        super().__init__(message, None)


class SkCipher(Protocol):
    """The crypto layer's view of an SK payload protection (crypto.py implements it)."""

    def sealed_length(self, plaintext_len: int) -> int:
        """IV + padded ciphertext (with pad length byte) + ICV."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """IV || ciphertext || ICV; AEAD: aad is associated data; else ICV over aad||IV||ct."""

    def open(self, body: bytes, aad: bytes) -> bytes:
        """Inverse of seal; raises IkeIntegrityError on a bad ICV or padding."""


# ---------------------------------------------------------------- payload classes


@dataclass
class Payload:
    TYPE: ClassVar[PayloadType]
    critical: bool = field(default=False, kw_only=True)

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> Payload:
        raise NotImplementedError


@dataclass
class Transform:
    type: int
    id: int
    key_length: int | None = None
    attributes: list[tuple[int, bytes | int]] = field(default_factory=list)  # others

    def encode(self, last: bool) -> bytes:
        attrs = b""
        if self.key_length is not None:
            attrs += struct.pack("!HH", 0x8000 | TransformAttribute.KEY_LENGTH, self.key_length)
        for attr_type, value in self.attributes:
            if isinstance(value, int):
                attrs += struct.pack("!HH", 0x8000 | attr_type, value)
            else:
                attrs += struct.pack("!HH", attr_type, len(value)) + value
        return (
            struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), self.type, 0, self.id)
            + attrs
        )


@dataclass
class Proposal:
    number: int
    protocol: int
    spi: bytes = b""
    transforms: list[Transform] = field(default_factory=list)

    def encode(self, last: bool) -> bytes:
        body = b"".join(
            t.encode(i == len(self.transforms) - 1) for i, t in enumerate(self.transforms)
        )
        length = 8 + len(self.spi) + len(body)
        return (
            struct.pack(
                "!BBHBBBB",
                0 if last else 2,
                0,
                length,
                self.number,
                self.protocol,
                len(self.spi),
                len(self.transforms),
            )
            + self.spi
            + body
        )


@dataclass
class SA(Payload):
    TYPE: ClassVar = PayloadType.SA
    proposals: list[Proposal] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return b"".join(
            p.encode(i == len(self.proposals) - 1) for i, p in enumerate(self.proposals)
        )

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> SA:
        proposals, offset, last = [], 0, False
        while not last:
            if len(body) - offset < 8:
                raise IkeDecodeError(f"SA: proposal header truncated at offset {offset}")
            more, _unused, length, number, protocol, spi_size, count = struct.unpack_from(
                "!BBHBBBB", body, offset
            )
            if more not in (0, 2):
                raise IkeDecodeError(f"SA: proposal {number} has 'last' field {more}, not 0 or 2")
            if length < 8 + spi_size or offset + length > len(body):
                raise IkeDecodeError(f"SA: proposal {number} length {length} is out of bounds")
            spi = body[offset + 8 : offset + 8 + spi_size]
            transforms = _decode_transforms(
                body[offset + 8 + spi_size : offset + length], count, number
            )
            proposals.append(Proposal(number, protocol, spi, transforms))
            offset += length
            last = more == 0
        if offset != len(body):
            raise IkeDecodeError(f"SA: {len(body) - offset} bytes after the last proposal")
        if not proposals:
            raise IkeDecodeError("SA: no proposal")
        return cls(proposals, critical=critical)


def _decode_transforms(data: bytes, count: int, number: int) -> list[Transform]:
    transforms, offset = [], 0
    for index in range(count):
        if len(data) - offset < 8:
            raise IkeDecodeError(f"SA: proposal {number} transform {index} truncated")
        more, _unused, length, ttype, _unused, tid = struct.unpack_from("!BBHBBH", data, offset)
        if more != (0 if index == count - 1 else 3):
            raise IkeDecodeError(
                f"SA: proposal {number} transform {index} 'last' field {more} disagrees with "
                f"the transform count {count}"
            )
        if length < 8 or offset + length > len(data):
            raise IkeDecodeError(
                f"SA: proposal {number} transform {index} length {length} is out of bounds"
            )
        key_length, attributes = None, []
        pos, end = offset + 8, offset + length
        while pos < end:
            if end - pos < 4:
                raise IkeDecodeError(f"SA: transform {index} attribute truncated")
            attr_type, value = struct.unpack_from("!HH", data, pos)
            if attr_type & 0x8000:  # TV format
                attr_type &= 0x7FFF
                if attr_type == TransformAttribute.KEY_LENGTH:
                    key_length = value
                else:
                    attributes.append((attr_type, value))
                pos += 4
            else:  # TLV format
                if pos + 4 + value > end:
                    raise IkeDecodeError(
                        f"SA: transform {index} attribute length {value} is out of bounds"
                    )
                attributes.append((attr_type, data[pos + 4 : pos + 4 + value]))
                pos += 4 + value
        transforms.append(Transform(ttype, tid, key_length, attributes))
        offset += length
    if offset != len(data):
        raise IkeDecodeError(
            f"SA: proposal {number} has {len(data) - offset} bytes after its {count} transforms"
        )
    return transforms


@dataclass
class KE(Payload):
    TYPE: ClassVar = PayloadType.KE
    group: int = 0
    data: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> KE:
        if len(body) < 4:
            raise IkeDecodeError("KE: shorter than its 4-byte header")
        (group,) = struct.unpack_from("!H", body)
        return cls(group, body[4:], critical=critical)


@dataclass
class _Id(Payload):
    id_type: int = 0
    data: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!B3x", self.id_type) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> _Id:
        if len(body) < 4:
            raise IkeDecodeError(f"{cls.TYPE.name}: shorter than its 4-byte header")
        return cls(body[0], body[4:], critical=critical)

    def to_text(self) -> str:
        """The identity as text: address, FQDN, user@FQDN, a DN as "C=CH, O=x, CN=moon"
        (identity.py), a KEY_ID as "@#hex"; anything malformed in hex."""
        if self.id_type == 9:
            try:
                return identity.dn_text(identity.dn_from_der(self.data))
            except identity.IdentityError:
                return self.data.hex()
        if self.id_type == 1 and len(self.data) == 4:
            return str(ipaddress.IPv4Address(self.data))
        if self.id_type == 5 and len(self.data) == 16:
            return str(ipaddress.IPv6Address(self.data))
        if self.id_type in (2, 3):
            return self.data.decode("utf-8", "replace")
        if self.id_type == 11:
            return identity.key_id_text(self.data)
        return self.data.hex()


@dataclass
class IDi(_Id):
    TYPE: ClassVar = PayloadType.IDi


@dataclass
class IDr(_Id):
    TYPE: ClassVar = PayloadType.IDr


@dataclass
class _Typed(Payload):
    """CERT, CERTREQ, AUTH: a one-byte type/encoding then data."""

    kind: int = 0
    data: bytes = b""
    HEADER: ClassVar[int] = 1

    def encode_body(self) -> bytes:
        return bytes([self.kind]) + bytes(self.HEADER - 1) + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> _Typed:
        if len(body) < cls.HEADER:
            raise IkeDecodeError(f"{cls.TYPE.name}: shorter than its {cls.HEADER}-byte header")
        return cls(body[0], body[cls.HEADER :], critical=critical)


@dataclass
class CERT(_Typed):
    TYPE: ClassVar = PayloadType.CERT


@dataclass
class CERTREQ(_Typed):
    TYPE: ClassVar = PayloadType.CERTREQ


@dataclass
class AUTH(_Typed):
    TYPE: ClassVar = PayloadType.AUTH
    HEADER: ClassVar[int] = 4


@dataclass
class Nonce(Payload):
    TYPE: ClassVar = PayloadType.NONCE
    data: bytes = b""

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> Nonce:
        if not 16 <= len(body) <= 256:
            raise IkeDecodeError(f"Nonce: {len(body)} bytes, RFC 7296 allows 16 to 256")
        return cls(body, critical=critical)


@dataclass
class Notify(Payload):
    TYPE: ClassVar = PayloadType.NOTIFY
    type: int = 0
    protocol: int = 0
    spi: bytes = b""
    data: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!BBH", self.protocol, len(self.spi), self.type) + self.spi + self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> Notify:
        if len(body) < 4:
            raise IkeDecodeError("Notify: shorter than its 4-byte header")
        protocol, spi_size, ntype = struct.unpack_from("!BBH", body)
        if len(body) < 4 + spi_size:
            raise IkeDecodeError(f"Notify {ntype}: SPI size {spi_size} exceeds the payload")
        return cls(ntype, protocol, body[4 : 4 + spi_size], body[4 + spi_size :], critical=critical)

    @property
    def is_error(self) -> bool:
        return self.type < 16384


@dataclass
class Delete(Payload):
    TYPE: ClassVar = PayloadType.DELETE
    protocol: int = 0
    spis: list[bytes] = field(default_factory=list)

    def encode_body(self) -> bytes:
        size = len(self.spis[0]) if self.spis else 0
        return struct.pack("!BBH", self.protocol, size, len(self.spis)) + b"".join(self.spis)

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> Delete:
        if len(body) < 4:
            raise IkeDecodeError("Delete: shorter than its 4-byte header")
        protocol, size, count = struct.unpack_from("!BBH", body)
        if len(body) != 4 + size * count:
            raise IkeDecodeError(
                f"Delete: {count} SPIs of {size} bytes do not fill {len(body) - 4} bytes"
            )
        if protocol == 1 and (size, count) != (0, 0):
            raise IkeDecodeError("Delete: an IKE SA delete carries no SPI")
        spis = [body[4 + i * size : 4 + (i + 1) * size] for i in range(count)]
        return cls(protocol, spis, critical=critical)


@dataclass
class VendorID(Payload):
    TYPE: ClassVar = PayloadType.VENDOR_ID
    data: bytes = b""

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> VendorID:
        return cls(body, critical=critical)


@dataclass(frozen=True)
class TrafficSelector:
    ts_type: int
    ip_proto: int
    start_port: int
    end_port: int
    start_addr: str
    end_addr: str

    def encode(self) -> bytes:
        start = ip_address(self.start_addr).packed
        end = ip_address(self.end_addr).packed
        return (
            struct.pack(
                "!BBHHH",
                self.ts_type,
                self.ip_proto,
                8 + len(start) * 2,
                self.start_port,
                self.end_port,
            )
            + start
            + end
        )


@dataclass
class _TS(Payload):
    selectors: list[TrafficSelector] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return struct.pack("!B3x", len(self.selectors)) + b"".join(
            s.encode() for s in self.selectors
        )

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> _TS:
        if len(body) < 4:
            raise IkeDecodeError(f"{cls.TYPE.name}: shorter than its 4-byte header")
        count, offset, selectors = body[0], 4, []
        for index in range(count):
            if len(body) - offset < 8:
                raise IkeDecodeError(f"{cls.TYPE.name}: selector {index} truncated")
            ts_type, proto, length, sport, eport = struct.unpack_from("!BBHHH", body, offset)
            size = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(ts_type)
            if size is None:
                raise IkeDecodeError(
                    f"{cls.TYPE.name}: selector {index} has unknown type {ts_type}"
                )
            if length != 8 + 2 * size or offset + length > len(body):
                raise IkeDecodeError(
                    f"{cls.TYPE.name}: selector {index} length {length} is wrong for type {ts_type}"
                )
            start = body[offset + 8 : offset + 8 + size]
            end = body[offset + 8 + size : offset + length]
            if start > end:  # big-endian, same length: byte order is address order
                raise IkeDecodeError(f"{cls.TYPE.name}: selector {index} ends before it starts")
            selectors.append(
                TrafficSelector(
                    ts_type,
                    proto,
                    sport,
                    eport,
                    str(ip_address(start)),
                    str(ip_address(end)),
                )
            )
            offset += length
        if offset != len(body):
            raise IkeDecodeError(
                f"{cls.TYPE.name}: {len(body) - offset} bytes after {count} selectors"
            )
        return cls(selectors, critical=critical)


@dataclass
class TSi(_TS):
    TYPE: ClassVar = PayloadType.TSi


@dataclass
class TSr(_TS):
    TYPE: ClassVar = PayloadType.TSr


@dataclass
class CP(Payload):
    TYPE: ClassVar = PayloadType.CP
    cfg_type: int = 0
    attributes: list[tuple[int, bytes]] = field(default_factory=list)

    def encode_body(self) -> bytes:
        return struct.pack("!B3x", self.cfg_type) + b"".join(
            struct.pack("!HH", t & 0x7FFF, len(v)) + v for t, v in self.attributes
        )

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> CP:
        if len(body) < 4:
            raise IkeDecodeError("CP: shorter than its 4-byte header")
        attributes, offset = [], 4
        while offset < len(body):
            if len(body) - offset < 4:
                raise IkeDecodeError("CP: attribute header truncated")
            attr_type, length = struct.unpack_from("!HH", body, offset)
            if offset + 4 + length > len(body):
                raise IkeDecodeError(
                    f"CP: attribute {attr_type & 0x7FFF} length {length} is out of bounds"
                )
            attributes.append((attr_type & 0x7FFF, body[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        return cls(body[0], attributes, critical=critical)


@dataclass
class EAP(Payload):
    TYPE: ClassVar = PayloadType.EAP
    data: bytes = b""

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> EAP:
        return cls(body, critical=critical)


@dataclass
class Encrypted(Payload):
    """SK: `first` is the type of the first inner payload, `body` IV||ct||ICV."""

    TYPE: ClassVar = PayloadType.SK
    first: int = 0
    body: bytes = b""

    def encode_body(self) -> bytes:
        return self.body

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> Encrypted:
        return cls(0, body, critical=critical)


@dataclass
class EncryptedFragment(Payload):
    """SKF (RFC 7383): fragment `number` of `total`; `first` is set in fragment 1 only."""

    TYPE: ClassVar = PayloadType.SKF
    first: int = 0
    number: int = 1
    total: int = 1
    body: bytes = b""

    def encode_body(self) -> bytes:
        return struct.pack("!HH", self.number, self.total) + self.body

    @classmethod
    def decode_body(cls, body: bytes, critical: bool) -> EncryptedFragment:
        if len(body) < 4:
            raise IkeDecodeError("SKF: shorter than its 4-byte header")
        number, total = struct.unpack_from("!HH", body)
        if not 1 <= number <= total:
            raise IkeDecodeError(f"SKF: fragment number {number} of {total} is invalid", None)
        return cls(0, number, total, body[4:], critical=critical)


@dataclass
class Unknown(Payload):
    """A payload type this codec does not know, kept (non-critical ones are skipped)."""

    type: int = 0
    data: bytes = b""

    @property
    def TYPE(self) -> int:
        return self.type

    def encode_body(self) -> bytes:
        return self.data


PAYLOAD_CLASSES: dict[int, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        SA,
        KE,
        IDi,
        IDr,
        CERT,
        CERTREQ,
        AUTH,
        Nonce,
        Notify,
        Delete,
        VendorID,
        TSi,
        TSr,
        CP,
        EAP,
        Encrypted,
        EncryptedFragment,
    )
}


# ---------------------------------------------------------------- messages


@dataclass
class Header:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    message_id: int
    next_payload: int = 0
    major: int = IKE_MAJOR_VERSION
    minor: int = 0
    length: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & HeaderFlag.RESPONSE)

    @property
    def is_initiator(self) -> bool:
        return bool(self.flags & HeaderFlag.INITIATOR)

    def encode(self, next_payload: int, length: int) -> bytes:
        return _HEADER.pack(
            self.spi_i,
            self.spi_r,
            next_payload,
            (self.major << 4) | self.minor,
            self.exchange,
            self.flags,
            self.message_id,
            length,
        )


@dataclass
class Message:
    header: Header
    payloads: list[Payload] = field(default_factory=list)

    def get(self, cls: type[Payload]) -> Payload | None:
        return next((p for p in self.payloads if isinstance(p, cls)), None)

    def all(self, cls: type[Payload]) -> list[Payload]:
        return [p for p in self.payloads if isinstance(p, cls)]

    def notifies(self, ntype: int) -> list[Notify]:
        return [p for p in self.payloads if isinstance(p, Notify) and p.type == ntype]


def decode_header(data: bytes) -> Header:
    """The IKE header alone (first 28 bytes), version checked."""
    if len(data) < IKE_HEADER_SIZE:
        raise IkeDecodeError(f"message of {len(data)} bytes is shorter than the IKE header", None)
    spi_i, spi_r, nxt, version, exchange, flags, message_id, length = _HEADER.unpack_from(data)
    header = Header(
        spi_i, spi_r, exchange, flags, message_id, nxt, version >> 4, version & 0x0F, length
    )
    if header.major != IKE_MAJOR_VERSION:
        raise IkeDecodeError(
            f"IKE major version {header.major}, only 2 is spoken",
            NotifyType.INVALID_MAJOR_VERSION,
            bytes([IKE_MAJOR_VERSION << 4]),
        )
    return header


def decode_payloads(data: bytes, first: int, where: str = "message") -> list[Payload]:
    """A chain of payloads starting with type `first`, filling `data` exactly."""
    payloads: list[Payload] = []
    offset, ptype = 0, first
    while ptype != PayloadType.NONE:
        if len(payloads) >= MAX_PAYLOADS:
            raise IkeDecodeError(f"{where}: more than {MAX_PAYLOADS} payloads")
        if len(data) - offset < GENERIC_PAYLOAD_HEADER_SIZE:
            raise IkeDecodeError(f"{where}: payload {ptype} header truncated at offset {offset}")
        nxt, flags, length = _GENERIC.unpack_from(data, offset)
        if length < GENERIC_PAYLOAD_HEADER_SIZE or offset + length > len(data):
            raise IkeDecodeError(
                f"{where}: payload {ptype} at offset {offset} has length "
                f"{length}, {len(data) - offset} bytes remain"
            )
        critical = bool(flags & 0x80)
        body = data[offset + GENERIC_PAYLOAD_HEADER_SIZE : offset + length]
        cls = PAYLOAD_CLASSES.get(ptype)
        if cls is None:
            if critical:
                raise IkeDecodeError(
                    f"{where}: unsupported critical payload type {ptype}",
                    NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
                    bytes([ptype]),
                )
            payloads.append(Unknown(type=ptype, data=body, critical=False))
        else:
            payload = cls.decode_body(body, critical)
            if isinstance(payload, Encrypted | EncryptedFragment):
                if where != "message":  # RFC 7296 3.14: only a message's last payload
                    raise IkeDecodeError(f"{where}: {cls.TYPE.name} inside an encrypted payload")
                payload.first = nxt
                payloads.append(payload)
                if offset + length != len(data):
                    raise IkeDecodeError(f"{where}: {cls.TYPE.name} is not the last payload")
                return payloads
            payloads.append(payload)
        offset += length
        ptype = nxt
    if offset != len(data):
        raise IkeDecodeError(f"{where}: {len(data) - offset} bytes after the last payload")
    return payloads


def decode_message(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Header and payloads of one IKE message (SK/SKF bodies left encrypted)."""
    if len(data) > max_size:
        raise IkeDecodeError(f"message of {len(data)} bytes exceeds the {max_size}-byte cap", None)
    header = decode_header(data)
    if header.length != len(data):
        raise IkeDecodeError(
            f"IKE header length {header.length} but {len(data)} bytes received", None
        )
    return Message(header, decode_payloads(data[IKE_HEADER_SIZE:], header.next_payload))


def _encode_chain(payloads: list[Payload], after: int = PayloadType.NONE) -> tuple[int, bytes]:
    """(type of the first payload, bytes of the chain)."""
    out = bytearray()
    for index, payload in enumerate(payloads):
        nxt = payloads[index + 1].TYPE if index + 1 < len(payloads) else after
        body = payload.encode_body()
        out += (
            _GENERIC.pack(
                nxt, 0x80 if payload.critical else 0, GENERIC_PAYLOAD_HEADER_SIZE + len(body)
            )
            + body
        )
    return (payloads[0].TYPE if payloads else after), bytes(out)


def encode_payloads(payloads: list[Payload]) -> tuple[int, bytes]:
    """An inner chain for SK: (first payload type, bytes)."""
    return _encode_chain(payloads)


def encode_message(message: Message) -> bytes:
    """A plain message; an Encrypted payload, if last, is written with its `first`."""
    payloads = message.payloads
    if payloads and isinstance(payloads[-1], Encrypted | EncryptedFragment):
        head, tail = payloads[:-1], payloads[-1]
        first, chain = _encode_chain(head, tail.TYPE)
        body = tail.encode_body()
        chain += _GENERIC.pack(tail.first, 0x80 if tail.critical else 0, 4 + len(body)) + body
        first = first if head else tail.TYPE
    else:
        first, chain = _encode_chain(payloads)
    length = IKE_HEADER_SIZE + len(chain)
    return message.header.encode(first, length) + chain


def seal_message(header: Header, inner: list[Payload], cipher: SkCipher) -> bytes:
    """A message whose payloads are all inside SK (RFC 7296 3.14)."""
    first, plaintext = encode_payloads(inner)
    length = IKE_HEADER_SIZE + GENERIC_PAYLOAD_HEADER_SIZE + cipher.sealed_length(len(plaintext))
    aad = header.encode(PayloadType.SK, length) + _GENERIC.pack(first, 0, length - IKE_HEADER_SIZE)
    return aad + cipher.seal(plaintext, aad)


def open_encrypted(data: bytes, message: Message, cipher: SkCipher) -> list[Payload]:
    """Decrypt and decode the SK payload of `message` (decoded from `data`)."""
    sk = message.payloads[-1] if message.payloads else None
    if not isinstance(sk, Encrypted):
        raise IkeDecodeError("message has no SK payload to open")
    aad_end = len(data) - len(sk.body)
    plaintext = cipher.open(sk.body, data[:aad_end])
    return decode_payloads(plaintext, sk.first, where="SK")


# ---------------------------------------------------------------- fragments (RFC 7383)


def seal_fragments(
    header: Header, inner: list[Payload], cipher: SkCipher, max_datagram: int
) -> list[bytes]:
    """`inner` split over SKF messages that each fit in `max_datagram` bytes."""
    first, plaintext = encode_payloads(inner)
    overhead = IKE_HEADER_SIZE + GENERIC_PAYLOAD_HEADER_SIZE + 4
    room = max_datagram - overhead
    chunk = room
    while chunk > 0 and cipher.sealed_length(chunk) > room:
        chunk -= 1
    if chunk <= 0:
        raise ValueError(f"{max_datagram} bytes leave no room for a fragment")
    pieces = [plaintext[i : i + chunk] for i in range(0, len(plaintext), chunk)] or [b""]
    total = len(pieces)
    if total > 0xFFFF:
        raise ValueError("message too large to fragment")
    out = []
    for number, piece in enumerate(pieces, 1):
        length = overhead + cipher.sealed_length(len(piece))
        aad = (
            header.encode(PayloadType.SKF, length)
            + _GENERIC.pack(first if number == 1 else 0, 0, length - IKE_HEADER_SIZE)
            + struct.pack("!HH", number, total)
        )
        out.append(aad + cipher.seal(piece, aad))
    return out


@dataclass
class Reassembler:
    """Collects the SKF fragments of one message (bounded); `add` returns the inner
    payloads once all arrived, else None."""

    max_fragments: int = 64
    _total: int = 0
    _first: int = 0
    _parts: dict[int, bytes] = field(default_factory=dict)

    def add(self, data: bytes, message: Message, cipher: SkCipher) -> list[Payload] | None:
        frag = message.payloads[-1] if message.payloads else None
        if not isinstance(frag, EncryptedFragment):
            raise IkeDecodeError("message has no SKF payload", None)
        if frag.total > self.max_fragments:
            raise IkeDecodeError(
                f"SKF: {frag.total} fragments exceed the limit {self.max_fragments}", None
            )
        if self._total and frag.total != self._total:
            if frag.total < self._total:
                raise IkeDecodeError(f"SKF: total {frag.total} disagrees with {self._total}", None)
            self._parts.clear()  # RFC 7383 2.6.2: a larger total restarts collection
        self._total = frag.total
        if frag.number in self._parts:
            return None  # duplicate
        plaintext = cipher.open(frag.body, data[: len(data) - len(frag.body)])
        self._parts[frag.number] = plaintext
        if frag.number == 1:
            self._first = frag.first
        if len(self._parts) < self._total:
            return None
        whole = b"".join(self._parts[n] for n in range(1, self._total + 1))
        return decode_payloads(whole, self._first, where="SKF")
