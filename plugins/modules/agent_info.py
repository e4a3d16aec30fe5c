#!/usr/bin/python
"""keywayd's status, connections and SAs (never keys), as facts."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: agent_info
short_description: What a running keywayd holds, as facts
description:
  - Asks keywayd over its control socket for its status, its connections and its IKE
    and Child SAs (SPIs, algorithms, selectors, counters, ages; never keys), and sets
    them as the fact C(keyway_agent).
  - Fails with keywayd's own words when it does not answer.
version_added: "0.1.0"
author: Keyway
options:
  socket:
    description: keywayd's control socket.
    type: path
    default: /run/keyway/keywayd.sock
  timeout:
    description: Seconds to wait for each answer.
    type: float
    default: 10
attributes:
  check_mode:
    support: full
    description: Read-only.
  diff_mode:
    support: none
notes:
  - Read-only; supports check mode.
"""

EXAMPLES = r"""
- name: What keywayd holds
  keyway.ipsec.agent_info:
    socket: /run/keyway/keywayd.sock
- name: Show the SAs
  ansible.builtin.debug:
    var: keyway_agent.sas
"""

RETURN = r"""
ansible_facts:
  description: C(keyway_agent) with C(status), C(connections) and C(sas).
  returned: always
  type: dict
  contains:
    keyway_agent:
      description: keywayd's answers to status, list-conns and list-sas.
      type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    ControlError,
    request,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path", default="/run/keyway/keywayd.sock"),
            timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
    )
    path, timeout = module.params["socket"], module.params["timeout"]
    try:
        facts = {
            "status": request(path, "status", timeout=timeout),
            "connections": request(path, "list-conns", timeout=timeout),
            "sas": request(path, "list-sas", timeout=timeout),
        }
    except ControlError as exc:
        module.fail_json(msg=f"keywayd: {exc}")
    module.exit_json(changed=False, ansible_facts={"keyway_agent": facts})


if __name__ == "__main__":
    main()
