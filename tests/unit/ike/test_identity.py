"""Distinguished names as IKE identities (issue 15): written as strongSwan writes them,
sent as DER (ID_DER_ASN1_DN), compared in one canonical spelling, matched to the
certificate's subject. keywayd sent a DN as an FQDN before."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec, identity
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import IdType
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import encode_id
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import AuthFailed
from tests.fixtures.pki import issue
from tests.unit.engine.test_establish import A, B, cert_pair, of


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("C=CH, O=Keyway, CN=moon", "C=CH, O=Keyway, CN=moon"),
        ("c=CH,o=Keyway,cn=moon", "C=CH, O=Keyway, CN=moon"),
        ("O=Keyway\\, tests, emailAddress=carol@moon.lab", "O=Keyway\\, tests, E=carol@moon.lab"),
        ("2.5.4.10=Keyway, CN=moon", "O=Keyway, CN=moon"),
        ("moon.lab", "moon.lab"),  # not a DN: as it is
        ("carol@moon.lab", "carol@moon.lab"),
    ],
)
def test_one_spelling_of_a_dn(written, canonical):
    assert identity.canonical(written) == canonical


@pytest.mark.parametrize(
    ("written", "said"),
    [("C=CH, XX=moon", "unknown attribute 'XX'"), ("C=CH, CN", "'CN' is not attribute=value")],
)
def test_a_dn_that_cannot_be_read_says_why(written, said):
    with pytest.raises(identity.IdentityError, match=said):
        identity.canonical(written)


def test_a_dn_travels_as_der_and_reads_back_the_same():
    kind, data = encode_id("C=CH, O=Keyway\\, tests, CN=moon")
    assert kind == IdType.DER_ASN1_DN
    assert data == x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Keyway, tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, "moon"),
    ]).public_bytes()  # fmt: skip
    assert codec.IDi(kind, data).to_text() == "C=CH, O=Keyway\\, tests, CN=moon"
    assert codec.IDi(kind, data[:-3]).to_text() == data[:-3].hex()  # malformed: in hex


def test_a_dn_identity_is_matched_to_the_certificate_subject():
    ca = issue(None, "Root CA", ca=True, key_usage="ca")
    leaf = issue(ca, "h1")  # subject O=Keyway tests, CN=h1; no subjectAltName
    pair = cert_pair(ca, ca, leaf, issue(ca, "h2"),
                     ids=("O=Keyway tests, CN=h1", "O=Keyway tests, CN=h2"))  # fmt: skip
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert pair.b.sas()[0].remote_id == "O=Keyway tests, CN=h1"
    assert pair.a.sas()[0].remote_id == "O=Keyway tests, CN=h2"
    assert pair.a.sas()[0].children and pair.b.sas()[0].children
    wrong = cert_pair(ca, ca, leaf, issue(ca, "h2"),
                      ids=("O=Keyway tests, CN=h9", "O=Keyway tests, CN=h2"))  # fmt: skip
    wrong.a.initiate("h1-h2", 0.0)
    wrong.pump()
    (failed,) = of(wrong.events[B], AuthFailed)
    assert (
        "does not verify for identity 'O=Keyway tests, CN=h9': not its subject "
        "(O=Keyway tests, CN=h1)"
    ) in failed.reason
    assert of(wrong.events[A], AuthFailed)


@pytest.mark.parametrize(
    ("written", "canonical", "encoded"),
    [
        ("@#4A:5b:01", "@#4a5b01", (IdType.KEY_ID, b"\x4a\x5b\x01")),
        ("@moon.lab", "moon.lab", (IdType.FQDN, b"moon.lab")),  # strongSwan's forced FQDN
        ("moon.lab", "moon.lab", (IdType.FQDN, b"moon.lab")),
        ("carol@moon.lab", "carol@moon.lab", (IdType.RFC822_ADDR, b"carol@moon.lab")),
    ],
)
def test_key_ids_and_forced_fqdns_as_strongswan_writes_them(written, canonical, encoded):
    assert identity.canonical(written) == canonical
    assert encode_id(written) == encoded
    assert codec.IDi(*encoded).to_text() == canonical


@pytest.mark.parametrize("written", ["@#", "@#xyz"])
def test_a_key_id_that_is_not_hex_says_so(written):
    with pytest.raises(identity.IdentityError, match="KEY_ID"):
        identity.canonical(written)


def test_a_key_id_identity_is_matched_to_the_certificate_s_key():
    ca = issue(None, "Root CA", ca=True, key_usage="ca")
    leaf = issue(ca, "h1")
    digest = x509.SubjectKeyIdentifier.from_public_key(leaf.key.public_key()).digest
    key_id = identity.key_id_text(digest)
    pair = cert_pair(ca, ca, leaf, issue(ca, "h2", sans=[x509.DNSName("h2.lab")]),
                     ids=(key_id, "h2.lab"))  # fmt: skip
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    assert pair.b.sas()[0].remote_id == key_id and pair.b.sas()[0].children
    other = identity.key_id_text(bytes(20))
    wrong = cert_pair(ca, ca, leaf, issue(ca, "h2", sans=[x509.DNSName("h2.lab")]),
                      ids=(other, "h2.lab"))  # fmt: skip
    wrong.a.initiate("h1-h2", 0.0)
    wrong.pump()
    (failed,) = of(wrong.events[B], AuthFailed)
    assert f"does not verify for identity {other!r}: not its key's identifier ({key_id})" in (
        failed.reason
    )
