"""The kernel plane's routes: a tunnel's remote prefixes routed the way its peer is
reached, in Keyway's own table (looked up before main, as strongSwan's table 220).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from ...esp.tun import ROUTE_TABLE
from ..base import (
    DataPlaneError,
    Direction,
    Mode,
    PolicyAction,
    PolicySpec,
)

# The kernel plane's rule into Keyway's routing table (the userspace plane's table: the
# two planes never run together).
ROUTE_RULE_PRIORITY = 0x4B58


def _routed(policy: PolicySpec) -> bool:
    """OUT tunnel-mode policies route their destination towards the peer, unless they
    belong to an XFRM interface (if_id): its traffic is routed into that interface by
    the operator, and a route in Keyway's table, looked up before main, would send it
    out the physical device, where a policy with an if_id matches nothing: in the
    clear (strongSwan's install_routes_xfrmi is off by default for the same reason)."""
    return (
        policy.direction is Direction.OUT
        and policy.action is PolicyAction.PROTECT
        and not policy.if_id
        and bool(policy.templates)
        and policy.templates[0].mode is Mode.TUNNEL
        and bool(policy.templates[0].dst)
    )


def _prefix(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _ip_quiet(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)


def _route_towards(prefix: str, peer: str) -> None:
    """Route `prefix` the way the peer is reached (its gateway and device)."""
    found = _ip_quiet("-j", "route", "get", peer)
    try:
        route = json.loads(found.stdout)[0]
    except (ValueError, IndexError):
        raise DataPlaneError(f"route {prefix}: no route to the peer {peer}") from None
    argv = ["route", "replace", prefix, "via", route.get("gateway", peer), "dev", route["dev"]]
    done = _ip_quiet(*argv, "table", str(ROUTE_TABLE))
    if done.returncode:
        raise DataPlaneError(f"route {prefix} via {peer}: {done.stderr.strip()}")
