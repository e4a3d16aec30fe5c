"""strongSwan proposal strings and RFC 7296 proposal selection."""

from __future__ import annotations

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike.constants import (
    EncrId,
    EsnId,
    IntegId,
    KeGroup,
    PrfId,
    TransformType,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.proposals import (
    describe,
    parse_proposal_string,
    proposal_acceptable,
    select_proposal,
)


def test_aead_ike_proposal():
    spec = parse_proposal_string("aes256gcm16-prfsha384-x25519", "ike")
    assert spec.encr == ((EncrId.AES_GCM_16, 256),)
    assert (spec.integ, spec.prf, spec.ke) == ((), (PrfId.HMAC_SHA2_384,), (KeGroup.CURVE25519,))


def test_non_aead_integrity_keyword_also_sets_the_prf():
    spec = parse_proposal_string("aes128-sha256-modp3072", "ike")
    assert spec.encr == ((EncrId.AES_CBC, 128),)
    assert spec.integ == (IntegId.HMAC_SHA2_256_128,)
    assert spec.prf == (PrfId.HMAC_SHA2_256,)
    assert spec.ke == (KeGroup.MODP_3072,)


def test_several_algorithms_per_type_and_esp_defaults():
    spec = parse_proposal_string("aes128-aes256-sha256-sha384-x25519-ecp256", "ike")
    assert [e[1] for e in spec.encr] == [128, 256]
    assert spec.prf == (PrfId.HMAC_SHA2_256, PrfId.HMAC_SHA2_384)
    esp = parse_proposal_string("aes128gcm16", "esp")
    assert (esp.prf, esp.ke, esp.esn) == ((), (), (EsnId.NO_ESN,))
    pfs = parse_proposal_string("chacha20poly1305-x25519-esn", "esp")
    assert (pfs.ke, pfs.esn) == ((KeGroup.CURVE25519,), (EsnId.ESN,))
    ah = parse_proposal_string("sha256", "ah")
    assert (ah.encr, ah.integ) == ((), (IntegId.HMAC_SHA2_256_128,))


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("aes256gcm16-prfsha384", "ike", "needs a key exchange group"),
        ("aes256-x25519", "ike", "needs an integrity algorithm"),
        ("aes257-sha256-x25519", "ike", "unknown IKE algorithm 'aes257'"),
        ("aes128gcm16-sha256", "esp", "take no integrity"),
        ("aes128-aes128gcm16-sha256-x25519", "ike", "AEAD and non-AEAD"),
        ("prfsha256", "esp", "unknown ESP algorithm"),
        ("", "ike", "empty proposal"),
    ],
)
def test_bad_strings_say_what_is_wrong(text, kind, message):
    with pytest.raises(ValueError, match=message):
        parse_proposal_string(text, kind)


@pytest.mark.parametrize(
    "text",
    ["3des-sha1-modp1024", "aes128-md5-modp2048", "aes128-sha256-modp1536", "aes128-sha1-x25519"],
)
def test_weak_algorithms_need_opt_in(text):
    with pytest.raises(ValueError, match="weak and refused by default; set allow_weak"):
        parse_proposal_string(text, "ike")
    assert parse_proposal_string(text, "ike", allow_weak=True).encr


def test_selection_takes_our_order_and_the_peer_s_number_and_spi():
    ours = [
        parse_proposal_string("aes256gcm16-prfsha384-ecp384", "ike").to_proposal(1),
        parse_proposal_string("aes128gcm16-prfsha256-x25519", "ike").to_proposal(2),
    ]
    theirs = [
        parse_proposal_string("aes128gcm16-prfsha256-x25519-ecp384", "ike").to_proposal(1, b""),
        parse_proposal_string("aes256gcm16-prfsha384-ecp384", "ike").to_proposal(2),
    ]
    chosen = select_proposal(ours, theirs)
    assert chosen.number == 2 and describe(chosen) == "aes256gcm16-prfsha384-ecp384"
    by_peer = select_proposal(ours, theirs, prefer_ours=False)
    assert by_peer.number == 1 and describe(by_peer) == "aes128gcm16-prfsha256-x25519"
    assert proposal_acceptable(ours, chosen)


def test_key_length_and_missing_types_prevent_a_match():
    ours = [parse_proposal_string("aes256-sha256-x25519", "ike").to_proposal()]
    assert (
        select_proposal(ours, [parse_proposal_string("aes128-sha256-x25519", "ike").to_proposal()])
        is None
    )
    esp_pfs = [parse_proposal_string("aes128gcm16-x25519", "esp").to_proposal(1, b"\1" * 4)]
    esp_plain = [parse_proposal_string("aes128gcm16", "esp").to_proposal(1, b"\2" * 4)]
    assert select_proposal(esp_pfs, esp_plain) is None
    chosen = select_proposal(esp_plain, esp_plain)
    assert chosen.spi == b"\2" * 4
    assert {t.type for t in chosen.transforms} == {TransformType.ENCR, TransformType.ESN}


def test_an_initiator_rejects_a_choice_it_never_offered():
    ours = [parse_proposal_string("aes256gcm16-prfsha384-x25519", "ike").to_proposal()]
    other = parse_proposal_string("aes128gcm16-prfsha256-x25519", "ike").to_proposal()
    assert not proposal_acceptable(ours, other)
    two_groups = parse_proposal_string("aes256gcm16-prfsha384-x25519-ecp256", "ike")
    assert not proposal_acceptable([two_groups.to_proposal()], two_groups.to_proposal())
