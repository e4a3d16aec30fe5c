#!/usr/bin/env python3
"""Responder CPU per IKE SA + Child SA from the sans-IO engine alone (PSK, x25519,
AES-GCM), next to the cost of the raw crypto such an exchange needs, as a ratio.

Two engines are wired in memory (no sockets); only the responder's CPU time is counted.
Usage: .venv/bin/python bench/ike_engine.py [count]
"""

from __future__ import annotations

import hmac
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".collections"))

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import (
    ChildParams,
    Engine,
    IkeConnection,
)

A, B = ("192.0.2.11", 500), ("192.0.2.12", 500)
PROPOSAL, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"


def engines() -> tuple[Engine, Engine]:
    a, b = Engine(A), Engine(B)
    psk = b"bench-psk-0123456789abcdef"
    a.add_connection(
        IkeConnection(
            "c",
            B,
            "h1.lab",
            "h2.lab",
            psk,
            (PROPOSAL,),
            (ChildParams("s", ("10.1.0.0/24",), ("10.2.0.0/24",), (ESP,)),),
        )
    )
    b.add_connection(
        IkeConnection(
            "c",
            A,
            "h2.lab",
            "h1.lab",
            psk,
            (PROPOSAL,),
            (ChildParams("s", ("10.2.0.0/24",), ("10.1.0.0/24",), (ESP,)),),
        )
    )
    return a, b


def establish(a: Engine, b: Engine) -> float:
    """One IKE SA + Child SA; returns the responder's CPU seconds."""
    spent = 0.0
    a.initiate("c", 0.0)
    for _ in range(4):
        for d in a.pop_datagrams():
            start = time.process_time()
            b.receive(d.data, d.src, 0.0)
            spent += time.process_time() - start
        for d in b.pop_datagrams():
            a.receive(d.data, d.src, 0.0)
    assert sum(type(e).__name__ == "ChildSaReady" for e in b.pop_events()) == 1
    a.pop_events()
    return spent


def raw_crypto() -> None:
    """What a responder must compute for one IKE SA + Child SA, called directly."""
    mine = x25519.X25519PrivateKey.generate()
    mine.public_key().public_bytes_raw()
    shared = mine.exchange(x25519.X25519PrivateKey.generate().public_key())
    n = os.urandom(64)
    seed = hmac.digest(n, shared, "sha256")
    stream, block = b"", b""
    for i in range(1, 6):  # SK_* (about 150 bytes)
        block = hmac.digest(seed, block + n + bytes(16) + bytes([i]), "sha256")
        stream += block
    for _ in range(3):  # 2 PSK AUTHs (verify + make), child KEYMAT
        hmac.digest(hmac.digest(b"psk", b"Key Pad for IKEv2", "sha256"), n * 4, "sha256")
    aead = AESGCM(stream[:16])
    sealed = aead.encrypt(stream[:12], b"x" * 200, b"a" * 32)
    aead.decrypt(stream[:12], sealed, b"a" * 32)
    aead.encrypt(stream[:12], b"x" * 200, b"a" * 32)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    a, b = engines()
    establish(a, b)  # warm-up
    engine_cpu = sum(establish(a, b) for _ in range(count)) / count
    start = time.process_time()
    for _ in range(count):
        raw_crypto()
    raw_cpu = (time.process_time() - start) / count
    print(f"responder CPU per IKE SA + Child SA ({PROPOSAL}, PSK), {count} setups:")
    print(f"  engine    {engine_cpu * 1e3:7.3f} ms   ({1 / engine_cpu:7.0f} setups/s on one core)")
    print(f"  raw crypto{raw_cpu * 1e3:7.3f} ms   ({1 / raw_cpu:7.0f} /s)")
    print(f"  ratio engine/raw crypto = {engine_cpu / raw_cpu:.1f}x")
    print(
        "  (charon measured here: about 1.05 to 1.46 ms responder CPU per SA,"
        " ../shared/notes/strongswan-peer.md)"
    )


if __name__ == "__main__":
    main()
