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


def add_route(prefix: str, dev: str) -> None:
    family = "-6" if ":" in prefix else "-4"
    _ip(family, "route", "replace", prefix, "dev", dev, "table", str(ROUTE_TABLE))


def del_route(prefix: str, dev: str) -> None:
    family = "-6" if ":" in prefix else "-4"
    with contextlib.suppress(TunError):  # already gone with the device
        _ip(family, "route", "del", prefix, "dev", dev, "table", str(ROUTE_TABLE))


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
