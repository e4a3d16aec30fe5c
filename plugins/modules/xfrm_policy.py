#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Declarative XFRM policies, compared field by field with the kernel."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: xfrm_policy
short_description: An IPsec policy in the Linux kernel (XFRM), declared
description:
  - Makes the kernel hold (or not hold) one policy, found by selector, direction, mark
    and if_id; action, templates and priority are compared with what the kernel holds
    and a difference replaces the policy.
  - Only Keyway's policies are touched (PROTECT with templates in Keyway's reqid range,
    PASS and DROP in Keyway's priority bands).
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
  selector:
    description: src and dst prefixes; proto, sport, dport (0 = any).
    type: dict
    required: true
    suboptions:
      src:
        description:
          - Source prefix of the traffic the policy applies to, for example V(10.1.0.0/24).
          - A host address (V(192.0.2.11)) means the host (V(192.0.2.11/32)); host bits of a
            prefix are dropped (V(10.1.0.5/24) is V(10.1.0.0/24)), as the kernel does.
        type: str
        required: true
      dst:
        description:
          - Destination prefix of the traffic the policy applies to, for example
            V(10.2.0.0/24).
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
  dir:
    description: in, out or fwd.
    type: str
    choices: [in, out, fwd]
    required: true
  action:
    description: protect (apply the templates), pass or drop.
    type: str
    choices: [protect, pass, drop]
    default: protect
  templates:
    description: For protect, the SAs to use; each proto, mode, reqid, and src/dst in tunnel mode.
    type: list
    elements: dict
    default: []
    suboptions:
      proto:
        description: The IPsec protocol of the SA this template asks for.
        type: str
        choices: [esp, ah]
        default: esp
      mode:
        description: The mode of that SA.
        type: str
        choices: [tunnel, transport]
        default: tunnel
      reqid:
        description:
          - The O(keyway.ipsec.xfrm_state#module:reqid) of that SA; for protect it must lie in
            Keyway's range (0x4B570000-0x4B57FFFF).
        type: int
        required: true
      src:
        description:
          - The outer source address of that SA, in tunnel mode.
          - Ignored in transport mode, where an SA has no outer addresses.
        type: str
        default: ""
      dst:
        description:
          - The outer destination address of that SA, in tunnel mode.
          - Ignored in transport mode, where an SA has no outer addresses.
        type: str
        default: ""
  priority:
    description: Lower wins; 0 derives one from the selector's specificity.
    type: int
    default: 0
  mark:
    description: XFRM mark (value, mask).
    type: dict
    suboptions:
      value:
        description:
          - The mark a packet must carry, after O(mark.mask) is applied, for the policy to
            apply to it; part of what finds the policy.
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
  platform:
    description: Target OS/families that can be operated against.
    support: partial
    platforms: posix
    details:
      - Linux only; XFRM is the Linux kernel's IPsec interface.
notes:
  - Supports check mode and diff mode.
"""

EXAMPLES = r"""
- name: Site 1 to site 2 through the tunnel
  keyway.ipsec.xfrm_policy:
    selector: {src: 10.1.0.0/24, dst: 10.2.0.0/24}
    dir: out
    templates:
      - {proto: esp, mode: tunnel, reqid: 1263992833, src: 192.0.2.11, dst: 192.0.2.12}
"""

RETURN = r"""
policy:
  description: The policy after the task.
  returned: when present
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    DataPlaneError,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.params import (
    MARK_SPEC,
    SELECTOR_SPEC,
    converge,
    policy_from_params,
    policy_view,
)

TEMPLATE_SPEC = dict(
    proto=dict(type="str", choices=["esp", "ah"], default="esp"),
    mode=dict(type="str", choices=["tunnel", "transport"], default="tunnel"),
    reqid=dict(type="int", required=True),
    src=dict(type="str", default=""),
    dst=dict(type="str", default=""),
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            netns=dict(type="str"),
            selector=dict(type="dict", required=True, options=SELECTOR_SPEC),
            dir=dict(type="str", choices=["in", "out", "fwd"], required=True),
            action=dict(type="str", choices=["protect", "pass", "drop"], default="protect"),
            templates=dict(type="list", elements="dict", options=TEMPLATE_SPEC, default=[]),
            priority=dict(type="int", default=0),
            mark=dict(type="dict", options=MARK_SPEC),
            if_id=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    try:
        wanted = policy_from_params(p)
    except ValueError as exc:
        module.fail_json(msg=f"bad policy parameters: {exc}")
    try:  # pyroute2 (the netlink library) is only needed here
        from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.codec import (
            effective_priority,
        )
        from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import (
            KernelPlane,
        )
    except ImportError as exc:
        package = (exc.name or "pyroute2").partition(".")[0]
        module.fail_json(msg=missing_required_lib(package), exception=str(exc))

    try:
        plane = KernelPlane(netns=p["netns"])
        current = next((x for x in plane.list_policies() if x.id == wanted.id), None)
    except DataPlaneError as exc:
        module.fail_json(msg=str(exc))

    def comparable(policy):  # the kernel reports the priority it derived
        return (policy.action, policy.templates, effective_priority(policy))

    converge(
        module,
        current,
        wanted,
        present=p["state"] == "present",
        same=lambda a, b: comparable(a) == comparable(b),
        view=policy_view,
        remove=plane.remove_policy,
        install=plane.install_policy,
        key="policy",
    )


if __name__ == "__main__":
    main()
