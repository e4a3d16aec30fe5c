#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keyway's XFRM SAs (keys redacted) and policies, as facts."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: xfrm_info
short_description: Keyway's IPsec SAs and policies in the Linux kernel
description:
  - Returns the SAs (keys shown as their length only) and policies Keyway owns in the
    kernel, with each SA's counters, and sets them as the fact C(keyway_xfrm).
version_added: "0.1.0"
author: Keyway developers (@keyway)
options:
  netns:
    description: Network namespace (as C(ip netns)) to read instead of the host's own.
    type: str
extends_documentation_fragment:
  - keyway.ipsec.attributes
  - keyway.ipsec.attributes.info_module
"""

EXAMPLES = r"""
- name: What Keyway installed
  keyway.ipsec.xfrm_info:
- ansible.builtin.debug:
    var: keyway_xfrm.sas
"""

RETURN = r"""
ansible_facts:
  description: keyway_xfrm with sas (each with counters) and policies.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    DataPlaneError,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.params import (
    policy_view,
    sa_view,
)


def main() -> None:
    module = AnsibleModule(argument_spec=dict(netns=dict(type="str")), supports_check_mode=True)
    try:  # pyroute2 (the netlink library) is only needed here
        from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import (
            KernelPlane,
        )
    except ImportError as exc:
        package = (exc.name or "pyroute2").partition(".")[0]
        module.fail_json(msg=missing_required_lib(package), exception=str(exc))

    try:
        plane = KernelPlane(netns=module.params["netns"])
        sas = []
        for sa in plane.list_sas():
            view = sa_view(sa)
            counters = plane.sa_counters(sa.id)
            view["counters"] = {"bytes": counters.bytes, "packets": counters.packets}
            sas.append(view)
        policies = [policy_view(p) for p in plane.list_policies()]
    except DataPlaneError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(
        changed=False, ansible_facts={"keyway_xfrm": {"sas": sas, "policies": policies}}
    )


if __name__ == "__main__":
    main()
