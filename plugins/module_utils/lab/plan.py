"""What a lab of N hosts consists of: a pure function of its name and size."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field

# Underlay: documentation prefixes (RFC 5737, RFC 3849). Host hN has .10+N, so the
# /24 holds at most 244 hosts; that is the lab's size limit.
UNDERLAY_V4 = ipaddress.IPv4Network("192.0.2.0/24")
UNDERLAY_V6 = ipaddress.IPv6Network("2001:db8::/64")
HOST_OFFSET = 10
MAX_HOSTS = 254 - HOST_OFFSET
# Site subnets behind hosts (for site-to-site and hub-and-spoke), one per host.
SITE_V4 = "10.{index}.0.0/24"
SITE_V6 = "fd00:{index:x}::/64"

NAMESPACE_PREFIX = "kw-"
DEFAULT_ROOT = "/run/keyway-lab"
DEFAULT_LAB = "lab"
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class LabError(Exception):
    """A lab request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class LabHost:
    name: str
    index: int
    netns: str
    ipv4: str
    ipv6: str
    prefix4: int
    prefix6: int
    site4: str
    site6: str
    config_dir: str
    state_dir: str
    run_dir: str

    @property
    def site4_address(self) -> str:
        """The host's own address inside its site subnet (the first one)."""
        return str(next(ipaddress.ip_network(self.site4).hosts()))

    @property
    def site6_address(self) -> str:
        return str(ipaddress.ip_network(self.site6)[1])


@dataclass(frozen=True)
class LabPlan:
    name: str
    root: str
    switch_netns: str
    bridge: str = "br0"
    hosts: tuple[LabHost, ...] = field(default_factory=tuple)

    @property
    def lab_dir(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def state_file(self) -> str:
        return f"{self.lab_dir}/lab.json"

    def namespaces(self) -> list[str]:
        return [self.switch_netns] + [h.netns for h in self.hosts]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LabPlan:
        hosts = tuple(LabHost(**h) for h in data["hosts"])
        return cls(**{**data, "hosts": hosts})


def plan_lab(hosts: int, name: str = DEFAULT_LAB, root: str = DEFAULT_ROOT) -> LabPlan:
    """The lab of `hosts` hosts called `name`, its state under `root`."""
    if not _LAB_NAME.match(name):
        raise LabError(
            f"lab name {name!r} is invalid: use 1 to 8 lowercase letters and digits, "
            "starting with a letter"
        )
    if isinstance(hosts, bool) or not isinstance(hosts, int):
        raise LabError(f"lab size must be an integer, got {hosts!r}")
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(
            f"lab size {hosts} is out of range: a lab has 1 to {MAX_HOSTS} hosts "
            f"(the underlay {UNDERLAY_V4} gives each host .{HOST_OFFSET}+N)"
        )
    base = f"{NAMESPACE_PREFIX}{name}"
    lab_dir = f"{root}/{name}"
    members = []
    for index in range(1, hosts + 1):
        host = f"h{index}"
        members.append(
            LabHost(
                name=host,
                index=index,
                netns=f"{base}-{host}",
                ipv4=str(UNDERLAY_V4[HOST_OFFSET + index]),
                # Same digits as the IPv4 host part, read as hex: h1 is ::11.
                ipv6=str(ipaddress.IPv6Address(f"2001:db8::{HOST_OFFSET + index}")),
                prefix4=UNDERLAY_V4.prefixlen,
                prefix6=UNDERLAY_V6.prefixlen,
                site4=SITE_V4.format(index=index),
                site6=str(ipaddress.IPv6Network(SITE_V6.format(index=index))),
                config_dir=f"{lab_dir}/{host}/etc",
                state_dir=f"{lab_dir}/{host}/lib",
                run_dir=f"{lab_dir}/{host}/run",
            )
        )
    return LabPlan(name=name, root=root, switch_netns=f"{base}-sw", hosts=tuple(members))
