"""agent_config's pki option (issue 15): connections on certificates name the host's
certificate, the CA and the CRL, written beside the config in files named after their
content, so that a renewal is a changed connection; nothing else is touched."""

from __future__ import annotations

import stat
from pathlib import Path

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from ansible_collections.keyway.ipsec.plugins.modules import agent_config
from tests.fixtures.ansible import run_module

CONN = {
    "local_addrs": ["192.0.2.11"],
    "remote_addrs": ["192.0.2.12"],
    "local": {"id": "h1.lab", "auth": "pubkey"},
    "remote": {"id": "h2.lab", "auth": "pubkey"},
    "children": {"sites": {"local_ts": ["10.1.0.0/24"], "remote_ts": ["10.2.0.0/24"]}},
}


def _pki(tmp_path: Path, renew: bool = False) -> dict:
    ca = pki.CertificateAuthority(tmp_path / "ca")
    if not ca.exists:
        ca.create("test CA", 3650)
    key_file = tmp_path / "key.pem"
    if not key_file.exists():
        pki.write_file(key_file, pki.key_pem(pki.make_key()), 0o600)
    key = pki.load_key(key_file.read_bytes())
    issued = ca.issue("h1", pki.make_csr(key, "h1.lab"), "h1.lab", 365, 400 if renew else 30)
    crl = ca.crl(30)
    ca.save()
    return {"key": str(key_file), "certificate": issued.pem.decode(), "ca": ca.cert_pem.decode(),
            "crl": crl.decode()}  # fmt: skip


def _run(tmp_path: Path, pki_args, check: bool = False) -> dict:
    args = {"path": str(tmp_path / "etc" / "keywayd.yml"), "connections": {"ab": CONN},
            "settings": {"control_socket": str(tmp_path / "none.sock")}}  # fmt: skip
    if pki_args is not None:
        args["pki"] = pki_args
    return run_module(agent_config.main, args, check=check)


def test_certificates_are_written_and_named_and_a_renewal_changes_the_connection(tmp_path):
    first = _run(tmp_path, _pki(tmp_path))
    assert first["changed"] and not first.get("failed")
    config = yaml.safe_load((tmp_path / "etc" / "keywayd.yml").read_text())
    conn = config["connections"]["ab"]
    (cert,) = conn["local"]["certs"]
    assert conn["local"]["key"] == str(tmp_path / "key.pem")
    named = [cert, *conn["remote"]["cacerts"], *conn["remote"]["crls"]]
    assert sorted(p for p in (tmp_path / "etc" / "pki").iterdir()) == sorted(map(Path, named))
    assert [Path(f).name.split("-")[0] for f in named] == ["cert", "ca", "crl"]
    assert all(stat.S_IMODE(Path(f).stat().st_mode) == 0o644 for f in named)  # public
    again = _run(tmp_path, _pki(tmp_path))
    assert not again["changed"], again["plan"]
    renewed = _run(tmp_path, _pki(tmp_path, renew=True))
    assert renewed["changed"] and renewed["plan"]["changed"] == ["ab"]
    assert not Path(cert).exists()  # the old certificate's file went with it
    assert len(list((tmp_path / "etc" / "pki").iterdir())) == 3


def test_a_connection_on_certificates_without_pki_fails_with_the_reason(tmp_path):
    result = _run(tmp_path, None)
    assert result["failed"]
    assert "connection ab authenticates with certificates (auth pubkey)" in result["msg"]
    assert not (tmp_path / "etc").exists()


def test_check_mode_writes_nothing_and_absent_removes_the_certificates_and_key(tmp_path):
    args = _pki(tmp_path)
    assert _run(tmp_path, args, check=True)["changed"]
    assert not (tmp_path / "etc").exists()
    _run(tmp_path, args)
    key = tmp_path / "etc" / "pki" / "key.pem"
    key.write_bytes(Path(args["key"]).read_bytes())  # the role keeps it there
    gone = run_module(agent_config.main, {"path": str(tmp_path / "etc" / "keywayd.yml"),
                                          "state": "absent"})  # fmt: skip
    assert str(key) in gone["removed"] and not (tmp_path / "etc").exists()
