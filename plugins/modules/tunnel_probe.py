#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Prove a tunnel on the wire: echo requests through it, and what the underlay carried."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tunnel_probe
short_description: Send echo requests through a tunnel and show what the wire carried
description:
  - Sends ICMP (or ICMPv6) echo requests from O(source) to O(destination) and counts the
    replies, while capturing the frames this host sends on O(interface) (the underlay).
  - Reports how many of those frames were ESP, ESP in UDP (port 4500) or the echo
    requests in the clear, with the SPIs and sequence numbers seen. With
    O(expect=encrypted) the task fails unless every request was answered and none
    crossed the underlay in the clear.
  - Read-only, it never reports a change.
version_added: "0.1.0"
author: Keyway developers (@keyway)
options:
  source:
    description: Local address to send from (e.g. the host's site address).
    type: str
    required: true
  destination:
    description: Address behind the peer to send to.
    type: str
    required: true
  interface:
    description: The underlay interface to capture on.
    type: str
    default: eth0
  count:
    description: Echo requests to send.
    type: int
    default: 3
  timeout:
    description: Seconds to wait for each reply.
    type: float
    default: 2.0
  expect:
    description: C(encrypted) fails unless all replies came and no cleartext request was seen.
    type: str
    choices: [encrypted, any]
    default: encrypted
extends_documentation_fragment:
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
    details: It changes nothing; in check mode it still sends its probes.
  diff_mode:
    support: N/A
    details: It changes nothing.
notes:
  - Needs CAP_NET_RAW.
"""

EXAMPLES = r"""
- name: h1's site reaches h2's site, encrypted on the wire
  keyway.ipsec.tunnel_probe:
    source: 10.1.0.1
    destination: 10.2.0.1
"""

RETURN = r"""
sent:
  description: Echo requests sent.
  returned: always
  type: int
received:
  description: Echo replies received.
  returned: always
  type: int
wire:
  description: Frames sent on the interface, by kind (esp, esp_in_udp, cleartext).
  returned: always
  type: dict
spis:
  description: SPIs (hex) of the ESP packets seen leaving, with their highest sequence number.
  returned: always
  type: dict
"""

import ipaddress
import os
import select
import socket
import struct
import time

from ansible.module_utils.basic import AnsibleModule

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
# IP protocol numbers (one per line: ansible-doc's reader warns on tuple assignments)
ESP = 50
UDP = 17
ICMP = 1
ICMPV6 = 58


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _classify(frame: bytes, destination: bytes, v6: bool, counts: dict, spis: dict) -> None:
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        proto, header, dst = ip[9], (ip[0] & 0x0F) * 4, ip[16:20]
    elif ethertype == 0x86DD and len(ip) >= 40:
        proto, header, dst = ip[6], 40, ip[24:40]
    else:
        return
    payload = ip[header:]
    if proto == ESP and len(payload) >= 8:
        counts["esp"] += 1
        spi, seq = struct.unpack_from("!II", payload)
        spis[f"{spi:08x}"] = max(seq, spis.get(f"{spi:08x}", 0))
    elif proto == UDP and len(payload) >= 16 and struct.unpack_from("!H", payload, 2)[0] == 4500:
        spi, seq = struct.unpack_from("!II", payload, 8)
        if spi:  # a zero non-ESP marker is IKE, not ESP
            counts["esp_in_udp"] += 1
            spis[f"{spi:08x}"] = max(seq, spis.get(f"{spi:08x}", 0))
    elif proto == (ICMPV6 if v6 else ICMP) and dst == destination:
        counts["cleartext"] += 1


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="str", required=True),
            destination=dict(type="str", required=True),
            interface=dict(type="str", default="eth0"),
            count=dict(type="int", default=3),
            timeout=dict(type="float", default=2.0),
            expect=dict(type="str", choices=["encrypted", "any"], default="encrypted"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        src, dst = ipaddress.ip_address(p["source"]), ipaddress.ip_address(p["destination"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    v6 = dst.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        capture.bind((p["interface"], 0))
        echo = socket.socket(family, socket.SOCK_RAW, ICMPV6 if v6 else ICMP)
        echo.bind((str(src), 0))
    except OSError as exc:
        module.fail_json(msg=f"cannot open probe sockets: {exc}")
    ident = os.getpid() & 0xFFFF
    counts = {"esp": 0, "esp_in_udp": 0, "cleartext": 0}
    spis: dict[str, int] = {}
    received = 0
    for seq in range(1, p["count"] + 1):
        body = struct.pack("!HH", ident, seq) + b"keyway tunnel probe"
        kind = 128 if v6 else 8  # the kernel fills in the ICMPv6 checksum
        header = struct.pack("!BBH", kind, 0, 0)
        if not v6:
            header = struct.pack("!BBH", kind, 0, _checksum(header + body))
        echo.sendto(header + body, (str(dst), 0))
        deadline = time.monotonic() + p["timeout"]
        answered = False
        while time.monotonic() < deadline:
            ready = select.select([echo, capture], [], [], deadline - time.monotonic())[0]
            if capture in ready:
                frame, addr = capture.recvfrom(65535)
                if addr[2] == PACKET_OUTGOING:
                    _classify(frame, dst.packed, v6, counts, spis)
            if echo in ready:
                data, _unused = echo.recvfrom(65535)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
                if (
                    len(icmp) >= 8
                    and icmp[0] == (129 if v6 else 0)
                    and struct.unpack_from("!HH", icmp, 4) == (ident, seq)
                ):
                    answered = True
            if answered:
                break
        received += answered
    # Frames still queued in the capture socket belong to this probe too.
    capture.setblocking(False)
    while True:
        try:
            frame, addr = capture.recvfrom(65535)
        except BlockingIOError:
            break
        if addr[2] == PACKET_OUTGOING:
            _classify(frame, dst.packed, v6, counts, spis)
    result = dict(changed=False, sent=p["count"], received=received, wire=counts, spis=spis)
    if p["expect"] == "encrypted":
        if counts["cleartext"]:
            module.fail_json(msg=f"{counts['cleartext']} probe(s) left in the clear", **result)
        if received < p["count"] or not (counts["esp"] or counts["esp_in_udp"]):
            module.fail_json(
                msg=f"{received} of {p['count']} probes answered through the tunnel", **result
            )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
