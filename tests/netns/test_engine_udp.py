"""Two keyway engines in two namespaces over real UDP: establish, rekey both ways, delete."""

from __future__ import annotations

from tests.fixtures.ike_peer import IkePeer, keyway_spec

PSK = "udp-engines-psk-0f1e2d3c4b5a"


def test_two_engines_establish_rekey_and_delete_over_udp(netns_hosts):
    a, b = netns_hosts(2).hosts
    proposal, esp = "aes256gcm16-prfsha384-x25519", "aes256gcm16-x25519"
    peer_b = IkePeer(b.netns, keyway_spec(b, a, proposal, esp, PSK, initiate=False))
    peer_a = IkePeer(a.netns, keyway_spec(a, b, proposal, esp, PSK, initiate=True))
    try:
        first_a, first_b = peer_a.wait_for("ChildSaReady"), peer_b.wait_for("ChildSaReady")
        assert (first_a["spi_in"], first_a["spi_out"]) == (first_b["spi_out"], first_b["spi_in"])

        peer_a.command("rekey_child")
        second_b = peer_b.wait_for("ChildSaReady")
        assert second_b["rekeyed_from"] == first_b["spi_in"]
        second_a = peer_a.wait_for("ChildSaReady")  # a's own view of its rekey
        peer_b.command("rekey_child")
        third_a = peer_a.wait_for("ChildSaReady")
        assert third_a["rekeyed_from"] == second_a["spi_in"]

        peer_b.command("rekey_ike")
        up_a, up_b = peer_a.wait_for("IkeSaRekeyed"), peer_b.wait_for("IkeSaRekeyed")
        assert (up_a["spi_i"], up_a["spi_r"]) == (up_b["spi_i"], up_b["spi_r"])
        assert peer_a.wait_for("IkeSaDown")["reason"] == "replaced by rekey"
        assert peer_b.wait_for("IkeSaDown")["reason"] == "replaced by rekey"

        peer_a.command("delete_ike")
        assert peer_a.wait_for("IkeSaDown")["reason"] == "deleted by us"
        assert peer_b.wait_for("IkeSaDown")["reason"] == "deleted by peer"
        for peer in (peer_a, peer_b):
            assert not any(
                e["event"] in ("PeerDead", "NegotiationFailed", "AuthFailed") for e in peer.seen
            )
    finally:
        peer_a.stop()
        peer_b.stop()
