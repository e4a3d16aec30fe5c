"""Issue 15: CRLs from the distribution points the peers' certificates name, fetched
by keywayd over real HTTP between lab namespaces while IKE_AUTH waits (the peer's
retransmission then goes through): a revoked peer is refused, a clean one comes up,
and an unreachable distribution point leaves the decision to the revocation policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils import pki
from tests.fixtures.keywayd import site_connection

# A plain HTTP server for one folder, in a lab namespace (the distribution point).
SERVE = """
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), handler)
print("ready", flush=True)
server.serve_forever()
"""


def _with_cdp(ca: pki.CertificateAuthority, host, uri: str, tmp_path: Path) -> Path:
    """`host`'s key and a certificate from Keyway's CA naming `uri` as its CRL
    distribution point (pki_ca's crl_uri), written for keywayd."""
    key = pki.make_key()
    identity = f"{host.name}.lab"
    issued = ca.issue(host.name, pki.make_csr(key, identity), identity, 365, 30, crl_uri=uri)
    folder = tmp_path / host.name
    folder.mkdir(exist_ok=True)
    pki.write_file(folder / "cert.pem", issued.pem, 0o600)
    pki.write_file(folder / "key.pem", pki.key_pem(key), 0o600)
    pki.write_file(folder / "ca.pem", ca.cert_pem, 0o600)
    return folder


def _pubkey(conn: dict, folder: Path, revocation: str) -> dict:
    conn = dict(conn)
    conn.pop("psk")
    conn["local"] = {**conn["local"], "auth": "pubkey", "certs": [str(folder / "cert.pem")],
                     "key": str(folder / "key.pem")}  # fmt: skip
    conn["remote"] = {**conn["remote"], "auth": "pubkey", "cacerts": [str(folder / "ca.pem")],
                      "revocation": revocation}  # fmt: skip
    return conn


@pytest.fixture
def distribution_point(tmp_path):
    servers = []

    def serve(host, folder: Path) -> str:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-c", SERVE, host.ipv4, "8080",
             str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        servers.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return f"http://{host.ipv4}:8080/ca.crl"

    yield serve
    for proc in servers:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("case", ["clean", "revoked", "unreachable"])
def test_a_crl_fetched_from_the_distribution_point_decides(
    netns_hosts, agents, distribution_point, tmp_path, case
):
    a, b, web = netns_hosts(3).hosts
    ca = pki.CertificateAuthority(tmp_path / "ca")
    ca.create("Keyway CA", 3650)
    crl_dir = tmp_path / "www"
    crl_dir.mkdir()
    uri = distribution_point(web, crl_dir) if case != "unreachable" else "http://192.0.2.99/x"
    folder_a, folder_b = _with_cdp(ca, a, uri, tmp_path), _with_cdp(ca, b, uri, tmp_path)
    if case == "revoked":
        ca.revoke(b.name, "key_compromise")
    (crl_dir / "ca.crl").write_bytes(ca.crl(30, force=True))
    # b answers; a initiates and checks b's certificate strictly (relaxed when unreachable:
    # the policy lets it through).
    policy = "relaxed" if case == "unreachable" else "strict"
    agent_b = agents(b, {"ab": _pubkey(site_connection(b, a, start=False), folder_b, "relaxed")})
    agent_a = agents(a, {"ab": _pubkey(site_connection(a, b, start=True), folder_a, policy)})
    agent_a.wait_for(lambda: "IKE_AUTH waits on the CRL at" in agent_a.log(), "a waits")
    if case == "revoked":
        agent_a.wait_for(lambda: "is revoked since" in agent_a.log(), "b refused")
        assert f"CRL at {uri}: 1 revoked" in agent_a.log()
        agent_b.wait_for(lambda: not agent_b.sas("ab"), "nothing left at b")
        assert not agent_a.sas("ab")
        return
    agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab up")
    if case == "clean":
        assert f"CRL at {uri}: 0 revoked" in agent_a.log()
    else:
        assert f"CRL at {uri} not fetched" in agent_a.log()
