"""Between the data plane's specs (dataplane/base.py) and XFRM netlink messages: SAs
and policies encoded (pyroute2's classes, and struct-packed fast paths for the bulk
installs), decoded back, the kernel's events parsed, and Keyway's policy priorities.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import socket
import struct

from pyroute2.netlink import (
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError

from ..base import (
    AcquireEvent,
    DataPlaneError,
    Direction,
    ExpireEvent,
    IpsecProto,
    Lifetime,
    MappingEvent,
    Mode,
    PolicyAction,
    PolicyId,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
    UdpEncap,
    is_keyway_reqid,
)
from .messages import (
    _AEAD_OF_NAME,
    _CRYPT_OF_NAME,
    _INTEG_OF_NAME,
    AEAD_ALGS,
    CRYPT_ALGS,
    DIR_NUM,
    DIR_OF_NUM,
    DROP_PRIO_BAND,
    INTEG_ALGS,
    MODE_NUM,
    MODE_OF_NUM,
    PASS_PRIO_BAND,
    PRIO_BASE,
    PROTO_NUM,
    PROTO_OF_NUM,
    UDP_ENCAP_ESPINUDP,
    XFRM_INF,
    XFRM_MSG_ACQUIRE,
    XFRM_MSG_EXPIRE,
    XFRM_MSG_MAPPING,
    XFRM_POLICY_ALLOW,
    XFRM_POLICY_BLOCK,
    XFRM_STATE_ESN,
    MarshalXfrm,
    _lft_cfg_fields,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
    xfrm_usersa_id,
    xfrm_usersa_info,
)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


@functools.lru_cache(maxsize=1024)
def _pack_addr(addr: str) -> bytes:
    """xfrm_address_t: 16 bytes, IPv4 in the first 4."""
    if not addr:
        return bytes(16)
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def _unpack_addr(raw: bytes, family: int) -> str:
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


def _selector_values(sel: Selector, p: str = "sel_") -> dict:
    src = ipaddress.ip_network(sel.src, strict=False)
    dst = ipaddress.ip_network(sel.dst, strict=False)
    if src.version != dst.version:
        raise DataPlaneError(f"selector {sel.src} -> {sel.dst}: mixed address families")
    return {
        f"{p}daddr": dst.network_address.packed.ljust(16, b"\0"),
        f"{p}saddr": src.network_address.packed.ljust(16, b"\0"),
        f"{p}dport": sel.dport,
        f"{p}dport_mask": 0xFFFF if sel.dport else 0,
        f"{p}sport": sel.sport,
        f"{p}sport_mask": 0xFFFF if sel.sport else 0,
        f"{p}family": socket.AF_INET6 if src.version == 6 else socket.AF_INET,
        f"{p}prefixlen_d": dst.prefixlen,
        f"{p}prefixlen_s": src.prefixlen,
        f"{p}proto": sel.proto,
        f"{p}ifindex": 0,
        f"{p}user": 0,
    }


def _selector_of(msg: dict, p: str = "sel_", family: int | None = None) -> Selector:
    fam = msg[f"{p}family"] or family or socket.AF_INET
    src = _unpack_addr(msg[f"{p}saddr"], fam)
    dst = _unpack_addr(msg[f"{p}daddr"], fam)
    return Selector(
        src=f"{src}/{msg[f'{p}prefixlen_s']}",
        dst=f"{dst}/{msg[f'{p}prefixlen_d']}",
        proto=msg[f"{p}proto"],
        sport=msg[f"{p}sport"] if msg[f"{p}sport_mask"] else 0,
        dport=msg[f"{p}dport"] if msg[f"{p}dport_mask"] else 0,
    )


def _specificity(sel: Selector) -> int:
    score = (_prefix_parts(sel.src)[1] + _prefix_parts(sel.dst)[1]) * 4
    return score + (2 if sel.proto else 0) + (1 if sel.sport else 0) + (1 if sel.dport else 0)


def effective_priority(policy: PolicySpec) -> int:
    """The priority the kernel gets for `policy` (lower wins): its own, or one derived
    from the selector's specificity inside the band of its action."""
    if policy.priority:
        return policy.priority
    if policy.action is PolicyAction.PASS:
        return PASS_PRIO_BAND[1] - _specificity(policy.selector)
    if policy.action is PolicyAction.DROP:
        return DROP_PRIO_BAND[1] - _specificity(policy.selector)
    return PRIO_BASE - _specificity(policy.selector)


def _in_band(prio: int, band: tuple[int, int]) -> bool:
    return band[0] <= prio <= band[1]


def _lifetime_values(lt: Lifetime, p: str = "lft_") -> dict:
    def lim(v: int) -> int:
        return v if v else XFRM_INF

    return {
        f"{p}soft_byte_limit": lim(lt.soft_bytes),
        f"{p}hard_byte_limit": lim(lt.hard_bytes),
        f"{p}soft_packet_limit": lim(lt.soft_packets),
        f"{p}hard_packet_limit": lim(lt.hard_packets),
        f"{p}soft_add_expires_seconds": lt.soft_seconds,
        f"{p}hard_add_expires_seconds": lt.hard_seconds,
        f"{p}soft_use_expires_seconds": 0,
        f"{p}hard_use_expires_seconds": 0,
    }


def _lifetime_of(msg: dict, p: str = "lft_") -> Lifetime:
    def lim(v: int) -> int:
        return 0 if v == XFRM_INF else v

    return Lifetime(
        soft_bytes=lim(msg[f"{p}soft_byte_limit"]),
        hard_bytes=lim(msg[f"{p}hard_byte_limit"]),
        soft_packets=lim(msg[f"{p}soft_packet_limit"]),
        hard_packets=lim(msg[f"{p}hard_packet_limit"]),
        soft_seconds=msg[f"{p}soft_add_expires_seconds"],
        hard_seconds=msg[f"{p}hard_add_expires_seconds"],
    )


def _alg_name(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode()


def _kernel_algorithms(sa: SaSpec) -> tuple[bytes | None, tuple[bytes, int] | None]:
    """The kernel's names of `sa`'s encryption (AEAD or cipher) and integrity algorithms
    (with its truncation, bits); DataPlaneError for one it has no name for."""
    enc = integ = None
    if sa.enc_alg is not None:
        name = AEAD_ALGS.get(sa.enc_alg) or CRYPT_ALGS.get(sa.enc_alg)
        if name is None:
            raise DataPlaneError(f"install_sa spi 0x{sa.spi:08x}: unknown enc_alg {sa.enc_alg!r}")
        enc = name.encode()
    if sa.integ_alg is not None:
        if sa.integ_alg not in INTEG_ALGS:
            raise DataPlaneError(
                f"install_sa spi 0x{sa.spi:08x}: unknown integ_alg {sa.integ_alg!r}"
            )
        name, trunc = INTEG_ALGS[sa.integ_alg]
        integ = (name.encode(), trunc)
    return enc, integ


def encode_sa(sa: SaSpec) -> xfrm_usersa_info:
    """Build the NEWSA/UPDSA body for `sa` (header type and flags set by the caller)."""
    family = _family(sa.dst)
    values = {
        "id_daddr": _pack_addr(sa.dst),
        "id_spi": sa.spi,
        "id_proto": PROTO_NUM[IpsecProto(sa.proto)],
        "saddr": _pack_addr(sa.src),
        "reqid": sa.reqid,
        "family": family,
        "mode": MODE_NUM[Mode(sa.mode)],
        # ESN carries the window in XFRMA_REPLAY_ESN_VAL and the kernel wants 0 here
        # (EINVAL "ESN requires replay_window to be 0"); the u8 field caps at 255.
        "replay_window": 0 if sa.esn else min(sa.replay_window, 255),
        "flags": XFRM_STATE_ESN if sa.esn else 0,
        **_lifetime_values(sa.lifetime),
    }
    if sa.selector is not None:
        values.update(_selector_values(sa.selector))
    msg = xfrm_usersa_info()
    msg.update(values)
    attrs = []
    enc, integ = _kernel_algorithms(sa)
    if sa.enc_alg in AEAD_ALGS:
        # AEAD keys are key || salt and the length in bits counts the salt (iproute2).
        attrs.append(["XFRMA_ALG_AEAD", {
            "alg_name": enc,
            "alg_key_len": len(sa.enc_key) * 8,
            "alg_icv_len": sa.icv_bits,
            "alg_key": sa.enc_key,
        }])  # fmt: skip
    elif enc is not None:
        attrs.append(["XFRMA_ALG_CRYPT", {
            "alg_name": enc,
            "alg_key_len": len(sa.enc_key) * 8,
            "alg_key": sa.enc_key,
        }])  # fmt: skip
    if integ is not None:
        name, trunc = integ
        attrs.append(["XFRMA_ALG_AUTH_TRUNC", {
            "alg_name": name,
            "alg_key_len": len(sa.integ_key) * 8,
            "alg_trunc_len": trunc,
            "alg_key": sa.integ_key,
        }])  # fmt: skip
    if sa.encap is not None:
        attrs.append(["XFRMA_ENCAP", {
            "encap_type": UDP_ENCAP_ESPINUDP,
            "encap_sport": sa.encap.sport,
            "encap_dport": sa.encap.dport,
            "encap_oa": bytes(16),
        }])  # fmt: skip
    if sa.esn:
        window = max(sa.replay_window, 0)
        bmp_len = (window + 31) // 32
        attrs.append(["XFRMA_REPLAY_ESN_VAL", {
            "bmp_len": bmp_len,
            "replay_window": window,
            "bmp": bytes(4 * bmp_len),
        }])  # fmt: skip
    if sa.mark is not None:
        attrs.append(["XFRMA_MARK", {"v": sa.mark[0], "m": sa.mark[1]}])
    if sa.if_id:
        attrs.append(["XFRMA_IF_ID", sa.if_id])
    msg["attrs"] = attrs
    return msg


def decode_sa(msg: dict, p: str = "") -> SaSpec:
    """Map a NEWSA (dump/get reply) body back to an SaSpec, keys included."""
    family = msg[f"{p}family"]
    enc_alg = integ_alg = None
    enc_key = integ_key = b""
    icv = 128
    aead = msg.get_attr("XFRMA_ALG_AEAD")
    crypt = msg.get_attr("XFRMA_ALG_CRYPT")
    auth = msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    if aead is not None:
        name = _alg_name(aead["alg_name"])
        enc_alg, enc_key, icv = _AEAD_OF_NAME.get(name, name), aead["alg_key"], aead["alg_icv_len"]
    elif crypt is not None:
        name = _alg_name(crypt["alg_name"])
        enc_alg, enc_key = _CRYPT_OF_NAME.get(name, name), crypt["alg_key"]
    if auth is not None:
        name = _alg_name(auth["alg_name"])
        integ_alg, integ_key = _INTEG_OF_NAME.get(name, name), auth["alg_key"]
    encap = msg.get_attr("XFRMA_ENCAP")
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    mark = msg.get_attr("XFRMA_MARK")
    sel = _selector_of(msg, f"{p}sel_", family)
    any_sel = (
        sel.proto == 0
        and sel.src.endswith("/0")
        and sel.dst.endswith("/0")
        and not sel.sport
        and not sel.dport
    )
    return SaSpec(
        src=_unpack_addr(msg[f"{p}saddr"], family),
        dst=_unpack_addr(msg[f"{p}id_daddr"], family),
        proto=PROTO_OF_NUM.get(msg[f"{p}id_proto"], msg[f"{p}id_proto"]),
        spi=msg[f"{p}id_spi"],
        mode=MODE_OF_NUM.get(msg[f"{p}mode"], msg[f"{p}mode"]),
        reqid=msg[f"{p}reqid"],
        enc_alg=enc_alg,
        enc_key=bytes(enc_key),
        integ_alg=integ_alg,
        integ_key=bytes(integ_key),
        icv_bits=icv,
        selector=None if any_sel else sel,  # an all-wildcard selector reads as "none"
        encap=UdpEncap(encap["encap_sport"], encap["encap_dport"]) if encap else None,
        replay_window=esn["replay_window"] if esn else msg[f"{p}replay_window"],
        esn=bool(msg[f"{p}flags"] & XFRM_STATE_ESN),
        lifetime=_lifetime_of(msg, f"{p}lft_"),
        mark=(mark["v"], mark["m"]) if mark else None,
        if_id=msg.get_attr("XFRMA_IF_ID") or 0,
    )


def encode_sa_id(sa: SaId, mark: tuple[int, int] | None = None) -> xfrm_usersa_id:
    msg = xfrm_usersa_id()
    msg.update({
        "daddr": _pack_addr(sa.dst),
        "spi": sa.spi,
        "family": _family(sa.dst),
        "proto": PROTO_NUM[IpsecProto(sa.proto)],
    })  # fmt: skip
    # A marked SA is only found when the lookup carries its mark.
    msg["attrs"] = [["XFRMA_MARK", {"v": mark[0], "m": mark[1]}]] if mark else []
    return msg


def _tmpl_values(t: Template, family: int) -> dict:
    fam = _family(t.dst) if t.dst else family
    return {
        "id_daddr": _pack_addr(t.dst),
        "id_spi": 0,
        "id_proto": PROTO_NUM[IpsecProto(t.proto)],
        "family": fam,
        "saddr": _pack_addr(t.src),
        "reqid": t.reqid,
        "mode": MODE_NUM[Mode(t.mode)],
        "share": 0,
        "optional": 0,  # level required: no SA means ACQUIRE, never a clear packet
        "aalgos": 0xFFFFFFFF,  # any algorithm (as iproute2 sets them)
        "ealgos": 0xFFFFFFFF,
        "calgos": 0xFFFFFFFF,
    }


def encode_policy(policy: PolicySpec) -> xfrm_userpolicy_info:
    """Build the NEWPOLICY/UPDPOLICY body for `policy`."""
    values = _selector_values(policy.selector)
    family = values["sel_family"]
    values.update(_lifetime_values(Lifetime()))
    values.update({
        "priority": effective_priority(policy),
        "index": 0,
        "dir": DIR_NUM[Direction(policy.direction)],
        "action": XFRM_POLICY_BLOCK if policy.action is PolicyAction.DROP else XFRM_POLICY_ALLOW,
        "flags": 0,
        "share": 0,
    })  # fmt: skip
    msg = xfrm_userpolicy_info()
    msg.update(values)
    attrs = []
    if policy.action is PolicyAction.PROTECT:
        if not policy.templates:
            raise DataPlaneError(
                f"install_policy {_policy_str(policy.id)}: PROTECT needs templates"
            )
        tmpls = [_tmpl_values(t, family) for t in policy.templates]
        attrs.append(["XFRMA_TMPL", {"templates": tmpls}])
    attrs += _mark_attrs(policy.mark, policy.if_id)
    msg["attrs"] = attrs
    return msg


_NLMSGERR = struct.Struct("=IHHIIi")  # nlmsghdr, then nlmsgerr's error


# NEWPOLICY messages per send in install_policies: about 40 KiB, well inside the
# socket's buffers (and the ACKs, 36 bytes each, inside the receive buffer).
POLICY_BATCH = 128


def _is_ack(data: bytes, seq: int) -> bool:
    """`data` is exactly the ACK (NLMSG_ERROR, error 0) of request `seq`."""
    if len(data) < _NLMSGERR.size:
        return False
    length, kind, _flags, got, _pid, error = _NLMSGERR.unpack_from(data)
    return kind == NLMSG_ERROR and got == seq and error == 0 and length == len(data)


# The NEWPOLICY fast path (bench/xfrm_install.py: pyroute2's generic encoder took two
# thirds of each install): the same bytes, packed with precompiled structs. The unit
# tests hold it to encode_policy's output, byte for byte.
_NLMSGHDR = struct.Struct("=IHHII")


_SELECTOR = struct.Struct("=16s16s2s2s2s2sHBBB3xiI")


_POLICY_TAIL = struct.Struct("=8Q4QIIBBBB4x")  # lifetimes, priority ... share, padding


_TMPL = struct.Struct("=16s4sB3xH2x16sIBBBxIII")


_NLA = struct.Struct("=HH")


_LIFETIME_NONE = (XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)


_XFRMA_TMPL, _XFRMA_MARK, _XFRMA_IF_ID = 5, 21, 31


@functools.lru_cache(maxsize=4096)
def _prefix_parts(prefix: str) -> tuple[bytes, int, int]:
    """(network address as xfrm_address_t, prefix length, family) of a selector's
    prefix, host bits cleared as ip_network(strict=False) does, without its cost."""
    address, _unused, length = prefix.partition("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        packed = socket.inet_pton(family, address)
        bits = len(packed) * 8
        plen = int(length) if length else bits
        if not 0 <= plen <= bits:
            raise ValueError(prefix)
    except (OSError, ValueError):
        # What ipaddress refuses raises here, with its message; it takes netmasks too.
        net = ipaddress.ip_network(prefix, strict=False)
        fam = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        return net.network_address.packed.ljust(16, b"\0"), net.prefixlen, fam
    mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
    network = (int.from_bytes(packed, "big") & mask).to_bytes(len(packed), "big")
    return network.ljust(16, b"\0"), plen, family


def _packed_selector(sel: Selector) -> tuple[bytes, int]:
    (src, src_len, family), (dst, dst_len, dst_family) = map(_prefix_parts, (sel.src, sel.dst))
    if family != dst_family:
        raise DataPlaneError(f"selector {sel.src} -> {sel.dst}: mixed address families")
    ports = [struct.pack("!H", v) for v in (sel.dport, 0xFFFF if sel.dport else 0,
                                            sel.sport, 0xFFFF if sel.sport else 0)]  # fmt: skip
    body = _SELECTOR.pack(dst, src, *ports, family, dst_len, src_len, sel.proto, 0, 0)
    return body, family


def _packed_template(t: Template, family: int) -> bytes:
    # id (daddr, SPI 0, proto), family, saddr, reqid, mode, share, optional 0 (an SA is
    # required), and any algorithm (as iproute2 sets them): _tmpl_values' fields.
    return _TMPL.pack(
        _pack_addr(t.dst), bytes(4), PROTO_NUM[IpsecProto(t.proto)],
        _family(t.dst) if t.dst else family, _pack_addr(t.src), t.reqid,
        MODE_NUM[Mode(t.mode)], 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
    )  # fmt: skip


def pack_policy(policy: PolicySpec, msg_type: int, flags: int, seq: int) -> bytes:
    """NEWPOLICY/UPDPOLICY for `policy` as wire bytes, header included."""
    selector, family = _packed_selector(policy.selector)
    action = XFRM_POLICY_BLOCK if policy.action is PolicyAction.DROP else XFRM_POLICY_ALLOW
    direction = DIR_NUM[Direction(policy.direction)]
    body = [
        selector,
        _POLICY_TAIL.pack(
            *_LIFETIME_NONE, 0, 0, 0, 0, effective_priority(policy), 0, direction, action, 0, 0
        ),
    ]
    if policy.action is PolicyAction.PROTECT:
        if not policy.templates:
            raise DataPlaneError(
                f"install_policy {_policy_str(policy.id)}: PROTECT needs templates"
            )
        tmpls = b"".join(_packed_template(t, family) for t in policy.templates)
        body.append(_NLA.pack(4 + len(tmpls), _XFRMA_TMPL) + tmpls)
    if policy.mark is not None:
        body.append(_NLA.pack(12, _XFRMA_MARK) + struct.pack("=II", *policy.mark))
    if policy.if_id:
        body.append(_NLA.pack(8, _XFRMA_IF_ID) + struct.pack("=I", policy.if_id))
    data = b"".join(body)
    return _NLMSGHDR.pack(16 + len(data), msg_type, flags, seq, 0) + data


_SA_BODY = struct.Struct("=16s4sB3x16s8Q4Q3IIIHBBB7x")  # after the selector


_ALGO = struct.Struct("=64sI")  # xfrm_algo; _auth/_aead add one u32


_ENCAP = struct.Struct("=H2s2s2x16s")


_REPLAY_ESN = struct.Struct("=6I")


def _nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the length excludes the padding)."""
    return _NLA.pack(4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def pack_sa(sa: SaSpec, msg_type: int, flags: int, seq: int) -> bytes:
    """NEWSA/UPDSA for `sa` as wire bytes, header included (encode_sa's bytes, which
    the unit tests hold it to)."""
    if sa.selector is not None:
        selector, _family_unused = _packed_selector(sa.selector)
    else:
        selector = bytes(_SELECTOR.size)
    lft = _lifetime_values(sa.lifetime)
    body = [
        selector,
        _SA_BODY.pack(
            _pack_addr(sa.dst), struct.pack("!I", sa.spi), PROTO_NUM[IpsecProto(sa.proto)],
            _pack_addr(sa.src), *(lft[f"lft_{n}"] for n, _unused in _lft_cfg_fields("")),
            0, 0, 0, 0, 0, 0, 0, 0, sa.reqid, _family(sa.dst), MODE_NUM[Mode(sa.mode)],
            0 if sa.esn else min(sa.replay_window, 255), XFRM_STATE_ESN if sa.esn else 0,
        ),
    ]  # fmt: skip
    enc, integ = _kernel_algorithms(sa)
    if sa.enc_alg in AEAD_ALGS:
        head = _ALGO.pack(enc, len(sa.enc_key) * 8)
        body.append(_nla(18, head + struct.pack("=I", sa.icv_bits) + sa.enc_key))
    elif enc is not None:
        body.append(_nla(2, _ALGO.pack(enc, len(sa.enc_key) * 8) + sa.enc_key))
    if integ is not None:
        head = _ALGO.pack(integ[0], len(sa.integ_key) * 8)
        body.append(_nla(20, head + struct.pack("=I", integ[1]) + sa.integ_key))
    if sa.encap is not None:
        ports = (struct.pack("!H", sa.encap.sport), struct.pack("!H", sa.encap.dport))
        body.append(_nla(4, _ENCAP.pack(UDP_ENCAP_ESPINUDP, *ports, bytes(16))))
    if sa.esn:
        window = max(sa.replay_window, 0)
        bmp_len = (window + 31) // 32
        state = _REPLAY_ESN.pack(bmp_len, 0, 0, 0, 0, window) + bytes(4 * bmp_len)
        body.append(_nla(23, state))
    if sa.mark is not None:
        body.append(_nla(_XFRMA_MARK, struct.pack("=II", *sa.mark)))
    if sa.if_id:
        body.append(_nla(_XFRMA_IF_ID, struct.pack("=I", sa.if_id)))
    data = b"".join(body)
    return _NLMSGHDR.pack(16 + len(data), msg_type, flags, seq, 0) + data


def _mark_attrs(mark: tuple[int, int] | None, if_id: int) -> list:
    attrs: list = []
    if mark is not None:
        attrs.append(["XFRMA_MARK", {"v": mark[0], "m": mark[1]}])
    if if_id:
        attrs.append(["XFRMA_IF_ID", if_id])
    return attrs


def decode_policy(msg: dict, p: str = "") -> PolicySpec:
    family = msg[f"{p}sel_family"]
    tmpl_attr = msg.get_attr("XFRMA_TMPL") if not p else None
    templates = []
    for t in (tmpl_attr or {}).get("templates", []):
        tfam = t["family"] or family
        mode = MODE_OF_NUM.get(t["mode"], t["mode"])
        tunnel = mode is Mode.TUNNEL
        templates.append(Template(
            proto=PROTO_OF_NUM.get(t["id_proto"], t["id_proto"]),
            mode=mode,
            reqid=t["reqid"],
            src=_unpack_addr(t["saddr"], tfam) if tunnel else "",
            dst=_unpack_addr(t["id_daddr"], tfam) if tunnel else "",
        ))  # fmt: skip
    if msg[f"{p}action"] == XFRM_POLICY_BLOCK:
        action = PolicyAction.DROP
    else:
        action = PolicyAction.PROTECT if templates else PolicyAction.PASS
    mark = msg.get_attr("XFRMA_MARK") if not p else None
    return PolicySpec(
        selector=_selector_of(msg, f"{p}sel_"),
        direction=DIR_OF_NUM.get(msg[f"{p}dir"], msg[f"{p}dir"]),
        action=action,
        templates=tuple(templates),
        priority=msg[f"{p}priority"],
        mark=(mark["v"], mark["m"]) if mark else None,
        if_id=(msg.get_attr("XFRMA_IF_ID") or 0) if not p else 0,
    )


def encode_policy_id(pid: PolicyId) -> xfrm_userpolicy_id:
    msg = xfrm_userpolicy_id()
    msg.update(_selector_values(pid.selector))
    msg.update({"index": 0, "dir": DIR_NUM[Direction(pid.direction)]})
    msg["attrs"] = _mark_attrs(pid.mark, pid.if_id)
    return msg


def is_keyway_policy(policy: PolicySpec) -> bool:
    """Keyway's policy: all templates carry a Keyway reqid (PROTECT), or, having no
    templates, its priority lies in Keyway's band for its action (PASS/DROP)."""
    if policy.action is PolicyAction.PROTECT:
        return bool(policy.templates) and all(is_keyway_reqid(t.reqid) for t in policy.templates)
    band = PASS_PRIO_BAND if policy.action is PolicyAction.PASS else DROP_PRIO_BAND
    return _in_band(policy.priority, band)


def to_bytes(msg: nlmsg, msg_type: int, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """Encode a message with its netlink header (type, flags, seq) to wire bytes."""
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.reset()
    msg.encode()
    return bytes(msg.data)


def from_bytes(data: bytes) -> list[nlmsg]:
    """Parse wire bytes (one or more messages) with the XFRM marshal."""
    return list(MarshalXfrm().parse(data))


def _sa_str(sa: SaId | SaSpec) -> str:
    return f"{IpsecProto(sa.proto).value} spi 0x{sa.spi:08x} {sa.dst}"


def _policy_str(pid: PolicyId) -> str:
    s = pid.selector
    text = f"{Direction(pid.direction).value} {s.src} -> {s.dst}"
    if s.proto:
        text += f" proto {s.proto}"
    if s.sport or s.dport:
        text += f" ports {s.sport}->{s.dport}"
    if pid.mark:
        text += f" mark 0x{pid.mark[0]:x}/0x{pid.mark[1]:x}"
    if pid.if_id:
        text += f" if_id {pid.if_id}"
    return text


def _refused(op: str, what: str, exc: NetlinkError) -> DataPlaneError:
    code = exc.code
    text = f"{op} {what}: kernel refused: {os.strerror(code)} (errno {code})"
    detail = exc.args[1] if len(exc.args) > 1 else None
    if detail and detail != os.strerror(code):
        text += f": {detail}"  # the kernel's extended-ack message, when it sends one
    return DataPlaneError(text)


def parse_events(data: bytes) -> list[AcquireEvent | ExpireEvent | MappingEvent]:
    """Turn ACQUIRE / EXPIRE / MAPPING multicast messages into plane events (others are
    skipped)."""
    out: list[AcquireEvent | ExpireEvent | MappingEvent] = []
    for msg in MarshalXfrm().parse(data):
        mtype = msg["header"]["type"]
        if mtype == XFRM_MSG_ACQUIRE:
            family = msg["sel_family"] or msg["policy_sel_family"]
            tmpls = (msg.get_attr("XFRMA_TMPL") or {}).get("templates", [])
            # The acquire header has no reqid: the policy's templates carry it.
            reqids = [t["reqid"] for t in tmpls]
            reqid = next((r for r in reqids if is_keyway_reqid(r)), reqids[0] if reqids else 0)
            out.append(AcquireEvent(
                selector=_selector_of(msg, "sel_", family),
                reqid=reqid,
                src=_unpack_addr(msg["saddr"], family),
                dst=_unpack_addr(msg["id_daddr"], family),
            ))  # fmt: skip
        elif mtype == XFRM_MSG_EXPIRE:
            family = msg["state_family"]
            proto = msg["state_id_proto"]
            out.append(ExpireEvent(
                sa=SaId(
                    _unpack_addr(msg["state_id_daddr"], family),
                    PROTO_OF_NUM.get(proto, proto),
                    msg["state_id_spi"],
                ),
                hard=bool(msg["hard"]),
                reqid=msg["state_reqid"],
            ))  # fmt: skip
        elif mtype == XFRM_MSG_MAPPING:
            family = msg["id_family"]
            proto = msg["id_proto"]
            out.append(MappingEvent(
                sa=SaId(
                    _unpack_addr(msg["id_daddr"], family), PROTO_OF_NUM.get(proto, proto),
                    msg["id_spi"],
                ),
                reqid=msg["reqid"],
                src=_unpack_addr(msg["new_saddr"], family),
                sport=msg["new_sport"],
            ))  # fmt: skip
    return out


LEGACY_REPLAY_WINDOW_MAX = 32  # the bitmap of SAs without ESN


def as_kernel_holds(sa: SaSpec) -> SaSpec:
    """`sa` as the kernel will report it back: without ESN it keeps at most a 32-packet
    replay window (the legacy bitmap). Declarative callers compare with this."""
    if not sa.esn and sa.replay_window > LEGACY_REPLAY_WINDOW_MAX:
        return dataclasses.replace(sa, replay_window=LEGACY_REPLAY_WINDOW_MAX)
    return sa


def _nl_attrs(data: bytes):
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _sad_attrs(payload: bytes) -> dict:
    # XFRMA_SAD_CNT (1): u32 number of SAs.
    return {"sas": next((struct.unpack("=I", v[:4])[0] for k, v in _nl_attrs(payload)
                         if k == 1), 0)}  # fmt: skip


def _spd_attrs(payload: bytes) -> dict:
    # XFRMA_SPD_INFO (1): struct xfrmu_spdinfo {incnt, outcnt, fwdcnt, inscnt, ...}.
    for kind, value in _nl_attrs(payload):
        if kind == 1 and len(value) >= 12:
            incnt, outcnt, fwdcnt = struct.unpack_from("=III", value)
            return {"policies": {"in": incnt, "out": outcnt, "fwd": fwdcnt}}
    return {"policies": {}}
