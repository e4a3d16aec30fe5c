#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's IKE private key (made here, never leaving the host) and its CSR."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki_key
short_description: Make the host's IKE private key and a certificate request for its identity
description:
  - Makes the private key keywayd signs IKE_AUTH with, at O(path), mode 0600 in a 0700
    folder, unless a key of O(type) is already there; the key never leaves the host and
    never appears in the task's output.
  - Returns a certificate signing request (CSR) for O(identity), which
    M(keyway.ipsec.pki_ca) signs on the controller.
  - An FQDN, an address or a user@FQDN identity goes in the request's subjectAltName,
    a DN is its subject. A KEY_ID identity is refused (it names a key, not a subject).
version_added: "0.2.0"
author: Keyway developers (@keyway)
options:
  path:
    description: The private key file (PEM, PKCS#8).
    type: path
    required: true
  identity:
    description: The host's IKE identity, as in its keywayd connections (local id).
    type: str
    required: true
  type:
    description:
      - The key's type. A key of another type at O(path) is replaced (the CA then
        issues a certificate for the new key).
    type: str
    choices: [ecdsa-p256, ecdsa-p384, ed25519, rsa-3072]
    default: ecdsa-p256
  state:
    description: C(present) makes the key; C(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
    details: Without a key yet, check mode returns no CSR.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: This host's IKE key and its certificate request
  keyway.ipsec.pki_key:
    path: /etc/keyway/pki/key.pem
    identity: "{{ keyway_ike_id | default(inventory_hostname) }}"
  register: keyway_request
"""

RETURN = r"""
csr:
  description: The certificate signing request, PEM (public data).
  returned: with O(state=present), unless in check mode without a key yet
  type: str
identity:
  description: The identity the request is for.
  returned: with O(state=present)
  type: str
public_key:
  description: SHA-256 of the public key (DER), hex; which key the request is for.
  returned: when a key exists
  type: str
"""

import os
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.keyway.ipsec.plugins.module_utils import pki


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            identity=dict(type="str", required=True),
            type=dict(
                type="str",
                choices=["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072"],
                default="ecdsa-p256",
            ),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        supports_check_mode=True,
    )
    if not pki.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    path, kind = Path(module.params["path"]), module.params["type"]
    if module.params["state"] == "absent":
        changed = path.exists()
        if changed and not module.check_mode:
            path.unlink()
        module.exit_json(changed=changed)
    key = None
    if path.exists():
        if path.stat().st_mode & 0o077 and not module.check_mode:
            os.chmod(path, 0o600)  # a key readable by others is made its owner's again
        try:
            key = pki.load_key(path.read_bytes())
        except (ValueError, TypeError) as exc:
            module.fail_json(msg=f"{path}: not an unencrypted PEM private key ({exc})")
    changed = key is None or pki.key_type(key) != kind
    if changed:
        if module.check_mode:
            module.exit_json(changed=True, identity=module.params["identity"])
        key = pki.make_key(kind)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki.write_file(path, pki.key_pem(key), 0o600)
    try:
        csr = pki.make_csr(key, module.params["identity"])
    except pki.PkiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(
        changed=changed,
        csr=csr.decode(),
        identity=module.params["identity"],
        public_key=pki.public_key_id(key.public_key()),
    )


if __name__ == "__main__":
    main()
