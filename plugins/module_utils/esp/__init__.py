"""Userspace IPsec: ESP/AH packet transforms (packet), the anti-replay window (replay),
Linux TUN and raw-socket I/O (tun), and a runner for hand-keyed planes (runner). The
DataPlane built on them is dataplane/userspace.py."""
