# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fingerprint of the keywayd library this collection ships."""

from __future__ import annotations

DOCUMENTATION = r"""
name: agent_library
author: Keyway developers (@keyway)
version_added: "0.1.0"
short_description: The fingerprint of the keywayd library this collection ships
description:
  - SHA-256 over the Python files of keywayd's packages in this collection, as
    M(keyway.ipsec.keywayd) installs them on a host. A running keywayd reports the
    fingerprint of the files it runs from (C(keywayctl status), and
    M(keyway.ipsec.agent_config)'s C(agent.library)); equal fingerprints mean the host
    runs this collection's keywayd, and the role keyway.ipsec.agent skips installing it.
  - Takes no terms.
options: {}
"""

EXAMPLES = r"""
- name: Does h1 run this collection's keywayd?
  ansible.builtin.debug:
    msg: "{{ agent_config_result.agent.library == lookup('keyway.ipsec.agent_library') }}"
"""

RETURN = r"""
_raw:
  description: The fingerprint, 64 hexadecimal digits.
  type: list
  elements: str
"""

from ansible.plugins.lookup import LookupBase

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.library import (
    agent_fingerprint,
)


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return [agent_fingerprint()]
