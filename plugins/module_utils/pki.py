"""Keyway's own small CA: host keys and requests on the hosts, signing on the controller.

Each host makes its private key and a certificate signing request (CSR) for its IKE
identity; the key never leaves the host. The controller's CA (a directory: its key,
mode 0600, its certificate, an index of what it issued, and its CRL) signs each request
into a certificate for IPsec (RFC 4945: digitalSignature, the identity in the
subjectAltName, or the subject for a DN), renews one a margin before it expires, and
revokes those of hosts that left the inventory or were marked compromised. Every step is
idempotent: a request already served by a valid certificate for the same key and
identity gets that certificate back, and the CRL is signed again only when what it says
changes or half its validity has passed.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ike import identity as ids

try:  # the modules say what is missing (HAS_CRYPTOGRAPHY) rather than fail to import
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from .ike.certs import utc_time

    HAS_CRYPTOGRAPHY = True
    # RFC 4945 5.1.3.12: ipsecIKE; serverAuth and clientAuth for peers that ask for them.
    LEAF_USAGES = [
        ExtendedKeyUsageOID.IPSEC_IKE,
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    REASONS = {
        "key_compromise": x509.ReasonFlags.key_compromise,
        "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
        "superseded": x509.ReasonFlags.superseded,
    }
except ImportError:  # pragma: no cover
    HAS_CRYPTOGRAPHY = False

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072")


class PkiError(ValueError):
    """A request or a CA directory Keyway cannot use, and why."""


def make_key(kind: str = "ecdsa-p256"):
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise PkiError(f"key type {kind!r}: one of {', '.join(KEY_TYPES)}")


def key_type(key) -> str | None:
    """Which of KEY_TYPES `key` is, if any."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072:
        return "rsa-3072"
    return None


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes):
    return serialization.load_pem_private_key(pem, None)


def _digest(key):
    """The hash to sign with: none for EdDSA, which hashes itself."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def subject_and_names(identity: str) -> tuple[x509.Name, list[x509.GeneralName]]:
    """The subject and subjectAltNames a certificate for IKE identity `identity` has:
    a DN is the subject itself; an address, user@FQDN or FQDN is a subjectAltName
    (keywayd and strongSwan match the identity there), and the subject's CN."""
    if ids.is_key_id(identity):
        raise PkiError(f"identity {identity}: a KEY_ID names a key, not a certificate subject")
    if ids.is_dn(identity):
        attributes = [
            x509.NameAttribute(x509.ObjectIdentifier(oid), value)
            for oid, value in ids.dn_parts(identity)
        ]
        return x509.Name(attributes), []
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    try:
        return subject, [x509.IPAddress(ipaddress.ip_address(identity))]
    except ValueError:
        pass
    if "@" in identity:
        return subject, [x509.RFC822Name(identity)]
    return subject, [x509.DNSName(identity)]


def make_csr(key, identity: str) -> bytes:
    subject, names = subject_and_names(identity)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, _digest(key)).public_bytes(serialization.Encoding.PEM)


def public_key_id(public_key) -> str:
    """SHA-256 of the public key's DER: which key a request or certificate is for."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def content_name(prefix: str, pem: bytes) -> str:
    """A file name that changes with the content (keywayd reloads what it names)."""
    return f"{prefix}-{hashlib.sha256(pem).hexdigest()[:16]}.pem"


@dataclass
class Issued:
    host: str
    pem: bytes
    serial: int
    changed: bool


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (Python 3.10 hosts)


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return utc_time(cert, "not_valid_after")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with its mode from the start (a key is never readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class CertificateAuthority:
    """The CA in `directory`: ca.key (0600), ca.pem, index.json (each host's
    certificates, the revoked ones with their reason) and crl.pem."""

    def __init__(self, directory: str | Path, now: datetime.datetime | None = None):
        self.dir = Path(directory)
        self.now = now or _utc_now()
        self.key = None
        self.cert: x509.Certificate | None = None
        self.index: dict[str, Any] = {"hosts": {}, "revoked": [], "crl_number": 0}
        self.changes: list[str] = []  # what this run changed, for the task's diff
        # Files written by save() only (check mode computes everything, writes nothing).
        self._pending: dict[Path, tuple[bytes, int]] = {}
        if (self.dir / "ca.key").exists():
            self._load()

    @property
    def exists(self) -> bool:
        return self.cert is not None

    def _load(self) -> None:
        key_file = self.dir / "ca.key"
        if key_file.stat().st_mode & 0o077:
            raise PkiError(f"{key_file} is readable by others than its owner: chmod 600 it")
        self.key = load_key(key_file.read_bytes())
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.pem").read_bytes())
        index = self.dir / "index.json"
        if index.exists():
            self.index = json.loads(index.read_text())

    def create(self, name: str, valid_days: int, key_type: str = "ecdsa-p384") -> None:
        self.key = make_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(hours=1))
            .not_valid_after(self.now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, _digest(self.key))
        )
        self.changes.append(f"CA {name!r} created")

    def save(self) -> None:
        """Write what changed: the CA's key (0600) and certificate when new, issued
        certificates, the CRL and the index."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.dir / "issued").mkdir(mode=0o700, exist_ok=True)
        if not (self.dir / "ca.key").exists():
            write_file(self.dir / "ca.key", key_pem(self.key), 0o600)
            write_file(self.dir / "ca.pem", self.cert_pem, 0o644)
        for path, (data, mode) in self._pending.items():
            write_file(path, data, mode)
        self._pending.clear()
        write_file(self.dir / "index.json", json.dumps(self.index, indent=1).encode(), 0o644)

    def _read(self, path: Path) -> bytes:
        pending = self._pending.get(path)
        return pending[0] if pending else path.read_bytes()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        host: str,
        csr_pem: bytes,
        identity: str,
        valid_days: int,
        renew_days: int,
        crl_uri: str = "",
    ) -> Issued:
        """The certificate for `host`'s request: the current one while it is valid for
        more than `renew_days`, for the same key, identity and CRL distribution point
        (`crl_uri`, where the CA's CRL is published, if it is) and not revoked; else a
        new one (the previous is listed as superseded only in the index, not revoked: it
        stays valid until it expires, so the host's old IKE SAs keep authenticating)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"{host}: the certificate request is not a PEM CSR ({exc})") from None
        try:
            if not csr.is_signature_valid:
                raise InvalidSignature
        except InvalidSignature:
            raise PkiError(f"{host}: the certificate request's signature is invalid") from None
        wanted = subject_and_names(identity)
        key_id = public_key_id(csr.public_key())
        record = self.index["hosts"].get(host)
        revoked = {entry["serial"] for entry in self.index["revoked"]}
        if key_id in self.compromised_keys():
            raise PkiError(
                f"{host}: its key was revoked as compromised; make it a new key (remove the "
                "old one on the host) before asking for a certificate again"
            )
        if record is not None:
            current = record["certificates"][-1]
            expires = datetime.datetime.fromisoformat(current["not_after"])
            if (
                current["serial"] not in revoked
                and current["key"] == key_id
                and current["identity"] == identity
                and current.get("crl_uri", "") == crl_uri
                and expires - self.now > datetime.timedelta(days=renew_days)
            ):
                pem = self._read(self.dir / "issued" / current["file"])
                return Issued(host, pem, int(current["serial"]), False)
        subject, names = wanted
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(hours=1))
            .not_valid_after(
                min(self.now + datetime.timedelta(days=valid_days), not_after(self.cert))
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(LEAF_USAGES), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if crl_uri:
            point = x509.DistributionPoint(
                [x509.UniformResourceIdentifier(crl_uri)], None, None, None
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        cert = builder.sign(self.key, _digest(self.key))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        serial = str(cert.serial_number)
        file = f"{host}-{cert.serial_number:x}.pem"
        self._pending[self.dir / "issued" / file] = (pem, 0o644)
        record = self.index["hosts"].setdefault(host, {"certificates": []})
        why = "renewed" if record["certificates"] else "issued"
        record["certificates"].append({
            "serial": serial, "file": file, "key": key_id, "identity": identity,
            "not_after": not_after(cert).isoformat(), "crl_uri": crl_uri,
        })  # fmt: skip
        self.changes.append(f"{host}: certificate {why} (serial {cert.serial_number:x})")
        return Issued(host, pem, cert.serial_number, True)

    def revoke(self, host: str, reason: str) -> bool:
        """Revoke every unexpired certificate of `host`; True if one was not already."""
        record = self.index["hosts"].get(host)
        if record is None:
            return False
        done = {entry["serial"] for entry in self.index["revoked"]}
        changed = False
        for cert in record["certificates"]:
            expired = datetime.datetime.fromisoformat(cert["not_after"]) <= self.now
            if cert["serial"] in done or expired:
                continue
            self.index["revoked"].append({
                "serial": cert["serial"], "host": host, "reason": reason,
                "date": self.now.isoformat(),
            })  # fmt: skip
            self.changes.append(f"{host}: certificate {int(cert['serial']):x} revoked ({reason})")
            changed = True
        return changed

    def compromised_keys(self) -> set[str]:
        """The keys of certificates revoked for keyCompromise: never certified again."""
        serials = {e["serial"] for e in self.index["revoked"] if e["reason"] == "key_compromise"}
        return {
            cert["key"]
            for record in self.index["hosts"].values()
            for cert in record["certificates"]
            if cert["serial"] in serials
        }

    def hosts(self) -> list[str]:
        return sorted(self.index["hosts"])

    def revoked_hosts(self) -> set[str]:
        return {entry["host"] for entry in self.index["revoked"]}

    def crl(self, valid_days: int, force: bool = False) -> bytes:
        """The CRL: the current one unless the revocations changed (`force`), it is
        missing, or less than half its validity is left; then a new one, numbered on."""
        path = self.dir / "crl.pem"
        if (path.exists() or path in self._pending) and not force:
            current = x509.load_pem_x509_crl(self._read(path))
            left = utc_time(current, "next_update") - self.now
            if left > datetime.timedelta(days=valid_days) / 2:
                return self._read(path)
        self.index["crl_number"] += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(self.now - datetime.timedelta(minutes=5))
            .next_update(self.now + datetime.timedelta(days=valid_days))
            .add_extension(x509.CRLNumber(self.index["crl_number"]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for entry in self.index["revoked"]:
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"]))
                .revocation_date(datetime.datetime.fromisoformat(entry["date"]))
                .add_extension(x509.CRLReason(REASONS[entry["reason"]]), critical=False)
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
        pem = builder.sign(self.key, _digest(self.key)).public_bytes(serialization.Encoding.PEM)
        self._pending[path] = (pem, 0o644)
        self.changes.append(f"CRL number {self.index['crl_number']} signed")
        return pem
