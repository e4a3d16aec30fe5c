#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
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
author: Keyway developers (@keyway)
options:
  timeout:
    description: Seconds to wait for each answer.
    type: float
    default: 10
  wait:
    description:
      - Seconds to wait until every connection with a child started at once
        (C(start_action=start)) is established; the task fails naming the others.
      - C(0) does not wait.
    type: int
    default: 0
extends_documentation_fragment:
  - keyway.ipsec.agent
  - keyway.ipsec.attributes
  - keyway.ipsec.attributes.info_module
"""

EXAMPLES = r"""
- name: What keywayd holds
  keyway.ipsec.agent_info:
    socket: /run/keyway/keywayd.sock
- name: Show the SAs
  ansible.builtin.debug:
    var: keyway_agent.sas

- name: Wait until the tunnels this host starts are up
  keyway.ipsec.agent_info:
    wait: 30
"""

RETURN = r"""
established:
  description: Connections established when the module returned (with O(wait)).
  returned: when O(wait) is set
  type: list
  elements: str
ansible_facts:
  description: C(keyway_agent) with C(status), C(connections) and C(sas).
  returned: always
  type: dict
  contains:
    keyway_agent:
      description: keywayd's answers to status, list-conns and list-sas.
      type: dict
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    DEFAULT_SOCKET,
    ControlError,
    request,
)


def wait_established(module, path: str, timeout: float, seconds: int) -> list[str]:
    """Poll list-conns until the connections keywayd starts itself are all up."""
    deadline = time.monotonic() + seconds
    while True:
        conns = request(path, "list-conns", timeout=timeout)
        wanted = {
            c["name"]
            for c in conns
            if any(child.get("start_action") == "start" for child in c["children"])
        }
        up = {c["name"] for c in conns if c["state"] == "established"}
        if wanted <= up:
            return sorted(up)
        if time.monotonic() > deadline:
            why = {c["name"]: c.get("last_error") for c in conns if c["name"] in wanted - up}
            module.fail_json(
                msg=f"not established after {seconds} s: "
                + ", ".join(f"{n} ({e})" if e else n for n, e in sorted(why.items())),
                established=sorted(up),
            )
        time.sleep(0.2)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path", default=DEFAULT_SOCKET),
            timeout=dict(type="float", default=10.0),
            wait=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    path, timeout = module.params["socket"], module.params["timeout"]
    result = {}
    try:
        if module.params["wait"] and not module.check_mode:
            result["established"] = wait_established(module, path, timeout, module.params["wait"])
        facts = {
            "status": request(path, "status", timeout=timeout),
            "connections": request(path, "list-conns", timeout=timeout),
            "sas": request(path, "list-sas", timeout=timeout),
        }
    except ControlError as exc:
        module.fail_json(msg=f"keywayd: {exc}")
    module.exit_json(changed=False, ansible_facts={"keyway_agent": facts}, **result)


if __name__ == "__main__":
    main()
