"""X.509 for IKE_AUTH: the peer's chain verified against configured CAs, its identity
matched to the certificate, and the CERT/CERTREQ payload data.

verify_peer(cert_payload_ders, ca_certs, identity, when) -> the leaf's public key, or
IkeCryptoError(AUTHENTICATION_FAILED) saying why.

The path is validated here, for IPsec (RFC 4945), not with cryptography's web-PKI
verifier, whose profile refused certificates IPsec peers use (Ed25519 and Ed448 keys, a
user@FQDN identity) and needed cryptography 42. From the leaf up to a configured CA:
each certificate valid at `when`, signed by the next (RSA PKCS#1 v1.5 or PSS, ECDSA,
Ed25519, Ed448), each issuer a CA (basicConstraints, its pathLenConstraint, keyUsage
keyCertSign when keyUsage is present), no critical extension left unhandled; the leaf's
keyUsage, when present, allows signatures, and its extendedKeyUsage, when present,
names IKE (id-kp-ipsecIKE), anyExtendedKeyUsage, serverAuth or clientAuth (what IPsec
deployments issue: strongSwan's `pki --flag serverAuth`, Windows' clients); a CA's
name constraints (RFC 5280 4.2.1.10: DNS names, mailboxes, addresses, DNs) hold for
every certificate below it; CRLs the configuration names, and those a certificate's
distribution points serve and what its OCSP responders answer (fetched by keywayd, see
`RevocationCache`), as the revocation policy says.
Identities: IPv4/IPv6 (SAN iPAddress), FQDN (SAN dNSName), user@FQDN (SAN rfc822Name),
a DN (the subject), a KEY_ID (the key's identifier). Not done: policies.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    ObjectIdentifier,
)

from . import identity as ids
from .constants import NotifyType
from .crypto import IkeCryptoError

X509_SIGNATURE = 4  # CERT encoding "X.509 Certificate - Signature"
# Seconds a distribution point that could not be fetched is not asked again: meanwhile
# the revocation policy decides as if it had no CRL (strongSwan's relaxed accepts).
CRL_FETCH_RETRY = 60.0
MAX_PATH = 8  # certificates from the leaf to the CA, at most
RSASSA_PSS = ObjectIdentifier("1.2.840.113549.1.1.10")
IPSEC_IKE = ObjectIdentifier("1.3.6.1.5.5.7.3.17")  # id-kp-ipsecIKE (RFC 4945 5.1.3.12)
LEAF_PURPOSES = {
    IPSEC_IKE,
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
}
PURPOSE_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}
# Extensions whose meaning is checked here, or which constrain nothing checked here.
HANDLED = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ExtensionOID.NAME_CONSTRAINTS,
}


def load_certificates(pem_or_der: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file (or the one of a DER file). One PEM block at a
    time: load_pem_x509_certificates came with cryptography 39, Debian 12 has 38."""
    if b"-----BEGIN" not in pem_or_der:
        return [x509.load_der_x509_certificate(pem_or_der)]
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem_or_der, re.DOTALL
    )
    if not blocks:
        raise ValueError("no PEM certificate in it")
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def load_crl(pem_or_der: bytes) -> x509.CertificateRevocationList:
    if b"-----BEGIN" in pem_or_der:
        return x509.load_pem_x509_crl(pem_or_der)
    return x509.load_der_x509_crl(pem_or_der)


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


@dataclass(frozen=True)
class Fetch:
    """Revocation data keywayd fetches: a CRL (GET `uri`), or an OCSP response for one
    certificate (POST the DER request `body` to `uri`)."""

    uri: str
    body: bytes = field(default=b"", repr=False)
    serial: int = 0

    @property
    def key(self) -> str | tuple[str, int]:
        return (self.uri, self.serial) if self.body else self.uri


class RevocationPending(Exception):
    """The path's revocation status waits on data not fetched yet (CRLs from
    distribution points, OCSP responses): the caller holds the exchange (the peer
    retransmits) and fetches them."""

    def __init__(self, fetches: tuple[Fetch, ...]):
        super().__init__(", ".join(f.uri for f in fetches))
        self.fetches = fetches

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.uri for f in self.fetches))


class RevocationCache:
    """What keywayd fetched for revocation (IKE_AUTH reads it): CRLs by distribution
    point, OCSP responses by responder and serial. An item is `wanted` until fetched;
    one that failed is not asked again for CRL_FETCH_RETRY seconds; a CRL or response
    past its nextUpdate is fetched again."""

    def __init__(self) -> None:
        self._crls: dict[str, x509.CertificateRevocationList] = {}
        self._ocsp: dict[tuple[str, int], ocsp.OCSPResponse] = {}
        self._failed: dict[object, float] = {}  # key -> monotonic time of the failure
        self.wanted: dict[object, Fetch] = {}
        self._started: set[object] = set()

    def want(self, fetches: tuple[Fetch, ...]) -> tuple[Fetch, ...]:
        """Record what IKE_AUTH waits on; returns what was not wanted already."""
        new = tuple(f for f in fetches if f.key not in self.wanted)
        self.wanted.update((f.key, f) for f in new)
        return new

    def to_fetch(self) -> list[Fetch]:
        """What is wanted and not being fetched yet (marked as being fetched)."""
        todo = [f for k, f in self.wanted.items() if k not in self._started]
        self._started.update(f.key for f in todo)
        return todo

    def store(self, uri: str, crl: x509.CertificateRevocationList) -> None:
        self._crls[uri] = crl
        self._done(uri)

    def store_ocsp(self, fetch: Fetch, response: ocsp.OCSPResponse) -> None:
        self._ocsp[(fetch.uri, fetch.serial)] = response
        self._done(fetch.key)

    def fail(self, key, now: float) -> None:
        self._failed[key] = now
        self.wanted.pop(key, None)
        self._started.discard(key)

    def _done(self, key) -> None:
        self._failed.pop(key, None)
        self.wanted.pop(key, None)
        self._started.discard(key)

    def _may_fetch(self, key, now: float) -> bool:
        return now - self._failed.get(key, -CRL_FETCH_RETRY) >= CRL_FETCH_RETRY

    def lookup(
        self, uris: list[str], when: datetime.datetime, now: float
    ) -> tuple[list[x509.CertificateRevocationList], list[str]]:
        """The CRLs at hand for `uris` (current or not: a stale one still says what it
        revoked), and the URIs to fetch first (none current, not failed lately)."""
        crls = [self._crls[u] for u in uris if u in self._crls]
        if any(_crl_current(c, when) for c in crls):
            return crls, []
        return crls, [u for u in uris if self._may_fetch(u, now)]

    def ocsp_response(self, uri: str, serial: int) -> ocsp.OCSPResponse | None:
        return self._ocsp.get((uri, serial))


def distribution_points(cert: x509.Certificate) -> list[str]:
    """The HTTP(S) URIs of the certificate's CRL distribution points (others, LDAP
    say, are not fetched)."""
    points = _extension(cert, x509.CRLDistributionPoints)
    uris = []
    for point in points or ():
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                ("http://", "https://")
            ):
                uris.append(name.value)
    return uris


def verify_peer(
    chain_ders: list[bytes],
    ca_certs: list[x509.Certificate],
    identity: str,
    when: datetime.datetime | None = None,
    crls: tuple = (),
    revocation: str = "relaxed",
    fetched: tuple[RevocationCache, float] | None = None,
):
    """The verified leaf's public key; AUTHENTICATION_FAILED with the reason otherwise.
    `crls` are checked on the path as `revocation` says (strict, ifuri, relaxed), with
    what was `fetched` (a RevocationCache and the monotonic time) from the OCSP
    responders and CRL distribution points the certificates name; RevocationPending if
    some must be fetched first."""
    fail = NotifyType.AUTHENTICATION_FAILED
    if not chain_ders:
        raise IkeCryptoError("peer sent no certificate", fail)
    if not ca_certs:
        raise IkeCryptoError("no CA configured to verify the peer's certificate", fail)
    try:
        leaf, *intermediates = (x509.load_der_x509_certificate(d) for d in chain_ders)
    except ValueError as exc:
        raise IkeCryptoError(f"peer certificate does not parse: {exc}", fail) from None
    now = when or datetime.datetime.now(datetime.UTC)
    name = leaf.subject.rfc4514_string()
    try:
        _check_leaf(leaf)
        path = _check_path(leaf, intermediates, ca_certs, now)
        _check_name_constraints(path)
        _check_revocation(path, crls, revocation, now, fetched)
    except _Refused as exc:
        raise IkeCryptoError(f"certificate of {name!r} does not verify: {exc}", fail) from None
    if not identity_matches(leaf, identity):
        raise IkeCryptoError(
            f"certificate of {name!r} does not verify for identity {identity!r}: "
            + _mismatch(leaf, identity),
            fail,
        )
    return leaf.public_key()


def leaf_public_key(chain_ders: list[bytes]):
    """The public key of the first certificate of a CERT chain (verify_peer checked it)."""
    return x509.load_der_x509_certificate(chain_ders[0]).public_key()


class _Refused(Exception):
    """Why a certificate path does not validate."""


def _check_path(leaf, pool: list, anchors: list, now: datetime.datetime) -> list:
    """From `leaf`, issuer by issuer (from `pool`, the peer's intermediates), up to one of
    `anchors`; each certificate valid at `now`, signed by the next, each issuer a CA.
    The path, leaf first, anchor last."""
    current, below = leaf, 0  # below: the CA certificates under the next issuer
    path = [leaf]
    for _unused in range(MAX_PATH):
        _check_time(current, now)
        _check_critical(current)
        anchor = next((ca for ca in anchors if _issued(current, ca)), None)
        if anchor is not None:
            _check_time(anchor, now)
            _check_issuer(anchor, below)
            return [*path, anchor]
        issuer = next((ca for ca in pool if ca is not current and _issued(current, ca)), None)
        if issuer is None:
            raise _Refused(
                f"{_who(current)} is issued by {current.issuer.rfc4514_string()!r}, "
                "not by a configured CA nor a certificate the peer sent"
            )
        _check_issuer(issuer, below)
        current, below = issuer, below + 1
        path.append(issuer)
    raise _Refused(f"no configured CA within {MAX_PATH} certificates")


def _check_revocation(
    path: list, crls: tuple, policy: str, now: datetime.datetime, fetched=None
) -> None:
    """Each certificate below the anchor against the CRLs its issuer signed, configured
    or fetched from its distribution points: refused if one lists it; without a current
    CRL (nextUpdate not passed), refused under `strict`, and under `ifuri` when the
    certificate names a CRL distribution point (or an OCSP responder). An OCSP
    responder the certificate names is asked first; its answer, when it has a usable
    one, decides. RevocationPending when a response or a distribution point's CRL is to
    be fetched first (none current at hand, none failed lately)."""
    pending: list[Fetch] = []
    for cert, issuer in itertools.pairwise(path):
        if fetched is not None:
            answer = _ocsp_answer(cert, issuer, fetched, now)
            if answer == "good":
                continue
            if isinstance(answer, Fetch):
                pending.append(answer)
                continue
        candidates, fetch = list(crls), []
        uris = distribution_points(cert) if fetched is not None else []
        if uris:
            at_hand, fetch = fetched[0].lookup(uris, now, fetched[1])
            candidates += at_hand
        signed = [
            crl for crl in candidates if crl.issuer == issuer.subject and _crl_signed(crl, issuer)
        ]
        for crl in signed:  # a stale CRL still says what it revoked
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                when = _utc(getattr(entry, "revocation_date_utc", None) or entry.revocation_date)
                raise _Refused(f"{_who(cert)} is revoked since {when:%Y-%m-%d %H:%M:%S} UTC"
                               f"{_revocation_reason(entry)}")  # fmt: skip
        current = [crl for crl in signed if _crl_current(crl, now)]
        if current:
            continue
        if fetch:  # the policy decides once the distribution point has answered (or not)
            pending += [Fetch(u) for u in fetch]
            continue
        if policy == "relaxed":
            continue
        if policy == "strict":
            raise _Refused(
                f"no current CRL of {_who(issuer)} for {_who(cert)} (revocation: strict)"
            )
        if _extension(cert, x509.CRLDistributionPoints) is not None or ocsp_responders(cert):
            raise _Refused(
                f"{_who(cert)} names a CRL distribution point or an OCSP responder, and "
                f"neither told its status (revocation: ifuri)"
            )
    if pending:
        raise RevocationPending(tuple(pending))


def ocsp_responders(cert: x509.Certificate) -> list[str]:
    """The http(s) OCSP responders the certificate's authorityInfoAccess names."""
    access = _extension(cert, x509.AuthorityInformationAccess)
    return [
        d.access_location.value
        for d in access or ()
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    ]


def _ocsp_answer(cert, issuer, fetched, now: datetime.datetime):
    """What the certificate's OCSP responder said: "good"; a refusal raised if revoked;
    a Fetch to ask it first; None when it cannot tell (no responder, it failed lately,
    or its answer is unusable: then CRLs and the policy decide)."""
    responders = ocsp_responders(cert)
    if not responders:
        return None
    cache, clock = fetched
    uri = responders[0]
    key = (uri, cert.serial_number)
    response = cache.ocsp_response(uri, cert.serial_number)
    if response is not None:
        status = _ocsp_status(response, cert, issuer, now)
        if status == "good":
            return status
        if status is not None:
            raise _Refused(f"{_who(cert)} is {status} (OCSP, {uri})")
        if key not in cache._failed:
            cache.fail(key, clock)  # an answer that tells nothing counts as none
    if cache._may_fetch(key, clock):
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
        return Fetch(uri, request.build().public_bytes(serialization.Encoding.DER), key[1])
    return None


OCSP_SKEW = datetime.timedelta(minutes=5)  # clocks of responder and host may differ


def _ocsp_status(response, cert, issuer, now: datetime.datetime) -> str | None:
    """ "good" or "revoked since ..." from a response about `cert` that `issuer` (or a
    responder it delegated to) signed and that is current; None otherwise."""
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return None
    if response.serial_number != cert.serial_number:
        return None
    expected = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, response.hash_algorithm)
    built = expected.build()
    if (response.issuer_key_hash, response.issuer_name_hash) != (
        built.issuer_key_hash,
        built.issuer_name_hash,
    ):
        return None
    if not _ocsp_signed(response, issuer):
        return None
    this = _utc(getattr(response, "this_update_utc", None) or response.this_update)
    following = getattr(response, "next_update_utc", None) or response.next_update
    if this > now + OCSP_SKEW or (following is not None and now > _utc(following) + OCSP_SKEW):
        return None
    if response.certificate_status == ocsp.OCSPCertStatus.GOOD:
        return "good"
    if response.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        when = _utc(getattr(response, "revocation_time_utc", None) or response.revocation_time)
        reason = response.revocation_reason
        return f"revoked since {when:%Y-%m-%d %H:%M:%S} UTC" + (
            f" ({reason.name})" if reason else ""
        )
    return None  # unknown


def _ocsp_signed(response, issuer) -> bool:
    """Signed by the issuer, or by a responder certificate the issuer gave
    id-kp-OCSPSigning (RFC 6960 4.2.2.2), named by the response's responder ID."""
    signers = [issuer]
    for cert in response.certificates:
        purposes = _extension(cert, x509.ExtendedKeyUsage)
        if purposes and ExtendedKeyUsageOID.OCSP_SIGNING in purposes and _issued(cert, issuer):
            signers.append(cert)
    for signer in signers:
        key_hash = x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
        named = response.responder_name == signer.subject or response.responder_key_hash == (
            key_hash
        )
        if named and _signature_valid(
            signer.public_key(),
            response.signature,
            response.tbs_response_bytes,
            response.signature_hash_algorithm,
        ):
            return True
    return False


def _signature_valid(key, signature: bytes, data: bytes, hash_algorithm) -> bool:
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True


def _crl_signed(crl, issuer) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def _crl_current(crl, now: datetime.datetime) -> bool:
    last = _utc(getattr(crl, "last_update_utc", None) or crl.last_update)
    following = getattr(crl, "next_update_utc", None) or crl.next_update
    return last <= now and (following is None or now <= _utc(following))


def _revocation_reason(entry) -> str:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return ""
    return f" ({reason.name})"


def _issued(cert, issuer) -> bool:
    """`issuer` issued `cert`: its subject is cert's issuer and its key signed cert."""
    if issuer.subject != cert.issuer:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            params = getattr(cert, "signature_algorithm_parameters", None)  # 41 and newer
            if cert.signature_algorithm_oid == RSASSA_PSS and params is None:
                raise _Refused(
                    f"{_who(cert)} is signed with RSASSA-PSS, which cryptography before 41 "
                    "cannot verify"
                )
            pad = params if isinstance(params, padding.PSS) else padding.PKCS1v15()
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad,
                       cert.signature_hash_algorithm)  # fmt: skip
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError, ValueError):
        return False
    return True


def _check_time(cert, now: datetime.datetime) -> None:
    start = _utc(getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before)
    end = _utc(getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after)
    if now < start:
        raise _Refused(f"{_who(cert)} is not valid before {start:%Y-%m-%d %H:%M:%S} UTC")
    if now > end:
        raise _Refused(f"{_who(cert)} expired {end:%Y-%m-%d %H:%M:%S} UTC")


def _utc(moment: datetime.datetime) -> datetime.datetime:
    """cryptography before 42 gives naive datetimes, meaning UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def utc_time(obj, field: str) -> datetime.datetime | None:
    """A certificate's or CRL's time `field` (not_valid_after, next_update...), aware:
    cryptography 42's FIELD_utc, or the naive FIELD of older ones (Debian 12's 38)."""
    value = getattr(obj, f"{field}_utc", None) or getattr(obj, field)
    return None if value is None else _utc(value)


def _check_critical(cert) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in HANDLED:
            raise _Refused(
                f"{_who(cert)} has a critical extension not handled: {ext.oid.dotted_string}"
            )


def _check_issuer(ca, below: int) -> None:
    """`ca` may issue certificates, with `below` CA certificates under it."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _Refused(f"{_who(ca)} is not a CA (no basicConstraints)") from None
    if not constraints.ca:
        raise _Refused(f"{_who(ca)} is not a CA (basicConstraints cA false)")
    if constraints.path_length is not None and below > constraints.path_length:
        raise _Refused(f"{_who(ca)} allows {constraints.path_length} CA(s) below it, not {below}")
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise _Refused(f"{_who(ca)} may not sign certificates (keyUsage without keyCertSign)")


def _check_name_constraints(path: list) -> None:
    """Each CA's name constraints hold for the certificates below it: each of their
    names (subject DN, SAN dNSName, rfc822Name, iPAddress, directoryName) inside a
    permitted subtree of its kind, when there are such, and in no excluded one."""
    for position, ca in enumerate(path[1:], start=1):
        limits = _extension(ca, x509.NameConstraints)
        if limits is None:
            continue
        for cert in path[:position]:
            for kind, name in _names(cert):
                allowed = [t for t in limits.permitted_subtrees or () if isinstance(t, kind)]
                banned = [t for t in limits.excluded_subtrees or () if isinstance(t, kind)]
                if (allowed and not any(_inside(name, t) for t in allowed)) or any(
                    _inside(name, t) for t in banned
                ):
                    shown = _dn_text(name) if isinstance(name, x509.Name) else name
                    raise _Refused(
                        f"{_who(cert)} names {shown!r}, outside the name constraints of {_who(ca)}"
                    )


def _names(cert) -> list:
    """(GeneralName type, value) of each name a certificate has."""
    names: list = [(x509.DirectoryName, cert.subject)]
    sans = _extension(cert, x509.SubjectAlternativeName)
    for kind in (x509.DNSName, x509.RFC822Name, x509.IPAddress, x509.DirectoryName):
        names += [(kind, value) for value in (sans.get_values_for_type(kind) if sans else ())]
    return names


def _inside(name, subtree) -> bool:
    """`name` lies in `subtree` (RFC 5280 4.2.1.10's rules for each kind)."""
    limit = subtree.value
    if isinstance(subtree, x509.IPAddress):
        return isinstance(limit, ipaddress.IPv4Network | ipaddress.IPv6Network) and (
            name.version == limit.version and name in limit
        )
    if isinstance(subtree, x509.DirectoryName):
        return list(name.rdns)[: len(limit.rdns)] == list(limit.rdns)
    limit = limit.lower().rstrip(".")
    if isinstance(subtree, x509.RFC822Name):
        if "@" in limit:
            return name.lower() == limit  # one mailbox
        host = name.rpartition("@")[2].lower()
        return host.endswith(limit) if limit.startswith(".") else host == limit
    host = name.lower().rstrip(".")  # dNSName: the domain and everything below it
    if limit.startswith("."):
        return host.endswith(limit)
    return not limit or host == limit or host.endswith("." + limit)


def _check_leaf(leaf) -> None:
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not (usage.digital_signature or usage.content_commitment):
        raise _Refused("its keyUsage allows no signature (digitalSignature, nonRepudiation)")
    purposes = _extension(leaf, x509.ExtendedKeyUsage)
    if purposes is not None and not LEAF_PURPOSES & set(purposes):
        named = ", ".join(PURPOSE_NAMES.get(p, p.dotted_string) for p in purposes)
        raise _Refused(
            f"its extendedKeyUsage ({named}) names neither ipsecIKE, anyExtendedKeyUsage, "
            "serverAuth nor clientAuth"
        )


def _extension(cert, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _who(cert) -> str:
    return repr(cert.subject.rfc4514_string())


def identity_matches(leaf, identity: str) -> bool:
    """The IKE identity is the leaf's: a KEY_ID its key's identifier, a DN its subject
    (or a directoryName SAN), else one of its subjectAltNames: an address (iPAddress),
    user@FQDN (rfc822Name) or FQDN (dNSName, case-insensitive)."""
    names = _extension(leaf, x509.SubjectAlternativeName)
    if ids.is_key_id(identity):  # the key's identifier: its SKI, or SHA-1 of the key
        wanted = ids.key_id(identity)
        ski = _extension(leaf, x509.SubjectKeyIdentifier)
        computed = x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
        return wanted in {computed.digest, *((ski.digest,) if ski else ())}
    if ids.is_dn(identity):
        wanted = ids.canonical(identity)
        dns = [leaf.subject, *(names.get_values_for_type(x509.DirectoryName) if names else ())]
        return any(_dn_text(dn) == wanted for dn in dns)
    if names is None:
        return False
    try:
        address = ipaddress.ip_address(identity)
    except ValueError:
        address = None
    if address is not None:
        return address in names.get_values_for_type(x509.IPAddress)
    if "@" in identity:
        user, _at, domain = identity.rpartition("@")
        return any(
            n.rpartition("@")[0] == user and n.rpartition("@")[2].lower() == domain.lower()
            for n in names.get_values_for_type(x509.RFC822Name)
        )
    wanted = identity.rstrip(".").lower()
    return any(n.rstrip(".").lower() == wanted for n in names.get_values_for_type(x509.DNSName))


def _dn_text(name: x509.Name) -> str:
    return ids.dn_text([(a.oid.dotted_string, str(a.value)) for rdn in name.rdns for a in rdn])


def _mismatch(leaf, identity: str) -> str:
    """What the leaf has instead of `identity`, to say so."""
    if ids.is_key_id(identity):
        digest = x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
        return f"not its key's identifier ({ids.key_id_text(digest)})"
    if ids.is_dn(identity):
        return f"not its subject ({_dn_text(leaf.subject)})"
    return f"not among its subjectAltNames ({', '.join(_san_texts(leaf)) or 'none'})"


def _san_texts(leaf) -> list[str]:
    names = _extension(leaf, x509.SubjectAlternativeName)
    if names is None:
        return []
    return [str(getattr(n, "value", n)) for n in names]
