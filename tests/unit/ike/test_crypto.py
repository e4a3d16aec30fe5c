"""Crypto behaviour beyond the vectors: bad inputs, SK protection, signatures, policy."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import crypto
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.codec import IkeIntegrityError
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    AuthMethod,
    EncrId,
    IntegId,
    KeGroup,
    NotifyType,
    PrfId,
)


@pytest.mark.parametrize("group", list(crypto.SUPPORTED_GROUPS))
def test_each_group_agrees_and_refuses_garbage(group):
    """Every group a proposal can name works (the weak ones when allowed)."""
    a, b = (crypto.key_exchange(group, allow_weak=True) for _ in range(2))
    assert a.shared_secret(b.public) == b.shared_secret(a.public)
    for bad in (b"", a.public[:-1], a.public + b"\0"):
        with pytest.raises(crypto.IkeCryptoError) as caught:
            a.shared_secret(bad)
        assert caught.value.notify == NotifyType.INVALID_SYNTAX


def test_modp_rejects_degenerate_public_values():
    kx = crypto.key_exchange(KeGroup.MODP_2048)
    p = crypto.modp_prime(KeGroup.MODP_2048)
    for y in (0, 1, p - 1, p):
        with pytest.raises(crypto.IkeCryptoError, match="invalid KE public value"):
            kx.shared_secret(y.to_bytes(256, "big"))


def test_ecp_rejects_a_point_off_the_curve():
    kx = crypto.key_exchange(KeGroup.ECP_256)
    off_curve = bytearray(kx.public)
    off_curve[-1] ^= 1
    with pytest.raises(crypto.IkeCryptoError):
        kx.shared_secret(bytes(off_curve))


def test_x25519_rejects_low_order_points():
    kx = crypto.key_exchange(KeGroup.CURVE25519)
    for point in (bytes(32), (1).to_bytes(32, "little")):
        with pytest.raises(crypto.IkeCryptoError):
            kx.shared_secret(point)


@pytest.mark.parametrize(
    ("encr_id", "bits", "integ_id"),
    [
        (EncrId.AES_GCM_16, 128, IntegId.NONE),
        (EncrId.AES_GCM_16, 256, IntegId.NONE),
        (EncrId.AES_GCM_12, 256, IntegId.NONE),
        (EncrId.CHACHA20_POLY1305, None, IntegId.NONE),
        (EncrId.AES_CBC, 128, IntegId.HMAC_SHA2_256_128),
        (EncrId.AES_CBC, 256, IntegId.HMAC_SHA2_512_256),
    ],
)
def test_sk_ciphers_pair_up_and_detect_tampering(encr_id, bits, integ_id):
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    encr, integ = crypto.encr_for(encr_id, bits), crypto.integ_for(integ_id)
    keys = crypto.derive_ike_keys(
        prf, encr, integ, b"s" * 32, b"i" * 32, b"r" * 32, b"\1" * 8, b"\2" * 8
    )
    out_i, in_i = crypto.sk_ciphers(keys, encr, integ, initiator=True)
    out_r, in_r = crypto.sk_ciphers(keys, encr, integ, initiator=False)
    aad = b"header-and-sk-generic-header"
    for size in (0, 1, 15, 16, 17, 1000):
        plain = (bytes(range(256)) * 4)[:size]
        sealed = out_i.seal(plain, aad)
        assert len(sealed) == out_i.sealed_length(size)
        assert in_r.open(sealed, aad) == plain
        assert in_i.open(out_r.seal(plain, aad), aad) == plain
        with pytest.raises(IkeIntegrityError):
            in_i.open(sealed, aad)  # wrong direction's key
        for index in (0, len(sealed) // 2, len(sealed) - 1):
            flipped = bytearray(sealed)
            flipped[index] ^= 0x80
            with pytest.raises(IkeIntegrityError):
                in_r.open(bytes(flipped), aad)
        with pytest.raises(IkeIntegrityError):
            in_r.open(sealed, aad + b"x")
        with pytest.raises(IkeIntegrityError):
            in_r.open(sealed[:5], aad)


def test_aead_ivs_never_repeat_under_one_key():
    encr = crypto.encr_for(EncrId.AES_GCM_16, 128)
    cipher = crypto.AeadSkCipher(encr, b"k" * 20)
    ivs = {cipher.seal(b"x", b"")[:8] for _ in range(1000)}
    assert len(ivs) == 1000


def test_psk_auth_binds_message_nonce_and_identity():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    args = (b"message", b"nonce" * 4, b"skp" * 10, b"\x02\0\0\0a.lab")
    auth = crypto.psk_auth(prf, b"secret-psk-value", *args)
    assert crypto.verify_psk_auth(prf, b"secret-psk-value", auth, *args)
    assert not crypto.verify_psk_auth(prf, b"other-psk-value!", auth, *args)
    for i in range(4):
        changed = list(args)
        changed[i] += b"!"
        assert not crypto.verify_psk_auth(prf, b"secret-psk-value", auth, *changed)


KEYS = {
    "rsa-pss": lambda: rsa.generate_private_key(65537, 2048),
    "rsa-pkcs1": lambda: rsa.generate_private_key(65537, 2048),
    "ecdsa": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
}


@pytest.mark.parametrize("scheme", sorted(KEYS))
@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rfc7427_signatures(scheme, hash_name):
    key = KEYS[scheme]()
    weak = scheme == "rsa-pkcs1"  # accepted only when allowed (below)
    method, data = crypto.sign_auth(key, b"octets", scheme, hash_name)
    assert method == AuthMethod.DIGITAL_SIGNATURE
    crypto.verify_signature_auth(key.public_key(), method, data, b"octets", allow_weak=weak)
    with pytest.raises(crypto.IkeCryptoError, match="verification failed") as caught:
        crypto.verify_signature_auth(
            key.public_key(), method, data, b"other octets", allow_weak=weak
        )
    assert caught.value.notify == NotifyType.AUTHENTICATION_FAILED
    other = KEYS["ed25519" if scheme != "ed25519" else "ecdsa"]()
    with pytest.raises(crypto.IkeCryptoError, match="does not fit"):
        crypto.verify_signature_auth(other.public_key(), method, data, b"octets", allow_weak=weak)


def test_rsa_pkcs1_v1_5_signatures_are_refused_unless_allowed():
    key = KEYS["rsa-pkcs1"]()
    method, data = crypto.sign_auth(key, b"octets", "rsa-pkcs1", "sha256")
    with pytest.raises(crypto.WeakAlgorithmError, match="RSASSA-PKCS1-v1_5 with SHA256") as no:
        crypto.verify_signature_auth(key.public_key(), method, data, b"octets")
    assert no.value.notify == NotifyType.AUTHENTICATION_FAILED
    crypto.verify_signature_auth(key.public_key(), method, data, b"octets", allow_weak=True)
    # RSA keys sign with RSASSA-PSS unless told otherwise.
    method, data = crypto.sign_auth(key, b"octets")
    crypto.verify_signature_auth(key.public_key(), method, data, b"octets")


@pytest.mark.parametrize("curve", [ec.SECP256R1, ec.SECP384R1, ec.SECP521R1])
def test_legacy_ecdsa_methods(curve):
    key = ec.generate_private_key(curve())
    method, data = crypto.legacy_ecdsa_auth(key, b"octets")
    crypto.verify_signature_auth(key.public_key(), method, data, b"octets")
    with pytest.raises(crypto.IkeCryptoError):
        crypto.verify_signature_auth(key.public_key(), method, data[:-1], b"octets")


def test_sha1_rsa_signatures_are_weak_unless_allowed():
    key = rsa.generate_private_key(65537, 2048)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    data = key.sign(b"octets", padding.PKCS1v15(), hashes.SHA1())
    with pytest.raises(crypto.WeakAlgorithmError, match="weak"):
        crypto.verify_signature_auth(key.public_key(), AuthMethod.RSA_SIG, data, b"octets")
    crypto.verify_signature_auth(
        key.public_key(), AuthMethod.RSA_SIG, data, b"octets", allow_weak=True
    )


def test_malformed_signature_identifiers_fail_cleanly():
    key = ed25519.Ed25519PrivateKey.generate()
    for data in (b"", b"\x05", b"\x02\x30\x00sig", b"\xff" + b"\x30" * 10):
        with pytest.raises(crypto.IkeCryptoError):
            crypto.verify_signature_auth(
                key.public_key(), AuthMethod.DIGITAL_SIGNATURE, data, b"octets"
            )


@pytest.mark.parametrize(
    ("kind", "ident"),
    [
        ("encr", EncrId.TRIPLE_DES),
        ("prf", PrfId.HMAC_SHA1),
        ("integ", IntegId.HMAC_SHA1_96),
        ("ke", KeGroup.MODP_1024),
    ],
)
def test_weak_transforms_are_refused_by_name(kind, ident):
    with pytest.raises(crypto.WeakAlgorithmError, match=f"{ident.name} is weak"):
        crypto.check_strength(kind, ident)
    crypto.check_strength(kind, ident, allow_weak=True)


def test_key_material_is_not_in_reprs():
    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    encr = crypto.encr_for(EncrId.AES_GCM_16, 256)
    keys = crypto.derive_ike_keys(
        prf, encr, None, b"s" * 32, b"i" * 32, b"r" * 32, b"\1" * 8, b"\2" * 8
    )
    cipher = crypto.AeadSkCipher(encr, keys.sk_ei)
    for obj in (keys, cipher):
        text = repr(obj)
        assert keys.sk_ei.hex() not in text and repr(keys.sk_ei) not in text
