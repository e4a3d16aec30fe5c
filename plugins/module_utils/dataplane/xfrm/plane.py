"""The kernel data plane: Linux XFRM SAs and policies over NETLINK_XFRM.

Socket I/O: a plain AF_NETLINK socket (created inside `netns` by pyroute2.netns when one
is given) whose replies are parsed by a pyroute2 Marshal, so kernel errors surface as
NetlinkError with the errno (and the extended-ack text when the kernel gives one). The
synchronous pyroute2 NetlinkSocket is not used for requests: in pyroute2 0.9 it drives
its own asyncio loop with run_until_complete, which cannot run inside the agent's loop.

Ownership: Keyway's SAs carry a reqid in KEYWAY_REQID_MIN..MAX; a PROTECT policy is
Keyway's when every template carries such a reqid; PASS and DROP policies (no templates)
are Keyway's when their priority lies in Keyway's band for that action
(PASS_PRIO_BAND / DROP_PRIO_BAND). flush_owned deletes exactly those, one by one
(never XFRM_MSG_FLUSHSA / FLUSHPOLICY, which would hit a foreign daemon's state too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as errno_mod
import itertools
import os
import socket
import struct
import time
from collections.abc import Iterable

from pyroute2.netlink import (
    NETLINK_XFRM,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError

from ...esp.tun import ROUTE_TABLE
from ..base import (
    KEYWAY_REQID_MAX,
    SPI_RESERVATION,
    DataPlane,
    DataPlaneError,
    Direction,
    EventSink,
    IpsecProto,
    Lifetime,
    Mode,
    PolicyAction,
    PolicyId,
    PolicySpec,
    SaCounters,
    SaId,
    SaSpec,
    UdpEncap,
    is_keyway_reqid,
)
from .codec import (
    _NLMSGERR,
    POLICY_BATCH,
    _family,
    _in_band,
    _is_ack,
    _lifetime_values,
    _pack_addr,
    _policy_str,
    _refused,
    _sa_str,
    _sad_attrs,
    _spd_attrs,
    decode_policy,
    decode_sa,
    encode_policy_id,
    encode_sa,
    encode_sa_id,
    is_keyway_policy,
    pack_policy,
    pack_sa,
    parse_events,
    to_bytes,
)
from .messages import (
    DROP_PRIO_BAND,
    IP_XFRM_POLICY,
    IPV6_XFRM_POLICY,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_EXT_ACK,
    PASS_PRIO_BAND,
    PROTO_NUM,
    SOL_NETLINK,
    SOL_UDP,
    SPI_MAX,
    SPI_MIN,
    UDP_ENCAP,
    UDP_ENCAP_ESPINUDP,
    XFRM_MODE_TRANSPORT,
    XFRM_MSG_ALLOCSPI,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_GETSA,
    XFRM_MSG_GETSADINFO,
    XFRM_MSG_GETSPDINFO,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_MSG_UPDPOLICY,
    XFRM_MSG_UPDSA,
    XFRM_POLICY_ALLOW,
    XFRM_POLICY_FWD,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    XFRMNLGRP_ACQUIRE,
    XFRMNLGRP_EXPIRE,
    XFRMNLGRP_MAPPING,
    MarshalXfrm,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
    xfrm_usersa_id,
    xfrm_userspi_info,
)
from .routes import (
    ROUTE_RULE_PRIORITY,
    _ip_quiet,
    _prefix,
    _route_towards,
    _routed,
)


def ike_socket_bypass(sock: socket.socket) -> None:
    """Exempt `sock` from every XFRM policy in both directions (as strongSwan does for
    its IKE sockets): a per-socket policy with action ALLOW and no templates."""
    family = sock.family
    if family == socket.AF_INET6:
        level, opt = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    else:
        level, opt = socket.IPPROTO_IP, IP_XFRM_POLICY
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
        msg = xfrm_userpolicy_info()
        msg.update({"sel_family": family, "dir": direction, "action": XFRM_POLICY_ALLOW})
        msg.update(_lifetime_values(Lifetime()))
        msg["attrs"] = []
        body = to_bytes(msg, XFRM_MSG_NEWPOLICY)[16:]  # setsockopt takes the bare struct
        sock.setsockopt(level, opt, body)


def udp_encap_socket(sock: socket.socket) -> None:
    """Make a UDP socket decapsulate ESP-in-UDP (RFC 3948) in the kernel; non-ESP
    datagrams (IKE, with the zero non-ESP marker) still reach the socket."""
    sock.setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)


def socket_in_netns(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket of network namespace `netns` (a socket belongs to the namespace it was
    created in). Never creates a missing namespace."""
    try:
        from pyroute2.netns import create_socket
    except ImportError:  # pyroute2 before 0.9: enter the namespace for socket(), then leave
        from pyroute2.netns import setns

        home = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            setns(netns, flags=0)
            try:
                return socket.socket(family, kind, proto)
            finally:
                setns(home, flags=0)
        finally:
            os.close(home)
    # pyroute2 0.9 creates it in a forked child that entered `netns`, and hands it back.
    return create_socket(netns=netns, family=family, socket_type=kind, proto=proto, flags=0)


def _open_socket(netns: str | None, groups: Iterable[int] = ()) -> socket.socket:
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    else:
        sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    with contextlib.suppress(OSError):  # old kernels: errno without the reason text
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    sock.bind((0, 0))
    for group in groups:
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    return sock


class KernelPlane(DataPlane):
    """XFRM in the kernel. `netns`: the name of a network namespace (as `ip netns`) to
    program instead of the caller's own; the event socket is opened there too."""

    name = "kernel"

    def __init__(self, netns: str | None = None, routes: bool = False) -> None:
        self.netns = netns
        # routes=True (keywayd): OUT tunnel-mode policies also route their destination
        # towards the peer in Keyway's table, as strongSwan does in its table 220; a
        # host with no route to a remote site would otherwise never reach XFRM.
        self.routes = routes
        self._route_users: dict[str, int] = {}
        try:
            self._sock = _open_socket(netns)
        except OSError as exc:
            code = exc.errno or errno_mod.EIO
            where = f"netns {netns}" if netns else "this namespace"
            raise DataPlaneError(
                f"kernel plane: cannot open NETLINK_XFRM in {where}: "
                f"{os.strerror(code)} (errno {code})"
            ) from exc
        self._seq = itertools.count(1)
        self._marshal = MarshalXfrm()
        self._events_sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EventSink | None = None
        self._sa_marks: dict[SaId, tuple[int, int] | None] = {}
        # SPIs allocate_spi reserved and not yet installed, with when (monotonic): a
        # failed negotiation leaves its entry until it is long expired in the kernel.
        self._larval: dict[SaId, float] = {}

    # -- netlink I/O ----------------------------------------------------------------

    def _request(self, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
        """Send one request; return its reply messages. NetlinkError on a kernel error."""
        seq = next(self._seq) & 0xFFFFFFFF
        return self._exchange(to_bytes(msg, msg_type, flags, seq), seq, flags)

    def _exchange(self, data: bytes, seq: int, flags: int) -> list[nlmsg]:
        """Send one encoded request (its sequence number `seq`); return its replies."""
        self._sock.send(data)
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        out: list[nlmsg] = []
        while True:
            data = self._sock.recv(1 << 20)
            if flags & NLM_F_ACK and _is_ack(data, seq):
                return out  # the common answer, read without the generic parser
            done = False
            for reply in self._marshal.parse(data):
                hdr = reply["header"]
                if hdr["sequence_number"] != seq:
                    continue  # a stale reply to an earlier, abandoned request
                if hdr.get("error") is not None:
                    raise hdr["error"]
                if hdr["type"] == NLMSG_DONE or hdr["type"] == NLMSG_ERROR:
                    done = True  # end of dump, or the ACK (error 0)
                    continue
                out.append(reply)
                if not dump and not (hdr["flags"] & NLM_F_MULTI) and not (flags & NLM_F_ACK):
                    done = True  # a single reply (GETSA, ALLOCSPI)
            if done:
                return out

    def _do(self, op: str, what: str, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
        seq = next(self._seq) & 0xFFFFFFFF
        return self._do_raw(op, what, to_bytes(msg, msg_type, flags, seq), seq, flags)

    def _do_raw(self, op: str, what: str, data: bytes, seq: int, flags: int) -> list[nlmsg]:
        try:
            return self._exchange(data, seq, flags)
        except NetlinkError as exc:
            raise _refused(op, what, exc) from exc
        except OSError as exc:
            code = exc.errno or errno_mod.EIO
            raise DataPlaneError(
                f"{op} {what}: netlink I/O failed: {os.strerror(code)} (errno {code})"
            ) from exc

    # -- SAs --------------------------------------------------------------------------

    def allocate_spi(self, src: str, dst: str, proto: IpsecProto, reqid: int) -> int:
        msg = xfrm_userspi_info()
        msg.update({
            "info_id_daddr": _pack_addr(dst),
            "info_id_proto": PROTO_NUM[IpsecProto(proto)],
            "info_saddr": _pack_addr(src),
            "info_family": _family(dst),
            "info_reqid": reqid,
            "info_mode": XFRM_MODE_TRANSPORT,
            "min": SPI_MIN,
            "max": SPI_MAX,
            **_lifetime_values(Lifetime(), "info_lft_"),
        })  # fmt: skip
        msg["attrs"] = []
        what = f"{IpsecProto(proto).value} {src} -> {dst} reqid 0x{reqid:08x}"
        replies = self._do("allocate_spi", what, msg, XFRM_MSG_ALLOCSPI, NLM_F_REQUEST)
        if not replies:
            raise DataPlaneError(f"allocate_spi {what}: kernel sent no SA back")
        spi = replies[0]["id_spi"]
        now = time.monotonic()
        for stale in [k for k, t in self._larval.items() if t < now - SPI_RESERVATION]:
            del self._larval[stale]
        self._larval[SaId(dst, proto, spi)] = now
        return spi

    def install_sa(self, sa: SaSpec) -> None:
        if sa.id in self._larval:
            # The larval SA allocate_spi made is filled in place (XFRM_MSG_UPDSA, as
            # strongSwan does); once the kernel expired it (net.core.xfrm_acq_expires,
            # 30 s), the SA is added anew.
            del self._larval[sa.id]
            seq = next(self._seq) & 0xFFFFFFFF
            flags = NLM_F_REQUEST | NLM_F_ACK
            try:
                self._exchange(pack_sa(sa, XFRM_MSG_UPDSA, flags, seq), seq, flags)
            except NetlinkError as exc:
                if exc.code != errno_mod.ESRCH:
                    raise _refused("install_sa", _sa_str(sa), exc) from exc
            except OSError as exc:
                code = exc.errno or errno_mod.EIO
                raise DataPlaneError(
                    f"install_sa {_sa_str(sa)}: netlink I/O failed: {os.strerror(code)} "
                    f"(errno {code})"
                ) from exc
            else:
                self._sa_marks[sa.id] = sa.mark
                return
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        seq = next(self._seq) & 0xFFFFFFFF
        self._do_raw("install_sa", _sa_str(sa), pack_sa(sa, XFRM_MSG_NEWSA, flags, seq), seq, flags)
        self._sa_marks[sa.id] = sa.mark

    def update_sa(self, sa: SaSpec) -> None:
        flags = NLM_F_REQUEST | NLM_F_ACK
        seq = next(self._seq) & 0xFFFFFFFF
        self._do_raw("update_sa", _sa_str(sa), pack_sa(sa, XFRM_MSG_UPDSA, flags, seq), seq, flags)
        self._sa_marks[sa.id] = sa.mark

    def move_sa(self, sa: SaId, src: str, dst: str, encap: UdpEncap | None) -> SaSpec:
        """The SA added anew at its new addresses with the old one's sequence numbers,
        replay window and use (the kernel's update keeps the addresses; strongSwan
        moves SAs the same way); an outbound SA's new id is added before the old goes."""
        what = _sa_str(sa)
        replies = self._do(
            "move_sa", what, encode_sa_id(sa, self._mark_of(sa)), XFRM_MSG_GETSA, NLM_F_REQUEST
        )
        if not replies:
            raise DataPlaneError(f"move_sa {what}: kernel sent no SA back")
        held = replies[0]
        moved = dataclasses.replace(decode_sa(held), src=src, dst=dst, encap=encap)
        msg = encode_sa(moved)
        attrs = [a for a in msg["attrs"] if a[0] != "XFRMA_REPLAY_ESN_VAL"]
        esn, legacy = held.get_attr("XFRMA_REPLAY_ESN_VAL"), held.get_attr("XFRMA_REPLAY_VAL")
        if esn is not None:
            fields = (*(name for name, _unused in esn.fixed), "bmp")
            attrs.append(["XFRMA_REPLAY_ESN_VAL", {k: esn[k] for k in fields}])
        elif legacy is not None:
            attrs.append(["XFRMA_REPLAY_VAL", {k: legacy[k] for k in ("oseq", "seq", "bitmap")}])
        use = ("bytes", "packets", "add_time", "use_time")
        attrs.append(["XFRMA_LTIME_VAL", {k: held[f"curlft_{k}"] for k in use}])
        msg["attrs"] = attrs
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        if moved.id == sa:
            # Inbound: the id (our address, the SPI) stays, so the old SA goes first.
            self.delete_sa(sa)
            self._do("move_sa", _sa_str(moved), msg, XFRM_MSG_NEWSA, flags)
        else:
            self._do("move_sa", _sa_str(moved), msg, XFRM_MSG_NEWSA, flags)
            self.delete_sa(sa)
        self._sa_marks[moved.id] = moved.mark
        return moved

    def _mark_of(self, sa: SaId) -> tuple[int, int] | None:
        # SaId has no mark, but the kernel finds a marked SA only with its mark.
        if sa in self._sa_marks:
            return self._sa_marks[sa]
        for spec in self._dump_sas():
            if spec.id == sa:
                return spec.mark
        return None

    def delete_sa(self, sa: SaId) -> None:
        msg = encode_sa_id(sa, self._mark_of(sa))
        self._do("delete_sa", _sa_str(sa), msg, XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK)
        self._sa_marks.pop(sa, None)

    def _dump_sas(self) -> list[SaSpec]:
        msg = xfrm_usersa_id()
        msg["attrs"] = []
        replies = self._do("list_sas", "(dump)", msg, XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP)
        out = []
        for reply in replies:
            if reply["header"]["type"] == XFRM_MSG_NEWSA:
                out.append(decode_sa(reply))
        return out

    def list_sas(self) -> list[SaSpec]:
        """Keyway's complete SAs. Larval states (from allocate_spi, not yet installed)
        have no algorithm and are left out; flush_owned still removes them."""
        return [
            sa
            for sa in self._dump_sas()
            if is_keyway_reqid(sa.reqid) and (sa.enc_alg or sa.integ_alg)
        ]

    def sa_counters(self, sa: SaId) -> SaCounters:
        msg = encode_sa_id(sa, self._mark_of(sa))
        replies = self._do("sa_counters", _sa_str(sa), msg, XFRM_MSG_GETSA, NLM_F_REQUEST)
        if not replies:
            raise DataPlaneError(f"sa_counters {_sa_str(sa)}: kernel sent no SA back")
        r = replies[0]
        return SaCounters(
            bytes=r["curlft_bytes"],
            packets=r["curlft_packets"],
            replay_dropped=r["stats_replay"],
            integrity_failed=r["stats_integrity_failed"],
            add_time=float(r["curlft_add_time"]),
            use_time=float(r["curlft_use_time"]),
        )

    # -- policies ---------------------------------------------------------------------

    def install_policy(self, policy: PolicySpec) -> None:
        self._check_policy(policy)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        seq = next(self._seq) & 0xFFFFFFFF
        data = pack_policy(policy, XFRM_MSG_NEWPOLICY, flags, seq)
        self._do_raw("install_policy", _policy_str(policy.id), data, seq, flags)
        self._route_policy(policy)

    def install_policies(
        self, policies: list[PolicySpec]
    ) -> list[tuple[PolicySpec, DataPlaneError]]:
        """Many NEWPOLICY messages per send, each with its own sequence number: the
        kernel answers a refused one with its error under that number, so only the last
        of a send asks for an ACK (which says the kernel is through them all)."""
        failed: list[tuple[PolicySpec, DataPlaneError]] = []
        flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
        for start in range(0, len(policies), POLICY_BATCH):
            pending: dict[int, PolicySpec] = {}
            for policy in policies[start : start + POLICY_BATCH]:
                try:
                    self._check_policy(policy)
                except DataPlaneError as exc:
                    failed.append((policy, exc))
                    continue
                pending[next(self._seq) & 0xFFFFFFFF] = policy
            if not pending:
                continue
            *_unused, last = pending
            chunk = b"".join(
                pack_policy(p, XFRM_MSG_NEWPOLICY, flags | (NLM_F_ACK if q == last else 0), q)
                for q, p in pending.items()
            )
            try:
                errors = self._batch(chunk, set(pending), last)
            except OSError as exc:
                code = exc.errno or errno_mod.EIO
                error = DataPlaneError(f"install_policies: netlink I/O failed: "
                                       f"{os.strerror(code)} (errno {code})")  # fmt: skip
                failed += [(p, error) for p in pending.values()]
                continue
            for seq, policy in pending.items():
                if seq in errors:
                    refused = _refused("install_policy", _policy_str(policy.id), errors[seq])
                    failed.append((policy, refused))
                else:
                    try:
                        self._route_policy(policy)
                    except DataPlaneError as exc:
                        failed.append((policy, exc))
        return failed

    def _batch(self, data: bytes, seqs: set[int], last: int) -> dict[int, NetlinkError]:
        """Send requests at once, read until the answer to `last` (processed in order, so
        every error before it is in): the errors, by sequence number."""
        self._sock.send(data)
        errors: dict[int, NetlinkError] = {}
        while last in seqs:
            reply = self._sock.recv(1 << 20)
            offset = 0
            while offset + _NLMSGERR.size <= len(reply):
                length, kind, _flags, seq, _pid, error = _NLMSGERR.unpack_from(reply, offset)
                if kind == NLMSG_ERROR and seq in seqs:
                    seqs.discard(seq)
                    if error:
                        # the generic parser gives the kernel's extended-ack text too
                        (parsed,) = self._marshal.parse(reply[offset : offset + length])
                        errors[seq] = parsed["header"].get("error") or NetlinkError(-error)
                offset += (length + 3) & ~3 if length else len(reply)
        return errors

    def _route_policy(self, policy: PolicySpec) -> None:
        if self.routes and _routed(policy):
            prefix = _prefix(policy.selector.dst)
            if not self._route_users.get(prefix):
                _route_towards(prefix, policy.templates[0].dst)
            self._route_users[prefix] = self._route_users.get(prefix, 0) + 1

    def _check_policy(self, policy: PolicySpec) -> None:
        what = _policy_str(policy.id)
        if policy.priority and policy.action is not PolicyAction.PROTECT:
            band = PASS_PRIO_BAND if policy.action is PolicyAction.PASS else DROP_PRIO_BAND
            if not _in_band(policy.priority, band):
                # Outside the band Keyway could not recognise (nor later remove) it.
                raise DataPlaneError(
                    f"install_policy {what}: {policy.action.value} priority "
                    f"{policy.priority} outside Keyway's band {band[0]}..{band[1]}"
                )
        if policy.action is PolicyAction.PROTECT and not all(
            is_keyway_reqid(t.reqid) for t in policy.templates
        ):
            raise DataPlaneError(f"install_policy {what}: template reqid outside Keyway's range")

    def update_policy(self, policy: PolicySpec) -> None:
        what = _policy_str(policy.id)
        # UPDPOLICY would add a policy that is gone: the caller means one it holds.
        self._do("update_policy", what, encode_policy_id(policy.id), XFRM_MSG_GETPOLICY,
                 NLM_F_REQUEST)  # fmt: skip
        seq = next(self._seq) & 0xFFFFFFFF
        flags = NLM_F_REQUEST | NLM_F_ACK
        data = pack_policy(policy, XFRM_MSG_UPDPOLICY, flags, seq)
        self._do_raw("update_policy", what, data, seq, flags)
        if self.routes and _routed(policy) and _prefix(policy.selector.dst) in self._route_users:
            # `ip route replace`: the route follows the peer without a gap.
            _route_towards(_prefix(policy.selector.dst), policy.templates[0].dst)

    def remove_policy(self, policy: PolicyId) -> None:
        msg = encode_policy_id(policy)
        what = _policy_str(policy)
        self._do("remove_policy", what, msg, XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK)
        prefix = _prefix(policy.selector.dst)
        if self.routes and policy.direction is Direction.OUT and prefix in self._route_users:
            self._route_users[prefix] -= 1
            if not self._route_users[prefix]:
                del self._route_users[prefix]
                _ip_quiet("route", "del", prefix, "table", str(ROUTE_TABLE))

    def _dump_policies(self) -> list[PolicySpec]:
        msg = xfrm_userpolicy_id()
        msg["attrs"] = []
        flags = NLM_F_REQUEST | NLM_F_DUMP
        replies = self._do("list_policies", "(dump)", msg, XFRM_MSG_GETPOLICY, flags)
        out = []
        for reply in replies:
            if reply["header"]["type"] != XFRM_MSG_NEWPOLICY:
                continue
            if reply["dir"] > XFRM_POLICY_FWD:
                continue  # per-socket policies (dir 3..5) are not Keyway's to list
            out.append(decode_policy(reply))
        return out

    def list_policies(self) -> list[PolicySpec]:
        """Keyway's policies, with the effective (kernel) priority."""
        return [p for p in self._dump_policies() if is_keyway_policy(p)]

    def flush_owned(self) -> None:
        errors = []
        for policy in self.list_policies():
            try:
                self.remove_policy(policy.id)
            except DataPlaneError as exc:
                errors.append(str(exc))
        for sa in self._dump_sas():
            if not is_keyway_reqid(sa.reqid):
                continue
            try:
                self._sa_marks[sa.id] = sa.mark
                self.delete_sa(sa.id)
            except DataPlaneError as exc:
                if "errno 3)" not in str(exc):  # ESRCH: already gone (expired meanwhile)
                    errors.append(str(exc))
        if errors:
            raise DataPlaneError("flush_owned: " + "; ".join(errors))

    # -- events -----------------------------------------------------------------------

    def prepare_ike_socket(self, sock) -> None:
        ike_socket_bypass(sock)

    def prepare_nat_t_socket(self, sock) -> None:
        ike_socket_bypass(sock)
        udp_encap_socket(sock)  # the kernel takes ESP in UDP off this socket itself

    async def start(self, events: EventSink) -> None:
        if self.routes:
            for family in ("-4", "-6"):
                _ip_quiet(family, "rule", "del", "priority", str(ROUTE_RULE_PRIORITY))
                _ip_quiet(family, "rule", "add", "lookup", str(ROUTE_TABLE),
                          "priority", str(ROUTE_RULE_PRIORITY))  # fmt: skip
        self._sink = events
        self._loop = asyncio.get_running_loop()
        sock = _open_socket(self.netns, (XFRMNLGRP_ACQUIRE, XFRMNLGRP_EXPIRE, XFRMNLGRP_MAPPING))
        sock.setblocking(False)
        self._events_sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)

    async def stop(self) -> None:
        if self.routes:
            for prefix in list(self._route_users):
                _ip_quiet("route", "del", prefix, "table", str(ROUTE_TABLE))
            self._route_users.clear()
            for family in ("-4", "-6"):
                _ip_quiet(family, "rule", "del", "priority", str(ROUTE_RULE_PRIORITY))
        if self._events_sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._events_sock.fileno())
            self._events_sock.close()
            self._events_sock = None

    def close(self) -> None:
        """Close the request socket (the kernel state stays)."""
        self._sock.close()

    def kernel_counts(self) -> dict:
        """GETSADINFO / GETSPDINFO: how many SAs and policies (per direction) the kernel
        holds in this namespace, Keyway's or not (for status and metrics)."""
        counts: dict = {}
        queries = ((XFRM_MSG_GETSADINFO, _sad_attrs), (XFRM_MSG_GETSPDINFO, _spd_attrs))
        for msg_type, attrs in queries:
            seq = next(self._seq) & 0xFFFFFFFF
            body = struct.pack("=I", 0xFFFFFFFF)  # the flags word the kernel expects
            header = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST, seq, 0)
            self._sock.send(header + body)
            while True:
                reply = self._sock.recv(1 << 16)
                _unused, kind, _unused, rseq, _unused = struct.unpack_from("=IHHII", reply)
                if rseq != seq:
                    continue
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", reply, 16)
                    raise DataPlaneError(f"kernel_counts: {os.strerror(-code)} (errno {-code})")
                counts.update(attrs(reply[20:]))
                break
        return counts

    def _on_readable(self) -> None:
        sock = self._events_sock
        if sock is None:
            return
        for _unused in range(64):  # bounded batch, then yield to the loop
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno_mod.ENOBUFS:
                    continue  # events were lost; reconcile catches up, keep listening
                raise
            for event in parse_events(data):
                if self._sink is not None:
                    self._sink(event)


def probe_kernel_esp() -> str:
    """'' when this kernel accepts an ESP SA (AES-GCM, as keywayd negotiates by
    default), else the reason: what `dataplane: auto` logs when it falls back."""
    import secrets

    try:
        plane = KernelPlane()
    except DataPlaneError as exc:
        return str(exc)
    probe = SaSpec(
        src="127.0.0.1",
        dst="127.0.0.1",
        proto=IpsecProto.ESP,
        spi=0xFFFF0000 + secrets.randbelow(0xFF00),  # out of allocate_spi's range
        mode=Mode.TRANSPORT,
        reqid=KEYWAY_REQID_MAX,
        enc_alg="aes-gcm-16",
        enc_key=bytes(20),
        esn=False,
    )
    try:
        plane.install_sa(probe)
    except DataPlaneError as exc:
        return f"the kernel refuses ESP SAs: {exc}"
    else:
        with contextlib.suppress(DataPlaneError):
            plane.delete_sa(probe.id)
    finally:
        plane.close()
    return ""
