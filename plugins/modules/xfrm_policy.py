#!/usr/bin/python
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
author: Keyway
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
  priority:
    description: Lower wins; 0 derives one from the selector's specificity.
    type: int
    default: 0
  mark:
    description: XFRM mark (value, mask).
    type: dict
  if_id:
    description: XFRM interface ID.
    type: int
    default: 0
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

from ansible.module_utils.basic import AnsibleModule

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
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm import (
        KernelPlane,
        effective_priority,
    )

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
