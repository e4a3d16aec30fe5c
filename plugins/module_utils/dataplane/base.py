"""The one interface every data plane implements (kernel XFRM, userspace ESP, recording
fake). The agent programs SAs and policies through it and receives its events; the IKE
engine knows nothing of it (DESIGN.md).

Algorithms are named as in strongSwan's proposal keywords, without key sizes (the key
length is the key's): enc "aes-gcm-16" | "chacha20-poly1305" | "aes-cbc" | "null",
integ "hmac-sha2-256-128" | "hmac-sha2-384-192" | "hmac-sha2-512-256" | None for AEAD.
AEAD keys carry their salt at the end (RFC 4106/7634 KEYMAT layout: key || salt).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

# SAs and policies Keyway installs carry a reqid in this range, so that reconcile and
# teardown recognise them and never touch a foreign daemon's state.
KEYWAY_REQID_MIN = 0x4B570000  # "KW" in the high half
KEYWAY_REQID_MAX = 0x4B57FFFF
# Seconds an SPI that allocate_spi reserved stays reserved if no SA is installed with
# it (a negotiation that failed); the kernel's larval SA goes sooner (30 s).
SPI_RESERVATION = 600.0


def is_keyway_reqid(reqid: int) -> bool:
    return KEYWAY_REQID_MIN <= reqid <= KEYWAY_REQID_MAX


class DataPlaneError(Exception):
    """An operation the data plane refused; the message says which and why (e.g. the
    kernel's errno), so that nothing is silently swallowed."""


class Mode(enum.StrEnum):
    TUNNEL = "tunnel"
    TRANSPORT = "transport"


class IpsecProto(enum.StrEnum):
    ESP = "esp"
    AH = "ah"


class Direction(enum.StrEnum):
    IN = "in"
    OUT = "out"
    FWD = "fwd"


class PolicyAction(enum.StrEnum):
    PROTECT = "protect"  # apply the templates (IPsec)
    PASS = "pass"  # let through in the clear
    DROP = "drop"


@dataclass(frozen=True)
class Lifetime:
    """Soft limits raise a soft expire event (time to rekey), hard ones delete the SA.
    0 means no limit."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_seconds: int = 0
    hard_seconds: int = 0


@dataclass(frozen=True)
class UdpEncap:
    """ESP in UDP (RFC 3948), normally 4500 -> 4500."""

    sport: int = 4500
    dport: int = 4500


@dataclass(frozen=True)
class Selector:
    """Traffic selector of an SA or policy: prefixes, upper-layer protocol and ports."""

    src: str  # CIDR, e.g. "10.1.0.0/24" or "2001:db8::11/128"
    dst: str
    proto: int = 0  # 0: any
    sport: int = 0  # 0: any
    dport: int = 0


@dataclass(frozen=True)
class SaId:
    """How an SA is found: destination, protocol, SPI (RFC 4301)."""

    dst: str
    proto: IpsecProto
    spi: int


@dataclass(frozen=True)
class SaSpec:
    src: str  # outer addresses
    dst: str
    proto: IpsecProto
    spi: int
    mode: Mode
    reqid: int
    enc_alg: str | None = None
    enc_key: bytes = field(default=b"", repr=False)
    integ_alg: str | None = None
    integ_key: bytes = field(default=b"", repr=False)
    icv_bits: int = 128  # AEAD ICV length
    selector: Selector | None = None
    encap: UdpEncap | None = None
    replay_window: int = 128
    esn: bool = True
    lifetime: Lifetime = Lifetime()
    mark: tuple[int, int] | None = None  # (value, mask)
    if_id: int = 0

    @property
    def id(self) -> SaId:
        return SaId(self.dst, self.proto, self.spi)


@dataclass(frozen=True)
class Template:
    """Which SA a PROTECT policy uses: outer addresses (tunnel mode), proto, mode, reqid."""

    proto: IpsecProto
    mode: Mode
    reqid: int
    src: str = ""  # tunnel endpoints; empty in transport mode
    dst: str = ""


@dataclass(frozen=True)
class PolicyId:
    selector: Selector
    direction: Direction
    mark: tuple[int, int] | None = None
    if_id: int = 0


@dataclass(frozen=True)
class PolicySpec:
    selector: Selector
    direction: Direction
    action: PolicyAction = PolicyAction.PROTECT
    templates: tuple[Template, ...] = ()
    priority: int = 0  # 0: the plane derives one from the selector's specificity
    mark: tuple[int, int] | None = None
    if_id: int = 0

    @property
    def id(self) -> PolicyId:
        return PolicyId(self.selector, self.direction, self.mark, self.if_id)


@dataclass(frozen=True)
class SaCounters:
    bytes: int = 0
    packets: int = 0
    replay_dropped: int = 0
    integrity_failed: int = 0
    add_time: float = 0.0  # unix time
    use_time: float = 0.0  # unix time of first use, 0 if unused


@dataclass(frozen=True)
class ExpireEvent:
    sa: SaId
    hard: bool  # False: soft (rekey now), True: hard (the SA is gone)
    reqid: int = 0


@dataclass(frozen=True)
class AcquireEvent:
    """A packet hit a trap policy with no SA: negotiate one. As XFRM reports it, on both
    planes: `selector` is the packet's flow (its addresses as /32 or /128, protocol and
    ports), `src` and `dst` the SA's endpoints (the policy template's in tunnel mode,
    the packet's addresses in transport mode)."""

    selector: Selector
    reqid: int
    src: str = ""
    dst: str = ""


@dataclass(frozen=True)
class SeqOverflowEvent:
    """Outbound sequence numbers are about to run out: rekey (never wrap)."""

    sa: SaId
    reqid: int = 0


@dataclass(frozen=True)
class UnknownSpiEvent:
    """ESP or AH arrived for an SPI no SA has (rate-limited): the sender may be using an
    SA we lost, and can be told so (INVALID_SPI, RFC 7296 2.21.4)."""

    proto: int
    spi: int
    src: str
    dst: str


@dataclass(frozen=True)
class MappingEvent:
    """An authenticated ESP-in-UDP packet of `sa` came from another address or port
    than its encapsulation says: the NAT in front of the peer mapped it anew (as the
    kernel's XFRM_MSG_MAPPING reports)."""

    sa: SaId
    reqid: int
    src: str
    sport: int


# Classes union at run time since Python 3.10; pylint as ansible-test runs it thinks not.
# pylint: disable-next=unsupported-binary-operation
DataPlaneEvent = ExpireEvent | AcquireEvent | SeqOverflowEvent | UnknownSpiEvent | MappingEvent
EventSink = Callable[[DataPlaneEvent], None]


class DataPlane(abc.ABC):
    """Install, update and remove SAs and policies; report expiry and acquire events.

    Methods are synchronous and raise DataPlaneError with a specific message. Planes
    that need an event loop (the userspace one) start in `start` and stop in `stop`.
    """

    name: str = "abstract"

    async def start(self, events: EventSink) -> None:  # noqa: B027 (optional hook)
        """Begin delivering events to `events`; planes without a loop just keep it."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """Stop the plane's loop; SAs and policies stay unless flushed."""

    def prepare_ike_socket(self, sock) -> None:  # noqa: B027 (optional hook)
        """Exempt the agent's IKE socket from this plane's policies, so that IKE between
        two hosts protected in transport mode is never itself protected."""

    def prepare_nat_t_socket(self, sock) -> None:
        """The same for the NAT-T (4500) socket, plus what the plane needs to receive ESP
        in UDP there (the kernel's UDP_ENCAP)."""
        self.prepare_ike_socket(sock)

    @abc.abstractmethod
    def allocate_spi(self, src: str, dst: str, proto: IpsecProto, reqid: int) -> int:
        """Reserve an inbound SPI (dst is local) unique on this host, outside 1-255;
        install_sa of an SA with it takes the reservation up."""

    @abc.abstractmethod
    def install_sa(self, sa: SaSpec) -> None:
        """Install an SA (keys included)."""

    @abc.abstractmethod
    def update_sa(self, sa: SaSpec) -> None:
        """Replace an SA's mutable parts (lifetimes, encap) keeping counters."""

    @abc.abstractmethod
    def move_sa(self, sa: SaId, src: str, dst: str, encap: UdpEncap | None) -> SaSpec:
        """Give an SA other outer addresses and UDP encapsulation, keeping its keys,
        sequence numbers and replay window (the peer's NAT moved it to another address,
        RFC 7296 2.23). Returns the SA as it is now: its id changes with `dst`."""

    @abc.abstractmethod
    def delete_sa(self, sa: SaId) -> None:
        """Remove an SA."""

    @abc.abstractmethod
    def list_sas(self) -> list[SaSpec]:
        """Keyway's SAs on this plane (keys included: callers must redact)."""

    @abc.abstractmethod
    def sa_counters(self, sa: SaId) -> SaCounters:
        """Bytes and packets an SA has carried."""

    @abc.abstractmethod
    def install_policy(self, policy: PolicySpec) -> None:
        """Install a policy."""

    def install_policies(
        self, policies: list[PolicySpec]
    ) -> list[tuple[PolicySpec, DataPlaneError]]:
        """Install several policies; returns those refused, each with its own error (the
        others are installed). Planes that can install many at once override this."""
        failed = []
        for policy in policies:
            try:
                self.install_policy(policy)
            except DataPlaneError as exc:
                failed.append((policy, exc))
        return failed

    @abc.abstractmethod
    def update_policy(self, policy: PolicySpec) -> None:
        """Replace an installed policy of the same id in one step (its templates' tunnel
        endpoints moved with the peer): no packet finds the policy missing meanwhile."""

    @abc.abstractmethod
    def remove_policy(self, policy: PolicyId) -> None:
        """Remove a policy."""

    @abc.abstractmethod
    def list_policies(self) -> list[PolicySpec]:
        """Keyway's policies on this plane."""

    @abc.abstractmethod
    def flush_owned(self) -> None:
        """Remove every SA and policy Keyway owns here, and nothing else."""
