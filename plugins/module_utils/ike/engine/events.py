"""What the engine tells its shell: datagrams to send and protocol events."""

from __future__ import annotations

from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True)
class Datagram:
    data: bytes
    src: Address
    dst: Address
    # From the NAT-T port: the shell prepends the non-ESP marker (RFC 3948), except to
    # a NAT keepalive.
    nat_t: bool = False


@dataclass(frozen=True)
class IkeSaUp:
    connection: str
    spi_i: bytes
    spi_r: bytes
    initiator: bool
    proposal: str  # strongSwan-style name of the chosen suite
    remote_id: str


@dataclass(frozen=True)
class ChildSaReady:
    """A Child SA to install: the shell hands it to the data plane. Keys are the
    outbound and inbound ones from this side's point of view."""

    connection: str
    child: str
    protocol: str  # esp | ah
    mode: str  # tunnel | transport
    spi_in: int
    spi_out: int
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    proposal: str
    encr_id: int
    encr_key_bits: int | None
    integ_id: int
    key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    key_in: bytes = field(repr=False)
    integ_key_in: bytes = field(repr=False)
    esn: bool = False
    rekeyed_from: int = 0  # inbound SPI of the Child SA this one replaces (0: new)
    local_address: str = ""  # outer addresses of the SA (the IKE SA's endpoints)
    remote_address: str = ""
    # Its IKE SA came with INITIAL_CONTACT: the peer holds none of our older SAs (it
    # restarted), so nothing older is worth sending on.
    peer_initial_contact: bool = False
    udp_encap: bool = False  # ESP in UDP (NAT detected or the IKE SA floated)
    # The peer's port for ESP in UDP: its NAT-T port as the IKE SA sees it (a NAT in
    # front of the peer may have mapped it to another).
    encap_port: int = 4500
    ike_initiator: bool = False  # we initiated the IKE SA that carries this Child SA
    # We initiated the exchange that made this Child SA. A rekey's responder should keep
    # sending on the old SA until the initiator deletes it (it may not have the new
    # inbound SA yet); the initiator can switch at once.
    initiated: bool = False
    # A rekey collision made it surplus as it was made (RFC 7296 2.8.1): it is deleted
    # next. Install its inbound half only (the peer may send on it until then), never
    # send on it: the peer drops it at the Delete's request, before we hear back.
    redundant: bool = False


@dataclass(frozen=True)
class ChildSaDeleted:
    connection: str
    child: str
    spi_in: int
    spi_out: int
    reason: str


@dataclass(frozen=True)
class IkeSaRekeyed:
    connection: str
    old_spi_i: bytes
    old_spi_r: bytes
    spi_i: bytes
    spi_r: bytes
    proposal: str


@dataclass(frozen=True)
class IkeSaMoved:
    """The peer is at a new address or port: its NAT mapped it anew (RFC 7296 2.23, an
    authenticated message came from `remote`), or it moved with MOBIKE (RFC 4555,
    `mobike`, once a request of ours reached it there). The IKE SA sends there now, and
    so must its Child SAs; `nat` says whether they need UDP encapsulation from now on
    (None: as before)."""

    connection: str
    spi_i: bytes
    spi_r: bytes
    remote: Address
    previous: Address
    nat: bool | None = None
    mobike: bool = False


@dataclass(frozen=True)
class IkeSaConfirmed:
    """The peer sent on an IKE SA that it made and we answered (its IKE_AUTH or its
    rekey), or answered a request of ours on it: it holds the SA. Before, our answer may
    have been lost and the peer hold nothing of it or of its Child SAs."""

    connection: str
    spi_i: bytes
    spi_r: bytes


@dataclass(frozen=True)
class IkeSaDown:
    connection: str
    spi_i: bytes
    spi_r: bytes
    reason: str


@dataclass(frozen=True)
class AuthFailed:
    connection: str
    reason: str
    # False: a peer's IKE_AUTH that we refused as responder (anyone may send one, so it
    # says nothing about our own initiations of the connection).
    initiator: bool = True


@dataclass(frozen=True)
class PeerDead:
    connection: str
    spi_i: bytes
    spi_r: bytes


@dataclass(frozen=True)
class NegotiationFailed:
    connection: str
    reason: str
    notify: int | None = None


@dataclass(frozen=True)
class RevocationWanted:
    """IKE_AUTH of `connection` waits on revocation data from these URIs (CRL
    distribution points, OCSP responders): the shell fetches what the engine's
    revocation_cache lists as wanted (the peer's retransmission, or ours, then finds
    it)."""

    connection: str
    uris: tuple[str, ...]


# Classes union at run time since Python 3.10; pylint as ansible-test runs it thinks not.
# pylint: disable=unsupported-binary-operation
Event = (
    IkeSaUp
    | ChildSaReady
    | ChildSaDeleted
    | IkeSaDown
    | AuthFailed
    | PeerDead
    | NegotiationFailed
    | RevocationWanted
)
# pylint: enable=unsupported-binary-operation
