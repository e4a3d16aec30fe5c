"""Issue 15 against charon: certificates from Keyway's own CA (the
pki module_utils behind keyway.ipsec.pki_key and pki_ca) are what strongSwan accepts
too, for each key type the role offers, and charon honours the CA's CRL: a certificate
Keyway revoked is refused by charon, and keywayd says so. And keywayd checks charon's
certificate with the OCSP responder it names."""

from __future__ import annotations

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from tests.fixtures.keywayd import Keywayd
from tests.fixtures.netns import udp_exchange
from tests.interop.test_keywayd_exchanges_vs_strongswan import (
    _pubkey_conns,
    _pubkey_swanctl,
    charon_ike_sas,
)
from tests.interop.test_keywayd_vs_strongswan import agree


def _issued(ca: pki.CertificateAuthority, host: str, identity: str, key_type: str):
    """A host's key and certificate as the role makes them: the key on the host, the
    request signed by the CA for the identity the inventory gives."""
    key = pki.make_key(key_type)
    cert = ca.issue(host, pki.make_csr(key, identity), identity, 365, 30)
    return key, cert


def _charon(charon_factory, a, b, ca, key_and_cert, crl: bytes, **kwargs):
    """charon on b with its key and certificate from Keyway's CA, the CA and its CRL."""
    key, cert = key_and_cert
    return charon_factory(
        b.netns,
        _pubkey_swanctl(a, b, f"{a.name}.lab", f"{b.name}.lab"),
        files={
            "x509ca/ca.pem": ca.cert_pem,
            "x509crl/ca.crl": crl,
            f"x509/{b.name}.pem": cert.pem,
            f"private/{b.name}.pem": pki.key_pem(key),
        },
        **kwargs,
    )


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa-3072"])
def test_certificates_from_keyway_s_ca_work_with_charon(
    netns_hosts, charon_factory, tmp_path, key_type
):
    a, b = netns_hosts(2).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    me, them = f"{a.name}.lab", f"{b.name}.lab"
    my_key, mine = _issued(ca, a.name, me, key_type)
    their_key, theirs = _issued(ca, b.name, them, key_type)
    crl = ca.crl(30)
    # charon signs RSA with PKCS#1 v1.5 unless told otherwise; keywayd refuses that by
    # default (RFC 8247), so the RSA case asks charon for RSASSA-PSS.
    pss = "rsa_pss = yes" if key_type.startswith("rsa") else ""
    charon = _charon(charon_factory, a, b, ca, (their_key, theirs), crl, charon_settings=pss)
    files = {"a.pem": mine.pem, "a.key": pki.key_pem(my_key), "ca.pem": ca.cert_pem,
             "ca.crl": crl}  # fmt: skip
    strict = {"crls": [str(tmp_path / "ca.crl")], "revocation": "strict"}
    conns = _pubkey_conns(a, b, "start", tmp_path, me, them, files, remote=strict)
    agent = Keywayd(a.netns, tmp_path / "a", conns)
    try:
        agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
        agree(agent, charon)
        assert f"authentication of '{me}'" in charon.log_path.read_text()
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ca") == b"ac"
    finally:
        agent.stop()


def test_charon_refuses_a_certificate_keyway_s_ca_revoked(netns_hosts, charon_factory, tmp_path):
    """The host marked compromised: its certificate is on the CA's CRL, and charon, given
    that CRL, refuses its AUTH; keywayd reports the refusal, and no SA stays anywhere."""
    a, b = netns_hosts(2).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    me, them = f"{a.name}.lab", f"{b.name}.lab"
    my_key, mine = _issued(ca, a.name, me, "ecdsa-p256")
    their_key, theirs = _issued(ca, b.name, them, "ecdsa-p256")
    assert ca.revoke(a.name, "key_compromise")
    crl = ca.crl(30, force=True)
    charon = _charon(charon_factory, a, b, ca, (their_key, theirs), crl)
    files = {"a.pem": mine.pem, "a.key": pki.key_pem(my_key), "ca.pem": ca.cert_pem}
    agent = Keywayd(
        a.netns, tmp_path / "a", _pubkey_conns(a, b, "start", tmp_path, me, them, files)
    )
    try:
        agent.wait_for(lambda: "AUTHENTICATION_FAILED" in agent.log(), "charon's refusal reported")
        log = charon.log_path.read_text()
        assert "certificate was revoked" in log, log[-3000:]
        agent.wait_for(lambda: not charon_ike_sas(charon), "no IKE SA left at charon", 10)
        assert not agent.sas("kw")
    finally:
        agent.stop()


@pytest.mark.parametrize("revoked", [False, True], ids=["good", "revoked"])
def test_charon_s_certificate_checked_by_ocsp(netns_hosts, charon_factory, tmp_path, revoked):
    """Issue 15: charon's certificate names an OCSP responder (made with cryptography, in
    its own lab namespace); keywayd asks it while IKE_AUTH waits: good, the tunnel comes
    up; revoked, charon is refused with the reason and no SA stays on either side."""
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID

    from tests.fixtures.pki import issue, make_ca
    from tests.netns.test_revocation_fetch import OCSP_RESPONDER

    a, b, responder = netns_hosts(3).hosts
    uri = f"http://{responder.ipv4}:8080/"
    aia = x509.AuthorityInformationAccess([x509.AccessDescription(
        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(uri))])  # fmt: skip
    ca = make_ca()
    me, them = f"{a.name}.lab", f"{b.name}.lab"
    mine = issue(ca, a.name, sans=[x509.DNSName(me)], key_usage="sign")
    theirs = issue(ca, b.name, sans=[x509.DNSName(them)], key_usage="sign", extra=[(aia, False)])
    www = tmp_path / "ocsp"
    www.mkdir()
    (www / "ca.pem").write_bytes(ca.pem)
    (www / "ca.key").write_bytes(ca.key_pem)
    (www / "cert-b.pem").write_bytes(theirs.pem)
    (www / "revoked").write_text(f"{theirs.cert.serial_number:x}\n" if revoked else "")
    server = subprocess.Popen(
        ["ip", "netns", "exec", responder.netns, sys.executable, "-c", OCSP_RESPONDER,
         responder.ipv4, "8080", str(www)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    agent = None
    try:
        assert server.stdout.readline().strip() == "ready"
        charon = charon_factory(
            b.netns,
            _pubkey_swanctl(a, b, me, them),
            files={
                "x509ca/ca.pem": ca.pem,
                f"x509/{b.name}.pem": theirs.pem,
                f"private/{b.name}.pem": theirs.key_pem,
            },
        )
        files = {"a.pem": mine.pem, "a.key": mine.key_pem, "ca.pem": ca.pem}
        conns = _pubkey_conns(a, b, "start", tmp_path, me, them, files,
                              remote={"revocation": "strict"})  # fmt: skip
        agent = Keywayd(a.netns, tmp_path / "a", conns)
        agent.wait_for(lambda: f"IKE_AUTH waits on OCSP at {uri}" in agent.log(), "waits")
        if revoked:
            agent.wait_for(lambda: "(OCSP, " in agent.log(), "charon refused")
            assert "(key_compromise)" in agent.log()
            agent.wait_for(lambda: not charon_ike_sas(charon), "no IKE SA left at charon", 10)
            assert not agent.sas("kw")
        else:
            agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
            agree(agent, charon)
    finally:
        if agent is not None:
            agent.stop()
        server.kill()
        server.wait()
