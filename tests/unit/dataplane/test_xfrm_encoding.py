"""XFRM netlink encoding without a kernel: struct sizes, byte layout at known offsets,
SA and policy messages to bytes and back, event parsing; and the RecordingPlane fake."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import replace

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import (
    KEYWAY_REQID_MIN,
    AcquireEvent,
    DataPlaneError,
    Direction,
    ExpireEvent,
    IpsecProto,
    Lifetime,
    MappingEvent,
    Mode,
    PolicyAction,
    PolicySpec,
    SaId,
    SaSpec,
    Selector,
    Template,
    UdpEncap,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm import codec, messages

REQID = KEYWAY_REQID_MIN + 3
HDR = 16  # struct nlmsghdr


def test_struct_sizes_match_xfrm_h():
    assert messages.STRUCT_SIZES == {
        "xfrm_usersa_info": 224,
        "xfrm_usersa_id": 24,
        "xfrm_userpolicy_info": 168,
        "xfrm_userpolicy_id": 64,
        "xfrm_userspi_info": 232,
        "xfrm_user_acquire": 280,
        "xfrm_user_expire": 232,
        "xfrm_aevent_id": 48,
        "xfrm_user_mapping": 64,
        "xfrm_selector": 56,
        "xfrm_id": 24,
        "xfrm_user_tmpl": 64,
        "xfrm_lifetime_cfg": 64,
        "xfrm_lifetime_cur": 32,
        "xfrm_stats": 12,
    }


SAS = [
    SaSpec("192.0.2.11", "192.0.2.12", IpsecProto.ESP, 0xC0DE0001, Mode.TUNNEL, REQID,
           enc_alg="aes-gcm-16", enc_key=bytes(range(36)),
           selector=Selector("10.1.0.0/24", "10.2.0.0/24"), encap=UdpEncap(4500, 4501),
           lifetime=Lifetime(soft_bytes=1 << 30, hard_bytes=1 << 31, soft_seconds=3000,
                             hard_seconds=3600),
           mark=(0x10, 0xFF), if_id=4),
    SaSpec("2001:db8::11", "2001:db8::12", IpsecProto.ESP, 0x1234, Mode.TRANSPORT, REQID,
           enc_alg="aes-cbc", enc_key=bytes(16), integ_alg="hmac-sha2-512-256",
           integ_key=bytes(range(64)), esn=False, replay_window=64,
           selector=Selector("2001:db8::11/128", "2001:db8::12/128", proto=17, sport=500,
                             dport=4500)),
    SaSpec("192.0.2.11", "192.0.2.12", IpsecProto.AH, 0x777, Mode.TUNNEL, REQID,
           integ_alg="hmac-sha2-256-128", integ_key=bytes(32), replay_window=1024),
    SaSpec("192.0.2.11", "192.0.2.12", IpsecProto.ESP, 0x778, Mode.TUNNEL, REQID,
           enc_alg="chacha20-poly1305", enc_key=bytes(36)),
    SaSpec("192.0.2.11", "192.0.2.12", IpsecProto.ESP, 0x779, Mode.TUNNEL, REQID,
           enc_alg="null", integ_alg="hmac-sha2-384-192", integ_key=bytes(48)),
]  # fmt: skip


@pytest.mark.parametrize("sa", SAS, ids=lambda s: f"{s.proto}-{s.enc_alg}-{s.integ_alg}")
def test_sa_round_trip(sa):
    data = codec.to_bytes(codec.encode_sa(sa), messages.XFRM_MSG_NEWSA, seq=42)
    (msg,) = codec.from_bytes(data)
    assert msg["header"]["type"] == messages.XFRM_MSG_NEWSA
    assert msg["header"]["sequence_number"] == 42
    assert msg["header"]["length"] == len(data)
    assert codec.decode_sa(msg) == sa


@pytest.mark.parametrize(
    "sa",
    [*SAS, replace(SAS[2], esn=False, replay_window=0), replace(SAS[3], replay_window=4096)],
    ids=lambda s: f"{s.proto}-{s.enc_alg}-{s.integ_alg}-{s.replay_window}",
)
def test_the_fast_sa_packer_writes_the_generic_encoder_s_bytes(sa):
    """pack_sa (the install fast path) against pyroute2's encoder, byte for byte."""
    for msg_type, flags, seq in (
        (messages.XFRM_MSG_NEWSA, 0x605, 3),
        (messages.XFRM_MSG_UPDSA, 5, 9),
    ):
        generic = codec.to_bytes(codec.encode_sa(sa), msg_type, flags, seq)
        assert codec.pack_sa(sa, msg_type, flags, seq) == generic


def test_sa_byte_layout():
    sa = SAS[0]
    data = codec.to_bytes(codec.encode_sa(sa), messages.XFRM_MSG_NEWSA)
    body = data[HDR:]
    assert body[56:60] == bytes([192, 0, 2, 12])  # id.daddr
    assert body[72:76] == struct.pack(">I", sa.spi)  # id.spi, network order
    assert body[76] == socket.IPPROTO_ESP
    assert body[80:84] == bytes([192, 0, 2, 11])  # saddr
    assert struct.unpack_from("=Q", body, 96)[0] == 1 << 30  # lft.soft_byte_limit
    assert struct.unpack_from("=Q", body, 112)[0] == messages.XFRM_INF  # no packet limit
    reqid, family, mode, window, flags = struct.unpack_from("=IHBBB", body, 208)
    assert (reqid, family, mode) == (REQID, socket.AF_INET, messages.XFRM_MODE_TUNNEL)
    assert window == 0 and flags == messages.XFRM_STATE_ESN  # ESN: window in the attribute
    # first attribute: XFRMA_ALG_AEAD, name, key bits (salt counted), ICV bits, key
    length, atype = struct.unpack_from("=HH", body, 224)
    assert atype == 18 and length == 4 + 72 + 36
    assert body[228 : 228 + 17] == b"rfc4106(gcm(aes))"
    assert struct.unpack_from("=II", body, 228 + 64) == (36 * 8, 128)
    assert body[228 + 72 : 228 + 72 + 36] == bytes(range(36))


def test_no_esn_puts_window_in_header():
    data = codec.to_bytes(codec.encode_sa(SAS[1]), messages.XFRM_MSG_NEWSA)
    assert data[HDR + 215] == 64 and data[HDR + 216] == 0
    (msg,) = codec.from_bytes(data)
    assert msg.get_attr("XFRMA_REPLAY_ESN_VAL") is None


def test_esn_bitmap_sized_to_window():
    (msg,) = codec.from_bytes(codec.to_bytes(codec.encode_sa(SAS[2]), messages.XFRM_MSG_NEWSA))
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    assert esn["bmp_len"] == 32 and esn["replay_window"] == 1024 and len(esn["bmp"]) == 128


def test_unknown_algorithm_refused():
    with pytest.raises(DataPlaneError, match="unknown enc_alg 'des'"):
        codec.encode_sa(replace(SAS[0], enc_alg="des"))


POLICIES = [
    PolicySpec(Selector("10.1.0.0/24", "10.2.0.0/24"), Direction.OUT,
               templates=(Template(IpsecProto.ESP, Mode.TUNNEL, REQID, "192.0.2.11",
                                   "192.0.2.12"),), priority=1234),
    PolicySpec(Selector("2001:db8::/64", "2001:db8:1::/64", proto=6, sport=80), Direction.IN,
               templates=(Template(IpsecProto.AH, Mode.TRANSPORT, REQID),
                          Template(IpsecProto.ESP, Mode.TUNNEL, REQID + 1, "2001:db8::1",
                                   "2001:db8::2")),
               mark=(1, 0xFFFFFFFF), if_id=12, priority=99),
    PolicySpec(Selector("10.1.0.0/24", "10.1.0.0/24"), Direction.FWD, PolicyAction.PASS,
               priority=50500),
    PolicySpec(Selector("0.0.0.0/0", "0.0.0.0/0"), Direction.OUT, PolicyAction.DROP,
               priority=351000),
]  # fmt: skip


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.direction}-{p.action}")
def test_policy_round_trip(policy):
    data = codec.to_bytes(codec.encode_policy(policy), messages.XFRM_MSG_NEWPOLICY)
    (msg,) = codec.from_bytes(data)
    assert codec.decode_policy(msg) == policy


@pytest.mark.parametrize(
    "policy",
    [*POLICIES, replace(POLICIES[0], priority=0), replace(POLICIES[2], mark=(7, 0xFF))],
    ids=lambda p: f"{p.direction}-{p.action}-{p.priority}",
)
def test_the_fast_policy_packer_writes_the_generic_encoder_s_bytes(policy):
    """pack_policy (the install fast path) against pyroute2's encoder, byte for byte."""
    for msg_type, flags, seq in ((messages.XFRM_MSG_NEWPOLICY, 0x605, 7),
                                 (messages.XFRM_MSG_UPDPOLICY, 0x5, 0xFFFFFFFF)):  # fmt: skip
        generic = codec.to_bytes(codec.encode_policy(policy), msg_type, flags, seq)
        assert codec.pack_policy(policy, msg_type, flags, seq) == generic


def test_policy_byte_layout():
    policy = POLICIES[1]
    body = codec.to_bytes(codec.encode_policy(policy), messages.XFRM_MSG_NEWPOLICY)[HDR:]
    sport, sport_mask, _family, plen_d, plen_s, proto = struct.unpack_from(">HHHBBB", body, 36)
    assert (sport, sport_mask, plen_d, plen_s, proto) == (80, 0xFFFF, 64, 64, 6)
    assert struct.unpack_from("=H", body, 40)[0] == socket.AF_INET6
    priority, index, direction, action = struct.unpack_from("=IIBB", body, 152)
    assert (priority, index, direction, action) == (99, 0, messages.XFRM_POLICY_IN, 0)
    length, atype = struct.unpack_from("=HH", body, 168)
    assert atype == 5 and length == 4 + 2 * 64  # XFRMA_TMPL: two bare xfrm_user_tmpl
    reqid, mode = struct.unpack_from("=IB", body, 172 + 64 + 44)
    assert (reqid, mode) == (REQID + 1, messages.XFRM_MODE_TUNNEL)


def test_policy_id_layout():
    pid = POLICIES[0].id
    data = codec.to_bytes(codec.encode_policy_id(pid), messages.XFRM_MSG_DELPOLICY)
    assert len(data) == HDR + 64
    assert data[HDR + 60] == messages.XFRM_POLICY_OUT


def test_derived_priority_prefers_specific_selectors():
    broad = PolicySpec(Selector("10.0.0.0/8", "10.2.0.0/16"), Direction.OUT)
    narrow = PolicySpec(Selector("10.1.0.0/24", "10.2.0.0/24", proto=17, dport=53), Direction.OUT)
    assert codec.effective_priority(narrow) < codec.effective_priority(broad) <= messages.PRIO_BASE
    pass_ = replace(broad, action=PolicyAction.PASS)
    drop = replace(broad, action=PolicyAction.DROP)
    assert codec.effective_priority(pass_) < codec.effective_priority(narrow)
    assert codec.effective_priority(drop) > codec.effective_priority(broad)
    host6 = PolicySpec(Selector("::/0", "::/0"), Direction.OUT, PolicyAction.PASS)
    assert codec.is_keyway_policy(replace(host6, priority=codec.effective_priority(host6)))
    full6 = replace(host6, selector=Selector("::1/128", "::2/128", 6, 1, 2))
    assert codec.is_keyway_policy(replace(full6, priority=codec.effective_priority(full6)))


def test_ownership_rule():
    assert codec.is_keyway_policy(POLICIES[0])
    foreign = replace(POLICIES[0], templates=(replace(POLICIES[0].templates[0], reqid=7),))
    assert not codec.is_keyway_policy(foreign)
    mixed = replace(POLICIES[1], templates=(*POLICIES[1].templates, foreign.templates[0]))
    assert not codec.is_keyway_policy(mixed)
    assert codec.is_keyway_policy(POLICIES[2]) and codec.is_keyway_policy(POLICIES[3])
    assert not codec.is_keyway_policy(replace(POLICIES[2], priority=1000))


def _acquire_bytes() -> bytes:
    msg = messages.xfrm_user_acquire()
    msg.update({
        "id_daddr": codec._pack_addr("192.0.2.50"),
        "id_proto": socket.IPPROTO_ESP,
        "saddr": codec._pack_addr("192.0.2.1"),
        **codec._selector_values(Selector("192.0.2.1/32", "192.0.2.50/32", 17, 4000, 53)),
        **codec._selector_values(Selector("192.0.2.1/32", "192.0.2.50/32"), "policy_sel_"),
    })  # fmt: skip
    tmpl = codec._tmpl_values(Template(IpsecProto.ESP, Mode.TRANSPORT, REQID), socket.AF_INET)
    msg["attrs"] = [["XFRMA_TMPL", {"templates": [tmpl]}]]
    return codec.to_bytes(msg, messages.XFRM_MSG_ACQUIRE)


def _expire_bytes(hard: bool) -> bytes:
    sa = codec.encode_sa(SAS[1])
    msg = messages.xfrm_user_expire()
    msg.update({f"state_{k}": v for k, v in sa.items() if k not in ("header", "attrs")})
    msg.update({"hard": int(hard), "attrs": []})
    return codec.to_bytes(msg, messages.XFRM_MSG_EXPIRE)


def _mapping_bytes() -> bytes:
    """XFRM_MSG_MAPPING as the kernel sends it: SA 1's peer now at [2001:db8::77]:40001."""
    v6 = socket.AF_INET6
    msg = messages.xfrm_user_mapping()
    msg.update({
        "id_daddr": socket.inet_pton(v6, SAS[1].dst), "id_spi": SAS[1].spi, "id_family": v6,
        "id_proto": 50, "reqid": REQID, "old_saddr": socket.inet_pton(v6, SAS[1].src),
        "new_saddr": socket.inet_pton(v6, "2001:db8::77"), "old_sport": 4500,
        "new_sport": 40001, "attrs": [],
    })  # fmt: skip
    return codec.to_bytes(msg, messages.XFRM_MSG_MAPPING)


def test_parse_events():
    data = _acquire_bytes() + _expire_bytes(False) + _expire_bytes(True) + _mapping_bytes()
    assert len(_mapping_bytes()) == HDR + 64
    assert len(_acquire_bytes()) == HDR + 280 + 4 + 64
    assert codec.parse_events(data) == [
        AcquireEvent(Selector("192.0.2.1/32", "192.0.2.50/32", 17, 4000, 53), REQID,
                     "192.0.2.1", "192.0.2.50"),
        ExpireEvent(SAS[1].id, hard=False, reqid=REQID),
        ExpireEvent(SAS[1].id, hard=True, reqid=REQID),
        MappingEvent(SAS[1].id, REQID, "2001:db8::77", 40001),
    ]  # fmt: skip


def _error_reply(request: bytes, errno_: int, echo: bytes, tlv_text: bytes = b"") -> bytes:
    """NLMSG_ERROR as the kernel sends it: header, -errno, the echoed request, and (with
    NETLINK_EXT_ACK) an NLMSGERR_ATTR_MSG TLV after it."""
    tlv = b""
    if tlv_text:
        text = tlv_text + b"\0"
        tlv = struct.pack("=HH", 4 + len(text), 1) + text
        tlv += bytes(-len(tlv) % 4)
    seq = struct.unpack_from("=I", request, 8)[0]
    body = struct.pack("=i", -errno_) + echo + tlv
    return struct.pack("=IHHII", 16 + len(body), 2, 0x200 if tlv else 0, seq, 0) + body


def test_error_reply_becomes_netlink_error():
    req = codec.to_bytes(codec.encode_sa(SAS[3]), messages.XFRM_MSG_NEWSA, seq=5)
    (msg,) = codec.from_bytes(_error_reply(req, 93, req, b"Requested type not found"))
    exc = msg["header"]["error"]
    assert exc.code == 93
    text = str(codec._refused("install_sa", codec._sa_str(SAS[3]), exc))
    assert text == (
        "install_sa esp spi 0x00000778 192.0.2.12: kernel refused: "
        "Protocol not supported (errno 93): Requested type not found"
    )


def test_error_reply_with_capped_echo_keeps_errno():
    # With NETLINK_CAP_ACK only the request's header comes back: pyroute2 alone would
    # fail decoding it as a whole NEWSA; the errno must survive.
    req = codec.to_bytes(codec.encode_sa(SAS[3]), messages.XFRM_MSG_NEWSA, seq=5)
    (msg,) = codec.from_bytes(_error_reply(req, 22, req[:16]))
    assert msg["header"]["error"].code == 22
    assert msg["header"]["sequence_number"] == 5


# -- RecordingPlane ---------------------------------------------------------------------


def test_recording_plane_records_and_refuses():
    plane = RecordingPlane()
    spi1 = plane.allocate_spi("192.0.2.11", "192.0.2.12", IpsecProto.ESP, REQID)
    spi2 = plane.allocate_spi("192.0.2.11", "192.0.2.12", IpsecProto.ESP, REQID)
    assert (spi1, spi2) == (0xC0000001, 0xC0000002)
    sa = replace(SAS[0], spi=spi1)
    plane.install_sa(sa)
    with pytest.raises(DataPlaneError, match="exists"):
        plane.install_sa(sa)
    plane.update_sa(replace(sa, lifetime=Lifetime(hard_seconds=5)))
    plane.count(sa.id, 100)
    assert plane.sa_counters(sa.id).bytes == 100
    assert plane.list_sas()[0].lifetime.hard_seconds == 5
    plane.install_policy(POLICIES[0])
    assert plane.list_policies() == [POLICIES[0]]
    plane.remove_policy(POLICIES[0].id)
    with pytest.raises(DataPlaneError, match="no such policy"):
        plane.remove_policy(POLICIES[0].id)
    plane.delete_sa(sa.id)
    with pytest.raises(DataPlaneError, match="no such SA"):
        plane.delete_sa(sa.id)
    assert [c[0] for c in plane.calls] == [
        "allocate_spi", "allocate_spi", "install_sa", "install_sa", "update_sa",
        "sa_counters", "list_sas", "install_policy", "list_policies", "remove_policy",
        "remove_policy", "delete_sa", "delete_sa",
    ]  # fmt: skip
    assert plane.calls[0][1] == ("192.0.2.11", "192.0.2.12", IpsecProto.ESP, REQID)


def test_recording_plane_flush_keeps_foreign_sas():
    plane = RecordingPlane()
    plane.install_sa(SAS[0])
    plane.install_sa(replace(SAS[3], reqid=7))
    plane.install_policy(POLICIES[0])
    plane.flush_owned()
    assert plane.list_sas() == [] and plane.list_policies() == []
    assert list(plane.sas) == [SaId("192.0.2.12", IpsecProto.ESP, 0x778)]


def test_recording_plane_events():
    plane = RecordingPlane()
    got: list = []
    with pytest.raises(RuntimeError):
        plane.fire(ExpireEvent(SAS[0].id, hard=True))
    asyncio.run(plane.start(got.append))
    event = ExpireEvent(SAS[0].id, hard=False, reqid=REQID)
    plane.fire(event)
    asyncio.run(plane.stop())
    assert got == [event]
    assert plane.calls == [("start", None), ("stop", None)]


def test_module_parameters_are_read_as_the_kernel_reports_them():
    """Idempotence: what a playbook writes must compare equal to what the kernel gives
    back (network address of a prefix, compressed lower-case IPv6, no outer addresses in
    a transport-mode template)."""
    from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.params import (
        policy_from_params,
        sa_from_params,
    )

    selector = {"src": "10.1.0.5/24", "dst": "2001:DB8:0:0::7", "proto": 0, "sport": 0,
                "dport": 0}  # fmt: skip
    sa = sa_from_params(
        {"src": "2001:DB8::0:1", "dst": "192.0.2.2", "proto": "esp", "spi": 0x100,
         "mode": "tunnel", "reqid": 0x4B570001, "enc_alg": "aes-gcm-16",
         "enc_key": "00" * 20, "selector": selector}
    )  # fmt: skip
    assert (sa.src, sa.dst) == ("2001:db8::1", "192.0.2.2")
    assert (sa.selector.src, sa.selector.dst) == ("10.1.0.0/24", "2001:db8::7/128")
    policy = policy_from_params(
        {"selector": selector, "dir": "out", "action": "protect",
         "templates": [{"proto": "esp", "mode": "transport", "reqid": 0x4B570001,
                        "src": "192.0.2.1", "dst": "192.0.2.2"},
                       {"proto": "esp", "mode": "tunnel", "reqid": 0x4B570002,
                        "src": "2001:DB8::1", "dst": "2001:db8:0::2"}]}
    )  # fmt: skip
    assert [(t.src, t.dst) for t in policy.templates] == [
        ("", ""), ("2001:db8::1", "2001:db8::2")
    ]  # fmt: skip
