"""A mesh defined by policy, not by enumeration: opportunistic connections.

As Libreswan's opportunistic encryption: an opportunistic connection is a template for
every host in its remote_addrs. keywayd holds one trap policy per prefix (transport
mode, no template addresses), so the host's config stays the same as the mesh grows:

- the first packet to a host there is acquired with its address, and keywayd makes the
  host's own connection from the template (`instance_config`) and initiates it;
- an IKE_AUTH from a host there whose identity is the address it came from, proven by
  its certificate, makes that connection on the responder (the engine's `instantiate`);
- every instance's SAs carry the template child's reqid, so the prefix's one policy
  finds each peer's SAs by the packet's destination (on both data planes, as XFRM's
  template lookup does), and no policy is installed per peer;
- a negotiation that fails leaves a shunt for that one host for `shunt_lifetime`: pass
  (private-or-clear: the host speaks no IKE, traffic goes in the clear) or drop
  (private); the next packet after it negotiates again;
- an instance whose IKE SA is gone is forgotten: the next packet makes it again.

The functions here are pure; the Agent (daemon.py) holds the instances and shunts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING

from ..dataplane import base
from .config import ConnectionConfig

if TYPE_CHECKING:  # the engine needs cryptography; this module is imported without it
    from ..ike.engine.core import IkeConnection


def instance_name(template: str, peer: str) -> str:
    """The name of a template's connection to one peer: `mesh[192.0.2.12]`."""
    return f"{template}[{peer}]"


def host_prefix(address: str) -> str:
    """The address as a one-host prefix (/32 or /128)."""
    return str(ipaddress.ip_network(address))


def negotiated(children) -> list:
    """The children an opportunistic connection negotiates (not its pass/drop shunts)."""
    return [c for c in children if c.mode in ("tunnel", "transport")]


def instance_config(template: ConnectionConfig, peer: str) -> ConnectionConfig:
    """The template's connection to `peer`: that one address, identified by it, its
    children between the two hosts (negotiated ones only; pass/drop children are the
    template's policies). Not started, nor trapped by itself: the template's policy
    brings it back."""
    host = host_prefix(peer)
    return dataclasses.replace(
        template,
        name=instance_name(template.name, peer),
        remote_addrs=(peer,),
        remote=dataclasses.replace(template.remote, id=str(ipaddress.ip_address(peer))),
        children=tuple(
            dataclasses.replace(c, remote_ts=(host,), start_action="none")
            for c in negotiated(template.children)
        ),
        opportunistic="",
    )


def instance_ike(template: IkeConnection, conn: ConnectionConfig) -> IkeConnection:
    """The engine's view of an instance: the template's keys and certificates, loaded
    once, with the peer's address, identity and the children of `conn`."""
    by_name = {c.name: c for c in conn.children}
    return dataclasses.replace(
        template,
        name=conn.name,
        remote_address=(conn.remote_addrs[0], conn.remote_port),
        remote_id=conn.remote.id,
        peer_ranges=(),
        children=tuple(
            dataclasses.replace(c, remote_ts=by_name[c.name].remote_ts)
            for c in template.children
            if c.name in by_name
        ),
        opportunistic=False,
    )


def shunt_action(policy: str) -> base.PolicyAction:
    """What a failed negotiation leaves for its peer: the clear or nothing."""
    return base.PolicyAction.PASS if policy == "private-or-clear" else base.PolicyAction.DROP
