#!/usr/bin/env python3
"""Benchmark the IKE codec and crypto layers against the raw primitives under them.

Prints, per operation, this codebase's rate and the rate of the bare primitive doing the
same essential work in the same run, and their ratio (ours / raw cost). Not a test:
numbers vary with the machine and its load.

Usage: .venv/bin/python bench/ike_codec_crypto.py [--seconds S]
"""

from __future__ import annotations

import argparse
import hmac
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".collections"))

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec, crypto
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    EncrId,
    ExchangeType,
    HeaderFlag,
    KeGroup,
    NotifyType,
    PrfId,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.proposals import (
    parse_proposal_string,
)


def rate(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds`."""
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fn()
        count += 50
    return count / elapsed


def ike_sa_init() -> codec.Message:
    kx = crypto.key_exchange(KeGroup.CURVE25519)
    header = codec.Header(
        os.urandom(8), bytes(8), ExchangeType.IKE_SA_INIT, HeaderFlag.INITIATOR, 0
    )
    return codec.Message(
        header,
        [
            codec.SA(
                proposals=[
                    parse_proposal_string("aes128gcm16-prfsha256-x25519", "ike").to_proposal()
                ]
            ),
            codec.KE(group=KeGroup.CURVE25519, data=kx.public),
            codec.Nonce(data=os.urandom(32)),
            codec.Notify(type=NotifyType.NAT_DETECTION_SOURCE_IP, data=os.urandom(20)),
            codec.Notify(type=NotifyType.NAT_DETECTION_DESTINATION_IP, data=os.urandom(20)),
            codec.Notify(type=NotifyType.IKEV2_FRAGMENTATION_SUPPORTED),
            codec.Notify(type=NotifyType.SIGNATURE_HASH_ALGORITHMS, data=b"\0\2\0\3\0\4"),
            codec.VendorID(data=os.urandom(16)),
        ],
    )


def raw_walk(data: bytes) -> int:
    """The least a parser must do: read the header and walk the payload chain."""
    nxt, length = data[16], struct.unpack_from("!I", data, 24)[0]
    offset, count = 28, 0
    while nxt and offset < length:
        nxt, _, plen = struct.unpack_from("!BBH", data, offset)
        offset += plen
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    s = parser.parse_args().seconds
    rows = []

    init = ike_sa_init()
    init_bytes = codec.encode_message(init)
    rows.append(
        (
            f"decode IKE_SA_INIT ({len(init_bytes)} B)",
            rate(lambda: codec.decode_message(init_bytes), s),
            rate(lambda: raw_walk(init_bytes), s),
            "header + chain walk",
        )
    )
    rows.append(
        (
            "encode IKE_SA_INIT",
            rate(lambda: codec.encode_message(init), s),
            rate(lambda: b"".join([init_bytes[:28], init_bytes[28:]]), s),
            "joining the bytes",
        )
    )

    prf = crypto.prf_for(PrfId.HMAC_SHA2_256)
    encr = crypto.encr_for(EncrId.AES_GCM_16, 128)
    keys = crypto.derive_ike_keys(
        prf,
        encr,
        None,
        os.urandom(32),
        os.urandom(32),
        os.urandom(32),
        os.urandom(8),
        os.urandom(8),
    )
    out, inbound = (
        crypto.sk_ciphers(keys, encr, None, True)[0],
        crypto.sk_ciphers(keys, encr, None, False)[1],
    )
    inner = [
        codec.IDi(id_type=2, data=b"h1.lab"),
        codec.AUTH(kind=2, data=os.urandom(32)),
        codec.SA(
            proposals=[parse_proposal_string("aes128gcm16", "esp").to_proposal(1, os.urandom(4))]
        ),
        codec.TSi(selectors=[codec.TrafficSelector(7, 0, 0, 65535, "10.1.0.0", "10.1.0.255")]),
        codec.TSr(selectors=[codec.TrafficSelector(7, 0, 0, 65535, "10.2.0.0", "10.2.0.255")]),
    ]
    header = codec.Header(
        os.urandom(8), os.urandom(8), ExchangeType.IKE_AUTH, HeaderFlag.INITIATOR, 1
    )
    auth = codec.seal_message(header, inner, out)
    aead = AESGCM(keys.sk_ei[:16])
    salt = keys.sk_ei[16:]
    body = auth[32:]
    rows.append(
        (
            f"decode+open IKE_AUTH ({len(auth)} B)",
            rate(lambda: codec.open_encrypted(auth, codec.decode_message(auth), inbound), s),
            rate(lambda: aead.decrypt(salt + body[:8], body[8:], auth[:32]), s),
            "AES-GCM open alone",
        )
    )
    rows.append(
        (
            "seal IKE_AUTH",
            rate(lambda: codec.seal_message(header, inner, out), s),
            rate(lambda: aead.encrypt(salt + os.urandom(8), body[8:-16], auth[:32]), s),
            "AES-GCM seal alone",
        )
    )

    ni, nr, spi = os.urandom(32), os.urandom(32), os.urandom(8)
    shared = os.urandom(32)

    def raw_kdf():
        seed = hmac.new(ni + nr, shared, "sha256").digest()
        block, stream, n = b"", b"", 1
        while len(stream) < 3 * 32 + 2 * 20:
            block = hmac.new(seed, block + ni + nr + spi + spi + bytes([n]), "sha256").digest()
            stream += block
            n += 1

    rows.append(
        (
            "SKEYSEED + SK_* (prfsha256, aes128gcm16)",
            rate(lambda: crypto.derive_ike_keys(prf, encr, None, shared, ni, nr, spi, spi), s),
            rate(raw_kdf, s),
            "the same HMAC calls",
        )
    )
    peer = x25519.X25519PrivateKey.generate().public_key()
    peer_bytes = peer.public_bytes_raw()
    rows.append(
        (
            "x25519 key pair + shared secret",
            rate(lambda: crypto.key_exchange(KeGroup.CURVE25519).shared_secret(peer_bytes), s),
            rate(lambda: x25519.X25519PrivateKey.generate().exchange(peer), s),
            "cryptography X25519",
        )
    )
    other = crypto.key_exchange(KeGroup.MODP_3072)
    rows.append(
        (
            "modp3072 key pair + shared secret",
            rate(lambda: crypto.key_exchange(KeGroup.MODP_3072).shared_secret(other.public), s / 2),
            rate(
                lambda: pow(
                    int.from_bytes(other.public, "big"),
                    int.from_bytes(os.urandom(48), "big"),
                    crypto.modp_prime(KeGroup.MODP_3072),
                ),
                s / 2,
            ),
            "one 384-bit pow in pure Python; OpenSSL is faster",
        )
    )
    rows.append(
        (
            "PSK AUTH",
            rate(
                lambda: crypto.psk_auth(
                    prf, b"p" * 32, init_bytes, nr, keys.sk_pi, b"\2\0\0\0h1.lab"
                ),
                s,
            ),
            rate(
                lambda: hmac.new(
                    hmac.new(b"p" * 32, b"Key Pad for IKEv2", "sha256").digest(),
                    init_bytes + nr,
                    "sha256",
                ).digest(),
                s,
            ),
            "two HMACs",
        )
    )

    print(f"{'operation':<44} {'ours/s':>10} {'raw/s':>11}  ratio  (raw primitive)")
    for name, ours, raw, what in rows:
        print(f"{name:<44} {ours:>10.0f} {raw:>11.0f}  {raw / ours:5.1f}x  ({what})")
    print("ratio = how many times the raw primitive's rate exceeds ours (1.0x: no overhead)")


if __name__ == "__main__":
    main()
