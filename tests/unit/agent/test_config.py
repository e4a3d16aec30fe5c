"""keywayd's config parser: defaults, every problem with its path, secrets kept secret."""

from __future__ import annotations

import copy
import dataclasses
import os
import textwrap

import pytest
import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import (
    PEER_SIGNATURES,
    ConfigError,
    Secret,
    config_warnings,
    diff_configs,
    initiation_addresses,
    load_config,
    parse_config,
    peer_ranges,
)

PSK = "correct-horse-battery-staple-42"


def accept_all(text: str, kind: str, allow_weak: bool) -> None:
    """Proposal validation is the IKE layer's; these tests exercise the config's own."""
    if "des" in text and not allow_weak:
        raise ValueError(f"{text!r}: 3DES is weak; set allow_weak: true to use it")


def conf(text: str):
    return yaml.safe_load(textwrap.dedent(text))


GOOD = f"""
dataplane: userspace
connections:
  h1-h2:
    local_addrs: [192.0.2.11]
    remote_addrs: 192.0.2.12
    local: {{id: h1.lab}}
    remote: {{id: h2.lab}}
    psk: {PSK}
    rekey_time: 2h
    children:
      sites:
        local_ts: [10.1.0.0/24, "fd00:1::/64"]
        remote_ts: 10.2.0.0/24
        rekey_time: 30m
        rekey_bytes: 1G
        start_action: start
"""


def test_good_config_gets_swanctl_like_defaults():
    config = parse_config(conf(GOOD), validate_proposal=accept_all)
    assert config.dataplane == "userspace"
    (conn,) = config.connections
    assert conn.remote_addrs == ("192.0.2.12",)
    assert (conn.local_port, conn.unique, conn.encap) == (500, "no", "auto")
    assert conn.psk.reveal() == PSK.encode()
    assert (conn.rekey_time, conn.over_time, conn.rand_time) == (7200, 720, 720)
    assert conn.proposals == ("aes256gcm16-prfsha384-x25519",)
    (child,) = conn.children
    assert child.local_ts == ("10.1.0.0/24", "fd00:1::/64")
    assert child.remote_ts == ("10.2.0.0/24",)
    assert (child.rekey_time, child.life_time, child.rand_time) == (1800, 1980, 180)
    assert child.rekey_bytes == 1 << 30
    assert (child.mode, child.protocol, child.esp_proposals) == ("tunnel", "esp", ("aes256gcm16",))


def test_swanctl_keys_keywayd_does_not_honour_are_refused_with_the_reason():
    bad = yaml.safe_load(GOOD)
    bad["ike_port"] = 5000
    bad["connections"]["h1-h2"].update(
        dpd_timeout="150s",
        local_port=4500,
        remote_addrs=["192.0.2.12", "192.0.2.13"],
    )
    bad["connections"]["h1-h3"] = {**bad["connections"]["h1-h2"], "remote_addrs": "%any"}
    bad["state_dir"] = "/var/lib/keyway"
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, validate_proposal=accept_all)
    problems = dict(caught.value.problems)
    assert "IKEv1's" in problems["connections.h1-h2.dpd_timeout"]
    assert "connections.h1-h2.encap" not in problems  # encap: no is honoured
    assert problems["connections.h1-h2.local_port"] == (
        "4500: keywayd initiates from its ike_port (5000) only"
    )
    # Several addresses are tried in turn; %any can only answer, and this child starts.
    assert "connections.h1-h2.remote_addrs" not in problems
    assert problems["connections.h1-h3.remote_addrs"] == (
        "has no single address to initiate to (only %any or prefixes), so the connection "
        "can only answer: sites: start_action start"
    )
    assert problems["state_dir"].startswith("unknown key")
    # Reported once each, not once more as a bad choice.
    assert len(caught.value.problems) == len(problems)
    good = yaml.safe_load(GOOD)
    good["ike_port"] = 5000
    (conn,) = parse_config(good, validate_proposal=accept_all).connections
    assert conn.local_port == 5000  # the agent's port, unless the connection names it


def test_every_problem_is_reported_with_its_path():
    bad = conf("""
        dataplane: ebpf
        colour: blue
        connections:
          a:
            remote_addrs: [192.0.2.300]
            local: {auth: psk}
            remote: {id: b}
            psk: correct-horse-battery-staple-42
            rekey_time: 3 weeks
            unique: yes
            proposals: [3des-sha1-modp1024]
            children:
              c:
                local_ts: [10.1.0.1/24]
                mode: tunel
                life_bytes: 10
                rekey_bytes: 20
    """)
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, validate_proposal=accept_all)
    problems = dict(caught.value.problems)
    assert "ebpf" in problems["dataplane"]
    assert problems["colour"].startswith("unknown key")
    assert "192.0.2.300" in problems["connections.a.remote_addrs[0]"]
    assert problems["connections.a.local.id"].startswith("is required")
    assert "duration" in problems["connections.a.rekey_time"]
    assert "3DES is weak" in problems["connections.a.proposals[0]"]
    assert "host bits set" in problems["connections.a.children.c.local_ts[0]"]
    assert problems["connections.a.children.c.remote_ts"] == "is required"
    assert "tunel" in problems["connections.a.children.c.mode"]
    assert "above rekey_bytes" in problems["connections.a.children.c.life_bytes"]
    assert "'yes' is not one of no, never" in problems["connections.a.unique"]
    assert len(caught.value.problems) >= 10


def test_weak_proposals_pass_with_explicit_opt_in():
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["proposals"] = ["3des-sha1-modp1024"]
    with pytest.raises(ConfigError, match="allow_weak"):
        parse_config(raw, validate_proposal=accept_all)
    raw["connections"]["h1-h2"]["allow_weak"] = True
    conn = parse_config(raw, validate_proposal=accept_all).connections[0]
    assert conn.proposals == ("3des-sha1-modp1024",)


def test_secrets_never_show_in_reprs_or_errors():
    config = parse_config(conf(GOOD), validate_proposal=accept_all)
    assert PSK not in repr(config) and PSK not in str(config.connections[0].psk)
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["psk"] = "short-secret"
    raw["connections"]["h1-h2"]["rekey_time"] = "soon"
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, validate_proposal=accept_all)
    assert "short-secret" not in str(caught.value)
    assert "shorter than 16 bytes" in dict(caught.value.problems)["connections.h1-h2.psk"]


def test_inline_psk_needs_a_private_file_and_psk_files_must_be_private(tmp_path):
    path = tmp_path / "keywayd.yaml"
    path.write_text(GOOD)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="inline PSK needs the config file to be 0600"):
        load_config(path, validate_proposal=accept_all)
    os.chmod(path, 0o600)
    assert load_config(path, validate_proposal=accept_all).connections[0].psk.reveal()

    secret = tmp_path / "h1-h2.psk"
    secret.write_text(PSK + "\n")
    os.chmod(secret, 0o640)
    path.write_text(GOOD.replace(f"psk: {PSK}", "psk_file: h1-h2.psk"))
    os.chmod(path, 0o644)  # no secret inside: any mode will do
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0640\); make it 0600"):
        load_config(path, validate_proposal=accept_all)
    os.chmod(secret, 0o600)
    conn = load_config(path, validate_proposal=accept_all).connections[0]
    assert conn.psk.reveal() == PSK.encode()


def test_a_rotation_lists_psks_newest_first_each_checked(tmp_path):
    for n, secret in enumerate((PSK, "the-previous-psk-still-accepted")):
        (tmp_path / f"v{n}.psk").write_text(secret)
        os.chmod(tmp_path / f"v{n}.psk", 0o600)
    path = tmp_path / "keywayd.yaml"
    path.write_text(GOOD.replace(f"psk: {PSK}", "psk_file: [v0.psk, v1.psk]"))
    conn = load_config(path, validate_proposal=accept_all).connections[0]
    assert conn.psk.reveal() == PSK.encode()
    assert [p.reveal() for p in conn.previous_psks] == [b"the-previous-psk-still-accepted"]
    assert "still-accepted" not in repr(conn)
    path.write_text(GOOD.replace(f"psk: {PSK}", "psk_file: [v0.psk, missing.psk]"))
    with pytest.raises(ConfigError, match=r"psk_file\[1\]: cannot read"):
        load_config(path, validate_proposal=accept_all)
    inline = conf(GOOD.replace(f"psk: {PSK}", f"psk: [{PSK}, short]"))
    with pytest.raises(ConfigError, match=r"h1-h2\.psk\[1\]: is shorter than 16 bytes"):
        parse_config(inline, validate_proposal=accept_all)


def test_yaml_syntax_errors_say_where_but_not_what(tmp_path):
    path = tmp_path / "keywayd.yaml"
    path.write_text(f"connections:\n  a:\n    psk: [{PSK}\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not valid YAML at line") as caught:
        load_config(path, validate_proposal=accept_all)
    assert PSK not in str(caught.value)


def test_reload_diff_names_only_what_changed():
    old = parse_config(conf(GOOD), validate_proposal=accept_all)
    raw = conf(GOOD)
    raw["connections"]["h1-h3"] = {
        **copy.deepcopy(raw["connections"]["h1-h2"]),
        "remote_addrs": ["192.0.2.13"],
    }
    mid = parse_config(raw, validate_proposal=accept_all)
    assert diff_configs(old, mid).added == ("h1-h3",)
    assert diff_configs(old, mid).unchanged == ("h1-h2",)
    raw["connections"]["h1-h2"]["children"]["sites"]["rekey_time"] = "20m"
    new = parse_config(raw, validate_proposal=accept_all)
    changes = diff_configs(mid, new)
    assert (changes.changed, changes.unchanged) == (("h1-h2",), ("h1-h3",))
    gone = diff_configs(new, old)
    assert (gone.removed, gone.changed) == (("h1-h3",), ("h1-h2",))


def test_the_ike_layer_validates_proposals_by_default():
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["proposals"] = ["aes256gcm16-prfsha384"]
    raw["connections"]["h1-h2"]["children"]["sites"]["esp_proposals"] = ["aes128-md5"]
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    problems = dict(caught.value.problems)
    assert "needs a key exchange group" in problems["connections.h1-h2.proposals[0]"]
    assert "weak" in problems["connections.h1-h2.children.sites.esp_proposals[0]"]


def test_a_connection_or_child_named_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "keywayd.yaml"
    twice = GOOD + GOOD.split("connections:\n", 1)[1]  # h1-h2 again, under connections
    path.write_text(twice)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match=r"duplicate key 'h1-h2' \(first at line 4\)") as caught:
        load_config(path, validate_proposal=accept_all)
    assert PSK not in str(caught.value)
    child_twice = GOOD.replace("      sites:\n", "      sites: {}\n      sites:\n")
    path.write_text(child_twice)
    with pytest.raises(ConfigError, match="duplicate key 'sites'"):
        load_config(path, validate_proposal=accept_all)


@pytest.mark.parametrize(
    ("kind", "proposal", "reason"),
    [
        ("esp", "aes128gcm8", "data planes do not implement AES_GCM_8"),
        ("esp", "aes256gcm12", "data planes do not implement AES_GCM_12"),
        ("esp", "aes256-sha1", "data planes do not implement HMAC_SHA1_96"),
        ("ike", "3des-sha1-modp1024", "IKE engine cannot use it"),
    ],
)
def test_what_cannot_be_used_is_refused_even_when_weak_is_allowed(kind, proposal, reason):
    raw = conf(GOOD)
    conn = raw["connections"]["h1-h2"]
    conn["allow_weak"] = True
    if kind == "ike":
        conn["proposals"] = [proposal]
    else:
        conn["children"]["sites"]["esp_proposals"] = [proposal]
    with pytest.raises(ConfigError, match=reason):
        parse_config(raw)


@pytest.mark.parametrize("group", ["modp768", "modp1024", "modp1536", "ecp192", "ecp224"])
def test_weak_groups_the_parser_accepts_are_implemented(group):
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["allow_weak"] = True
    raw["connections"]["h1-h2"]["proposals"] = [f"aes128-sha256-{group}"]
    assert parse_config(raw).connections[0].proposals == (f"aes128-sha256-{group}",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9571", ("127.0.0.1", 9571)), ("[::1]:9100", ("::1", 9100)), (None, None)],
)
def test_metrics_listen_is_an_address_and_a_port(value, expected):
    raw = conf(GOOD)
    if value is not None:
        raw["metrics_listen"] = value
    assert parse_config(raw, validate_proposal=accept_all).metrics_listen == expected


@pytest.mark.parametrize("value", ["localhost:9571", "127.0.0.1", "127.0.0.1:0", ":9571", 9571])
def test_a_metrics_listen_that_is_not_address_and_port_is_refused(value):
    raw = {**conf(GOOD), "metrics_listen": value}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, validate_proposal=accept_all)
    assert ("metrics_listen", f"{value!r} must be ADDRESS:PORT, e.g. 127.0.0.1:9571 or "
            "[::1]:9571") in info.value.problems  # fmt: skip


def test_a_hard_lifetime_too_soon_after_the_rekey_is_warned_about():
    """Issue 14, item 22: 10% of a short rekey_time is less than two retransmissions."""
    raw = conf(GOOD)
    assert config_warnings(parse_config(raw, validate_proposal=accept_all)) == []
    raw["connections"]["h1-h2"]["children"]["sites"]["rekey_time"] = "60s"  # life 66s
    (warning,) = config_warnings(parse_config(raw, validate_proposal=accept_all))
    assert warning == (
        "connections.h1-h2.children.sites: life_time 66s is only 6s after rekey_time 60s, "
        "less than two retransmissions (11.2s): a rekey that loses a packet may not end "
        "before the hard lifetime"
    )
    raw["retransmit_timeout"] = 2  # 2 + 3.6 s
    assert config_warnings(parse_config(raw, validate_proposal=accept_all)) == []


def test_the_agent_config_module_passes_the_warnings_on(tmp_path):
    from ansible_collections.keyway.ipsec.plugins.modules import agent_config
    from tests.fixtures.ansible import run_module

    conn = conf(GOOD)["connections"]["h1-h2"]
    del conn["psk"]
    conn["children"]["sites"]["rekey_time"] = "60s"
    args = {
        "path": str(tmp_path / "keywayd.yml"),
        "connections": {"h1-h2": conn},
        "psks": {"h1-h2": PSK},
        "reload": False,
    }
    result = run_module(agent_config.main, args, check=True)
    assert not result.get("failed"), result
    (warning,) = result["warnings"]  # a string, or ansible-core 2.19's summary of one
    assert "connections.h1-h2.children.sites: life_time 66s is only 6s after" in str(warning)
    assert PSK not in str(result)


def _pubkey_config(tmp_path, key_pem: bytes, passphrase: bytes | None):
    from tests.fixtures.pki import make_ca, make_cert

    ca = make_ca()
    leaf = make_cert(ca, "h1.lab")
    for name, data in (("h1.pem", leaf.pem), ("h1.key", key_pem), ("ca.pem", ca.pem)):
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o600)
    raw = conf(GOOD)
    conn = raw["connections"]["h1-h2"]
    conn["local"] = {"id": "h1.lab", "auth": "pubkey", "certs": ["h1.pem"], "key": "h1.key"}
    conn["remote"] = {"id": "h2.lab", "auth": "pubkey", "cacerts": ["ca.pem"]}
    if passphrase is not None:
        (tmp_path / "h1.pass").write_bytes(passphrase + b"\n")
        (tmp_path / "h1.pass").chmod(0o600)
        conn["local"]["key_passphrase_file"] = "h1.pass"
    return raw, leaf


def test_an_encrypted_private_key_opens_with_its_passphrase_file(tmp_path):
    """Issue 15: private keys may be encrypted (PKCS#8); the passphrase is a secret file
    (0600), as a PSK is, and never shows in reprs or errors."""
    from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import (
        AgentError,
        _private_key,
    )
    from tests.fixtures.pki import make_ca, make_cert

    passphrase = b"a long passphrase, 4 words"
    leaf = make_cert(make_ca(), "h1.lab")
    raw, _unused = _pubkey_config(tmp_path, leaf.encrypted_key_pem(passphrase), passphrase)
    config = parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path)
    local = config.connection("h1-h2").local
    assert local.key_passphrase.reveal() == passphrase  # the file's trailing newline goes
    assert passphrase.decode() not in repr(config)
    key = _private_key(dataclasses.replace(local, key=str(tmp_path / local.key)))
    assert key.public_key().public_numbers() == leaf.key.public_key().public_numbers()

    wrong = dataclasses.replace(
        local, key=str(tmp_path / local.key), key_passphrase=Secret(b"not it")
    )
    with pytest.raises(AgentError, match=r"cannot load it \(a wrong passphrase") as refused:
        _private_key(wrong)
    assert "not it" not in str(refused.value)
    missing = dataclasses.replace(local, key=str(tmp_path / local.key), key_passphrase=None)
    with pytest.raises(AgentError, match="is encrypted: set key_passphrase_file"):
        _private_key(missing)
    (tmp_path / "h1.key").write_bytes(leaf.key_pem)
    with pytest.raises(AgentError, match="is not encrypted: drop key_passphrase_file"):
        _private_key(dataclasses.replace(local, key=str(tmp_path / local.key)))


def test_a_key_passphrase_file_must_be_private_and_go_with_a_key(tmp_path):
    from tests.fixtures.pki import make_ca, make_cert

    leaf = make_cert(make_ca(), "h1.lab")
    raw, _unused = _pubkey_config(tmp_path, leaf.encrypted_key_pem(b"pass phrase"), b"pp")
    (tmp_path / "h1.pass").chmod(0o644)
    del raw["connections"]["h1-h2"]["local"]["key"]
    with pytest.raises(ConfigError) as failed:
        parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path)
    problems = failed.value.problems
    path = "connections.h1-h2.local.key_passphrase_file"
    said = [message for where, message in problems if where == path]
    assert said[0].endswith("is readable by others (mode 0644); make it 0600")
    assert said[1] == "is the passphrase of key: set key"
    assert ("connections.h1-h2.local", "auth pubkey needs certs and key") in problems


def test_crls_and_the_revocation_policy_reach_the_engine(tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization

    from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import ike_connection
    from tests.fixtures.pki import make_ca, make_cert
    from tests.unit.ike.test_certs import crl_of

    ca = make_ca()
    mine = make_cert(ca, "h1.lab")
    for name, data in (("ca.pem", ca.pem), ("h1.pem", mine.pem), ("h1.key", mine.key_pem)):
        (tmp_path / name).write_bytes(data)
    crl = crl_of(ca)
    (tmp_path / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["local"] = {
        "id": "h1.lab", "auth": "pubkey", "certs": [str(tmp_path / "h1.pem")],
        "key": str(tmp_path / "h1.key"),
    }  # fmt: skip
    raw["connections"]["h1-h2"]["remote"] = {
        "id": "h2.lab", "auth": "pubkey", "cacerts": ["ca.pem"], "crls": ["ca.crl"],
        "revocation": "strict",
    }  # fmt: skip
    conn = parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path).connection("h1-h2")
    assert (conn.remote.crls, conn.remote.revocation) == (("ca.crl",), "strict")
    remote = dataclasses.replace(
        conn.remote, cacerts=(str(tmp_path / "ca.pem"),), crls=(str(tmp_path / "ca.crl"),)
    )
    engine_view = ike_connection(dataclasses.replace(conn, remote=remote))
    assert [c.fingerprint(hashes.SHA256()) for c in engine_view.crls] == [
        crl.fingerprint(hashes.SHA256())
    ]
    assert engine_view.revocation == "strict"

    raw["connections"]["h1-h2"]["local"]["crls"] = ["ca.crl"]
    raw["connections"]["h1-h2"]["remote"]["revocation"] = "sometimes"
    with pytest.raises(ConfigError) as failed:
        parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path)
    problems = dict(failed.value.problems)
    assert problems["connections.h1-h2.local"] == (
        "crls and revocation check the peer: set them in remote"
    )
    assert "sometimes" in problems["connections.h1-h2.remote.revocation"]


def test_both_ends_authenticate_alike_and_remote_auth_constrains_signatures(tmp_path):
    """Mixed authentication (a PSK one way, certificates the other) was parsed and then
    done as the local side's for both: refused now. A remote side may name the
    signatures it accepts, as strongSwan's remote auth does."""
    raw, _unused = _pubkey_config(tmp_path, b"unused", None)
    raw["connections"]["h1-h2"]["remote"] = {"id": "h2.lab", "auth": "psk"}
    with pytest.raises(ConfigError) as failed:
        parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path)
    assert ("connections.h1-h2", "local auth pubkey and remote auth psk: both ends "
            "authenticate the same way (psk, or certificates); mixed authentication is not "
            "implemented") in failed.value.problems  # fmt: skip
    for constraint, schemes in (("rsa/pss", ("rsa-pss",)), ("ed25519", ("ed25519",)),
                                ("pubkey", ())):  # fmt: skip
        raw["connections"]["h1-h2"]["remote"] = {
            "id": "h2.lab", "auth": constraint, "cacerts": ["ca.pem"]
        }  # fmt: skip
        conn = parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path).connection(
            "h1-h2"
        )
        assert conn.remote.method == "pubkey"
        assert PEER_SIGNATURES[conn.remote.auth] == schemes
    raw["connections"]["h1-h2"]["local"]["auth"] = "rsa/pss"  # a constraint is the peer's
    with pytest.raises(ConfigError, match=r"connections\.h1-h2\.local\.auth"):
        parse_config(raw, validate_proposal=accept_all, base_dir=tmp_path)


def test_remote_addrs_take_addresses_prefixes_and_any_with_an_initiation_order():
    good = yaml.safe_load(GOOD)
    conn = good["connections"]["h1-h2"]
    conn["remote_addrs"] = ["192.0.2.12", "198.51.100.0/24", "192.0.2.13", "%any6"]
    (parsed,) = parse_config(good, validate_proposal=accept_all).connections
    assert initiation_addresses(parsed.remote_addrs) == ("192.0.2.12", "192.0.2.13")
    assert [str(n) for n in peer_ranges(parsed.remote_addrs)] == [
        "192.0.2.12/32", "198.51.100.0/24", "192.0.2.13/32", "::/0"
    ]  # fmt: skip
    conn["remote_addrs"] = ["%any"]
    conn["local_addrs"] = ["%any"]
    conn["children"]["sites"]["start_action"] = "none"
    conn["children"]["sites"]["dpd_action"] = "restart"
    conn["remote_addrs"] = ["%any", "192.0.2.300", "10.0.0.1/8"]
    with pytest.raises(ConfigError) as caught:
        parse_config(good, validate_proposal=accept_all)
    problems = dict(caught.value.problems)
    assert problems["connections.h1-h2.remote_addrs[1]"] == (
        "'192.0.2.300' is not an IP address, a prefix, a DNS name or %any"
    )
    assert problems["connections.h1-h2.remote_addrs[2]"] == (
        "'10.0.0.1/8' is not an IP address, a prefix, a DNS name or %any"
    )
    assert problems["connections.h1-h2.remote_addrs"].endswith("sites: dpd_action restart")
    assert problems["connections.h1-h2.local_addrs"].startswith("is required when remote_addrs")


def test_a_dns_name_in_remote_addrs_is_tried_in_its_turn_and_needs_a_local_address():
    good = yaml.safe_load(GOOD)
    conn = good["connections"]["h1-h2"]
    conn["remote_addrs"] = ["gw.example.net", "192.0.2.12"]
    (parsed,) = parse_config(good, validate_proposal=accept_all).connections
    assert initiation_addresses(parsed.remote_addrs) == ("gw.example.net", "192.0.2.12")
    assert [str(n) for n in peer_ranges(parsed.remote_addrs)] == ["192.0.2.12/32"]
    conn["local_addrs"] = ["%any"]
    conn["children"]["sites"]["start_action"] = "trap"
    with pytest.raises(ConfigError) as caught:
        parse_config(good, validate_proposal=accept_all)
    problems = dict(caught.value.problems)
    assert problems["connections.h1-h2.local_addrs"] == (
        "is required when the first of remote_addrs is a DNS name (gw.example.net)"
    )
    assert problems["connections.h1-h2.remote_addrs"].startswith(
        "gw.example.net is a DNS name: a trap policy needs the peer's address"
    )


OPPORTUNISTIC = """
connections:
  mesh:
    opportunistic: private-or-clear
    local_addrs: [192.0.2.11]
    remote_addrs: [192.0.2.0/24, 198.51.100.0/24, "2001:db8::/64"]
    local: {auth: pubkey, certs: [h1.pem], key: h1.key}
    remote: {auth: pubkey, cacerts: [ca.pem]}
    shunt_lifetime: 5m
    children:
      host: {esp_proposals: [aes256gcm16]}
      gateway: {mode: pass, remote_ts: [192.0.2.1/32]}
"""


def test_an_opportunistic_connection_is_a_template_for_the_hosts_of_its_prefixes():
    (conn,) = parse_config(conf(OPPORTUNISTIC), validate_proposal=accept_all).connections
    assert (conn.opportunistic, conn.shunt_lifetime) == ("private-or-clear", 300)
    # Identified by the address; its peers by theirs (no id of their own).
    assert (conn.local.id, conn.remote.id) == ("192.0.2.11", "")
    host, gateway = conn.children
    # One transport policy pair per prefix of the local address's family, trapped.
    assert (host.mode, host.start_action) == ("transport", "trap")
    assert host.local_ts == ("192.0.2.11/32",)
    assert host.remote_ts == ("192.0.2.0/24", "198.51.100.0/24")
    # A pass child exempts its hosts, from the local address.
    assert (gateway.mode, gateway.local_ts, gateway.remote_ts) == (
        "pass", ("192.0.2.11/32",), ("192.0.2.1/32",)
    )  # fmt: skip
    private = conf(OPPORTUNISTIC)
    private["connections"]["mesh"]["opportunistic"] = "private"
    del private["connections"]["mesh"]["shunt_lifetime"]
    (conn,) = parse_config(private, validate_proposal=accept_all).connections
    assert (conn.opportunistic, conn.shunt_lifetime) == ("private", 900)


@pytest.mark.parametrize(
    "change, path, reason",
    [
        ({"local_addrs": ["%any"]}, "local_addrs", "the host's one address"),
        ({"local_addrs": ["192.0.2.11", "192.0.2.99"]}, "local_addrs", "the host's one address"),
        ({"remote": {"auth": "pubkey", "cacerts": ["ca.pem"], "id": "h2"}}, "remote.id",
         "identified by their addresses"),
        ({"local": {"auth": "psk", "id": "x"}, "remote": {"auth": "psk"}, "psk": PSK}, "",
         "authenticates by certificates"),
        ({"remote_addrs": ["peer.example"]}, "remote_addrs", "not names"),
        ({"remote_addrs": ["2001:db8::/64"]}, "remote_addrs", "no prefix of the local"),
        ({"opportunistic": "sometimes"}, "opportunistic", "not one of private"),
        ({"children": {"h": {"mode": "tunnel"}}}, "children.h.mode", "transport mode"),
        ({"children": {"h": {"remote_ts": ["10.0.0.0/8"]}}}, "children.h.remote_ts",
         "leave it out"),
        ({"children": {"h": {"start_action": "start"}}}, "children.h.start_action",
         "first packet"),
        ({"children": {"h": {"dpd_action": "restart"}}}, "children.h.dpd_action",
         "next packet"),
        ({"children": {"g": {"mode": "pass", "remote_ts": ["192.0.2.1/32"]}}}, "children",
         "needs a transport child"),
    ],
)  # fmt: skip
def test_what_an_opportunistic_connection_cannot_hold_is_refused_with_the_reason(
    change, path, reason
):
    raw = conf(OPPORTUNISTIC)
    raw["connections"]["mesh"].update(change)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, validate_proposal=accept_all)
    where = "connections.mesh" + (f".{path}" if path else "")
    assert any(p == where and reason in m for p, m in caught.value.problems), caught.value


def test_shunt_lifetime_belongs_to_opportunistic_connections():
    raw = conf(GOOD)
    raw["connections"]["h1-h2"]["shunt_lifetime"] = 60
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, validate_proposal=accept_all)
    assert "set opportunistic" in dict(caught.value.problems)["connections.h1-h2.shunt_lifetime"]
