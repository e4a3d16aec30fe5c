"""keyway's engine against Debian's charon: IKE SA and first Child SA, both roles."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fixtures.capture import Capture
from tests.fixtures.ike_peer import IkePeer, keyway_spec
from tests.fixtures.netns import udp_exchange
from tests.fixtures.pki import make_ca, make_cert
from tests.fixtures.strongswan import site_connection

PSK = "engine-interop-psk-5a6b7c8d"
SUITES = [
    ("aes256gcm16-prfsha384-ecp384", "aes256gcm16"),
    ("aes128gcm16-prfsha256-x25519", "aes128gcm16"),
    ("chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
    ("aes256-sha256-modp3072", "aes256-sha256"),
]


def charon_conf(me, peer, proposal, esp) -> str:
    return site_connection(me, peer, psk=PSK, proposals=proposal, esp_proposals=esp)


def charon_child(sas: str) -> dict:
    installed = [c for c in re.findall(r"kw-\d+ \{([^{}]*)", sas) if "state=INSTALLED" in c]
    assert installed, sas
    return dict(re.findall(r"([\w-]+)=(\S+)", installed[0]))


@pytest.mark.parametrize(("proposal", "esp"), SUITES)
def test_keyway_initiates_to_charon(netns_hosts, charon_factory, proposal, esp):
    a, b = netns_hosts(2).hosts
    charon = charon_factory(b.netns, charon_conf(b, a, proposal, esp))
    peer = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=True))
    try:
        child = peer.wait_for("ChildSaReady")
    finally:
        peer.stop()
    sas = charon.list_sas()
    assert "state=ESTABLISHED" in sas, sas
    theirs = charon_child(sas)
    assert int(theirs["spi-in"], 16) == child["spi_out"]
    assert int(theirs["spi-out"], 16) == child["spi_in"]
    assert child["local_ts"] == [a.site4] and child["remote_ts"] == [b.site4]


@pytest.mark.parametrize(("proposal", "esp"), SUITES[:2])
def test_charon_initiates_to_keyway(netns_hosts, charon_factory, proposal, esp):
    a, b = netns_hosts(2).hosts
    peer = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=False))
    try:
        charon = charon_factory(b.netns, charon_conf(b, a, proposal, esp))
        charon.swanctl("--initiate", "--child", "kw", timeout=30)
        child = peer.wait_for("ChildSaReady")
        up = next(e for e in peer.seen if e["event"] == "IkeSaUp")
    finally:
        peer.stop()
    assert up["initiator"] is False and up["remote_id"] == f"{b.name}.lab"
    theirs = charon_child(charon.list_sas())
    assert int(theirs["spi-in"], 16) == child["spi_out"]
    assert int(theirs["spi-out"], 16) == child["spi_in"]


def test_wrong_psk_is_refused_by_both(netns_hosts, charon_factory):
    a, b = netns_hosts(2).hosts
    proposal, esp = SUITES[1]
    charon_factory(b.netns, charon_conf(b, a, proposal, esp).replace(PSK, "not-the-psk-0000"))
    peer = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=True))
    try:
        failed = peer.wait_for("AuthFailed")
    finally:
        peer.stop()
    assert "AUTHENTICATION_FAILED" in failed["reason"]


def _established(netns_hosts, charon_factory):
    a, b = netns_hosts(2).hosts
    proposal, esp = SUITES[1]
    charon = charon_factory(b.netns, charon_conf(b, a, proposal, esp))
    peer = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=True))
    peer.wait_for("ChildSaReady")
    return charon, peer


def test_deletes_and_liveness_with_charon(netns_hosts, charon_factory):
    charon, peer = _established(netns_hosts, charon_factory)
    try:
        peer.command("dpd")  # charon answers an empty INFORMATIONAL
        peer.command("delete_child")
        gone = peer.wait_for("ChildSaDeleted")
        assert gone["reason"] == "deleted by us"
        sas = charon.list_sas()
        assert "state=ESTABLISHED" in sas and "state=INSTALLED" not in sas, sas
        peer.command("delete_ike")
        assert peer.wait_for("IkeSaDown")["reason"] == "deleted by us"
        assert "state=ESTABLISHED" not in charon.list_sas()
        assert not any(e["event"] == "PeerDead" for e in peer.seen)
    finally:
        peer.stop()


def test_charon_deletes_and_keyway_follows(netns_hosts, charon_factory):
    charon, peer = _established(netns_hosts, charon_factory)
    try:
        charon.swanctl("--terminate", "--child", "kw", timeout=30)
        assert peer.wait_for("ChildSaDeleted")["reason"] == "deleted by peer"
        charon.swanctl("--terminate", "--ike", "kw", timeout=30)
        assert peer.wait_for("IkeSaDown")["reason"] == "deleted by peer"
    finally:
        peer.stop()


@pytest.mark.parametrize("pfs", [False, True])
def test_child_rekeys_both_ways_with_charon(netns_hosts, charon_factory, pfs):
    a, b = netns_hosts(2).hosts
    proposal, esp = "aes128gcm16-prfsha256-x25519", "aes128gcm16" + ("-x25519" if pfs else "")
    charon = charon_factory(b.netns, charon_conf(b, a, proposal, esp))
    peer = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=True))
    try:
        first = peer.wait_for("ChildSaReady")
        peer.command("rekey_child")  # keyway rekeys
        second = peer.wait_for("ChildSaReady")
        assert second["rekeyed_from"] == first["spi_in"]
        assert peer.wait_for("ChildSaDeleted")["spi_in"] == first["spi_in"]
        theirs = charon_child(charon.list_sas())
        assert int(theirs["spi-in"], 16) == second["spi_out"]
        assert int(theirs["spi-out"], 16) == second["spi_in"]

        charon.swanctl("--rekey", "--child", "kw", timeout=30)  # charon rekeys
        third = peer.wait_for("ChildSaReady")
        assert third["rekeyed_from"] == second["spi_in"]
        deleted = peer.wait_for("ChildSaDeleted")
        assert (deleted["spi_in"], deleted["reason"]) == (second["spi_in"], "deleted by peer")
        theirs = charon_child(charon.list_sas())
        assert int(theirs["spi-in"], 16) == third["spi_out"]
    finally:
        peer.stop()


def _ike_spis(sas: str) -> tuple[str, str]:
    ike = [block for block in re.findall(r"kw \{([^{]*)", sas) if "state=ESTABLISHED" in block]
    assert ike, sas
    fields = dict(re.findall(r"([\w-]+)=(\S+)", ike[0]))
    return fields["initiator-spi"], fields["responder-spi"]


def test_ike_rekeys_both_ways_with_charon(netns_hosts, charon_factory):
    charon, peer = _established(netns_hosts, charon_factory)
    try:
        child = next(e for e in peer.seen if e["event"] == "ChildSaReady")
        peer.command("rekey_ike")  # keyway rekeys the IKE SA
        ours = peer.wait_for("IkeSaRekeyed")
        assert peer.wait_for("IkeSaDown")["reason"] == "replaced by rekey"
        assert _ike_spis(charon.list_sas()) == (ours["spi_i"], ours["spi_r"])

        charon.swanctl("--rekey", "--ike", "kw", timeout=30)  # charon rekeys it
        theirs = peer.wait_for("IkeSaRekeyed")
        assert peer.wait_for("IkeSaDown")["reason"] == "replaced by rekey"
        assert _ike_spis(charon.list_sas()) == (theirs["spi_i"], theirs["spi_r"])
        # The Child SA survived both rekeys untouched.
        assert int(charon_child(charon.list_sas())["spi-out"], 16) == child["spi_in"]
        peer.command("rekey_child")  # and the newest IKE SA can still rekey it
        assert peer.wait_for("ChildSaReady")["rekeyed_from"] == child["spi_in"]
        assert not any(e["event"] in ("PeerDead", "NegotiationFailed") for e in peer.seen)
    finally:
        peer.stop()


def charon_cert_conf(me, peer, remote_auth: str = "pubkey") -> str:
    return f"""
connections {{
    kw {{
        version = 2
        local_addrs = {me.ipv4}
        remote_addrs = {peer.ipv4}
        proposals = aes256gcm16-prfsha384-ecp384
        local {{
            auth = pubkey
            certs = {me.name}.pem
            id = {me.name}.lab
        }}
        remote {{
            auth = {remote_auth}
            id = {peer.name}.lab
        }}
        children {{
            kw {{
                local_ts = {me.site4}
                remote_ts = {peer.site4}
                esp_proposals = aes256gcm16
            }}
        }}
    }}
}}
"""


def cert_pair_with_charon(
    charon_factory, a, b, mine, theirs, ca, keyway_initiates: bool, **charon_kwargs
):
    """charon on b with `theirs` (and its remote auth constraint in charon_kwargs), and
    the keyway engine on a with `mine`, both trusting `ca`: (charon, the engine)."""
    remote_auth = charon_kwargs.pop("remote_auth", "pubkey")
    charon = charon_factory(
        b.netns,
        charon_cert_conf(b, a, remote_auth=remote_auth),
        files={
            "x509ca/ca.pem": ca.pem,
            f"x509/{b.name}.pem": theirs.pem,
            f"private/{b.name}.pem": theirs.key_pem,
        },
        **charon_kwargs,
    )
    spec = keyway_spec(
        a, b, "aes256gcm16-prfsha384-ecp384", "aes256gcm16", PSK, initiate=keyway_initiates
    )
    spec["connections"][0].update(
        cert=mine.pem.decode(), key=mine.key_pem.decode(), ca=ca.pem.decode()
    )
    return charon, IkePeer(a.netns, spec)


@pytest.mark.parametrize("keyway_initiates", [True, False])
def test_ecdsa_certificates_with_charon(netns_hosts, charon_factory, keyway_initiates):
    a, b = netns_hosts(2).hosts
    ca = make_ca()
    mine, theirs = make_cert(ca, f"{a.name}.lab", ec.SECP384R1), make_cert(ca, f"{b.name}.lab")
    charon, peer = cert_pair_with_charon(charon_factory, a, b, mine, theirs, ca, keyway_initiates)
    try:
        if not keyway_initiates:
            charon.swanctl("--initiate", "--child", "kw", timeout=30)
        child = peer.wait_for("ChildSaReady")
    finally:
        peer.stop()
    assert int(charon_child(charon.list_sas())["spi-out"], 16) == child["spi_in"]


@pytest.mark.parametrize("keyway_initiates", [True, False])
@pytest.mark.parametrize("charon_signs", ["rsa/pss", "pkcs1"])
def test_rsa_certificates_with_charon_use_rsassa_pss(
    netns_hosts, charon_factory, keyway_initiates, charon_signs
):
    """Issue 15: keywayd signs with RSASSA-PSS, which charon requires when its remote
    auth says rsa/pss; a PKCS#1 v1.5 signature (charon's default without
    charon.rsa_pss) is refused, with that reason, unless allow_weak."""
    a, b = netns_hosts(2).hosts
    ca = make_ca()
    mine = make_cert(ca, f"{a.name}.lab", key=rsa.generate_private_key(65537, 3072))
    theirs = make_cert(ca, f"{b.name}.lab", key=rsa.generate_private_key(65537, 2048))
    pss = charon_signs == "rsa/pss"
    charon, peer = cert_pair_with_charon(
        charon_factory, a, b, mine, theirs, ca, keyway_initiates,
        remote_auth="rsa/pss", charon_settings="rsa_pss = yes" if pss else "",
    )  # fmt: skip
    try:
        if not keyway_initiates:
            charon.swanctl("--initiate", "--child", "kw", timeout=30, check=False)
        if pss:
            child = peer.wait_for("ChildSaReady")
            assert int(charon_child(charon.list_sas())["spi-out"], 16) == child["spi_in"]
        else:
            failed = peer.wait_for("AuthFailed")
            assert "RSASSA-PKCS1-v1_5 with SHA256 is refused" in failed["reason"]
    finally:
        peer.stop()
    # charon verified ours with its rsa/pss constraint: "authentication of ... successful"
    if pss or keyway_initiates:
        verified = r"authentication of 'h1\.lab' with RSA_EMSA_PSS_SHA2_384_SALT_48 successful"
        assert re.search(verified, charon.log_path.read_text())


@pytest.mark.parametrize("keyway_initiates", [True, False])
@pytest.mark.parametrize(("proposal", "esp"), [SUITES[1], SUITES[2], SUITES[3]])
def test_traffic_between_keyway_userspace_plane_and_charon_libipsec(
    netns_hosts, charon_factory, keyway_initiates, proposal, esp
):
    a, b = netns_hosts(2).hosts
    spec = keyway_spec(a, b, proposal, esp, PSK, initiate=keyway_initiates)
    spec.update(plane=True, encap=True)  # charon's libipsec always encapsulates
    peer = IkePeer(a.netns, spec)
    try:
        charon = charon_factory(b.netns, charon_conf(b, a, proposal, esp))
        if not keyway_initiates:
            charon.swanctl("--initiate", "--child", "kw", timeout=30)
        peer.wait_for("ChildSaReady")
        marker = b"keyway-to-libipsec"
        with Capture(a.netns, "eth0") as cap:
            reply = udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, marker)
        assert reply == marker[::-1]
    finally:
        peer.stop()
    esp_frames = [f for f in cap.frames if (p := f.udp_payload(4500)) and p[:4] != b"\0\0\0\0"]
    assert any(f.outgoing for f in esp_frames) and any(not f.outgoing for f in esp_frames)
    assert not any(marker in f.data or marker[::-1] in f.data for f in cap.frames)
