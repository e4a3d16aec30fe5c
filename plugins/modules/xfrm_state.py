#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Declarative XFRM SAs (static manual keying), compared field by field with the kernel."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: xfrm_state
short_description: An IPsec SA in the Linux kernel (XFRM), declared
description:
  - Makes the kernel hold (or not hold) one ESP or AH SA, found by destination, protocol
    and SPI. The SA is compared with what the kernel holds field by field (algorithms,
    keys, selector, encapsulation, replay window, ESN, lifetimes, mark, if_id); a
    difference replaces it.
  - Only SAs whose reqid lies in Keyway's range (0x4B570000-0x4B57FFFF) are touched, so a
    foreign daemon's SAs are never changed; reqid must be in that range.
  - Static manual keying with this module and M(keyway.ipsec.xfrm_policy) is a supported
    mode of its own; keywayd negotiates keys otherwise.
version_added: "0.1.0"
author:
  - Keyway developers (@keyway)
options:
  state:
    description: present or absent.
    type: str
    choices: [present, absent]
    default: present
  netns:
    description: Network namespace (as C(ip netns)) to program instead of the host's own.
    type: str
  src:
    description: Outer source address.
    type: str
    required: true
  dst:
    description: Outer destination address.
    type: str
    required: true
  proto:
    description: esp or ah.
    type: str
    choices: [esp, ah]
    default: esp
  spi:
    description: The SPI.
    type: int
    required: true
  mode:
    description: tunnel or transport.
    type: str
    choices: [tunnel, transport]
    default: tunnel
  reqid:
    description: Links the SA to policy templates; in Keyway's range.
    type: int
    default: 1263992833
  enc_alg:
    description: aes-gcm-16, chacha20-poly1305, aes-cbc or null (ESP).
    type: str
  enc_key:
    description: Encryption key as hex (AEAD keys end with their 4-byte salt).
    type: str
  integ_alg:
    description: hmac-sha2-256-128, hmac-sha2-384-192 or hmac-sha2-512-256.
    type: str
  integ_key:
    description: Integrity key as hex.
    type: str
  icv_bits:
    description: AEAD ICV length.
    type: int
    default: 128
  selector:
    description: The SA's traffic selector (src, dst prefixes; proto, sport, dport).
    type: dict
    suboptions:
      src:
        description:
          - Source prefix of the traffic the SA may carry, for example V(10.1.0.0/24).
          - A host address (V(192.0.2.11)) means the host (V(192.0.2.11/32)); host bits of a
            prefix are dropped (V(10.1.0.5/24) is V(10.1.0.0/24)), as the kernel does.
        type: str
        required: true
      dst:
        description:
          - Destination prefix of the traffic the SA may carry, for example V(10.2.0.0/24).
          - A host address (V(192.0.2.12)) means the host (V(192.0.2.12/32)); host bits of a
            prefix are dropped (V(10.1.0.5/24) is V(10.1.0.0/24)), as the kernel does.
        type: str
        required: true
      proto:
        description: IP protocol number of that traffic (V(6) TCP, V(17) UDP); V(0) matches any.
        type: int
        default: 0
      sport:
        description: Source port (TCP, UDP, SCTP) of that traffic; V(0) matches any.
        type: int
        default: 0
      dport:
        description: Destination port (TCP, UDP, SCTP) of that traffic; V(0) matches any.
        type: int
        default: 0
  encap:
    description: ESP in UDP ports (sport, dport), for NAT traversal.
    type: dict
    suboptions:
      sport:
        description: UDP source port of this SA's ESP-in-UDP packets (the port at O(src)).
        type: int
        default: 4500
      dport:
        description: UDP destination port of this SA's ESP-in-UDP packets (the port at O(dst)).
        type: int
        default: 4500
  replay_window:
    description: Anti-replay window in packets (at most 32 without ESN, as the kernel keeps).
    type: int
    default: 128
  esn:
    description: Extended sequence numbers.
    type: bool
    default: true
  lifetime:
    description: soft_/hard_ bytes, packets and seconds (0 = none).
    type: dict
    suboptions:
      soft_bytes:
        description:
          - Bytes after which the kernel announces a soft expire (a cue to rekey; the SA
            stays); V(0) means no limit.
        type: int
        default: 0
      hard_bytes:
        description: Bytes after which the kernel deletes the SA; V(0) means no limit.
        type: int
        default: 0
      soft_packets:
        description:
          - Packets after which the kernel announces a soft expire (the SA stays); V(0) means
            no limit.
        type: int
        default: 0
      hard_packets:
        description: Packets after which the kernel deletes the SA; V(0) means no limit.
        type: int
        default: 0
      soft_seconds:
        description:
          - Seconds after the SA was added at which the kernel announces a soft expire (the
            SA stays); V(0) means no limit.
        type: int
        default: 0
      hard_seconds:
        description:
          - Seconds after the SA was added at which the kernel deletes the SA; V(0) means no
            limit.
        type: int
        default: 0
  mark:
    description: XFRM mark (value, mask).
    type: dict
    suboptions:
      value:
        description: The mark a packet must carry, after O(mark.mask) is applied, to use this SA.
        type: int
        required: true
      mask:
        description:
          - The bits of a packet's mark that are compared with O(mark.value); the default
            (0xFFFFFFFF) compares all 32.
        type: int
        default: 4294967295
  if_id:
    description: XFRM interface ID.
    type: int
    default: 0
attributes:
  check_mode:
    description:
      - Can run in C(check_mode) and return changed status prediction without modifying
        target.
    support: full
  diff_mode:
    description:
      - Will return details on what has changed (or possibly needs changing in
        C(check_mode)), when in diff mode.
    support: full
    details:
      - Keys are shown as their length only.
  platform:
    description: Target OS/families that can be operated against.
    support: partial
    platforms: posix
    details:
      - Linux only; XFRM is the Linux kernel's IPsec interface.
notes:
  - Supports check mode and diff mode; keys appear in neither (only their length).
"""

EXAMPLES = r"""
- name: The outbound SA of a manually keyed tunnel
  keyway.ipsec.xfrm_state:
    src: 192.0.2.11
    dst: 192.0.2.12
    spi: 0x1001
    enc_alg: aes-gcm-16
    enc_key: "{{ vault_h1_h2_key }}"
    selector: {src: 10.1.0.0/24, dst: 10.2.0.0/24}
"""

RETURN = r"""
sa:
  description: The SA as the kernel holds it after the task (keys shown as their length).
  returned: when present
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
    DataPlaneError,
    is_keyway_reqid,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.params import (
    LIFETIME_SPEC,
    MARK_SPEC,
    SELECTOR_SPEC,
    converge,
    sa_from_params,
    sa_view,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            netns=dict(type="str"),
            src=dict(type="str", required=True),
            dst=dict(type="str", required=True),
            proto=dict(type="str", choices=["esp", "ah"], default="esp"),
            spi=dict(type="int", required=True),
            mode=dict(type="str", choices=["tunnel", "transport"], default="tunnel"),
            reqid=dict(type="int", default=KEYWAY_REQID_MIN + 1),
            enc_alg=dict(type="str"),
            enc_key=dict(type="str", no_log=True),
            integ_alg=dict(type="str"),
            integ_key=dict(type="str", no_log=True),
            icv_bits=dict(type="int", default=128),
            selector=dict(type="dict", options=SELECTOR_SPEC),
            encap=dict(
                type="dict",
                options=dict(
                    sport=dict(type="int", default=4500), dport=dict(type="int", default=4500)
                ),
            ),
            replay_window=dict(type="int", default=128),
            esn=dict(type="bool", default=True),
            lifetime=dict(type="dict", options=LIFETIME_SPEC),
            mark=dict(type="dict", options=MARK_SPEC),
            if_id=dict(type="int", default=0),
        ),
        required_if=[("state", "present", ("enc_alg", "integ_alg"), True)],
        supports_check_mode=True,
    )
    p = module.params
    if not is_keyway_reqid(p["reqid"]):
        module.fail_json(
            msg=f"reqid {p['reqid']:#x} is outside Keyway's range 0x4B570000-0x4B57FFFF"
        )
    try:
        wanted = sa_from_params(p)
    except ValueError as exc:
        module.fail_json(msg=f"bad SA parameters: {exc}")
    try:  # pyroute2 (the netlink library) is only needed here
        from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.codec import (
            as_kernel_holds,
        )
        from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import (
            KernelPlane,
        )
    except ImportError as exc:
        package = (exc.name or "pyroute2").partition(".")[0]
        module.fail_json(msg=missing_required_lib(package), exception=str(exc))

    wanted = as_kernel_holds(wanted)
    try:
        plane = KernelPlane(netns=p["netns"])
        current = next((sa for sa in plane.list_sas() if sa.id == wanted.id), None)
    except DataPlaneError as exc:
        module.fail_json(msg=str(exc))
    converge(
        module,
        current,
        wanted,
        present=p["state"] == "present",
        same=lambda a, b: a == b,
        view=sa_view,
        remove=plane.delete_sa,  # keys and algorithms cannot be updated in place
        install=plane.install_sa,
        key="sa",
    )


if __name__ == "__main__":
    main()
