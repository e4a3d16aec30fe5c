"""Keyway's intent: the whole inventory in, every host's keywayd connections out.

A pure function of the inventory (never of the play's hosts alone), computed on the
controller: both ends of a link are derived from the same data, so they agree without
talking, and a bad inventory is refused before any host is touched.

The model (README: "The inventory model"):

- Hosts take part through `keyway_topologies`, a list of named topologies:
    {name, type: mesh, members}                     every pair of members
    {name, type: hub_spoke, hubs, spokes,            spokes to every hub; spokes reach
     spoke_to_spoke: hub | direct | none}            each other through the first hub
                                                    (default), by direct trap links, or not
    {name, type: site_to_site, pairs: [[a, b]...]}   gateway pairs, each protecting its sites
    {name, type: links, links: [{ends: [a, b], <overrides>}]}
    {name, type: opportunistic, members, prefixes,   no links: one keywayd connection
     policy: private-or-clear | private,             per member for every host of the
     clear: [prefixes], shunt_lifetime}              prefixes, on its first packet (by
                                                    certificates for the addresses)
  Members, hubs and spokes are a group name or a list of host names (a group with no
  hosts yet makes no links); topologies also take `overrides`. A host in no topology
  is left alone.
- Each host: `keyway_address` (outer address), `keyway_sites` (prefixes behind it;
  without them it protects its own address), `keyway_ike_id` (default: its name),
  `keyway_overrides`, `keyway_behind_nat` (true: its address is its own, peers do not
  reach it there; it initiates each of its links and its peers accept it from any
  address by its identity).
- `keyway_external_peers`: unmanaged peers by name {address, id, sites, psk, overrides,
  behind_nat}, usable as link ends, site_to_site gateways and hubs.
- Overrides, highest first: the link's own, the ends' `keyway_overrides`, the ends'
  groups' (`keyway_group_overrides`), the topology's `overrides`, `keyway_defaults`;
  keys left unset take keywayd's defaults. Both ends of a link share one value: two
  ends (or two groups) that disagree at the highest level setting a key are an error.
- Initiators: the managed end towards an external peer, the spoke towards a hub, else
  the end whose name sorts first; `initiator: both` makes both ends start, and
  `start_action: trap` makes both ends wait for traffic.
- `auth: pubkey` (an override) authenticates a link with certificates from Keyway's CA
  instead of a PSK: each host's key stays on it, the controller signs its request (for
  its IKE identity), and `keyway_compromised: true` on a host revokes its certificates
  and takes it out of every link. Not for links to external peers.
- Each link's PSK is derived from one master secret, the link's two IKE identities
  and its `psk_version` (see `link_psk`): renaming a host keeps its keys as long as its
  IKE identity stays; external peers bring their own `psk`. Above version 1 the
  previous version stays accepted until `psk_accept_previous: false` retires it.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hmac
import ipaddress
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..agent.config import CONNECTION_NAME, MIN_PSK_LENGTH, ConfigError, parse_config

TOPOLOGY_TYPES = ("mesh", "hub_spoke", "site_to_site", "links", "opportunistic")
OPPORTUNISTIC_POLICIES = ("private-or-clear", "private")
# The override keys an opportunistic topology takes (the rest shape links: modes,
# initiators, PSKs); from a host's, a group's or the defaults' overrides only these
# apply to it, and every member must agree on each.
OPPORTUNISTIC_KEYS = frozenset(
    {"proposals", "allow_weak", "ike_rekey_time", "reauth_time", "dpd_delay", "encap"}
    | {"esp_proposals", "ah_proposals", "rekey_time", "life_time", "rekey_bytes"}
    | {"life_bytes", "rekey_packets", "life_packets"}
)
SPOKE_TO_SPOKE = ("hub", "direct", "none")
MIN_MASTER_SECRET = 32
PSK_SALT = b"keyway link psk"

# Override keys and where each lands in keywayd's config: the connection or its child.
CONNECTION_KEYS = {
    "proposals": "proposals",
    "allow_weak": "allow_weak",
    "ike_rekey_time": "rekey_time",
    "reauth_time": "reauth_time",
    "dpd_delay": "dpd_delay",
    "encap": "encap",
}
CHILD_KEYS = {
    "esp_proposals": "esp_proposals",
    "ah_proposals": "ah_proposals",  # AH instead of ESP (keywayd refuses both on a child)
    "mode": "mode",
    "rekey_time": "rekey_time",
    "life_time": "life_time",
    "rekey_bytes": "rekey_bytes",
    "life_bytes": "life_bytes",
    "rekey_packets": "rekey_packets",
    "life_packets": "life_packets",
}
CHOICES = {
    "start_action": ("start", "trap"),
    "dpd_action": ("restart", "clear", "trap"),
    "initiator": ("auto", "both"),
    "encap": ("auto", "force", "no"),
    "mode": ("tunnel", "transport"),
    "auth": ("psk", "pubkey"),
}
OVERRIDE_KEYS = (
    frozenset(CONNECTION_KEYS)
    | frozenset(CHILD_KEYS)
    | frozenset(CHOICES)
    | {"psk_version", "psk_accept_previous"}
)
# auth: pubkey, a connection's certificate files: the agent_config module fills them in
# from the host's key and the controller CA's certificate, CA and CRL (its pki option).
PKI_PLACEHOLDER = "/keyway-pki-placeholder.pem"
# Keys an operator may reach for that keywayd cannot honour per link (yet): refused with
# the reason rather than accepted and ignored.
REFUSED_KEYS = {
    "dataplane": "one keywayd has one data plane: set agent_dataplane on the host",
}


class IntentError(ValueError):
    """The inventory does not describe consistent tunnels; `problems` says where."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the inventory:\n  " + "\n  ".join(problems)
        )


@dataclass(frozen=True)
class Endpoint:
    """One end of links: a managed inventory host or an external peer."""

    name: str
    address: str
    ike_id: str
    sites: tuple[str, ...]
    managed: bool
    groups: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # Behind a NAT or on a changing address: it initiates; peers take it from anywhere.
    behind_nat: bool = False

    @property
    def overrides_variable(self) -> str:
        if self.managed:
            return f"host {self.name}: keyway_overrides"
        return f"keyway_external_peers.{self.name}.overrides"

    @property
    def protected(self) -> tuple[str, ...]:
        """What this end protects: its sites, else its own address."""
        if self.sites:
            return self.sites
        return (str(ipaddress.ip_network(self.address)),)


@dataclass
class Link:
    """A tunnel between two ends, the same on both: one connection on each managed end."""

    name: str
    topology: str
    ends: tuple[str, str]  # sorted
    ts: dict[str, tuple[str, ...]]  # what each end protects on this link
    settings: dict[str, Any]
    source: dict[str, str]  # override key -> which variable set it
    initiators: tuple[str, ...]
    endpoints: dict[str, Endpoint]

    def peer_of(self, end: str) -> str:
        return self.ends[1] if end == self.ends[0] else self.ends[0]

    @property
    def auth(self) -> str:
        """psk (derived from the master secret, or the external peer's), or pubkey
        (certificates from Keyway's CA)."""
        return self.settings.get("auth", "psk")

    def to_dict(self) -> dict:
        return {
            "topology": self.topology,
            "ends": list(self.ends),
            "ts": {end: list(ts) for end, ts in self.ts.items()},
            "settings": dict(self.settings),
            "initiators": list(self.initiators),
        }


@dataclass
class PolicyMesh:
    """An opportunistic topology: on each member one keywayd connection for every host
    of `prefixes`, negotiated on its first packet, authenticated by certificates for
    the hosts' addresses (Keyway's CA certifies each member's keyway_address)."""

    name: str
    members: tuple[str, ...]
    prefixes: tuple[str, ...]
    policy: str
    clear: tuple[str, ...]  # exempted: in the clear, never negotiated
    shunt_lifetime: Any  # as written (keywayd's parser checks it); None: its default
    settings: dict[str, Any]
    source: dict[str, str]
    endpoints: dict[str, Endpoint]


class Intent(dict):
    """Every link by name, and each host's links (the index built once: per-host work
    must not scan half a million links of a large mesh); the opportunistic topologies
    in `meshes`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meshes: dict[str, PolicyMesh] = {}

    def meshes_of(self, host: str) -> list[PolicyMesh]:
        return [m for m in self.meshes.values() if host in m.members]

    @property
    def hosts(self) -> set[str]:
        """Every host with a link or in an opportunistic topology."""
        return set(self.by_host) | {h for m in self.meshes.values() for h in m.members}

    @functools.cached_property
    def by_host(self) -> dict[str, list[Link]]:
        index: dict[str, list[Link]] = {}
        for link in self.values():
            for end in link.ends:
                index.setdefault(end, []).append(link)
        return index

    def of(self, host: str) -> list[Link]:
        return self.by_host.get(host, [])


def link_name(a: str, b: str) -> str:
    return "-".join(sorted((a, b)))


def link_psk(master: str, id_a: str, id_b: str, version: int) -> str:
    """HKDF-SHA256 of the master secret over the link's two IKE identities (sorted) and
    its version: distinct per link and version, nothing to store, and no host learns
    another link's key from its own."""
    if len(master) < MIN_MASTER_SECRET:
        raise IntentError([f"the master secret is shorter than {MIN_MASTER_SECRET} characters"])
    first, second = sorted((id_a, id_b))
    info = f"v{version}\0{first}\0{second}".encode()
    # RFC 5869 with the standard library (the controller needs no cryptography): for 32
    # bytes, Expand is one block, T(1) = HMAC(PRK, info | 0x01).
    prk = hmac.digest(PSK_SALT, master.encode(), "sha256")
    key = hmac.digest(prk, info + b"\x01", "sha256")
    return base64.b64encode(key).decode()


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def _overrides(raw: Any, where: str, problems: _Problems) -> dict[str, Any]:
    """Override keys checked against the known set; choices checked here, everything
    else by keywayd's parser later (with this variable named)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.add(where, "must be a mapping of override keys")
        return {}
    result = {}
    for key, value in raw.items():
        if key in REFUSED_KEYS:
            problems.add(f"{where}.{key}", REFUSED_KEYS[key])
        elif key not in OVERRIDE_KEYS:
            problems.add(
                f"{where}.{key}",
                f"unknown override key (known: {', '.join(sorted(OVERRIDE_KEYS))})",
            )
        elif key in CHOICES and value not in CHOICES[key]:
            problems.add(f"{where}.{key}", f"{value!r} is not one of {CHOICES[key]}")
        elif key == "psk_accept_previous" and not isinstance(value, bool):
            problems.add(f"{where}.{key}", f"{value!r} is not true or false")
        elif key == "psk_version" and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            problems.add(f"{where}.{key}", f"{value!r} is not a positive integer")
        else:
            result[key] = value
    return result


def _prefixes(raw: Any, where: str, problems: _Problems) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str) or not isinstance(raw, Iterable):
        problems.add(where, "must be a list of prefixes")
        return ()
    result = []
    for item in raw:
        try:
            result.append(str(ipaddress.ip_network(str(item), strict=True)))
        except ValueError as exc:
            problems.add(where, f"{item!r} is not a prefix: {exc}")
    for (a, _unused), (b, _unused) in _overlapping([(p, None) for p in result]):
        problems.add(where, f"{a} and {b} overlap")
    return tuple(result)


@functools.lru_cache(maxsize=1 << 16)
def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


@functools.lru_cache(maxsize=1 << 16)
def _interval(prefix: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(prefix)
    return net.version, int(net.network_address), int(net.broadcast_address)


def _overlapping(tagged: Iterable[tuple[str, Any]]) -> list[tuple[tuple[str, Any], ...]]:
    """Pairs of overlapping prefixes among (prefix, tag) items, in one sweep over them
    sorted: prefixes either nest or are apart, so each one that starts inside the
    furthest-reaching one before it overlaps that one (n log n, not n squared: a
    1,000-host mesh has 999 peers on every host)."""

    def order(item: tuple[str, Any]) -> tuple[int, int, int]:
        version, start, end = _interval(item[0])
        return version, start, -end  # of two that start together, the wider one first

    ordered = sorted(tagged, key=order)
    found = []
    reach: tuple[int, int, tuple[str, Any]] | None = None
    for item in ordered:
        version, start, end = _interval(item[0])
        if reach is not None and reach[0] == version and start <= reach[1]:
            found.append((reach[2], item))
        if reach is None or reach[0] != version or end > reach[1]:
            reach = (version, end, item)
    return found


def _address(raw: Any, where: str, problems: _Problems) -> str | None:
    if raw in (None, ""):
        problems.add(where, "missing (the outer address the peers reach this end at)")
        return None
    try:
        return str(ipaddress.ip_address(str(raw)))
    except ValueError:
        problems.add(where, f"{raw!r} is not an IP address")
        return None


def _flag(raw: Any, where: str, problems: _Problems) -> bool:
    if raw is None or isinstance(raw, bool):
        return bool(raw)
    problems.add(where, f"{raw!r} is not true or false")
    return False


class _Inventory:
    """Endpoints read on demand: only hosts that take part need Keyway's variables."""

    def __init__(
        self,
        hostvars: Mapping[str, Mapping[str, Any]],
        groups: Mapping[str, Iterable[str]],
        external_peers: Mapping[str, Mapping[str, Any]],
        problems: _Problems,
        excluded: frozenset[str] = frozenset(),
    ):
        self.hostvars, self.problems = hostvars, problems
        self.excluded = excluded  # being torn down: in no link
        self.groups = {g: list(members) for g, members in groups.items()}
        self.external = external_peers
        self._endpoints: dict[str, Endpoint | None] = {}
        self._groups_of: dict[str, list[str]] = {}
        for group, members in self.groups.items():
            if group in ("all", "ungrouped"):
                continue
            for member in members:
                self._groups_of.setdefault(member, []).append(group)
        for name in external_peers:
            if name in hostvars:
                problems.add(
                    f"keyway_external_peers.{name}", "is also an inventory host; rename one"
                )

    def members(self, raw: Any, where: str) -> list[str]:
        """A group name or a list of host and external peer names."""
        if isinstance(raw, str):
            if raw not in self.groups:
                self.problems.add(where, f"unknown group {raw!r}")
                return []
            return sorted(self.groups[raw])
        if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
            self.problems.add(where, "must be a group name or a list of host names")
            return []
        known = [m for m in raw if self.known(m, where)]
        if len(set(known)) != len(known):
            self.problems.add(where, "names a host twice")
        return sorted(set(known))

    def known(self, name: str, where: str) -> bool:
        if name in self.hostvars or name in self.external:
            return True
        self.problems.add(
            where, f"unknown host {name!r} (neither inventory host nor external peer)"
        )
        return False

    def endpoint(self, name: str) -> Endpoint | None:
        if name not in self._endpoints:
            self._endpoints[name] = self._read(name)
        return self._endpoints[name]

    def _read(self, name: str) -> Endpoint | None:
        p = self.problems
        before = len(p.items)
        if name in self.external:
            raw = self.external[name]
            where = f"keyway_external_peers.{name}"
            if not isinstance(raw, Mapping):
                p.add(where, "must be a mapping (address, id, sites, psk)")
                return None
            known = ("address", "id", "sites", "psk", "overrides", "behind_nat")
            for key in sorted(set(raw) - set(known)):
                p.add(f"{where}.{key}", f"unknown key (known: {', '.join(known)})")
            psk = raw.get("psk")
            if not psk:
                p.add(f"{where}.psk", "missing: an external peer needs its PSK (vault it)")
            elif len(str(psk)) < MIN_PSK_LENGTH:
                p.add(f"{where}.psk", f"is shorter than {MIN_PSK_LENGTH} characters")
            endpoint = Endpoint(
                name=name,
                address=_address(raw.get("address"), f"{where}.address", p) or "",
                ike_id=str(raw.get("id") or raw.get("address") or name),
                sites=_prefixes(raw.get("sites"), f"{where}.sites", p),
                managed=False,
                overrides=_overrides(raw.get("overrides"), f"{where}.overrides", p),
                behind_nat=_flag(raw.get("behind_nat"), f"{where}.behind_nat", p),
            )
        else:
            host = self.hostvars[name]
            where = f"host {name}"
            endpoint = Endpoint(
                name=name,
                address=_address(host.get("keyway_address"), f"{where}: keyway_address", p) or "",
                ike_id=str(host.get("keyway_ike_id") or name),
                sites=_prefixes(host.get("keyway_sites"), f"{where}: keyway_sites", p),
                managed=True,
                groups=tuple(sorted(self._groups_of.get(name, ()))),
                overrides=_overrides(host.get("keyway_overrides"), f"{where}: keyway_overrides", p),
                behind_nat=_flag(host.get("keyway_behind_nat"), f"{where}: keyway_behind_nat", p),
            )
        return endpoint if len(p.items) == before else None


def _links_of_topology(
    topology: Mapping[str, Any], index: int, inv: _Inventory
) -> list[tuple[tuple[str, str], dict[str, tuple[str, ...]], dict, tuple[str, ...] | None]]:
    """(ends, ts, link overrides, initiators or None for the default rule) per link."""
    p = inv.problems
    name = topology.get("name", f"#{index}")
    where = f"topology {name}"
    kind = topology.get("type")
    allowed = {"name", "type", "overrides"} | {
        "mesh": {"members"},
        "hub_spoke": {"hubs", "spokes", "spoke_to_spoke"},
        "site_to_site": {"pairs"},
        "links": {"links"},
        "opportunistic": {"members", "prefixes", "policy", "clear", "shunt_lifetime"},
    }.get(kind, set())
    if kind not in TOPOLOGY_TYPES:
        p.add(where, f"type {kind!r} is not one of {TOPOLOGY_TYPES}")
        return []
    for key in sorted(set(topology) - allowed):
        p.add(f"{where}.{key}", f"unknown key for a {kind} topology (known: {sorted(allowed)})")
    result = []

    def pair(a: str, b: str, at: str, overrides=None, initiators=None, ts=None) -> None:
        if a in inv.excluded or b in inv.excluded:
            return
        if a == b:
            p.add(at, f"a link from {a} to itself")
            return
        ea, eb = inv.endpoint(a), inv.endpoint(b)
        if ea is None or eb is None:
            return
        if not ea.managed and not eb.managed:
            p.add(at, f"{a} and {b} are both external peers: Keyway manages neither end")
            return
        if ea.address and eb.address and _family(ea.address) != _family(eb.address):
            p.add(at, f"{a} ({ea.address}) and {b} ({eb.address}) differ in address family")
            return
        ends = tuple(sorted((a, b)))
        ts = ts or {ea.name: ea.protected, eb.name: eb.protected}
        result.append((ends, ts, overrides or {}, initiators))

    if kind == "mesh":
        members = inv.members(topology.get("members"), f"{where}.members")
        for a, b in itertools.combinations(members, 2):
            pair(a, b, where)
        _disjoint_sites(members, inv, where)
    elif kind == "site_to_site":
        pairs = topology.get("pairs")
        if not isinstance(pairs, list):
            p.add(f"{where}.pairs", "must be a list of [gateway, gateway] pairs")
            return []
        for n, gateways in enumerate(pairs):
            at = f"{where}.pairs[{n}]"
            if not (isinstance(gateways, list) and len(gateways) == 2):
                p.add(at, "must be two gateway names")
                continue
            if not all(inv.known(g, at) for g in gateways):
                continue
            for gateway in gateways:
                end = inv.endpoint(gateway)
                if end is not None and not end.sites:
                    p.add(at, f"gateway {gateway} protects no sites (keyway_sites)")
            pair(*gateways, at)
    elif kind == "opportunistic":
        pass  # no links: _policy_mesh
    elif kind == "links":
        links = topology.get("links")
        if not isinstance(links, list):
            p.add(f"{where}.links", "must be a list of links ({ends: [a, b], ...overrides})")
            return []
        for n, link in enumerate(links):
            at = f"{where}.links[{n}]"
            if not isinstance(link, Mapping):
                p.add(at, "must be a mapping with ends and overrides")
                continue
            ends = link.get("ends")
            if not (
                isinstance(ends, list) and len(ends) == 2 and all(isinstance(e, str) for e in ends)
            ):
                p.add(f"{at}.ends", "must be two host names")
                continue
            if not all(inv.known(e, f"{at}.ends") for e in ends):
                continue
            overrides = _overrides({k: v for k, v in link.items() if k != "ends"}, at, p)
            pair(*ends, at, overrides=overrides)
    else:  # hub_spoke
        hubs = inv.members(topology.get("hubs"), f"{where}.hubs")
        spokes = inv.members(topology.get("spokes"), f"{where}.spokes")
        mode = topology.get("spoke_to_spoke", "hub")
        if mode not in SPOKE_TO_SPOKE:
            p.add(f"{where}.spoke_to_spoke", f"{mode!r} is not one of {SPOKE_TO_SPOKE}")
            return []
        both = set(hubs) & set(spokes)
        if both:
            p.add(where, f"{', '.join(sorted(both))}: both hub and spoke")
            return []
        if spokes and not hubs:
            p.add(where, "has spokes but no hub")
            return []
        if not spokes:
            return []  # no spokes (yet): no links
        _disjoint_sites(hubs + spokes, inv, where)
        hubs = [h for h in hubs if h not in inv.excluded]
        spokes = [s for s in spokes if s not in inv.excluded]
        if not hubs or not spokes:
            return []
        ends = {n: inv.endpoint(n) for n in hubs + spokes}
        if any(e is None for e in ends.values()):
            return []
        transit = hubs[0]  # spokes reach each other through the first hub
        for hub in hubs:
            for spoke in spokes:
                ts = {hub: ends[hub].protected, spoke: ends[spoke].protected}
                if mode == "hub" and hub == transit:
                    others = [s for o in spokes if o != spoke for s in ends[o].protected]
                    ts[hub] = ts[hub] + tuple(others)
                pair(hub, spoke, where, ts=ts, initiators=(spoke,))
        if mode == "direct":
            for a, b in itertools.combinations(spokes, 2):
                pair(a, b, f"{where} (spoke to spoke)", overrides={"start_action": "trap"})
    return result


def _disjoint_sites(members: list[str], inv: _Inventory, where: str) -> None:
    """The sites behind the members of one topology must not overlap: a packet to them
    could go into either tunnel."""
    ends = [e for e in map(inv.endpoint, members) if e is not None]
    tagged = [(prefix, end.name) for end in ends for prefix in end.protected]
    for (x, a), (y, b) in _overlapping(tagged):
        if a != b:
            inv.problems.add(where, f"sites of {a} ({x}) and {b} ({y}) overlap")


def _resolve(
    link_overrides: dict,
    ends: tuple[Endpoint, Endpoint],
    group_overrides: Mapping[str, dict],
    topology: str,
    topology_overrides: dict,
    defaults: dict,
    where: str,
    problems: _Problems,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each override key from the highest level that sets it; at one level the ends (or
    their groups) must agree."""
    settings: dict[str, Any] = {}
    source: dict[str, str] = {}
    levels: list[list[tuple[str, dict]]] = [
        [(f"{where} (link)", link_overrides)],
        [
            (
                e.overrides_variable,
                dict(e.overrides),
            )
            for e in ends
        ],
        [
            (f"keyway_group_overrides.{g}", group_overrides[g])
            for e in ends
            for g in e.groups
            if g in group_overrides
        ],
        [(f"topology {topology}: overrides", topology_overrides)],
        [("keyway_defaults", defaults)],
    ]
    present = {key for level in levels for _unused, values in level for key in values}
    for key in sorted(present):
        for level in levels:
            found = [(origin, values[key]) for origin, values in level if key in values]
            if not found:
                continue
            distinct = {repr(v) for _unused, v in found}
            if len(distinct) > 1:
                said = "; ".join(f"{origin} says {value!r}" for origin, value in found)
                problems.add(
                    where,
                    f"conflicting overrides for {key}: {said}; "
                    "set it on the link or make them agree",
                )
            settings[key], source[key] = found[0][1], found[0][0]
            break
    return settings, source


def compute_intent(
    hostvars: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Iterable[str]],
    topologies: Any,
    *,
    defaults: Any = None,
    group_overrides: Any = None,
    external_peers: Any = None,
    master_secret_length: int | None = None,
    exclude: Iterable[str] = (),
) -> Intent:
    """Every link of the inventory, validated; IntentError lists every problem found."""
    problems = _Problems()
    if topologies is None:
        topologies = []
    if not isinstance(topologies, list):
        raise IntentError(["keyway_topologies: must be a list of topologies"])
    external = external_peers or {}
    if not isinstance(external, Mapping):
        raise IntentError(["keyway_external_peers: must be a mapping of peer names"])
    excluded = frozenset(exclude)
    for name in sorted(excluded - set(hostvars)):
        problems.add("keyway_teardown", f"{name} is not an inventory host")
    inv = _Inventory(hostvars, groups, external, problems, excluded)
    defaults = _overrides(defaults, "keyway_defaults", problems)
    group_overrides = group_overrides or {}
    if not isinstance(group_overrides, Mapping):
        problems.add("keyway_group_overrides", "must be a mapping of group names to overrides")
        group_overrides = {}
    by_group = {}
    for group, raw in group_overrides.items():
        if group in ("all", "ungrouped"):
            problems.add(f"keyway_group_overrides.{group}", "use keyway_defaults for every host")
        elif group not in inv.groups:
            problems.add(f"keyway_group_overrides.{group}", "unknown group")
        by_group[group] = _overrides(raw, f"keyway_group_overrides.{group}", problems)
    links = Intent()
    names = [t.get("name") if isinstance(t, Mapping) else None for t in topologies]
    for index, topology in enumerate(topologies):
        if not isinstance(topology, Mapping) or not isinstance(topology.get("name"), str):
            problems.add(f"keyway_topologies[{index}]", "must be a mapping with a name")
            continue
        if names.count(topology["name"]) > 1:
            problems.add(f"topology {topology['name']}", "two topologies have this name")
        where = f"topology {topology['name']}"
        overrides = _overrides(topology.get("overrides"), f"{where}.overrides", problems)
        if topology.get("type") == "opportunistic":
            _links_of_topology(topology, index, inv)  # its keys checked
            mesh = _policy_mesh(topology, inv, by_group, overrides, defaults)
            if mesh is not None:
                links.meshes[mesh.name] = mesh
            continue
        for ends, ts, link_overrides, initiators in _links_of_topology(topology, index, inv):
            name = link_name(*ends)
            at = f"{where}: link {name}"
            if not CONNECTION_NAME.match(name):
                problems.add(
                    at,
                    "is not a valid keywayd connection name (letters, digits, '_', '.', '-', "
                    "64 at most): shorten or rename the inventory hosts",
                )
                continue
            if name in links:
                problems.add(at, f"also made by topology {links[name].topology}: one link per pair")
                continue
            endpoints = (inv.endpoint(ends[0]), inv.endpoint(ends[1]))
            settings, source = _resolve(
                link_overrides,
                endpoints,
                by_group,
                topology["name"],
                overrides,
                defaults,
                at,
                problems,
            )
            hidden = [e.name for e in endpoints if e.behind_nat]
            if len(hidden) == 2:
                problems.add(
                    at,
                    f"{hidden[0]} and {hidden[1]} are both behind NAT (keyway_behind_nat): "
                    "neither can reach the other; link them through a hub",
                )
                continue
            if hidden and settings.get("encap") == "no":
                problems.add(
                    at,
                    f"encap no (from {source['encap']}): {hidden[0]} is behind NAT, and ESP "
                    "crosses a NAT only UDP-encapsulated; use auto",
                )
            if hidden:
                for key in ("start_action", "initiator"):
                    if settings.get(key) in ("trap", "both"):
                        problems.add(
                            at,
                            f"{key} {settings[key]} (from {source[key]}): {hidden[0]} is behind "
                            "NAT, so only it can initiate; its peer answers",
                        )
            sited = [e.name for e in endpoints if e.sites]
            if settings.get("mode") == "transport" and sited:
                problems.add(
                    at,
                    f"mode transport (from {source['mode']}) protects the two hosts "
                    f"themselves, but {' and '.join(sited)} protect sites: use tunnel",
                )
            external = [e.name for e in endpoints if not e.managed]
            if settings.get("auth") == "pubkey" and external:
                problems.add(
                    at,
                    f"auth pubkey (from {source['auth']}): {external[0]} is an external peer, "
                    "and Keyway's CA issues certificates only to the hosts it manages; "
                    "use auth psk for this link",
                )
            links[name] = Link(
                name, topology["name"], ends, ts, settings, source,
                _initiators(endpoints, settings, initiators),
                {e.name: e for e in endpoints},
            )  # fmt: skip
    _check_unique(links, problems)
    _check_selectors(links, problems)
    _check_meshes(links, problems)
    derived = any(
        all(e.managed for e in link.endpoints.values()) and link.auth == "psk"
        for link in links.values()
    )
    if derived and (master_secret_length or 0) < MIN_MASTER_SECRET:
        length = f"{master_secret_length} characters" if master_secret_length else "missing"
        problems.add(
            "keyway_master_secret",
            f"{length}; links between managed hosts derive their PSKs from it and it needs "
            f"at least {MIN_MASTER_SECRET} (e.g. `openssl rand -base64 48 | "
            "ansible-vault encrypt_string --stdin-name keyway_master_secret`)",
        )
    if problems.items:
        raise IntentError(problems.items)
    return links


def _policy_mesh(
    topology: Mapping[str, Any],
    inv: _Inventory,
    group_overrides: Mapping[str, dict],
    overrides: dict,
    defaults: dict,
) -> PolicyMesh | None:
    """An opportunistic topology, checked: managed members not behind NAT, prefixes, a
    policy, and the overrides every member agrees on."""
    p = inv.problems
    name = topology["name"]
    where = f"topology {name}"
    before = len(p.items)
    for key in sorted(set(overrides) - OPPORTUNISTIC_KEYS):
        p.add(
            f"{where}.overrides.{key}",
            "does not apply to an opportunistic topology (host to host in transport mode, "
            "on the first packet, by certificates)",
        )
    members = [
        m for m in inv.members(topology.get("members"), f"{where}.members") if m not in inv.excluded
    ]
    endpoints = {}
    for member in members:
        end = inv.endpoint(member)
        if end is None:
            continue
        if not end.managed:
            p.add(where, f"{member} is an external peer: Keyway's CA certifies managed hosts only")
        elif end.behind_nat:
            p.add(
                where,
                f"{member} is behind NAT (keyway_behind_nat): an opportunistic peer must come "
                "from the address its certificate names",
            )
        endpoints[member] = end
    prefixes = _prefixes(topology.get("prefixes"), f"{where}.prefixes", p)
    if not prefixes:
        p.add(f"{where}.prefixes", "is required: the prefixes whose hosts are protected")
    policy = topology.get("policy", "private-or-clear")
    if policy not in OPPORTUNISTIC_POLICIES:
        p.add(f"{where}.policy", f"{policy!r} is not one of {OPPORTUNISTIC_POLICIES}")
    clear = _prefixes(topology.get("clear"), f"{where}.clear", p)
    # Only the keys that shape it, from every level; all members must agree.
    settings, source = _resolve(
        {},
        tuple(dataclasses.replace(e, overrides={
            k: v for k, v in e.overrides.items() if k in OPPORTUNISTIC_KEYS
        }) for e in endpoints.values()),
        {g: {k: v for k, v in o.items() if k in OPPORTUNISTIC_KEYS}
         for g, o in group_overrides.items()},
        name,
        {k: v for k, v in overrides.items() if k in OPPORTUNISTIC_KEYS},
        {k: v for k, v in defaults.items() if k in OPPORTUNISTIC_KEYS},
        where,
        p,
    )  # fmt: skip
    if len(p.items) != before:
        return None
    return PolicyMesh(
        name, tuple(members), prefixes, policy, clear, topology.get("shunt_lifetime"),
        settings, source, endpoints,
    )  # fmt: skip


def _check_meshes(links: Intent, problems: _Problems) -> None:
    """A mesh's connection name is free on each member, a member's meshes do not cover
    one host twice, and a member's certificate can name its address."""
    for mesh in links.meshes.values():
        where = f"topology {mesh.name}"
        if not CONNECTION_NAME.match(mesh.name):
            problems.add(where, "is not a valid keywayd connection name (letters, digits, "
                         "'_', '.', '-', 64 at most): rename the topology")  # fmt: skip
        if mesh.name in links:
            problems.add(where, f"has the name of link {mesh.name}: rename the topology")
    for host in sorted({h for m in links.meshes.values() for h in m.members}):
        tagged = [(prefix, m.name) for m in links.meshes_of(host) for prefix in m.prefixes]
        for (x, a), (y, b) in _overlapping(tagged):
            if a != b:
                problems.add(
                    f"host {host}",
                    f"opportunistic topologies {a} ({x}) and {b} ({y}) overlap: a host there "
                    "would have two policies",
                )
        end = links.meshes_of(host)[0].endpoints[host]
        certified = [link.name for link in links.of(host) if link.auth == "pubkey"]
        if certified and end.ike_id != end.address:
            problems.add(
                f"host {host}",
                f"its opportunistic topologies identify it by its address ({end.address}) and "
                f"its links on certificates ({', '.join(certified)}) by keyway_ike_id "
                f"({end.ike_id}); one certificate names one: set keyway_ike_id: {end.address}",
            )


def _initiators(
    ends: tuple[Endpoint, Endpoint], settings: dict, preferred: tuple[str, ...] | None
) -> tuple[str, ...]:
    if settings.get("start_action") == "trap":
        return ()
    hidden = [e for e in ends if e.behind_nat]
    if hidden:  # only the end behind the NAT can reach the other (an external one: itself)
        return (hidden[0].name,) if hidden[0].managed else ()
    managed = [e.name for e in ends if e.managed]
    if settings.get("initiator") == "both":
        return tuple(managed)
    if len(managed) == 1:
        return tuple(managed)
    if preferred:
        return preferred
    return (min(e.name for e in ends),)


def _check_unique(links: Intent, problems: _Problems) -> None:
    """Peers are told apart by outer address and IKE identity."""
    seen_address: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    endpoints = {e.name: e for link in links.values() for e in link.endpoints.values()}
    for name in sorted(endpoints):
        end = endpoints[name]
        # Behind NATs, private addresses may repeat; such peers are told by identity.
        other = name if end.behind_nat else seen_address.setdefault(end.address, name)
        if other != name:
            problems.add(f"host {name}", f"outer address {end.address} is also {other}'s")
        other = seen_id.setdefault(end.ike_id, name)
        if other != name:
            problems.add(f"host {name}", f"IKE identity {end.ike_id!r} is also {other}'s")


def _check_selectors(links: Intent, problems: _Problems) -> None:
    """On each host, what its links reach must not overlap what another link reaches or
    what it protects itself: policies would then be ambiguous."""
    for host, mine in links.by_host.items():
        own = mine[0].endpoints[host].protected
        tagged = [(p, None) for p in own] + [
            (p, link.name) for link in mine for p in link.ts[link.peer_of(host)]
        ]
        for (x, lx), (y, ly) in _overlapping(tagged):
            if lx == ly:
                continue
            if lx is None or ly is None:
                (reached, link), ours = ((y, ly), x) if lx is None else ((x, lx), y)
                problems.add(
                    f"host {host}", f"link {link} reaches {reached}, which overlaps its own {ours}"
                )
            else:
                problems.add(
                    f"host {host}",
                    f"link {lx} reaches {x} and link {ly} reaches {y}: they overlap",
                )


def host_connections(host: str, links: Intent) -> dict[str, dict]:
    """keywayd `connections` for `host`, without secrets (see `host_psks`)."""
    connections = {link.name: _connection(host, link) for link in links.of(host)}
    for mesh in links.meshes_of(host):
        connections[mesh.name] = _mesh_connection(host, mesh)
    return connections


def host_pki(host: str, links: Intent) -> dict | None:
    """What Keyway's CA certifies for `host` (its IKE identity) if a link of its
    authenticates with certificates, or it is in an opportunistic topology (its
    address), else None."""
    for link in links.of(host):
        if link.auth == "pubkey":
            return {"identity": link.endpoints[host].ike_id}
    for mesh in links.meshes_of(host):
        return {"identity": mesh.endpoints[host].address}
    return None


def _mesh_connection(host: str, mesh: PolicyMesh) -> dict:
    """A member's opportunistic connection (its certificate files filled in by the
    agent_config module, as for links on certificates)."""
    conn: dict[str, Any] = {
        "opportunistic": mesh.policy,
        "local_addrs": [mesh.endpoints[host].address],
        "remote_addrs": list(mesh.prefixes),
        "local": {"auth": "pubkey"},
        "remote": {"auth": "pubkey"},
    }
    if mesh.shunt_lifetime is not None:
        conn["shunt_lifetime"] = mesh.shunt_lifetime
    child: dict[str, Any] = {}
    for key, value in mesh.settings.items():
        if key in CONNECTION_KEYS:
            conn[CONNECTION_KEYS[key]] = value
        elif key in CHILD_KEYS:
            child[CHILD_KEYS[key]] = value
    conn["children"] = {"host": child}
    if mesh.clear:
        conn["children"]["clear"] = {"mode": "pass", "remote_ts": list(mesh.clear)}
    return conn


def _connection(host: str, link: Link) -> dict:
    me = link.endpoints[host]
    peer_name = link.peer_of(host)
    peer = link.endpoints[peer_name]
    conn: dict[str, Any] = {
        "local_addrs": [me.address],
        # A peer behind NAT comes from an address of the NAT's: any, told by identity.
        "remote_addrs": ["%any"] if peer.behind_nat else [peer.address],
        "local": {"id": me.ike_id, "auth": link.auth},
        "remote": {"id": peer.ike_id, "auth": link.auth},
    }
    child: dict[str, Any] = {
        "local_ts": list(link.ts[host]),
        "remote_ts": list(link.ts[peer_name]),
    }
    if not me.sites and not peer.sites:
        child["mode"] = "transport"  # host to host: nothing to tunnel
    for key, value in link.settings.items():
        if key in CONNECTION_KEYS:
            conn[CONNECTION_KEYS[key]] = value
        elif key in CHILD_KEYS:
            child[CHILD_KEYS[key]] = value
    if link.settings.get("start_action") == "trap":
        child["start_action"] = "trap"
    else:
        child["start_action"] = "start" if host in link.initiators else "none"
    starts = child["start_action"] != "none"
    default_dpd = "trap" if child["start_action"] == "trap" else "restart"
    child["dpd_action"] = link.settings.get("dpd_action", default_dpd if starts else "clear")
    conn["children"] = {"sites" if (me.sites or peer.sites) else "host": child}
    return conn


def psk_refs(host: str, links: Intent) -> dict[str, dict]:
    """For each of `host`'s links, where its PSK comes from (no secret in it)."""
    refs = {}
    for link in links.of(host):
        if link.auth != "psk":
            continue  # certificates: no PSK
        ends = [link.endpoints[n] for n in link.ends]
        external = next((e.name for e in ends if not e.managed), None)
        if external:
            refs[link.name] = {"external": external}
        else:
            version = link.settings.get("psk_version", 1)
            refs[link.name] = {
                "ids": sorted(e.ike_id for e in ends),
                "version": version,
                # During a rotation the previous version stays accepted until retired.
                "previous": version > 1 and link.settings.get("psk_accept_previous", True),
            }
    return refs


def host_psks(
    refs: Mapping[str, Mapping[str, Any]],
    master_secret: str | None,
    external_peers: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, str | list[str]]:
    """The PSK of each connection named in `refs` (from `psk_refs`); during a rotation a
    list, newest first (keywayd sends the first and accepts both)."""
    psks: dict[str, str | list[str]] = {}
    for name, ref in refs.items():
        if "external" in ref:
            psks[name] = str((external_peers or {})[ref["external"]]["psk"])
            continue
        current = link_psk(master_secret or "", *ref["ids"], ref["version"])
        if ref.get("previous"):
            previous = link_psk(master_secret or "", *ref["ids"], ref["version"] - 1)
            psks[name] = [current, previous]
        else:
            psks[name] = current
    return psks


def validate_with_agent(links: Intent) -> None:
    """keywayd's own parser on the connections the intent makes (PSKs as placeholders):
    a value it refuses fails the run here, naming the link and the variable that set it.
    Addresses, identities and selectors are the intent's own checks; what keywayd adds
    is the override values, so each distinct set of them is parsed once (on the first
    managed end of the first link that has it), not once per link and host."""
    seen: dict[str, tuple[str, Link]] = {}
    for link in links.values():
        ends = list(link.endpoints.values())
        shape = repr((sorted(link.settings.items()), [bool(e.sites) for e in ends]))  # auth too
        if shape not in seen:
            seen[shape] = (next(e.name for e in ends if e.managed), link)
    problems = []
    for mesh in links.meshes.values():
        host = mesh.members[0] if mesh.members else None
        if host is None:
            continue
        connection = _mesh_connection(host, mesh)
        connection["local"].update(certs=[PKI_PLACEHOLDER], key=PKI_PLACEHOLDER)
        connection["remote"]["cacerts"] = [PKI_PLACEHOLDER]
        try:
            parse_config({"connections": {mesh.name: connection}}, source=f"host {host}")
        except ConfigError as exc:
            problems += [f"topology {mesh.name} on host {host}: {path}: {message}"
                         for path, message in exc.problems]  # fmt: skip
    for host, link in seen.values():
        connection = _connection(host, link)
        if link.auth == "pubkey":  # the files come with the host's certificate
            connection["local"].update(certs=[PKI_PLACEHOLDER], key=PKI_PLACEHOLDER)
            connection["remote"]["cacerts"] = [PKI_PLACEHOLDER]
        else:
            connection["psk"] = "p" * 32
        try:
            parse_config({"connections": {link.name: connection}}, source=f"host {host}")
        except ConfigError as exc:
            problems += [_explain(host, path, message, links) for path, message in exc.problems]
    if problems:
        raise IntentError(problems)


# keywayd config fields back to the override keys that set them.
_CONNECTION_FIELDS = {v: k for k, v in CONNECTION_KEYS.items()}
_CHILD_FIELDS = {v: k for k, v in CHILD_KEYS.items()}


def _explain(host: str, path: str, message: str, links: Mapping[str, Link]) -> str:
    """A parser problem at `connections.LINK[.children.CHILD].FIELD[...]` told as the
    link, and the inventory variable that set the value."""
    link = next((k for k in links if path.startswith(f"connections.{k}.")), None)
    if link is None:
        return f"host {host}: {path}: {message}"
    rest = path[len(f"connections.{link}.") :].split(".")
    if rest[0] == "children" and len(rest) > 2:
        key = _CHILD_FIELDS.get(rest[2].split("[")[0])
    else:
        key = _CONNECTION_FIELDS.get(rest[0].split("[")[0])
    origin = links[link].source.get(key) if key else None
    said = f" ({key}, set by {origin})" if origin else f" ({'.'.join(rest)})"
    return f"topology {links[link].topology}: link {link} on host {host}: {message}{said}"
