"""keywayd against Debian's charon beyond one tunnel: IKE fragments (RFC 7383) both ways,
further Child SAs on CREATE_CHILD_SA started by each side, rekeys both ends start at
once, and both ends initiating the same connection at once (strongSwan issue #1801)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fixtures.keywayd import Keywayd
from tests.fixtures.netns import udp_exchange
from tests.fixtures.pki import issue, make_ca, make_cert
from tests.interop.test_keywayd_vs_strongswan import KEYWAYD_YML, PSK, SWANCTL_CONF, agree
from tests.unit.ike.test_certs import crl_of

PROPOSAL, ESP = "aes256gcm16-prfsha384-x25519", "aes256gcm16"
TWINS = "IKE SA initiated by both ends at once"


def charon_ike_sas(charon) -> list[dict]:
    """charon's IKE SAs of connection kw, in any state (`--raw`: one block each)."""
    blocks = re.findall(r"\bkw \{([^{]*)", charon.list_sas())
    return [dict(re.findall(r"([\w-]+)=(\S+)", b)) for b in blocks]


def charon_installed(charon) -> list[dict]:
    children = re.findall(r"(kw\w*)-\d+ \{([^{}]*)", charon.list_sas())
    return [
        {"name": name, **dict(re.findall(r"([\w-]+)=(\S+)", body))}
        for name, body in children
        if "INSTALLED" in body
    ]


def _config(a, b, start_action="none", **extra) -> dict:
    values = dict(a=a, b=b, psk=PSK, proposal=PROPOSAL, esp=ESP)
    config = yaml.safe_load(KEYWAYD_YML.format(start_action=start_action, **values))
    config["connections"]["kw"].update(extra)
    return config["connections"]


def _swanctl(a, b) -> str:
    return SWANCTL_CONF.format(a=a, b=b, psk=PSK, proposal=PROPOSAL, esp=ESP)


def _pubkey_swanctl(a, b, me: str, them: str) -> str:
    """charon's swanctl.conf on b with certificates: its own ({b}.pem) as `them`, the
    peer as `me`."""
    return (
        _swanctl(a, b)
        .replace(
            f"auth = psk\n            id = {b.name}.lab",
            f'auth = pubkey\n            certs = {b.name}.pem\n            id = "{them}"',
        )
        .replace(
            f"auth = psk\n            id = {a.name}.lab", f'auth = pubkey\n            id = "{me}"'
        )
    )


def _pubkey_conns(a, b, start_action: str, tmp_path, me: str, them: str, files: dict,
                  local: dict | None = None, remote: dict | None = None) -> dict:  # fmt: skip
    """keywayd's connection on a with certificates: `files` (a.pem, a.key, ca.pem...)
    written 0600 into tmp_path; `local` and `remote` add keys to each side."""
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o600)
    conns = _config(a, b, start_action)
    conns["kw"].pop("psk")
    conns["kw"]["local"] = {"id": me, "auth": "pubkey", "certs": [str(tmp_path / "a.pem")],
                            "key": str(tmp_path / "a.key"), **(local or {})}  # fmt: skip
    conns["kw"]["remote"] = {"id": them, "auth": "pubkey",
                             "cacerts": [str(tmp_path / "ca.pem")], **(remote or {})}  # fmt: skip
    return conns


def test_certificate_exchanges_travel_as_fragments_both_ways(netns_hosts, charon_factory, tmp_path):
    a, b = netns_hosts(2).hosts
    ca = make_ca()
    mine, theirs = make_cert(ca, f"{a.name}.lab", ec.SECP384R1), make_cert(ca, f"{b.name}.lab")
    charon = charon_factory(
        b.netns,
        _pubkey_swanctl(a, b, f"{a.name}.lab", f"{b.name}.lab"),
        files={
            "x509ca/ca.pem": ca.pem,
            f"x509/{b.name}.pem": theirs.pem,
            f"private/{b.name}.pem": theirs.key_pem,
        },
        charon_settings="fragment_size = 576",
    )
    # keywayd's key is encrypted (PKCS#8), its passphrase in a 0600 file (issue 15).
    passphrase = b"correct horse battery staple"
    files = {"a.pem": mine.pem, "a.key": mine.encrypted_key_pem(passphrase),
             "a.pass": passphrase, "ca.pem": ca.pem}  # fmt: skip
    conns = _pubkey_conns(a, b, "start", tmp_path, f"{a.name}.lab", f"{b.name}.lab", files,
                          local={"key_passphrase_file": str(tmp_path / "a.pass")})  # fmt: skip
    agent = Keywayd(a.netns, tmp_path / "a", conns, fragment_size=576)
    try:
        agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
        agree(agent, charon)
        log = charon.log_tail(400)
        # charon reassembled our fragmented IKE_AUTH and fragmented its answer to us.
        assert re.search(r"received fragment #\d+ of [2-9], reassembled", log), log
        assert re.search(r"splitting IKE message .* into [2-9] fragments", log), log
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"frag")
    finally:
        agent.stop()


@pytest.mark.parametrize("keywayd_initiates", [True, False], ids=["keywayd-init", "charon-init"])
@pytest.mark.parametrize("identities", ["user@fqdn", "dn"])
def test_ed25519_chains_through_an_intermediate_and_other_identity_types(
    netns_hosts, charon_factory, tmp_path, keywayd_initiates, identities
):
    """Issue 15: keywayd validates paths itself (RFC 4945), so Ed25519 certificates,
    an intermediate CA the peer sends, and a user@FQDN identity (SAN rfc822Name) work;
    cryptography's web-PKI verifier refused all three. And distinguished names, as
    strongSwan writes them, both ways (keywayd sent a DN as an FQDN)."""
    a, b = netns_hosts(2).hosts
    dn = identities == "dn"
    me = "O=Keyway tests, CN=carol" if dn else f"carol@{a.name}.lab"
    them = f"O=Keyway tests, CN={b.name}" if dn else f"{b.name}.lab"
    ca = issue(None, "Root CA", Ed25519PrivateKey.generate(), ca=True, key_usage="ca")
    sub = issue(ca, "Sub CA", Ed25519PrivateKey.generate(), ca=True, key_usage="ca")
    mine = issue(sub, "carol", Ed25519PrivateKey.generate(), sans=[x509.RFC822Name(me)],
                 key_usage="sign")  # fmt: skip
    theirs = issue(sub, b.name, Ed25519PrivateKey.generate(),
                   sans=[x509.DNSName(f"{b.name}.lab")], key_usage="sign")  # fmt: skip
    charon = charon_factory(
        b.netns,
        _pubkey_swanctl(a, b, me, them),
        files={
            "x509ca/ca.pem": ca.pem,
            "x509ca/sub.pem": sub.pem,
            f"x509/{b.name}.pem": theirs.pem,
            f"private/{b.name}.pem": theirs.key_pem,
        },
    )
    # a.pem with the intermediate; ca.pem the root only: charon sends Sub CA.
    files = {"a.pem": mine.pem + sub.pem, "a.key": mine.key_pem, "ca.pem": ca.pem}
    start = "start" if keywayd_initiates else "none"
    conns = _pubkey_conns(a, b, start, tmp_path, me, them, files)
    agent = Keywayd(a.netns, tmp_path / "a", conns)
    try:
        if not keywayd_initiates:
            charon.swanctl("--initiate", "--child", "kw", timeout=30)
        agent.wait_for(lambda: agent.sas("kw") and agent.sas("kw")[0]["children"], "kw up")
        agree(agent, charon)
        assert agent.sas("kw")[0]["remote_id"] == them
        log = charon.log_path.read_text()
        assert re.search(rf"authentication of '{re.escape(me)}' with ED25519 successful", log)
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"ed") == b"de"
    finally:
        agent.stop()


def test_charon_s_revoked_certificate_is_refused_and_nothing_stays_up(
    netns_hosts, charon_factory, tmp_path
):
    """Issue 15: a CRL (file) listing charon's certificate: keywayd refuses charon's
    AUTH, says why, and tells charon (AUTHENTICATION_FAILED): no SA on either side."""
    a, b = netns_hosts(2).hosts
    ca = make_ca()
    mine, theirs = make_cert(ca, f"{a.name}.lab"), make_cert(ca, f"{b.name}.lab")
    charon = charon_factory(
        b.netns,
        _pubkey_swanctl(a, b, f"{a.name}.lab", f"{b.name}.lab"),
        files={
            "x509ca/ca.pem": ca.pem,
            f"x509/{b.name}.pem": theirs.pem,
            f"private/{b.name}.pem": theirs.key_pem,
        },
    )
    crl = crl_of(ca, [theirs], reason=x509.ReasonFlags.superseded)
    files = {"a.pem": mine.pem, "a.key": mine.key_pem, "ca.pem": ca.pem,
             "ca.crl": crl.public_bytes(serialization.Encoding.PEM)}  # fmt: skip
    revocation = {"crls": [str(tmp_path / "ca.crl")], "revocation": "strict"}
    conns = _pubkey_conns(a, b, "start", tmp_path, f"{a.name}.lab", f"{b.name}.lab", files,
                          remote=revocation)  # fmt: skip
    agent = Keywayd(a.netns, tmp_path / "a", conns)
    try:
        revoked = f"'CN={b.name}.lab,O=Keyway tests' is revoked since"
        agent.wait_for(lambda: revoked in agent.log(), "the revoked certificate refused")
        assert "(superseded)" in agent.log()
        agent.wait_for(lambda: not charon_ike_sas(charon), "no IKE SA left at charon", 10)
        assert not agent.sas("kw")
    finally:
        agent.stop()


def _two_children(a, b) -> tuple[dict, str]:
    conns = _config(a, b)
    conns["kw"]["children"]["kw2"] = {
        "local_ts": [f"{a.site4.rsplit('.', 2)[0]}.99.0/24"],
        "remote_ts": [f"{b.site4.rsplit('.', 2)[0]}.99.0/24"],
        "esp_proposals": ["aes128gcm16"],
    }
    # kw2 goes after the kw child's block, inside `children`.
    end_of_kw = "            }\n        }\n    }\n}\nsecrets"
    kw2 = f"""            }}
            kw2 {{
                local_ts = {b.site4.rsplit(".", 2)[0]}.99.0/24
                remote_ts = {a.site4.rsplit(".", 2)[0]}.99.0/24
                esp_proposals = aes128gcm16
            }}
        }}
    }}
}}
secrets"""
    swanctl = _swanctl(a, b).replace(end_of_kw, kw2, 1)
    return conns, swanctl


@pytest.mark.parametrize("keywayd_initiates", [True, False], ids=["keywayd-init", "charon-init"])
def test_a_second_child_comes_up_on_create_child_sa(
    netns_hosts, charon_factory, tmp_path, keywayd_initiates
):
    a, b = netns_hosts(2).hosts
    conns, swanctl = _two_children(a, b)
    assert "kw2 {" in swanctl
    for host, prefix in ((a, conns["kw"]["children"]["kw2"]["local_ts"][0]), (b, None)):
        prefix = prefix or conns["kw"]["children"]["kw2"]["remote_ts"][0]
        subprocess.run(  # a second site on each host, behind kw2
            [
                "ip",
                "-n",
                host.netns,
                "addr",
                "add",
                prefix.replace(".0/24", ".1/24"),
                "dev",
                "site0",
            ],
            check=True,
        )
    charon = charon_factory(b.netns, swanctl)
    agent = Keywayd(a.netns, tmp_path / "a", conns)
    try:
        if keywayd_initiates:
            agent.ctl("initiate", connection="kw")
        else:  # the first in IKE_AUTH, the second on CREATE_CHILD_SA
            charon.swanctl("--initiate", "--child", "kw", timeout=30)
            charon.swanctl("--initiate", "--child", "kw2", timeout=30)
        agent.wait_for(
            lambda: agent.sas("kw") and len(agent.sas("kw")[0]["children"]) == 2, "two children"
        )
        (sa,) = agent.sas("kw")
        ours = {c["name"]: (c["spi_in"], c["spi_out"]) for c in sa["children"]}
        theirs = {c["name"]: (c["spi-out"], c["spi-in"]) for c in charon_installed(charon)}
        assert ours == theirs and len(charon_ike_sas(charon)) == 1
        second = [
            p["remote_ts"][0].replace(".0/24", ".1") for p in (conns["kw"]["children"]["kw2"],)
        ]
        assert udp_exchange(
            a.netns,
            b.netns,
            conns["kw"]["children"]["kw2"]["local_ts"][0].replace(".0/24", ".1"),
            second[0],
            b"kw2",
        )
    finally:
        agent.stop()


def _settled(agent, charon) -> bool:
    try:
        agree(agent, charon)
    except (AssertionError, ValueError, KeyError, IndexError):
        return False
    return len(charon_ike_sas(charon)) == 1 and len(charon_installed(charon)) == 1


@contextlib.contextmanager
def _ike_blocked(*hosts):
    """Drop IKE (UDP 500/4500) into the hosts: requests sent meanwhile are only
    retransmitted later, so two exchanges started now are sure to cross."""
    rule = "udp dport { 500, 4500 } drop"
    for host in hosts:
        script = (
            f"table inet kwblock {{ chain in {{ type filter hook input priority 0; {rule}; }}; }}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=script.encode(), check=True
        )
    try:
        yield
    finally:
        for host in hosts:
            subprocess.run(
                ["ip", "netns", "exec", host.netns, "nft", "delete", "table", "inet", "kwblock"],
                check=True,
            )


def _ours(agent) -> tuple:
    """keywayd's IKE SA and Child SA SPIs (charon may be mid-way through a retry)."""
    (sa,) = agent.sas("kw")
    return sa["spi_i"], tuple((c["spi_in"], c["spi_out"]) for c in sa["children"])


def _charon_sent(charon, what: str) -> int:
    return charon.log_tail(100000).count(f"generating {what} request")


def test_child_and_ike_rekeys_started_by_both_ends_at_once(netns_hosts, charon_factory, tmp_path):
    a, b = netns_hosts(2).hosts
    charon = charon_factory(b.netns, _swanctl(a, b))
    agent = Keywayd(a.netns, tmp_path / "a", _config(a, b, "start"))
    try:
        agent.wait_for(lambda: _settled(agent, charon), "kw up")
        for round_, (ours, theirs) in enumerate(
            [
                ({"child": "kw"}, ("--child", "kw")),
                ({}, ("--ike", "kw")),
                ({"child": "kw"}, ("--child", "kw")),
            ]
        ):
            agent.wait_for(lambda: _settled(agent, charon), "settled before the round")
            before = _ours(agent)
            sent = _charon_sent(charon, "CREATE_CHILD_SA")
            with _ike_blocked(a, b):
                agent.ctl("rekey", connection="kw", **ours)
                charon.swanctl("--rekey", *theirs)
                agent.wait_for(
                    lambda: _charon_sent(charon, "CREATE_CHILD_SA") > sent,  # noqa: B023
                    "charon's rekey request sent",
                )
            agent.wait_for(
                lambda before=before: _settled(agent, charon) and _ours(agent) != before,
                f"one SA pair after rekeys that crossed, round {round_}",
                timeout=60,
            )
        log = agent.log()
        assert "NegotiationFailed" not in log and "negotiation failed" not in log
        # The requests crossed, and the collision rules settled them (which rule depends
        # on which retransmission arrived first): a lost or won collision, a request
        # refused while another exchange was on the same SA, or one for an SA gone.
        crossed = [
            line
            for line in log.splitlines()
            if "keyway.ike" in line
            and any(w in line for w in ("collision", "collided", "for now", "busy", "is gone"))
        ]
        assert len(crossed) >= 2, log
        assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"still")
    finally:
        agent.stop()


def test_both_ends_initiating_at_once_end_with_one_ike_sa(netns_hosts, charon_factory, tmp_path):
    a, b = netns_hosts(2).hosts
    charon = charon_factory(b.netns, _swanctl(a, b))
    agent = Keywayd(a.netns, tmp_path / "a", _config(a, b))
    try:
        for round_ in range(3):
            sent = _charon_sent(charon, "IKE_SA_INIT")
            with _ike_blocked(a, b):  # both IKE_SA_INITs leave before either arrives
                agent.ctl("initiate", connection="kw", wait=False)
                initiate = threading.Thread(
                    target=charon.swanctl,
                    args=("--initiate", "--child", "kw"),
                    kwargs={"check": False},
                )
                initiate.start()
                agent.wait_for(
                    lambda sent=sent: _charon_sent(charon, "IKE_SA_INIT") > sent,
                    "charon's IKE_SA_INIT sent",
                )
            initiate.join(timeout=60)
            # charon retransmits sooner (1 s) than keywayd (4 s): its IKE SA is up first,
            # ours follows, and then the twins are seen and the one of them with the
            # lower nonce deleted, by keywayd whoever made it.
            agent.wait_for(
                lambda round_=round_: agent.log().count(TWINS) > round_ and _settled(agent, charon),
                f"one IKE SA, round {round_}",
                40,
            )
            assert udp_exchange(a.netns, b.netns, a.site4_address, b.site4_address, b"one")
            agent.ctl("terminate", connection="kw")
            agent.wait_for(lambda: not agent.sas("kw") and not charon_ike_sas(charon), "down")
        assert "peer restarted" not in agent.log() and "authentication failed" not in agent.log()
    finally:
        agent.stop()
