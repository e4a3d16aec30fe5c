"""agent_config's plan: what a run does to each connection, PSKs never shown."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.modules.agent_config import plan, render

CONN = {"local_addrs": ["192.0.2.11"], "remote_addrs": ["192.0.2.12"], "children": {}}


def test_a_rotation_that_starts_or_retires_is_a_psk_only_change():
    one = {"ab": ["/s/ab.psk"]}
    two = {"ab": ["/s/ab.psk", "/s/ab.psk-1"]}
    rotating = render({}, {"ab": CONN}, two)
    # Retiring the previous PSK: no content changes, only the list shrinks.
    result = plan(rotating, {"ab": CONN}, ["ab.psk-1"], one)
    assert result["psk_only"] == ["ab"]
    assert result["links"] == {"ab": "changed (PSK only): reauthenticated make-before-break"}
    # Nothing changes at all.
    assert plan(render({}, {"ab": CONN}, one), {"ab": CONN}, [], one)["unchanged"] == ["ab"]


def test_created_removed_and_settings_changes():
    before = render({}, {"ab": CONN, "ac": CONN}, {"ab": ["/s/ab.psk"], "ac": ["/s/ac.psk"]})
    changed = {**CONN, "proposals": ["aes128gcm16-prfsha256-ecp256"]}
    result = plan(
        before, {"ab": changed, "ad": CONN}, [], {"ab": ["/s/ab.psk"], "ad": ["/s/ad.psk"]}
    )
    assert (result["created"], result["removed"], result["changed"]) == (["ad"], ["ac"], ["ab"])
    assert result["psk_only"] == []
