#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bring one of keywayd's connections up or down, or rekey it, through its control socket."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: tunnel
short_description: Bring a keywayd connection up or down, or rekey it
description:
  - Asks a running keywayd, over its control socket, to initiate (O(state=up)),
    terminate (O(state=down)) or rekey (O(state=rekeyed)) one of its connections, or
    one Child SA of it.
  - V(up) and V(down) are idempotent; V(rekeyed) is an action and always changes.
  - A connection taken down stays down (keywayd does not restart it, whatever its
    C(start_action)) until O(state=up), a reload that changes it, or a restart of
    keywayd.
  - The connection itself is configured with M(keyway.ipsec.agent_config).
version_added: "0.1.0"
author: Keyway developers (@keyway)
options:
  name:
    description: The connection, as named in keywayd's config (a link's name).
    type: str
    required: true
  child:
    description:
      - One Child SA of the connection, for O(state=down) (delete only it) and
        O(state=rekeyed) (rekey only it); without it the whole IKE SA is meant.
    type: str
  state:
    description:
      - V(up) initiates the connection and waits until it is established (or fails
        with keywayd's reason).
      - V(down) deletes its IKE SA (or the O(child)) and waits until it is gone.
      - V(rekeyed) starts a rekey of its IKE SA (or the O(child)) without waiting.
    type: str
    choices: [up, down, rekeyed]
    default: up
  timeout:
    description: Seconds to wait for V(up) or V(down).
    type: int
    default: 30
extends_documentation_fragment:
  - keyway.ipsec.agent
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
    details: Reports what it would do from the connection's state; asks keywayd nothing else.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: The link to h2 is up
  keyway.ipsec.tunnel:
    name: h1-h2

- name: Rekey the site Child SA of h1-h2 now
  keyway.ipsec.tunnel:
    name: h1-h2
    child: site
    state: rekeyed

- name: Take the link down for maintenance (it stays down until brought up)
  keyway.ipsec.tunnel:
    name: h1-h2
    state: down
"""

RETURN = r"""
connection:
  description: The connection as keywayd lists it after the task (C(keywayctl list-conns)).
  returned: always
  type: dict
sas:
  description: Its IKE SAs and their Child SAs after the task (SPIs, algorithms, ages; never keys).
  returned: always
  type: list
  elements: dict
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    DEFAULT_SOCKET,
    ControlError,
    request,
)

# IKE SAs on their way out: not what "up" or "down" is about.
GONE = ("deleted", "failed")


def _state(socket: str, name: str) -> tuple[dict | None, list[dict]]:
    conns = request(socket, "list-conns")
    conn = next((c for c in conns if c["name"] == name), None)
    sas = [sa for sa in request(socket, "list-sas") if sa["connection"] == name]
    return conn, sas


def _child_up(sas: list[dict], child: str) -> bool:
    return any(
        c["name"] == child for sa in sas if sa["state"] == "established" for c in sa["children"]
    )


def _present(sas: list[dict], child: str | None) -> bool:
    """What O(state=down) removes is there: the child, or any IKE SA not on its way out."""
    return _child_up(sas, child) if child else any(sa["state"] not in GONE for sa in sas)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            child=dict(type="str"),
            state=dict(type="str", choices=["up", "down", "rekeyed"], default="up"),
            socket=dict(type="path", default=DEFAULT_SOCKET),
            timeout=dict(type="int", default=30),
        ),
        supports_check_mode=True,
    )
    p = module.params
    name, child, socket, timeout = p["name"], p["child"], p["socket"], p["timeout"]
    if child and p["state"] == "up":
        module.fail_json(msg="child applies to state down and rekeyed: up brings up the connection")
    target = {"connection": name, **({"child": child} if child else {})}
    try:
        conn, sas = _state(socket, name)
        if conn is None:
            known = ", ".join(c["name"] for c in request(socket, "list-conns")) or "none"
            module.fail_json(msg=f"keywayd has no connection {name!r} (it has: {known})")
        if child and child not in {c["name"] for c in conn["children"]}:
            module.fail_json(msg=f"connection {name!r} has no child {child!r}")
        established = any(sa["state"] == "established" for sa in sas)
        if p["state"] == "up":
            changed = not established
        elif p["state"] == "down":
            changed = _present(sas, child)
        else:
            if not (established and (not child or _child_up(sas, child))):
                what = f"{name}/{child}" if child else name
                module.fail_json(msg=f"{what}: nothing established to rekey")
            changed = True
        if changed and not module.check_mode:
            if p["state"] == "up":
                request(
                    socket, "initiate", timeout=timeout + 5, args={**target, "timeout": timeout}
                )
            elif p["state"] == "rekeyed":
                request(socket, "rekey", args=target)
            else:
                request(socket, "terminate", args=target)
                deadline = time.monotonic() + timeout
                while _present(_state(socket, name)[1], child):  # the Delete exchange
                    if time.monotonic() > deadline:
                        module.fail_json(msg=f"{name}: still there {timeout} s after terminate")
                    time.sleep(0.1)
            conn, sas = _state(socket, name)
    except ControlError as exc:
        module.fail_json(msg=f"keywayd: {exc}")
    module.exit_json(changed=changed, connection=conn, sas=sas)


if __name__ == "__main__":
    main()
