"""Proposals: strongSwan-style proposal strings, and selection (RFC 7296 2.7, 3.3).

    parse_proposal_string("aes256gcm16-prfsha384-x25519", "ike") -> ProposalSpec
    spec.to_proposal(number, spi) -> codec.Proposal      (what goes into an SA payload)
    select_proposal(ours, theirs) -> codec.Proposal | None
    describe(codec.Proposal) -> "aes256gcm16-prfsha384-x25519"   (logs, status)

Keywords follow strongSwan's (docs.strongswan.org, "IKEv2 Cipher Suites"): for IKE, an
integrity keyword without a prf keyword also sets the PRF of the same hash; ESP/AH take
no PRF, a KE keyword there means PFS, and esn/noesn choose sequence numbers (noesn when
absent). Several algorithms of one type may be listed. Weak algorithms are refused
unless allow_weak is set (crypto.check_strength says which and how to enable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .codec import Proposal, Transform
from .constants import EncrId, EsnId, IntegId, KeGroup, PrfId, ProtocolId, TransformType
from .crypto import UnsupportedAlgorithmError, WeakAlgorithmError, check_strength

_AEAD_ICV = {
    "16": EncrId.AES_GCM_16,
    "128": EncrId.AES_GCM_16,
    "12": EncrId.AES_GCM_12,
    "96": EncrId.AES_GCM_12,
    "8": EncrId.AES_GCM_8,
    "64": EncrId.AES_GCM_8,
}
ENCR_WORDS: dict[str, tuple[int, int | None]] = {
    "aes128": (EncrId.AES_CBC, 128),
    "aes192": (EncrId.AES_CBC, 192),
    "aes256": (EncrId.AES_CBC, 256),
    "aes": (EncrId.AES_CBC, 128),
    "chacha20poly1305": (EncrId.CHACHA20_POLY1305, None),
    "3des": (EncrId.TRIPLE_DES, None),
    "des": (EncrId.DES, None),
    "blowfish": (EncrId.BLOWFISH, 128),
    "null": (EncrId.NULL, None),
}
for _bits in (128, 192, 256):
    for _icv, _id in _AEAD_ICV.items():
        ENCR_WORDS[f"aes{_bits}gcm{_icv}"] = (_id, _bits)
INTEG_WORDS = {
    "sha256": IntegId.HMAC_SHA2_256_128,
    "sha2_256": IntegId.HMAC_SHA2_256_128,
    "sha384": IntegId.HMAC_SHA2_384_192,
    "sha2_384": IntegId.HMAC_SHA2_384_192,
    "sha512": IntegId.HMAC_SHA2_512_256,
    "sha2_512": IntegId.HMAC_SHA2_512_256,
    "sha1": IntegId.HMAC_SHA1_96,
    "sha": IntegId.HMAC_SHA1_96,
    "md5": IntegId.HMAC_MD5_96,
}
PRF_WORDS = {
    "prfsha256": PrfId.HMAC_SHA2_256,
    "prfsha384": PrfId.HMAC_SHA2_384,
    "prfsha512": PrfId.HMAC_SHA2_512,
    "prfsha1": PrfId.HMAC_SHA1,
    "prfmd5": PrfId.HMAC_MD5,
}
PRF_OF_INTEG = {
    IntegId.HMAC_SHA2_256_128: PrfId.HMAC_SHA2_256,
    IntegId.HMAC_SHA2_384_192: PrfId.HMAC_SHA2_384,
    IntegId.HMAC_SHA2_512_256: PrfId.HMAC_SHA2_512,
    IntegId.HMAC_SHA1_96: PrfId.HMAC_SHA1,
    IntegId.HMAC_MD5_96: PrfId.HMAC_MD5,
}
KE_WORDS = {
    "modp2048": KeGroup.MODP_2048,
    "modp3072": KeGroup.MODP_3072,
    "modp4096": KeGroup.MODP_4096,
    "modp1024": KeGroup.MODP_1024,
    "modp1536": KeGroup.MODP_1536,
    "modp768": KeGroup.MODP_768,
    "ecp256": KeGroup.ECP_256,
    "ecp384": KeGroup.ECP_384,
    "ecp521": KeGroup.ECP_521,
    "ecp192": KeGroup.ECP_192,
    "ecp224": KeGroup.ECP_224,
    "x25519": KeGroup.CURVE25519,
    "curve25519": KeGroup.CURVE25519,
    "x448": KeGroup.CURVE448,
    "curve448": KeGroup.CURVE448,
}
ESN_WORDS = {"esn": EsnId.ESN, "noesn": EsnId.NO_ESN}
AEAD_IDS = {EncrId.AES_GCM_16, EncrId.AES_GCM_12, EncrId.AES_GCM_8, EncrId.CHACHA20_POLY1305}
PROTOCOLS = {"ike": ProtocolId.IKE, "esp": ProtocolId.ESP, "ah": ProtocolId.AH}


@dataclass(frozen=True)
class ProposalSpec:
    protocol: str  # ike | esp | ah
    encr: tuple[tuple[int, int | None], ...] = ()
    integ: tuple[int, ...] = ()
    prf: tuple[int, ...] = ()
    ke: tuple[int, ...] = ()
    esn: tuple[int, ...] = field(default=())

    def to_proposal(self, number: int = 1, spi: bytes = b"") -> Proposal:
        transforms = [Transform(TransformType.ENCR, i, bits) for i, bits in self.encr]
        transforms += [Transform(TransformType.PRF, i) for i in self.prf]
        transforms += [Transform(TransformType.INTEG, i) for i in self.integ]
        transforms += [Transform(TransformType.KE, i) for i in self.ke]
        transforms += [Transform(TransformType.ESN, i) for i in self.esn]
        return Proposal(number, PROTOCOLS[self.protocol], spi, transforms)


def parse_proposal_string(text: str, protocol: str, *, allow_weak: bool = False) -> ProposalSpec:
    """A strongSwan proposal string for "ike", "esp" or "ah"; ValueError says what is wrong
    (WeakAlgorithmError, a ValueError too, for weak algorithms)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty proposal")
    encr, integ, prf, ke, esn = [], [], [], [], []
    for word in text.strip().lower().split("-"):
        try:
            if word in ENCR_WORDS and protocol != "ah":
                ident, bits = ENCR_WORDS[word]
                check_strength("encr", ident, allow_weak)
                encr.append((ident, bits))
            elif word in INTEG_WORDS:
                check_strength("integ", INTEG_WORDS[word], allow_weak)
                integ.append(INTEG_WORDS[word])
            elif word in PRF_WORDS and protocol == "ike":
                check_strength("prf", PRF_WORDS[word], allow_weak)
                prf.append(PRF_WORDS[word])
            elif word in KE_WORDS:
                check_strength("ke", KE_WORDS[word], allow_weak)
                ke.append(KE_WORDS[word])
            elif word in ESN_WORDS and protocol != "ike":
                esn.append(ESN_WORDS[word])
            else:
                raise ValueError(f"{text!r}: unknown {protocol.upper()} algorithm {word!r}")
        except WeakAlgorithmError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
    aead = [e for e in encr if e[0] in AEAD_IDS]
    if aead and len(aead) != len(encr):
        raise ValueError(f"{text!r}: AEAD and non-AEAD ciphers cannot share a proposal")
    if protocol == "ike":
        if not encr:
            raise ValueError(f"{text!r}: an IKE proposal needs an encryption algorithm")
        if not aead and not integ:
            raise ValueError(f"{text!r}: a non-AEAD IKE proposal needs an integrity algorithm")
        if aead and integ and not prf:
            prf = [PRF_OF_INTEG[i] for i in integ]
            integ = []
        elif aead and integ:
            raise ValueError(f"{text!r}: AEAD ciphers take no integrity algorithm")
        if not prf:
            prf = [PRF_OF_INTEG[i] for i in integ]
        if not ke:
            raise ValueError(f"{text!r}: an IKE proposal needs a key exchange group")
    else:
        if protocol == "esp" and not encr:
            raise ValueError(f"{text!r}: an ESP proposal needs an encryption algorithm")
        if protocol == "esp" and not aead and not integ:
            raise ValueError(f"{text!r}: a non-AEAD ESP proposal needs an integrity algorithm")
        if aead and integ:
            raise ValueError(f"{text!r}: AEAD ciphers take no integrity algorithm")
        if protocol == "ah" and not integ:
            raise ValueError(f"{text!r}: an AH proposal needs an integrity algorithm")
        esn = esn or [EsnId.NO_ESN]
    return ProposalSpec(
        protocol, tuple(encr), tuple(integ), tuple(dict.fromkeys(prf)), tuple(ke), tuple(esn)
    )


def unsupported_ike(spec: ProposalSpec) -> str | None:
    """What of an IKE proposal the engine cannot do (None: it can do all of it); a
    parsed-but-unimplemented transform would only fail at negotiation."""
    from .crypto import SUPPORTED_GROUPS, encr_for, integ_for, prf_for

    try:
        for ident, bits in spec.encr:
            encr_for(ident, bits, allow_weak=True)
        for ident in spec.integ:
            integ_for(ident, allow_weak=True)
        for ident in spec.prf:
            prf_for(ident, allow_weak=True)
    except UnsupportedAlgorithmError as exc:
        return f"keywayd's IKE engine cannot use it ({exc})"
    missing = [g for g in spec.ke if g not in SUPPORTED_GROUPS]
    if missing:
        return f"keywayd's IKE engine does not implement KE group(s) {missing}"
    return None


def _choices(proposal: Proposal) -> dict[int, list[tuple[int, int | None]]]:
    out: dict[int, list[tuple[int, int | None]]] = {}
    for t in proposal.transforms:
        out.setdefault(t.type, []).append((t.id, t.key_length))
    if proposal.protocol in (ProtocolId.ESP, ProtocolId.AH):
        out.setdefault(TransformType.ESN, [(EsnId.NO_ESN, None)])
        # KE NONE offered means "PFS optional": the same as no KE transform.
        if out.get(TransformType.KE) == [(KeGroup.NONE, None)]:
            del out[TransformType.KE]
    # INTEG NONE with an AEAD cipher is allowed and means no INTEG transform.
    if out.get(TransformType.INTEG) == [(IntegId.NONE, None)]:
        del out[TransformType.INTEG]
    return out


def _match(ours: Proposal, theirs: Proposal, prefer_ours: bool) -> Proposal | None:
    if ours.protocol != theirs.protocol:
        return None
    mine, peer = _choices(ours), _choices(theirs)
    if mine.keys() != peer.keys():
        return None
    chosen = []
    for ttype in sorted(mine):
        first, second = (mine[ttype], peer[ttype]) if prefer_ours else (peer[ttype], mine[ttype])
        pick = next((c for c in first if c in second), None)
        if pick is None:
            return None
        chosen.append(Transform(ttype, pick[0], pick[1]))
    return Proposal(theirs.number, theirs.protocol, theirs.spi, chosen)


def select_proposal(
    ours: list[Proposal], theirs: list[Proposal], prefer_ours: bool = True
) -> Proposal | None:
    """The proposal a responder accepts: one transform of each type, the peer's proposal
    number and SPI. Like strongSwan's default, our configured order wins (prefer_ours);
    None means NO_PROPOSAL_CHOSEN."""
    outer, inner = (ours, theirs) if prefer_ours else (theirs, ours)
    for a in outer:
        for b in inner:
            mine, peer = (a, b) if prefer_ours else (b, a)
            chosen = _match(mine, peer, prefer_ours)
            if chosen is not None:
                return chosen
    return None


def proposal_acceptable(ours: list[Proposal], chosen: Proposal) -> bool:
    """An initiator's check of the responder's choice: one transform per type, all from
    one of our proposals (RFC 7296 2.7: anything else is an error)."""
    choices = _choices(chosen)
    if any(len(v) != 1 for v in choices.values()):
        return False
    for proposal in ours:
        mine = _choices(proposal)
        if (
            proposal.protocol == chosen.protocol
            and mine.keys() == choices.keys()
            and all(choices[t][0] in mine[t] for t in mine)
        ):
            return True
    return False


def describe(proposal: Proposal) -> str:
    """strongSwan-style name of a proposal, for logs and status."""
    words = []
    for t in proposal.transforms:
        if t.type == TransformType.ENCR:
            words.append(
                next((w for w, v in ENCR_WORDS.items() if v == (t.id, t.key_length)), f"encr{t.id}")
            )
        elif t.type == TransformType.INTEG:
            words.append(next((w for w, v in INTEG_WORDS.items() if v == t.id), f"integ{t.id}"))
        elif t.type == TransformType.PRF:
            words.append(next((w for w, v in PRF_WORDS.items() if v == t.id), f"prf{t.id}"))
        elif t.type == TransformType.KE:
            words.append(next((w for w, v in KE_WORDS.items() if v == t.id), f"ke{t.id}"))
        elif t.type == TransformType.ESN:
            words.append("esn" if t.id == EsnId.ESN else "noesn")
    return "-".join(words)
