"""Issue 15: revocation data the peers' certificates point to, fetched by keywayd over
real HTTP between lab namespaces while IKE_AUTH waits (the peer's retransmission then
goes through): CRLs from distribution points (a revoked peer refused, a clean one up, an
unreachable point leaving the decision to the policy) and OCSP responders."""

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


# An OCSP responder for one CA in a lab namespace: certificates it knows in a folder,
# the serials it calls revoked in a file (hex, one per line), signed by the CA's key.
OCSP_RESPONDER = """
import datetime, http.server, pathlib, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
folder = pathlib.Path(sys.argv[3])
ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
known = {}
for path in folder.glob("cert-*.pem"):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    known[cert.serial_number] = cert
revoked = {int(line, 16) for line in (folder / "revoked").read_text().split()}

class Responder(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        request = ocsp.load_der_ocsp_request(self.rfile.read(int(self.headers["Content-Length"])))
        cert, now = known[request.serial_number], datetime.datetime.now(datetime.timezone.utc)
        bad = cert.serial_number in revoked
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert, issuer=ca, algorithm=hashes.SHA1(),
            cert_status=ocsp.OCSPCertStatus.REVOKED if bad else ocsp.OCSPCertStatus.GOOD,
            this_update=now - datetime.timedelta(minutes=1),
            next_update=now + datetime.timedelta(hours=1),
            revocation_time=now - datetime.timedelta(hours=1) if bad else None,
            revocation_reason=x509.ReasonFlags.key_compromise if bad else None,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
        body = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        self.send_response(200)
        self.send_header("Content-Type", "application/ocsp-response")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Responder)
print("ready", flush=True)
server.serve_forever()
"""


@pytest.mark.parametrize("revoked", [False, True], ids=["good", "revoked"])
def test_an_ocsp_responder_the_certificate_names_decides(netns_hosts, agents, tmp_path, revoked):
    """Issue 15: OCSP over real HTTP from a responder (made with cryptography) in its
    own lab namespace; keywayd POSTs the request the peer's certificate calls for while
    IKE_AUTH waits, and the answer decides."""
    from cryptography import x509
    from cryptography.x509.oid import AuthorityInformationAccessOID

    from tests.fixtures.pki import issue, make_ca

    a, b, responder = netns_hosts(3).hosts
    uri = f"http://{responder.ipv4}:8080/"
    aia = x509.AuthorityInformationAccess([x509.AccessDescription(
        AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(uri))])  # fmt: skip
    ca = make_ca()
    www = tmp_path / "ocsp"
    www.mkdir()
    folders = {}
    for host in (a, b):
        leaf = issue(ca, host.name, sans=[x509.DNSName(f"{host.name}.lab")], key_usage="sign",
                     extra=[(aia, False)])  # fmt: skip
        folder = folders[host.name] = tmp_path / host.name
        folder.mkdir()
        for name, data in (("cert.pem", leaf.pem), ("key.pem", leaf.key_pem), ("ca.pem", ca.pem)):
            pki.write_file(folder / name, data, 0o600)
        (www / f"cert-{host.name}.pem").write_bytes(leaf.pem)
        if host is b:
            (www / "revoked").write_text(f"{leaf.cert.serial_number:x}\n" if revoked else "")
    (www / "ca.pem").write_bytes(ca.pem)
    (www / "ca.key").write_bytes(ca.key_pem)
    server = subprocess.Popen(
        ["ip", "netns", "exec", responder.netns, sys.executable, "-c", OCSP_RESPONDER,
         responder.ipv4, "8080", str(www)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "ready"
        conn_b = _pubkey(site_connection(b, a, start=False), folders[b.name], "relaxed")
        conn_a = _pubkey(site_connection(a, b, start=True), folders[a.name], "strict")
        agent_b = agents(b, {"ab": conn_b})
        agent_a = agents(a, {"ab": conn_a})
        agent_a.wait_for(lambda: f"IKE_AUTH waits on OCSP at {uri}" in agent_a.log(), "waits")
        if revoked:
            agent_a.wait_for(lambda: "(OCSP, " in agent_a.log(), "b refused")
            assert "is revoked since" in agent_a.log() and "(key_compromise)" in agent_a.log()
            assert f"OCSP at {uri}: serial" in agent_a.log()
            agent_b.wait_for(lambda: not agent_b.sas("ab"), "nothing left at b")
            assert not agent_a.sas("ab")
        else:
            agent_a.wait_for(lambda: agent_a.child_spis("ab"), "ab up")
            assert " good" in agent_a.log()
    finally:
        server.kill()
        server.wait()
