"""IKEv2 cryptography through `cryptography`: transforms, key exchange, key derivation,
AUTH, and SK payload protection.

Public API:
    prf_for(PrfId) -> Prf;  integ_for(IntegId) -> Integ;  encr_for(EncrId, key_bits) -> Encr
    key_exchange(KeGroup) -> KeyExchange (.public, .shared_secret(peer_public))
    derive_ike_keys(prf, encr, integ, shared, ni, nr, spi_i, spi_r) -> IkeKeys
    derive_rekeyed_ike_keys(old_prf, old_sk_d, new_prf, encr, integ, shared, ni, nr, spis)
    derive_child_keys(prf, sk_d, encr, integ, ni, nr, shared=b"") -> ChildKeys
    sk_ciphers(keys, encr, integ, initiator) -> (outbound, inbound), each a codec.SkCipher
    psk_auth(prf, psk, message, peer_nonce, sk_p, id_body) -> bytes; verify_psk_auth(...)
    signed_octets(...), sign_auth(...), verify_signature_auth(...): RFC 7427 and legacy
    check_strength(kind, id, key_bits, allow_weak): refuses weak transforms by default

Errors: IkeCryptoError (with the notify a responder answers), WeakAlgorithmError, and
codec.IkeIntegrityError from SK ciphers. Comparisons of MACs are constant-time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import warnings
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as _serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .codec import IkeIntegrityError
from .constants import AuthMethod, EncrId, IntegId, KeGroup, NotifyType, PrfId


class IkeCryptoError(Exception):
    """A cryptographic failure: `notify` is what a responder answers (None: drop)."""

    def __init__(self, message: str, notify: NotifyType | None = None):
        super().__init__(message)
        self.notify = notify


class WeakAlgorithmError(IkeCryptoError):
    """A transform below Keyway's strength floor, used without `allow_weak`."""


class UnsupportedAlgorithmError(IkeCryptoError):
    pass


# ---------------------------------------------------------------- strength policy

WEAK = {
    "encr": {
        EncrId.DES,
        EncrId.TRIPLE_DES,
        EncrId.DES_IV64,
        EncrId.DES_IV32,
        EncrId.BLOWFISH,
        EncrId.CAST,
        EncrId.IDEA,
        EncrId.RC5,
        EncrId.NULL,
    },
    "prf": {PrfId.HMAC_MD5, PrfId.HMAC_SHA1},
    "integ": {
        IntegId.HMAC_MD5_96,
        IntegId.HMAC_SHA1_96,
        IntegId.HMAC_MD5_128,
        IntegId.HMAC_SHA1_160,
        IntegId.DES_MAC,
        IntegId.KPDK_MD5,
    },
    "ke": {
        KeGroup.MODP_768,
        KeGroup.MODP_1024,
        KeGroup.MODP_1536,
        KeGroup.MODP_1024_160,
        KeGroup.MODP_2048_224,
        KeGroup.ECP_192,
        KeGroup.ECP_224,
    },
}


def check_strength(kind: str, ident: int, allow_weak: bool = False) -> None:
    """Raise WeakAlgorithmError for a weak transform unless explicitly allowed."""
    if ident in WEAK.get(kind, ()) and not allow_weak:
        names = {"encr": EncrId, "prf": PrfId, "integ": IntegId, "ke": KeGroup}[kind]
        raise WeakAlgorithmError(
            f"{kind} {names(ident).name} is weak and refused by default; "
            "set allow_weak: true on the connection to use it"
        )


# ---------------------------------------------------------------- PRF and INTEG

_HASHES = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
    "md5": hashlib.md5,
}


@dataclass(frozen=True)
class Prf:
    id: int
    hash_name: str

    @property
    def size(self) -> int:
        """Output length, and the preferred key length (RFC 7296 2.13)."""
        return _HASHES[self.hash_name]().digest_size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash_name).digest()

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (RFC 7296 2.13): T1 | T2 | ... truncated to `length`."""
        if length > 255 * self.size:
            raise IkeCryptoError(f"prf+ cannot produce {length} bytes")
        out, block, counter = bytearray(), b"", 1
        while len(out) < length:
            block = self(key, block + seed + bytes([counter]))
            out += block
            counter += 1
        return bytes(out[:length])


_PRFS = {
    PrfId.HMAC_SHA2_256: "sha256",
    PrfId.HMAC_SHA2_384: "sha384",
    PrfId.HMAC_SHA2_512: "sha512",
    PrfId.HMAC_SHA1: "sha1",
    PrfId.HMAC_MD5: "md5",
}


def prf_for(ident: int, allow_weak: bool = False) -> Prf:
    check_strength("prf", ident, allow_weak)
    if ident not in _PRFS:
        raise UnsupportedAlgorithmError(
            f"PRF {ident} is not supported", NotifyType.NO_PROPOSAL_CHOSEN
        )
    return Prf(ident, _PRFS[ident])


@dataclass(frozen=True)
class Integ:
    id: int
    hash_name: str
    key_size: int
    icv_size: int

    def mac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash_name).digest()[: self.icv_size]


_INTEGS = {
    IntegId.HMAC_SHA2_256_128: ("sha256", 32, 16),
    IntegId.HMAC_SHA2_384_192: ("sha384", 48, 24),
    IntegId.HMAC_SHA2_512_256: ("sha512", 64, 32),
    IntegId.HMAC_SHA1_96: ("sha1", 20, 12),
    IntegId.HMAC_MD5_96: ("md5", 16, 12),
}


def integ_for(ident: int, allow_weak: bool = False) -> Integ | None:
    """The INTEG transform; None for NONE (AEAD)."""
    if ident == IntegId.NONE:
        return None
    check_strength("integ", ident, allow_weak)
    if ident not in _INTEGS:
        raise UnsupportedAlgorithmError(
            f"INTEG {ident} is not supported", NotifyType.NO_PROPOSAL_CHOSEN
        )
    return Integ(ident, *_INTEGS[ident])


# ---------------------------------------------------------------- ENCR


@dataclass(frozen=True)
class Encr:
    id: int
    key_size: int  # bytes, without salt
    aead: bool
    salt_size: int = 0
    iv_size: int = 16
    icv_size: int = 0  # AEAD tag
    block_size: int = 16

    @property
    def keymat_size(self) -> int:
        """Bytes taken from prf+ for this transform (key + salt)."""
        return self.key_size + self.salt_size


def encr_for(ident: int, key_bits: int | None = None, allow_weak: bool = False) -> Encr:
    check_strength("encr", ident, allow_weak)
    if ident == EncrId.AES_CBC:
        if key_bits not in (128, 192, 256):
            raise UnsupportedAlgorithmError(
                f"AES-CBC with {key_bits}-bit keys", NotifyType.NO_PROPOSAL_CHOSEN
            )
        return Encr(ident, key_bits // 8, False)
    if ident in (EncrId.AES_GCM_16, EncrId.AES_GCM_12, EncrId.AES_GCM_8):
        if key_bits not in (128, 192, 256):
            raise UnsupportedAlgorithmError(
                f"AES-GCM with {key_bits}-bit keys", NotifyType.NO_PROPOSAL_CHOSEN
            )
        icv = {EncrId.AES_GCM_16: 16, EncrId.AES_GCM_12: 12, EncrId.AES_GCM_8: 8}[ident]
        return Encr(ident, key_bits // 8, True, salt_size=4, iv_size=8, icv_size=icv, block_size=4)
    if ident == EncrId.CHACHA20_POLY1305:
        if key_bits not in (None, 256):
            raise UnsupportedAlgorithmError(
                "ChaCha20-Poly1305 takes no key length", NotifyType.NO_PROPOSAL_CHOSEN
            )
        return Encr(ident, 32, True, salt_size=4, iv_size=8, icv_size=16, block_size=4)
    raise UnsupportedAlgorithmError(f"ENCR {ident} is not supported", NotifyType.NO_PROPOSAL_CHOSEN)


@dataclass
class AeadSkCipher:
    """SK with AES-GCM (RFC 5282) or ChaCha20-Poly1305 (RFC 7634): 8-byte explicit IV
    from a counter (never repeats under one key), nonce = salt | IV."""

    encr: Encr
    key: bytes = field(repr=False)
    _counter: int = 0

    def __post_init__(self) -> None:
        self._key, self._salt = self.key[: self.encr.key_size], self.key[self.encr.key_size :]
        if self.encr.id == EncrId.CHACHA20_POLY1305:
            self._aead = ChaCha20Poly1305(self._key)
        elif self.encr.icv_size == 16:
            self._aead = AESGCM(self._key)
        else:  # GCM with a truncated ICV: AESGCM only does 16-byte tags
            self._aead = None

    def _padded(self, plaintext: bytes) -> bytes:
        # RFC 5282 3: no block alignment needed; the pad length byte is still there.
        return plaintext + b"\x00"

    def sealed_length(self, plaintext_len: int) -> int:
        return self.encr.iv_size + plaintext_len + 1 + self.encr.icv_size

    def seal_raw(self, iv: bytes, data: bytes, aad: bytes) -> bytes:
        """ciphertext || ICV of `data` under nonce salt || iv (no IKE padding)."""
        if self._aead is not None:
            return self._aead.encrypt(self._salt + iv, data, aad)
        enc = Cipher(algorithms.AES(self._key), modes.GCM(self._salt + iv)).encryptor()
        enc.authenticate_additional_data(aad)
        ct = enc.update(data) + enc.finalize()
        return ct + enc.tag[: self.encr.icv_size]

    def open_raw(self, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            if self._aead is not None:
                return self._aead.decrypt(self._salt + iv, sealed, aad)
            icv = self.encr.icv_size
            if len(sealed) < icv:
                raise IkeIntegrityError("SK body shorter than its ICV")
            mode = modes.GCM(self._salt + iv, sealed[-icv:], min_tag_length=icv)
            dec = Cipher(algorithms.AES(self._key), mode).decryptor()
            dec.authenticate_additional_data(aad)
            return dec.update(sealed[:-icv]) + dec.finalize()
        except InvalidTag:
            raise IkeIntegrityError("SK ICV check failed") from None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        self._counter += 1
        iv = struct.pack("!Q", self._counter)
        return iv + self.seal_raw(iv, self._padded(plaintext), aad)

    def open(self, body: bytes, aad: bytes) -> bytes:
        if len(body) < self.encr.iv_size + 1 + self.encr.icv_size:
            raise IkeIntegrityError(f"SK body of {len(body)} bytes is too short")
        iv = body[: self.encr.iv_size]
        return _strip_padding(self.open_raw(iv, body[self.encr.iv_size :], aad))


@dataclass
class CbcSkCipher:
    """SK with AES-CBC and an HMAC ICV over the whole message (RFC 7296 3.14)."""

    encr: Encr
    integ: Integ
    key: bytes = field(repr=False)
    integ_key: bytes = field(repr=False)

    def sealed_length(self, plaintext_len: int) -> int:
        block = self.encr.block_size
        padded = (plaintext_len + 1 + block - 1) // block * block
        return self.encr.iv_size + padded + self.integ.icv_size

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        block = self.encr.block_size
        pad = (block - (len(plaintext) + 1) % block) % block
        data = plaintext + bytes(pad) + bytes([pad])
        iv = os.urandom(self.encr.iv_size)
        enc = Cipher(algorithms.AES(self.key), modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        return iv + ct + self.integ.mac(self.integ_key, aad + iv + ct)

    def open(self, body: bytes, aad: bytes) -> bytes:
        icv_size, iv_size = self.integ.icv_size, self.encr.iv_size
        if len(body) < iv_size + self.encr.block_size + icv_size:
            raise IkeIntegrityError(f"SK body of {len(body)} bytes is too short")
        signed, icv = body[:-icv_size], body[-icv_size:]
        if not hmac.compare_digest(self.integ.mac(self.integ_key, aad + signed), icv):
            raise IkeIntegrityError("SK ICV check failed")
        ct = signed[iv_size:]
        if len(ct) % self.encr.block_size:
            raise IkeIntegrityError("SK ciphertext is not a whole number of blocks")
        dec = Cipher(algorithms.AES(self.key), modes.CBC(signed[:iv_size])).decryptor()
        return _strip_padding(dec.update(ct) + dec.finalize())


def _strip_padding(plain: bytes) -> bytes:
    if not plain or plain[-1] + 1 > len(plain):
        raise IkeIntegrityError("SK padding length exceeds the plaintext")
    return plain[: len(plain) - 1 - plain[-1]]


# ---------------------------------------------------------------- key exchange


def _pi_times_2_to(bits: int) -> int:
    """floor(pi * 2**bits), by Machin's formula in integers."""

    def arctan_inv(x: int, one: int) -> int:
        total = term = one // x
        n, sign = 1, -1
        while term:
            term //= x * x
            n += 2
            total += sign * (term // n)
            sign = -sign
        return total

    one = 1 << (bits + 32)
    return (16 * arctan_inv(5, one) - 4 * arctan_inv(239, one)) >> 32


@functools.cache
def modp_prime(group: int) -> int:
    """RFC 2409's and RFC 3526's primes, from their defining formula
    p = 2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) * pi) + k)."""
    n, k = {
        KeGroup.MODP_768: (768, 149686),
        KeGroup.MODP_1024: (1024, 129093),
        KeGroup.MODP_1536: (1536, 741804),
        KeGroup.MODP_2048: (2048, 124476),
        KeGroup.MODP_3072: (3072, 1690314),
        KeGroup.MODP_4096: (4096, 240904),
    }[group]
    return 2**n - 2 ** (n - 64) - 1 + 2**64 * (_pi_times_2_to(n - 130) + k)


# cryptography 46+ marks finite-field DH as deprecated; IKEv2 peers still need MODP
# groups (strongSwan's default proposal includes modp3072), so the warning is silenced
# here, and only here. If a release drops it, MODP groups fail with a clear error.
# Raw public key bytes (X25519, X448): the spelling cryptography 38 knows too.
_RAW, _RAW_PUBLIC = _serialization.Encoding.Raw, _serialization.PublicFormat.Raw
_FFDH_DEPRECATION = {"action": "ignore", "message": "Diffie-Hellman over finite fields"}


@functools.cache
def _dh_parameters(group: int) -> dh.DHParameters:
    with warnings.catch_warnings():
        warnings.filterwarnings(**_FFDH_DEPRECATION)
        return dh.DHParameterNumbers(modp_prime(group), 2).parameters()


_CURVES = {
    KeGroup.ECP_192: ec.SECP192R1,
    KeGroup.ECP_224: ec.SECP224R1,
    KeGroup.ECP_256: ec.SECP256R1,
    KeGroup.ECP_384: ec.SECP384R1,
    KeGroup.ECP_521: ec.SECP521R1,
}
_MODP_GROUPS = (
    KeGroup.MODP_768,
    KeGroup.MODP_1024,
    KeGroup.MODP_1536,
    KeGroup.MODP_2048,
    KeGroup.MODP_3072,
    KeGroup.MODP_4096,
)
# Every group a proposal string can name (the weak ones need allow_weak).
SUPPORTED_GROUPS = (
    *_MODP_GROUPS,
    KeGroup.ECP_192,
    KeGroup.ECP_224,
    KeGroup.ECP_256,
    KeGroup.ECP_384,
    KeGroup.ECP_521,
    KeGroup.CURVE25519,
    KeGroup.CURVE448,
)


class KeyExchange:
    """One side of a key exchange: `public` (the KE payload data) and the shared secret
    with a peer's public value, each checked as its group requires."""

    def __init__(self, group: int, allow_weak: bool = False, private: bytes | None = None):
        """A fresh key pair; `private` fixes the private value (test vectors only)."""
        check_strength("ke", group, allow_weak)
        self.group = group
        if group in _MODP_GROUPS:
            with warnings.catch_warnings():
                warnings.filterwarnings(**_FFDH_DEPRECATION)
                params = _dh_parameters(group)
                if private is None:
                    self._private = params.generate_private_key()
                else:
                    x = int.from_bytes(private, "big")
                    y = pow(2, x, modp_prime(group))
                    public = dh.DHPublicNumbers(y, params.parameter_numbers())
                    self._private = dh.DHPrivateNumbers(x, public).private_key()
            self._size = (modp_prime(group).bit_length() + 7) // 8
            y = self._private.public_key().public_numbers().y
            self.public = y.to_bytes(self._size, "big")
        elif group in _CURVES:
            curve = _CURVES[group]()
            self._private = (
                ec.generate_private_key(curve)
                if private is None
                else ec.derive_private_key(int.from_bytes(private, "big"), curve)
            )
            self.public = self._private.public_key().public_bytes(
                _serialization.Encoding.X962, _serialization.PublicFormat.UncompressedPoint
            )[1:]
        elif group == KeGroup.CURVE25519:
            self._private = (
                x25519.X25519PrivateKey.generate()
                if private is None
                else x25519.X25519PrivateKey.from_private_bytes(private)
            )
            self.public = self._private.public_key().public_bytes(_RAW, _RAW_PUBLIC)
        elif group == KeGroup.CURVE448:
            self._private = (
                x448.X448PrivateKey.generate()
                if private is None
                else x448.X448PrivateKey.from_private_bytes(private)
            )
            self.public = self._private.public_key().public_bytes(_RAW, _RAW_PUBLIC)
        else:
            raise UnsupportedAlgorithmError(
                f"KE group {group} is not supported", NotifyType.NO_PROPOSAL_CHOSEN
            )

    def shared_secret(self, peer: bytes) -> bytes:
        with warnings.catch_warnings():
            warnings.filterwarnings(**_FFDH_DEPRECATION)
            return self._shared_secret(peer)

    def _shared_secret(self, peer: bytes) -> bytes:
        bad = IkeCryptoError(
            f"invalid KE public value for group {self.group}", NotifyType.INVALID_SYNTAX
        )
        try:
            if isinstance(self._private, dh.DHPrivateKey):
                p = modp_prime(self.group)
                y = int.from_bytes(peer, "big")
                if len(peer) != self._size or not 1 < y < p - 1:
                    raise bad
                key = dh.DHPublicNumbers(y, _dh_parameters(self.group).parameter_numbers())
                secret = self._private.exchange(key.public_key())
                return secret.rjust(self._size, b"\x00")
            if isinstance(self._private, ec.EllipticCurvePrivateKey):
                curve = self._private.curve
                size = (curve.key_size + 7) // 8
                if len(peer) != 2 * size:
                    raise bad
                key = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer)
                return self._private.exchange(ec.ECDH(), key)
            cls = x25519.X25519PublicKey if self.group == KeGroup.CURVE25519 else x448.X448PublicKey
            size = 32 if self.group == KeGroup.CURVE25519 else 56
            if len(peer) != size:
                raise bad
            secret = self._private.exchange(cls.from_public_bytes(peer))
            if not any(secret):  # low-order point (RFC 7748 6.1)
                raise bad
            return secret
        except IkeCryptoError:
            raise
        except ValueError:  # not on the curve, or a low-order point refused by OpenSSL
            raise bad from None


def key_exchange(group: int, allow_weak: bool = False) -> KeyExchange:
    return KeyExchange(group, allow_weak)


# ---------------------------------------------------------------- key derivation


@dataclass(frozen=True)
class IkeKeys:
    skeyseed: bytes = field(repr=False)
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def _split(prf: Prf, encr: Encr, integ: Integ | None, skeyseed: bytes, seed: bytes) -> IkeKeys:
    integ_size = integ.key_size if integ else 0
    sizes = [
        prf.size,
        integ_size,
        integ_size,
        encr.keymat_size,
        encr.keymat_size,
        prf.size,
        prf.size,
    ]
    stream = prf.plus(skeyseed, seed, sum(sizes))
    parts, offset = [], 0
    for size in sizes:
        parts.append(stream[offset : offset + size])
        offset += size
    return IkeKeys(skeyseed, *parts)


def derive_ike_keys(
    prf: Prf,
    encr: Encr,
    integ: Integ | None,
    shared: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """SKEYSEED = prf(Ni | Nr, g^ir); {SK_d, SK_ai, ...} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    skeyseed = prf(ni + nr, shared)
    return _split(prf, encr, integ, skeyseed, ni + nr + spi_i + spi_r)


def derive_rekeyed_ike_keys(
    old_prf: Prf,
    old_sk_d: bytes,
    prf: Prf,
    encr: Encr,
    integ: Integ | None,
    shared: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
) -> IkeKeys:
    """RFC 7296 2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), with the old PRF."""
    skeyseed = old_prf(old_sk_d, shared + ni + nr)
    return _split(prf, encr, integ, skeyseed, ni + nr + spi_i + spi_r)


@dataclass(frozen=True)
class ChildKeys:
    """Child SA keys; AEAD encryption keys end with their salt (RFC 4106 / 7634)."""

    encr_i: bytes = field(repr=False)  # initiator -> responder
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)  # responder -> initiator
    integ_r: bytes = field(repr=False)


def derive_child_keys(
    prf: Prf,
    sk_d: bytes,
    encr: Encr | None,
    integ: Integ | None,
    ni: bytes,
    nr: bytes,
    shared: bytes = b"",
) -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new)] | Ni | Nr) (RFC 7296 2.17)."""
    e = encr.keymat_size if encr else 0
    a = integ.key_size if integ else 0
    stream = prf.plus(sk_d, shared + ni + nr, 2 * (e + a))
    return ChildKeys(stream[:e], stream[e : e + a], stream[e + a : 2 * e + a], stream[2 * e + a :])


def sk_ciphers(
    keys: IkeKeys, encr: Encr, integ: Integ | None, initiator: bool
) -> tuple[AeadSkCipher | CbcSkCipher, AeadSkCipher | CbcSkCipher]:
    """(outbound, inbound) SK ciphers for the initiator or the responder."""

    def make(ekey: bytes, akey: bytes):
        if encr.aead:
            return AeadSkCipher(encr, ekey)
        if integ is None:
            raise IkeCryptoError(
                "a non-AEAD cipher needs an INTEG transform", NotifyType.NO_PROPOSAL_CHOSEN
            )
        return CbcSkCipher(encr, integ, ekey, akey)

    i2r, r2i = make(keys.sk_ei, keys.sk_ai), make(keys.sk_er, keys.sk_ar)
    return (i2r, r2i) if initiator else (r2i, i2r)


# ---------------------------------------------------------------- AUTH

KEY_PAD = b"Key Pad for IKEv2"


def signed_octets(
    prf: Prf, message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """RealMessage | Nonce(peer) | prf(SK_px, IDx') (RFC 7296 2.15); id_body is the ID
    payload without its generic header."""
    return message + peer_nonce + prf(sk_p, id_body)


def psk_auth(
    prf: Prf, psk: bytes, message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), signed_octets(prf, message, peer_nonce, sk_p, id_body))


def verify_psk_auth(
    prf: Prf,
    psk: bytes,
    auth_data: bytes,
    message: bytes,
    peer_nonce: bytes,
    sk_p: bytes,
    id_body: bytes,
) -> bool:
    expected = psk_auth(prf, psk, message, peer_nonce, sk_p, id_body)
    return hmac.compare_digest(expected, auth_data)


# RFC 7427 AlgorithmIdentifiers (DER), as sent in AUTH method 14.
_HASH_OIDS = {
    "sha256": b"\x60\x86\x48\x01\x65\x03\x04\x02\x01",
    "sha384": b"\x60\x86\x48\x01\x65\x03\x04\x02\x02",
    "sha512": b"\x60\x86\x48\x01\x65\x03\x04\x02\x03",
}
_HASH_CLASSES = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _oid(body: bytes) -> bytes:
    return _der(0x06, body)


_NULL = b"\x05\x00"
_RSA_PKCS1 = {
    "sha256": b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0b",
    "sha384": b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0c",
    "sha512": b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0d",
}
_ECDSA = {
    "sha256": b"\x2a\x86\x48\xce\x3d\x04\x03\x02",
    "sha384": b"\x2a\x86\x48\xce\x3d\x04\x03\x03",
    "sha512": b"\x2a\x86\x48\xce\x3d\x04\x03\x04",
}
_ED25519 = b"\x2b\x65\x70"
_ED448 = b"\x2b\x65\x71"
_RSA_PSS = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0a"
_MGF1 = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x08"


def _pss_identifier(hash_name: str) -> bytes:
    hash_alg = _der(0x30, _oid(_HASH_OIDS[hash_name]) + _NULL)
    salt = _HASH_CLASSES[hash_name].digest_size
    params = _der(
        0x30,
        _der(0xA0, hash_alg)
        + _der(0xA1, _der(0x30, _oid(_MGF1) + hash_alg))
        + _der(0xA2, _der(0x02, bytes([salt]))),
    )
    return _der(0x30, _oid(_RSA_PSS) + params)


def algorithm_identifier(scheme: str, hash_name: str) -> bytes:
    """DER AlgorithmIdentifier for scheme "rsa-pkcs1" | "rsa-pss" | "ecdsa" | "ed25519" |
    "ed448"."""
    if scheme == "rsa-pkcs1":
        return _der(0x30, _oid(_RSA_PKCS1[hash_name]) + _NULL)
    if scheme == "ecdsa":
        return _der(0x30, _oid(_ECDSA[hash_name]))
    if scheme == "ed25519":
        return _der(0x30, _oid(_ED25519))
    if scheme == "ed448":
        return _der(0x30, _oid(_ED448))
    if scheme == "rsa-pss":
        return _pss_identifier(hash_name)
    raise UnsupportedAlgorithmError(f"signature scheme {scheme}")


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The TLVs of a DER sequence's content (one level)."""
    items, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise ValueError("truncated DER")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 3 or pos + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise ValueError("DER value beyond its container")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _parse_identifier(ident: bytes) -> tuple[str, str]:
    """(scheme, hash) of an RFC 7427 AlgorithmIdentifier."""
    try:
        ((tag, seq),) = _der_items(ident)
        parts = _der_items(seq) if tag == 0x30 else []
        oid = parts[0][1] if parts and parts[0][0] == 0x06 else b""
        for name, body in _RSA_PKCS1.items():
            if oid == body:
                return "rsa-pkcs1", name
        for name, body in _ECDSA.items():
            if oid == body:
                return "ecdsa", name
        if oid == _ED25519:
            return "ed25519", "identity"
        if oid == _ED448:
            return "ed448", "identity"
        if oid == _RSA_PSS and len(parts) == 2:
            for name in _HASH_OIDS:
                if _pss_identifier(name) == ident:
                    return "rsa-pss", name
    except ValueError:
        pass
    raise IkeCryptoError(
        "AUTH: unsupported or malformed signature AlgorithmIdentifier",
        NotifyType.AUTHENTICATION_FAILED,
    )


def _scheme_args(scheme: str, hash_name: str) -> tuple:
    """The padding/algorithm arguments `cryptography` wants after the data to sign."""
    if scheme in ("ed25519", "ed448"):
        return ()
    algo = _HASH_CLASSES[hash_name]()
    if scheme == "rsa-pkcs1":
        return asym_padding.PKCS1v15(), algo
    if scheme == "rsa-pss":
        return asym_padding.PSS(asym_padding.MGF1(algo), algo.digest_size), algo
    return (ec.ECDSA(algo),)


def _sign_raw(key, scheme: str, hash_name: str, octets: bytes) -> bytes:
    return key.sign(octets, *_scheme_args(scheme, hash_name))


def _verify_raw(pub, scheme: str, hash_name: str, signature: bytes, octets: bytes) -> None:
    pub.verify(signature, octets, *_scheme_args(scheme, hash_name))


_LEGACY_ECDSA = {
    AuthMethod.ECDSA_SHA256_P256: ("sha256", 32),
    AuthMethod.ECDSA_SHA384_P384: ("sha384", 48),
    AuthMethod.ECDSA_SHA512_P521: ("sha512", 66),
}


def sign_auth(
    private_key, octets: bytes, scheme: str | None = None, hash_name: str = "sha256"
) -> tuple[int, bytes]:
    """(AUTH method, AUTH data) signing `octets` with RFC 7427 (method 14)."""
    if scheme is None:
        scheme = (
            "ed25519"
            if isinstance(private_key, ed25519.Ed25519PrivateKey)
            else "ed448"
            if isinstance(private_key, ed448.Ed448PrivateKey)
            else "ecdsa"
            if isinstance(private_key, ec.EllipticCurvePrivateKey)
            else "rsa-pss"
        )
    ident = algorithm_identifier(scheme, hash_name)
    signature = _sign_raw(private_key, scheme, hash_name, octets)
    return AuthMethod.DIGITAL_SIGNATURE, bytes([len(ident)]) + ident + signature


def verify_signature_auth(
    public_key, method: int, auth_data: bytes, octets: bytes, allow_weak: bool = False
) -> str:
    """Verify a signature AUTH (method 14, or legacy 1, 9, 10, 11): its scheme (rsa-pss,
    rsa-pkcs1, ecdsa, ed25519, ed448), or IkeCryptoError with AUTHENTICATION_FAILED and
    the precise reason."""
    fail = NotifyType.AUTHENTICATION_FAILED
    try:
        if method == AuthMethod.DIGITAL_SIGNATURE:
            if not auth_data:
                raise IkeCryptoError("AUTH: empty signature data", fail)
            size = auth_data[0]
            scheme, hash_name = _parse_identifier(auth_data[1 : 1 + size])
            signature = auth_data[1 + size :]
            if scheme == "rsa-pkcs1" and not allow_weak:
                raise WeakAlgorithmError(
                    f"AUTH: RSASSA-PKCS1-v1_5 with {hash_name.upper()} is refused (RFC 8247 "
                    "prefers RSASSA-PSS; strongSwan signs with it when charon.rsa_pss = yes); "
                    "allow_weak: true accepts it",
                    fail,
                )
        elif method == AuthMethod.RSA_SIG:
            if not allow_weak:
                raise WeakAlgorithmError(
                    "AUTH: RSA_SIG (RSASSA-PKCS1-v1_5 with SHA-1) is weak; "
                    "the peer should use RFC 7427 signatures",
                    fail,
                )
            scheme, hash_name, signature = "rsa-pkcs1", "sha1", auth_data
        elif method in _LEGACY_ECDSA:
            hash_name, size = _LEGACY_ECDSA[method]
            if len(auth_data) != 2 * size:
                raise IkeCryptoError(
                    f"AUTH: ECDSA signature of {len(auth_data)} bytes, {2 * size} expected", fail
                )
            r = int.from_bytes(auth_data[:size], "big")
            s = int.from_bytes(auth_data[size:], "big")
            scheme, signature = "ecdsa", encode_dss_signature(r, s)
        else:
            raise IkeCryptoError(f"AUTH: method {method} is not a supported signature", fail)
        expected_key = {
            "ed25519": ed25519.Ed25519PublicKey,
            "ed448": ed448.Ed448PublicKey,
            "ecdsa": ec.EllipticCurvePublicKey,
            "rsa-pkcs1": rsa.RSAPublicKey,
            "rsa-pss": rsa.RSAPublicKey,
        }[scheme]
        if not isinstance(public_key, expected_key):
            raise IkeCryptoError(
                f"AUTH: a {scheme} signature does not fit the peer's {type(public_key).__name__}",
                fail,
            )
        _verify_raw(public_key, scheme, hash_name, signature, octets)
    except InvalidSignature:
        raise IkeCryptoError("AUTH: signature verification failed", fail) from None
    return scheme


def legacy_ecdsa_auth(private_key: ec.EllipticCurvePrivateKey, octets: bytes) -> tuple[int, bytes]:
    """AUTH methods 9/10/11 (RFC 4754): raw r||s, the hash fixed by the curve."""
    size = (private_key.curve.key_size + 7) // 8
    method = {
        32: AuthMethod.ECDSA_SHA256_P256,
        48: AuthMethod.ECDSA_SHA384_P384,
        66: AuthMethod.ECDSA_SHA512_P521,
    }[size]
    hash_name = _LEGACY_ECDSA[method][0]
    r, s = decode_dss_signature(private_key.sign(octets, ec.ECDSA(_HASH_CLASSES[hash_name]())))
    return method, r.to_bytes(size, "big") + s.to_bytes(size, "big")
