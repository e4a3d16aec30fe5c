#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Keyway's CA on the controller: sign the hosts' requests, renew, revoke, publish a CRL."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki_ca
short_description: Keyway's certificate authority, on the controller
description:
  - Keeps a CA in the folder O(path) on the machine it runs on (the controller, with
    C(delegate_to) set to C(localhost) and C(run_once)); its key is made there, mode 0600
    in a 0700 folder, and never leaves it.
  - Signs each host's certificate request (from M(keyway.ipsec.pki_key)) into a
    certificate for IPsec, for the host's IKE identity. A host whose current
    certificate is for the same key and identity and valid for more than
    O(renew_days) gets it back unchanged; otherwise a new one is issued (the old one
    stays valid until it expires, so SAs it authenticated are not disturbed).
  - Revokes the certificates of hosts it certified that are no longer in O(identities)
    (they left the inventory, or their links no longer use certificates) and of hosts
    in O(compromised), and signs a CRL listing them; the CRL is signed again when that
    list changes or half its validity is gone.
version_added: "0.2.0"
author: Keyway developers (@keyway)
options:
  path:
    description: The CA's folder.
    type: path
    required: true
  name:
    description: The CA's common name, when it is created.
    type: str
    default: Keyway CA
  requests:
    description:
      - Requests by host name, each as M(keyway.ipsec.pki_key) returns it (C(csr));
        entries without C(csr) (a skipped task, a host in check mode without a key
        yet) are left out.
    type: dict
    default: {}
  identities:
    description:
      - Every host entitled to a certificate, including hosts not in this run, with the
        IKE identity its certificate is for. The identity comes from here (the
        inventory), never from the request, so a host cannot ask for another's.
      - The certificates of hosts the CA knows that are not here are revoked
        (cessationOfOperation).
    type: dict
    required: true
  compromised:
    description:
      - Hosts whose certificates are revoked (keyCompromise); a request from one of
        them is refused.
    type: list
    elements: str
    default: []
  valid_days:
    description: Validity of the certificates issued, days.
    type: int
    default: 365
  renew_days:
    description: A certificate with no more than this many days left is renewed.
    type: int
    default: 30
  crl_uri:
    description:
      - Where the CA's CRL is published (an http URL), if it is; the certificates name it
        as their CRL distribution point, and keywayd fetches the CRL there before it
        accepts a peer (see keywayd's revocation policy). Changing it renews every
        certificate.
      - The module writes C(crl.pem) in O(path); publishing it at this URL is the
        operator's (a web server, an object store).
    type: str
    default: ""
  crl_valid_days:
    description: Validity of the CRL, days (it is signed again after half of it).
    type: int
    default: 30
  ca_valid_days:
    description: Validity of the CA's own certificate when it is created, days.
    type: int
    default: 3650
extends_documentation_fragment:
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
    details: Computes the certificates and the CRL it would issue, and writes nothing.
  diff_mode:
    support: full
    details: What the CA issues, renews and revokes, in words (no key ever).
"""

EXAMPLES = r"""
- name: The controller's CA signs this run's requests
  keyway.ipsec.pki_ca:
    path: "{{ inventory_dir }}/pki"
    requests: "{{ dict(ansible_play_hosts | zip(ansible_play_hosts
      | map('extract', hostvars, 'keyway_request'))) }}"
    identities: "{{ tunnels_intent.pki_identities }}"
    compromised: "{{ tunnels_intent.compromised }}"
  delegate_to: localhost
  run_once: true
  register: keyway_pki
"""

RETURN = r"""
ca:
  description: The CA's certificate, PEM.
  returned: always
  type: str
crl:
  description: The current CRL, PEM.
  returned: always
  type: str
certificates:
  description: Each requesting host's certificate, PEM, by host name.
  returned: always
  type: dict
issued:
  description: Hosts given a new certificate (first or renewed) by this run.
  returned: always
  type: list
  elements: str
revoked:
  description: Hosts whose certificates this run revoked.
  returned: always
  type: list
  elements: str
changes:
  description: What changed, in words.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.keyway.ipsec.plugins.module_utils import pki


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            name=dict(type="str", default="Keyway CA"),
            requests=dict(type="dict", default={}),
            identities=dict(type="dict", required=True),
            compromised=dict(type="list", elements="str", default=[]),
            valid_days=dict(type="int", default=365),
            renew_days=dict(type="int", default=30),
            crl_uri=dict(type="str", default=""),
            crl_valid_days=dict(type="int", default=30),
            ca_valid_days=dict(type="int", default=3650),
        ),
        supports_check_mode=True,
    )
    if not pki.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography (on the controller)"))
    p = module.params
    if p["renew_days"] >= p["valid_days"]:
        module.fail_json(
            msg=f"renew_days ({p['renew_days']}) must be less than valid_days "
            f"({p['valid_days']}): every run would renew"
        )
    try:
        ca = pki.CertificateAuthority(p["path"])
    except (pki.PkiError, OSError, ValueError) as exc:
        module.fail_json(msg=f"the CA in {p['path']}: {exc}")
    if not ca.exists:
        ca.create(p["name"], p["ca_valid_days"])
    compromised = set(p["compromised"])
    identities = {str(h): str(i) for h, i in p["identities"].items()}
    members = set(identities) - compromised
    revoked = sorted(
        {h for h in compromised if ca.revoke(h, "key_compromise")}
        | {h for h in ca.hosts() if h not in members and ca.revoke(h, "cessation_of_operation")}
    )
    certificates, issued = {}, []
    for host, request in sorted(p["requests"].items()):
        if not isinstance(request, dict) or not request.get("csr"):
            continue
        if host in compromised:
            module.fail_json(msg=f"{host} is marked compromised: no certificate for it")
        if host not in members:
            module.fail_json(msg=f"{host} asks for a certificate but none of its links uses one")
        try:
            cert = ca.issue(
                host,
                request["csr"].encode(),
                identities[host],
                p["valid_days"],
                p["renew_days"],
                p["crl_uri"],
            )
        except pki.PkiError as exc:
            module.fail_json(msg=str(exc))
        certificates[host] = cert.pem.decode()
        if cert.changed:
            issued.append(host)
    crl = ca.crl(p["crl_valid_days"], force=bool(revoked))
    changed = bool(ca.changes)
    if changed and not module.check_mode:
        ca.save()
    result = dict(
        changed=changed,
        ca=ca.cert_pem.decode(),
        crl=crl.decode(),
        certificates=certificates,
        issued=issued,
        revoked=revoked,
        changes=ca.changes,
    )
    if module._diff:
        result["diff"] = {"prepared": "\n".join(ca.changes) + ("\n" if ca.changes else "")}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
