"""The sans-IO IKEv2 engine (RFC 7296): every exchange, both roles.

    engine = Engine(local_address)                       # one per local address/port
    engine.add_connection(IkeConnection(...))
    engine.initiate("h1-h2", now)                        # queue an IKE_SA_INIT request
    engine.receive(data, src, now)                       # a datagram from the network
    engine.tick(now)                                     # timers (retransmission)
    engine.next_deadline() -> float | None               # when to call tick next
    engine.pop_datagrams() -> [Datagram]; engine.pop_events() -> [Event]
    engine.rekey_child_sa / rekey_ike_sa / reauthenticate / create_child_sa /
    delete_child_sa / delete_ike_sa / check_liveness(sa, ..., now)

IKE_SA_INIT (cookies, INVALID_KE_PAYLOAD, NAT detection), IKE_AUTH (PSK or
certificates) with the first Child SA, CREATE_CHILD_SA (further Child SAs, Child and
IKE rekeys with or without PFS), INFORMATIONAL (deletes, liveness), RFC 7383 fragments,
reauthentication, and the collisions of RFC 7296 2.8 and 2.25. Window size 1: one
request of ours in flight per IKE SA, others queue (`pending`).

Callers own sockets and clocks. Malformed or unexpected input is logged once with its
reason and dropped (or answered as RFC 7296 says), leaving every other SA untouched.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import heapq
import ipaddress
import itertools
import logging
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum

from .. import certs, codec, crypto, identity
from ..constants import (
    NAT_KEEPALIVE,
    NAT_T_PORT,
    AuthMethod,
    EsnId,
    ExchangeType,
    HeaderFlag,
    IdType,
    IntegId,
    NotifyType,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
)
from ..defaults import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS
from ..proposals import describe, parse_proposal_string, proposal_acceptable, select_proposal
from .cookies import CookieJar
from .events import (
    Address,
    AuthFailed,
    ChildSaDeleted,
    ChildSaReady,
    Datagram,
    Event,
    IkeSaConfirmed,
    IkeSaDown,
    IkeSaMoved,
    IkeSaRekeyed,
    IkeSaUp,
    NegotiationFailed,
    PeerDead,
    RevocationWanted,
)
from .retransmit import RetransmitPolicy
from .schedule import LifetimeSchedule

log = logging.getLogger("keyway.ike")
# What any sender can provoke with one datagram (garbage, unknown SPIs, failed
# IKE_AUTH): keywayd rate-limits this logger, so a flood cannot fill a disk.
untrusted = logging.getLogger("keyway.untrusted")


def _name(kind: type[IntEnum], value: int) -> str:
    """An IKE constant's name, or its number when this enum does not know it."""
    try:
        return kind(value).name
    except ValueError:
        return str(value)


def _trace(
    name: str, sent: bool, header: codec.Header, payloads: list[codec.Payload], again: str = ""
) -> None:
    """log_level debug: each message as strongSwan's charon shows it (exchange, request
    or response, message ID, payload types, notify types); never a key or a nonce.
    `again`: why a message comes or goes once more (a retransmission, or a retransmitted
    request answered from the cache), which the first line for it does not show."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    names = []
    for payload in payloads:
        if isinstance(payload, codec.Notify):
            names.append(f"N({_name(NotifyType, payload.type)})")
        else:
            names.append(_name(PayloadType, payload.TYPE))
    log.debug(
        "%s: %s %s %s #%d %s %s",
        name,
        "sending" if sent else "received",
        _name(ExchangeType, header.exchange),
        "response" if header.is_response else "request",
        header.message_id,
        f"again ({again})" if again else f"[{' '.join(names)}]",
        _spis(header),
    )


def _spis(header: codec.Header) -> str:
    """The IKE SA a traced message is on, as `keywayctl list-sas` names it: messages on
    the several IKE SAs of one connection (rekeys, reauthentications) told apart."""
    return f"{header.spi_i.hex()}_i {header.spi_r.hex()}_r"


def _notified(payloads: list[codec.Payload], kind: int) -> codec.Notify | None:
    """The first notify of type `kind` among `payloads`, if any."""
    return next((p for p in payloads if isinstance(p, codec.Notify) and p.type == kind), None)


def _address_pair(src: Address, dst: Address) -> bytes:
    """NO_NATS_ALLOWED's data (RFC 4555 4.2.6): source address and port, then
    destination address and port, as the message's IP and UDP headers carry them."""
    return b"".join(
        ipaddress.ip_address(a).packed + struct.pack("!H", port) for a, port in (src, dst)
    )


NONCE_SIZE = 32
HALF_OPEN_TIMEOUT = 30.0  # seconds a responder waits for IKE_AUTH (strongSwan's default)
REDUNDANT_GRACE = 10.0  # seconds a collision's loser has to delete its redundant SA
# Seconds the maker of an IKE rekey we answered has to delete the SA it replaced before
# we do (strongSwan's 90): libreswan's pluto, confused by crossed rekeys, may keep it.
REKEYED_DELETE_TIMEOUT = 90.0
REAUTH_RECHECK = 5.0  # seconds: a reauthentication due during a rekey looks again
MAX_HALF_OPEN = 1024  # responder state for unauthenticated peers is bounded
INVALID_SPI_ANSWERS_PER_SECOND = 20
MAX_QUEUED_INVALID_SPI = 8  # INVALID_SPI notifications waiting on one IKE SA
# Seconds between the liveness checks one IKE SA makes on unprotected hints (RFC 7296
# 2.21.4: such tests are limited, or a forger could make us flood the peer with them).
HINT_INTERVAL = 10.0
RETRY_DELAY = (2.0, 8.0)  # seconds before retrying an exchange the peer was busy for
CHILD_EXCHANGES = ("rekey_child", "create_child", "delete_child")
REDUNDANT_CHILD = "redundant after a rekey collision"
REDUNDANT_IKE = "redundant after a rekey collision"
DUPLICATE_IKE = "duplicate of a simultaneous initiation"
REPLACED_UNIQUE = "replaced by a newer IKE SA (unique: replace)"
SURPLUS_REKEY = "surplus: a reauthentication replaced the SA it rekeyed"
EXPIRED = "expired: not rekeyed within over_time"
PEER_DEAD = "peer dead"
UNCONFIRMED = "the peer never completed it"
HARD_LIFETIME = "hard lifetime reached"


@dataclass(frozen=True)
class ChildParams:
    name: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    proposals: tuple[str, ...] = DEFAULT_ESP_PROPOSALS  # of `protocol`
    mode: str = "tunnel"
    rekey_time: float = 0.0  # seconds; 0: no time-based rekey
    life_time: float = 0.0  # hard expiry; 0: none
    rand_time: float = 0.0  # rekeys spread over [rekey_time - rand_time, rekey_time]
    protocol: str = "esp"  # esp | ah


@dataclass(frozen=True)
class IkeConnection:
    name: str
    remote_address: Address
    local_id: str
    remote_id: str
    psk: bytes = field(repr=False)  # sent as initiator; accepted
    proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    children: tuple[ChildParams, ...] = ()
    allow_weak: bool = False
    retransmit: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    auth: str = "psk"  # psk | pubkey
    certs: tuple[bytes, ...] = ()  # own chain, DER, leaf first (pubkey)
    private_key: object = field(default=None, repr=False)  # (pubkey)
    cacerts: tuple = ()  # x509.Certificate trust anchors for the peer (pubkey)
    crls: tuple = ()  # x509.CertificateRevocationList checked on the peer's path
    revocation: str = "relaxed"  # strict | ifuri | relaxed (certs.verify_peer)
    # Signature schemes the peer may authenticate with (crypto's names: rsa-pss,
    # rsa-pkcs1, ecdsa, ed25519, ed448); empty: any that verifies.
    peer_signatures: tuple[str, ...] = ()
    # Largest IP datagram an IKE message may take before it is sent as RFC 7383
    # fragments (when the peer supports them); 0: never fragment. strongSwan's default.
    fragment_size: int = 1280
    # Older PSKs still accepted during a rotation, newest first: a responder verifies
    # AUTH against each, an initiator the peer refuses tries the next one.
    previous_psks: tuple[bytes, ...] = field(default=(), repr=False)
    # strongSwan's uniqueness policy for IKE SAs with the same peer identity: "no" (an
    # older one goes when the new one carries INITIAL_CONTACT), "never" (not even then),
    # "keep" (a responder refuses the new one), "replace" (the older ones are deleted).
    unique: str = "no"
    # Seconds between NAT keepalives while our own address is translated (RFC 3948
    # 2.3; strongSwan's charon.keep_alive): the NAT's mapping must not expire. 0: none.
    keepalive: float = 20.0
    # Where else the peer may come from: more addresses, prefixes, or every address
    # (0.0.0.0/0 and ::/0 for swanctl's %any); such a peer is told apart by identity.
    # remote_address is where we initiate (a caller may pick another per initiation).
    peer_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # NAT traversal (RFC 7296 2.23): False (encap: no) sends no NAT detection notifies
    # and heeds none, so neither end floats to 4500 nor UDP-encapsulates ESP.
    nat_traversal: bool = True
    # MOBIKE (RFC 4555): MOBIKE_SUPPORTED sent in IKE_AUTH; when the peer sends it too,
    # the peer may move its addresses with UPDATE_SA_ADDRESSES (we follow, as responder).
    mobike: bool = True
    # Seconds between liveness checks (an empty INFORMATIONAL) on each established IKE
    # SA; PeerDead when one goes unanswered. 0: none (swanctl's dpd_delay).
    dpd_delay: float = 0.0
    # The IKE SA's lifetimes, as swanctl's (seconds; 0: none): both ends rekey before
    # rekey_time and reauthenticate before reauth_time, each up to rand_time earlier;
    # an SA neither renewed over_time past the earlier of the two is deleted.
    rekey_time: float = 0.0
    reauth_time: float = 0.0
    over_time: float = 0.0
    rand_time: float = 0.0
    # A template for a mesh defined by policy (opportunistic encryption): a peer from
    # peer_ranges whose identity is its own address (its certificate says so) is
    # answered, and Engine.instantiate makes it a connection of its own. Never initiated.
    opportunistic: bool = False

    @property
    def psks(self) -> tuple[bytes, ...]:
        return (self.psk, *self.previous_psks)


@dataclass(frozen=True)
class _Answering:
    """How a responder answers an IKE_SA_INIT from one address, before the peer's
    identity tells its connection: from every connection the address may be for. Worked
    out once per address (Engine._answering_for): a hub may hold thousands of
    connections to one address, or to any, and this was work per request for each."""

    proposals: tuple[tuple[str, bool], ...]  # (proposal, allow_weak), each offered once
    conn: IkeConnection  # the SA's connection until IKE_AUTH (a weak-allowing one first)
    nat_traversal: bool  # unless every connection says encap: no
    fragments: bool
    cas: tuple  # the CAs a pubkey connection trusts (CERTREQ)

    @classmethod
    def of(cls, candidates: list[IkeConnection]) -> _Answering:
        return cls(
            # Many connections to one peer usually share their proposals.
            tuple(dict.fromkeys((p, c.allow_weak) for c in candidates for p in c.proposals)),
            next((c for c in candidates if c.allow_weak), candidates[0]),
            any(c.nat_traversal for c in candidates),
            any(c.fragment_size for c in candidates),
            tuple(ca for c in candidates if c.auth == "pubkey" for ca in c.cacerts),
        )


ANSWERING_CACHE = 4096  # addresses whose _Answering is kept (a flood of sources clears it)


_ADDRESS_IDS = (IdType.IPV4_ADDR, IdType.IPV6_ADDR)


def _is_address(identity_text: str, address: str) -> bool:
    """Whether an identity (as text) is this IP address."""
    try:
        return ipaddress.ip_address(identity_text) == ipaddress.ip_address(address)
    except ValueError:
        return False


def _peer_addresses(conn: IkeConnection) -> list[str]:
    """The single addresses a connection's peer may come from (indexed)."""
    singles = [str(r.network_address) for r in conn.peer_ranges if r.num_addresses == 1]
    return list(dict.fromkeys([conn.remote_address[0], *singles]))


@functools.lru_cache(maxsize=256)
def _ike_proposal(text: str, allow_weak: bool):
    return parse_proposal_string(text, "ike", allow_weak=allow_weak)


def _ike_specs_of(conn: IkeConnection) -> list:
    """A connection's IKE proposals, parsed (cached: thousands of SAs share them)."""
    return [_ike_proposal(text, conn.allow_weak) for text in conn.proposals]


# RFC 7427 hash algorithms we verify with: SHA2-256/384/512 and Identity (Ed25519).
SIGNATURE_HASHES = struct.pack("!HHHH", 2, 3, 4, 5)


# RFC 7427 hash algorithm IDs of the hashes we sign RSA with, strongest first.
_RSA_HASHES = ((4, "sha512"), (3, "sha384"), (2, "sha256"))


def _signature_scheme(private_key, peer_hashes: frozenset[int]) -> tuple[str, str]:
    """How we sign with our key: Ed25519 or Ed448; ECDSA with its curve's hash; RSA with
    RSASSA-PSS (RFC 8247: PKCS#1 v1.5 is not for new signatures) and the hash its size
    calls for (SHA-512 from 7680 bits, SHA-384 from 3072, else SHA-256), or the
    strongest below that the peer announced in SIGNATURE_HASH_ALGORITHMS."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519", "identity"
    if isinstance(private_key, ed448.Ed448PrivateKey):
        return "ed448", "identity"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        bits = private_key.curve.key_size
        return "ecdsa", "sha256" if bits <= 256 else "sha384" if bits <= 384 else "sha512"
    bits = private_key.key_size
    cap = 4 if bits >= 7680 else 3 if bits >= 3072 else 2
    for hash_id, name in _RSA_HASHES:
        if hash_id <= cap and (not peer_hashes or hash_id in peer_hashes):
            return "rsa-pss", name
    return "rsa-pss", "sha256"  # the peer announced none of ours: it will say so


def _without_ke(proposal: codec.Proposal) -> codec.Proposal:
    """A proposal without its KE transforms."""
    kept = [t for t in proposal.transforms if t.type != TransformType.KE]
    return replace(proposal, transforms=kept)


def _protocol_id(protocol: str) -> int:
    """The IKE protocol ID of a Child SA's protocol name (esp | ah)."""
    return ProtocolId.AH if protocol == "ah" else ProtocolId.ESP


def _protocol_name(protocol_id: int) -> str:
    """A Child SA's protocol name (esp | ah) from its IKE protocol ID."""
    return "ah" if protocol_id == ProtocolId.AH else "esp"


# Reserves an inbound Child SA SPI: (connection, child, protocol "esp" | "ah", the
# peer's address) -> the SPI, unique among the host's inbound SAs (keywayd asks the
# data plane: the kernel's ALLOCSPI). SPIs 1-255 are reserved (RFC 4303 section 2.1).
SpiAllocator = Callable[[str, str, str, str], int]


def random_spi(_connection: str, _child: str, _protocol: str, _peer: str) -> int:
    """An SPI for an engine with no data plane to ask (tests, tools)."""
    return 0x100 + int.from_bytes(os.urandom(4), "big") % (0xFFFFFFFF - 0xFF)


def _announced_hashes(msg: codec.Message) -> frozenset[int]:
    """The RFC 7427 hash algorithm IDs a peer's SIGNATURE_HASH_ALGORITHMS lists."""
    ids: set[int] = set()
    for notify in msg.notifies(NotifyType.SIGNATURE_HASH_ALGORITHMS):
        data = notify.data[: len(notify.data) // 2 * 2]
        ids.update(struct.unpack(f"!{len(data) // 2}H", data))
    return frozenset(ids)


def negotiated_suite(chosen: codec.Proposal, allow_weak: bool):
    """(prf or None, encr or None, integ or None) of a chosen proposal; IkeCryptoError
    when a transform is unusable."""
    by_type = {t.type: t for t in chosen.transforms}
    prf_t = by_type.get(TransformType.PRF)
    encr_t = by_type.get(TransformType.ENCR)  # none for AH
    integ_t = by_type.get(TransformType.INTEG)
    return (
        crypto.prf_for(prf_t.id, allow_weak) if prf_t else None,
        crypto.encr_for(encr_t.id, encr_t.key_length, allow_weak) if encr_t else None,
        crypto.integ_for(integ_t.id if integ_t else IntegId.NONE, allow_weak),
    )


def errors_of(payloads: list[codec.Payload]) -> list[codec.Notify]:
    """The error notifies among decrypted payloads."""
    return [p for p in payloads if isinstance(p, codec.Notify) and p.is_error]


def notify_name(ntype: int) -> str:
    """A notify type's registry name, or its number for unknown ones."""
    return NotifyType(ntype).name if ntype in NotifyType._value2member_map_ else f"notify {ntype}"


def encode_id(text: str) -> tuple[int, bytes]:
    """An identity as (ID type, data): addresses, a DN (DER), a KEY_ID, user@FQDN, FQDN
    (identity.py)."""
    if identity.is_dn(text):
        return IdType.DER_ASN1_DN, identity.dn_der(text)
    if identity.is_key_id(text):
        return IdType.KEY_ID, identity.key_id(text)
    text = identity.canonical(text)  # "@fqdn": the FQDN
    try:
        address = ipaddress.ip_address(text)
        return (IdType.IPV4_ADDR if address.version == 4 else IdType.IPV6_ADDR), address.packed
    except ValueError:
        pass
    return (IdType.RFC822_ADDR if "@" in text else IdType.FQDN), text.encode()


@functools.lru_cache(maxsize=1024)
def _ts_from_prefix(prefix: str) -> codec.TrafficSelector:
    net = ipaddress.ip_network(prefix)
    ts_type = TsType.IPV4_ADDR_RANGE if net.version == 4 else TsType.IPV6_ADDR_RANGE
    return codec.TrafficSelector(ts_type, 0, 0, 65535, str(net[0]), str(net[-1]))


def narrow(
    offered: list[codec.TrafficSelector], allowed: tuple[str, ...]
) -> list[codec.TrafficSelector]:
    """The parts of the peer's selectors our configuration allows (RFC 7296 2.9)."""
    result = []
    for ts in offered:
        for prefix in allowed:
            mine = _ts_from_prefix(prefix)
            if mine.ts_type != ts.ts_type:
                continue
            start = max(codec.ip_address(ts.start_addr), codec.ip_address(mine.start_addr))
            end = min(codec.ip_address(ts.end_addr), codec.ip_address(mine.end_addr))
            if start > end:
                continue
            result.append(
                codec.TrafficSelector(
                    ts.ts_type, ts.ip_proto, ts.start_port, ts.end_port, str(start), str(end)
                )
            )
    return result


def within(selectors: list[codec.TrafficSelector], allowed: tuple[str, ...]) -> bool:
    """Each of the peer's selectors lies inside one of ours: a responder may narrow
    what the initiator proposed, never widen it (RFC 7296 2.9)."""
    ours = [_ts_from_prefix(prefix) for prefix in allowed]
    return all(
        any(
            mine.ts_type == ts.ts_type
            and codec.ip_address(mine.start_addr) <= codec.ip_address(ts.start_addr)
            and codec.ip_address(ts.end_addr) <= codec.ip_address(mine.end_addr)
            for mine in ours
        )
        for ts in selectors
    )


def ts_to_prefixes(selectors: list[codec.TrafficSelector]) -> tuple[str, ...]:
    return tuple(p for ts in selectors for p in _range_prefixes(ts.start_addr, ts.end_addr))


@functools.lru_cache(maxsize=1024)
def _range_prefixes(start: str, end: str) -> tuple[str, ...]:
    """The prefixes that make up an address range (a selector's), as text."""
    return tuple(
        str(net)
        for net in ipaddress.summarize_address_range(codec.ip_address(start), codec.ip_address(end))
    )


class SaState(enum.StrEnum):
    """Where an IKE SA is: one state machine (SA_TRANSITIONS), each change made by
    IkeSa._set_state. A str, so callers comparing with the names keep working."""

    INIT = "init"  # IKE_SA_INIT under way (an SA a rekey makes starts here too)
    AUTH = "auth"  # IKE_AUTH under way
    ESTABLISHED = "established"
    DELETED = "deleted"  # gone after it was up: deleted, expired, replaced, peer dead
    FAILED = "failed"  # never came up, or a half-open SA dropped


SA_TRANSITIONS: dict[SaState, frozenset[SaState]] = {
    # INIT -> ESTABLISHED: an SA a rekey makes is up once its CREATE_CHILD_SA is done.
    SaState.INIT: frozenset({SaState.AUTH, SaState.ESTABLISHED, SaState.FAILED}),
    SaState.AUTH: frozenset({SaState.ESTABLISHED, SaState.FAILED}),
    SaState.ESTABLISHED: frozenset({SaState.DELETED}),
    SaState.DELETED: frozenset(),
    SaState.FAILED: frozenset(),
}


@dataclass
class _Request:
    data: tuple[bytes, ...]  # one message, or its fragments
    message_id: int
    sent_at: float
    attempt: int = 0
    kind: str = ""  # init | auth | delete_ike | delete_child | dpd
    arg: object = None


class IkeSa:
    """One IKE SA on one side: its keys, message IDs, and the exchange in flight."""

    def __init__(
        self,
        engine: Engine,
        conn: IkeConnection | None,
        initiator: bool,
        remote: Address,
        spi_i: bytes,
        spi_r: bytes,
    ):
        self._conn: IkeConnection | None = None
        self.engine, self.initiator, self.remote = engine, initiator, remote
        self.spi_i, self.spi_r = spi_i, spi_r
        self.state = SaState.INIT
        self.conn = conn
        self.send_mid = 0  # id of our next request
        self.recv_mid = 0  # id of the peer's next request
        self.request: _Request | None = None
        self.pending: list[tuple[str, object]] = []  # requests waiting for the window
        self.children: dict[int, ChildSaReady] = {}  # by inbound SPI
        self.child_timers: dict[int, LifetimeSchedule] = {}  # by inbound SPI
        self.last_response: tuple[int, tuple[bytes, ...]] | None = None
        self.peer_fragments = False  # the peer sent IKEV2_FRAGMENTATION_SUPPORTED
        self.peer_childless = False  # the peer sent CHILDLESS_IKEV2_SUPPORTED (RFC 6023)
        self.peer_sig_hashes: frozenset[int] = frozenset()  # its RFC 7427 hash IDs
        self.fragments: tuple[int, bool, codec.Reassembler] | None = None  # (mid, response)
        self.keys: crypto.IkeKeys | None = None
        self.out: object = None
        self.inbound: object = None
        self.prf: crypto.Prf | None = None
        self.nonce_i = self.nonce_r = b""
        self.init_request = self.init_response = b""
        self.kx: crypto.KeyExchange | None = None
        self.ke_group: int | None = None
        self.cookie: bytes = b""
        self.chosen_ike: codec.Proposal | None = None
        self.child_spi = b""
        self.child_params: ChildParams | None = None
        self.remote_id = ""
        self.nat = False  # a NAT between the peers: Child SAs are UDP-encapsulated
        self.behind_nat = False  # our own address is translated: we send keepalives
        self.keepalive_at: float | None = None
        self.dpd_at: float | None = None  # the next liveness check (conn.dpd_delay)
        # Its lifetimes (_schedule_lifetimes): when it rekeys, reauthenticates, expires.
        self.rekey_at: float | None = None
        self.reauth_at: float | None = None
        self.expire_at: float | None = None
        self.expiring = False  # over_time passed: its deletion is an expiry
        # We send from the NAT-T port (with the non-ESP marker): we floated there, or
        # the peer's last request came to it.
        self.nat_t = False
        # The peer's IKE_AUTH said INITIAL_CONTACT: it holds no older SAs with us.
        self.peer_initial_contact = False
        # MOBIKE is in use (RFC 4555): the peer moves its address only by
        # UPDATE_SA_ADDRESSES, not by where its other IKE messages come from.
        self.mobike = False
        # Where the answer to the request being handled goes, with MOBIKE: its source,
        # which is not where the SA sends its own requests (RFC 7296 2.11).
        self.reply_to: tuple[Address, bool] | None = None
        # After an UPDATE_SA_ADDRESSES, until the peer answered us there: where the
        # Child SAs still send.
        self.child_remote: Address | None = None
        self.replaced = False  # a rekey moved this SA's role to a successor
        self.reauth_of: IkeSa | None = None  # the IKE SA this one reauthenticates
        self.psk_index = 0  # which of conn.psks this SA authenticates with
        self.reauthenticated = False  # a reauthentication replaced this SA
        # An unprotected INVALID_IKE_SPI answered one of our requests on this SA: the
        # peer may have restarted (a hint only: anyone on the path could send one).
        self.peer_forgot = False
        self.hinted_at: float | None = None  # last liveness check on an unprotected hint
        self.redundant = ""  # why a collision made this SA surplus (it goes, unreplaced)
        # The peer holds this SA established: it answered our IKE_AUTH or rekey, or sent
        # on the SA since. A responder's answer may be lost, and the peer then holds
        # nothing of the SA: a duplicate of it is kept until then.
        self.peer_holds = False
        self.duplicate_waits = False  # a duplicate of this SA goes once the peer holds it
        self.created_at = engine.now
        self.established_at: float | None = None
        # When IKE_AUTH made this SA or the one it rekeys: what a reauthentication renews.
        self.authenticated_at: float | None = None
        # Collisions (RFC 7296 2.8.1, 2.8.2, 2.25): what each Child SA is going through.
        self.rekeyed_children: set[int] = set()  # replaced; the old one awaits its Delete
        self.overdue_children: set[int] = set()  # rekeyed ones kept past their hard lifetime
        # The peer's new Child SAs that lost a rekey collision we won: the peer deletes
        # them, and nothing is ever sent on them (keywayd installs no outbound half).
        self.losing_children: set[int] = set()
        self.deleting_children: dict[int, str] = {}  # spi_in -> reason, queued or in flight
        # Past their hard lifetime: already out of the data plane (ChildSaDeleted said
        # so), kept here only for the Delete that tells the peer.
        self.expired_children: set[int] = set()
        # Peer rekeys we answered while our own rekey of the same Child SA was in flight:
        # old spi_in -> (the peer's new spi_in, the lower nonce of that exchange).
        self.child_collisions: dict[int, tuple[int, bytes]] = {}
        self.ike_collision: tuple[IkeSa, bytes] | None = None  # the same, for the IKE SA
        self.ike_rekey_retry_at: float | None = None  # after a TEMPORARY_FAILURE
        # configured child -> when to ask for it again, after the peer was busy for it
        self.create_retry: dict[str, float] = {}
        self.delete_at: float | None = None  # a redundant SA the peer did not delete
        self.rekey_of: IkeSa | None = None  # the SA whose colliding rekey made this one
        self.successor: IkeSa | None = None  # the SA a rekey handed this one's role to
        # A rekey's responder sends nothing on the new SA until the old one is deleted:
        # before that, the rekey's initiator may not hold the new SA yet.
        self.wait_for: IkeSa | None = None
        self.wait_until: float | None = None

    @property
    def conn(self) -> IkeConnection | None:
        return self._conn

    @conn.setter
    def conn(self, conn: IkeConnection | None) -> None:
        # The engine indexes SAs by connection name (an agent may hold thousands).
        if self._conn is not None:
            self.engine._by_conn.get(self._conn.name, {}).pop(id(self), None)
        self._conn = conn
        if conn is not None and self.state not in ("failed", "deleted"):
            self.engine._by_conn.setdefault(conn.name, {})[id(self)] = self

    @property
    def trace_name(self) -> str:
        """Who a traced message is with: the connection, or until the peer has
        authenticated to us as responder (only then is the connection known) its address."""
        if self.initiator or self.remote_id:
            return self.conn.name
        return f"{self.remote[0]}:{self.remote[1]}"

    @property
    def half_open(self) -> bool:
        """A responder's IKE SA before IKE_AUTH: anyone who can send from the peer's
        address could have made it, and which connection it belongs to is known only
        once the peer's identity is authenticated."""
        return not self.initiator and self.state in ("init", "auth")

    @property
    def superseded(self) -> bool:
        """A rekey, a reauthentication or a collision made this SA surplus: it only
        waits for its Delete, and starts nothing new."""
        return self.replaced or self.reauthenticated or bool(self.redundant)

    def live_children(self) -> list[int]:
        """The inbound SPIs of Child SAs that are neither replaced by a rekey nor being
        deleted: the ones a caller may still rekey or delete."""
        return [
            spi
            for spi in self.children
            if spi not in self.rekeyed_children and spi not in self.deleting_children
        ]

    def creating(self, child: str) -> bool:
        """A CREATE_CHILD_SA for configured child `child` is in flight or queued."""
        req = self.request
        if req is not None and req.kind == "create_child" and req.arg[4].name == child:
            return True
        if child in self.create_retry:
            return True  # asked again shortly: the peer was busy
        return any(kind == "create_child" and arg.name == child for kind, arg in self.pending)

    @property
    def local_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    def _header(self, exchange: int, mid: int, response: bool) -> codec.Header:
        flags = (HeaderFlag.INITIATOR if self.initiator else 0) | (
            HeaderFlag.RESPONSE if response else 0
        )
        return codec.Header(self.spi_i, self.spi_r, exchange, flags, mid)

    def _send_request(
        self, data: tuple[bytes, ...], now: float, kind: str = "", arg: object = None
    ) -> None:
        self.request = _Request(data, self.send_mid, now, kind=kind, arg=arg)
        self.send_mid += 1
        self.engine._emit_all(data, self.remote, self.nat_t)

    def _send_response(self, mid: int, data: tuple[bytes, ...]) -> None:
        self.last_response = (mid, data)
        remote, nat_t = self.reply_to or (self.remote, self.nat_t)
        self.engine._emit_all(data, remote, nat_t)

    def _request(
        self, exchange: int, inner: list[codec.Payload], now: float, kind: str = "", arg=None
    ) -> None:
        """Send a protected request (fragmented if it must be) as our next message ID."""
        header = self._header(exchange, self.send_mid, False)
        _trace(self.trace_name, True, header, inner)
        self._send_request(self._seal(header, inner), now, kind, arg)

    def _respond(self, exchange: int, mid: int, inner: list[codec.Payload]) -> None:
        header = self._header(exchange, mid, True)
        _trace(self.trace_name, True, header, inner)
        self._send_response(mid, self._seal(header, inner))

    def _seal(self, header: codec.Header, inner: list[codec.Payload]) -> tuple[bytes, ...]:
        """One SK message, or SKF fragments (RFC 7383) when both ends support them and
        the message would exceed the connection's fragment_size as an IP datagram."""
        data = codec.seal_message(header, inner, self.out)
        limit = self._fragment_limit()
        if limit and len(data) > limit:
            return tuple(codec.seal_fragments(header, inner, self.out, limit))
        return (data,)

    def _fragment_limit(self) -> int:
        """The largest IKE message that fits fragment_size (0: do not fragment)."""
        conn = self.conn
        if conn is None or not conn.fragment_size or not self.peer_fragments:
            return 0
        ip_header = 20 if codec.ip_address(self.remote[0]).version == 4 else 40
        marker = 4 if self.nat_t else 0  # the non-ESP marker on the NAT-T port
        return conn.fragment_size - ip_header - 8 - marker

    def _follow(self, src: Address, esp: bool = False) -> None:
        """An authenticated message came from `src`: if that is not where this SA sends,
        the NAT in front of the peer mapped it anew (its entry expired, or the NAT
        restarted), and we follow, Child SAs too (RFC 7296 2.23). Without a NAT a new
        address is MOBIKE's business; with MOBIKE only ESP (`esp`) moves us so (RFC 4555
        3.8), IKE messages only by UPDATE_SA_ADDRESSES."""
        if src == self.remote or not self.nat or self.state != "established":
            return
        if self.mobike and not esp:
            return
        previous, self.remote = self.remote, src
        log.info("%s: the peer's NAT mapping moved from %s:%d to %s:%d",
                 self.conn.name, *previous, *src)  # fmt: skip
        self.child_remote = None  # ESP moved the Child SAs as well
        self.engine._event(IkeSaMoved(self.conn.name, self.spi_i, self.spi_r, src, previous))

    def _detect_nat(self, msg: codec.Message, spi_r: bytes) -> bool:
        """RFC 7296 2.23, from the peer's NAT_DETECTION notifies: a NAT in front of the
        peer (its source hash does not match what we see) or of us (the destination
        hash does not). Either way Child SAs are UDP-encapsulated; behind one, we keep
        its mapping alive (RFC 3948 keepalives). True if there is a NAT."""
        theirs, ours = self.engine._nat_mismatch(msg, self.spi_i, spi_r, self.remote)
        self.nat, self.behind_nat = theirs or ours, ours
        if ours and self.conn.keepalive:
            self.keepalive_at = self.engine.now + self.conn.keepalive
        return self.nat

    # ------------------------------------------------------------ initiator

    def start(self, now: float, group: int | None = None) -> None:
        conn = self.conn
        specs = self._ike_specs()
        group = group or specs[0].ke[0]
        # A retry with a COOKIE repeats the same request (the cookie is bound to its nonce
        # and SPI); a new group (INVALID_KE_PAYLOAD) needs a new key pair.
        if self.kx is None or self.kx.group != group:
            self.ke_group = group
            self.kx = crypto.key_exchange(group, allow_weak=conn.allow_weak)
            self.nonce_i = os.urandom(NONCE_SIZE)
        payloads: list[codec.Payload] = []
        if self.cookie:
            payloads.append(codec.Notify(type=NotifyType.COOKIE, data=self.cookie))
        payloads += [
            codec.SA(proposals=[s.to_proposal(i + 1) for i, s in enumerate(specs)]),
            codec.KE(group=self.ke_group, data=self.kx.public),
            codec.Nonce(data=self.nonce_i),
            *(self.engine._nat_notifies(self.spi_i, bytes(8), self.remote)
              if conn.nat_traversal else ()),
            codec.Notify(type=NotifyType.SIGNATURE_HASH_ALGORITHMS, data=SIGNATURE_HASHES),
        ]  # fmt: skip
        if conn.fragment_size:
            payloads.append(codec.Notify(type=NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        payloads.append(codec.Notify(type=NotifyType.CHILDLESS_IKEV2_SUPPORTED))  # RFC 6023
        self.send_mid = 0
        header = self._header(ExchangeType.IKE_SA_INIT, 0, False)
        _trace(conn.name, True, header, payloads)
        data = codec.encode_message(codec.Message(header, payloads))
        self.init_request = data
        self._send_request((data,), now)

    def _on_init_response(self, msg: codec.Message, data: bytes, now: float) -> None:
        conn = self.conn
        for notify in msg.all(codec.Notify):
            if notify.type == NotifyType.INVALID_KE_PAYLOAD and len(notify.data) == 2:
                (group,) = struct.unpack("!H", notify.data)
                offered = {g for spec in self._ike_specs() for g in spec.ke}
                if group in offered and group != self.ke_group:
                    log.info("%s: peer asks for KE group %d, retrying", conn.name, group)
                    self.start(now, group)
                    return
            if notify.type == NotifyType.COOKIE and not self.cookie:
                self.cookie = notify.data
                self.start(now, self.ke_group)
                return
            if notify.is_error:
                self._fail(f"peer refused IKE_SA_INIT: {notify_name(notify.type)}", notify.type)
                return
        sa, ke, nonce = msg.get(codec.SA), msg.get(codec.KE), msg.get(codec.Nonce)
        if not (sa and ke and nonce) or len(sa.proposals) != 1:
            self._fail("IKE_SA_INIT response lacks SA, KE or Nonce")
            return
        ours = [spec.to_proposal(i + 1) for i, spec in enumerate(self._ike_specs())]
        chosen = sa.proposals[0]
        if not proposal_acceptable(ours, chosen):
            self._fail(f"peer chose a proposal we did not offer: {describe(chosen)}")
            return
        self.request = None
        self.spi_r = msg.header.spi_r
        self.peer_fragments = bool(msg.notifies(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        self.peer_childless = bool(msg.notifies(NotifyType.CHILDLESS_IKEV2_SUPPORTED))
        self.peer_sig_hashes = _announced_hashes(msg)
        self.engine._index(self)
        if conn.nat_traversal and self._detect_nat(msg, self.spi_r):
            # RFC 7296 2.23: behind a NAT (or a peer that says so, like strongSwan's
            # libipsec), continue on the NAT-T port with the non-ESP marker.
            log.info("%s: NAT detected, moving to port %d", conn.name, NAT_T_PORT)
            self.remote = (self.remote[0], NAT_T_PORT)
            self.nat_t = True
        self.init_response = data
        self.nonce_r = nonce.data
        self._derive(chosen, ke, msg)
        if self.state == "failed":
            return
        if not conn.children and not self.peer_childless:
            self._fail(
                "connection has no Child SA to negotiate and the peer does not support "
                "IKE_AUTH without one (RFC 6023 CHILDLESS_IKEV2_SUPPORTED)"
            )
            return
        self._send_auth_request(now)

    def _derive(self, chosen: codec.Proposal, ke: codec.KE, msg: codec.Message) -> None:
        group = next((t.id for t in chosen.transforms if t.type == TransformType.KE), None)
        try:
            if group != ke.group or ke.group != self.kx.group:
                raise crypto.IkeCryptoError("KE payload group differs from the chosen group")
            shared = self.kx.shared_secret(ke.data)
            self.prf, encr, integ = negotiated_suite(chosen, self.conn.allow_weak)
        except (crypto.IkeCryptoError, KeyError) as exc:
            self._fail(f"cannot use the negotiated suite: {exc}")
            return
        self.chosen_ike = chosen
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: selected IKE proposal %s %s", self.trace_name, describe(chosen),
                      f"{self.spi_i.hex()}_i {self.spi_r.hex()}_r")  # fmt: skip
        self.keys = crypto.derive_ike_keys(
            self.prf, encr, integ, shared, self.nonce_i, self.nonce_r, self.spi_i, self.spi_r
        )
        self.out, self.inbound = crypto.sk_ciphers(self.keys, encr, integ, self.initiator)

    def _child_specs(self, params: ChildParams):
        """A child's configured ESP or AH proposals, parsed."""
        return [
            parse_proposal_string(p, params.protocol, allow_weak=self.conn.allow_weak)
            for p in params.proposals
        ]

    def _child_offer(self, params: ChildParams) -> list[codec.Proposal]:
        """A child's proposals as it offers them (numbered, without SPI)."""
        return [spec.to_proposal(i + 1) for i, spec in enumerate(self._child_specs(params))]

    def _offers(self, params: ChildParams, chosen: codec.Proposal, pfs: bool = True) -> bool:
        """Whether the proposal a responder chose for a child is one we offered: else it
        could pick any algorithm, or AH for ESP, and we would install it. Without a key
        exchange (`pfs` False: the child of IKE_AUTH, RFC 7296 1.2) KE transforms are
        not negotiated, and the responder drops them from its answer."""
        ours = self._child_offer(params)
        if not pfs:
            ours = [_without_ke(p) for p in ours]
            chosen = _without_ke(chosen)
        return proposal_acceptable(ours, chosen)

    def _acceptable_answer(self, params: ChildParams, chosen, tsi, tsr, pfs: bool) -> str:
        """Why the responder's Child SA is not one we asked for, or "": a proposal we
        offered, selectors within ours (else a peer could widen the policies keywayd
        installs from them, pulling traffic meant elsewhere into its tunnel)."""
        if not self._offers(params, chosen, pfs=pfs):
            return "the peer chose a proposal we did not offer: " + describe(chosen)
        if not (within(tsi.selectors, params.local_ts) and within(tsr.selectors, params.remote_ts)):
            return (
                f"the peer's traffic selectors {', '.join(ts_to_prefixes(tsi.selectors))} === "
                f"{', '.join(ts_to_prefixes(tsr.selectors))} are not within ours"
            )
        return ""

    def _refuse_chosen_child(self, params: ChildParams, chosen, our_spi: bytes, why: str, now):
        """The responder made a Child SA we did not ask for (`why`): nothing of it is
        installed, and a Delete of its SPI pair tells the peer to drop its half."""
        reason = f"child {params.name}: {why}"
        log.warning("%s: %s", self.conn.name, reason)
        self.engine._event(NegotiationFailed(self.conn.name, reason))
        # The peer's half is of the protocol it chose, if that is one a Child SA can be.
        protocol = chosen.protocol
        if protocol not in (ProtocolId.ESP, ProtocolId.AH):
            protocol = _protocol_id(params.protocol)
        self.queue("refuse_child", now, (protocol, int.from_bytes(our_spi, "big")))

    def _child_sa_payloads(self, params: ChildParams, number_from: int = 1) -> codec.SA:
        specs = self._child_specs(params)
        self.child_spi = self.engine.allocate_spi(self, params.name, params.protocol)
        return codec.SA(
            proposals=[s.to_proposal(i + number_from, self.child_spi) for i, s in enumerate(specs)]
        )

    def _auth_payloads(
        self, conn: IkeConnection, id_payload, message: bytes, peer_nonce: bytes, sk_p: bytes
    ) -> list[codec.Payload]:
        """CERT(s) and AUTH proving our identity (RFC 7296 2.15, RFC 7427)."""
        if conn.auth == "pubkey":
            octets = crypto.signed_octets(
                self.prf, message, peer_nonce, sk_p, id_payload.encode_body()
            )
            scheme, hash_name = _signature_scheme(conn.private_key, self.peer_sig_hashes)
            method, data = crypto.sign_auth(conn.private_key, octets, scheme, hash_name)
            return [
                *(codec.CERT(kind=certs.X509_SIGNATURE, data=c) for c in conn.certs),
                codec.AUTH(kind=method, data=data),
            ]
        auth = crypto.psk_auth(
            self.prf, conn.psks[self.psk_index], message, peer_nonce, sk_p,
            id_payload.encode_body(),
        )  # fmt: skip
        return [codec.AUTH(kind=AuthMethod.PSK, data=auth)]

    def _verify_auth(
        self,
        conn: IkeConnection,
        inner: list[codec.Payload],
        id_payload,
        auth: codec.AUTH,
        message: bytes,
        nonce: bytes,
        sk_p: bytes,
    ) -> str | None:
        """None if the peer's AUTH proves `id_payload`, else the precise reason."""
        if conn.auth == "pubkey":
            chain = [
                p.data
                for p in inner
                if isinstance(p, codec.CERT) and p.kind == certs.X509_SIGNATURE
            ]
            octets = crypto.signed_octets(self.prf, message, nonce, sk_p, id_payload.encode_body())
            try:
                key = certs.verify_peer(
                    chain,
                    list(conn.cacerts),
                    id_payload.to_text(),
                    self.engine.wall_clock(),
                    crls=conn.crls,
                    revocation=conn.revocation,
                    fetched=(self.engine.revocation_cache, self.engine.now),
                )
                scheme = crypto.verify_signature_auth(
                    key, auth.kind, auth.data, octets, conn.allow_weak
                )
            except crypto.IkeCryptoError as exc:
                return str(exc)
            except certs.RevocationPending as pending:
                # Fetch only for a peer that holds the certificate's key: certificates are
                # public, and anyone could send one to make us fetch.
                try:
                    crypto.verify_signature_auth(
                        certs.leaf_public_key(chain), auth.kind, auth.data, octets,
                        conn.allow_weak,
                    )  # fmt: skip
                except crypto.IkeCryptoError as exc:
                    return str(exc)
                self.engine._want_revocation(conn.name, pending.fetches)
                raise
            if conn.peer_signatures and scheme not in conn.peer_signatures:
                accepted = ", ".join(conn.peer_signatures)
                return f"the peer signed with {scheme}; remote auth accepts {accepted}"
            return None
        if auth.kind != AuthMethod.PSK:
            return f"peer authenticates with method {auth.kind}, connection expects a PSK"
        # A responder accepts any PSK of a rotation (and answers with the one that
        # verified); an initiator expects the one it sent.
        tried = range(len(conn.psks)) if not self.initiator else (self.psk_index,)
        for index in tried:
            if crypto.verify_psk_auth(
                self.prf, conn.psks[index], auth.data, message, nonce, sk_p,
                id_payload.encode_body(),
            ):  # fmt: skip
                self.psk_index = index
                return None
        older = f" nor its {len(tried) - 1} previous one(s)" if len(tried) > 1 else ""
        return f"AUTH does not verify with the PSK of connection {conn.name!r}{older}"

    def _send_auth_request(self, now: float) -> None:
        conn = self.conn
        id_type, id_data = encode_id(conn.local_id)
        idi = codec.IDi(id_type=id_type, data=id_data)
        inner: list[codec.Payload] = [
            idi,
            *self._auth_payloads(conn, idi, self.init_request, self.nonce_r, self.keys.sk_pi),
            codec.IDr(*encode_id(conn.remote_id)),
        ]
        if not self.engine._established_with(conn.name, conn.remote_id, self):
            # Our first IKE SA with this peer: whatever it still holds from us is stale
            # (we restarted), and may go (RFC 7296 2.4).
            inner.append(codec.Notify(type=NotifyType.INITIAL_CONTACT))
        if conn.auth == "pubkey" and conn.cacerts:
            inner.append(
                codec.CERTREQ(
                    kind=certs.X509_SIGNATURE, data=certs.certreq_data(list(conn.cacerts))
                )
            )
        if conn.children:
            params = self.child_params = conn.children[0]
            if params.mode == "transport":
                inner.append(codec.Notify(type=NotifyType.USE_TRANSPORT_MODE))
            inner += [
                self._child_sa_payloads(params),
                codec.TSi(selectors=[_ts_from_prefix(p) for p in params.local_ts]),
                codec.TSr(selectors=[_ts_from_prefix(p) for p in params.remote_ts]),
            ]
        self._set_state(SaState.AUTH)
        self._request(ExchangeType.IKE_AUTH, inner, now)

    def _on_auth_response(self, inner: list[codec.Payload], now: float) -> None:
        conn = self.conn
        request, self.request = self.request, None
        notifies = [p for p in inner if isinstance(p, codec.Notify)]
        if any(n.type == NotifyType.AUTHENTICATION_FAILED for n in notifies):
            if conn.auth == "psk" and self.psk_index + 1 < len(conn.psks):
                self._retry_with_previous_psk(now)
                return
            self._auth_failed("peer reports AUTHENTICATION_FAILED (wrong PSK or identity?)")
            return
        idr = next((p for p in inner if isinstance(p, codec.IDr)), None)
        auth = next((p for p in inner if isinstance(p, codec.AUTH)), None)
        if idr is None or auth is None:
            self._refuse_responder("IKE_AUTH response lacks IDr or AUTH", now)
            return
        if idr.to_text() != conn.remote_id:
            self._refuse_responder(
                f"peer identity {idr.to_text()!r} is not {conn.remote_id!r}", now
            )
            return
        try:
            reason = self._verify_auth(
                conn, inner, idr, auth, self.init_response, self.nonce_i, self.keys.sk_pr
            )
        except certs.RevocationPending:
            # Our retransmission brings the peer's answer again, once the revocation data
            # (CRLs, OCSP) is here.
            self.request = request
            return
        if reason:
            self._refuse_responder(f"responder: {reason}", now)
            return
        self.remote_id = idr.to_text()
        older = self._older_with_peer() if conn.unique == "replace" else []
        self._up(now)
        self._replace_older(older, now)
        for params in conn.children[1:]:  # the others on CREATE_CHILD_SA (RFC 7296 1.3.1)
            self.queue("create_child", now, params)
        if self.child_params is None:
            self._next_pending(now)
            return
        errors = [n for n in notifies if n.is_error]
        sa = next((p for p in inner if isinstance(p, codec.SA)), None)
        tsi = next((p for p in inner if isinstance(p, codec.TSi)), None)
        tsr = next((p for p in inner if isinstance(p, codec.TSr)), None)
        if errors or not (sa and tsi and tsr) or len(sa.proposals) != 1:
            reason = notify_name(errors[0].type) if errors else "no child SA in the response"
            self.engine._event(
                NegotiationFailed(conn.name, f"child {self.child_params.name}: {reason}")
            )
        elif why := self._acceptable_answer(self.child_params, sa.proposals[0], tsi, tsr, False):
            self._refuse_chosen_child(self.child_params, sa.proposals[0], self.child_spi, why, now)
        else:
            self._child_ready(
                sa.proposals[0],
                tsi.selectors,
                tsr.selectors,
                any(n.type == NotifyType.USE_TRANSPORT_MODE for n in notifies),
            )
        self._next_pending(now)

    def _refuse_responder(self, reason: str, now: float) -> None:
        """We do not accept the responder's authentication: tell it in an INFORMATIONAL
        with AUTHENTICATION_FAILED (RFC 7296 2.21.2), so that it drops the IKE SA and
        Child SA it holds for us, and forget ours. Sent once: nothing of ours waits
        for the answer."""
        self._request(
            ExchangeType.INFORMATIONAL,
            [codec.Notify(type=NotifyType.AUTHENTICATION_FAILED)],
            now,
        )
        self._auth_failed(reason)

    def _retry_with_previous_psk(self, now: float) -> None:
        """The peer refused our PSK: during a rotation it may not hold the newest one yet.
        A new IKE SA tries the next older PSK; this one ends without a failure event."""
        log.info(
            "%s: peer refused PSK %d of %d (not rotated yet?); trying the previous one",
            self.conn.name,
            self.psk_index + 1,
            len(self.conn.psks),
        )
        retry = self.engine.initiate(self.conn.name, now, psk_index=self.psk_index + 1)
        retry.reauth_of = self.reauth_of
        self._discard()

    def _child_ready(
        self,
        chosen: codec.Proposal,
        tsi,
        tsr,
        transport: bool,
        *,
        exchange_initiator: bool | None = None,
        nonces: tuple[bytes, bytes] | None = None,
        shared: bytes = b"",
        params: ChildParams | None = None,
        my_spi: bytes | None = None,
        rekeyed_from: int = 0,
        redundant: bool = False,
    ) -> ChildSaReady:
        """Derive and announce a Child SA. For IKE_AUTH the roles and nonces are the IKE
        SA's; for CREATE_CHILD_SA they are the exchange's own (RFC 7296 2.17)."""
        i_side = self.initiator if exchange_initiator is None else exchange_initiator
        ni, nr = nonces or (self.nonce_i, self.nonce_r)
        by_type = {t.type: t for t in chosen.transforms}
        encr_t, integ_t = by_type.get(TransformType.ENCR), by_type.get(TransformType.INTEG)
        _unused, encr, integ = negotiated_suite(chosen, self.conn.allow_weak)
        keys = crypto.derive_child_keys(self.prf, self.keys.sk_d, encr, integ, ni, nr, shared)
        esn = by_type.get(TransformType.ESN)
        local, remote = (tsi, tsr) if i_side else (tsr, tsi)
        if log.isEnabledFor(logging.DEBUG):  # the trace's arguments cost more than a setup's HMACs
            log.debug(
                "%s: selected %s proposal %s, TS %s === %s %s", self.trace_name,
                _protocol_name(chosen.protocol).upper(), describe(chosen),
                ", ".join(ts_to_prefixes(local)), ", ".join(ts_to_prefixes(remote)),
                f"{self.spi_i.hex()}_i {self.spi_r.hex()}_r",
            )  # fmt: skip
        key_out, ik_out, key_in, ik_in = (
            (keys.encr_i, keys.integ_i, keys.encr_r, keys.integ_r)
            if i_side
            else (keys.encr_r, keys.integ_r, keys.encr_i, keys.integ_i)
        )
        params = params or self.child_params
        child = ChildSaReady(
            connection=self.conn.name,
            child=params.name,
            protocol=_protocol_name(chosen.protocol),
            mode="transport" if transport else "tunnel",
            spi_in=int.from_bytes(my_spi or self.child_spi, "big"),
            spi_out=int.from_bytes(chosen.spi, "big"),
            local_ts=ts_to_prefixes(local),
            remote_ts=ts_to_prefixes(remote),
            proposal=describe(chosen),
            encr_id=encr_t.id if encr_t else 0,  # AH: none
            encr_key_bits=encr_t.key_length if encr_t else None,
            integ_id=integ_t.id if integ_t else IntegId.NONE,
            key_out=key_out,
            integ_key_out=ik_out,
            key_in=key_in,
            integ_key_in=ik_in,
            esn=bool(esn and esn.id == EsnId.ESN),
            rekeyed_from=rekeyed_from,
            local_address=self.engine.local[0],
            remote_address=self.remote[0],
            peer_initial_contact=self.peer_initial_contact,
            udp_encap=self.nat or self.nat_t,
            encap_port=self.remote[1] if self.nat_t else NAT_T_PORT,
            ike_initiator=self.initiator,
            initiated=i_side,
            redundant=redundant,
        )
        self._add_child(child)
        return child

    # ------------------------------------------------------------ CREATE_CHILD_SA

    def _params_of(self, child: ChildSaReady) -> ChildParams:
        return next((c for c in self.conn.children if c.name == child.child), self.conn.children[0])

    def _send_child_request(
        self, params: ChildParams, now: float, old_spi: int = 0, group: int | None = None
    ) -> None:
        """CREATE_CHILD_SA for a new Child SA of `params`, or (old_spi) to rekey one;
        with PFS, the KE payload is in `group` (default: the first proposal's)."""
        old = self.children.get(old_spi)
        specs = self._child_specs(params)
        new_spi = self.engine.allocate_spi(self, params.name, params.protocol)
        nonce = os.urandom(NONCE_SIZE)
        kx = None
        inner: list[codec.Payload] = []
        if old is not None:
            inner.append(
                codec.Notify(
                    type=NotifyType.REKEY_SA,
                    protocol=_protocol_id(old.protocol),
                    spi=struct.pack("!I", old_spi),
                )
            )
        if (old.mode if old is not None else params.mode) == "transport":
            inner.append(codec.Notify(type=NotifyType.USE_TRANSPORT_MODE))
        inner += [
            codec.SA(proposals=[s.to_proposal(i + 1, new_spi) for i, s in enumerate(specs)]),
            codec.Nonce(data=nonce),
        ]
        if specs[0].ke:  # PFS: a KE payload in the first proposal's group
            kx = crypto.key_exchange(group or specs[0].ke[0], allow_weak=self.conn.allow_weak)
            inner.append(codec.KE(group=kx.group, data=kx.public))
        local_ts, remote_ts = (
            (old.local_ts, old.remote_ts)
            if old is not None
            else (params.local_ts, params.remote_ts)
        )
        inner += [
            codec.TSi(selectors=[_ts_from_prefix(p) for p in local_ts]),
            codec.TSr(selectors=[_ts_from_prefix(p) for p in remote_ts]),
        ]
        self._request(
            ExchangeType.CREATE_CHILD_SA,
            inner,
            now,
            "rekey_child" if old is not None else "create_child",
            (old_spi, new_spi, nonce, kx, params),
        )

    def _on_child_response(self, inner: list[codec.Payload], now: float) -> None:
        req, self.request = self.request, None
        spi_in, new_spi, ni, kx, params = req.arg
        what = "child rekey" if spi_in else f"child {params.name}"
        errors = errors_of(inner)
        sa = next((p for p in inner if isinstance(p, codec.SA)), None)
        nonce = next((p for p in inner if isinstance(p, codec.Nonce)), None)
        tsi = next((p for p in inner if isinstance(p, codec.TSi)), None)
        tsr = next((p for p in inner if isinstance(p, codec.TSr)), None)
        ke = next((p for p in inner if isinstance(p, codec.KE)), None)
        offered = [g for spec in self._child_specs(params) for g in spec.ke]
        group = self._asked_group(errors, kx, offered)
        if group is not None and (not spi_in or spi_in in self.children):
            log.info("%s: %s: peer asks for KE group %d, retrying", self.conn.name, what, group)
            self._send_child_request(params, now, spi_in, group)
            return
        collision = self.child_collisions.pop(spi_in, None) if spi_in else None
        if errors or not (sa and nonce and tsi and tsr) or len(sa.proposals) != 1:
            name = notify_name(errors[0].type) if errors else "incomplete response"
            refused = {n.type for n in errors}
            if spi_in and spi_in not in self.children:
                log.info("%s: %s refused (%s); the Child SA is gone", self.conn.name, what, name)
            elif collision is not None:
                # The peer's rekey of the same Child SA won before ours reached it.
                log.info("%s: %s collided and lost (%s)", self.conn.name, what, name)
                self.rekeyed_children.add(spi_in)
            elif spi_in and NotifyType.TEMPORARY_FAILURE in refused:
                self._retry_child_rekey(spi_in, now)
            elif NotifyType.TEMPORARY_FAILURE in refused:
                # A new Child SA the peer cannot make now (it is deleting or rekeying
                # one): asked again later, or a `start` child lost that way never came
                # back (issue 14, item 20).
                delay = self.engine.rng.uniform(*RETRY_DELAY)
                log.info("%s: %s: peer busy; asking again in %.0f s", self.conn.name, what, delay)
                self.create_retry[params.name] = now + delay
            elif spi_in and NotifyType.CHILD_SA_NOT_FOUND in refused:
                if self._peer_may_not_hold_yet(spi_in):
                    self._retry_child_rekey(spi_in, now)
                else:
                    self._replace_lost_child(spi_in, now)
            else:
                self.engine._event(NegotiationFailed(self.conn.name, f"{what}: {name}"))
        elif why := self._acceptable_answer(params, sa.proposals[0], tsi, tsr, kx is not None):
            self._refuse_chosen_child(params, sa.proposals[0], new_spi, why, now)
        else:
            try:
                shared = kx.shared_secret(ke.data) if kx and ke else b""
            except crypto.IkeCryptoError as exc:
                self.engine._event(NegotiationFailed(self.conn.name, f"{what}: {exc}"))
            else:
                transport = any(
                    isinstance(p, codec.Notify) and p.type == NotifyType.USE_TRANSPORT_MODE
                    for p in inner
                )
                # Both ends rekeyed it at once? The SA made with the lowest of the four
                # nonces is redundant, and its maker deletes it (RFC 7296 2.8.1); the
                # winner deletes the old one.
                lost = collision is not None and min(ni, nonce.data) < collision[1]
                child = self._child_ready(
                    sa.proposals[0],
                    tsi.selectors,
                    tsr.selectors,
                    transport,
                    exchange_initiator=True,
                    nonces=(ni, nonce.data),
                    shared=shared,
                    params=params,
                    my_spi=new_spi,
                    rekeyed_from=spi_in,
                    redundant=lost,
                )
                if lost:
                    log.info("%s: Child SA rekey collision lost", self.conn.name)
                    self._retire_child(child.spi_in, REDUNDANT_CHILD, now)
                    if spi_in in self.children:
                        self.rekeyed_children.add(spi_in)  # the winner deletes it
                elif spi_in:  # make-before-break: the new SA is announced; retire the old
                    if collision is not None:  # we won: the peer's new SA is the loser
                        self.losing_children.add(collision[0])
                    self._retire_child(spi_in, "deleted by us", now)
        self._next_pending(now)

    @staticmethod
    def _asked_group(errors: list[codec.Notify], kx, offered: list[int]) -> int | None:
        """The KE group an INVALID_KE_PAYLOAD asks for, if we offered it and did not
        just use it (else the refusal stands: no retry loop)."""
        for notify in errors:
            if notify.type == NotifyType.INVALID_KE_PAYLOAD and len(notify.data) == 2:
                (group,) = struct.unpack("!H", notify.data)
                if group in offered and (kx is None or kx.group != group):
                    return group
        return None

    def _retire_child(self, spi_in: int, reason: str, now: float) -> None:
        """Delete a Child SA before any other queued work."""
        if spi_in in self.children:
            self.queue("delete_child", now, spi_in, urgent=True)
            self.deleting_children[spi_in] = reason

    def _retry_child_rekey(self, spi_in: int, now: float) -> None:
        """The peer is busy with the Child SA (TEMPORARY_FAILURE): try again a little
        later, as strongSwan does, unless something else replaces it first."""
        delay = self.engine.rng.uniform(*RETRY_DELAY)
        log.info(
            "%s: Child SA %08x busy at the peer; rekey again in %.0f s",
            self.conn.name,
            spi_in,
            delay,
        )
        timers = self.child_timers.get(spi_in)
        self.child_timers[spi_in] = LifetimeSchedule(
            now + delay, timers.expire_at if timers else None
        )

    def _peer_may_not_hold_yet(self, spi_in: int) -> bool:
        """We made this Child SA answering the peer's rekey, and the SA it replaces is
        still here: the peer has not deleted it, so our answer may not have reached it
        yet (bench/soak.py: 47 s of lost answers; our rekey of the new SA then met
        CHILD_SA_NOT_FOUND, and we replaced an SA the peer was about to hold)."""
        child = self.children.get(spi_in)
        return child is not None and not child.initiated and child.rekeyed_from in self.children

    def _replace_lost_child(self, spi_in: int, now: float) -> None:
        """The peer does not know a Child SA we hold (CHILD_SA_NOT_FOUND, INVALID_SPI): it
        is useless, so delete it (whatever half the peer still has goes too) and negotiate
        a new one in its place."""
        log.warning("%s: peer lost Child SA %08x; creating a new one", self.conn.name, spi_in)
        params = self._params_of(self.children[spi_in])
        self._retire_child(spi_in, "peer lost it", now)
        self.queue("create_child", now, params)

    def _peer_holds_it(self, now: float) -> None:
        """The peer sent on this SA, or answered us on it: it holds the SA established."""
        if self.peer_holds or self.state != "established":
            return
        self.peer_holds = True
        self.engine._event(IkeSaConfirmed(self.conn.name, self.spi_i, self.spi_r))
        if self.duplicate_waits and not self.superseded:
            self.duplicate_waits = False
            self._settle_duplicates(now)

    def _release(self, now: float) -> None:
        """The old IKE SA is gone (or long enough ago replaced): send on this one."""
        self.wait_for = self.wait_until = None
        self._next_pending(now)
        self.engine._touch(self)

    def _next_pending(self, now: float) -> None:
        if self.wait_for is not None:
            return
        if self.pending and self.state == "established":
            kind, arg = self.pending.pop(0)
            self.queue(kind, now, arg)
        elif self.reauth_of is not None and self.request is None and not self.pending:
            self._reauthentication_done(now)

    def _peer_may_have_restarted(self, now: float) -> None:
        """The peer answered a request on this IKE SA with an unprotected INVALID_IKE_SPI:
        it may have restarted and lost the SA, and then our request would go unanswered
        for the whole retransmission schedule (minutes) before the peer counts as dead.
        The answer proves nothing, so nothing is deleted on its word: a new IKE SA is
        negotiated make-before-break (a reauthentication). If the peer did forget this
        SA, the new one replaces it within a round trip or two; if the answer was
        spoofed, a working IKE SA is replaced by another. Once per SA."""
        if self.peer_forgot or self.superseded or self.reauth_of is not None:
            return
        if any(
            sa.successor is self and sa.state == "established"
            for sa in self.engine.sas_of(self.conn.name)
        ):
            # This SA comes from the peer's IKE rekey, and the peer has not deleted the
            # SA it replaced: our answer has not reached it yet (it retransmits its
            # request and gets it again). Our request waits for it; nothing restarted.
            return
        self.peer_forgot = True
        if any(sa.reauth_of is self for sa in self.engine.sas_of(self.conn.name)):
            return  # a reauthentication is already on its way
        if self.newer_with_peer():
            # The peer authenticated a newer IKE SA with us since: it did not restart,
            # it dropped this older one (a reauthentication's race). Nothing to renew:
            # this one ends quietly when its request times out.
            self.redundant = "replaced by a newer IKE SA with the peer"
            return
        log.info("%s: the peer says it does not know this IKE SA (restarted?): "
                 "negotiating a new one", self.conn.name)  # fmt: skip
        self.engine.reauthenticate(self, now)

    def newer_with_peer(self) -> list[IkeSa]:
        """This connection's IKE SAs with the same peer authenticated after this one (or
        the SA it rekeys, for a rekey authenticates nothing): the peer reauthenticated it
        and deletes it, so renewing it would leave two."""
        return [
            sa
            for sa in self.engine._established_with(self.conn.name, self.remote_id, self)
            if (sa.authenticated_at or 0.0) > (self.authenticated_at or 0.0)
        ]

    def _reauthentication_done(self, now: float) -> None:
        """Make-before-break reauthentication: this IKE SA and its children are up, so
        the one it replaces goes now (RFC 7296 2.8.3)."""
        old, self.reauth_of = self.reauth_of, None
        if old.state != "established":
            return
        if old.children and not self.children:
            # Nothing came up on the new SA: keep the old one (and its traffic) rather
            # than trade a working tunnel for an empty IKE SA.
            self.engine._event(
                NegotiationFailed(self.conn.name, "reauthentication: no Child SA came up")
            )
            self.queue("delete_ike", now)
            return
        log.info("%s: reauthenticated; deleting the old IKE SA", self.conn.name)
        old.reauthenticated = True
        old.pending = [p for p in old.pending if p[0] == "delete_ike"] or [("delete_ike", None)]
        if old.peer_forgot and old.request is not None and old.request.kind != "delete_ike":
            # The peer said it lost the old SA: the request it left unanswered would be
            # retransmitted for minutes before the Delete could go.
            old.request = None
        if old.request is None:
            old._next_pending(now)
        self.engine._touch(old)

    # IKE SA rekey (RFC 7296 2.18): a new IKE SA takes over the Child SAs, then the
    # rekey's initiator deletes the old one.

    def _ike_specs(self):
        return _ike_specs_of(self.conn)

    def _send_rekey_ike(self, now: float, group: int | None = None) -> None:
        specs = self._ike_specs()
        new_spi = os.urandom(8)
        nonce = os.urandom(NONCE_SIZE)
        kx = crypto.key_exchange(group or specs[0].ke[0], allow_weak=self.conn.allow_weak)
        inner = [
            codec.SA(proposals=[s.to_proposal(i + 1, new_spi) for i, s in enumerate(specs)]),
            codec.Nonce(data=nonce),
            codec.KE(group=kx.group, data=kx.public),
        ]
        self._request(ExchangeType.CREATE_CHILD_SA, inner, now, "rekey_ike", (new_spi, nonce, kx))

    def _successor(
        self,
        initiator: bool,
        spi_i: bytes,
        spi_r: bytes,
        chosen: codec.Proposal,
        shared: bytes,
        ni: bytes,
        nr: bytes,
    ) -> IkeSa | None:
        """The IKE SA that replaces this one, keyed from the old SK_d. It holds no Child
        SA until _hand_over (a collision may make it redundant first)."""
        new = IkeSa(self.engine, self.conn, initiator, self.remote, spi_i, spi_r)
        try:
            prf, encr, integ = negotiated_suite(chosen, self.conn.allow_weak)
        except (crypto.IkeCryptoError, KeyError) as exc:
            log.warning("%s: IKE rekey with an unusable suite: %s", self.conn.name, exc)
            return None
        new.prf, new.chosen_ike, new.remote_id = prf, chosen, self.remote_id
        new.nonce_i, new.nonce_r = ni, nr
        new.keys = crypto.derive_rekeyed_ike_keys(
            self.prf, self.keys.sk_d, prf, encr, integ, shared, ni, nr, spi_i, spi_r
        )
        new.out, new.inbound = crypto.sk_ciphers(new.keys, encr, integ, initiator)
        new._set_state(SaState.ESTABLISHED)
        new.established_at = self.engine.now
        new.peer_holds = initiator
        new.authenticated_at = self.authenticated_at  # a rekey authenticates nothing
        new.peer_fragments, new.nat = self.peer_fragments, self.nat
        new.behind_nat, new.nat_t = self.behind_nat, self.nat_t
        new.keepalive_at = self.keepalive_at
        new.child_params = self.child_params
        self.engine._index(new)
        return new

    def _hand_over(self, new: IkeSa, now: float) -> None:
        """The rekey is settled: `new` carries this SA's children and queued work on."""
        new.children, self.children = self.children, {}
        new.child_timers, self.child_timers = self.child_timers, {}
        new.rekeyed_children, self.rekeyed_children = self.rekeyed_children, set()
        new.overdue_children, self.overdue_children = self.overdue_children, set()
        new.losing_children, self.losing_children = self.losing_children, set()
        new.deleting_children, self.deleting_children = self.deleting_children, {}
        new.expired_children, self.expired_children = self.expired_children, set()
        new.create_retry, self.create_retry = self.create_retry, {}
        new.pending = [p for p in self.pending if p[0] not in ("delete_ike", "rekey_ike")]
        self.pending = []
        self.replaced = True
        self.successor = new
        new._schedule_lifetimes(now, reauth_at=self.reauth_at)
        self.rekey_at = self.reauth_at = self.expire_at = None  # on its way out
        for sa in self.engine.sas_of(self.conn.name):
            if sa.reauth_of is self:  # under way still (its IKE_AUTH answer lost, say)
                sa.reauth_of = new  # it replaces whatever carries the role by then
        if not new.initiator:
            new.wait_for, new.wait_until = self, now + REDUNDANT_GRACE
            self.delete_at = now + REKEYED_DELETE_TIMEOUT  # the peer's to delete
        self.engine._event(
            IkeSaRekeyed(
                self.conn.name,
                self.spi_i,
                self.spi_r,
                new.spi_i,
                new.spi_r,
                describe(new.chosen_ike),
            )
        )
        new._next_pending(now)
        self.engine._touch(new)

    def _on_rekey_ike_response(self, inner: list[codec.Payload], now: float) -> None:
        req, self.request = self.request, None
        new_spi, ni, kx = req.arg
        errors = errors_of(inner)
        group = self._asked_group(errors, kx, [g for s in self._ike_specs() for g in s.ke])
        if group is not None and not self.superseded:
            log.info("%s: IKE rekey: peer asks for KE group %d, retrying", self.conn.name, group)
            self._send_rekey_ike(now, group)
            return
        collision, self.ike_collision = self.ike_collision, None
        if collision is not None and collision[0].state != "established":
            collision = None  # the peer deleted its new SA already: it lost
        sa = next((p for p in inner if isinstance(p, codec.SA)), None)
        nonce = next((p for p in inner if isinstance(p, codec.Nonce)), None)
        ke = next((p for p in inner if isinstance(p, codec.KE)), None)
        ours = [s.to_proposal(i + 1) for i, s in enumerate(self._ike_specs())]
        new = None
        if (
            errors
            or not (sa and nonce and ke)
            or len(sa.proposals) != 1
            or len(sa.proposals[0].spi) != 8
            or not proposal_acceptable(
                ours,
                codec.Proposal(
                    sa.proposals[0].number,
                    sa.proposals[0].protocol,
                    b"",
                    sa.proposals[0].transforms,
                ),
            )
        ):
            name = notify_name(errors[0].type) if errors else "unusable response"
            if collision is not None:
                log.info("%s: IKE rekey collided and lost (%s)", self.conn.name, name)
            elif self.superseded:
                log.info("%s: IKE rekey refused (%s); it is replaced already", self.conn.name, name)
            elif any(n.type == NotifyType.TEMPORARY_FAILURE for n in errors):
                delay = self.engine.rng.uniform(*RETRY_DELAY)
                log.info("%s: peer busy; IKE rekey again in %.0f s", self.conn.name, delay)
                self.ike_rekey_retry_at = now + delay
            else:
                self.engine._event(NegotiationFailed(self.conn.name, f"IKE rekey: {name}"))
        else:
            try:
                shared = kx.shared_secret(ke.data)
            except crypto.IkeCryptoError as exc:
                self.engine._event(NegotiationFailed(self.conn.name, f"IKE rekey: {exc}"))
            else:
                chosen = sa.proposals[0]
                new = self._successor(True, new_spi, chosen.spi, chosen, shared, ni, nonce.data)
        if new is not None and self.reauthenticated:
            # A reauthentication replaced this SA while its rekey waited for an answer
            # (lost, retransmitted): the reauthentication's SA carries the children, so
            # the rekey's is surplus. Kept, it stayed beside the other for good.
            log.info("%s: IKE SA rekeyed after its reauthentication: deleting the new one",
                     self.conn.name)  # fmt: skip
            new.redundant = SURPLUS_REKEY
            new.queue("delete_ike", now)
            self.engine._touch(new)
            self._next_pending(now)  # this SA's own Delete
            return
        if new is not None and self.replaced:
            # The peer's colliding rekey was settled while ours waited for this answer:
            # the peer used its new SA, so that one carries the children, and ours,
            # made with the peer's answer, is redundant (RFC 7296 2.8.2).
            log.info("%s: IKE SA rekey collision lost", self.conn.name)
            new.redundant = REDUNDANT_IKE
            new.queue("delete_ike", now)
            self.engine._touch(new)
            self._next_pending(now)
            return
        winner = new
        if collision is not None:
            # Both ends rekeyed this IKE SA at once: the new SA made with the lowest of
            # the four nonces is redundant and its maker deletes it; the winner's maker
            # deletes the old one (RFC 7296 2.8.2).
            theirs, their_nonce = collision
            if new is not None and min(ni, nonce.data) > their_nonce:
                log.info("%s: IKE SA rekey collision won", self.conn.name)
                # The peer deletes its redundant SA; if it cannot (the old SA went
                # before its answer came), we do, after a grace period.
                theirs.redundant = REDUNDANT_IKE
                theirs.delete_at = now + REDUNDANT_GRACE
                self.engine._touch(theirs)
            else:
                if new is not None:
                    log.info("%s: IKE SA rekey collision lost", self.conn.name)
                    new.redundant = REDUNDANT_IKE
                    new.queue("delete_ike", now)
                    self.engine._touch(new)
                winner = theirs
        if winner is None:
            self._next_pending(now)
            return
        self._hand_over(winner, now)
        if winner is new:  # we made the surviving SA: the old one is ours to delete
            self.pending = [("delete_ike", None)]
            self._next_pending(now)

    def _responder_ke(self, group: int, ke, refuse):
        """(our key pair, shared secret) for a CREATE_CHILD_SA KE payload, or None after
        answering INVALID_KE_PAYLOAD (wrong group) or INVALID_SYNTAX (bad value)."""
        if ke is None or ke.group != group:
            refuse(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", group))
            return None
        kx = crypto.key_exchange(group, allow_weak=self.conn.allow_weak)
        try:
            return kx, kx.shared_secret(ke.data)
        except crypto.IkeCryptoError:
            refuse(NotifyType.INVALID_SYNTAX)
            return None

    def _on_rekey_ike_request(self, sa: codec.SA, nonce, ke, mid: int, refuse) -> None:
        busy = self._busy_for_ike_rekey()
        if busy:
            log.info("%s: IKE rekey request refused for now: %s", self.conn.name, busy)
            refuse(NotifyType.TEMPORARY_FAILURE)
            return
        ours = [s.to_proposal(i + 1) for i, s in enumerate(self._ike_specs())]
        chosen = select_proposal(ours, sa.proposals)
        if chosen is None or len(chosen.spi) != 8:
            refuse(NotifyType.NO_PROPOSAL_CHOSEN)
            return
        group = next(t.id for t in chosen.transforms if t.type == TransformType.KE)
        answer = self._responder_ke(group, ke, refuse)
        if answer is None:
            return
        kx, shared = answer
        my_spi, nr = os.urandom(8), os.urandom(NONCE_SIZE)
        mine = codec.Proposal(chosen.number, ProtocolId.IKE, my_spi, chosen.transforms)
        self._respond(
            ExchangeType.CREATE_CHILD_SA,
            mid,
            [
                codec.SA(proposals=[mine]),
                codec.Nonce(data=nr),
                codec.KE(group=group, data=kx.public),
            ],
        )
        new = self._successor(False, chosen.spi, my_spi, chosen, shared, nonce.data, nr)
        if new is None:
            return
        if self.request is not None and self.request.kind == "rekey_ike":
            self.ike_collision = (new, min(nonce.data, nr))  # settled by our own answer
            log.info("%s: IKE SA rekey collision: both ends rekeying it", self.conn.name)
            new.rekey_of = self
        else:
            self._hand_over(new, self.engine.now)

    def _peer_uses_it(self, now: float) -> None:
        """A request other than its Delete came on the SA the peer's colliding rekey
        made (RFC 7296 2.8.2): the peer finished that rekey and moved its children here.
        It deletes a new SA that lost at once and never uses it, so this one won, or our
        own rekey never reached the peer. Settled now: left for our request's answer
        (lost, retransmitted for minutes), the children stayed on the old SA, and the
        peer's requests about them here got CHILD_SA_NOT_FOUND and made new ones."""
        old = self.rekey_of
        if old is None or old.ike_collision is None or old.ike_collision[0] is not self:
            return
        old.ike_collision = None
        log.info("%s: IKE SA rekey collision lost (the peer uses its new SA)", self.conn.name)
        old._hand_over(self, now)

    def _deleting_ike(self) -> bool:
        return (self.request is not None and self.request.kind == "delete_ike") or any(
            kind == "delete_ike" for kind, _unused in self.pending
        )

    def _busy_for_ike_rekey(self) -> str:
        """Why the peer's IKE rekey must wait (TEMPORARY_FAILURE), or ""."""
        if self.superseded or self._deleting_ike():
            return "this IKE SA is being replaced or deleted"
        if self.ike_collision is not None:
            return "a rekey of it is being settled"
        if self.request is not None and self.request.kind in CHILD_EXCHANGES:
            return "a Child SA exchange of ours is in flight"
        return ""

    def _busy_for_child(self, old: ChildSaReady | None) -> str:
        """Why the peer's Child SA request must wait (TEMPORARY_FAILURE), or ""."""
        if self.superseded or self._deleting_ike():
            return "this IKE SA is being replaced or deleted"
        if self.request is not None and self.request.kind == "rekey_ike":
            return "we are rekeying the IKE SA"
        if old is not None and old.spi_in in self.deleting_children:
            return f"we are deleting Child SA {old.spi_in:08x}"
        if old is not None and old.spi_in in self.rekeyed_children:
            return f"Child SA {old.spi_in:08x} was rekeyed already"
        return ""

    def on_create_child_request(self, inner: list[codec.Payload], mid: int) -> None:
        rekey = next(
            (p for p in inner if isinstance(p, codec.Notify) and p.type == NotifyType.REKEY_SA),
            None,
        )
        sa = next((p for p in inner if isinstance(p, codec.SA)), None)
        nonce = next((p for p in inner if isinstance(p, codec.Nonce)), None)
        tsi = next((p for p in inner if isinstance(p, codec.TSi)), None)
        tsr = next((p for p in inner if isinstance(p, codec.TSr)), None)
        ke = next((p for p in inner if isinstance(p, codec.KE)), None)

        def refuse(notify: int, data: bytes = b"") -> None:
            self._respond(ExchangeType.CREATE_CHILD_SA, mid, [codec.Notify(type=notify, data=data)])

        if sa and nonce and sa.proposals and sa.proposals[0].protocol == ProtocolId.IKE:
            self._on_rekey_ike_request(sa, nonce, ke, mid, refuse)
            return
        if not (sa and nonce and tsi and tsr):
            refuse(NotifyType.INVALID_SYNTAX)
            return
        old = None
        candidates = self.conn.children
        if rekey is not None:
            peer_old = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
            old = next((c for c in self.children.values() if c.spi_out == peer_old), None)
            if old is None:
                refuse(NotifyType.CHILD_SA_NOT_FOUND)
                return
            candidates = (self._params_of(old),)
        busy = self._busy_for_child(old)
        if busy:
            log.info("%s: Child SA request refused for now: %s", self.conn.name, busy)
            refuse(NotifyType.TEMPORARY_FAILURE)
            return
        picked = self._select_child(candidates, sa, tsi, tsr)
        if isinstance(picked, int):
            refuse(picked)
            return
        params, chosen, new_tsi, new_tsr = picked
        group = next((t.id for t in chosen.transforms if t.type == TransformType.KE), None)
        shared, reply_ke = b"", []
        if group is not None:  # PFS
            answer = self._responder_ke(group, ke, refuse)
            if answer is None:
                return
            kx, shared = answer
            reply_ke = [codec.KE(group=group, data=kx.public)]
        my_spi = self.engine.allocate_spi(self, params.name, _protocol_name(chosen.protocol))
        nr = os.urandom(NONCE_SIZE)
        if old is not None:
            transport = old.mode == "transport"
        else:
            transport = params.mode == "transport" and any(
                isinstance(p, codec.Notify) and p.type == NotifyType.USE_TRANSPORT_MODE
                for p in inner
            )
        reply: list[codec.Payload] = (
            [codec.Notify(type=NotifyType.USE_TRANSPORT_MODE)] if transport else []
        )
        reply += [
            codec.SA(proposals=[replace(chosen, spi=my_spi)]),
            codec.Nonce(data=nr),
            *reply_ke,
            codec.TSi(selectors=new_tsi),
            codec.TSr(selectors=new_tsr),
        ]
        self._respond(ExchangeType.CREATE_CHILD_SA, mid, reply)
        child = self._child_ready(
            chosen,
            new_tsi,
            new_tsr,
            transport,
            exchange_initiator=False,
            nonces=(nonce.data, nr),
            shared=shared,
            params=params,
            my_spi=my_spi,
            rekeyed_from=old.spi_in if old is not None else 0,
        )
        if old is None:
            return
        req = self.request
        if req is not None and req.kind == "rekey_child" and req.arg[0] == old.spi_in:
            # We are rekeying it too: our own answer settles which new SA stays.
            self.child_collisions[old.spi_in] = (child.spi_in, min(nonce.data, nr))
            log.info(
                "%s: Child SA %08x rekey collision: both ends rekeying it",
                self.conn.name,
                old.spi_in,
            )
        else:
            self.rekeyed_children.add(old.spi_in)  # the peer deletes the old one

    def _select_child(self, candidates, sa: codec.SA, tsi: codec.TSi, tsr: codec.TSr):
        """(params, chosen proposal, narrowed TSi, TSr) of the first configured child the
        peer's offer fits, else the notify to refuse with (NO_PROPOSAL_CHOSEN when no
        proposal matches any, TS_UNACCEPTABLE when only the selectors do not)."""
        proposals_ok = False
        for params in candidates:
            chosen = select_proposal(self._child_offer(params), sa.proposals)
            if chosen is None:
                continue
            proposals_ok = True
            new_tsi = narrow(tsi.selectors, params.remote_ts)
            new_tsr = narrow(tsr.selectors, params.local_ts)
            if new_tsi and new_tsr:
                return params, chosen, new_tsi, new_tsr
        notify = NotifyType.TS_UNACCEPTABLE if proposals_ok else NotifyType.NO_PROPOSAL_CHOSEN
        log.info("%s: child SA refused: %s", self.conn.name, notify.name)
        return notify

    # ------------------------------------------------------------ responder

    def on_init_request(self, msg: codec.Message, data: bytes, now: float) -> None:
        sa, ke, nonce = msg.get(codec.SA), msg.get(codec.KE), msg.get(codec.Nonce)
        if not (sa and ke and nonce):
            self._answer_init_error(msg, NotifyType.INVALID_SYNTAX)
            return
        answering = self.engine._answering_for(self.remote)
        ours = [
            _ike_proposal(text, weak).to_proposal(n)
            for n, (text, weak) in enumerate(answering.proposals, 1)
        ]
        chosen = select_proposal(ours, sa.proposals)
        if chosen is None:
            untrusted.info(
                "IKE_SA_INIT from %s: no proposal chosen (offered %s)",
                self.remote,
                ", ".join(describe(p) for p in sa.proposals),
            )
            self._answer_init_error(msg, NotifyType.NO_PROPOSAL_CHOSEN)
            return
        group = next(t.id for t in chosen.transforms if t.type == TransformType.KE)
        if ke.group != group:
            self._answer_init_error(msg, NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", group))
            return
        self.conn = answering.conn
        nat_traversal = answering.nat_traversal
        if nat_traversal:  # the initiator's hashes: over SPIi and a zero SPIr (2.23)
            self._detect_nat(msg, bytes(8))
        self.kx = crypto.key_exchange(group, allow_weak=True)
        self.nonce_i, self.nonce_r = nonce.data, os.urandom(NONCE_SIZE)
        self.init_request = data
        self._derive(chosen, ke, msg)
        if self.state == "failed":
            self._answer_init_error(msg, NotifyType.INVALID_SYNTAX)
            return
        payloads = [
            codec.SA(proposals=[chosen]),
            codec.KE(group=group, data=self.kx.public),
            codec.Nonce(data=self.nonce_r),
            *(self.engine._nat_notifies(self.spi_i, self.spi_r, self.remote)
              if nat_traversal else ()),
            codec.Notify(type=NotifyType.SIGNATURE_HASH_ALGORITHMS, data=SIGNATURE_HASHES),
        ]  # fmt: skip
        self.peer_childless = bool(msg.notifies(NotifyType.CHILDLESS_IKEV2_SUPPORTED))
        self.peer_sig_hashes = _announced_hashes(msg)
        if self.peer_childless:  # RFC 6023: we accept IKE_AUTH without a Child SA
            payloads.append(codec.Notify(type=NotifyType.CHILDLESS_IKEV2_SUPPORTED))
        # RFC 7383 2.3: the responder says it supports fragments only if asked.
        self.peer_fragments = (
            bool(msg.notifies(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)) and answering.fragments
        )
        if self.peer_fragments:
            payloads.append(codec.Notify(type=NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
        # Ask for the initiator's certificate when a connection to it trusts CAs: peers
        # like strongSwan send theirs only when asked (RFC 7296 3.7).
        if answering.cas:
            payloads.append(
                codec.CERTREQ(kind=certs.X509_SIGNATURE, data=certs.certreq_data(answering.cas))
            )
        header = self._header(ExchangeType.IKE_SA_INIT, 0, True)
        _trace(self.trace_name, True, header, payloads)
        data_out = codec.encode_message(codec.Message(header, payloads))
        self.init_response = data_out
        self._set_state(SaState.AUTH)
        self.recv_mid = 1
        self._send_response(0, (data_out,))

    def _answer_init_error(self, msg: codec.Message, notify: int, data: bytes = b"") -> None:
        header = codec.Header(
            msg.header.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0
        )
        self.engine._emit(
            codec.encode_message(codec.Message(header, [codec.Notify(type=notify, data=data)])),
            self.remote,
            self.nat_t,
        )
        self._discard()

    def on_auth_request(self, inner: list[codec.Payload], mid: int, now: float) -> None:
        idi = next((p for p in inner if isinstance(p, codec.IDi)), None)
        auth = next((p for p in inner if isinstance(p, codec.AUTH)), None)
        if idi is None or auth is None:
            self._respond_auth_failed(mid, "IKE_AUTH request lacks IDi or AUTH")
            return
        peer_id = idi.to_text()
        named = [
            c
            for c in self.engine._connections_for(self.remote, peer_id)
            if c.remote_id == peer_id or (c.opportunistic and idi.id_type in _ADDRESS_IDS)
        ]
        if not named:
            self._respond_auth_failed(mid, f"no connection for peer identity {peer_id!r}")
            return
        # IKE_SA_INIT chose from every connection to this address; the connection the
        # identity selects must accept that choice too, or a peer could take another
        # connection's (weaker) proposal under this one's name.
        conn = next((c for c in named if self._accepts_chosen_ike(c)), None)
        if conn is None:
            self._respond_auth_failed(
                mid,
                f"{peer_id!r}: IKE proposal {describe(self.chosen_ike)} chosen in IKE_SA_INIT "
                f"is not one of connection {named[0].name}'s proposals",
            )
            return
        self.conn = conn
        try:
            reason = self._verify_auth(
                conn, inner, idi, auth, self.init_request, self.nonce_r, self.keys.sk_pi
            )
        except certs.RevocationPending:
            # Unanswered: the peer's retransmission finds the revocation data (or the policy
            # decides).
            self.recv_mid -= 1
            return
        if reason:
            self._respond_auth_failed(mid, f"{peer_id!r}: {reason}")
            return
        if conn.opportunistic:
            # Authenticated as the address it came from: the peer's own connection now.
            instance = self.engine.instantiate(conn, self.remote)
            if instance is None:
                self._respond_auth_failed(mid, f"{peer_id!r}: {conn.name} takes no new peer")
                return
            self.conn = conn = instance
        self.remote_id = peer_id
        older = self._older_with_peer()
        if older and conn.unique == "keep":
            self._respond_auth_failed(
                mid, f"{peer_id!r} already has an IKE SA of {conn.name} (unique: keep)"
            )
            return
        initial_contact = any(
            isinstance(p, codec.Notify) and p.type == NotifyType.INITIAL_CONTACT for p in inner
        )
        self.peer_initial_contact = initial_contact
        if initial_contact and conn.unique != "never":
            for stale in older:  # the peer forgot them: no Delete to send
                log.info("%s: peer restarted (INITIAL_CONTACT): old IKE SA dropped", conn.name)
                stale._down("peer restarted (INITIAL_CONTACT)")
            older = []
        id_type, id_data = encode_id(conn.local_id)
        idr = codec.IDr(id_type=id_type, data=id_data)
        reply: list[codec.Payload] = [
            idr,
            *self._auth_payloads(conn, idr, self.init_response, self.nonce_i, self.keys.sk_pr),
        ]
        child = self._responder_child(inner)
        reply += child[0]
        if conn.mobike and conn.nat_traversal and _notified(inner, NotifyType.MOBIKE_SUPPORTED):
            # RFC 4555 3.2: both ends said so, MOBIKE is in use (the initiator's moves
            # are followed; we do not move ourselves, and send no address list).
            reply.append(codec.Notify(type=NotifyType.MOBIKE_SUPPORTED))
            self.mobike = True
        self._respond(ExchangeType.IKE_AUTH, mid, reply)
        self._up(now)
        if child[1] is not None:
            self._child_ready(*child[1])
        if conn.unique == "replace":
            self._replace_older(older, now)

    def _older_with_peer(self) -> list[IkeSa]:
        """This connection's IKE SAs with the same peer identity, up before this one
        began: what a uniqueness policy acts on. Not a twin from a simultaneous
        initiation (settled in _up), a rekeyed SA on its way out, or the SA this one
        reauthenticates (it goes when this one is up)."""
        return [
            sa
            for sa in self.engine._established_with(self.conn.name, self.remote_id, self)
            if sa.established_at is not None
            and sa.established_at < self.created_at
            and not sa.superseded
            and self.reauth_of is not sa
            and sa.reauth_of is not self
        ]

    def _replace_older(self, older: list[IkeSa], now: float) -> None:
        """unique: replace: the older IKE SAs with this peer identity are deleted (with
        a Delete: the peer still holds them)."""
        for stale in older:
            if stale.state == "established" and not stale._deleting_ike():
                log.info("%s: IKE SA replaced by a newer one with %s (unique: replace)",
                         self.conn.name, self.remote_id)  # fmt: skip
                stale.redundant = REPLACED_UNIQUE
                stale.queue("delete_ike", now)
                self.engine._touch(stale)

    def _accepts_chosen_ike(self, conn: IkeConnection) -> bool:
        ours = [spec.to_proposal(i + 1) for i, spec in enumerate(_ike_specs_of(conn))]
        return proposal_acceptable(ours, self.chosen_ike)

    def _responder_child(self, inner: list[codec.Payload]):
        sa = next((p for p in inner if isinstance(p, codec.SA)), None)
        tsi = next((p for p in inner if isinstance(p, codec.TSi)), None)
        tsr = next((p for p in inner if isinstance(p, codec.TSr)), None)
        if not (sa and tsi and tsr):
            return [], None  # childless
        picked = self._select_child(self.conn.children, sa, tsi, tsr)
        if isinstance(picked, int):
            return [codec.Notify(type=picked)], None
        params, chosen, new_tsi, new_tsr = picked
        self.child_params = params
        protocol = _protocol_name(chosen.protocol)
        self.child_spi = self.engine.allocate_spi(self, params.name, protocol)
        mine = replace(chosen, spi=self.child_spi)
        use_transport = params.mode == "transport" and any(
            isinstance(p, codec.Notify) and p.type == NotifyType.USE_TRANSPORT_MODE for p in inner
        )
        payloads = [codec.Notify(type=NotifyType.USE_TRANSPORT_MODE)] if use_transport else []
        payloads += [
            codec.SA(proposals=[mine]),
            codec.TSi(selectors=new_tsi),
            codec.TSr(selectors=new_tsr),
        ]
        return payloads, (chosen, new_tsi, new_tsr, use_transport)

    def _respond_auth_failed(self, mid: int, reason: str) -> None:
        untrusted.warning("IKE_AUTH from %s failed: %s", self.remote, reason)
        self._respond(
            ExchangeType.IKE_AUTH, mid, [codec.Notify(type=NotifyType.AUTHENTICATION_FAILED)]
        )
        self.engine._event(AuthFailed(self.conn.name if self.conn else "?", reason, False))
        # Nothing is kept for a failed IKE_AUTH: a retransmission of it meets
        # INVALID_IKE_SPI, and a flood of wrong credentials costs no memory.
        self._discard()

    # ------------------------------------------------------------ INFORMATIONAL

    def _add_child(self, child: ChildSaReady) -> None:
        self.children[child.spi_in] = child
        params = self._params_of(child)
        self.child_timers[child.spi_in] = LifetimeSchedule.compute(
            self.engine.now, params.rekey_time, params.rand_time, params.life_time, self.engine.rng
        )
        self.engine._event(child)

    def _lifetime_actions(self, now: float) -> None:
        """Rekey Child SAs whose time came, delete those past their hard lifetime. Both
        ends keep schedules (jittered by rand_time); when their rekeys still meet, the
        collision rules settle which new SA stays."""
        for spi_in, timers in list(self.child_timers.items()):
            if spi_in not in self.children:
                del self.child_timers[spi_in]
                self.overdue_children.discard(spi_in)
            elif timers.expire_at is not None and now >= timers.expire_at:
                if spi_in in self.rekeyed_children and spi_in not in self.overdue_children:
                    # The peer rekeyed it and deletes it once it holds our answer, which
                    # may have been lost: gone now, it would leave the peer nothing to
                    # send on until a retransmission got through (our new outbound half
                    # waits for that Delete). Two of its retransmissions, at most.
                    policy = self.conn.retransmit
                    grace = policy.interval(0) + policy.interval(1)
                    self.overdue_children.add(spi_in)
                    self.child_timers[spi_in] = LifetimeSchedule(None, now + grace)
                    log.info("%s: Child SA %08x reached its hard lifetime; the peer rekeyed "
                             "it: kept %.1f s more for its Delete", self.conn.name, spi_in,
                             grace)  # fmt: skip
                    continue
                until = self._rekey_under_way(spi_in, now)
                if until is not None:
                    # Our rekey of it has no answer yet (lost, retransmitted): gone now,
                    # the SA would leave both ends nothing to send on until the rekey
                    # ends (bench/soak.py: 93 packets in 2.6-4.7 s). Kept until it ends
                    # or fails, which its retransmission schedule bounds.
                    self.child_timers[spi_in] = LifetimeSchedule(None, until)
                    log.info("%s: Child SA %08x reached its hard lifetime during its rekey: "
                             "kept until the rekey ends", self.conn.name, spi_in)  # fmt: skip
                    continue
                del self.child_timers[spi_in]
                self.overdue_children.discard(spi_in)
                log.info("%s: Child SA %08x reached its hard lifetime", self.conn.name, spi_in)
                self.queue("delete_child", now, spi_in)
                self.deleting_children[spi_in] = HARD_LIFETIME
                self._expire_child(spi_in)
            elif timers.rekey_at is not None and now >= timers.rekey_at:
                self.child_timers[spi_in] = LifetimeSchedule(None, timers.expire_at)
                self.queue("rekey_child", now, spi_in)

    def _create_again(self, child: str, now: float) -> None:
        """Ask for configured child `child` again, unless one is up or on its way."""
        params = next((c for c in self.conn.children if c.name == child), None)
        if params is None or self.superseded or self.creating(child):
            return
        if any(self.children[s].child == child for s in self.live_children()):
            return
        self.queue("create_child", now, params)

    def _rekey_under_way(self, spi_in: int, now: float) -> float | None:
        """When to look again at Child SA `spi_in` if our rekey of it is in flight or
        queued (the request's next retransmission or giving up), else None."""
        req = self.request
        in_flight = req is not None and req.kind == "rekey_child" and req.arg[0] == spi_in
        if not in_flight and ("rekey_child", spi_in) not in self.pending:
            return None
        if req is None:
            return now + 1.0  # queued behind a wait (a rekeyed IKE SA's grace)
        return max(self.conn.retransmit.give_up_after(req.sent_at, req.attempt), now + 0.1)

    def lifetime_deadline(self) -> float | None:
        times = [
            t
            for timers in self.child_timers.values()
            for t in (timers.rekey_at, timers.expire_at)
            if t is not None
        ]
        return min(times, default=None)

    def queue(self, kind: str, now: float, arg: object = None, urgent: bool = False) -> None:
        """Start an exchange now, or once the one in flight is done (window size 1)."""
        if self.state != "established":
            raise ValueError(f"IKE SA is {self.state}, not established")
        if kind == "delete_child":
            if arg not in self.children:
                return  # gone meanwhile (the peer deleted it)
            in_flight = self.request is not None and self.request.kind == kind
            if (kind, arg) in self.pending or (in_flight and self.request.arg == arg):
                return  # already on its way
            self.deleting_children.setdefault(arg, "deleted by us")
        if self.request is not None or self.wait_for is not None:
            if urgent:
                self.pending.insert(0, (kind, arg))
            else:
                self.pending.append((kind, arg))
            return
        if kind == "rekey_child":
            if arg in self.rekeyed_children or arg in self.deleting_children:
                self._next_pending(now)  # replaced or going meanwhile
            elif arg in self.children:
                self._send_child_request(self._params_of(self.children[arg]), now, arg)
            else:
                self._next_pending(now)
            return
        if kind == "create_child":
            self._send_child_request(arg, now)
            return
        if kind == "rekey_ike":
            if self.superseded:
                self._next_pending(now)
            else:
                self._send_rekey_ike(now)
            return
        if kind == "delete_child" and arg not in self.children:
            self._next_pending(now)  # already gone (the peer deleted it meanwhile)
            return
        if kind == "delete_ike":
            inner: list[codec.Payload] = [codec.Delete(protocol=ProtocolId.IKE)]
        elif kind == "delete_child":
            protocol = _protocol_id(self.children[arg].protocol)
            inner = [codec.Delete(protocol=protocol, spis=[struct.pack("!I", arg)])]
        elif kind == "refuse_child":
            protocol, spi = arg
            inner = [codec.Delete(protocol=protocol, spis=[struct.pack("!I", spi)])]
        elif kind == "invalid_spi":  # RFC 7296 3.10.1: the data is the packet's SPI
            protocol, spi = arg
            inner = [
                codec.Notify(
                    type=NotifyType.INVALID_SPI, protocol=protocol, data=struct.pack("!I", spi)
                )
            ]
        else:  # dpd, confirm: an empty INFORMATIONAL
            inner = []
        self._request(ExchangeType.INFORMATIONAL, inner, now, kind, arg)

    def _on_informational_response(
        self, inner: list[codec.Payload], now: float, src: Address | None = None
    ) -> None:
        req, self.request = self.request, None
        if req.kind == "routability" and src is not None:
            self._routable(src)
        if req.kind == "delete_ike":
            self._down("deleted by us")
            return
        if req.kind == "delete_child":
            reason = self.deleting_children.pop(req.arg, "deleted by us")
            self._forget_child(req.arg, reason)
        self._next_pending(now)

    def _expire_child(self, spi_in: int) -> None:
        """Its keys may be used no longer (RFC 7296 2.8): out of the data plane now,
        whenever the peer answers the Delete (in a soak, lost answers took 90 s)."""
        child = self.children.get(spi_in)
        if child is not None and spi_in not in self.expired_children:
            self.expired_children.add(spi_in)
            self.engine._event(
                ChildSaDeleted(self.conn.name, child.child, spi_in, child.spi_out, HARD_LIFETIME)
            )

    def _forget_child(self, spi_in: int, reason: str) -> ChildSaReady | None:
        child = self.children.pop(spi_in, None)
        self.rekeyed_children.discard(spi_in)  # (a collision on it stays, to be settled)
        self.losing_children.discard(spi_in)
        if spi_in in self.expired_children:
            self.expired_children.discard(spi_in)
            return child  # its ChildSaDeleted went at its hard lifetime
        if child is not None:
            self.engine._event(
                ChildSaDeleted(self.conn.name, child.child, child.spi_in, child.spi_out, reason)
            )
        return child

    def on_update_sa_addresses(
        self, inner: list[codec.Payload], mid: int, src: Address, now: float
    ) -> None:
        """RFC 4555 3.5, as responder: the peer moved to `src` (the request's IP header).
        The IKE SA sends there at once; the Child SAs follow once a request of ours is
        answered from there (the return routability check of 3.7, which charon omits):
        an UPDATE_SA_ADDRESSES replayed by an attacker from elsewhere would otherwise
        send the traffic there."""
        rx_nat_t = self.engine._rx_nat_t
        here = (self.engine.local[0], self.engine.nat_t_port if rx_nat_t else self.engine.local[1])
        no_nats = _notified(inner, NotifyType.NO_NATS_ALLOWED)
        if no_nats is not None and no_nats.data != _address_pair(src, here):
            untrusted.info("%s: UPDATE_SA_ADDRESSES from %s:%d through a NAT the peer "
                           "allows none of", self.conn.name, *src)  # fmt: skip
            self.reply_to = (src, rx_nat_t)
            reply = [codec.Notify(type=NotifyType.UNEXPECTED_NAT_DETECTED)]
            self._respond(ExchangeType.INFORMATIONAL, mid, reply)
            return
        if self.child_remote is None:
            self.child_remote = self.remote  # where the Child SAs still send
        previous, self.remote, self.nat_t, self.reply_to = self.remote, src, rx_nat_t, None
        reply: list[codec.Payload] = []
        theirs = [n.data for n in inner if isinstance(n, codec.Notify)
                  and n.type == NotifyType.NAT_DETECTION_SOURCE_IP]  # fmt: skip
        ours = [n.data for n in inner if isinstance(n, codec.Notify)
                and n.type == NotifyType.NAT_DETECTION_DESTINATION_IP]  # fmt: skip
        if theirs or ours:  # 3.8: NAT detection answered with NAT detection
            expect_src, expect_dst = (
                n.data for n in self.engine._nat_notifies(
                    self.spi_i, self.spi_r, src, swap=True, local=here
                )
            )  # fmt: skip
            translated, behind = expect_src not in theirs, expect_dst not in ours
            self.nat, self.behind_nat = translated or behind, behind
            reply += self.engine._nat_notifies(self.spi_i, self.spi_r, src, local=here)
        cookie2 = _notified(inner, NotifyType.COOKIE2)
        if cookie2 is not None:
            reply.append(codec.Notify(type=NotifyType.COOKIE2, data=cookie2.data))  # 3.7
        self._respond(ExchangeType.INFORMATIONAL, mid, reply)
        log.info("%s: the peer moved from %s:%d to %s:%d (MOBIKE); checking it is there",
                 self.conn.name, *previous, *src)  # fmt: skip
        self.queue("routability", now, urgent=True)

    def _routable(self, src: Address) -> None:
        """A request of ours was answered from `src`: if the peer moved there (MOBIKE),
        its Child SAs follow now."""
        if src != self.remote or self.child_remote is None:
            return  # it moved again meanwhile: that move's own check decides
        previous, self.child_remote = self.child_remote, None
        log.info("%s: the peer answered at %s:%d: its Child SAs follow", self.conn.name, *src)
        self.engine._event(
            IkeSaMoved(self.conn.name, self.spi_i, self.spi_r, src, previous, self.nat, mobike=True)
        )

    def on_informational_request(self, inner: list[codec.Payload], mid: int) -> None:
        if any(
            isinstance(p, codec.Notify) and p.type == NotifyType.AUTHENTICATION_FAILED
            for p in inner
        ):
            # The initiator refused our authentication (RFC 7296 2.21.2): protected, so
            # it is the peer's word; what we built on it goes.
            self._respond(ExchangeType.INFORMATIONAL, mid, [])
            reason = "the peer refused our authentication (AUTHENTICATION_FAILED)"
            log.warning("%s: %s", self.conn.name, reason)
            self.engine._event(AuthFailed(self.conn.name, reason, self.initiator))
            self._down(reason)
            return
        deletes = [p for p in inner if isinstance(p, codec.Delete)]
        reply: list[codec.Payload] = []
        if any(d.protocol == ProtocolId.IKE for d in deletes):
            self._respond(ExchangeType.INFORMATIONAL, mid, [])
            if self.ike_collision is not None:
                # Both ends rekeyed it and the peer, having won, retires the old SA
                # before our own answer came: its new SA carries the children on.
                theirs, self.ike_collision = self.ike_collision[0], None
                log.info(
                    "%s: IKE SA rekey collision lost (the peer deleted the old SA)", self.conn.name
                )
                self._hand_over(theirs, self.engine.now)
            self._down("deleted by peer")
            return
        ours: dict[int, list[bytes]] = {}  # by protocol: one Delete payload each
        for delete in deletes:
            if delete.protocol not in (ProtocolId.ESP, ProtocolId.AH):
                continue
            for spi in delete.spis:
                if len(spi) != 4:
                    continue
                peer_spi = int.from_bytes(spi, "big")
                child = next(
                    (
                        c
                        for c in self.children.values()
                        if c.spi_out == peer_spi and _protocol_id(c.protocol) == delete.protocol
                    ),
                    None,
                )
                if child is None:
                    continue  # already gone: nothing to answer for it (RFC 7296 1.4.1)
                req = self.request
                crossing = (
                    req is not None and req.kind == "delete_child" and req.arg == child.spi_in
                )
                reason = self.deleting_children.pop(child.spi_in, "deleted by peer")
                if (("delete_child", child.spi_in)) in self.pending:
                    self.pending.remove(("delete_child", child.spi_in))
                self._forget_child(child.spi_in, reason)
                # Deletes that crossed: each end drops its SAs, and neither answer names
                # them again, which could delete the wrong SA (RFC 7296 1.4.1).
                if not crossing:
                    ours.setdefault(delete.protocol, []).append(struct.pack("!I", child.spi_in))
        reply += [codec.Delete(protocol=proto, spis=spis) for proto, spis in ours.items()]
        self._respond(ExchangeType.INFORMATIONAL, mid, reply)
        for notify in inner:
            if isinstance(notify, codec.Notify) and notify.type == NotifyType.INVALID_SPI:
                self._on_invalid_spi(notify)

    def _on_invalid_spi(self, notify: codec.Notify) -> None:
        """The peer got ESP on an SPI it does not know. If that is one of ours, the Child
        SA is useless: replace it (the notify came protected, inside this IKE SA)."""
        raw = notify.data if len(notify.data) == 4 else notify.spi
        if len(raw) != 4:
            return
        spi = int.from_bytes(raw, "big")
        child = next((c for c in self.children.values() if c.spi_out == spi), None)
        if child is None or child.spi_in in self.deleting_children:
            log.info("%s: INVALID_SPI %08x from the peer: not an SA of ours", self.conn.name, spi)
            return
        self._replace_lost_child(child.spi_in, self.engine.now)

    def _down(self, reason: str) -> None:
        if self.replaced:
            reason = "replaced by rekey"
        elif self.reauthenticated:
            reason = "replaced by reauthentication"
        elif self.redundant:
            reason = self.redundant
        elif self.rekey_of is not None and (self.rekey_of.ike_collision or (None,))[0] is self:
            # The peer deletes the SA its colliding rekey made before we learned who
            # won: it lost, so this SA was redundant.
            reason = REDUNDANT_IKE
        elif self.expiring:
            reason = EXPIRED
        for child in list(self.children.values()):
            if child.spi_in in self.expired_children:
                continue  # announced at its hard lifetime
            self.engine._event(
                ChildSaDeleted(self.conn.name, child.child, child.spi_in, child.spi_out, reason)
            )
        self.children.clear()
        self.expired_children.clear()
        if self.successor is not None and self.successor.wait_for is self:
            self.successor._release(self.engine.now)
        self.engine._event(IkeSaDown(self.conn.name, self.spi_i, self.spi_r, reason))
        self._set_state(SaState.DELETED)
        self.request = None
        self.engine._forget(self)

    # ------------------------------------------------------------ common

    def _open(self, msg: codec.Message, data: bytes) -> list[codec.Payload] | None:
        """The inner payloads of a protected message, or None while fragments of it are
        missing. Only the one message we expect next is collected (bounded state)."""
        last = msg.payloads[-1] if msg.payloads else None
        if not isinstance(last, codec.EncryptedFragment):
            inner = codec.open_encrypted(data, msg, self.inbound)
        else:
            key = (msg.header.message_id, msg.header.is_response)
            if self.fragments is None or self.fragments[:2] != key:
                self.fragments = (*key, codec.Reassembler())
            inner = self.fragments[2].add(data, msg, self.inbound)
            if inner is None:
                return None  # more fragments to come
            self.fragments = None
        _trace(self.trace_name, False, msg.header, inner)
        return inner

    def _set_state(self, new: SaState) -> None:
        """The one way an IKE SA changes state; a change the machine does not have is a
        bug, logged (and made: the SA must not stay half in one state)."""
        old = self.state
        if new == old:
            return  # a failed SA discarded once more
        if new not in SA_TRANSITIONS[old]:
            log.error("%s: IKE SA state %s -> %s is not in its state machine (a bug)",
                      self.trace_name, old, new)  # fmt: skip
        self.state = new
        if new == SaState.ESTABLISHED and self.conn.dpd_delay:
            self.dpd_at = self.engine.now + self.conn.dpd_delay

    def _liveness_due(self, now: float) -> None:
        """dpd_delay has passed since the last liveness check: another, unless a request
        is under way (its answer tells as much: looked at again in a second) or the SA
        is surplus (it only waits for its Delete: checks on it kept the peer's redundant
        SA busy, and pluto dropped them)."""
        delay = self.conn.dpd_delay
        if self.superseded or not delay:
            self.dpd_at = None
        elif self.request is None:
            self.engine.check_liveness(self, now)
            self.dpd_at = now + delay
        else:
            self.dpd_at = now + 1.0

    def _schedule_lifetimes(self, now: float, reauth_at: float | None = None) -> None:
        """On both ends: rekey before rekey_time and reauthenticate before reauth_time,
        each jittered by rand_time (whichever end comes first does it; collisions are
        settled); a rekey's successor keeps the reauthentication deadline (`reauth_at`;
        strongSwan: "reauthentication timeout survives a rekeying"). The SA is deleted
        once the earlier of the two passes by over_time without either."""
        conn = self.conn
        jitter = self.engine.rng.uniform(0, conn.rand_time) if conn.rand_time > 0 else 0.0
        deadlines = []
        if conn.reauth_time:
            self.reauth_at = now + conn.reauth_time - jitter if reauth_at is None else reauth_at
            deadlines.append(self.reauth_at)
        if conn.rekey_time and (not conn.reauth_time or conn.rekey_time < conn.reauth_time):
            self.rekey_at = now + conn.rekey_time - jitter
            deadlines.append(now + conn.rekey_time)
        self.expire_at = min(deadlines) + conn.over_time if deadlines else None

    def _reauthentication_due(self, now: float) -> None:
        """Make-before-break: a new IKE SA with its children first, then this one goes;
        unless it is being replaced already (a rekey, a reauthentication of ours or the
        peer's under way), or its connection is gone."""
        self.reauth_at = None
        if self.superseded or self.conn.name not in self.engine.connections:
            return
        if any(o.reauth_of is self for o in self.engine.sas_of(self.conn.name)):
            return
        if self.request is not None and self.request.kind == "rekey_ike":
            # Its rekey awaits an answer: the new SA inherits this deadline (past, so it
            # reauthenticates at once). Reauthenticating this one too would leave two.
            # Looked at again later, in case the rekey fails and this SA stays.
            self.reauth_at = now + REAUTH_RECHECK
            return
        if self.newer_with_peer():
            # The peer's reauthentication of this SA came first: its Delete is on the
            # way. Another one now would leave two IKE SAs, neither a twin of the other.
            return
        log.info("%s: reauthentication due: a new IKE SA first", self.conn.name)
        self.engine.reauthenticate(self, now)

    def _up(self, now: float) -> None:
        self._set_state(SaState.ESTABLISHED)
        self.established_at = self.authenticated_at = now
        self._schedule_lifetimes(now)
        self.peer_holds = self.initiator
        self.engine._event(
            IkeSaUp(
                self.conn.name,
                self.spi_i,
                self.spi_r,
                self.initiator,
                describe(self.chosen_ike),
                self.remote_id,
            )
        )
        self._settle_duplicates(now)

    def _settle_duplicates(self, now: float) -> None:
        """Both ends initiated the connection at once (each was half-way when the other's
        IKE_SA_INIT came): keep one IKE SA. Both ends compute the same loser, the SA with
        the lowest nonce, and delete it (crossing Deletes are harmless), so a peer that
        never deletes duplicates (strongSwan issue #1801) still ends with one.

        Make-before-break: the loser goes only once the peer holds the SA kept. If we
        answered that one's IKE_AUTH, the answer may be lost and the peer hold only the
        loser (bench/soak.py: 7 s without a Child SA): an empty INFORMATIONAL on the kept
        SA tells, and its answer (or anything else the peer sends on it) settles this."""
        for other in self.engine._established_with(self.conn.name, self.remote_id, self):
            if (
                other.initiator == self.initiator  # ours twice: asked for, kept
                or other.superseded
                or other.reauth_of is self
                or self.reauth_of is other
                or other.established_at is None
                or self._older(other)
            ):
                continue
            loser = min((self, other), key=lambda sa: min(sa.nonce_i, sa.nonce_r))
            kept = other if loser is self else self
            if not kept.peer_holds:
                kept.duplicate_waits = True
                if kept.request is None and ("confirm", None) not in kept.pending:
                    log.info(
                        "%s: IKE SA initiated by both ends at once; asking whether the "
                        "peer holds the one to keep",
                        self.conn.name,
                    )
                    kept.queue("confirm", now)
                    self.engine._touch(kept)
                continue
            log.info(
                "%s: IKE SA initiated by both ends at once; deleting the one %s initiated",
                self.conn.name,
                "we" if loser.initiator else "the peer",
            )
            loser.redundant = DUPLICATE_IKE
            loser.queue("delete_ike", now)
            self.engine._touch(loser)
            if loser is self:
                return

    def _older(self, other: IkeSa) -> bool:
        """`other` was up at both ends before this SA began: not a twin of it. Up at our
        end is not enough if we answered its IKE_AUTH and the peer has not shown it holds
        it: our answer may be lost and the peer still retrying, its copy half-way as ours
        was when this one began."""
        if other.established_at > self.created_at:
            return False
        return other.peer_holds or (
            self.created_at - other.established_at > self.conn.retransmit.total()
        )

    def _auth_failed(self, reason: str) -> None:
        log.warning("%s: authentication failed: %s", self.conn.name, reason)
        self.engine._event(AuthFailed(self.conn.name, reason))
        self._discard()

    def _fail(self, reason: str, notify: int | None = None) -> None:
        log.warning("%s: %s", self.conn.name if self.conn else self.remote, reason)
        if self.conn is not None and self.initiator:
            self.engine._event(NegotiationFailed(self.conn.name, reason, notify))
        self._discard()

    def _discard(self) -> None:
        """This SA failed: nothing of it stays (no request to retransmit, no index)."""
        self._set_state(SaState.FAILED)
        self.request = None
        self.engine._forget(self)

    def deadline(self) -> float | None:
        if self.state == "auth" and not self.initiator:
            return self.created_at + HALF_OPEN_TIMEOUT
        life = self.lifetime_deadline() if self.state == "established" else None
        retry = min(self.create_retry.values(), default=None)
        for at in (
            self.rekey_at,
            self.reauth_at,
            self.expire_at,
            self.ike_rekey_retry_at,
            self.delete_at,
            self.wait_until,
            self.keepalive_at,
            self.dpd_at,
            retry,
        ):
            if at is not None and self.state == "established":
                life = min(life, at) if life is not None else at
        if self.request is None:
            return life
        policy = self.conn.retransmit
        retransmit = self.request.sent_at + policy.interval(self.request.attempt)
        return min(retransmit, life) if life is not None else retransmit

    def tick(self, now: float) -> None:
        if self.state == "auth" and not self.initiator:
            if now >= self.created_at + HALF_OPEN_TIMEOUT:
                untrusted.info(
                    "IKE SA from %s half-open for %.0f s: dropped",
                    self.remote,
                    now - self.created_at,
                )
                self._discard()
            return
        if self.state == "established":
            if self.expire_at is not None and now >= self.expire_at:
                self.expire_at = None
                log.warning("%s: IKE SA not rekeyed within over_time: deleting it",
                            self.conn.name)  # fmt: skip
                self.expiring = True
                self.engine.expire_ike_sa(self, now)
                if self.state != "established":
                    return
            if self.rekey_at is not None and now >= self.rekey_at:
                self.rekey_at = None
                log.info("%s: IKE SA rekey due", self.conn.name)
                self.queue("rekey_ike", now)
            if self.reauth_at is not None and now >= self.reauth_at:
                self._reauthentication_due(now)
            self._lifetime_actions(now)
            if self.ike_rekey_retry_at is not None and now >= self.ike_rekey_retry_at:
                self.ike_rekey_retry_at = None
                self.queue("rekey_ike", now)
            for child, at in list(self.create_retry.items()):
                if now >= at:
                    del self.create_retry[child]
                    self._create_again(child, now)
            if self.wait_until is not None and now >= self.wait_until:
                self._release(now)
            if self.dpd_at is not None and now >= self.dpd_at:
                self._liveness_due(now)
            if self.keepalive_at is not None and now >= self.keepalive_at:
                if self.superseded:  # its successor keeps the mapping alive
                    self.keepalive_at = None
                else:
                    self.engine._emit(NAT_KEEPALIVE, self.remote, nat_t=True)
                    self.keepalive_at = now + self.conn.keepalive
            if self.delete_at is not None and now >= self.delete_at:
                # A collision's surplus SA, or one the peer's rekey replaced, that the
                # peer did not delete in its time.
                self.delete_at = None
                if self._deleting_ike():
                    # Our Delete went unanswered for a grace period too: the peer let
                    # the SA go unannounced (libreswan's pluto does). It goes here too.
                    self._down("deleted by us")
                    return
                if self.request is not None:
                    # An answer may never come on it (a liveness check pluto dropped as
                    # unknown): waiting would hold the SA, and the Delete behind it, for
                    # the whole retransmission schedule.
                    self.request, self.pending = None, []
                which = "the replaced" if self.replaced else "a surplus"
                log.info("%s: the peer kept %s IKE SA: deleting it", self.conn.name, which)
                self.queue("delete_ike", now)
                self.delete_at = now + REDUNDANT_GRACE
        req = self.request
        if req is None:
            return
        policy = self.conn.retransmit
        if now < req.sent_at + policy.interval(req.attempt):
            return
        if req.attempt >= policy.tries:
            if self.superseded:
                self._down("deleted by us")  # surplus anyway: the peer forgot it first
                return
            if req.kind == "confirm":
                # The peer never completed this SA (its IKE_AUTH gave up): the duplicate
                # we kept carries the connection; the peer is not dead.
                log.info("%s: the peer never completed an IKE SA we answered", self.conn.name)
                self._down(UNCONFIRMED)
                return
            log.warning("%s: no answer after %d retransmissions", self.conn.name, policy.tries)
            self.engine._event(PeerDead(self.conn.name, self.spi_i, self.spi_r))
            if self.state == "established":
                self._down(PEER_DEAD)  # its Child SAs go with it
                return
            self._discard()
            return
        req.attempt += 1
        req.sent_at = now
        why = f"retransmission {req.attempt} of {policy.tries}"
        _trace(self.trace_name, True, codec.decode_header(req.data[0]), [], again=why)
        self.engine._emit_all(req.data, self.remote, self.nat_t)


class Engine:
    """All IKE SAs behind one local address; see the module docstring."""

    def __init__(
        self,
        local: Address,
        spi_allocator: SpiAllocator = random_spi,
        max_half_open: int = MAX_HALF_OPEN,
        cookie_threshold: int = 100,
        wall_clock: Callable[[], datetime.datetime] | None = None,
        nat_t_port: int = 4500,
    ):
        self.local = local
        self.nat_t_port = nat_t_port  # where our IKE is when it floated (NAT detection)
        self.connections: dict[str, IkeConnection] = {}
        self._by_address: dict[str, list[IkeConnection]] = {}
        self._by_identity: dict[tuple[str, str], list[IkeConnection]] = {}
        # Connections whose peer may come from a range: checked after the indexes.
        self._ranged: list[IkeConnection] = []
        self._answering: dict[str, _Answering] = {}  # by peer address; see _answering_for
        self._by_conn: dict[str, dict[int, IkeSa]] = {}
        self._timers: list[tuple[float, int, IkeSa]] = []  # heap of (deadline, seq, sa)
        self._timer_of: dict[int, float] = {}  # id(sa) -> its live deadline in the heap
        self._dirty: dict[int, IkeSa] = {}
        self._timer_seq = itertools.count()
        self._by_spi: dict[bytes, IkeSa] = {}
        self._half_open: dict[tuple[bytes, Address], IkeSa] = {}
        self._datagrams: list[Datagram] = []
        self._rx_nat_t = False  # the datagram being handled came to the NAT-T port
        self._events: list[Event] = []
        self._spi_allocator = spi_allocator
        self.max_half_open = max_half_open
        # Above this many half-open SAs, IKE_SA_INIT must carry a valid COOKIE first
        # (RFC 7296 2.6): a flood from spoofed addresses then costs us no state.
        self.cookie_threshold = cookie_threshold
        self.now = 0.0  # the time of the latest input, for schedules computed on events
        self.rng = random.Random()  # rekey jitter; tests may seed it
        self._cookies = CookieJar()
        self._invalid_spi_window = [0.0, 0]  # [start of this second, answers in it]
        # Certificate validity needs calendar time; the shell (or a test) provides it.
        self.wall_clock = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        # CRLs from the peers' distribution points and OCSP responses, fetched by the
        # shell (one cache may serve several engines).
        self.revocation_cache = certs.RevocationCache()
        # An opportunistic connection's peer authenticated: the shell makes (and adds)
        # the peer's own connection from the template and returns it; None refuses.
        self.instantiate: Callable[[IkeConnection, Address], IkeConnection | None] = (
            lambda _template, _remote: None
        )

    # public API
    def add_connection(self, conn: IkeConnection) -> None:
        self.remove_connection(conn.name)
        self._answering.clear()
        self.connections[conn.name] = conn
        for address in _peer_addresses(conn):
            self._by_address.setdefault(address, []).append(conn)
            self._by_identity.setdefault((address, conn.remote_id), []).append(conn)
        if any(r.num_addresses > 1 for r in conn.peer_ranges):
            self._ranged.append(conn)

    def remove_connection(self, name: str) -> None:
        """Forget a connection for new negotiations; its SAs are the caller's to delete
        first (delete_ike_sa), since they still reference it."""
        conn = self.connections.pop(name, None)
        if conn is None:
            return
        self._answering.clear()
        for address in _peer_addresses(conn):
            for index, key in (
                (self._by_address, address),
                (self._by_identity, (address, conn.remote_id)),
            ):
                index[key].remove(conn)
                if not index[key]:
                    del index[key]
        if conn in self._ranged:
            self._ranged.remove(conn)

    def initiate(
        self, name: str, now: float, psk_index: int = 0, remote: Address | None = None
    ) -> IkeSa:
        """Start an IKE SA of connection `name`, to its remote_address or to `remote`
        (another address of the peer's)."""
        self.now = now
        conn = self.connections[name]
        sa = IkeSa(self, conn, True, remote or conn.remote_address, os.urandom(8), bytes(8))
        sa.psk_index = psk_index
        self._by_spi[sa.spi_i] = sa
        sa.start(now)
        self._touch(sa)
        return sa

    def follow_nat_mapping(self, sa: IkeSa, remote: Address, now: float) -> None:
        """An authenticated ESP-in-UDP packet of one of `sa`'s Child SAs came from
        `remote` (the data plane checked its ICV): the NAT in front of the peer mapped it
        anew. IKE and ESP share that mapping (RFC 3948), so the IKE SA follows as for an
        authenticated IKE message, and its Child SAs with it (IkeSaMoved)."""
        self.now = now
        sa._follow(remote, esp=True)

    def receive(self, data: bytes, src: Address, now: float, nat_t: bool = False) -> None:
        """One IKE datagram from `src`; `nat_t`: it came to our NAT-T port (the shell
        has taken its non-ESP marker off)."""
        self.now = now
        self._rx_nat_t = nat_t
        try:
            msg = codec.decode_message(data)
        except codec.IkeDecodeError as exc:
            untrusted.info("dropped datagram from %s: %s", src, exc)
            return
        h = msg.header
        if h.exchange == ExchangeType.IKE_SA_INIT:
            _trace(f"{src[0]}:{src[1]}", False, h, msg.payloads)
        if h.exchange == ExchangeType.IKE_SA_INIT and not h.is_response:
            if h.spi_r != bytes(8):
                untrusted.info("IKE_SA_INIT request from %s with a responder SPI: dropped", src)
                return
            self._on_init_request(msg, data, src, now)
            return
        # The I flag says the sender is the original initiator: then our SPI is SPIr.
        local_spi = h.spi_r if h.is_initiator else h.spi_i
        sa = self._by_spi.get(local_spi)
        if sa is None or sa.initiator == h.is_initiator:
            if self._invalid_spi_hint(msg, src, now):
                return  # never answered (RFC 7296 2.21.4)
            untrusted.info("message from %s for unknown IKE SA %s", src, local_spi.hex())
            if not h.is_response:
                self._answer_invalid_ike_spi(msg, src, now)
            return
        if h.is_response:
            self._on_response(sa, msg, data, src, now)
        else:
            self._on_request(sa, msg, data, src, now)
        self._touch(sa)

    def _on_init_request(self, msg: codec.Message, data: bytes, src: Address, now: float) -> None:
        h = msg.header
        key = (h.spi_i, src)
        sa = self._half_open.get(key)
        if sa is not None:  # a retransmitted request: the same answer again
            if sa.last_response:
                _trace(sa.trace_name, False, h, [], again="answered from the cache")
                self._emit_all(sa.last_response[1], src)
            return
        if not self._connections_for(src):
            untrusted.info("IKE_SA_INIT from %s matches no connection", src)
            return
        if len(self._half_open) >= self.cookie_threshold and not self._cookie_ok(msg, src, now):
            return
        if len(self._half_open) >= self.max_half_open:
            untrusted.warning(
                "half-open limit %d reached: dropping IKE_SA_INIT from %s", self.max_half_open, src
            )
            return
        sa = IkeSa(self, None, False, src, h.spi_i, os.urandom(8))
        sa.nat_t = self._rx_nat_t
        self._half_open[key] = sa
        self._by_spi[sa.spi_r] = sa
        sa.on_init_request(msg, data, now)
        self._touch(sa)

    def _answer_invalid_ike_spi(self, msg: codec.Message, src: Address, now: float) -> None:
        """RFC 7296 2.21.4: a request for an IKE SA we do not know (we restarted?) gets
        an unprotected INVALID_IKE_SPI, with its SPIs and message ID, and no state. The
        answers are rate-limited: spoofed requests must not turn us into a reflector."""
        if not self._unprotected_allowed(now):
            return
        h = msg.header
        flags = HeaderFlag.RESPONSE | (0 if h.is_initiator else HeaderFlag.INITIATOR)
        header = codec.Header(h.spi_i, h.spi_r, h.exchange, flags, h.message_id)
        notify = codec.Notify(type=NotifyType.INVALID_IKE_SPI)
        self._emit(codec.encode_message(codec.Message(header, [notify])), src)

    def _unprotected_allowed(self, now: float) -> bool:
        """One more unprotected message this second (answers to requests for unknown
        IKE SAs, INVALID_SPI outside any IKE SA): spoofed input must not make us a
        reflector."""
        if now - self._invalid_spi_window[0] >= 1.0:
            self._invalid_spi_window = [now, 0]
        if self._invalid_spi_window[1] >= INVALID_SPI_ANSWERS_PER_SECOND:
            return False
        self._invalid_spi_window[1] += 1
        return True

    def tell_unknown_spi(self, src: str, spi: int, now: float, ah: bool = False) -> bool:
        """ESP or AH came from `src` on an SPI we do not hold, and no IKE SA with `src`
        can say so (we restarted and lost them?): an unprotected INFORMATIONAL with
        INVALID_SPI (RFC 7296 1.5), only to a peer a connection names by its address,
        rate-limited. The peer takes it as a hint to check that IKE SA's liveness, and
        learns we forgot it within a round trip, not at its next DPD. True if sent."""
        self.now = now
        conns = self._by_address.get(src, [])
        if not conns or not self._unprotected_allowed(now):
            return False
        header = codec.Header(
            os.urandom(8), bytes(8), ExchangeType.INFORMATIONAL, HeaderFlag.INITIATOR, 0
        )
        notify = codec.Notify(
            type=NotifyType.INVALID_SPI,
            protocol=ProtocolId.AH if ah else ProtocolId.ESP,
            data=struct.pack("!I", spi),
        )
        untrusted.info(
            "%s: %s for unknown SPI %08x, and no IKE SA with it: INVALID_SPI unprotected",
            conns[0].name, "AH" if ah else "ESP", spi,
        )  # fmt: skip
        self._emit(codec.encode_message(codec.Message(header, [notify])),
                   (src, conns[0].remote_address[1]), nat_t=False)  # fmt: skip
        return True

    def _invalid_spi_hint(self, msg: codec.Message, src: Address, now: float) -> bool:
        """An unprotected INVALID_SPI outside any IKE SA (tell_unknown_spi at the peer):
        it proves nothing, so it changes no state and gets no answer; a hint to check the
        liveness of the IKE SAs that hold a Child SA sending on that SPI (RFC 7296 2.21.4),
        each at most once per HINT_INTERVAL. True if it was such a message."""
        h = msg.header
        if h.is_response or h.exchange != ExchangeType.INFORMATIONAL:
            return False
        notify = next(
            (
                p
                for p in msg.payloads
                if isinstance(p, codec.Notify) and p.type == NotifyType.INVALID_SPI
            ),
            None,
        )
        if notify is None:
            return False
        raw = notify.data if len(notify.data) == 4 else notify.spi
        spi = int.from_bytes(raw, "big") if len(raw) == 4 else None
        for sa in self.sas_with(src[0]):
            if sa.state != "established" or sa.superseded:
                continue
            if not any(c.spi_out == spi for c in sa.children.values()):
                continue
            if sa.hinted_at is not None and now - sa.hinted_at < HINT_INTERVAL:
                continue
            sa.hinted_at = now
            untrusted.info(
                "%s: the peer says it does not know Child SA %08x (unprotected INVALID_SPI): "
                "checking its liveness", sa.conn.name, spi,
            )  # fmt: skip
            if sa.request is None:
                self.check_liveness(sa, now)
        return True

    def _cookie_ok(self, msg: codec.Message, src: Address, now: float) -> bool:
        """True if the request carries our COOKIE; else answer with one (no state kept)."""
        nonce = msg.get(codec.Nonce)
        if nonce is None:
            return False
        ip = ipaddress.ip_address(src[0]).packed
        first = msg.payloads[0] if msg.payloads else None
        if (
            isinstance(first, codec.Notify)
            and first.type == NotifyType.COOKIE
            and self._cookies.check(now, first.data, nonce.data, ip, msg.header.spi_i)
        ):
            return True
        cookie = self._cookies.make(now, nonce.data, ip, msg.header.spi_i)
        header = codec.Header(
            msg.header.spi_i, bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.RESPONSE, 0
        )
        self._emit(
            codec.encode_message(
                codec.Message(header, [codec.Notify(type=NotifyType.COOKIE, data=cookie)])
            ),
            src,
        )
        return False

    def delete_ike_sa(self, sa: IkeSa, now: float) -> None:
        """Delete an IKE SA and its Child SAs; if a rekey has just replaced it, the new
        one is what the caller means (the old one goes with the rekey anyway)."""
        while sa.successor is not None and sa.successor.state == "established":
            sa = sa.successor
        if not sa._deleting_ike():
            sa.queue("delete_ike", now)
        self._touch(sa)

    def delete_child_sa(self, sa: IkeSa, spi_in: int, now: float) -> None:
        sa.queue("delete_child", now, spi_in)
        self._touch(sa)

    def rekey_child_sa(self, sa: IkeSa, spi_in: int, now: float) -> None:
        """Rekey a Child SA make-before-break: ChildSaReady (rekeyed_from=spi_in) for the
        new one, then ChildSaDeleted for the old one. ValueError for a Child SA that is
        already replaced or going (the caller learns it, instead of waiting for nothing)."""
        if spi_in not in sa.live_children():
            state = "unknown" if spi_in not in sa.children else "already replaced or going"
            raise ValueError(f"Child SA {spi_in:08x} is {state}: nothing to rekey")
        sa.queue("rekey_child", now, spi_in)
        self._touch(sa)

    def create_child_sa(self, sa: IkeSa, child: str, now: float) -> None:
        """Negotiate another Child SA of the connection's child `child` on this IKE SA."""
        params = next((c for c in sa.conn.children if c.name == child), None)
        if params is None:
            raise ValueError(f"connection {sa.conn.name!r} has no child {child!r}")
        sa.queue("create_child", now, params)
        self._touch(sa)

    def expire_ike_sa(self, sa: IkeSa, now: float) -> None:
        """The IKE SA outlived its rekey or reauthentication (over_time): it is deleted,
        with a Delete when the exchange window is free. When a request still waits for
        its answer (lost, retransmitted for up to minutes), it goes at once without one:
        its keys may not serve past their lifetime, and a Delete could only follow that
        request. A new IKE SA's INITIAL_CONTACT then tells the peer to drop it too."""
        if sa.request is None or sa._deleting_ike():
            self.delete_ike_sa(sa, now)
            return
        log.info("%s: IKE SA expired with request #%d unanswered: dropped without a Delete",
                 sa.conn.name, sa.request.message_id)  # fmt: skip
        sa.request, sa.pending = None, []
        sa._down(EXPIRED)
        self._touch(sa)

    def rekey_ike_sa(self, sa: IkeSa, now: float) -> None:
        """Rekey the IKE SA: IkeSaRekeyed, then the old one goes ("replaced by rekey")."""
        sa.queue("rekey_ike", now)
        self._touch(sa)

    def reauthenticate(self, sa: IkeSa, now: float) -> IkeSa:
        """Reauthenticate make-before-break: a new IKE SA (IKE_SA_INIT and IKE_AUTH again)
        brings up the connection's children; once all are up, the old IKE SA is deleted
        ("replaced by reauthentication"). If the new one fails, the old one stays."""
        if sa.state != "established":
            raise ValueError(f"IKE SA is {sa.state}, not established")
        new = self.initiate(sa.conn.name, now)
        new.reauth_of = sa
        return new

    def notify_invalid_spi(self, sa: IkeSa, spi: int, now: float, ah: bool = False) -> None:
        """Tell the peer it sent ESP on an SPI we do not hold (RFC 7296 2.21.4); the
        shell calls this for the data plane's rate-limited reports. At most a few wait
        in the queue: ESP with spoofed sources must not grow it."""
        if sum(kind == "invalid_spi" for kind, _unused in sa.pending) >= MAX_QUEUED_INVALID_SPI:
            log.info("%s: INVALID_SPI for %08x not sent: enough are queued", sa.conn.name, spi)
            return
        sa.queue("invalid_spi", now, (ProtocolId.AH if ah else ProtocolId.ESP, spi))
        self._touch(sa)

    def _want_revocation(self, name: str, fetches: tuple[certs.Fetch, ...]) -> None:
        """Ask the shell for CRLs and OCSP responses (once while it fetches them)."""
        new = self.revocation_cache.want(fetches)
        if new:
            what = ", ".join(f"{'OCSP' if f.body else 'the CRL'} at {f.uri}" for f in new)
            log.info("%s: IKE_AUTH waits on %s", name, what)
            self._event(RevocationWanted(name, tuple(dict.fromkeys(f.uri for f in new))))

    def check_liveness(self, sa: IkeSa, now: float) -> None:
        """Dead peer detection: an empty INFORMATIONAL; PeerDead if it goes unanswered."""
        sa.queue("dpd", now)
        self._touch(sa)

    def tick(self, now: float) -> None:
        """Run the SAs whose deadline has come (retransmissions, DPD, lifetimes)."""
        self.now = now
        self._refresh_timers()
        due = []
        while self._timers and self._timers[0][0] <= now:
            deadline, _unused, sa = heapq.heappop(self._timers)
            if self._timer_of.get(id(sa)) == deadline:
                del self._timer_of[id(sa)]
                due.append(sa)
        for sa in due:
            sa.tick(now)
            self._touch(sa)

    def next_deadline(self) -> float | None:
        self._refresh_timers()
        while self._timers:
            deadline, _unused, sa = self._timers[0]
            if self._timer_of.get(id(sa)) == deadline:
                return deadline
            heapq.heappop(self._timers)  # superseded or forgotten
        return None

    # Deadlines live in a heap, recomputed only for the SAs an input touched: an agent
    # with thousands of IKE SAs must not scan them all for every datagram.
    def _touch(self, sa: IkeSa) -> None:
        self._dirty[id(sa)] = sa

    def _refresh_timers(self) -> None:
        for key, sa in self._dirty.items():
            deadline = sa.deadline() if sa.state not in ("failed", "deleted") else None
            if deadline == self._timer_of.get(key):
                continue
            if deadline is None:
                self._timer_of.pop(key, None)
            else:
                self._timer_of[key] = deadline
                heapq.heappush(self._timers, (deadline, next(self._timer_seq), sa))
        self._dirty.clear()

    def pop_datagrams(self) -> list[Datagram]:
        out, self._datagrams = self._datagrams, []
        return out

    def pop_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def sas(self) -> list[IkeSa]:
        return list({id(s): s for s in self._by_spi.values()}.values())

    def allocate_spi(self, sa: IkeSa, child: str, protocol: str) -> bytes:
        """An inbound SPI for a Child SA of `child` on `sa`, as sent in its proposal."""
        spi = self._spi_allocator(sa.conn.name, child, protocol, sa.remote[0])
        return spi.to_bytes(4, "big")

    # internals used by IkeSa
    def _on_response(
        self, sa: IkeSa, msg: codec.Message, data: bytes, src: Address, now: float
    ) -> None:
        h = msg.header
        if sa.request is None or h.message_id != sa.request.message_id:
            untrusted.info("%s: unexpected response id %d", sa.conn.name, h.message_id)
            return
        if h.exchange == ExchangeType.IKE_SA_INIT and sa.state == "init":
            sa._on_init_response(msg, data, now)
            return
        if sa.request.kind == "delete_ike" and msg.notifies(NotifyType.INVALID_IKE_SPI):
            # Unprotected, so it proves nothing, but it can only end an SA we are
            # deleting anyway: the peer no longer knows it (a crossing Delete won).
            sa._down("deleted by us")
            return
        if msg.notifies(NotifyType.INVALID_IKE_SPI) and sa.state == "established":
            sa._peer_may_have_restarted(now)
            return
        # Each handler below takes the request in flight for its own exchange's.
        if h.exchange != codec.decode_header(sa.request.data[0]).exchange:
            untrusted.info(
                "%s: response of exchange %d to another: dropped", sa.conn.name, h.exchange
            )
            return
        expected = {
            ExchangeType.IKE_AUTH: "auth",
            ExchangeType.INFORMATIONAL: "established",
            ExchangeType.CREATE_CHILD_SA: "established",
        }
        if expected.get(h.exchange) != sa.state:
            untrusted.info(
                "%s: response to exchange %d in state %s dropped",
                sa.conn.name,
                h.exchange,
                sa.state,
            )
            return
        try:
            inner = sa._open(msg, data)
        except codec.IkeDecodeError as exc:
            untrusted.info(
                "%s: dropped %s response: %s", sa.conn.name, ExchangeType(h.exchange).name, exc
            )
            return
        if inner is None:
            return  # more fragments to come
        sa._follow(src)
        if h.exchange == ExchangeType.IKE_AUTH:
            sa._on_auth_response(inner, now)
            return
        if h.exchange == ExchangeType.INFORMATIONAL:
            sa._on_informational_response(inner, now, src)
        elif sa.request.kind == "rekey_ike":
            sa._on_rekey_ike_response(inner, now)
        else:
            sa._on_child_response(inner, now)
        sa._peer_holds_it(now)

    def _on_request(
        self, sa: IkeSa, msg: codec.Message, data: bytes, src: Address, now: float
    ) -> None:
        h = msg.header
        if sa.last_response and h.message_id == sa.last_response[0]:
            # A retransmitted request: answer it again, once per retransmission (RFC
            # 7383 2.6.1: a fragmented one is recognised by its first fragment).
            last = msg.payloads[-1] if msg.payloads else None
            if not isinstance(last, codec.EncryptedFragment) or last.number == 1:
                _trace(sa.trace_name, False, h, [], again="answered from the cache")
                self._emit_all(sa.last_response[1], src)
            return
        if h.message_id != sa.recv_mid:
            untrusted.info(
                "request id %d outside the window (expected %d)", h.message_id, sa.recv_mid
            )
            return
        try:
            inner = sa._open(msg, data)
        except codec.IkeDecodeError as exc:
            untrusted.info("dropped request from %s: %s", sa.remote, exc)
            return
        if inner is None:
            return  # more fragments to come
        # Answer where the request came from: a peer behind NAT (or one that floated
        # to the NAT-T port, RFC 7296 2.23) is only reachable there.
        if h.exchange == ExchangeType.IKE_AUTH and sa.state == "auth":
            # Keyed by the address IKE_SA_INIT came from, before a float to 4500.
            self._half_open.pop((sa.spi_i, sa.remote), None)
        sa._follow(src)
        if sa.mobike:
            sa.reply_to = (src, self._rx_nat_t)
        else:
            sa.remote, sa.nat_t = src, self._rx_nat_t
        if h.exchange == ExchangeType.IKE_AUTH and sa.state == "auth":
            sa.recv_mid += 1
            sa.on_auth_request(inner, h.message_id, now)
        elif h.exchange == ExchangeType.INFORMATIONAL and sa.state == "established":
            sa.recv_mid += 1
            deletes = (p for p in inner if isinstance(p, codec.Delete))
            if not any(d.protocol == ProtocolId.IKE for d in deletes):
                sa._peer_uses_it(now)
            if sa.mobike and _notified(inner, NotifyType.UPDATE_SA_ADDRESSES):
                sa.on_update_sa_addresses(inner, h.message_id, src, now)
            else:
                sa.on_informational_request(inner, h.message_id)
            sa._peer_holds_it(now)
        elif h.exchange == ExchangeType.CREATE_CHILD_SA and sa.state == "established":
            sa.recv_mid += 1
            sa._peer_uses_it(now)
            sa.on_create_child_request(inner, h.message_id)
            sa._peer_holds_it(now)
        else:
            untrusted.info(
                "%s: exchange %d in state %s not handled yet", sa.remote, h.exchange, sa.state
            )

    def _established_with(self, name: str, remote_id: str, besides: IkeSa) -> list[IkeSa]:
        """Established IKE SAs of connection `name` with peer `remote_id`, but `besides`."""
        return [
            sa
            for sa in self.sas_of(name)
            if sa is not besides and sa.state == "established" and sa.remote_id == remote_id
        ]

    def _answering_for(self, remote: Address) -> _Answering:
        """How to answer an IKE_SA_INIT from `remote` (it matches a connection)."""
        found = self._answering.get(remote[0])
        if found is None:
            if len(self._answering) >= ANSWERING_CACHE:
                self._answering.clear()
            found = self._answering[remote[0]] = _Answering.of(self._connections_for(remote))
        return found

    def _connections_for(
        self, remote: Address, remote_id: str | None = None
    ) -> list[IkeConnection]:
        """Connections to this peer address (and identity): indexed, since one agent may
        hold thousands of connections; then those whose peer may come from a range."""
        # An opportunistic template takes the peer whose identity is its address.
        own_address = remote_id is not None and _is_address(remote_id, remote[0])
        if remote_id is not None:
            exact = self._by_identity.get((remote[0], remote_id), [])
            if own_address:
                exact = exact + [c for c in self._by_address.get(remote[0], []) if c.opportunistic]
        else:
            exact = self._by_address.get(remote[0], [])
        if not self._ranged:
            return exact
        address = ipaddress.ip_address(remote[0])
        ranged = [
            c
            for c in self._ranged
            if (remote_id is None or c.remote_id == remote_id or (c.opportunistic and own_address))
            and c not in exact
            and any(address in r for r in c.peer_ranges if r.version == address.version)
        ]
        return exact + ranged

    def _nat_notifies(
        self,
        spi_i: bytes,
        spi_r: bytes,
        remote: Address,
        swap: bool = False,
        local: Address | None = None,
    ) -> list[codec.Notify]:
        """NAT_DETECTION_SOURCE/DESTINATION_IP for a message to `remote` (from `local`,
        by default our IKE port); with swap, the values a message from `remote` to us
        should carry."""

        def digest(address: Address) -> bytes:
            packed = codec.ip_address(address[0]).packed
            # SHA-1 is what RFC 7296 2.23 prescribes here (not a security function).
            return hashlib.sha1(spi_i + spi_r + packed + struct.pack("!H", address[1])).digest()

        local = local or self.local
        src, dst = (remote, local) if swap else (local, remote)
        return [
            codec.Notify(type=NotifyType.NAT_DETECTION_SOURCE_IP, data=digest(src)),
            codec.Notify(type=NotifyType.NAT_DETECTION_DESTINATION_IP, data=digest(dst)),
        ]

    def _nat_mismatch(
        self, msg: codec.Message, spi_i: bytes, spi_r: bytes, remote: Address
    ) -> tuple[bool, bool]:
        """(the peer's address is translated, ours is): the peer's NAT_DETECTION hashes
        against the addresses we see; (False, False) if it sent none."""
        expected_src, expected_dst = (
            n.data for n in self._nat_notifies(spi_i, spi_r, remote, swap=True)
        )
        src = [n.data for n in msg.notifies(NotifyType.NAT_DETECTION_SOURCE_IP)]
        dst = [n.data for n in msg.notifies(NotifyType.NAT_DETECTION_DESTINATION_IP)]
        if not src and not dst:
            return False, False
        return expected_src not in src, expected_dst not in dst

    def _index(self, sa: IkeSa) -> None:
        self._by_spi[sa.local_spi] = sa
        self._touch(sa)

    def sa_by_spi(self, spi: bytes) -> IkeSa | None:
        """The IKE SA whose SPI on our side is `spi`."""
        return self._by_spi.get(spi)

    def sas_with(self, remote_ip: str) -> list[IkeSa]:
        """The IKE SAs with a peer address (the connections' indexes, then the SAs of
        connections to ranges that are with that address now)."""
        exact = self._by_address.get(remote_ip, [])
        sas = [sa for c in exact for sa in self.sas_of(c.name)]
        for conn in self._ranged:
            if conn not in exact:
                sas += [sa for sa in self.sas_of(conn.name) if sa.remote[0] == remote_ip]
        return sas

    def sas_of(self, name: str) -> list[IkeSa]:
        """The IKE SAs of connection `name` (any state but failed and deleted)."""
        return list(self._by_conn.get(name, {}).values())

    def _forget(self, sa: IkeSa) -> None:
        self._timer_of.pop(id(sa), None)
        if sa.conn is not None:
            by_name = self._by_conn.get(sa.conn.name, {})
            by_name.pop(id(sa), None)
            if not by_name:
                self._by_conn.pop(sa.conn.name, None)
        for key in [k for k, v in self._by_spi.items() if v is sa]:
            del self._by_spi[key]
        for key in [k for k, v in self._half_open.items() if v is sa]:
            del self._half_open[key]

    def _emit(self, data: bytes, dst: Address, nat_t: bool | None = None) -> None:
        """Queue a datagram; `nat_t` None: the way the datagram being handled came in
        (an answer without state goes back where its request came from)."""
        nat_t = self._rx_nat_t if nat_t is None else nat_t
        self._datagrams.append(Datagram(data, self.local, dst, nat_t))

    def _emit_all(
        self, datagrams: tuple[bytes, ...], dst: Address, nat_t: bool | None = None
    ) -> None:
        for data in datagrams:
            self._emit(data, dst, nat_t)

    def _event(self, event: Event) -> None:
        self._events.append(event)
