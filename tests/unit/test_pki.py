"""Keyway's CA (issue 15, the Ansible half): what it issues verifies with keywayd's own
path validation, for each identity type; it renews only when due, revokes into a CRL
keywayd refuses, and keeps its key to its owner."""

from __future__ import annotations

import datetime
import stat

import pytest
from cryptography import x509

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from ansible_collections.keyway.ipsec.plugins.module_utils.ike import certs
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.crypto import IkeCryptoError

NOW = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.UTC)


def _ca(tmp_path, now=NOW) -> pki.CertificateAuthority:
    ca = pki.CertificateAuthority(tmp_path / "ca", now=now)
    if not ca.exists:
        ca.create("Keyway test CA", valid_days=3650)
        ca.save()
    return ca


def _der(pem: bytes) -> bytes:
    return certs.der(x509.load_pem_x509_certificate(pem))


@pytest.mark.parametrize(
    "identity",
    ["h1.lab", "192.0.2.11", "2001:db8::11", "ops@h1.lab", "CN=h1, O=Keyway"],
)
@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa-3072"])
def test_an_issued_certificate_verifies_for_its_identity_only(tmp_path, identity, key_type):
    ca = _ca(tmp_path)
    key = pki.make_key(key_type)
    issued = ca.issue("h1", pki.make_csr(key, identity), identity, 365, 30)
    anchors = [x509.load_pem_x509_certificate(ca.cert_pem)]
    public = certs.verify_peer([_der(issued.pem)], anchors, identity, when=NOW)
    assert pki.public_key_id(public) == pki.public_key_id(key.public_key())
    with pytest.raises(IkeCryptoError, match="does not verify for identity"):
        certs.verify_peer([_der(issued.pem)], anchors, "h2.lab", when=NOW)


def test_a_key_id_identity_is_refused_with_the_reason(tmp_path):
    with pytest.raises(pki.PkiError, match="KEY_ID names a key"):
        pki.make_csr(pki.make_key(), "@#0a0b0c")


def test_the_same_request_gets_the_same_certificate_until_renewal_is_due(tmp_path):
    ca = _ca(tmp_path)
    csr = pki.make_csr(pki.make_key(), "h1.lab")
    first = ca.issue("h1", csr, "h1.lab", 90, 30)
    ca.save()
    assert first.changed
    again = pki.CertificateAuthority(tmp_path / "ca", now=NOW + datetime.timedelta(days=59))
    same = again.issue("h1", csr, "h1.lab", 90, 30)
    assert not same.changed and same.pem == first.pem and not again.changes
    due = pki.CertificateAuthority(tmp_path / "ca", now=NOW + datetime.timedelta(days=61))
    renewed = due.issue("h1", csr, "h1.lab", 90, 30)
    assert renewed.changed and renewed.serial != first.serial
    assert due.changes == [f"h1: certificate renewed (serial {renewed.serial:x})"]


def test_a_new_key_or_identity_gets_a_new_certificate(tmp_path):
    ca = _ca(tmp_path)
    key = pki.make_key()
    first = ca.issue("h1", pki.make_csr(key, "h1.lab"), "h1.lab", 90, 30)
    other_key = ca.issue("h1", pki.make_csr(pki.make_key(), "h1.lab"), "h1.lab", 90, 30)
    other_id = ca.issue("h1", pki.make_csr(key, "h1.example"), "h1.example", 90, 30)
    assert len({first.serial, other_key.serial, other_id.serial}) == 3


def test_a_request_with_a_broken_signature_is_refused(tmp_path):
    ca = _ca(tmp_path)
    csr = bytearray(x509.load_pem_x509_csr(pki.make_csr(pki.make_key(), "h1.lab")).public_bytes(
        pki.serialization.Encoding.DER
    ))  # fmt: skip
    csr[-5] ^= 0xFF  # inside the signature
    pem = x509.load_der_x509_csr(bytes(csr)).public_bytes(pki.serialization.Encoding.PEM)
    with pytest.raises(pki.PkiError, match="signature is invalid"):
        ca.issue("h1", pem, "h1.lab", 90, 30)


def test_a_revoked_certificate_is_in_the_crl_and_refused_by_keywayd(tmp_path):
    ca = _ca(tmp_path)
    issued = {
        host: ca.issue(host, pki.make_csr(pki.make_key(), f"{host}.lab"), f"{host}.lab", 90, 30)
        for host in ("h1", "h2")
    }
    crl_before = ca.crl(30)
    assert ca.revoke("h2", "key_compromise") and not ca.revoke("h2", "key_compromise")
    crl = ca.crl(30, force=True)
    ca.save()
    assert crl != crl_before
    loaded = x509.load_pem_x509_crl(crl)
    assert [r.serial_number for r in loaded] == [issued["h2"].serial]
    anchors = [x509.load_pem_x509_certificate(ca.cert_pem)]
    crls = (certs.load_crl(crl),)
    certs.verify_peer([_der(issued["h1"].pem)], anchors, "h1.lab", when=NOW, crls=crls)
    with pytest.raises(IkeCryptoError, match="revoked"):
        certs.verify_peer([_der(issued["h2"].pem)], anchors, "h2.lab", when=NOW, crls=crls)
    # A revoked host's request is never served by its revoked certificate.
    again = pki.CertificateAuthority(tmp_path / "ca", now=NOW)
    assert again.revoked_hosts() == {"h2"}


def test_the_crl_is_signed_again_only_when_half_its_validity_is_gone(tmp_path):
    ca = _ca(tmp_path)
    first = ca.crl(30)
    ca.save()
    later = pki.CertificateAuthority(tmp_path / "ca", now=NOW + datetime.timedelta(days=14))
    assert later.crl(30) == first
    due = pki.CertificateAuthority(tmp_path / "ca", now=NOW + datetime.timedelta(days=16))
    assert due.crl(30) != first and due.index["crl_number"] == 2


def test_the_ca_key_is_its_owner_s_alone(tmp_path):
    ca = _ca(tmp_path)
    key_file = tmp_path / "ca" / "ca.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in ca.cert_pem
    key_file.chmod(0o644)
    with pytest.raises(pki.PkiError, match="chmod 600"):
        pki.CertificateAuthority(tmp_path / "ca")


@pytest.mark.parametrize("module", ["pki_key", "pki_ca"])
def test_the_modules_say_cryptography_is_missing(monkeypatch, module, tmp_path):
    import importlib

    from tests.fixtures.ansible import run_module

    main = importlib.import_module(f"ansible_collections.keyway.ipsec.plugins.modules.{module}")
    monkeypatch.setattr(pki, "HAS_CRYPTOGRAPHY", False)
    args = {"path": str(tmp_path / "x"), "identity": "h1", "identities": {}}
    if module == "pki_key":
        args.pop("identities")
    else:
        args.pop("identity")
    result = run_module(main.main, args)
    assert (
        result["failed"]
        and "Failed to import the required Python library (cryptography" in (result["msg"])
    )
    assert not (tmp_path / "x").exists()


def test_a_crl_uri_is_the_certificates_distribution_point_and_renews_them(tmp_path):
    ca = _ca(tmp_path)
    csr = pki.make_csr(pki.make_key(), "h1.lab")
    plain = ca.issue("h1", csr, "h1.lab", 365, 30)
    named = ca.issue("h1", csr, "h1.lab", 365, 30, crl_uri="http://pki.lab/keyway.crl")
    assert named.changed and named.serial != plain.serial  # a new URI renews
    assert not ca.issue("h1", csr, "h1.lab", 365, 30, crl_uri="http://pki.lab/keyway.crl").changed
    cert = x509.load_pem_x509_certificate(named.pem)
    assert certs.distribution_points(cert) == ["http://pki.lab/keyway.crl"]
    assert certs.distribution_points(x509.load_pem_x509_certificate(plain.pem)) == []


def test_a_key_revoked_as_compromised_is_never_certified_again(tmp_path):
    ca = _ca(tmp_path)
    key = pki.make_key()
    ca.issue("h3", pki.make_csr(key, "h3.lab"), "h3.lab", 365, 30)
    assert ca.revoke("h3", "key_compromise")
    with pytest.raises(pki.PkiError, match="its key was revoked as compromised"):
        ca.issue("h3", pki.make_csr(key, "h3.lab"), "h3.lab", 365, 30)
    # A new key is certified; a key retired with its host (cessation) is not refused.
    assert ca.issue("h3", pki.make_csr(pki.make_key(), "h3.lab"), "h3.lab", 365, 30).changed
    other = pki.make_key()
    ca.issue("h4", pki.make_csr(other, "h4.lab"), "h4.lab", 365, 30)
    ca.revoke("h4", "cessation_of_operation")
    assert ca.issue("h4", pki.make_csr(other, "h4.lab"), "h4.lab", 365, 30).changed
