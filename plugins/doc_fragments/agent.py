# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options of the modules that talk to a running keywayd."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - keywayd's control socket (the role keyway.ipsec.agent puts it in its run folder,
        C(/run/keyway) by default).
    type: path
    default: /run/keyway/keywayd.sock
"""
