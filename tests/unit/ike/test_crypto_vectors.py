"""The crypto layer against published test vectors (sources in vectors/published.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import crypto
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.codec import IkeIntegrityError
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    EncrId,
    IntegId,
    KeGroup,
    PrfId,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "published.json").read_text())
PRF_OF = {
    "PRF_HMAC_SHA2_256": PrfId.HMAC_SHA2_256,
    "PRF_HMAC_SHA2_384": PrfId.HMAC_SHA2_384,
    "PRF_HMAC_SHA2_512": PrfId.HMAC_SHA2_512,
}
INTEG_OF = {
    "AUTH_HMAC_SHA2_256_128": IntegId.HMAC_SHA2_256_128,
    "AUTH_HMAC_SHA2_384_192": IntegId.HMAC_SHA2_384_192,
    "AUTH_HMAC_SHA2_512_256": IntegId.HMAC_SHA2_512_256,
}
GCM_OF = {
    "ENCR_AES_GCM_ICV16": EncrId.AES_GCM_16,
    "ENCR_AES_GCM_ICV12": EncrId.AES_GCM_12,
    "ENCR_AES_GCM_ICV8": EncrId.AES_GCM_8,
}
H = bytes.fromhex


def cases(group: str):
    return sorted(VECTORS[group]["cases"].items())


@pytest.mark.parametrize(("name", "v"), cases("hmac_sha2"))
def test_rfc4868_prf_and_integrity(name, v):
    if v["alg"] in PRF_OF:
        assert crypto.prf_for(PRF_OF[v["alg"]])(H(v["key"]), H(v["seed"])) == H(v["out"])
    else:
        assert crypto.integ_for(INTEG_OF[v["alg"]]).mac(H(v["key"]), H(v["data"])) == H(v["mac"])


GROUP_OF = {
    "ECP_256_BIT": KeGroup.ECP_256,
    "ECP_384_BIT": KeGroup.ECP_384,
    "ECP_521_BIT": KeGroup.ECP_521,
    "CURVE_25519": KeGroup.CURVE25519,
    "CURVE_448": KeGroup.CURVE448,
}


@pytest.mark.parametrize(("name", "v"), cases("ecp") + cases("x25519") + cases("x448"))
def test_key_exchange_vectors(name, v):
    seed = H(v["seed"])
    i, r = seed[: len(seed) // 2], seed[len(seed) // 2 :]
    group = GROUP_OF[v["method"]]
    mine, theirs = crypto.KeyExchange(group, private=i), crypto.KeyExchange(group, private=r)
    assert mine.public == H(v["pub_i"]) and theirs.public == H(v["pub_r"])
    assert mine.shared_secret(H(v["pub_r"])) == H(v["shared"])
    assert theirs.shared_secret(H(v["pub_i"])) == H(v["shared"])


def test_rfc5903_ecp256_in_ike_encoding():
    v = VECTORS["ecp_rfc5903"]["cases"]["ecp256"]
    mine = crypto.KeyExchange(KeGroup.ECP_256, private=H(v["i"]))
    assert mine.public == H(v["gi"])
    assert mine.shared_secret(H(v["gr"])) == H(v["gir"])


@pytest.mark.parametrize(("name", "v"), cases("aes_gcm"))
def test_gcm_spec_cases_through_the_sk_cipher(name, v):
    key = H(v["key"])
    encr = crypto.encr_for(GCM_OF[v["alg"]], (len(key) - 4) * 8)
    cipher = crypto.AeadSkCipher(encr, key)
    aad = H(v.get("adata", ""))
    assert cipher.seal_raw(H(v["iv"]), H(v["plain"]), aad) == H(v["cipher"])
    assert cipher.open_raw(H(v["iv"]), H(v["cipher"]), aad) == H(v["plain"])


@pytest.mark.parametrize(("name", "v"), cases("chacha20poly1305"))
def test_chacha20_poly1305_rfc7539_and_rfc7634(name, v):
    cipher = crypto.AeadSkCipher(crypto.encr_for(EncrId.CHACHA20_POLY1305), H(v["key"]))
    aad = H(v.get("adata", ""))
    assert cipher.seal_raw(H(v["iv"]), H(v["plain"]), aad) == H(v["cipher"])
    assert cipher.open_raw(H(v["iv"]), H(v["cipher"]), aad) == H(v["plain"])


def test_rfc7634_ikev2_example_opens_as_an_sk_payload():
    v = VECTORS["chacha20poly1305"]["cases"]["chacha20poly1305_4"]
    cipher = crypto.AeadSkCipher(crypto.encr_for(EncrId.CHACHA20_POLY1305), H(v["key"]))
    # The example's plaintext ends with its pad length byte (0): SK opening strips it.
    inner = cipher.open(H(v["iv"]) + H(v["cipher"]), H(v["adata"]))
    assert inner == H(v["plain"])[:-1]
    with pytest.raises(IkeIntegrityError):
        cipher.open(H(v["iv"]) + H(v["cipher"]), H(v["adata"])[:-1] + b"\x01")


def test_cavs_ikev2_kdf():
    v = VECTORS["ikev2_kdf"]["cases"]["cavs_sha1_1"]
    prf = crypto.prf_for(v["prf"], allow_weak=True)
    ni, nr = H(v["ni"]), H(v["nr"])
    skeyseed = prf(ni + nr, H(v["gir"]))
    assert skeyseed == H(v["skeyseed"])
    dkm = prf.plus(skeyseed, ni + nr + H(v["spii"]) + H(v["spir"]), v["dkm_len"])
    assert dkm == H(v["dkm"])
    sk_d = dkm[: prf.size]
    assert prf.plus(sk_d, ni + nr, v["dkm_len"]) == H(v["dkm_child"])
    assert prf.plus(sk_d, H(v["gir_new"]) + ni + nr, v["dkm_len"]) == H(v["dkm_child_dh"])
    assert prf(sk_d, H(v["gir_new"]) + ni + nr) == H(v["skeyseed_rekey"])
    # The same values through the library's own entry points.
    aes = crypto.encr_for(EncrId.AES_CBC, 128)
    sha1 = crypto.integ_for(IntegId.HMAC_SHA1_96, allow_weak=True)
    keys = crypto.derive_ike_keys(prf, aes, sha1, H(v["gir"]), ni, nr, H(v["spii"]), H(v["spir"]))
    assert keys.skeyseed == skeyseed and keys.sk_d == sk_d
    assert keys.sk_ai == dkm[prf.size : prf.size + 20]
    rekeyed = crypto.derive_rekeyed_ike_keys(
        prf, sk_d, prf, aes, sha1, H(v["gir_new"]), ni, nr, b"\1" * 8, b"\2" * 8
    )
    assert rekeyed.skeyseed == H(v["skeyseed_rekey"])
    child = crypto.derive_child_keys(prf, sk_d, aes, sha1, ni, nr, H(v["gir_new"]))
    assert (
        child.encr_i + child.integ_i + child.encr_r + child.integ_r
        == H(v["dkm_child_dh"])[: 2 * (16 + 20)]
    )


RFC3526_TAILS = {
    KeGroup.MODP_2048: "8AACAA68FFFFFFFFFFFFFFFF",
    KeGroup.MODP_3072: "A93AD2CAFFFFFFFFFFFFFFFF",
    KeGroup.MODP_4096: "34063199FFFFFFFFFFFFFFFF",
}


@pytest.mark.parametrize("group", sorted(RFC3526_TAILS))
def test_modp_primes_are_rfc3526_safe_primes(group):
    p = crypto.modp_prime(group)
    text = format(p, "X")
    assert text.startswith("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert text.endswith(RFC3526_TAILS[group])
    for n in (p, (p - 1) // 2):  # Fermat tests: a safe prime passes for any base
        assert all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7))


@pytest.mark.parametrize(("name", "v"), cases("rfc7748_5_2"))
def test_rfc7748_scalar_multiplication(name, v):
    kx = crypto.KeyExchange(v["group"], private=H(v["scalar"]))
    assert kx.shared_secret(H(v["u"])) == H(v["out"])
