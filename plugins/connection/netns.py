# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run tasks inside a Linux network namespace on the controller (the netns lab)."""

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
short_description: Run tasks inside a network namespace of the controller
description:
  - Executes tasks on the controller inside a named network namespace, through
    C(ip netns exec), so that modules see that namespace's interfaces, routes, sockets
    and XFRM tables (and C(/sys) remounted to match, so fact gathering sees them too).
  - Files are shared with the controller (namespaces share one filesystem), so
    transfers are local copies. This is how Keyway's lab hosts are reached; lab hosts
    get per-host config, state and run folders through inventory variables.
  - Needs root on the controller (entering a namespace takes CAP_SYS_ADMIN).
author: Keyway developers (@keyway)
version_added: 0.1.0
extends_documentation_fragment:
  - ansible.builtin.connection_pipelining
options:
  netns:
    description: Name of the network namespace (as listed by C(ip netns list)).
    type: str
    required: true
    vars:
      - name: keyway_netns
      - name: ansible_netns_name
"""

EXAMPLES = r"""
# inventory/lab/group_vars/all.yml
# ansible_connection: keyway.ipsec.netns
# keyway_netns: kw-lab-h1
"""

import os
import shlex
import shutil

import ansible.constants as C
from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.connection.local import Connection as LocalConnection

IP = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/ip"


class Connection(LocalConnection):
    """The local connection, with every command wrapped in `ip netns exec NS`."""

    transport = "keyway.ipsec.netns"
    has_pipelining = True

    def _connect(self):
        if not self._connected:
            netns = self.get_option("netns")
            if os.geteuid() != 0:
                raise AnsibleConnectionFailure(
                    f"keyway.ipsec.netns: entering namespace {netns!r} needs root on the controller"
                )
            if not os.path.exists(os.path.join("/run/netns", netns)):
                raise AnsibleConnectionFailure(
                    f"keyway.ipsec.netns: network namespace {netns!r} does not exist "
                    "(is the lab up? `make lab-up`)"
                )
        return super()._connect()

    def exec_command(self, cmd, in_data=None, sudoable=True):
        netns = self.get_option("netns")
        shell = (C.DEFAULT_EXECUTABLE or "/bin/sh").split()[0]
        wrapped = f"{IP} netns exec {shlex.quote(netns)} {shell} -c {shlex.quote(cmd)}"
        return super().exec_command(wrapped, in_data=in_data, sudoable=sudoable)
