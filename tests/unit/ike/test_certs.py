"""Certificate path validation for IKE (issue 15): keywayd's own, for IPsec (RFC 4945),
instead of cryptography's web-PKI verifier, which refused Ed25519 and Ed448 keys and
user@FQDN identities. Each refusal says why."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
    ObjectIdentifier,
)

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import certs
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.crypto import IkeCryptoError
from tests.fixtures.pki import issue

SERVER = [ExtendedKeyUsageOID.SERVER_AUTH]


def dns(name: str) -> list:
    return [x509.DNSName(name)]


def root(key=None, **kw):
    return issue(None, "Root CA", key, ca=True, key_usage="ca", **kw)


def verify(leaf, *intermediates, anchors, identity="moon.lab"):
    chain = [leaf.der, *(c.der for c in intermediates)]
    return certs.verify_peer(chain, [a.cert for a in anchors], identity)


def refused(leaf, *intermediates, anchors, identity="moon.lab") -> str:
    with pytest.raises(IkeCryptoError) as failed:
        verify(leaf, *intermediates, anchors=anchors, identity=identity)
    return str(failed.value)


def test_a_chain_through_an_intermediate_the_peer_sends():
    ca = root()
    sub = issue(ca, "Sub CA", ca=True, key_usage="ca")
    leaf = issue(sub, "moon", sans=dns("moon.lab"), key_usage="sign", eku=SERVER)
    key = verify(leaf, sub, anchors=[ca])
    assert key.public_numbers() == leaf.key.public_key().public_numbers()
    assert "not by a configured CA nor a certificate the peer sent" in refused(leaf, anchors=[ca])


@pytest.mark.parametrize(
    "make_key",
    [ed25519.Ed25519PrivateKey.generate, ed448.Ed448PrivateKey.generate,
     lambda: ec.generate_private_key(ec.SECP384R1())],
    ids=["ed25519", "ed448", "ecdsa-p384"],
)  # fmt: skip
def test_ed25519_ed448_and_ecdsa_chains_verify(make_key):
    ca = root(make_key())
    leaf = issue(ca, "moon", make_key(), sans=dns("moon.lab"), key_usage="sign")
    assert type(verify(leaf, anchors=[ca])) is type(leaf.key.public_key())


@pytest.mark.skipif(
    not hasattr(x509.Certificate, "signature_algorithm_parameters"),
    reason="cryptography 41 or newer tells a certificate's PSS parameters",
)
def test_a_certificate_signed_with_rsassa_pss():
    ca = root(rsa.generate_private_key(65537, 2048))
    leaf = issue(ca, "moon", sans=dns("moon.lab"), pss=True)
    verify(leaf, anchors=[ca])


@pytest.mark.parametrize(
    ("identity", "san", "matches"),
    [
        ("carol@moon.lab", x509.RFC822Name("carol@moon.lab"), True),
        ("carol@MOON.lab", x509.RFC822Name("carol@moon.lab"), True),  # the domain's case
        ("dave@moon.lab", x509.RFC822Name("carol@moon.lab"), False),
        ("192.0.2.7", x509.IPAddress(ipaddress.ip_address("192.0.2.7")), True),
        ("2001:db8::7", x509.IPAddress(ipaddress.ip_address("2001:db8::7")), True),
        ("192.0.2.8", x509.IPAddress(ipaddress.ip_address("192.0.2.7")), False),
        ("Moon.Lab", x509.DNSName("moon.lab"), True),
        ("carol@moon.lab", x509.DNSName("moon.lab"), False),
        ("moon.lab", x509.RFC822Name("moon@moon.lab"), False),
    ],
)
def test_identities_match_the_subject_alt_names(identity, san, matches):
    ca = root()
    leaf = issue(ca, "moon", sans=[san])
    if matches:
        verify(leaf, anchors=[ca], identity=identity)
    else:
        assert f"does not verify for identity {identity!r}: not among its subjectAltNames" in (
            refused(leaf, anchors=[ca], identity=identity)
        )


def _forged():
    """A leaf naming the CA as issuer, signed by another key."""
    ca, impostor = root(), root()
    return issue(impostor, "moon", sans=dns("moon.lab")), ca


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired 20"),
        ("not yet valid", "is not valid before 20"),
        ("unknown CA", "is issued by 'CN=Root CA,O=Keyway tests', not by a configured CA"),
        ("forged signature", "not by a configured CA nor a certificate the peer sent"),
        ("issuer not a CA", "'CN=Sub CA,O=Keyway tests' is not a CA (no basicConstraints)"),
        ("path length", "'CN=Root CA,O=Keyway tests' allows 0 CA(s) below it, not 1"),
        ("CA without keyCertSign", "may not sign certificates (keyUsage without keyCertSign)"),
        ("email EKU", "its extendedKeyUsage (emailProtection) names neither ipsecIKE"),
        ("encipher only", "its keyUsage allows no signature"),
        ("unknown critical", "has a critical extension not handled: 1.3.6.1.4.1.99999.1"),
        ("name constraints", "names 'moon.lab', outside the name constraints of 'CN=Sub CA"),
    ],
)
def test_a_path_that_does_not_validate_is_refused_with_the_reason(case, reason):
    ca = root()
    chain = []
    if case == "expired":
        leaf = issue(ca, "moon", sans=dns("moon.lab"), valid_days=(-30, -1))
    elif case == "not yet valid":
        leaf = issue(ca, "moon", sans=dns("moon.lab"), valid_days=(1, 30))
    elif case == "unknown CA":
        leaf = issue(root(), "moon", sans=dns("moon.lab"))
    elif case == "forged signature":
        leaf, ca = _forged()
    elif case == "issuer not a CA":
        sub = issue(ca, "Sub CA")
        leaf, chain = issue(sub, "moon", sans=dns("moon.lab")), [sub]
    elif case == "path length":
        ca = root(path_length=0)
        sub = issue(ca, "Sub CA", ca=True, key_usage="ca")
        leaf, chain = issue(sub, "moon", sans=dns("moon.lab")), [sub]
    elif case == "CA without keyCertSign":
        sub = issue(ca, "Sub CA", ca=True, key_usage="sign")
        leaf, chain = issue(sub, "moon", sans=dns("moon.lab")), [sub]
    elif case == "email EKU":
        eku = [ExtendedKeyUsageOID.EMAIL_PROTECTION]
        leaf = issue(ca, "moon", sans=dns("moon.lab"), eku=eku)
    elif case == "encipher only":
        leaf = issue(ca, "moon", sans=dns("moon.lab"), key_usage="encipher")
    elif case == "unknown critical":
        odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
        leaf = issue(ca, "moon", sans=dns("moon.lab"), extra=[(odd, True)])
    else:
        limits = x509.NameConstraints([x509.DNSName("sun.lab")], None)
        sub = issue(ca, "Sub CA", ca=True, key_usage="ca", extra=[(limits, True)])
        leaf, chain = issue(sub, "moon", sans=dns("moon.lab")), [sub]
    said = refused(leaf, *chain, anchors=[ca])
    assert said.startswith("certificate of 'CN=moon,O=Keyway tests' does not verify: "), said
    assert reason in said, said


def test_ipsec_ike_and_any_purpose_ekus_are_accepted_and_a_time_is_checked_as_given():
    ca = root()
    for eku in ([certs.IPSEC_IKE], [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]):
        verify(issue(ca, "moon", sans=dns("moon.lab"), eku=eku), anchors=[ca])
    leaf = issue(ca, "moon", sans=dns("moon.lab"))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60)
    with pytest.raises(IkeCryptoError, match="expired"):
        certs.verify_peer([leaf.der], [ca.cert], "moon.lab", later)


def crl_of(ca, revoked=(), days=(-1, 7), reason=None):
    """A CRL `ca` signs, listing `revoked` certificates, current over `days`."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now + datetime.timedelta(days=days[0]))
        .next_update(now + datetime.timedelta(days=days[1]))
    )
    for cert in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.cert.serial_number)
            .revocation_date(now - datetime.timedelta(hours=1))
        )
        if reason:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


CDP = x509.CRLDistributionPoints(
    [x509.DistributionPoint([x509.UniformResourceIdentifier("http://ca.lab/ca.crl")],
                            None, None, None)]
)  # fmt: skip


@pytest.mark.parametrize("policy", ["strict", "ifuri", "relaxed"])
def test_a_revoked_certificate_is_refused_under_every_policy(policy):
    ca = root()
    sub = issue(ca, "Sub CA", ca=True, key_usage="ca")
    leaf = issue(sub, "moon", sans=dns("moon.lab"))
    good = (crl_of(ca), crl_of(sub))
    certs.verify_peer([leaf.der, sub.der], [ca.cert], "moon.lab", crls=good, revocation=policy)
    revoked = (crl_of(ca), crl_of(sub, [leaf], reason=x509.ReasonFlags.key_compromise))
    with pytest.raises(IkeCryptoError, match=r"'CN=moon,O=Keyway tests' is revoked since .* "
                                             r"\(key_compromise\)"):  # fmt: skip
        certs.verify_peer([leaf.der, sub.der], [ca.cert], "moon.lab", crls=revoked,
                          revocation=policy)  # fmt: skip
    revoked_sub = (crl_of(ca, [sub]), crl_of(sub))
    with pytest.raises(IkeCryptoError, match="'CN=Sub CA,O=Keyway tests' is revoked since"):
        certs.verify_peer([leaf.der, sub.der], [ca.cert], "moon.lab", crls=revoked_sub,
                          revocation=policy)  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "crls", "cdp", "refusal"),
    [
        ("strict", "none", False, "no current CRL of 'CN=Root CA,O=Keyway tests'"),
        ("strict", "stale", False, "(revocation: strict)"),
        ("strict", "forged", False, "(revocation: strict)"),  # not signed by the CA: unused
        ("ifuri", "none", True, "names a CRL distribution point or an OCSP responder, and"),
        ("ifuri", "none", False, None),
        ("ifuri", "current", True, None),
        ("relaxed", "none", True, None),
        ("relaxed", "stale", True, None),
    ],
)
def test_without_a_current_crl_the_policy_decides(policy, crls, cdp, refusal):
    ca = root()
    leaf = issue(ca, "moon", sans=dns("moon.lab"), extra=[(CDP, False)] if cdp else None)
    at_hand = {
        "none": (),
        "stale": (crl_of(ca, days=(-10, -1)),),
        "forged": (crl_of(root()),),
        "current": (crl_of(ca),),
    }[crls]
    if refusal is None:
        certs.verify_peer([leaf.der], [ca.cert], "moon.lab", crls=at_hand, revocation=policy)
    else:
        with pytest.raises(IkeCryptoError) as failed:
            certs.verify_peer([leaf.der], [ca.cert], "moon.lab", crls=at_hand,
                              revocation=policy)  # fmt: skip
        assert refusal in str(failed.value)


@pytest.mark.parametrize("policy", ["strict", "ifuri", "relaxed"])
def test_a_distribution_point_s_crl_is_fetched_first_then_decides(policy):
    """Issue 15: a certificate naming a CRL distribution point, with no current CRL at
    hand: the exchange waits (RevocationPending) until keywayd has fetched it; then
    that CRL revokes or clears the certificate whatever the policy, and a distribution
    point that could not be fetched leaves the decision to the policy, for a while."""
    ca = root()
    leaf = issue(ca, "moon", sans=dns("moon.lab"), extra=[(CDP, False)])
    other = issue(ca, "sun", sans=dns("sun.lab"), extra=[(CDP, False)])
    cache = certs.RevocationCache()

    def check(name, leaf, clock=0.0):
        certs.verify_peer([leaf.der], [ca.cert], name, crls=(), revocation=policy,
                          fetched=(cache, clock))  # fmt: skip

    with pytest.raises(certs.RevocationPending) as pending:
        check("moon.lab", leaf)
    assert pending.value.uris == ("http://ca.lab/ca.crl",)
    cache.store("http://ca.lab/ca.crl", crl_of(ca, [leaf]))
    with pytest.raises(IkeCryptoError, match="is revoked since"):
        check("moon.lab", leaf)
    check("sun.lab", other)  # the same CRL clears the other certificate
    cache = certs.RevocationCache()
    cache.fail("http://ca.lab/ca.crl", 100.0)
    if policy == "relaxed":
        check("sun.lab", other, 100.0 + certs.CRL_FETCH_RETRY - 1)
    else:
        with pytest.raises(IkeCryptoError, match=f"revocation: {policy}"):
            check("sun.lab", other, 100.0 + certs.CRL_FETCH_RETRY - 1)
    with pytest.raises(certs.RevocationPending):  # asked again once the retry is due
        check("sun.lab", other, 100.0 + certs.CRL_FETCH_RETRY)


def test_a_configured_crl_that_revokes_needs_no_fetch():
    ca = root()
    leaf = issue(ca, "moon", sans=dns("moon.lab"), extra=[(CDP, False)])
    with pytest.raises(IkeCryptoError, match="is revoked since"):
        certs.verify_peer([leaf.der], [ca.cert], "moon.lab", crls=(crl_of(ca, [leaf]),),
                          revocation="strict", fetched=(certs.RevocationCache(), 0.0))  # fmt: skip
    assert certs.distribution_points(leaf.cert) == ["http://ca.lab/ca.crl"]


AIA = x509.AuthorityInformationAccess(
    [x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier("http://ocsp.lab/"))]
)  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ("good", None),
        ("revoked", "is revoked since .* \\(key_compromise\\) \\(OCSP, http://ocsp.lab/\\)"),
        ("unknown", "revocation: strict"),  # tells nothing: CRLs and the policy decide
        ("stale", "revocation: strict"),
        ("forged", "revocation: strict"),  # signed by another CA's key
        ("delegated", None),  # a responder certificate the CA gave OCSPSigning
        ("undelegated", "revocation: strict"),  # one without OCSPSigning
    ],
)
def test_an_ocsp_responder_the_certificate_names_is_asked_first(answer, outcome):
    """Issue 15: OCSP. The certificate's authorityInfoAccess names a responder: IKE_AUTH
    waits for its answer (RevocationPending with the request to POST), which decides when
    it is signed by the CA (or a responder it delegated to), about this certificate, and
    current; an answer that tells nothing leaves CRLs and the policy to decide."""
    from cryptography.x509 import ocsp

    from tests.fixtures.pki import ocsp_response

    ca = root()
    leaf = issue(ca, "moon", sans=dns("moon.lab"), extra=[(AIA, False)])
    cache = certs.RevocationCache()

    def check():
        certs.verify_peer([leaf.der], [ca.cert], "moon.lab", revocation="strict",
                          fetched=(cache, 0.0))  # fmt: skip

    with pytest.raises(certs.RevocationPending) as pending:
        check()
    (fetch,) = pending.value.fetches
    assert (fetch.uri, fetch.serial) == ("http://ocsp.lab/", leaf.cert.serial_number)
    assert ocsp.load_der_ocsp_request(fetch.body).serial_number == leaf.cert.serial_number
    signer, extra = None, None
    if answer in ("delegated", "undelegated"):
        eku = [ExtendedKeyUsageOID.OCSP_SIGNING] if answer == "delegated" else None
        signer = issue(ca, "OCSP responder", key_usage="sign", eku=eku)
        extra = [signer.cert]
    if answer == "forged":
        signer = root()
    status = answer if answer in ("good", "revoked", "unknown") else "good"
    days = (-10, -2) if answer == "stale" else (0, 1)
    der = ocsp_response(ca, leaf.cert, status, signer=signer, days=days, responder_certs=extra)
    cache.store_ocsp(fetch, ocsp.load_der_ocsp_response(der))
    if outcome is None:
        check()
    else:
        with pytest.raises(IkeCryptoError, match=outcome):
            check()


def test_a_stale_crl_still_revokes():
    ca = root()
    leaf = issue(ca, "moon", sans=dns("moon.lab"))
    stale = (crl_of(ca, [leaf], days=(-10, -1)),)
    with pytest.raises(IkeCryptoError, match="is revoked since"):
        certs.verify_peer([leaf.der], [ca.cert], "moon.lab", crls=stale, revocation="relaxed")


def _constrained(permitted=None, excluded=None):
    ca = root()
    limits = x509.NameConstraints(permitted, excluded)
    return ca, issue(ca, "Sub CA", ca=True, key_usage="ca", extra=[(limits, True)])


@pytest.mark.parametrize(
    ("permitted", "excluded", "san", "inside"),
    [
        ([x509.DNSName("lab")], None, x509.DNSName("moon.lab"), True),
        ([x509.DNSName("lab")], None, x509.DNSName("moonlab"), False),  # not a subdomain
        ([x509.DNSName(".moon.lab")], None, x509.DNSName("moon.lab"), False),  # below only
        (None, [x509.DNSName("sun.lab")], x509.DNSName("a.sun.lab"), False),
        ([x509.RFC822Name("moon.lab")], None, x509.RFC822Name("carol@moon.lab"), True),
        ([x509.RFC822Name("dave@moon.lab")], None, x509.RFC822Name("carol@moon.lab"), False),
        ([x509.IPAddress(ipaddress.ip_network("192.0.2.0/24"))], None,
         x509.IPAddress(ipaddress.ip_address("192.0.2.7")), True),
        (None, [x509.IPAddress(ipaddress.ip_network("192.0.2.0/28"))],
         x509.IPAddress(ipaddress.ip_address("192.0.2.7")), False),
        ([x509.DNSName("lab")], None, x509.IPAddress(ipaddress.ip_address("192.0.2.7")), True),
    ],
)  # fmt: skip
def test_name_constraints_of_a_ca_hold_below_it(permitted, excluded, san, inside):
    """RFC 5280 4.2.1.10: a subtree of the names' kind must hold each, no excluded one
    any; a kind the constraints do not name is free."""
    ca, sub = _constrained(permitted, excluded)
    leaf = issue(sub, "moon", sans=[san])
    identity = str(san.value)
    if inside:
        verify(leaf, sub, anchors=[ca], identity=identity)
    else:
        assert "outside the name constraints of 'CN=Sub CA" in refused(
            leaf, sub, anchors=[ca], identity=identity
        )


def test_a_directory_name_constraint_binds_the_subject():
    organization = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Keyway tests")])
    ca, sub = _constrained([x509.DirectoryName(organization)])
    verify(issue(sub, "moon", sans=dns("moon.lab")), sub, anchors=[ca])
    elsewhere = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Other")])
    ca, sub = _constrained([x509.DirectoryName(elsewhere)])
    assert "names 'O=Keyway tests, CN=moon', outside the name constraints" in refused(
        issue(sub, "moon", sans=dns("moon.lab")), sub, anchors=[ca]
    )
