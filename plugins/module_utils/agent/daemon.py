"""keywayd: the keying agent. Config in, live IKE and Child SAs out, kept alive.

    python -m ansible_collections.keyway.ipsec.plugins.module_utils.agent.keywayd \\
        --config /etc/keyway/keywayd.yml

It wires the layers together and owns nothing of their logic: the config parser
(agent/config.py) says what should exist, one sans-IO Engine per local address
negotiates it over UdpRunner's sockets, and the data plane (kernel XFRM or the userspace
ESP plane) installs what the engine reports, through agent/install.py.

Choices made here, where the issue left room:
- Reload (SIGHUP or `keywayctl reload`) compares whole connections: an unchanged one
  keeps its SAs untouched; a changed one is closed (Delete sent) and started afresh.
  A file that fails validation changes nothing and the reply lists its problems.
- `start_action: start` connections are re-initiated after any failure or loss (peer
  dead, deleted by the peer, negotiation or authentication failure) with a jittered
  backoff of 1, 2, 4 … 60 s, unless the operator terminated them. `keyingtries` bounds
  the attempts of an operator's or a trap's initiation (0: unlimited).
- Byte and packet limits come from the data plane's soft expire events; only the side
  that initiated the IKE SA starts the rekey, as for time-based rekeys, so that both
  ends (which count the same bytes) do not collide; the hard limit stays a backstop.
- Trap policies (`start_action: trap`) stay in place while no SA exists, and an
  acquire on them starts the connection.
- SIGTERM: Delete sent for every IKE SA (answers awaited for up to 2 s), then every SA
  and policy Keyway owns on the plane is removed. On start the plane's owned leftovers
  from an earlier keywayd (crash, kill -9) are flushed before anything is installed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..dataplane import base
from ..ike.certs import RevocationCache
from ..ike.engine.core import (
    DUPLICATE_IKE,
    EXPIRED,
    HARD_LIFETIME,
    PEER_DEAD,
    REDUNDANT_IKE,
    REPLACED_UNIQUE,
    SURPLUS_REKEY,
    UNCONFIRMED,
    ChildParams,
    Engine,
    IkeConnection,
    IkeSa,
    random_spi,
    untrusted,
)
from ..ike.engine.events import (
    Address,
    AuthFailed,
    ChildSaDeleted,
    ChildSaReady,
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
from ..ike.engine.retransmit import RetransmitPolicy
from ..ike.proposals import describe
from . import install, library, opportunistic
from .config import (
    PEER_SIGNATURES,
    AgentConfig,
    AuthConfig,
    ChildConfig,
    ConfigError,
    ConnectionConfig,
    config_warnings,
    diff_configs,
    initiation_addresses,
    is_dns_name,
    load_config,
    peer_ranges,
)
from .control import ControlError, ControlServer, InstanceLock
from .udp import UdpRunner

# GET /metrics (metrics_listen): the request's line and headers, and how long they take.
METRICS_REQUEST_LIMIT = 8192
METRICS_REQUEST_TIMEOUT = 5.0

log = logging.getLogger("keyway.agent")

BACKOFF_MAX = 60.0
MAX_INITIATING = 32  # IKE SAs we initiate that may be half-way up at once
# ChildSaDeleted reasons of a Child SA lost while its IKE SA lives (not the operator's).
LOST_CHILD = ("deleted by peer", HARD_LIFETIME)
# IkeSaDown reasons of an SA whose successor (or twin) carries the connection on.
REPLACED = (
    "replaced by rekey",
    "replaced by reauthentication",
    REDUNDANT_IKE,
    DUPLICATE_IKE,
    REPLACED_UNIQUE,
    SURPLUS_REKEY,
    UNCONFIRMED,
)
# ChildSaDeleted reasons that show the peer holds the SA that replaces the one deleted:
# it deleted the old one, or a twin went once the peer was known to hold the other.
PEER_HOLDS_SUCCESSOR = ("deleted by peer", DUPLICATE_IKE)
SHUTDOWN_GRACE = 2.0  # seconds to wait for the peers' answers to our Deletes
# Seconds an inbound SA outlives its replacement (a rekey, a reauthentication, a
# collision): packets the peer sent on it just before switching are still on their way
# when its Delete arrives (strongSwan's delete_rekeyed_delay, 5 s).
DELETE_REKEYED_DELAY = 5.0
WATCH_QUEUE = 1000  # events buffered per `watch` client before it is dropped


class AgentError(Exception):
    """keywayd cannot start: the message says why (bad config, no data plane, ...)."""


def _same_peer(a: ConnectionConfig, b: ConnectionConfig) -> bool:
    """Two versions of a connection that reach the same peer as the same identities, with
    the same policy marks and interfaces: the new one can take over from the old."""

    def key(c: ConnectionConfig) -> tuple:
        return (c.local_addrs, c.remote_addrs, c.local_port, c.remote_port, c.local.id,
                c.remote.id, c.mark_in, c.mark_out, c.if_id_in, c.if_id_out)  # fmt: skip

    return key(a) == key(b)


def _same_policies(a: ChildConfig, b: ChildConfig) -> bool:
    return (a.local_ts, a.remote_ts, a.mode, a.protocol) == (
        b.local_ts, b.remote_ts, b.mode, b.protocol
    )  # fmt: skip


def resolve_local_address(conn: ConnectionConfig) -> str:
    """The connection's local address: the configured one, or for %any (%any4, %any6)
    the source address the kernel's routing picks towards the first remote address."""
    for address in conn.local_addrs:
        if not address.startswith("%any"):
            return address
    remote = initiation_addresses(conn.remote_addrs)[0]  # the parser saw to that
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((remote, conn.remote_port))
        except OSError as exc:
            raise AgentError(f"{conn.name}: no route to {remote}: {exc.strerror}") from None
        return probe.getsockname()[0]


def _read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def _private_key(auth: AuthConfig):
    """The own private key (PEM), decrypted with the passphrase of key_passphrase_file
    if it is encrypted. AgentError says what is wrong, never with the passphrase."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = _read_file(auth.key)
    except OSError as exc:
        raise AgentError(f"key {auth.key}: {exc.strerror}") from None
    passphrase = auth.key_passphrase.reveal() if auth.key_passphrase else None
    try:
        return serialization.load_pem_private_key(data, passphrase)
    except TypeError:  # encrypted and no passphrase given, or the reverse
        if passphrase is None:
            raise AgentError(f"key {auth.key} is encrypted: set key_passphrase_file") from None
        raise AgentError(f"key {auth.key} is not encrypted: drop key_passphrase_file") from None
    except ValueError:
        raise AgentError(
            f"key {auth.key}: cannot load it (a wrong passphrase, or not a PEM private key)"
        ) from None


def ike_connection(conn: ConnectionConfig, agent: AgentConfig | None = None) -> IkeConnection:
    """The engine's view of a configured connection (pass/drop children are policies
    only, never negotiated), with the agent-wide fragment and retransmission settings."""
    agent = agent or AgentConfig()
    children = tuple(
        ChildParams(
            child.name,
            child.local_ts,
            child.remote_ts,
            child.proposals,
            child.mode,
            rekey_time=child.rekey_time,
            life_time=child.life_time,
            rand_time=child.rand_time,
            protocol=child.protocol,
        )
        for child in conn.children
        if child.mode in ("tunnel", "transport")
    )
    extra: dict[str, Any] = {}
    if conn.local.auth == "pubkey":
        from cryptography.hazmat.primitives import serialization

        from ..ike import certs

        chain = []
        for path in conn.local.certs:
            for cert in certs.load_certificates(_read_file(path)):
                chain.append(cert.public_bytes(serialization.Encoding.DER))
        cacerts = []
        for path in conn.remote.cacerts:
            cacerts.extend(certs.load_certificates(_read_file(path)))
        crls = [certs.load_crl(_read_file(path)) for path in conn.remote.crls]
        extra = dict(
            auth="pubkey",
            certs=tuple(chain),
            private_key=_private_key(conn.local),
            cacerts=tuple(cacerts),
            crls=tuple(crls),
            revocation=conn.remote.revocation,
            peer_signatures=PEER_SIGNATURES[conn.remote.auth],
        )
    # Where we initiate first; a peer that may be anywhere (%any, prefixes) initiates
    # itself, and the unspecified address stands in.
    first = next((a for a in initiation_addresses(conn.remote_addrs) if not is_dns_name(a)), None)
    if first is None:
        first = "::" if ":" in resolve_local_address(conn) else "0.0.0.0"
    return IkeConnection(
        conn.name,
        (first, conn.remote_port),
        conn.local.id,
        conn.remote.id,
        conn.psk.reveal() if conn.psk else b"",
        conn.proposals,
        children,
        allow_weak=conn.allow_weak,
        previous_psks=tuple(p.reveal() for p in conn.previous_psks),
        unique=conn.unique,
        fragment_size=agent.fragment_size,
        keepalive=agent.keepalive,
        nat_traversal=conn.encap != "no",
        mobike=conn.mobike,
        dpd_delay=conn.dpd_delay,
        rekey_time=conn.rekey_time,
        reauth_time=conn.reauth_time,
        over_time=conn.over_time,
        rand_time=conn.rand_time,
        peer_ranges=peer_ranges(conn.remote_addrs),
        opportunistic=bool(conn.opportunistic),
        retransmit=RetransmitPolicy(
            agent.retransmit_timeout, agent.retransmit_base, agent.retransmit_tries
        ),
        **extra,
    )


FETCH_TIMEOUT = 5.0  # seconds for a distribution point to answer
FETCH_LIMIT = 4 << 20  # bytes: a CRL larger than this is refused


def fetch_url(
    uri: str, body: bytes = b"", timeout: float = FETCH_TIMEOUT, limit: int = FETCH_LIMIT
) -> bytes:
    """GET `uri` (or POST an OCSP request `body` to it) over HTTP(S) only (redirects
    too: no file:, no FTP), at most `limit` bytes (the URI comes from a certificate,
    but its content from the network)."""
    import urllib.request

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.HTTPHandler,
        urllib.request.HTTPSHandler,
        urllib.request.HTTPRedirectHandler,
        urllib.request.HTTPDefaultErrorHandler,
        urllib.request.HTTPErrorProcessor,
    ):
        opener.add_handler(handler())
    if not uri.lower().startswith(("http://", "https://")):
        raise ValueError(f"{uri}: only http and https are fetched")
    headers = {"Content-Type": "application/ocsp-request"} if body else {}
    request = urllib.request.Request(uri, data=body or None, headers=headers)
    with opener.open(request, timeout=timeout) as answer:
        if not answer.geturl().lower().startswith(("http://", "https://")):
            raise ValueError(f"{uri}: redirected to {answer.geturl()}")
        data = answer.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{uri}: larger than {limit} bytes")
    return data


def event_record(event: Event | base.DataPlaneEvent) -> dict:
    """An event as JSON-ready data, keys left out (only SPIs, names and addresses)."""
    record: dict[str, Any] = {"event": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, bytes):
            if not f.name.startswith("spi"):
                continue  # key material
            value = value.hex()
        elif f.name.startswith("spi") and isinstance(value, int):
            value = f"{value:08x}"
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        record[f.name] = value
    return record


@dataclasses.dataclass
class _ChildState:
    """What is installed for one configured child of one connection."""

    reqid: int
    spis: set[int] = dataclasses.field(default_factory=set)  # inbound SPIs live now
    policies: list[base.PolicySpec] = dataclasses.field(default_factory=list)
    trap: bool = False


class Agent:
    def __init__(
        self,
        config_path: str | os.PathLike,
        plane: base.DataPlane | None = None,
        log_level: str | None = None,
    ):
        self.config_path = Path(config_path)
        self.log_level_override = log_level  # the command line's, over the config's
        self.config: AgentConfig = AgentConfig()
        self.plane = plane
        self._udp_encap_handler = None  # the userspace plane's ESP-in-UDP input
        self._local_towards: dict[str, str] = {}  # peer address -> our local address
        self._address_turn: dict[str, int] = {}  # which of remote_addrs is tried next
        # (connection, DNS name) -> the address it resolved to last: a peer may come
        # from there (and no longer from where the name pointed before).
        self._resolved: dict[tuple[str, str], ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
        # What an initiation waits on (a DNS lookup, a move to a new local address), held
        # until done: the loop keeps only weak references to tasks.
        self._initiation_tasks: set[asyncio.Task] = set()
        # CRLs and OCSP responses: one cache for every engine, filled by
        # _fetch_revocation while IKE_AUTH waits (the peer retransmits meanwhile).
        self._revocation_cache = RevocationCache()
        self._fetching: set[asyncio.Task] = set()
        self.engines: dict[str, Engine] = {}  # by local address
        self.runners: dict[str, UdpRunner] = {}
        self.local_of: dict[str, str] = {}  # connection -> local address
        self.children: dict[tuple[str, str], _ChildState] = {}
        # Opportunistic connections' instances, one per peer (agent/opportunistic.py):
        # by name, and the template each was made from.
        self._instances: dict[str, ConnectionConfig] = {}
        self._template_of: dict[str, str] = {}
        # (template, peer) -> the pass or drop policies a failed negotiation left for
        # that peer, and when they go
        self._shunts: dict[tuple[str, str], tuple[list[base.PolicySpec], asyncio.TimerHandle]]
        self._shunts = {}
        # spi_in -> (out, in) as installed; out is None while deferred or never to be sent on
        self.sa_pairs: dict[int, tuple[base.SaId | None, base.SaId]] = {}
        self._child_since: dict[int, float] = {}  # spi_in -> when it was installed
        # old spi_in -> (its successor's spi_in, the successor's outbound SA to install)
        self._deferred_out: dict[int, tuple[int, base.SaSpec]] = {}
        # spi_in -> its outbound SA, held back until the peer shows it holds the IKE SA
        # the Child SA came with (IkeSaConfirmed): our IKE_AUTH answer may be lost
        self._unconfirmed_out: dict[int, base.SaSpec] = {}
        # inbound SAs of replaced children, deleted DELETE_REKEYED_DELAY later
        self._late_deletes: dict[base.SaId, asyncio.TimerHandle] = {}
        self._next_reqid = base.KEYWAY_REQID_MIN + 1
        self._reqids: dict[tuple[str, str], int] = {}
        self._closing: set[bytes] = set()  # spi_i of IKE SAs we asked to delete
        # spi_in of a Child SA our rekey replaced -> the rekey's SA, until the old goes
        self._rekeyed_by_us: dict[int, int] = {}
        self._terminated: set[str] = set()  # closed by the operator: no restart
        self._retries: dict[str, tuple[int, asyncio.TimerHandle]] = {}
        self._attempts: dict[str, int] = {}
        self._last_error: dict[str, str] = {}  # why the connection's last attempt failed
        self._initiating: set[str] = set()  # our IKE SAs on their way up
        self._updown_running: set[subprocess.Popen] = set()
        self._init_queue: dict[str, None] = {}  # initiations waiting for a slot, in order
        self._waiters: dict[str, list[asyncio.Future]] = collections.defaultdict(list)
        self._watchers: set[asyncio.Queue] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        self.control: ControlServer | None = None
        self._instance: InstanceLock | None = None
        self._metrics_server: asyncio.Server | None = None
        self.started = time.time()
        # What the agent's Ansible role compares with its own payload (agent/library.py).
        self.library = library.agent_fingerprint()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------

    def _apply_log_level(self) -> None:
        level = self.log_level_override or self.config.log_level
        logging.getLogger("keyway").setLevel(level.upper())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            raise AgentError(str(exc)) from None
        self._apply_log_level()
        for warning in config_warnings(self.config):
            log.warning("%s", warning)
        self._instance = InstanceLock(self.config.control_socket)
        try:
            self._instance.acquire()
        except ControlError as exc:
            raise AgentError(str(exc)) from None
        if self.plane is None:
            self.plane = await choose_plane(
                self.config, self._send_encapsulated, self._send_encapsulated_burst
            )
        self._udp_encap_handler = getattr(self.plane, "handle_udp_encap", None)
        try:
            await self.plane.start(self._on_plane_event)
            # Leftovers of an earlier keywayd (crash, kill -9) go before anything new.
            leftovers = len(self.plane.list_sas()) + len(self.plane.list_policies())
            if leftovers:
                log.warning("removing %d SAs/policies left by an earlier keywayd", leftovers)
            self.plane.flush_owned()
        except base.DataPlaneError as exc:
            raise AgentError(f"data plane {self.plane.name}: {exc}") from None
        self.control = ControlServer(self.config.control_socket, self._command, self._subscribe)
        await self.control.start()
        if self.config.metrics_listen:
            address, port = self.config.metrics_listen
            try:
                self._metrics_server = await asyncio.start_server(
                    self._serve_metrics, address, port, limit=METRICS_REQUEST_LIMIT
                )
            except OSError as exc:
                raise AgentError(f"metrics_listen {address} port {port}: {exc}") from None
        for conn in self.config.connections:
            await self._add_connection(conn)
        log.info(
            "keywayd running: %d connection(s), data plane %s, control %s",
            len(self.config.connections),
            self.plane.name,
            self.config.control_socket,
        )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down cleanly; SIGHUP reloads."""
        await self.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._sighup()))
        await self._stopped.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        self._stopped.set()

    async def _sighup(self) -> None:
        try:
            await self.reload()
        except ControlError as exc:
            log.error("reload refused, running config kept: %s", exc)

    async def shutdown(self) -> None:
        self._stopping = True
        for name in list(self._retries):
            self._cancel_retry(name)  # a retry that fired holds None, not a handle
        for engine in self.engines.values():
            for sa in engine.sas():
                if sa.state == "established":
                    self._close_ike(sa)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline and any(
            sa.state == "established" for e in self.engines.values() for sa in e.sas()
        ):
            await asyncio.sleep(0.05)  # answers arrive through the runners meanwhile
        for handle in self._late_deletes.values():
            handle.cancel()  # flush_owned below removes them all
        self._late_deletes.clear()
        for runner in self.runners.values():
            await runner.stop()
        if self.plane is not None:
            try:
                self.plane.flush_owned()
            except base.DataPlaneError as exc:
                log.error("could not remove Keyway's SAs and policies: %s", exc)
            await self.plane.stop()
        if self.control:
            await self.control.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        if self._instance is not None:
            self._instance.release()
        for queue in self._watchers:
            queue.put_nowait(None)
        log.info("keywayd stopped")

    # -- connections ----------------------------------------------------------------

    async def _endpoint(self, local: str) -> tuple[Engine, UdpRunner]:
        if local not in self.engines:
            engine = Engine(
                (local, self.config.ike_port),
                spi_allocator=functools.partial(self._allocate_spi, local),
                cookie_threshold=self.config.half_open_cookie_threshold,
                nat_t_port=self.config.nat_t_port,
            )
            engine.revocation_cache = self._revocation_cache
            engine.instantiate = self._answer_instance
            runner = UdpRunner(
                engine,
                local,
                ike_port=self.config.ike_port,
                nat_t_port=self.config.nat_t_port,
                on_event=self._on_engine_event,
                esp_handler=self._on_esp_in_udp,
                prepare_socket=self.plane.prepare_ike_socket,
                prepare_nat_t_socket=self.plane.prepare_nat_t_socket,
                # The userspace plane reads ESP in UDP there: the kernel may coalesce it.
                udp_gro=self.plane.name == "userspace",
            )
            try:
                await runner.start()
            except OSError as exc:
                raise AgentError(f"cannot bind IKE ports on {local}: {exc.strerror}") from None
            self.engines[local], self.runners[local] = engine, runner
        return self.engines[local], self.runners[local]

    async def _add_connection(self, conn: ConnectionConfig) -> None:
        local = resolve_local_address(conn)
        engine, _unused = await self._endpoint(local)
        engine.add_connection(ike_connection(conn, self.config))
        self.local_of[conn.name] = local
        for remote in initiation_addresses(conn.remote_addrs):
            self._local_towards[remote] = local
        self._terminated.discard(conn.name)
        for child in conn.children:
            state = self._child_state(conn.name, child.name)
            if child.mode in ("pass", "drop"):
                self._sync_policies(conn, child, state, (child.local_ts, child.remote_ts))
            elif child.start_action == "trap":
                state.trap = True
                self._sync_policies(conn, child, state, (child.local_ts, child.remote_ts))
        if any(c.start_action == "start" for c in conn.children):
            self._initiate(conn.name)

    def _remove_connection(self, name: str) -> None:
        for instance in [n for n, t in self._template_of.items() if t == name]:
            self._drop_instance(instance)
        for key in [k for k in self._shunts if k[0] == name]:
            self._end_shunt(key)
        for sa in self._ike_sas(name):
            if sa.state == "established":
                self._close_ike(sa)
        local = self.local_of.pop(name, None)
        if local is None:
            return
        gone = self._config_of(name)
        still = {
            r
            for c in self.config.connections
            if c.name in self.local_of
            for r in initiation_addresses(c.remote_addrs)
        }
        for remote in initiation_addresses(gone.remote_addrs) if gone else ():
            if remote not in still:
                self._local_towards.pop(remote, None)
        engine = self.engines[local]
        engine.remove_connection(name)
        self._init_queue.pop(name, None)
        self._initiation_over(name)
        self._cancel_retry(name)
        for key in [k for k in self.children if k[0] == name]:
            state = self.children.pop(key)
            self._remove_policies(state)
        self.runners[local].pump()

    def _reqid(self, conn: str, child: str) -> int:
        """The child's reqid: one per (connection, child) for the daemon's life, so its
        SAs and policies (and their rekeys) stay tied together."""
        key = (conn, child)
        if key not in self._reqids:
            self._reqids[key] = self._next_reqid
            self._next_reqid += 1
        return self._reqids[key]

    def _child_state(self, conn: str, child: str) -> _ChildState:
        key = (conn, child)
        if key not in self.children:
            self.children[key] = _ChildState(self._reqid(conn, child))
        return self.children[key]

    def _allocate_spi(self, local: str, conn: str, child: str, protocol: str, peer: str) -> int:
        """The engine's SPI allocator: the data plane reserves an inbound SPI unique on
        the host (the kernel's ALLOCSPI, a larval SA that install_sa fills)."""
        try:
            return self.plane.allocate_spi(
                peer, local, base.IpsecProto(protocol), self._reqid(conn, child)
            )
        except base.DataPlaneError as exc:
            # The install that follows would fail the same way and say why; the
            # negotiation goes on with an SPI the plane did not reserve.
            log.warning("[%s/%s] %s", conn, child, exc)
            return random_spi(conn, child, protocol, peer)

    def _policies_of(
        self,
        conn: ConnectionConfig,
        child: ChildConfig,
        state: _ChildState,
        selectors: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
        remote: str | None = None,
    ) -> list[base.PolicySpec]:
        """The child's policies: for its configured traffic selectors, or for those
        negotiated (`selectors`, local and remote), which the peer may have narrowed;
        tunnels end at `remote` (the peer's address in the SA), else where we initiate."""
        if child.mode in ("pass", "drop"):
            action = base.PolicyAction(child.mode)
        else:
            action = base.PolicyAction.PROTECT
        local_ts, remote_ts = selectors or (child.local_ts, child.remote_ts)
        return install.child_policies(
            local_ts,
            remote_ts,
            reqid=state.reqid,
            local_address=self.local_of[conn.name],
            remote_address=remote or self._initiation_address(conn)[0],
            mode=child.mode,
            protocol=child.protocol,
            action=action,
            mark_in=conn.mark_in,
            mark_out=conn.mark_out,
            if_id_in=conn.if_id_in,
            if_id_out=conn.if_id_out,
        )

    def _sync_policies(
        self,
        conn,
        child,
        state: _ChildState,
        selectors: tuple[tuple[str, ...], tuple[str, ...]],
        remote: str | None = None,
    ) -> None:
        """The child's policies made those of `selectors`: new ones first, then the ones
        no longer wanted go (traffic the peer did not agree to protect is not sent into
        an SA it would drop; it follows the host's other policies). A trap child keeps
        its configured ones too, less specific: what the peer narrowed out still
        triggers an acquire, never leaves in the clear."""
        wanted = self._policies_of(conn, child, state, selectors, remote)
        if state.trap:
            ids = {p.id for p in wanted}
            wanted += [p for p in self._policies_of(conn, child, state) if p.id not in ids]
        held = {p.id: p for p in state.policies}
        kept = []
        new = [p for p in wanted if p.id not in held]
        refused = {id(p) for p, _unused in self._install_policies(conn, child, new)}
        for policy in wanted:
            if held.get(policy.id) == policy:
                kept.append(policy)
            elif policy.id in held:
                try:
                    self.plane.update_policy(policy)  # in one step: never without one
                    kept.append(policy)
                except base.DataPlaneError as exc:
                    log.error("[%s/%s] policy not installed: %s", conn.name, child.name, exc)
            elif id(policy) not in refused:
                kept.append(policy)
        wanted_ids = {p.id for p in wanted}
        state.policies = [p for p in state.policies if p.id not in wanted_ids]
        self._remove_policies(state)
        state.policies = kept

    def _install_policies(self, conn, child, policies: list[base.PolicySpec]) -> list:
        """Install `policies` at once (the plane batches them); log each one refused."""
        failed = self.plane.install_policies(policies)
        for _unused, exc in failed:
            log.error("[%s/%s] policy not installed: %s", conn.name, child.name, exc)
        return failed

    def _remove_policies(self, state: _ChildState) -> None:
        for policy in state.policies:
            try:
                self.plane.remove_policy(policy.id)
            except base.DataPlaneError as exc:
                log.warning("policy %s not removed: %s", policy.selector, exc)
        state.policies.clear()

    def _ike_sas(self, name: str) -> list[IkeSa]:
        """The IKE SAs of connection `name`; not a responder's half-open ones, which a
        spoofed IKE_SA_INIT can make (they must not count as the connection coming up)."""
        local = self.local_of.get(name)
        engine = self.engines.get(local) if local else None
        return [sa for sa in engine.sas_of(name) if not sa.half_open] if engine else []

    def _initiate(self, name: str) -> None:
        if name not in self.local_of:
            raise ControlError(f"no connection {name!r}")
        if self._connection(name).opportunistic:
            raise ControlError(
                f"{name} is opportunistic: each peer is negotiated with on its first packet "
                "(or initiate its instance, such as "
                f"{opportunistic.instance_name(name, 'ADDRESS')})"
            )
        live = [
            sa
            for sa in self._ike_sas(name)
            if sa.state not in ("failed", "deleted") and sa.spi_i not in self._closing
        ]
        if live:  # up or on its way: one IKE SA per connection
            if any(sa.state == "established" for sa in live):
                self._cancel_retry(name)  # a retry that finds it up counts no failure
            return
        self._terminated.discard(name)
        if self._local_address_moved(name):
            return  # it initiates from the new address once it has moved there
        if len(self._initiating) >= MAX_INITIATING:
            # Paced: a burst of thousands of IKE_SA_INITs would overflow socket buffers
            # and the peer's half-open limits, and cost retransmission timeouts.
            self._init_queue[name] = None
            return
        self._initiating.add(name)
        self._attempts[name] = self._attempts.get(name, 0) + 1
        host, port = self._initiation_address(self._connection(name))
        if is_dns_name(host):
            task = self._loop.create_task(self._resolve_and_initiate(name, host, port))
            self._initiation_tasks.add(task)
            task.add_done_callback(self._initiation_tasks.discard)
            return
        log.info("[%s] initiating to %s", name, host)
        self.stats["initiations"] += 1
        self.runners[self.local_of[name]].initiate(name, (host, port))

    def _local_address_moved(self, name: str) -> bool:
        """A connection without a configured local address (%any) uses the one routing
        picks towards the peer; when that is another now (DHCP gave the host a new one,
        a route moved), the connection moves to it before it initiates: from the old
        one, gone or unreachable, no initiation would ever get through. True if it is
        moving (_move_connection initiates once it is there)."""
        conn = self._connection(name)
        if not all(a.startswith("%any") for a in conn.local_addrs):
            return False
        try:
            local = resolve_local_address(conn)
        except AgentError:
            return False  # no route now: this initiation fails and is retried
        old = self.local_of[name]
        if local == old:
            return False
        log.info("[%s] our address towards the peer is %s now (was %s): moving there",
                 name, local, old)  # fmt: skip
        task = self._loop.create_task(self._move_connection(conn))
        self._initiation_tasks.add(task)
        task.add_done_callback(self._initiation_tasks.discard)
        return True

    async def _move_connection(self, conn: ConnectionConfig) -> None:
        self._remove_connection(conn.name)
        try:
            await self._add_connection(conn)
        except AgentError as exc:  # the new address cannot be bound
            log.error("[%s] %s", conn.name, exc)
            return
        self._initiate(conn.name)  # unless its start children did already

    async def _fetch_revocation(self, name: str, fetch) -> None:
        """A CRL from a distribution point, or an OCSP response, a peer's certificate
        names, for the engines' cache; a failure is remembered for a while (the
        revocation policy decides meanwhile)."""
        from cryptography.x509 import ocsp

        from ..ike import certs

        what = f"OCSP at {fetch.uri}" if fetch.body else f"CRL at {fetch.uri}"
        try:
            data = await self._loop.run_in_executor(None, fetch_url, fetch.uri, fetch.body)
            if fetch.body:
                response = ocsp.load_der_ocsp_response(data)
            else:
                crl = certs.load_crl(data)
        except (OSError, ValueError) as exc:
            log.warning(
                "[%s] %s not fetched: %s (the revocation policy decides; tried again in "
                "%.0f s)", name, what, exc, certs.CRL_FETCH_RETRY,
            )  # fmt: skip
            self._revocation_cache.fail(fetch.key, self._loop.time())
            return
        if fetch.body:
            status = response.response_status.name
            if response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                status = response.certificate_status.name
            log.info("[%s] %s: serial %x %s", name, what, fetch.serial, status.lower())
            self._revocation_cache.store_ocsp(fetch, response)
            return
        log.info("[%s] %s: %d revoked", name, what, sum(1 for _unused in crl))
        self._revocation_cache.store(fetch.uri, crl)

    async def _resolve_and_initiate(self, name: str, host: str, port: int) -> None:
        """A peer named by DNS: resolved at each initiation (so again after a failure),
        without blocking the other tunnels; its address is then one it may come from."""
        local = self.local_of.get(name, "")
        family = socket.AF_INET6 if ":" in local else socket.AF_INET
        try:
            found = await self._loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            reason = f"cannot resolve {host}: {exc.strerror or exc}"
            log.warning("[%s] %s", name, reason)
            self._last_error[name] = reason
            self._initiation_over(name)
            self._wake(name, {"up": False, "error": reason})
            self._schedule_retry(name, reason)
            return
        if name not in self.local_of or name in self._terminated:
            self._initiation_over(name)  # removed or terminated meanwhile
            return
        address = found[0][4][0]
        engine = self.engines[self.local_of[name]]
        conn = engine.connections[name]
        # Where the name points now; the address it pointed to before is dropped (a new
        # IKE_SA_INIT from there no longer matches; SAs up stay).
        self._resolved[(name, host)] = ipaddress.ip_network(address)
        remote_addrs = self._connection(name).remote_addrs
        configured = peer_ranges(remote_addrs)
        resolved = {v for (n, h), v in self._resolved.items() if n == name and h in remote_addrs}
        ranges = (*configured, *sorted(resolved - set(configured), key=str))
        if ranges != conn.peer_ranges:
            engine.add_connection(dataclasses.replace(conn, peer_ranges=ranges))
        self._local_towards[address] = self.local_of[name]
        log.info("[%s] initiating to %s (%s)", name, address, host)
        self.stats["initiations"] += 1
        self.runners[self.local_of[name]].initiate(name, (address, port))

    def _initiation_address(self, conn: ConnectionConfig) -> tuple[str, int]:
        """Where the next initiation goes: each of remote_addrs in turn, the next one
        after each failure (a peer with several addresses, one of them down)."""
        addresses = initiation_addresses(conn.remote_addrs) or ("0.0.0.0",)
        turn = self._address_turn.get(conn.name, 0) % len(addresses)
        return addresses[turn], conn.remote_port

    def _close_ike(self, sa: IkeSa) -> None:
        self._closing.add(sa.spi_i)
        engine = sa.engine
        engine.delete_ike_sa(sa, engine.now if self._loop is None else self._loop.time())
        self.runners[engine.local[0]].pump()

    def _schedule_retry(self, name: str, why: str, always: bool = False) -> None:
        """Initiate again after a backoff: always for `start` connections (or when the
        caller says so: close/dpd actions), else within `keyingtries` of an initiation
        the operator or a trap asked for."""
        if self._stopping or name in self._terminated or name not in self.local_of:
            return
        conn = self._connection(name)
        attempts = self._attempts.get(name, 0)
        wanted = always or any(c.start_action == "start" for c in conn.children)
        if not wanted and attempts and (conn.keyingtries == 0 or attempts < conn.keyingtries):
            wanted = True
        if not wanted:
            self._attempts.pop(name, None)
            return
        self._last_error.setdefault(name, why)  # a more precise reason may be known
        self._address_turn[name] = self._address_turn.get(name, 0) + 1  # the next address
        failures = self._retries.get(name, (0, None))[0] + 1
        delay = min(BACKOFF_MAX, 2.0 ** (failures - 1)) * random.uniform(0.8, 1.2)
        self._cancel_retry(name)
        log.info("[%s] %s; initiating again in %.1f s", name, why, delay)
        handle = self._loop.call_later(delay, self._retry, name)
        self._retries[name] = (failures, handle)

    def _retry(self, name: str) -> None:
        failures = self._retries.get(name, (0, None))[0]
        self._retries[name] = (failures, None)
        if name in self.local_of and name not in self._terminated:
            self._initiate(name)

    def _retry_in(self, name: str) -> float | None:
        handle = self._retries.get(name, (0, None))[1]
        if handle is None or handle.cancelled():
            return None
        return round(max(0.0, handle.when() - self._loop.time()), 1)

    def _cancel_retry(self, name: str) -> None:
        _unused, handle = self._retries.pop(name, (0, None))
        if handle:
            handle.cancel()

    # -- engine events --------------------------------------------------------------

    def _initiation_over(self, name: str) -> None:
        self._initiating.discard(name)
        while self._init_queue and len(self._initiating) < MAX_INITIATING:
            queued = next(iter(self._init_queue))
            del self._init_queue[queued]
            if queued in self.local_of:
                self._initiate(queued)

    def _on_engine_event(self, event: Event) -> None:
        self.stats[type(event).__name__] += 1
        self._publish(event_record(event))
        name = event.connection
        initiating = name in self._initiating
        if isinstance(event, AuthFailed) and not event.initiator:
            # A peer's IKE_AUTH we refused (the engine logged why): it neither ends nor
            # retries an initiation of ours, whoever sent it.
            return
        if isinstance(event, IkeSaUp | AuthFailed | NegotiationFailed | PeerDead | IkeSaDown):
            self._initiation_over(name)
        if isinstance(event, ChildSaReady):
            self._child_ready(event)
            self._wake(name, {"up": True, "child": event.child})
        elif isinstance(event, ChildSaDeleted):
            self._child_deleted(event)
        elif isinstance(event, IkeSaUp):
            log.info("[%s] IKE SA up with %s (%s)", name, event.remote_id, event.proposal)
            self._cancel_retry(name)
            self._attempts.pop(name, None)
            conn = self._config_of(name)
            negotiated = [c for c in conn.children if c.mode in ("tunnel", "transport")]
            if not negotiated:
                # Nothing more to negotiate (RFC 6023): the connection is up now.
                self._wake(name, {"up": True, "ike_only": True})
        elif isinstance(event, IkeSaMoved):
            self._follow_nat_mapping(event)
        elif isinstance(event, IkeSaConfirmed):
            for sa in self._ike_sas(name):
                if sa.spi_i == event.spi_i:
                    for spi_in in list(sa.children):
                        self._install_unconfirmed(name, spi_in)
        elif isinstance(event, RevocationWanted):
            for fetch in self._revocation_cache.to_fetch():
                task = self._loop.create_task(self._fetch_revocation(name, fetch))
                self._fetching.add(task)
                task.add_done_callback(self._fetching.discard)
        elif isinstance(event, IkeSaRekeyed):
            log.info("[%s] IKE SA rekeyed (%s)", name, event.proposal)
        elif isinstance(event, IkeSaDown):
            ours = event.spi_i in self._closing
            self._closing.discard(event.spi_i)
            log.info("[%s] IKE SA down: %s", name, event.reason)
            # A dead peer was reported (PeerDead) and handled by dpd_action already.
            if event.reason == EXPIRED:
                self._after_loss(name, "IKE SA expired (not rekeyed within over_time)",
                                 "close_action")  # fmt: skip
            elif not ours and event.reason not in (*REPLACED, PEER_DEAD):
                self._after_loss(name, f"IKE SA down ({event.reason})", "close_action")
        elif isinstance(event, PeerDead):
            log.warning("[%s] peer dead: no answer to our requests", name)
            self._wake(name, {"up": False, "error": "peer did not answer"})
            self._after_loss(name, "peer dead", "dpd_action")
        elif isinstance(event, AuthFailed):
            log.warning("[%s] authentication failed: %s", name, event.reason)
            self._wake(name, {"up": False, "error": f"authentication failed: {event.reason}"})
            self._schedule_retry(name, "authentication failed")
        elif isinstance(event, NegotiationFailed):
            log.warning("[%s] negotiation failed: %s", name, event.reason)
            up = any(sa.state == "established" for sa in self._ike_sas(name))
            error = f"{event.reason} (the IKE SA is up)" if up else event.reason
            self._wake(name, {"up": False, "error": error})
            self._schedule_retry(name, "negotiation failed")
        if name in self._instances:
            self._instance_event(name, event, initiating)

    # -- opportunistic connections (agent/opportunistic.py) ---------------------------

    def _instantiate(self, template: str, peer: str) -> str:
        """The template's connection to `peer` (made now, unless it exists): added to the
        template's engine, its children sharing the template's reqids."""
        name = opportunistic.instance_name(template, peer)
        if name in self._instances:
            return name
        conn = opportunistic.instance_config(self._connection(template), peer)
        local = self.local_of[template]
        engine = self.engines[local]
        engine.add_connection(opportunistic.instance_ike(engine.connections[template], conn))
        self._instances[name] = conn
        self._template_of[name] = template
        self.local_of[name] = local
        self._local_towards[peer] = local
        for child in conn.children:
            self._reqids[(name, child.name)] = self._reqid(template, child.name)
            self._child_state(name, child.name)
        return name

    def _answer_instance(self, template: IkeConnection, remote: Address) -> IkeConnection | None:
        """The engine's instantiate: a peer authenticated for an opportunistic template."""
        if template.name not in self.local_of or self._stopping:
            return None
        name = self._instantiate(template.name, remote[0])
        log.info("[%s] %s authenticated by its address: answering as %s",
                 template.name, remote[0], name)  # fmt: skip
        return self.engines[self.local_of[name]].connections.get(name)

    def _drop_instance(self, name: str) -> None:
        """Forget an instance (its IKE SAs are gone, or its template is): the next packet
        to the peer, or the peer's next IKE_SA_INIT, makes it again."""
        conn = self._instances.get(name)
        if conn is None:
            return
        self._remove_connection(name)
        del self._instances[name]
        del self._template_of[name]
        for child in conn.children:
            self._reqids.pop((name, child.name), None)
        for table in (self._attempts, self._last_error, self._address_turn):
            table.pop(name, None)

    def _acquire_peer(self, template: str, child: str, event: base.AcquireEvent) -> None:
        """A packet for a peer in an opportunistic template's prefixes: its instance is
        made and negotiated, or its lost child made again."""
        peer = event.dst
        if not peer or (template, peer) in self._shunts:
            return  # a packet that met the trap as the shunt went in
        name = self._instantiate(template, peer)
        sa = self._carrier(name)
        if sa is not None:
            self._recreate_child(sa, child)
        elif not any(sa.state not in ("failed", "deleted") for sa in self._ike_sas(name)):
            log.info("[%s/%s] acquire for %s: initiating", name, child, event.selector)
            self._initiate(name)

    def _instance_event(self, name: str, event: Event, initiating: bool) -> None:
        """After the engine's event for an instance was handled as for any connection:
        its shunt goes when a Child SA is up; a negotiation of ours that failed leaves
        one (unless keyingtries retries it); an instance without IKE SAs goes."""
        template, peer = self._template_of[name], self._instances[name].remote_addrs[0]
        if isinstance(event, ChildSaReady):
            self._end_shunt((template, peer))
            return
        if not isinstance(event, AuthFailed | NegotiationFailed | PeerDead | IkeSaDown):
            return
        if self._retry_in(name) is not None:
            return  # keyingtries: tried again first
        if any(sa.state not in ("failed", "deleted") for sa in self._ike_sas(name)):
            return  # another IKE SA carries it, or is on its way
        if initiating and not isinstance(event, IkeSaDown):
            self._shunt(template, peer, getattr(event, "reason", "no answer"))
        self._drop_instance(name)

    def _shunt(self, template: str, peer: str, why: str) -> None:
        """Leave `peer` alone for the template's shunt_lifetime: pass or drop."""
        key = (template, peer)
        if key in self._shunts:
            return
        conn = self._connection(template)
        local = self.local_of[template]
        action = opportunistic.shunt_action(conn.opportunistic)
        policies = install.child_policies(
            (opportunistic.host_prefix(local),),
            (opportunistic.host_prefix(peer),),
            reqid=0,
            local_address=local,
            remote_address=peer,
            mode="transport",
            action=action,
            mark_in=conn.mark_in,
            mark_out=conn.mark_out,
            if_id_in=conn.if_id_in,
            if_id_out=conn.if_id_out,
        )
        failed = {id(p) for p, exc in self.plane.install_policies(policies)}
        for policy in policies:
            if id(policy) in failed:
                log.error("[%s] %s: shunt policy %s not installed", template, peer, policy.selector)
        installed = [p for p in policies if id(p) not in failed]
        handle = self._loop.call_later(conn.shunt_lifetime, self._end_shunt, key)
        self._shunts[key] = (installed, handle)
        self.stats["opportunistic_shunts"] += 1
        log.warning(
            "[%s] %s: negotiation failed (%s): its traffic %s for %d s",
            template,
            peer,
            why,
            "goes in the clear" if action == base.PolicyAction.PASS else "is dropped",
            conn.shunt_lifetime,
        )

    def _end_shunt(self, key: tuple[str, str]) -> None:
        found = self._shunts.pop(key, None)
        if found is None:
            return
        policies, handle = found
        handle.cancel()
        for policy in policies:
            try:
                self.plane.remove_policy(policy.id)
            except base.DataPlaneError as exc:
                log.warning("shunt %s not removed: %s", policy.selector, exc)
        log.info("[%s] %s: shunt removed", *key)

    def _after_loss(self, name: str, why: str, action: str) -> None:
        """An established IKE SA is gone without our asking: the children's close_action
        (peer closed) or dpd_action (peer dead) says whether to bring it back."""
        conn = self._config_of(name)
        if conn is None:
            return
        if any(sa.state == "established" and not sa.superseded for sa in self._ike_sas(name)):
            # Another IKE SA carries the connection: the peer deleted one it replaced
            # (its reauthentication). Nothing is lost; a retry would find it up.
            return
        restart = any(getattr(c, action) in ("start", "restart") for c in conn.children)
        self._schedule_retry(name, why, always=restart)

    def _child_ready(self, event: ChildSaReady) -> None:
        conn = self._connection(event.connection)
        child = next(c for c in conn.children if c.name == event.child)
        state = self._child_state(conn.name, child.name)
        try:
            out, inbound = install.child_sa_specs(
                event,
                state.reqid,
                encap=True if conn.encap == "force" else None,
                nat_t_port=self.config.nat_t_port,
                lifetime=base.Lifetime(
                    soft_bytes=child.rekey_bytes,
                    hard_bytes=child.life_bytes,
                    soft_packets=child.rekey_packets,
                    hard_packets=child.life_packets,
                ),
                replay_window=child.replay_window,
                mark_in=conn.mark_in,
                mark_out=conn.mark_out,
                if_id_in=conn.if_id_in,
                if_id_out=conn.if_id_out,
            )
            self.plane.install_sa(inbound)  # inbound first: the peer may send at once
            installed_out = None
            older = sorted(state.spis - {event.spi_in})
            if event.rekeyed_from and event.initiated:
                self._rekeyed_by_us[event.rekeyed_from] = event.spi_in
            if event.rekeyed_from and not event.initiated:
                # The rekey's initiator may not hold the new inbound SA yet: keep sending
                # on the old one until it deletes that (then _child_deleted installs this).
                # A newer SA that waited on the old one (the peer's reauthentication,
                # answered) waits on this one now: the peer deletes it once it holds the
                # newer SA (bench/soak.py: 644 packets lost in 12.9 s, that half never
                # installed when the old one's wait was taken over).
                waiting = self._deferred_out.get(event.rekeyed_from)
                if waiting is not None:
                    self._deferred_out[event.spi_in] = waiting
                self._deferred_out[event.rekeyed_from] = (event.spi_in, out)
            elif older and not (event.initiated or event.redundant or event.peer_initial_contact):
                # The same, for the peer's reauthentication (or a second IKE SA it made):
                # its IKE_AUTH answer may be lost, and the peer then holds nothing of
                # this SA. It deletes the old SAs once it has it. An old SA whose own
                # successor (the peer's rekey's) still waits keeps that wait: its Delete
                # says the peer holds the rekey's SA, not this one, which waits on the
                # rekey's SA instead (bench/soak.py: 385 packets sent into it in 7.7 s).
                for old_spi in older:
                    if old_spi not in self._deferred_out:
                        self._deferred_out[old_spi] = (event.spi_in, out)
            elif event.redundant:
                pass  # a collision's surplus SA, deleted next: never send on it
            else:
                try:
                    self.plane.install_sa(out)
                except base.DataPlaneError:
                    self.plane.delete_sa(inbound.id)
                    raise
                installed_out = out.id
        except base.DataPlaneError as exc:
            log.error("[%s/%s] Child SA not installed: %s", conn.name, child.name, exc)
            self.stats["install_failures"] += 1
            for sa in self._ike_sas(conn.name):
                if event.spi_in in sa.children:
                    sa.engine.delete_child_sa(sa, event.spi_in, sa.engine.now)
            return
        self.sa_pairs[event.spi_in] = (installed_out, inbound.id)
        self._child_since[event.spi_in] = self._loop.time()
        first = not state.spis  # not a rekey nor a reauthentication's twin
        state.spis.add(event.spi_in)
        self._local_towards.setdefault(event.remote_address, self.local_of[conn.name])
        if conn.name not in self._instances:  # an instance's: its template's one policy
            self._sync_policies(
                conn, child, state, (event.local_ts, event.remote_ts), event.remote_address
            )
        if first:
            self._updown("up", event.connection, event.child, event)
        log.info(
            "[%s/%s] Child SA %s: in %08x out %08x %s%s",
            conn.name,
            child.name,
            "rekeyed" if event.rekeyed_from else "installed",
            event.spi_in,
            event.spi_out,
            event.proposal,
            " (UDP-encapsulated)" if out.encap else "",
        )

    def _follow_nat_mapping(self, event: IkeSaMoved) -> None:
        """The peer's NAT mapped it anew: to another port, or (a NAT that restarted with
        another public address, a mobile uplink) to another address (RFC 7296 2.23); or
        the peer moved with MOBIKE (RFC 4555). ESP follows, the SAs keeping their keys,
        counters and replay windows, UDP-encapsulated if a NAT is on the new path; after
        a new address the tunnels' policies and routes lead there too."""
        (address, port), previous = event.remote, event.previous
        conn = self._config_of(event.connection)
        ike = next((sa for sa in self._ike_sas(event.connection) if sa.spi_i == event.spi_i), None)
        if ike is None:
            return
        local = self.local_of[event.connection]
        force = conn is not None and conn.encap == "force"

        def encap_of(encap: base.UdpEncap | None, outbound: bool) -> base.UdpEncap | None:
            if event.nat is not None:  # NAT detection on the new path decides
                nat_t = self.config.nat_t_port
                encap = (encap or base.UdpEncap(nat_t, nat_t)) if event.nat or force else None
            if encap is None:
                return None
            if outbound:
                return base.UdpEncap(encap.sport, port)
            return base.UdpEncap(port, encap.dport)

        installed = {spec.id: spec for spec in self.plane.list_sas()}
        moved = failed = 0
        for spi_in in ike.children:
            pair = list(self.sa_pairs.get(spi_in, (None, None)))
            for index, outbound in ((0, True), (1, False)):
                spec = installed.get(pair[index])
                if spec is None:
                    continue
                encap = encap_of(spec.encap, outbound)
                try:
                    if address == previous[0]:
                        self.plane.update_sa(dataclasses.replace(spec, encap=encap))
                    else:
                        src, dst = (local, address) if outbound else (address, local)
                        pair[index] = self.plane.move_sa(spec.id, src, dst, encap).id
                    moved += 1
                except base.DataPlaneError as exc:
                    log.error("[%s] Child SA %08x not moved: %s", event.connection, spi_in, exc)
                    failed += 1
            if spi_in in self.sa_pairs:
                self.sa_pairs[spi_in] = (pair[0], pair[1])
            deferred = self._deferred_out.get(spi_in)
            if deferred is not None:
                spec = deferred[1]
                spec = dataclasses.replace(spec, dst=address, encap=encap_of(spec.encap, True))
                self._deferred_out[spi_in] = (deferred[0], spec)
            held = self._unconfirmed_out.get(spi_in)
            if held is not None:
                self._unconfirmed_out[spi_in] = dataclasses.replace(
                    held, dst=address, encap=encap_of(held.encap, True)
                )
        if address != previous[0]:
            self._local_towards[address] = local
            self._move_policies(event.connection, previous[0], address)
        what = "the peer moved (MOBIKE)" if event.mobike else "the peer's NAT mapping moved"
        log.info("[%s] %s to %s:%d: %d SA(s) follow%s", event.connection, what, address, port,
                 moved, f", {failed} could not" if failed else "")  # fmt: skip

    def _peer_may_lack(self, event: ChildSaDeleted, spi_in: int, state: _ChildState | None) -> bool:
        """Child SA `spi_in` is on an IKE SA the peer made and has not shown it holds,
        its old SA goes by our hand, and another outbound SA of the child carries the
        traffic meanwhile."""
        if state is None or event.reason in PEER_HOLDS_SUCCESSOR:
            return False
        ike = next((sa for sa in self._ike_sas(event.connection) if spi_in in sa.children), None)
        if ike is None or ike.peer_holds:
            return False
        others = state.spis - {spi_in, event.spi_in}
        return any(self.sa_pairs.get(spi, (None,))[0] for spi in others)

    def _install_unconfirmed(self, name: str, spi_in: int) -> None:
        """Send on Child SA `spi_in` now, if its outbound half was held back."""
        out = self._unconfirmed_out.pop(spi_in, None)
        if out is not None and spi_in in self.sa_pairs:
            self._install_outbound(name, spi_in, out)

    def _install_outbound(self, name: str, spi_in: int, out: base.SaSpec) -> None:
        """The held-back outbound half of Child SA `spi_in` goes in: we send on it."""
        try:
            self.plane.install_sa(out)
        except base.DataPlaneError as exc:
            log.error("[%s] outbound SA %08x not installed: %s", name, out.spi, exc)
        else:
            self.sa_pairs[spi_in] = (out.id, self.sa_pairs[spi_in][1])

    def _move_policies(self, name: str, previous: str, address: str) -> None:
        """Tunnel-mode policies of connection `name` that end at `previous` end at
        `address` now, each replaced in one step (no packet meets no policy)."""

        def moved(template: base.Template) -> base.Template:
            return dataclasses.replace(
                template,
                src=address if template.src == previous else template.src,
                dst=address if template.dst == previous else template.dst,
            )

        for (conn_name, child), state in self.children.items():
            if conn_name != name:
                continue
            for i, policy in enumerate(state.policies):
                new = dataclasses.replace(policy, templates=tuple(map(moved, policy.templates)))
                if new == policy:
                    continue
                try:
                    self.plane.update_policy(new)
                    state.policies[i] = new
                except base.DataPlaneError as exc:
                    log.error("[%s/%s] policy not moved: %s", name, child, exc)

    def _child_deleted(self, event: ChildSaDeleted) -> None:
        # A successor deleted before the SA it replaces (a rekey collision's surplus SA):
        # its outbound half must never be installed.
        for old, (successor_spi, _unused) in list(self._deferred_out.items()):
            if successor_spi == event.spi_in:
                del self._deferred_out[old]
        self._unconfirmed_out.pop(event.spi_in, None)
        successor = self._deferred_out.pop(event.spi_in, None)
        ours = self._rekeyed_by_us.pop(event.spi_in, None)
        state = self.children.get((event.connection, event.child))
        if (
            successor is not None
            and ours is not None
            and ours != successor[0]
            and state is not None
            and ours in state.spis
        ):
            # Our rekey replaced an SA that a newer one (the peer's reauthentication)
            # waits on: the rekey's SA lives on the same old IKE SA, which the peer
            # deletes once it holds the newer one. It takes over the wait (bench/soak.py:
            # 91 packets sent into an SA the peer did not hold yet).
            self._deferred_out[ours] = successor
            successor = None
        if successor is not None and self._lost_collision(event.connection, successor[0]):
            # The peer's rekey lost a collision we won: the peer deletes that SA and never
            # holds its inbound half (bench/soak.py: 10 s of traffic sent into it).
            successor = None
        if successor is not None:
            waits = [old for old, (spi, _unused) in self._deferred_out.items()
                     if spi == successor[0]]  # fmt: skip
            if waits and event.reason not in PEER_HOLDS_SUCCESSOR:
                # It waits on several old SAs (the peer's reauthentication answered while
                # our rekey's old SA went): only the peer's Delete says it holds the new
                # one, or the last old SA going (bench/soak.py: 3.8 s sent into it).
                successor = None
            for old in waits if successor is not None else ():
                del self._deferred_out[old]
        if successor is not None and self._peer_may_lack(event, successor[0], state):
            # We answered the peer's reauthentication, and deleted the old SA ourselves
            # (our own reauthentication crossed it): the peer may not hold the new one
            # yet (bench/soak.py: 43 packets sent into it in 0.9 s), while our own new
            # SA, which the peer answered, carries the traffic.
            self._unconfirmed_out[successor[0]] = successor[1]
            successor = None
        if successor is not None:  # make-before-break: the new outbound SA goes in first
            self._install_outbound(event.connection, *successor)
        pair = self.sa_pairs.pop(event.spi_in, None)
        self._child_since.pop(event.spi_in, None)
        carried_on = state is not None and bool(state.spis - {event.spi_in})
        if pair is not None:
            out, inbound = pair
            self._delete_sa(event.connection, out)
            if carried_on:  # a successor carries the child: let the stragglers in
                self._late_deletes[inbound] = self._loop.call_later(
                    DELETE_REKEYED_DELAY, self._delete_late, event.connection, inbound
                )
            else:
                self._delete_sa(event.connection, inbound)
        if state is None:
            return
        state.spis.discard(event.spi_in)
        if not any(self.sa_pairs.get(spi, (None,))[0] for spi in state.spis):
            for spi_in in list(state.spis):  # nothing else to send on
                self._install_unconfirmed(event.connection, spi_in)
        log.info(
            "[%s/%s] Child SA %08x deleted: %s",
            event.connection,
            event.child,
            event.spi_in,
            event.reason,
        )
        if not state.spis:  # the last SA of the child, not one a rekey replaced
            conn = self._config_of(event.connection)
            children = conn.children if conn is not None else ()
            child = next((c for c in children if c.name == event.child), None)
            if state.trap and child is not None:  # only the configured selectors trap
                self._sync_policies(conn, child, state, (child.local_ts, child.remote_ts))
            else:
                self._remove_policies(state)
            self._updown("down", event.connection, event.child, event)
            if event.reason in LOST_CHILD:
                self._child_lost(event)

    def _lost_collision(self, name: str, spi_in: int) -> bool:
        return any(spi_in in sa.losing_children for sa in self._ike_sas(name))

    def _carrier(self, name: str) -> IkeSa | None:
        """The established IKE SA that carries the connection, if any: the one with Child
        SAs, the newest. Another one is transient (a peer's reauthentication that may
        yet fail and be deleted), so new Child SAs and reauthentications go here."""
        established = [
            sa for sa in self._ike_sas(name) if sa.state == "established" and not sa.superseded
        ]
        return max(established, key=lambda sa: (bool(sa.children), sa.established_at), default=None)

    def _child_lost(self, event: ChildSaDeleted) -> None:
        """A Child SA the peer deleted (or whose hard lifetime came before a rekey) while
        the IKE SA lives: `start` children come back at once on CREATE_CHILD_SA, `trap`
        ones on their next packet (the acquire); the operator's own deletes do not."""
        name = event.connection
        conn = self._config_of(name)
        child = next((c for c in conn.children if c.name == event.child), None) if conn else None
        if child is None or self._stopping or name in self._terminated:
            return
        if "start" not in (child.start_action, child.close_action):
            return
        sa = self._carrier(name)
        if sa is None:
            return  # the IKE SA goes too: the connection's own restart brings it back
        log.info("[%s/%s] Child SA lost (%s): creating it again", name, child.name, event.reason)
        self._recreate_child(sa, child.name)

    def _recreate_child(self, sa: IkeSa, child: str) -> None:
        """A new Child SA of `child` on `sa`, unless one is up or on its way already."""
        if sa.creating(child) or any(sa.children[s].child == child for s in sa.live_children()):
            return
        sa.engine.create_child_sa(sa, child, self._loop.time())
        self.runners[sa.engine.local[0]].pump()

    def _delete_sa(self, connection: str, sa_id: base.SaId | None) -> None:
        if sa_id is None:
            return
        try:
            self.plane.delete_sa(sa_id)
        except base.DataPlaneError as exc:
            log.info("[%s] SA %08x already gone: %s", connection, sa_id.spi, exc)

    def _delete_late(self, connection: str, sa_id: base.SaId) -> None:
        self._late_deletes.pop(sa_id, None)
        self._delete_sa(connection, sa_id)

    def _updown(self, verb: str, connection: str, child: str, event) -> None:
        """Run the child's `updown` command (as strongSwan's updown, without a shell):
        KEYWAY_VERB up|down and the tunnel's names, selectors and SPIs in the
        environment, never its keys."""
        conn = self._config_of(connection)
        config = next((c for c in conn.children if c.name == child), None) if conn else None
        if config is None or not config.updown:
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "KEYWAY_VERB": verb,
            "KEYWAY_CONNECTION": connection,
            "KEYWAY_CHILD": child,
            "KEYWAY_SPI_IN": f"{event.spi_in:08x}",
            "KEYWAY_SPI_OUT": f"{event.spi_out:08x}",
            "KEYWAY_LOCAL_TS": " ".join(getattr(event, "local_ts", config.local_ts)),
            "KEYWAY_REMOTE_TS": " ".join(getattr(event, "remote_ts", config.remote_ts)),
        }
        try:
            argv = shlex.split(config.updown)
            process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        except (OSError, ValueError) as exc:
            log.error("[%s/%s] updown %s failed to start: %s", connection, child, verb, exc)
            return
        self._updown_running.add(process)
        self._loop.call_later(30, self._reap_updown)

    def _reap_updown(self) -> None:
        for process in list(self._updown_running):
            if process.poll() is not None:
                self._updown_running.discard(process)
                if process.returncode:
                    log.warning("updown %s exited %d", process.args[0], process.returncode)

    def _wake(self, name: str, result: dict) -> None:
        if result.get("error"):
            self._last_error[name] = result["error"]
        elif result.get("up"):
            self._last_error.pop(name, None)
        for future in self._waiters.pop(name, []):
            if not future.done():
                future.set_result(result)

    # -- data plane -----------------------------------------------------------------

    def _send_encapsulated(self, esp: bytes, dst: str, dport: int) -> None:
        runner = self._runner_towards(dst)
        if runner is not None:
            runner.send_nat_t(esp, (dst, dport))

    def _send_encapsulated_burst(self, datagrams: list[bytes], dst: str, dport: int) -> None:
        runner = self._runner_towards(dst)
        if runner is not None and runner.send_nat_t_burst(datagrams, (dst, dport)):
            self.stats["esp_udp_gso_sends"] += 1  # `keywayctl stats`: bursts the kernel cut
            self.stats["esp_udp_gso_datagrams"] += len(datagrams)

    def _runner_towards(self, remote: str) -> UdpRunner | None:
        # Per outbound packet: a lookup, not a scan of the connections.
        local = self._local_towards.get(remote)
        if local is not None:
            return self.runners.get(local)
        return next(iter(self.runners.values()), None)

    def _on_esp_in_udp(self, data: bytes, addr: tuple) -> None:
        if self._udp_encap_handler is not None:
            self._udp_encap_handler(data, addr[0], None, addr[1])

    def _find_child(self, spi: int) -> tuple[IkeSa, int] | None:
        """The IKE SA and inbound SPI of the Child SA that has `spi` in either direction."""
        for engine in self.engines.values():
            for sa in engine.sas():
                for spi_in, child in sa.children.items():
                    if spi in (child.spi_in, child.spi_out):
                        return sa, spi_in
        return None

    def _tell_invalid_spi(self, event: base.UnknownSpiEvent) -> None:
        """ESP or AH from a peer on an SPI we do not hold: say so (INVALID_SPI) on every
        IKE SA we share with it, since nothing tells which of them the SPI was a Child SA
        of; the one that has it replaces that Child SA, the others ignore the notify.
        (The plane reports an SPI from a sender once per interval: a spoofed flood costs
        a few messages per IKE SA, bounded by the engine's queue.)"""
        engine = self.engines.get(self._local_towards.get(event.src, event.dst))
        if engine is None:
            return
        sas = [
            s for s in engine.sas_with(event.src) if s.state == "established" and not s.superseded
        ]
        if not sas:
            # None to say it under (we restarted?): said unprotected, as a hint to the
            # peer, which would otherwise send into SAs we lost until its next DPD.
            ah = event.proto == socket.IPPROTO_AH
            if engine.tell_unknown_spi(event.src, event.spi, self._loop.time(), ah=ah):
                self.runners[engine.local[0]].pump()
            return
        protocol = "AH" if event.proto == socket.IPPROTO_AH else "ESP"
        untrusted.info(
            "%s for unknown SPI %08x from %s: INVALID_SPI on the IKE SAs of %s",
            protocol, event.spi, event.src, ", ".join(sorted({s.conn.name for s in sas})),
        )  # fmt: skip
        now = self._loop.time()
        for sa in sas:
            engine.notify_invalid_spi(sa, event.spi, now, ah=event.proto == socket.IPPROTO_AH)
        self.runners[engine.local[0]].pump()

    def _on_plane_event(self, event: base.DataPlaneEvent) -> None:
        self.stats[type(event).__name__] += 1
        self._publish(event_record(event))
        if isinstance(event, base.AcquireEvent):
            for (name, child), state in self.children.items():
                if state.reqid == event.reqid and state.trap:
                    if self._connection(name).opportunistic:
                        self._acquire_peer(name, child, event)
                        return
                    sa = self._carrier(name)
                    if sa is None:
                        log.info("[%s/%s] acquire for %s: initiating", name, child, event.selector)
                        self._initiate(name)
                    else:  # the IKE SA lives; its Child SA may not (the peer deleted it)
                        self._recreate_child(sa, child)
                    return
            return
        if isinstance(event, base.UnknownSpiEvent):
            self._tell_invalid_spi(event)
            return
        spi = event.sa.spi
        found = self._find_child(spi)
        if found is None:
            return
        sa, spi_in = found
        now = self._loop.time()
        if isinstance(event, base.MappingEvent):
            sa.engine.follow_nat_mapping(sa, (event.src, event.sport), now)
        elif isinstance(event, base.ExpireEvent) and event.hard:
            log.info("[%s] Child SA %08x hit its hard limit: deleting", sa.conn.name, spi_in)
            sa.engine.delete_child_sa(sa, spi_in, now)
        else:  # soft expiry or sequence overflow: rekey (collisions are the engine's)
            log.info("[%s] Child SA %08x hit its soft limit: rekeying", sa.conn.name, spi_in)
            try:
                sa.engine.rekey_child_sa(sa, spi_in, now)
            except ValueError as exc:  # its rekey or delete is under way already
                log.info("[%s] %s", sa.conn.name, exc)
        self.runners[sa.engine.local[0]].pump()

    def _change_in_place(self, old: ConnectionConfig, conn: ConnectionConfig) -> bool:
        """Apply a changed connection to the same peer without a gap: new negotiations
        use the new settings at once, its policies follow changed selectors (new ones in
        before stale ones go), and each established IKE SA is reauthenticated (a new IKE
        SA and its children first, then the old deleted; if the new one fails, the old
        one stays). True if an IKE SA is being reauthenticated."""
        name = conn.name
        local = self.local_of[name]
        engine, runner = self.engines[local], self.runners[local]
        engine.add_connection(ike_connection(conn, self.config))
        before = {c.name: c for c in old.children}
        for gone in before.keys() - {c.name for c in conn.children}:
            state = self.children.pop((name, gone), None)
            if state is not None:
                self._remove_policies(state)
        for child in conn.children:
            state = self._child_state(name, child.name)
            was = before.get(child.name)
            trap = child.start_action == "trap"
            if was is not None and _same_policies(was, child) and state.trap == trap:
                continue
            state.trap = trap
            if state.policies or trap:
                self._swap_policies(conn, child, state)
        carrier = self._carrier(name)  # only it: reauthenticating two would leave two
        if carrier is not None:
            log.info("[%s] changed: reauthenticating, a new IKE SA first", name)
            engine.reauthenticate(carrier, runner.now())
        elif any(c.start_action == "start" for c in conn.children):
            self._initiate(name)
        runner.pump()
        return carrier is not None

    def _swap_policies(self, conn: ConnectionConfig, child: ChildConfig, state: _ChildState):
        """Replace a child's policies: new selectors in first, then stale ones out, so
        that traffic is never left without a policy (one whose selector stays but whose
        template changes is replaced in one step)."""
        stale, state.policies = state.policies, []
        kept = {p.id: p for p in stale}
        for policy in self._policies_of(conn, child, state):
            if kept.get(policy.id) == policy:
                state.policies.append(kept.pop(policy.id))
                continue
            try:
                if policy.id in kept:
                    self.plane.update_policy(policy)
                    del kept[policy.id]
                else:
                    self.plane.install_policy(policy)
                state.policies.append(policy)
            except base.DataPlaneError as exc:
                log.error("[%s/%s] policy not installed: %s", conn.name, child.name, exc)
        for policy in kept.values():
            try:
                self.plane.remove_policy(policy.id)
            except base.DataPlaneError as exc:
                log.info("[%s/%s] stale policy already gone: %s", conn.name, child.name, exc)

    def _connection(self, name: str) -> ConnectionConfig:
        """A configured connection, or an opportunistic one's instance (KeyError if
        neither)."""
        instance = self._instances.get(name)
        return instance if instance is not None else self.config.connection(name)

    def _config_of(self, name: str) -> ConnectionConfig | None:
        try:
            return self._connection(name)
        except KeyError:
            return None

    # -- reload ---------------------------------------------------------------------

    async def reload(self) -> dict:
        """Apply the config file's changes; ControlError (running config kept) if bad."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.stats["reload_failures"] += 1
            raise ControlError(str(exc)) from None
        for conn in new.connections:  # fail before changing anything
            try:
                resolve_local_address(conn)
                ike_connection(conn, new)
            except (AgentError, OSError, ValueError) as exc:
                self.stats["reload_failures"] += 1
                raise ControlError(f"{self.config_path}: {conn.name}: {exc}") from None
        changes = diff_configs(self.config, new)
        fixed = [
            f.name
            for f in dataclasses.fields(AgentConfig)
            if f.name not in ("connections", "log_level")
            and getattr(new, f.name) != getattr(self.config, f.name)
        ]
        if fixed:
            log.warning("reload: %s change(s) only take effect on restart", ", ".join(fixed))
        old = self.config
        # A connection to the same peer under the same identities changes make-before-
        # break (reauthenticated with the new settings); any other change, or one to a
        # connection that is not up, is a close and a new start.
        # An opportunistic template changed is closed and started again with its
        # instances (they come back on the next packet, with the new settings).
        in_place = [
            n
            for n in changes.changed
            if _same_peer(old.connection(n), new.connection(n))
            and not (old.connection(n).opportunistic or new.connection(n).opportunistic)
            and n in self.local_of
            and resolve_local_address(new.connection(n)) == self.local_of[n]
        ]
        restarted = [n for n in changes.changed if n not in in_place]
        for name in (*changes.removed, *restarted):
            self._remove_connection(name)
        self.config = dataclasses.replace(new, **{name: getattr(old, name) for name in fixed})
        self._apply_log_level()
        for warning in config_warnings(self.config):
            log.warning("reload: %s", warning)
        reauthenticated = [
            name
            for name in in_place
            if self._change_in_place(old.connection(name), new.connection(name))
        ]
        for name in (*restarted, *changes.added):
            await self._add_connection(new.connection(name))
        self.stats["reloads"] += 1
        result = {
            "added": list(changes.added),
            "removed": list(changes.removed),
            "changed": list(changes.changed),
            "reauthenticated": reauthenticated,
            "unchanged": list(changes.unchanged),
            "restart_needed": fixed,
        }
        log.info("reloaded: %s", result)
        return result

    # -- control --------------------------------------------------------------------

    async def _command(self, request: dict) -> Any:
        command = request["command"]
        args = request.get("args") or {}
        if not isinstance(args, dict):
            raise ControlError("args must be an object")
        handler = _COMMANDS.get(command)
        if handler is None:
            raise ControlError(f"unknown command {command!r} (known: {', '.join(_COMMANDS)})")
        return await handler(self, args)

    def _connection_arg(self, args: dict) -> str:
        name = args.get("connection")
        if not isinstance(name, str) or name not in self.local_of:
            raise ControlError(f"no connection {name!r}")
        return name

    async def _cmd_status(self, args: dict) -> dict:
        sas = [sa for e in self.engines.values() for sa in e.sas()]
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1),
            "config": str(self.config_path),
            "library": self.library,
            "dataplane": self.plane.name,
            "connections": len(self.config.connections),
            "ike_sas": sum(sa.state == "established" for sa in sas),
            # a responder's IKE SAs waiting for IKE_AUTH (not in list-sas: no connection
            # is theirs until the peer authenticates)
            "half_open": sum(sa.half_open for sa in sas),
            "child_sas": sum(len(sa.children) for sa in sas),
            "dataplane_sas": len(self.plane.list_sas()),  # what the data plane holds
        }

    async def _cmd_list_conns(self, args: dict) -> list:
        result = []
        for conn in (*self.config.connections, *self._instances.values()):
            states = [sa.state for sa in self._ike_sas(conn.name)]
            result.append(
                {
                    "name": conn.name,
                    # private | private-or-clear for an opportunistic template; the
                    # template an instance (one peer's connection) was made from
                    "opportunistic": conn.opportunistic or None,
                    "instance_of": self._template_of.get(conn.name),
                    "local_addrs": list(conn.local_addrs),
                    "remote_addrs": list(conn.remote_addrs),
                    "local_id": conn.local.id,
                    "remote_id": conn.remote.id,
                    "auth": conn.local.auth,
                    # PSKs it holds (more than one during a rotation), never their values
                    "psks": (conn.psk is not None) + len(conn.previous_psks),
                    "proposals": list(conn.proposals),
                    "state": "established"
                    if "established" in states
                    else ("connecting" if states else "down"),
                    # why it is not up, and when keywayd tries again (seconds)
                    "last_error": self._last_error.get(conn.name),
                    "retry_in": self._retry_in(conn.name),
                    "children": [
                        {
                            "name": c.name,
                            "mode": c.mode,
                            "local_ts": list(c.local_ts),
                            "remote_ts": list(c.remote_ts),
                            "proposals": list(c.proposals),
                            "start_action": c.start_action,
                            "reqid": self._reqids.get((conn.name, c.name)),
                            # Child SAs installed for it now (two while one replaces
                            # another): 0 under an established IKE SA says it is missing
                            "child_sas": len(self.children[(conn.name, c.name)].spis)
                            if (conn.name, c.name) in self.children
                            else 0,
                            # what the data plane holds for it: the configured selectors
                            # (trap, pass, drop) or those negotiated with the peer
                            "policies": [
                                f"{p.direction.value} {p.selector.src} -> {p.selector.dst}"
                                for p in self.children[(conn.name, c.name)].policies
                            ]
                            if (conn.name, c.name) in self.children
                            else [],
                        }
                        for c in conn.children
                    ],
                }
            )
        return result

    async def _cmd_list_policies(self, args: dict) -> list:
        """The policies keywayd holds for each child (swanctl --list-pols)."""
        return [
            {
                "connection": name,
                "child": child,
                "direction": policy.direction.value,
                "action": policy.action.value,
                "src": policy.selector.src,
                "dst": policy.selector.dst,
                "templates": [
                    {"protocol": t.proto.value, "mode": t.mode.value, "src": t.src, "dst": t.dst}
                    for t in policy.templates
                ],
            }
            for (name, child), state in sorted(self.children.items())
            for policy in state.policies
        ] + [
            {
                "connection": template,
                "child": f"shunt for {peer}",
                "direction": policy.direction.value,
                "action": policy.action.value,
                "src": policy.selector.src,
                "dst": policy.selector.dst,
                "templates": [],
            }
            for (template, peer), (policies, _unused) in sorted(self._shunts.items())
            for policy in policies
        ]

    async def _cmd_list_sas(self, args: dict) -> list:
        result = []
        for engine in self.engines.values():
            for sa in engine.sas():
                if sa.conn is None or sa.half_open:
                    continue
                children = []
                for child in sa.children.values():
                    entry = {
                        "name": child.child,
                        "spi_in": f"{child.spi_in:08x}",
                        "spi_out": f"{child.spi_out:08x}",
                        "protocol": child.protocol,
                        "mode": child.mode,
                        "proposal": child.proposal,
                        "local_ts": list(child.local_ts),
                        "remote_ts": list(child.remote_ts),
                        "encap": child.udp_encap,
                    }
                    if child.spi_in in self._child_since:
                        entry["age"] = round(self._loop.time() - self._child_since[child.spi_in])
                    pair = self.sa_pairs.get(child.spi_in)
                    if pair is not None:
                        for label, sa_id in zip(("out", "in"), pair, strict=True):
                            if sa_id is None:
                                continue
                            try:
                                counters = self.plane.sa_counters(sa_id)
                            except base.DataPlaneError:
                                continue
                            entry[f"bytes_{label}"] = counters.bytes
                            entry[f"packets_{label}"] = counters.packets
                    children.append(entry)
                result.append(
                    {
                        "connection": sa.conn.name,
                        "state": sa.state,
                        "initiator": sa.initiator,
                        "local": f"{engine.local[0]}",
                        "remote": f"{sa.remote[0]}:{sa.remote[1]}",
                        "remote_id": sa.remote_id,
                        "spi_i": sa.spi_i.hex(),
                        "spi_r": sa.spi_r.hex(),
                        "proposal": _describe_ike(sa),
                        # which of the connection's PSKs authenticated it (0: the newest,
                        # 1: the previous one still accepted during a rotation)
                        "psk_index": sa.psk_index if sa.conn.auth == "psk" else None,
                        # seconds since it came up (the engine's clock is the loop's)
                        "age": None
                        if sa.established_at is None
                        else round(self._loop.time() - sa.established_at),
                        "children": children,
                    }
                )
        return result

    async def _cmd_initiate(self, args: dict) -> dict:
        name = self._connection_arg(args)
        if any(sa.state == "established" for sa in self._ike_sas(name)):
            return {"up": True, "already": True}
        self._attempts[name] = 0
        self._cancel_retry(name)
        future = self._loop.create_future()
        self._waiters[name].append(future)
        self._initiate(name)
        if not args.get("wait", True):
            return {"up": None}
        try:
            result = await asyncio.wait_for(future, float(args.get("timeout", 30)))
        except TimeoutError:
            timeout = args.get("timeout", 30)
            raise ControlError(f"{name}: not established after {timeout} s") from None
        if not result["up"]:
            raise ControlError(f"{name}: {result['error']}")
        return result

    async def _cmd_terminate(self, args: dict) -> dict:
        name = self._connection_arg(args)
        child = args.get("child")
        closed = 0
        for sa in self._ike_sas(name):
            if sa.state != "established":
                continue
            if child:
                for spi_in, ready in list(sa.children.items()):
                    if ready.child == child:
                        sa.engine.delete_child_sa(sa, spi_in, self._loop.time())
                        closed += 1
            else:
                self._terminated.add(name)
                self._cancel_retry(name)
                self._close_ike(sa)
                closed += 1
            self.runners[sa.engine.local[0]].pump()
        return {"closed": closed}

    async def _cmd_rekey(self, args: dict) -> dict:
        name = self._connection_arg(args)
        child = args.get("child")
        started = 0
        for sa in self._ike_sas(name):
            if sa.state != "established":
                continue
            now = self._loop.time()
            if child:
                for spi_in in sa.live_children():
                    if sa.children[spi_in].child == child:
                        sa.engine.rekey_child_sa(sa, spi_in, now)
                        started += 1
            else:
                sa.engine.rekey_ike_sa(sa, now)
                started += 1
            self.runners[sa.engine.local[0]].pump()
        if not started:
            raise ControlError(f"{name}: nothing established to rekey")
        return {"rekeying": started}

    async def _cmd_reload(self, args: dict) -> dict:
        return await self.reload()

    async def _cmd_stats(self, args: dict) -> dict:
        result = {"events": dict(self.stats)}
        drops = getattr(self.plane, "drops", None)
        if drops is not None:
            result["dataplane_drops"] = dict(drops)
        return result

    async def _cmd_metrics(self, args: dict) -> str:
        status = await self._cmd_status(args)
        lines = [
            "# HELP keyway_ike_sas Established IKE SAs.",
            "# TYPE keyway_ike_sas gauge",
            f"keyway_ike_sas {status['ike_sas']}",
            "# HELP keyway_child_sas Installed Child SAs.",
            "# TYPE keyway_child_sas gauge",
            f"keyway_child_sas {status['child_sas']}",
            "# HELP keyway_connections Configured connections.",
            "# TYPE keyway_connections gauge",
            f"keyway_connections {status['connections']}",
            "# HELP keyway_events_total Events by kind.",
            "# TYPE keyway_events_total counter",
        ]
        for kind, count in sorted(self.stats.items()):
            lines.append(f'keyway_events_total{{kind="{kind}"}} {count}')
        drops = getattr(self.plane, "drops", None) or {}
        lines += [
            "# HELP keyway_dataplane_drops_total Packets the data plane dropped, by reason.",
            "# TYPE keyway_dataplane_drops_total counter",
        ]
        for reason, count in sorted(drops.items()):
            lines.append(f'keyway_dataplane_drops_total{{reason="{reason}"}} {count}')
        # Each family's lines together, after its HELP and TYPE (the text format's rule).
        children = [
            (f'connection="{sa["connection"]}",child="{c["name"]}",spi="{c["spi_in"]}"', c)
            for sa in await self._cmd_list_sas(args)
            for c in sa["children"]
        ]
        for key in ("bytes_in", "bytes_out", "packets_in", "packets_out"):
            lines += [
                f"# HELP keyway_child_sa_{key} The Child SA's {key.replace('_', ' ')}.",
                f"# TYPE keyway_child_sa_{key} counter",
            ]
            lines += [
                f"keyway_child_sa_{key}{{{labels}}} {c[key]}" for labels, c in children if key in c
            ]
        return "\n".join(lines) + "\n"

    async def _serve_metrics(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One HTTP/1.0-style exchange: GET /metrics answers `keywayctl metrics`'s text;
        anything else an error status. Bounded in size and time: whoever reaches the
        port gets nothing else."""
        try:
            async with asyncio.timeout(METRICS_REQUEST_TIMEOUT):
                request = await reader.readline()
                for _unused in range(100):  # headers: not needed, read and bounded
                    if await reader.readline() in (b"\r\n", b"\n", b""):
                        break
            method, target, *_unused = [*request.decode("latin-1").split(), "", ""]
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "GET /metrics\n"
            elif target.split("?")[0] != "/metrics":
                status, body = "404 Not Found", "GET /metrics\n"
            else:
                status, body = "200 OK", await self._cmd_metrics({})
            payload = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            pass  # a slow, oversized or vanished client: closed below
        finally:
            writer.close()

    def _publish(self, record: dict) -> None:
        for queue in list(self._watchers):
            try:
                queue.put_nowait(record)
            except asyncio.QueueFull:  # a client that does not read loses its stream
                self._watchers.discard(queue)
                queue.get_nowait()  # room for the end-of-stream mark
                queue.put_nowait(None)

    def _subscribe(self) -> AsyncIterator[dict]:
        """A new event stream, registered now (before the client is told it watches)."""
        queue: asyncio.Queue = asyncio.Queue(WATCH_QUEUE)
        self._watchers.add(queue)

        async def events() -> AsyncIterator[dict]:
            try:
                while (record := await queue.get()) is not None:
                    yield record
            finally:
                self._watchers.discard(queue)

        return events()


def _describe_ike(sa: IkeSa) -> str:
    return describe(sa.chosen_ike) if sa.chosen_ike is not None else ""


_COMMANDS = {
    "status": Agent._cmd_status,
    "list-conns": Agent._cmd_list_conns,
    "list-sas": Agent._cmd_list_sas,
    "list-policies": Agent._cmd_list_policies,
    "initiate": Agent._cmd_initiate,
    "terminate": Agent._cmd_terminate,
    "rekey": Agent._cmd_rekey,
    "reload": Agent._cmd_reload,
    "stats": Agent._cmd_stats,
    "metrics": Agent._cmd_metrics,
}


async def choose_plane(config: AgentConfig, udp_sender, udp_burst_sender=None) -> base.DataPlane:
    """The configured data plane; `auto` takes the kernel's when it accepts ESP SAs and
    falls back to the userspace plane, saying why."""
    reason = ""
    if config.dataplane in ("kernel", "auto"):
        try:
            from ..dataplane.xfrm.plane import KernelPlane, probe_kernel_esp

            problem = probe_kernel_esp()
        except ImportError as exc:
            problem = f"the kernel plane is not available ({exc})"
        if not problem:
            return KernelPlane(routes=True)
        if config.dataplane == "kernel":
            raise AgentError(f"dataplane kernel: {problem}")
        reason = problem
    from ..dataplane.userspace import UserspacePlane

    if reason:
        log.info("data plane: userspace, because %s", reason)
    return UserspacePlane(
        tun_name="kw-esp0", udp_sender=udp_sender, udp_burst_sender=udp_burst_sender
    )
