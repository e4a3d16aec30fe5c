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


def add_route(prefix: str, dev: str) -> None:
    family = "-6" if ":" in prefix else "-4"
    _ip(family, "route", "replace", prefix, "dev", dev)


def del_route(prefix: str, dev: str) -> None:
    family = "-6" if ":" in prefix else "-4"
    with contextlib.suppress(TunError):  # already gone with the device
        _ip(family, "route", "del", prefix, "dev", dev)


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
    return sock
