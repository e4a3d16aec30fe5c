"""Issue 15, the Ansible half: a mesh on certificates from Keyway's CA, through real
ansible-playbook runs against the lab. Each host's key is made on it and never leaves
it; the controller's CA signs, a second run changes nothing, and a host marked
compromised is revoked: its former peers drop their links to it and hold a CRL that
refuses its certificate."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ansible_collections.keyway.ipsec.plugins.module_utils.agent import control
from ansible_collections.keyway.ipsec.plugins.module_utils.ike import certs
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.crypto import IkeCryptoError
from tests.fixtures.ansible import recap, run_playbook, task_results
from tests.fixtures.traffic import stream

PUBKEY = {"keyway_defaults": {"auth": "pubkey"}}
CA_TASK = "The controller's CA signs the requests, renews what is due, revokes what left"


def _established(host) -> dict[str, list]:
    sas = control.request(f"{host.run_dir}/keywayd.sock", "list-sas")
    return {sa["connection"]: sa["children"] for sa in sas if sa["state"] == "established"}


def _config(host) -> dict:
    return yaml.safe_load(Path(host.config_dir, "keywayd.yml").read_text())


def test_a_mesh_on_certificates_from_the_controller_ca(netns_hosts, tmp_path):
    plan = netns_hosts(3)
    extra = tmp_path / "pubkey.yml"
    extra.write_text(yaml.safe_dump(PUBKEY))
    ca_dir = Path(plan.hosts[0].config_dir).parent.parent / "pki"  # keyway_lab_dir/pki
    # The plan of a first run, on hosts without keys and with no CA yet: every link
    # created, and nothing made (no CA, no key).
    planned = task_results(
        run_playbook("playbooks/plan.yml", plan, "-e", f"@{extra}"), "The plan, link by link"
    )
    assert set(planned["h1"]["msg"].values()) == {"created"}
    assert not ca_dir.exists()
    assert not any(Path(h.config_dir, "pki").exists() for h in plan.hosts)
    first = run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}")
    assert {h: s["failures"] for h, s in recap(first).items()} == dict.fromkeys(recap(first), 0)
    assert "PRIVATE KEY" not in first.stdout + first.stderr

    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    anchor = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    for host in plan.hosts:
        key = Path(host.config_dir, "pki", "key.pem")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        conns = _config(host)["connections"]
        assert all(c["local"]["auth"] == "pubkey" and "psk_file" not in c for c in conns.values())
        (cert_file,) = {c["local"]["certs"][0] for c in conns.values()}
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        public = certs.verify_peer([certs.der(cert)], [anchor], host.name)
        assert public.public_numbers() == _public_of(key).public_numbers()
    for host in plan.hosts:
        others = {f"{min(host.name, o.name)}-{max(host.name, o.name)}" for o in plan.hosts}
        established = _established(host)
        assert set(established) == others - {f"{host.name}-{host.name}"}
        assert all(established.values())  # each with its Child SA

    second = recap(run_playbook("playbooks/site.yml", plan, "-e", f"@{extra}"))
    assert all(s["changed"] == 0 for s in second.values()), second

    # Renewal: with renewal due 370 days before expiry, the certificates issued for 365
    # are due; the new ones are applied make-before-break under a counted stream.
    h1, h2, h3 = plan.hosts
    before = {sa["spi_i"] for sa in control.request(f"{h1.run_dir}/keywayd.sock", "list-sas")}
    old_cert = _config(h1)["connections"]["h1-h2"]["local"]["certs"][0]
    counted: list[int] = []
    sender = threading.Thread(target=lambda: counted.append(stream(h1, h2, 3000, 0.01)))
    sender.start()
    renewed = run_playbook(
        "playbooks/site.yml", plan, "-e", f"@{extra}",
        "-e", "tunnels_pki_valid_days=400", "-e", "tunnels_pki_renew_days=370",
    )  # fmt: skip
    assert sender.is_alive(), "the stream must outlast the renewal to count it"
    sender.join()
    assert counted == [3000]
    (ca_run,) = task_results(renewed, CA_TASK).values()
    assert sorted(ca_run["issued"]) == ["h1", "h2", "h3"] and not ca_run["revoked"]
    assert _config(h1)["connections"]["h1-h2"]["local"]["certs"][0] != old_cert
    after = {sa["spi_i"] for sa in control.request(f"{h1.run_dir}/keywayd.sock", "list-sas")}
    assert after and not after & before  # every IKE SA reauthenticated

    # h3 is compromised: revoked, and out of every link.
    h3_cert = x509.load_pem_x509_certificate(
        Path(_config(h3)["connections"]["h1-h3"]["local"]["certs"][0]).read_bytes()
    )
    revoke = tmp_path / "revoke.yml"
    revoke.write_text(yaml.safe_dump(
        {**PUBKEY, "keyway_compromised": "{{ inventory_hostname == 'h3' }}"}
    ))  # fmt: skip
    third = run_playbook("playbooks/site.yml", plan, "-e", f"@{revoke}")
    (ca_run,) = task_results(third, CA_TASK).values()
    assert ca_run["revoked"] == ["h3"] and not ca_run["issued"]
    third = recap(third)
    assert third["h3"]["changed"] == 0  # a compromised host is not touched
    for host in (h1, h2):
        conns = _config(host)["connections"]
        assert list(conns) == ["h1-h2"]
        assert list(_established(host)) == ["h1-h2"]
        (crl_file,) = conns["h1-h2"]["remote"]["crls"]
        crl = certs.load_crl(Path(crl_file).read_bytes())
        try:
            certs.verify_peer([certs.der(h3_cert)], [anchor], "h3", crls=(crl,))
        except IkeCryptoError as exc:
            assert "revoked" in str(exc)
        else:
            raise AssertionError("h3's certificate still verifies")
    # h3, untouched, still runs its old links: its former peers no longer answer it (h1
    # has no connection from its address any more; its IKE_SA_INIT goes unanswered).
    with pytest.raises(control.ControlError, match="h1-h3: not established after 8 s"):
        control.request(f"{h3.run_dir}/keywayd.sock", "initiate",
                        args={"connection": "h1-h3", "timeout": 8})  # fmt: skip
    assert list(_established(h1)) == ["h1-h2"]


def _public_of(key_file: Path):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()
