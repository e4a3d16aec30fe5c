"""Real IKEv2 messages from strongSwan: decoded, keys re-derived, SK opened, AUTH checked.

Two Debian charons negotiate in lab namespaces; the initiator's eth0 is captured and
its log (ike level 4) gives the DH shared secret and the keys it derived. From that
secret and the captured nonces and SPIs, this codebase must derive the same SKEYSEED
and SK_* keys, decrypt the IKE_AUTH exchange and verify both AUTH payloads with the PSK.
"""

from __future__ import annotations

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike import codec, crypto
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    ExchangeType,
    NotifyType,
    TransformType,
)
from tests.fixtures.capture import Capture
from tests.fixtures.strongswan import logged_chunks, site_to_site_pair

PSK = "interop-psk-9f8e7d6c5b4a"


def _ike_datagrams(frames) -> list[bytes]:
    out = []
    for frame in frames:
        if (payload := frame.udp_payload(500)) is not None and payload[:4] != b"\xff":
            out.append(payload)
        elif (payload := frame.udp_payload(4500)) is not None and payload[:4] == b"\0\0\0\0":
            out.append(payload[4:])  # non-ESP marker: IKE on the NAT-T port
    return out


def _chunk(chunks, label: str) -> bytes:
    values = [data for name, data in chunks if name == label]
    assert values, f"charon logged no {label!r}"
    return values[0]


@pytest.mark.parametrize(
    ("proposal", "esp"),
    [
        ("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
        ("aes256gcm16-prfsha384-ecp384", "aes256gcm16"),
        ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
        ("aes256-sha256-modp3072", "aes256-sha256"),
        ("aes128-sha384-ecp256", "aes128-sha256"),
        ("aes256-sha512-x448", "aes256gcm16"),
    ],
)
def test_strongswan_exchange_decodes_and_verifies(netns_hosts, charon_factory, proposal, esp):
    a, b = netns_hosts(2).hosts
    initiator, _ = site_to_site_pair(
        charon_factory,
        a,
        b,
        psk=PSK,
        proposals=proposal,
        esp_proposals=esp,
        initiator_log_level=4,
    )
    with Capture(a.netns, "eth0") as cap:
        initiator.swanctl("--initiate", "--child", "kw", timeout=30)
    raw = _ike_datagrams(cap.frames)
    messages = [codec.decode_message(d) for d in raw]
    init_req, init_resp = messages[0], messages[1]
    assert init_req.header.exchange == ExchangeType.IKE_SA_INIT
    assert not init_req.header.is_response and init_resp.header.is_response
    assert codec.encode_message(init_req) == raw[0]  # byte-exact round trip
    assert codec.encode_message(init_resp) == raw[1]
    assert init_resp.notifies(NotifyType.NAT_DETECTION_SOURCE_IP)

    chosen = init_resp.get(codec.SA).proposals[0]
    by_type = {t.type: t for t in chosen.transforms}
    prf = crypto.prf_for(by_type[TransformType.PRF].id)
    enc_t = by_type[TransformType.ENCR]
    encr = crypto.encr_for(enc_t.id, enc_t.key_length)
    integ = (
        crypto.integ_for(by_type[TransformType.INTEG].id)
        if (TransformType.INTEG in by_type)
        else None
    )
    group = by_type[TransformType.KE].id
    # The responder's public value passes this codebase's checks for its group.
    assert len(crypto.key_exchange(group).shared_secret(init_resp.get(codec.KE).data)) > 0

    log = logged_chunks(initiator.log_path.read_text())
    shared = _chunk(log, "shared Diffie Hellman secret")
    ni, nr = init_req.get(codec.Nonce).data, init_resp.get(codec.Nonce).data
    keys = crypto.derive_ike_keys(
        prf, encr, integ, shared, ni, nr, init_req.header.spi_i, init_resp.header.spi_r
    )
    assert keys.skeyseed == _chunk(log, "SKEYSEED")
    for ours, label in (
        (keys.sk_d, "Sk_d secret"),
        (keys.sk_ei, "Sk_ei secret"),
        (keys.sk_er, "Sk_er secret"),
        (keys.sk_pi, "Sk_pi secret"),
        (keys.sk_pr, "Sk_pr secret"),
    ):
        assert ours == _chunk(log, label), label
    if integ:
        assert keys.sk_ai == _chunk(log, "Sk_ai secret")

    # IKE_AUTH, decrypted with keys derived here.
    out_i, _ = crypto.sk_ciphers(keys, encr, integ, initiator=True)
    out_r, _ = crypto.sk_ciphers(keys, encr, integ, initiator=False)
    auth_req, auth_resp = messages[2], messages[3]
    assert auth_req.header.exchange == ExchangeType.IKE_AUTH
    inner_req = codec.open_encrypted(raw[2], auth_req, out_i)
    inner_resp = codec.open_encrypted(raw[3], auth_resp, out_r)
    idi = next(p for p in inner_req if isinstance(p, codec.IDi))
    idr = next(p for p in inner_resp if isinstance(p, codec.IDr))
    assert (idi.to_text(), idr.to_text()) == (f"{a.name}.lab", f"{b.name}.lab")
    assert any(isinstance(p, codec.TSi) for p in inner_req)
    auth_i = next(p for p in inner_req if isinstance(p, codec.AUTH))
    auth_r = next(p for p in inner_resp if isinstance(p, codec.AUTH))
    assert crypto.verify_psk_auth(
        prf, PSK.encode(), auth_i.data, raw[0], nr, keys.sk_pi, idi.encode_body()
    )
    assert crypto.verify_psk_auth(
        prf, PSK.encode(), auth_r.data, raw[1], ni, keys.sk_pr, idr.encode_body()
    )
    assert not crypto.verify_psk_auth(
        prf, b"wrong-psk-wrong-psk", auth_i.data, raw[0], nr, keys.sk_pi, idi.encode_body()
    )
    # A flipped bit in the SK payload is an integrity error, never anything else.
    tampered = bytearray(raw[3])
    tampered[-1] ^= 1
    with pytest.raises(codec.IkeIntegrityError):
        codec.open_encrypted(bytes(tampered), codec.decode_message(bytes(tampered)), out_r)
