"""Filters computing Keyway's intent from the whole inventory (module_utils/intent).

hostvars | keyway.ipsec.intent(groups, keyway_topologies, ...)
tunnels_intent.hosts[inventory_hostname].psk_refs
  | keyway.ipsec.intent_psks(keyway_master_secret, keyway_external_peers)
"""

from __future__ import annotations

import contextlib
import gc

from ansible.errors import AnsibleFilterError

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.topology import (
    IntentError,
    compute_intent,
    host_connections,
    host_pki,
    host_psks,
    psk_refs,
    validate_with_agent,
)


def _plain(value):
    """Ansible's lazy and vault-wrapped values as plain Python (strings, lists, dicts)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | float) or value is None:
        return value
    return str(value)


_HOST_KEYS = (
    "keyway_address",
    "keyway_sites",
    "keyway_ike_id",
    "keyway_overrides",
    "keyway_behind_nat",
)


@contextlib.contextmanager
def _cyclic_gc_paused():
    """The intent of a large mesh is millions of small acyclic objects made in one go:
    the cyclic collector would walk them again and again (a 1,000-host mesh took 33 s
    with it, 13 s without). Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _intent(
    hostvars,
    groups,
    topologies,
    defaults=None,
    group_overrides=None,
    external_peers=None,
    master_secret_length=None,
    exclude=None,
):
    hosts = {}
    compromised = []
    for name in hostvars:
        host = hostvars[name]
        hosts[str(name)] = {key: _plain(host[key]) for key in _HOST_KEYS if key in host}
        flag = _plain(host["keyway_compromised"]) if "keyway_compromised" in host else False
        if flag not in (True, False):
            raise AnsibleFilterError(
                f"keyway.ipsec.intent: host {name}: keyway_compromised: {flag!r} is not "
                "true or false"
            )
        if flag:
            compromised.append(str(name))  # its certificates revoked, and in no link
    try:
        with _cyclic_gc_paused():
            return _render(
                compute_intent(
                    hosts,
                    {str(g): [str(h) for h in members] for g, members in groups.items()},
                    _plain(topologies),
                    defaults=_plain(defaults),
                    group_overrides=_plain(group_overrides),
                    external_peers=_plain(external_peers),
                    master_secret_length=master_secret_length,
                    exclude=[str(h) for h in exclude or ()] + compromised,
                ),
                hosts,
                sorted(compromised),
            )
    except IntentError as exc:
        raise AnsibleFilterError(f"keyway.ipsec.intent: {exc}") from None


def _render(links, hosts, compromised=()) -> dict:
    """The validated intent as plain data: every link, and each managed host's share;
    the hosts Keyway's CA certifies, with their identities (`pki_identities`), and those
    whose certificates it revokes (`compromised`)."""
    validate_with_agent(links)
    result = {
        "links": {n: link.to_dict() for n, link in sorted(links.items())},
        "hosts": {},
        "pki_identities": {},
        "compromised": list(compromised),
    }
    for name in sorted(links.hosts):
        if name not in hosts:
            continue  # an external peer
        mine = links.of(name)
        result["hosts"][name] = {
            "connections": host_connections(name, links),
            "psk_refs": psk_refs(name, links),
            # the managed host at the other end of each link
            "peers": {
                link.name: link.peer_of(name)
                for link in mine
                if link.endpoints[link.peer_of(name)].managed
            },
            # what this host's tunnels reach (for probes and status)
            "reaches": sorted({p for link in mine for p in link.ts[link.peer_of(name)]}),
        }
        pki = host_pki(name, links)
        if pki is not None:  # certificates: what the CA certifies
            result["hosts"][name]["pki"] = pki
            result["pki_identities"][name] = pki["identity"]
    return result


def _intent_psks(refs, master_secret=None, external_peers=None):
    try:
        return host_psks(
            _plain(refs),
            None if master_secret is None else str(master_secret),
            _plain(external_peers),
        )
    except IntentError as exc:
        raise AnsibleFilterError(f"keyway.ipsec.intent_psks: {exc}") from None


class FilterModule:
    def filters(self):
        return {"intent": _intent, "intent_psks": _intent_psks}
