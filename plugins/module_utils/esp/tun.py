"""Linux I/O for the userspace plane: the TUN device, its routes, raw ESP/AH sockets."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


class TunError(OSError):
    """The TUN device or a route could not be set up; the message says which."""


def open_tun(name: str) -> tuple[int, str]:
    """Open /dev/net/tun as a layer-3 device without packet info; (fd, kernel name)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"TUNSETIFF {name}: {exc.strerror}") from None
    real = ifr[:16].rstrip(b"\0").decode()
    _ip("link", "set", real, "up", "mtu", "1400")  # room for ESP overhead on a 1500 link
    return fd, real


def _ip(*argv: str) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise TunError(0, f"ip {' '.join(argv)}: {proc.stderr.strip()}")


# The plane's routes live in their own table, consulted only by packets without the
# plane's firewall mark: its own ESP (marked) then never loops back into the TUN device,
# even when the protected prefix covers the peer (transport mode) or a PASS policy sends
# a packet on in the clear. strongSwan's kernel-libipsec does the same with table 220.
ROUTE_TABLE = 0x4B57
RULE_PRIORITY = 0x4B57
FWMARK = 0x4B570000


def add_rules() -> None:
    for family in ("-4", "-6"):
        del_rules_of(family)
        _ip(family, "rule", "add", "not", "fwmark", hex(FWMARK), "table", str(ROUTE_TABLE),
            "priority", str(RULE_PRIORITY))  # fmt: skip


def del_rules_of(family: str) -> None:
    with contextlib.suppress(TunError):
        _ip(family, "rule", "del", "priority", str(RULE_PRIORITY))


def del_rules() -> None:
    for family in ("-4", "-6"):
        del_rules_of(family)


RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RT_TABLE_COMPAT, RTPROT_BOOT, RT_SCOPE_LINK, RTN_UNICAST = 252, 3, 253, 1
_rtnl: socket.socket | None = None  # one rtnetlink socket per process
_rtnl_seq = 0


def _rta(kind: int, data: bytes) -> bytes:
    attr = struct.pack("=HH", 4 + len(data), kind) + data
    return attr + bytes(-len(attr) % 4)


def _route(command: int, prefix: str, dev: str) -> None:
    """A device route in the plane's table over rtnetlink: spawning `ip` per route would
    dominate the set-up of thousands of tunnels. (pyroute2's IPRoute runs its own event
    loop and cannot be called from the agent's.)"""
    global _rtnl, _rtnl_seq
    import ipaddress

    net = ipaddress.ip_network(prefix, strict=False)
    try:
        index = socket.if_nametoindex(dev)
    except OSError:
        raise TunError(19, f"route {prefix}: no device {dev}") from None
    if _rtnl is None:
        _rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        _rtnl.bind((0, 0))
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    body = struct.pack(
        "=BBBBBBBBI", family, net.prefixlen, 0, 0, RT_TABLE_COMPAT, RTPROT_BOOT,
        RT_SCOPE_LINK, RTN_UNICAST, 0,
    )  # fmt: skip
    body += _rta(RTA_DST, net.network_address.packed)
    body += _rta(RTA_OIF, struct.pack("=I", index))
    body += _rta(RTA_TABLE, struct.pack("=I", ROUTE_TABLE))
    flags = NLM_F_REQUEST | NLM_F_ACK
    if command == RTM_NEWROUTE:
        flags |= NLM_F_CREATE | NLM_F_REPLACE
    _rtnl_seq += 1
    _rtnl.send(struct.pack("=IHHII", 16 + len(body), command, flags, _rtnl_seq, 0) + body)
    while True:
        reply = _rtnl.recv(65536)
        _unused, kind, _unused, seq, _unused = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR and seq == _rtnl_seq:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                verb = "add" if command == RTM_NEWROUTE else "del"
                raise TunError(-error, f"route {verb} {prefix} dev {dev}: {os.strerror(-error)}")
            return


def add_route(prefix: str, dev: str) -> None:
    _route(RTM_NEWROUTE, prefix, dev)


def del_route(prefix: str, dev: str) -> None:
    with contextlib.suppress(TunError):  # already gone with the device
        _route(RTM_DELROUTE, prefix, dev)


def mark(sock: socket.socket) -> socket.socket:
    """Tag a socket's packets so that they bypass the plane's routing table."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, FWMARK)
    return sock


def raw_receiver(family: int, proto: int) -> socket.socket:
    """A raw socket receiving one IP protocol (ESP or AH). IPv4 delivers the IP header,
    IPv6 does not: its destination comes from IPV6_PKTINFO."""
    sock = socket.socket(family, socket.SOCK_RAW, proto)
    sock.setblocking(False)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def raw_sender(family: int) -> socket.socket:
    """A raw socket that sends complete IP packets (IPPROTO_RAW implies the header)."""
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return mark(sock)
