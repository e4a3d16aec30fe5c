#!/usr/bin/env python3
"""Coverage-guided fuzzing of the IKEv2 decoder (atheris; `make fuzz`).

Usage: python tools/fuzz_ike.py [libFuzzer flags, e.g. -max_total_time=60 corpus_dir]
A crash is any exception other than IkeDecodeError, or a decoded message that does not
survive encode -> decode unchanged. The seed corpus is built from generated messages.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))

import contextlib

import atheris

with atheris.instrument_imports():
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec, crypto
    from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
        EncrId,
        PrfId,
    )

_PRF = crypto.prf_for(PrfId.HMAC_SHA2_256)
_ENCR = crypto.encr_for(EncrId.AES_GCM_16, 128)
_KEYS = crypto.derive_ike_keys(
    _PRF, _ENCR, None, b"s" * 32, b"i" * 32, b"r" * 32, b"\1" * 8, b"\2" * 8
)
_CIPHER = crypto.sk_ciphers(_KEYS, _ENCR, None, initiator=False)[1]


def test_one_input(data: bytes) -> None:
    try:
        message = codec.decode_message(data)
    except codec.IkeDecodeError:
        return
    again = codec.decode_message(codec.encode_message(message))
    if [(type(p), p) for p in again.payloads] != [(type(p), p) for p in message.payloads]:
        raise AssertionError("decode(encode(m)) != m")
    if message.payloads and isinstance(message.payloads[-1], codec.Encrypted):
        with contextlib.suppress(codec.IkeDecodeError):
            codec.open_encrypted(data, message, _CIPHER)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
