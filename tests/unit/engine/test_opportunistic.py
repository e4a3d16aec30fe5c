"""Issue 16: an opportunistic template on the responder (a mesh defined by policy): a
peer from its prefixes whose identity is the address it comes from, proven by its
certificate, gets a connection of its own through Engine.instantiate; anyone else is
refused before any is made."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from cryptography import x509

from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.core import (
    ChildParams,
    IkeConnection,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.events import (
    AuthFailed,
    ChildSaReady,
    IkeSaUp,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.retransmit import (
    RetransmitPolicy,
)
from tests.fixtures.fakenet import FakeNetwork
from tests.fixtures.pki import issue, make_ca
from tests.unit.engine.test_establish import A, B, Pair, of

CA = make_ca()
MESH = ipaddress.ip_network("192.0.2.0/24")


def credentials(identity: str):
    """A certificate whose one name is `identity` (an address, or a DNS name)."""
    try:
        name = x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        name = x509.DNSName(identity)
    return issue(CA, identity, sans=[name], key_usage="sign")


def side(name, local_id, remote_id, remote, local_ts, remote_ts, mine, **kw) -> IkeConnection:
    child = ChildParams("host", local_ts, remote_ts, ("aes256gcm16",), "transport")
    return IkeConnection(
        name, remote, local_id, remote_id, b"", ("aes256gcm16-prfsha384-x25519",),
        (child,), auth="pubkey", certs=(mine.der,), private_key=mine.key, cacerts=(CA.cert,),
        retransmit=RetransmitPolicy(0.5, 2.0, 2), **kw,
    )  # fmt: skip


def mesh_pair(initiator_id: str = A[0], answer: bool = True):
    """A initiates host to host as `initiator_id`; B holds only the template for MESH,
    and makes instances as keywayd does (or refuses them: `answer` False)."""
    template = side("mesh", B[0], "", ("0.0.0.0", 500), (f"{B[0]}/32",), (str(MESH),),
                    credentials(B[0]), peer_ranges=(MESH,), opportunistic=True)  # fmt: skip
    initiator = side("to-b", initiator_id, B[0], B, (f"{A[0]}/32",), (f"{B[0]}/32",),
                     credentials(initiator_id))  # fmt: skip
    pair = Pair(FakeNetwork(), initiator, template)
    made = []

    def instantiate(conn: IkeConnection, remote) -> IkeConnection | None:
        made.append(remote)
        if not answer:
            return None
        child = dataclasses.replace(conn.children[0], remote_ts=(f"{remote[0]}/32",))
        instance = dataclasses.replace(
            conn, name=f"mesh[{remote[0]}]", remote_address=remote, remote_id=remote[0],
            peer_ranges=(), children=(child,), opportunistic=False,
        )  # fmt: skip
        pair.b.add_connection(instance)
        return instance

    pair.b.instantiate = instantiate
    pair.a.initiate("to-b", 0.0)
    pair.pump(until=30)
    return pair, made


def test_a_peer_known_by_its_address_gets_a_connection_of_its_own():
    pair, made = mesh_pair()
    assert made == [A]
    (up,) = of(pair.events[B], IkeSaUp)
    assert (up.connection, up.remote_id) == (f"mesh[{A[0]}]", A[0])
    (child,) = of(pair.events[B], ChildSaReady)
    assert child.connection == f"mesh[{A[0]}]"
    assert (child.local_ts, child.remote_ts, child.mode) == (
        (f"{B[0]}/32",), (f"{A[0]}/32",), "transport"
    )  # fmt: skip
    assert of(pair.events[A], ChildSaReady)
    # The template stays a template: a second peer would get its own instance.
    assert pair.b.connections["mesh"].opportunistic


@pytest.mark.parametrize(
    "identity, why",
    [
        ("h1.lab", "no connection for peer identity"),  # a name, not an address
        ("192.0.2.99", "no connection for peer identity"),  # another host's address
    ],
)
def test_a_peer_not_identified_by_the_address_it_comes_from_is_refused(identity, why):
    pair, made = mesh_pair(initiator_id=identity)
    assert made == []
    (refused,) = of(pair.events[B], AuthFailed)
    assert why in refused.reason
    assert not of(pair.events[B], IkeSaUp) and not of(pair.events[A], ChildSaReady)


def test_a_template_that_takes_no_new_peer_refuses_it():
    pair, made = mesh_pair(answer=False)
    assert made == [A]
    (refused,) = of(pair.events[B], AuthFailed)
    assert "takes no new peer" in refused.reason
    assert not of(pair.events[B], IkeSaUp)
