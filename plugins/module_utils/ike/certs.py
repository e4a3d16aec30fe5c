"""X.509 for IKE_AUTH: the peer's chain verified against configured CAs, its identity
matched to the certificate's subjectAltName, and the CERT/CERTREQ payload data.

verify_peer(cert_payload_ders, ca_certs, identity, when) -> the leaf's public key, or
IkeCryptoError(AUTHENTICATION_FAILED) saying why. Path validation is `cryptography`'s
RFC 5280 verifier (the web PKI profile: the leaf needs SAN and serverAuth, as strongSwan's
`pki --flag serverAuth` certificates have). Identities: FQDN (SAN dNSName) and IP
addresses (SAN iPAddress).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization

try:
    from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store
except ImportError:  # cryptography < 42 (Debian 12 ships 38): no path validation
    import cryptography

    PATH_VALIDATION_MISSING: str | None = (
        "verifying a peer's certificate chain needs the Python package cryptography 42 or "
        f"newer (this host has {cryptography.__version__})"
    )
else:
    PATH_VALIDATION_MISSING = None

from .constants import NotifyType
from .crypto import IkeCryptoError

X509_SIGNATURE = 4  # CERT encoding "X.509 Certificate - Signature"


def load_certificates(pem_or_der: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN" in pem_or_der:
        return x509.load_pem_x509_certificates(pem_or_der)
    return [x509.load_der_x509_certificate(pem_or_der)]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certreq_data(ca_certs: list[x509.Certificate]) -> bytes:
    """CERTREQ data: SHA-1 hashes of the CAs' SubjectPublicKeyInfo (RFC 7296 3.7)."""
    return b"".join(
        hashlib.sha1(
            ca.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
        for ca in ca_certs
    )


def verify_peer(
    chain_ders: list[bytes],
    ca_certs: list[x509.Certificate],
    identity: str,
    when: datetime.datetime | None = None,
):
    """The verified leaf's public key; AUTHENTICATION_FAILED with the reason otherwise."""
    fail = NotifyType.AUTHENTICATION_FAILED
    if not chain_ders:
        raise IkeCryptoError("peer sent no certificate", fail)
    if not ca_certs:
        raise IkeCryptoError("no CA configured to verify the peer's certificate", fail)
    if PATH_VALIDATION_MISSING:
        raise IkeCryptoError(PATH_VALIDATION_MISSING, fail)
    try:
        leaf, *intermediates = (x509.load_der_x509_certificate(d) for d in chain_ders)
    except ValueError as exc:
        raise IkeCryptoError(f"peer certificate does not parse: {exc}", fail) from None
    try:
        subject = IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        subject = DNSName(identity)
    builder = (
        PolicyBuilder().store(Store(ca_certs)).time(when or datetime.datetime.now(datetime.UTC))
    )
    try:
        builder.build_server_verifier(subject).verify(leaf, intermediates)
    except Exception as exc:  # VerificationError and malformed-extension errors alike
        raise IkeCryptoError(
            f"certificate of {leaf.subject.rfc4514_string()!r} does not verify for identity "
            f"{identity!r}: {exc}",
            fail,
        ) from None
    return leaf.public_key()
