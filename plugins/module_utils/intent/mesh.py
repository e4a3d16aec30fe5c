"""A full mesh of site-to-site tunnels, computed the same way on every host so that both
ends of each link agree without talking.

For every pair of hosts (a, b) each gets one connection named after the pair in sorted
order ("h1-h2" on both ends), protecting site_a <-> site_b in tunnel mode. The host whose
name sorts first initiates (`start_action: start`); the other waits (`none`), so the two
never start the same IKE SA at once. Each link's PSK is derived from one master secret
and the pair's names: HMAC-SHA256(master, "keyway-link-psk\\0a\\0b"), base64: distinct
per link, nothing per link to store, and no host learns another link's key from its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any


class IntentError(ValueError):
    """The inventory does not describe a consistent mesh; the message says where."""


def link_name(a: str, b: str) -> str:
    return "-".join(sorted((a, b)))


def link_psk(master: str, a: str, b: str) -> str:
    if len(master) < 16:
        raise IntentError("the mesh master secret must be at least 16 characters")
    first, second = sorted((a, b))
    digest = hmac.new(
        master.encode(), f"keyway-link-psk\0{first}\0{second}".encode(), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def _host(name: str, hosts: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    host = hosts.get(name)
    if host is None:
        raise IntentError(f"{name}: not in the inventory")
    for key in ("address", "sites"):
        if not host.get(key):
            raise IntentError(f"{name}: no {key} (keyway_address / keyway_sites)")
    return host


def mesh_connections(
    me: str,
    hosts: Mapping[str, Mapping[str, Any]],
    *,
    proposals: list[str] | None = None,
    esp_proposals: list[str] | None = None,
    rekey_time: str | int = "4h",
    child_rekey_time: str | int = "1h",
) -> dict[str, dict]:
    """keywayd `connections` for host `me` in a full mesh of `hosts`, each mapping a
    name to {"address": outer address, "id": IKE identity (default name), "sites":
    [prefixes]}. PSKs are not included: see `mesh_psks` (they go to 0600 files)."""
    mine = _host(me, hosts)
    connections = {}
    for peer in sorted(hosts):
        if peer == me:
            continue
        theirs = _host(peer, hosts)
        name = link_name(me, peer)
        connections[name] = {
            "local_addrs": [mine["address"]],
            "remote_addrs": [theirs["address"]],
            "local": {"id": mine.get("id", me), "auth": "psk"},
            "remote": {"id": theirs.get("id", peer), "auth": "psk"},
            "proposals": list(proposals or ["aes256gcm16-prfsha384-x25519"]),
            "rekey_time": rekey_time,
            "children": {
                "sites": {
                    "local_ts": list(mine["sites"]),
                    "remote_ts": list(theirs["sites"]),
                    "esp_proposals": list(esp_proposals or ["aes256gcm16"]),
                    "rekey_time": child_rekey_time,
                    "start_action": "start" if me < peer else "none",
                    "dpd_action": "restart" if me < peer else "clear",
                }
            },
        }
    return connections


def mesh_psks(me: str, peers: list[str], master: str) -> dict[str, str]:
    """The PSK of each of `me`'s links, by connection name."""
    return {link_name(me, p): link_psk(master, me, p) for p in sorted(peers) if p != me}
