"""keywayd's configuration: YAML in, validated frozen dataclasses out.

The file describes connections much as swanctl.conf does (strongSwan users should feel
at home), in YAML:

    dataplane: auto                      # kernel | userspace | auto
    fragment_size: 1280                  # larger IKE messages go as RFC 7383 fragments
    keepalive: 20s                       # NAT keepalives while behind a NAT (0: none)
    retransmit_timeout: 4                # seconds, then x retransmit_base (1.8) each time;
    retransmit_tries: 5                  # a peer silent after this many is dead
    connections:
      h1-h2:
        local_addrs: [192.0.2.11]
        remote_addrs: [192.0.2.12]      # tried in turn; prefixes and %any answer only
        local: {id: h1.lab, auth: psk}
        remote: {id: h2.lab, auth: psk}
        psk_file: /etc/keyway/secrets/h1-h2.psk   # or psk: "...", file then 0600; a list
                                                  # during a rotation: newest first
        # with certificates instead: local: {id: h1.lab, auth: pubkey, certs: [h1.pem],
        #   key: h1.key, key_passphrase_file: h1.pass (if h1.key is encrypted; 0600)}
        #   remote: {id: h2.lab, auth: pubkey, cacerts: [ca.pem]}
        proposals: [aes256gcm16-prfsha384-x25519]
        rekey_time: 4h
        children:
          sites:
            local_ts: [10.1.0.0/24]
            remote_ts: [10.2.0.0/24]
            esp_proposals: [aes256gcm16]
            start_action: start
      mesh:                              # a mesh defined by policy: every host of the
        opportunistic: private-or-clear  # prefixes, on its first packet (or private)
        local_addrs: [192.0.2.11]        # the host's address is its identity, and each
        remote_addrs: [192.0.2.0/24]     # peer's is theirs (certificates carry them)
        local: {auth: pubkey, certs: [h1.pem], key: h1.key}
        remote: {auth: pubkey, cacerts: [ca.pem]}
        shunt_lifetime: 15m              # a failed peer: in the clear (or dropped) so long
        children:
          host: {}                       # transport, trapped, between the two hosts
          gateway: {mode: pass, remote_ts: [192.0.2.1/32]}   # an exception

The same parser serves the agent (load and reload) and the Ansible module that writes
the file (validate before it replaces anything), so both agree on what is valid. Every
problem found is reported with its path (`connections.h1-h2.children.sites.local_ts[0]`)
in one ConfigError; a bad file never replaces a good running config. Secrets are held in
`Secret`, whose repr and str never show the value.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ike import identity
from ..ike.defaults import DEFAULT_ESP_PROPOSALS, DEFAULT_IKE_PROPOSALS
from .control import DEFAULT_SOCKET

try:  # PyYAML is a runtime dependency; the C loader is faster where built.
    import yaml

    class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        """A safe loader that refuses a key given twice in one mapping: YAML's own rule,
        which PyYAML does not enforce (a second connection of the same name would
        silently replace the first)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _unused in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                        key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

except ImportError:  # pragma: no cover - reported when a file is actually loaded
    yaml = None

DATAPLANES = ("kernel", "userspace", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_METHODS = ("psk", "pubkey")
# A remote side may constrain the peer's signatures, as strongSwan's remote auth does:
# pubkey (any), rsa/pss, rsa (PSS or PKCS#1 v1.5, which still needs allow_weak),
# ecdsa, ed25519, ed448. The engine's names for what each accepts:
PEER_SIGNATURES = {
    "pubkey": (),
    "rsa/pss": ("rsa-pss",),
    "rsa": ("rsa-pss", "rsa-pkcs1"),
    "ecdsa": ("ecdsa",),
    "ed25519": ("ed25519",),
    "ed448": ("ed448",),
}
REMOTE_AUTH = ("psk", *PEER_SIGNATURES)
# When a peer's certificate counts as not revoked (strongSwan's `revocation`): strict,
# with a valid CRL for each; ifuri, unless it names a CRL distribution point and none
# is at hand; relaxed, unless a CRL at hand lists it.
REVOCATION_POLICIES = ("strict", "ifuri", "relaxed")
UNIQUE_POLICIES = ("no", "never", "keep", "replace")
CHILD_MODES = ("tunnel", "transport", "pass", "drop")
START_ACTIONS = ("none", "trap", "start")
DPD_ACTIONS = ("clear", "trap", "restart")
# auto: UDP-encapsulate ESP when a NAT is detected; force: always; no: never (no NAT
# detection at all: for peers that must speak plain ESP, a NAT between them breaks it).
ENCAP_MODES = ("auto", "force", "no")
# A mesh defined by policy (Libreswan's opportunistic encryption): any host in
# remote_addrs is negotiated with on its first packet. private: never in the clear;
# private-or-clear: in the clear with a host that does not answer IKE.
OPPORTUNISTIC_POLICIES = ("private", "private-or-clear")
ANY_ADDRESS = {"%any": ("0.0.0.0/0", "::/0"), "%any4": ("0.0.0.0/0",), "%any6": ("::/0",)}


# A DNS name as remote_addrs may hold one (RFC 1123 labels; not all digits and dots).
DNS_NAME = re.compile(
    r"^(?=.{1,253}\.?$)(?![\d.]+$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def is_dns_name(value: str) -> bool:
    return bool(DNS_NAME.match(value))


def initiation_addresses(remote_addrs: tuple[str, ...]) -> tuple[str, ...]:
    """The single addresses and DNS names among remote_addrs, in order: where an
    initiator tries (a name is resolved at each try)."""
    singles = []
    for value in remote_addrs:
        if value in ANY_ADDRESS:
            continue
        if is_dns_name(value):
            singles.append(value)
            continue
        network = ipaddress.ip_network(value)
        if network.num_addresses == 1:
            singles.append(str(network.network_address))
    return tuple(singles)


def peer_ranges(remote_addrs: tuple[str, ...]) -> tuple:
    """Every network a peer of these remote_addrs may come from (names: once resolved)."""
    return tuple(
        ipaddress.ip_network(n)
        for value in remote_addrs
        if not is_dns_name(value)
        for n in ANY_ADDRESS.get(value, (value,))
    )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONNECTION_NAME = _NAME  # what connection and child names may look like
_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_SIZE = re.compile(r"^(\d+)\s*([kKmMgGtT]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_PSK_LENGTH = 16


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists (path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = [f"{path}: {message}" if path else message for path, message in problems]
        super().__init__(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(lines))


class Secret:
    """A secret value (PSK, key password) that never shows itself in logs or reprs."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class AuthConfig:
    id: str
    auth: str = "psk"
    certs: tuple[str, ...] = ()  # own certificate chain (pubkey), leaf first
    key: str = ""  # private key file (pubkey), PEM
    key_passphrase: Secret | None = None  # from key_passphrase_file, if the key is encrypted
    cacerts: tuple[str, ...] = ()  # trust anchors for the peer (pubkey)
    crls: tuple[str, ...] = ()  # CRL files (PEM or DER) checked on the peer's path
    revocation: str = "relaxed"  # strict | ifuri | relaxed, as strongSwan's

    @property
    def method(self) -> str:
        """psk, or pubkey for certificates whatever signatures `auth` constrains."""
        return "psk" if self.auth == "psk" else "pubkey"


@dataclass(frozen=True)
class ChildConfig:
    name: str
    local_ts: tuple[str, ...]
    remote_ts: tuple[str, ...]
    mode: str = "tunnel"
    esp_proposals: tuple[str, ...] = DEFAULT_ESP_PROPOSALS
    ah_proposals: tuple[str, ...] = ()
    rekey_time: int = 3600
    life_time: int = 0  # 0: rekey_time + 10%
    rand_time: int = -1  # -1: life_time - rekey_time
    rekey_bytes: int = 0
    life_bytes: int = 0
    rekey_packets: int = 0
    life_packets: int = 0
    start_action: str = "none"
    close_action: str = "none"
    dpd_action: str = "clear"
    replay_window: int = 128
    updown: str = ""

    @property
    def protocol(self) -> str:
        return "ah" if self.ah_proposals else "esp"

    @property
    def proposals(self) -> tuple[str, ...]:
        """The child's proposals, of its protocol."""
        return self.ah_proposals or self.esp_proposals


@dataclass(frozen=True)
class ConnectionConfig:
    name: str
    local_addrs: tuple[str, ...]
    remote_addrs: tuple[str, ...]
    local: AuthConfig
    remote: AuthConfig
    children: tuple[ChildConfig, ...]
    psk: Secret | None = field(default=None, repr=False)
    previous_psks: tuple[Secret, ...] = field(default=(), repr=False)  # still accepted
    version: int = 2
    local_port: int = 500  # the agent's ike_port: the only one keywayd listens on
    remote_port: int = 500
    proposals: tuple[str, ...] = DEFAULT_IKE_PROPOSALS
    encap: str = "auto"
    # MOBIKE (RFC 4555), swanctl's default: a peer that supports it may move its
    # address with UPDATE_SA_ADDRESSES, without renegotiation.
    mobike: bool = True
    dpd_delay: int = 30
    rekey_time: int = 14400
    reauth_time: int = 0
    over_time: int = 0  # 0: 10% of the larger of rekey_time and reauth_time
    rand_time: int = -1  # -1: over_time
    keyingtries: int = 1  # 0: forever
    unique: str = "no"
    if_id_in: int = 0
    if_id_out: int = 0
    mark_in: tuple[int, int] | None = None
    mark_out: tuple[int, int] | None = None
    allow_weak: bool = False
    # "" (a connection to the peer of remote_addrs), or the policy of an opportunistic
    # one: a template from which keywayd makes one connection per peer address in
    # remote_addrs, on that peer's first packet or IKE_SA_INIT (agent/opportunistic.py).
    opportunistic: str = ""
    # How long a negotiation that failed leaves its peer alone (opportunistic only;
    # Libreswan's shuntlifetime): in the clear (private-or-clear) or dropped (private),
    # then the next packet negotiates again.
    shunt_lifetime: int = 900


@dataclass(frozen=True)
class AgentConfig:
    connections: tuple[ConnectionConfig, ...] = ()
    dataplane: str = "auto"
    log_level: str = "info"
    control_socket: str = DEFAULT_SOCKET
    # Prometheus metrics over HTTP (GET /metrics): (address, port), or None (off)
    metrics_listen: tuple[str, int] | None = None
    ike_port: int = 500
    nat_t_port: int = 4500
    half_open_cookie_threshold: int = 100
    fragment_size: int = 1280
    keepalive: int = 20  # seconds between NAT keepalives behind a NAT; 0: none
    # Retransmission of IKE requests (strongSwan's charon.retransmit_*): the n-th
    # waits timeout * base**n; the peer is dead after `tries` retransmissions.
    retransmit_timeout: float = 4.0
    retransmit_base: float = 1.8
    retransmit_tries: int = 5

    def connection(self, name: str) -> ConnectionConfig:
        return self._by_name[name]  # KeyError for an unknown name

    @functools.cached_property
    def _by_name(self) -> dict[str, ConnectionConfig]:
        return {conn.name: conn for conn in self.connections}


@dataclass(frozen=True)
class ConfigChanges:
    """What a reload changes: by connection name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


def diff_configs(old: AgentConfig, new: AgentConfig) -> ConfigChanges:
    """Connections added, removed, changed and unchanged from `old` to `new` (a reload
    leaves the unchanged ones and their SAs alone)."""
    before = {c.name: c for c in old.connections}
    after = {c.name: c for c in new.connections}
    return ConfigChanges(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
        unchanged=tuple(sorted(n for n in before.keys() & after.keys() if before[n] == after[n])),
    )


# A hook for proposal validation: (proposal string, "ike" | "esp" | "ah", allow_weak)
# -> None, raising ValueError with the reason. The IKE layer registers its parser.
ProposalValidator = Callable[[str, str, bool], None]


def _default(cls: type, name: str) -> Any:
    """A config dataclass field's default: the one place each default is written."""
    return _defaults_of(cls)[name]


@functools.cache
def _defaults_of(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _default_proposal_validator(text: str, kind: str, allow_weak: bool) -> None:
    """Valid, and implemented: by the IKE engine for IKE, by the data planes for ESP/AH
    (every transform the parser accepts works, or is refused here with the reason)."""
    from ..ike.proposals import parse_proposal_string, unsupported_ike  # late: no cycle
    from .install import unsupported_child

    spec = parse_proposal_string(text, kind, allow_weak=allow_weak)
    problem = unsupported_ike(spec) if kind == "ike" else unsupported_child(spec)
    if problem:
        raise ValueError(f"{text!r}: {problem}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Reader:
    """Walks the raw YAML, collecting problems with their paths instead of stopping."""

    def __init__(self, validate_proposal: ProposalValidator, base_dir: Path):
        self.problems: list[tuple[str, str]] = []
        self.validate_proposal = validate_proposal
        self.base_dir = base_dir

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def mapping(self, raw: Any, path: str, known: set[str]) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, f"must be a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if not isinstance(key, str) or key not in known:
                close = sorted(known)
                self.problem(
                    _join(path, key),
                    f"unknown key (known: {', '.join(close)})",
                )
        return raw

    def choice(self, raw: dict, key: str, path: str, choices: tuple[str, ...], default: str) -> str:
        value = raw.get(key, default)
        if isinstance(value, bool):  # YAML reads bare no/yes as booleans
            value = "yes" if value else "no"
        if value not in choices:
            self.problem(_join(path, key), f"{value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def number(self, raw: dict, key: str, path: str, default: float, lo: float, hi: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            self.problem(_join(path, key), f"{value!r} must be a number from {lo:g} to {hi:g}")
            return default
        return float(value)

    def integer(self, raw: dict, key: str, path: str, default: int, lo: int, hi: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problem(_join(path, key), f"{value!r} must be an integer from {lo} to {hi}")
            return default
        return value

    def boolean(self, raw: dict, key: str, path: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.problem(_join(path, key), f"{value!r} must be true or false")
            return default
        return value

    def _scaled(self, raw: dict, key: str, path: str, default: int, pattern, units, what) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool):
            self.problem(_join(path, key), f"{value!r} is not a {what}")
            return default
        if isinstance(value, int):
            if value < 0:
                self.problem(_join(path, key), f"{value!r} must not be negative")
                return default
            return value
        match = pattern.match(str(value).strip())
        if not match:
            self.problem(_join(path, key), f"{value!r} is not a {what}")
            return default
        return int(match[1]) * units[match[2].lower()]

    def duration(self, raw: dict, key: str, path: str, default: int) -> int:
        return self._scaled(
            raw,
            key,
            path,
            default,
            _DURATION,
            _DURATION_UNITS,
            "duration (seconds, or a number with s, m, h or d)",
        )

    def size(self, raw: dict, key: str, path: str, default: int) -> int:
        return self._scaled(
            raw,
            key,
            path,
            default,
            _SIZE,
            _SIZE_UNITS,
            "size (a number, optionally with k, M, G or T)",
        )

    def strings(self, raw: dict, key: str, path: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = raw.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            self.problem(_join(path, key), "must be a string or a list of strings")
            return default
        return tuple(value)

    def addresses(self, raw: dict, key: str, path: str, required: bool) -> tuple[str, ...]:
        values = self.strings(raw, key, path, ())
        if required and not values and key in raw:
            self.problem(_join(path, key), "must list at least one address")
        elif required and key not in raw:
            self.problem(_join(path, key), "is required")
        for i, value in enumerate(values):
            if value in ANY_ADDRESS:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                self.problem(f"{path}.{key}[{i}]", f"{value!r} is not an IP address")
        return values

    def peer_addresses(self, raw: dict, key: str, path: str) -> tuple[str, ...]:
        """Where a peer may be: addresses (an initiator tries them in turn), prefixes and
        %any / %any4 / %any6 (it may come from anywhere there); prefixes as written."""
        values = self.strings(raw, key, path, ())
        if key not in raw:
            self.problem(_join(path, key), "is required")
        elif not values:
            self.problem(_join(path, key), "must list at least one address")
        valid = []
        for i, value in enumerate(values):
            try:
                if value not in ANY_ADDRESS and not is_dns_name(value):
                    ipaddress.ip_network(value, strict=True)
                valid.append(value)
            except ValueError:
                self.problem(
                    f"{path}.{key}[{i}]",
                    f"{value!r} is not an IP address, a prefix, a DNS name or %any",
                )
        return tuple(valid)

    def selectors(self, raw: dict, key: str, path: str) -> tuple[str, ...]:
        """Traffic selectors: prefixes (a bare address means that one host)."""
        values = self.strings(raw, key, path, ())
        if key not in raw:
            self.problem(_join(path, key), "is required")
        prefixes = []
        for i, value in enumerate(values):
            try:
                prefixes.append(str(ipaddress.ip_network(value, strict=True)))
            except ValueError as exc:
                self.problem(f"{path}.{key}[{i}]", f"{value!r} is not a valid prefix ({exc})")
        return tuple(prefixes)

    def proposals(
        self, raw: dict, key: str, path: str, kind: str, default: tuple[str, ...], allow_weak: bool
    ) -> tuple[str, ...]:
        values = self.strings(raw, key, path, default)
        if key in raw and not values:
            self.problem(_join(path, key), "must list at least one proposal")
        for i, value in enumerate(values):
            try:
                self.validate_proposal(value, kind, allow_weak)
            except ValueError as exc:
                self.problem(f"{path}.{key}[{i}]", str(exc))
        return values

    def secret_file(self, value: Any, path: str) -> Secret | None:
        if not isinstance(value, str) or not value:
            self.problem(path, "must be a file path")
            return None
        file = Path(value) if os.path.isabs(value) else self.base_dir / value
        try:
            info = file.stat()
        except OSError as exc:
            self.problem(path, f"cannot read {file}: {exc.strerror}")
            return None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.problem(
                path,
                f"{file} is readable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); make it 0600",
            )
            return None
        data = file.read_bytes().strip()
        return Secret(data)


def _auth(
    reader: _Reader, raw: Any, path: str, remote: bool, opportunistic: bool = False
) -> AuthConfig:
    raw = reader.mapping(
        raw,
        path,
        {"id", "auth", "certs", "key", "key_passphrase_file", "cacerts", "crls", "revocation"},
    )
    ident = raw.get("id")
    if opportunistic:
        # Each end is known by its address, which its certificate must carry.
        if "id" in raw:
            reader.problem(
                f"{path}.id",
                "an opportunistic connection's ends are identified by their addresses "
                "(the certificates carry them): leave id out",
            )
        ident = ""
    elif not isinstance(ident, str) or not ident:
        reader.problem(f"{path}.id", "is required (an IP address, FQDN, user@FQDN or DN)")
        ident = ""
    try:  # a DN in one spelling, the one keywayd compares the peer's with
        ident = identity.canonical(ident) if ident else ident
    except identity.IdentityError as exc:
        reader.problem(f"{path}.id", str(exc))
    auth = reader.choice(
        raw, "auth", path, REMOTE_AUTH if remote else AUTH_METHODS, _default(AuthConfig, "auth")
    )
    certs = reader.strings(raw, "certs", path, ())
    cacerts = reader.strings(raw, "cacerts", path, ())
    key = raw.get("key", "")
    passphrase = None
    if "key_passphrase_file" in raw:
        # The passphrase of an encrypted key is a secret like a PSK: a 0600 file.
        passphrase = reader.secret_file(raw["key_passphrase_file"], f"{path}.key_passphrase_file")
        if not key:
            reader.problem(f"{path}.key_passphrase_file", "is the passphrase of key: set key")
    return AuthConfig(
        id=ident,
        auth=auth,
        certs=certs,
        key=key,
        key_passphrase=passphrase,
        cacerts=cacerts,
        crls=reader.strings(raw, "crls", path, ()),
        revocation=reader.choice(
            raw, "revocation", path, REVOCATION_POLICIES, _default(AuthConfig, "revocation")
        ),
    )


_CHILD_KEYS = {
    "local_ts",
    "remote_ts",
    "mode",
    "esp_proposals",
    "ah_proposals",
    "rekey_time",
    "life_time",
    "rand_time",
    "rekey_bytes",
    "life_bytes",
    "rekey_packets",
    "life_packets",
    "start_action",
    "close_action",
    "dpd_action",
    "replay_window",
    "updown",
}
_CONNECTION_KEYS = {
    "version",
    "local_addrs",
    "remote_addrs",
    "local_port",
    "remote_port",
    "local",
    "remote",
    "psk",
    "psk_file",
    "proposals",
    "encap",
    "mobike",
    "dpd_delay",
    "dpd_timeout",
    "rekey_time",
    "reauth_time",
    "over_time",
    "rand_time",
    "keyingtries",
    "unique",
    "if_id_in",
    "if_id_out",
    "mark_in",
    "mark_out",
    "children",
    "allow_weak",
    "opportunistic",
    "shunt_lifetime",
}
_AGENT_KEYS = {
    "connections",
    "dataplane",
    "log_level",
    "control_socket",
    "metrics_listen",
    "ike_port",
    "nat_t_port",
    "half_open_cookie_threshold",
    "fragment_size",
    "keepalive",
    "retransmit_timeout",
    "retransmit_base",
    "retransmit_tries",
}


def _child(
    reader: _Reader, name: str, raw: Any, path: str, allow_weak: bool, opportunistic: bool
) -> ChildConfig:
    raw = reader.mapping(raw, path, _CHILD_KEYS)
    if opportunistic:
        _opportunistic_child(reader, raw, path)
    # An opportunistic child is host to host and trapped unless it says otherwise.
    defaults = {"mode": "transport", "start_action": "trap"} if opportunistic else {}

    def choice(key: str, choices: tuple[str, ...]) -> str:
        return reader.choice(raw, key, path, choices, defaults.get(key, _default(ChildConfig, key)))

    mode = choice("mode", CHILD_MODES)
    if "esp_proposals" in raw and "ah_proposals" in raw:
        reader.problem(path, "esp_proposals and ah_proposals exclude each other")
    ah = reader.proposals(raw, "ah_proposals", path, "ah", (), allow_weak)
    esp = (
        ()
        if ah
        else reader.proposals(raw, "esp_proposals", path, "esp", DEFAULT_ESP_PROPOSALS, allow_weak)
    )
    rekey_time = reader.duration(raw, "rekey_time", path, _default(ChildConfig, "rekey_time"))
    life_time = reader.duration(raw, "life_time", path, 0) or rekey_time + rekey_time // 10
    rand_time = reader.duration(raw, "rand_time", path, -1) if "rand_time" in raw else -1
    if rand_time < 0:
        rand_time = life_time - rekey_time
    if rekey_time and life_time <= rekey_time:
        reader.problem(f"{path}.life_time", f"must be above rekey_time ({rekey_time}s)")
    rekey_bytes = reader.size(raw, "rekey_bytes", path, 0)
    life_bytes = reader.size(raw, "life_bytes", path, 0)
    if rekey_bytes and life_bytes and life_bytes <= rekey_bytes:
        reader.problem(f"{path}.life_bytes", "must be above rekey_bytes")
    rekey_packets = reader.size(raw, "rekey_packets", path, 0)
    life_packets = reader.size(raw, "life_packets", path, 0)
    if rekey_packets and life_packets and life_packets <= rekey_packets:
        reader.problem(f"{path}.life_packets", "must be above rekey_packets")
    return ChildConfig(
        name=name,
        # An opportunistic child's: filled in by its connection (_opportunistic), but
        # for the hosts a pass or drop one exempts.
        local_ts=() if opportunistic else reader.selectors(raw, "local_ts", path),
        remote_ts=()
        if opportunistic and mode not in ("pass", "drop")
        else reader.selectors(raw, "remote_ts", path),
        mode=mode,
        esp_proposals=esp,
        ah_proposals=ah,
        rekey_time=rekey_time,
        life_time=life_time,
        rand_time=rand_time,
        rekey_bytes=rekey_bytes,
        life_bytes=life_bytes,
        rekey_packets=rekey_packets,
        life_packets=life_packets,
        start_action=choice("start_action", START_ACTIONS),
        close_action=choice("close_action", START_ACTIONS),
        dpd_action=choice("dpd_action", DPD_ACTIONS),
        replay_window=reader.integer(
            raw, "replay_window", path, _default(ChildConfig, "replay_window"), 0, 4096
        ),
        updown=raw.get("updown", "") if isinstance(raw.get("updown", ""), str) else "",
    )


def _opportunistic_child(reader: _Reader, raw: dict, path: str) -> None:
    """What an opportunistic child cannot be: anything but host to host, in transport
    mode, negotiated on the first packet (its connection's one trap policy per prefix
    finds each peer's SAs by the packet's destination). A pass or drop child is an
    exception for the hosts of its remote_ts (Libreswan's clear and block groups)."""
    selectors = (
        "an opportunistic child protects the traffic of the two hosts: its selectors are "
        "the local address and each peer's; leave it out"
    )
    actions = (
        "an opportunistic child comes back on the next packet to its peer (the prefix's "
        "trap policy), whatever ended it: leave it out"
    )
    refused = {"local_ts": selectors, "remote_ts": selectors, "close_action": actions,
               "dpd_action": actions}  # fmt: skip
    if raw.get("mode") in ("pass", "drop"):
        refused = {
            "local_ts": "an opportunistic connection's pass and drop children hold for the "
            "local address: leave it out"
        }
    for key, why in refused.items():
        if key in raw:
            reader.problem(_join(path, key), why)
    if raw.get("mode", "transport") not in ("transport", "pass", "drop"):
        reader.problem(
            _join(path, "mode"),
            f"{raw['mode']!r}: an opportunistic child is host to host, in transport mode "
            "(one policy per prefix serves every peer in it; a tunnel's names its peer), "
            "or a pass or drop exception with its remote_ts",
        )
    if raw.get("start_action", "trap") != "trap":
        reader.problem(
            _join(path, "start_action"),
            f"{raw['start_action']!r}: an opportunistic child is negotiated on the first "
            "packet to a peer (trap); there is no peer to start before",
        )


def _opportunistic(
    reader: _Reader,
    path: str,
    local_addrs: tuple[str, ...],
    remote_addrs: tuple[str, ...],
    local: AuthConfig,
    children: list[ChildConfig],
) -> tuple[AuthConfig, list[ChildConfig]]:
    """Check an opportunistic connection; its local id and its children's selectors."""
    if len(local_addrs) != 1 or local_addrs[0] in ANY_ADDRESS:
        reader.problem(
            _join(path, "local_addrs"),
            "an opportunistic connection needs the host's one address: its identity, "
            "and the source of every SA it makes",
        )
        return local, children
    if local.method != "pubkey":
        reader.problem(
            path,
            "an opportunistic connection authenticates by certificates (auth: pubkey): a "
            "PSK shared across a mesh would let any member pose as any other",
        )
    me = ipaddress.ip_address(local_addrs[0])
    ranges = []
    names = [value for value in remote_addrs if is_dns_name(value)]
    for value in remote_addrs:
        if is_dns_name(value):
            reader.problem(
                _join(path, "remote_addrs"),
                f"{value}: an opportunistic connection's remote_addrs are prefixes (and "
                "addresses) whose hosts it protects, not names",
            )
            continue
        for prefix in ANY_ADDRESS.get(value, (value,)):
            network = ipaddress.ip_network(prefix)
            if network.version == me.version:
                ranges.append(str(network))
    if remote_addrs and not ranges and not names:
        reader.problem(
            _join(path, "remote_addrs"),
            f"holds no prefix of the local address's family (IPv{me.version})",
        )
    if not any(c.mode == "transport" for c in children):
        reader.problem(
            _join(path, "children"), "an opportunistic connection needs a transport child"
        )
    host = str(ipaddress.ip_network(me))
    local = dataclasses.replace(local, id=str(me))
    children = [
        dataclasses.replace(c, local_ts=(host,))
        if c.mode in ("pass", "drop")
        else dataclasses.replace(c, local_ts=(host,), remote_ts=tuple(ranges))
        for c in children
    ]
    return local, children


def _mark(reader: _Reader, raw: dict, key: str, path: str) -> tuple[int, int] | None:
    value = raw.get(key)
    if value is None:
        return None
    text = str(value)
    try:
        mark, _unused, mask = text.partition("/")
        return int(mark, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        reader.problem(_join(path, key), f"{value!r} is not MARK or MARK/MASK")
        return None


def _psks(reader: _Reader, raw: dict, path: str, file_private: bool) -> list[Secret]:
    """`psk` or `psk_file`: one, or a list during a rotation (newest first: sent; the
    others still accepted from peers that have not rotated yet)."""
    if "psk" in raw and "psk_file" in raw:
        reader.problem(path, "psk and psk_file exclude each other")
        return []
    key = "psk" if "psk" in raw else "psk_file" if "psk_file" in raw else None
    if key is None:
        return []
    values = raw[key] if isinstance(raw[key], list) else [raw[key]]
    if not values:
        reader.problem(f"{path}.{key}", "must not be empty")
    secrets = []
    for n, value in enumerate(values):
        where = f"{path}.{key}" + (f"[{n}]" if isinstance(raw[key], list) else "")
        if key == "psk_file":
            secret = reader.secret_file(value, where)
        elif not isinstance(value, str) or not value:
            reader.problem(where, "must be a non-empty string")
            secret = None
        elif not file_private:
            reader.problem(
                where,
                "an inline PSK needs the config file to be 0600; fix its mode or use psk_file",
            )
            secret = None
        else:
            secret = Secret(value.encode())
        if secret is not None:
            secrets.append(secret)
    return secrets


def _connection(
    reader: _Reader, name: str, raw: Any, file_private: bool, ike_port: int
) -> ConnectionConfig:
    path = f"connections.{name}"
    if not _NAME.match(name):
        reader.problem(path, "connection names use letters, digits, '_', '.', '-' (64 at most)")
    raw = reader.mapping(raw, path, _CONNECTION_KEYS)
    allow_weak = reader.boolean(raw, "allow_weak", path, _default(ConnectionConfig, "allow_weak"))
    opportunistic = (
        reader.choice(raw, "opportunistic", path, OPPORTUNISTIC_POLICIES, "private")
        if "opportunistic" in raw
        else ""
    )
    if "shunt_lifetime" in raw and not opportunistic:
        reader.problem(
            f"{path}.shunt_lifetime", "is how long an opportunistic negotiation's failure holds"
            ": set opportunistic, or leave it out",
        )  # fmt: skip
    local = _auth(reader, raw.get("local"), f"{path}.local", remote=False,
                  opportunistic=bool(opportunistic))  # fmt: skip
    remote = _auth(reader, raw.get("remote"), f"{path}.remote", remote=True,
                   opportunistic=bool(opportunistic))  # fmt: skip
    if local.method != remote.method:
        reader.problem(
            path,
            f"local auth {local.auth} and remote auth {remote.auth}: both ends authenticate "
            "the same way (psk, or certificates); mixed authentication is not implemented",
        )
    psks = _psks(reader, raw, path, file_private)
    psk = psks[0] if psks else None
    if "psk" in (local.method, remote.method):
        if psk is None and not any(p[0].startswith(f"{path}.psk") for p in reader.problems):
            reader.problem(path, "auth psk needs psk or psk_file")
        for n, secret in enumerate(psks):
            if len(secret.reveal()) < MIN_PSK_LENGTH and not allow_weak:
                reader.problem(
                    f"{path}.psk" + (f"[{n}]" if len(psks) > 1 else ""),
                    f"is shorter than {MIN_PSK_LENGTH} bytes; use a longer one "
                    "(or allow_weak: true)",
                )
    for side in (local, remote):
        if side.auth == "pubkey" and side is local and (not side.certs or not side.key):
            reader.problem(f"{path}.local", "auth pubkey needs certs and key")
        if side is local and (side.crls or side.revocation != "relaxed"):
            reader.problem(
                f"{path}.local", "crls and revocation check the peer: set them in remote"
            )
        if side.method == "pubkey" and side is remote and not side.cacerts:
            reader.problem(f"{path}.remote", "auth pubkey needs cacerts to verify the peer")
        if side.method == "pubkey" and side is remote and side.cacerts:
            try:  # late: the parser itself needs no cryptography
                from ..ike import certs  # noqa: F401
            except ImportError as exc:
                reader.problem(
                    f"{path}.remote", f"verifying a peer's certificate needs cryptography ({exc})"
                )
    rekey_time = reader.duration(raw, "rekey_time", path, _default(ConnectionConfig, "rekey_time"))
    reauth_time = reader.duration(
        raw, "reauth_time", path, _default(ConnectionConfig, "reauth_time")
    )
    over_time = reader.duration(raw, "over_time", path, 0) or max(rekey_time, reauth_time) // 10
    rand_time = (
        reader.duration(raw, "rand_time", path, over_time) if "rand_time" in raw else over_time
    )
    children_raw = raw.get("children", {})
    children = []
    if not isinstance(children_raw, dict):
        reader.problem(f"{path}.children", "must be a mapping of child names to children")
    else:
        for child_name, child_raw in children_raw.items():
            child_path = f"{path}.children.{child_name}"
            if not isinstance(child_name, str) or not _NAME.match(child_name):
                reader.problem(child_path, "child names use letters, digits, '_', '.', '-'")
                continue
            children.append(
                _child(reader, child_name, child_raw, child_path, allow_weak, bool(opportunistic))
            )
    version = raw.get("version", 2)
    if version != 2:
        reader.problem(f"{path}.version", f"{version!r}: keywayd speaks IKEv2 only (2)")
    # Keys swanctl has that keywayd does not honour are refused, never ignored.
    if "dpd_timeout" in raw:
        reader.problem(
            f"{path}.dpd_timeout",
            "is IKEv1's (swanctl ignores it for IKEv2): an IKEv2 peer is dead when "
            "retransmit_tries retransmissions of a request go unanswered",
        )
    encap = reader.choice(raw, "encap", path, ENCAP_MODES, _default(ConnectionConfig, "encap"))
    if encap == "force":
        for child in children:
            if child.protocol == "ah":
                reader.problem(
                    f"{path}.children.{child.name}",
                    "AH cannot be UDP-encapsulated (RFC 3948 covers ESP only): "
                    "use ESP, or encap: auto",
                )
    local_port = reader.integer(raw, "local_port", path, ike_port, 1, 65535)
    if local_port != ike_port:
        reader.problem(
            f"{path}.local_port",
            f"{local_port}: keywayd initiates from its ike_port ({ike_port}) only",
        )
    remote_addrs = reader.peer_addresses(raw, "remote_addrs", path)
    local_addrs = reader.addresses(raw, "local_addrs", path, required=False) or ("%any",)
    if opportunistic:
        local, children = _opportunistic(reader, path, local_addrs, remote_addrs, local, children)
    elif remote_addrs and not initiation_addresses(remote_addrs):
        # A peer of unknown address: it initiates, we answer (as strongSwan's %any).
        starting = [
            f"{c.name}: {key} {getattr(c, key)}"
            for c in children
            for key in ("start_action", "close_action", "dpd_action")
            if getattr(c, key) in ("start", "trap", "restart")
        ]
        if starting:
            reader.problem(
                f"{path}.remote_addrs",
                "has no single address to initiate to (only %any or prefixes), so the "
                f"connection can only answer: {'; '.join(starting)}",
            )
        if all(a.startswith("%any") for a in local_addrs):
            reader.problem(
                f"{path}.local_addrs",
                "is required when remote_addrs has no single address (no route to choose "
                "a local address by)",
            )
    first = next(iter(initiation_addresses(remote_addrs)), "")
    if is_dns_name(first) and not opportunistic:
        # Names are resolved when initiating, never while keywayd loads its config.
        if all(a.startswith("%any") for a in local_addrs):
            reader.problem(
                f"{path}.local_addrs",
                f"is required when the first of remote_addrs is a DNS name ({first})",
            )
        traps = [c.name for c in children if "trap" in (c.start_action, c.dpd_action)]
        if traps:
            reader.problem(
                f"{path}.remote_addrs",
                f"{first} is a DNS name: a trap policy needs the peer's address before any "
                f"packet (children {', '.join(traps)}); list the address, or use start",
            )
    return ConnectionConfig(
        name=name,
        local_addrs=local_addrs,
        remote_addrs=remote_addrs,
        local=local,
        remote=remote,
        children=tuple(children),
        psk=psk,
        previous_psks=tuple(psks[1:]),
        local_port=local_port,
        remote_port=reader.integer(
            raw, "remote_port", path, _default(ConnectionConfig, "remote_port"), 1, 65535
        ),
        proposals=reader.proposals(
            raw, "proposals", path, "ike", DEFAULT_IKE_PROPOSALS, allow_weak
        ),
        encap=encap,
        mobike=reader.boolean(raw, "mobike", path, _default(ConnectionConfig, "mobike")),
        dpd_delay=reader.duration(raw, "dpd_delay", path, _default(ConnectionConfig, "dpd_delay")),
        rekey_time=rekey_time,
        reauth_time=reauth_time,
        over_time=over_time,
        rand_time=rand_time,
        keyingtries=reader.integer(
            raw, "keyingtries", path, _default(ConnectionConfig, "keyingtries"), 0, 1 << 16
        ),
        unique=reader.choice(
            raw, "unique", path, UNIQUE_POLICIES, _default(ConnectionConfig, "unique")
        ),
        if_id_in=reader.integer(raw, "if_id_in", path, 0, 0, 0xFFFFFFFF),
        if_id_out=reader.integer(raw, "if_id_out", path, 0, 0, 0xFFFFFFFF),
        mark_in=_mark(reader, raw, "mark_in", path),
        mark_out=_mark(reader, raw, "mark_out", path),
        allow_weak=allow_weak,
        opportunistic=opportunistic,
        shunt_lifetime=reader.duration(
            raw, "shunt_lifetime", path, _default(ConnectionConfig, "shunt_lifetime")
        ),
    )


def _listen_address(reader: _Reader, raw: dict, key: str) -> tuple[str, int] | None:
    """ADDRESS:PORT with a literal IPv4 or IPv6 address ([::1]:9571); absent: None."""
    value = raw.get(key)
    if value is None:
        return None
    host, sep, port = str(value).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
        if not (sep and 1 <= number <= 65535):
            raise ValueError
    except ValueError:
        reader.problem(key, f"{value!r} must be ADDRESS:PORT, e.g. 127.0.0.1:9571 or [::1]:9571")
        return None
    return str(address), number


def parse_config(
    raw: Any,
    *,
    source: str = "config",
    file_private: bool = True,
    base_dir: Path | None = None,
    validate_proposal: ProposalValidator | None = None,
) -> AgentConfig:
    """Validate an already-loaded YAML document; raise ConfigError listing every problem."""
    reader = _Reader(validate_proposal or _default_proposal_validator, base_dir or Path("/"))
    raw = reader.mapping(raw, "", _AGENT_KEYS)
    ike_port = reader.integer(raw, "ike_port", "", _default(AgentConfig, "ike_port"), 1, 65535)
    connections_raw = raw.get("connections", {})
    connections = []
    if not isinstance(connections_raw, dict):
        reader.problem("connections", "must be a mapping of connection names to connections")
    else:
        for name, conn_raw in connections_raw.items():
            connections.append(_connection(reader, str(name), conn_raw, file_private, ike_port))
    config = AgentConfig(
        connections=tuple(connections),
        dataplane=reader.choice(
            raw, "dataplane", "", DATAPLANES, _default(AgentConfig, "dataplane")
        ),
        log_level=reader.choice(
            raw, "log_level", "", LOG_LEVELS, _default(AgentConfig, "log_level")
        ),
        control_socket=str(raw.get("control_socket", _default(AgentConfig, "control_socket"))),
        metrics_listen=_listen_address(reader, raw, "metrics_listen"),
        ike_port=ike_port,
        nat_t_port=reader.integer(
            raw, "nat_t_port", "", _default(AgentConfig, "nat_t_port"), 1, 65535
        ),
        half_open_cookie_threshold=reader.integer(
            raw,
            "half_open_cookie_threshold",
            "",
            _default(AgentConfig, "half_open_cookie_threshold"),
            0,
            1 << 20,
        ),
        fragment_size=reader.integer(
            raw, "fragment_size", "", _default(AgentConfig, "fragment_size"), 576, 65535
        ),
        keepalive=reader.duration(raw, "keepalive", "", _default(AgentConfig, "keepalive")),
        retransmit_timeout=reader.number(
            raw, "retransmit_timeout", "", _default(AgentConfig, "retransmit_timeout"), 0.1, 600.0
        ),
        retransmit_base=reader.number(
            raw, "retransmit_base", "", _default(AgentConfig, "retransmit_base"), 1.0, 10.0
        ),
        retransmit_tries=reader.integer(
            raw, "retransmit_tries", "", _default(AgentConfig, "retransmit_tries"), 0, 30
        ),
    )
    if reader.problems:
        raise ConfigError(reader.problems, source)
    return config


def config_warnings(config: AgentConfig) -> list[str]:
    """What is valid but invites trouble: a Child SA whose hard lifetime comes less
    than two retransmissions after its rekey, so that a rekey losing a packet or two
    may not end before it (issue 14, item 22)."""
    two_retransmissions = config.retransmit_timeout * (1 + config.retransmit_base)
    warnings = []
    for conn in config.connections:
        for child in conn.children:
            gap = child.life_time - child.rekey_time
            if child.rekey_time and gap < two_retransmissions:
                warnings.append(
                    f"connections.{conn.name}.children.{child.name}: life_time "
                    f"{child.life_time}s is only {gap}s after rekey_time "
                    f"{child.rekey_time}s, less than two retransmissions "
                    f"({two_retransmissions:.1f}s): a rekey that loses a packet may not "
                    "end before the hard lifetime"
                )
    return warnings


def load_config(path: str | os.PathLike, **kwargs: Any) -> AgentConfig:
    """Read and validate a config file; ConfigError on any problem (file untouched)."""
    file = Path(path)
    if yaml is None:
        raise ConfigError([("", "PyYAML is not installed")], str(file))
    try:
        text = file.read_text()
        mode = stat.S_IMODE(file.stat().st_mode)
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], str(file)) from exc
    try:
        raw = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        # The YAML error quotes the offending line, which may hold a secret: say where.
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown place"
        problem = getattr(exc, "problem", "") or ""
        what = f": {problem}" if problem.startswith("duplicate key") else ""
        raise ConfigError([("", f"not valid YAML at {where}{what}")], str(file)) from None
    private = not mode & (stat.S_IRWXG | stat.S_IRWXO)
    return parse_config(raw, source=str(file), file_private=private, base_dir=file.parent, **kwargs)
