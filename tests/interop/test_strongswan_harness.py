"""The strongSwan peer harness itself: two charons establish and carry traffic here."""

from __future__ import annotations

from tests.fixtures.capture import Capture
from tests.fixtures.netns import udp_exchange
from tests.fixtures.strongswan import site_to_site_pair

PSK = "harness-psk-0123456789"


def test_two_charons_establish_a_child_sa_over_libipsec(netns_hosts, charon_factory):
    a, b = netns_hosts(2).hosts
    charon_a, charon_b = site_to_site_pair(
        charon_factory,
        a,
        b,
        psk=PSK,
        proposals="aes128gcm16-prfsha256-x25519",
        esp_proposals="aes128gcm16",
    )
    charon_a.swanctl("--initiate", "--child", "kw", timeout=30)
    sas_a, sas_b = charon_a.list_sas(), charon_b.list_sas()
    assert "state=ESTABLISHED" in sas_a and "state=INSTALLED" in sas_a, sas_a
    assert "state=ESTABLISHED" in sas_b and "state=INSTALLED" in sas_b, sas_b


def test_traffic_between_charon_sites_is_esp_in_udp_on_the_wire(netns_hosts, charon_factory):
    a, b = netns_hosts(2).hosts
    charon_a, _ = site_to_site_pair(
        charon_factory,
        a,
        b,
        psk=PSK,
        proposals="aes256gcm16-prfsha384-ecp384",
        esp_proposals="aes256gcm16",
    )
    charon_a.swanctl("--initiate", "--child", "kw", timeout=30)
    marker = b"keyway-plaintext-marker"
    with Capture(a.netns, "eth0", outgoing_only=True) as cap:
        reply = udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, marker)
    assert reply == marker[::-1]
    esp_in_udp = [f for f in cap.frames if (p := f.udp_payload(4500)) and p[:4] != b"\0\0\0\0"]
    assert esp_in_udp, "no ESP-in-UDP frame left h1"
    assert not any(marker in f.data for f in cap.frames), "plaintext on the wire"
