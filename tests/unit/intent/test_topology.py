"""The inventory model: topologies, overrides and their precedence, initiators, PSKs,
and every inconsistency refused with where it is, before any host is touched."""

from __future__ import annotations

import base64

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.topology import (
    IntentError,
    compute_intent,
    host_connections,
    host_pki,
    host_psks,
    link_psk,
    psk_refs,
    validate_with_agent,
)

MASTER = "m" * 40


def host(n: int, sites=True, **extra) -> dict:
    vars_ = {"keyway_address": f"192.0.2.{10 + n}"}
    if sites:
        vars_["keyway_sites"] = [f"10.{n}.0.0/24", f"fd00:{n}::/64"]
    return {**vars_, **extra}


def inventory(count: int = 4, **extra_hosts):
    hostvars = {f"h{n}": host(n) for n in range(1, count + 1)}
    hostvars.update(extra_hosts)
    groups = {"all": list(hostvars), "lab": [f"h{n}" for n in range(1, count + 1)]}
    return hostvars, groups


def intent(topologies, hostvars=None, groups=None, **kw):
    if hostvars is None:
        hostvars, groups = inventory()
    kw.setdefault("master_secret_length", len(MASTER))
    links = compute_intent(hostvars, groups, topologies, **kw)
    validate_with_agent(links)
    return links


def problems_of(topologies, hostvars=None, groups=None, **kw) -> list[str]:
    with pytest.raises(IntentError) as caught:
        intent(topologies, hostvars, groups, **kw)
    return caught.value.problems


def test_a_mesh_links_every_pair_and_both_ends_agree():
    links = intent([{"name": "core", "type": "mesh", "members": "lab"}])
    assert sorted(links) == ["h1-h2", "h1-h3", "h1-h4", "h2-h3", "h2-h4", "h3-h4"]
    one, two = host_connections("h1", links)["h1-h2"], host_connections("h2", links)["h1-h2"]
    assert one["local"] == two["remote"] and one["remote"] == two["local"]
    assert one["local_addrs"] == two["remote_addrs"] == ["192.0.2.11"]
    c1, c2 = one["children"]["sites"], two["children"]["sites"]
    assert c1["local_ts"] == c2["remote_ts"] == ["10.1.0.0/24", "fd00:1::/64"]
    # The end whose name sorts first starts; the other waits and does not restart.
    assert (c1["start_action"], c1["dpd_action"]) == ("start", "restart")
    assert (c2["start_action"], c2["dpd_action"]) == ("none", "clear")
    # Settings nobody overrode are left to keywayd's own defaults.
    assert "proposals" not in one and "esp_proposals" not in c1


def test_hosts_in_no_topology_are_left_alone():
    hostvars, groups = inventory(3, bystander={"ansible_host": "x"})  # no Keyway variables
    links = intent([{"name": "core", "type": "mesh", "members": ["h1", "h2"]}], hostvars, groups)
    assert list(links) == ["h1-h2"]
    assert host_connections("h3", links) == {} == host_connections("bystander", links)


def test_groups_without_hosts_yet_make_no_links():
    hostvars, groups = inventory(2)
    groups.update(none=[], hubs=["h1"])
    links = intent(
        [
            {"name": "m", "type": "mesh", "members": "lab"},
            {"name": "a", "type": "hub_spoke", "hubs": "none", "spokes": "none"},
            {"name": "b", "type": "hub_spoke", "hubs": "hubs", "spokes": "none"},
            {"name": "c", "type": "site_to_site", "pairs": []},
            {"name": "d", "type": "links", "links": []},
        ],
        hostvars,
        groups,
    )
    assert list(links) == ["h1-h2"]
    (problem,) = problems_of(
        [{"name": "e", "type": "hub_spoke", "hubs": "none", "spokes": "hubs"}], hostvars, groups
    )
    assert problem == "topology e: has spokes but no hub"


def test_hub_and_spokes_reach_each_other_through_the_first_hub():
    hostvars, groups = inventory(5)
    groups.update(hubs=["h1", "h2"], spokes=["h3", "h4", "h5"])
    links = intent(
        [{"name": "wan", "type": "hub_spoke", "hubs": "hubs", "spokes": "spokes"}], hostvars, groups
    )
    assert sorted(links) == ["h1-h3", "h1-h4", "h1-h5", "h2-h3", "h2-h4", "h2-h5"]
    spoke = host_connections("h3", links)
    via = spoke["h1-h3"]["children"]["sites"]
    assert via["remote_ts"] == [
        "10.1.0.0/24",
        "fd00:1::/64",
        "10.4.0.0/24",
        "fd00:4::/64",
        "10.5.0.0/24",
        "fd00:5::/64",
    ]
    assert spoke["h2-h3"]["children"]["sites"]["remote_ts"] == ["10.2.0.0/24", "fd00:2::/64"]
    assert via["start_action"] == "start"  # spokes dial in
    hub = host_connections("h1", links)["h1-h3"]["children"]["sites"]
    assert hub["local_ts"] == via["remote_ts"] and hub["start_action"] == "none"


def test_spokes_may_reach_each_other_directly_on_demand():
    hostvars, groups = inventory(4)
    groups.update(hubs=["h1"], spokes=["h2", "h3", "h4"])
    links = intent(
        [
            {
                "name": "wan",
                "type": "hub_spoke",
                "hubs": "hubs",
                "spokes": "spokes",
                "spoke_to_spoke": "direct",
            }
        ],
        hostvars,
        groups,
    )
    direct = host_connections("h2", links)["h2-h3"]["children"]["sites"]
    assert direct["start_action"] == "trap" and direct["dpd_action"] == "trap"
    assert host_connections("h3", links)["h2-h3"]["children"]["sites"]["start_action"] == "trap"
    assert host_connections("h2", links)["h1-h2"]["children"]["sites"]["remote_ts"] == [
        "10.1.0.0/24",
        "fd00:1::/64",
    ]


def test_hosts_without_sites_get_host_to_host_transport():
    hostvars = {"a": host(1, sites=False), "b": host(2, sites=False)}
    links = intent(
        [{"name": "p", "type": "links", "links": [{"ends": ["a", "b"]}]}],
        hostvars,
        {"all": ["a", "b"]},
    )
    child = host_connections("a", links)["a-b"]["children"]["host"]
    assert child["mode"] == "transport"
    assert (child["local_ts"], child["remote_ts"]) == (["192.0.2.11/32"], ["192.0.2.12/32"])


def test_overrides_follow_link_host_group_topology_defaults():
    hostvars, groups = inventory(4)
    hostvars["h2"]["keyway_overrides"] = {"rekey_time": "20m"}
    groups["fast"] = ["h3"]
    links = intent(
        [
            {
                "name": "core",
                "type": "mesh",
                "members": "lab",
                "overrides": {"esp_proposals": ["aes128gcm16"], "rekey_time": "30m"},
            },
        ],
        hostvars,
        groups,
        defaults={"esp_proposals": ["chacha20poly1305"], "dpd_delay": "10s", "rekey_time": "2h"},
        group_overrides={"fast": {"rekey_time": "5m"}},
    )
    assert links["h1-h2"].settings["rekey_time"] == "20m"  # host
    assert links["h1-h3"].settings["rekey_time"] == "5m"  # group
    assert links["h1-h4"].settings["rekey_time"] == "30m"  # topology
    assert links["h1-h4"].settings["esp_proposals"] == ["aes128gcm16"]  # topology > defaults
    assert links["h1-h4"].settings["dpd_delay"] == "10s"  # defaults
    child = host_connections("h4", links)["h1-h4"]["children"]["sites"]
    assert child["rekey_time"] == "30m" and child["esp_proposals"] == ["aes128gcm16"]
    assert host_connections("h4", links)["h1-h4"]["dpd_delay"] == "10s"
    # the link level beats them all
    links = intent(
        [
            {
                "name": "x",
                "type": "links",
                "links": [
                    {
                        "ends": ["h1", "h2"],
                        "rekey_time": "1m",
                        "proposals": ["aes128gcm16-prfsha256-ecp256"],
                    }
                ],
            }
        ],
        hostvars,
        groups,
    )
    conn = host_connections("h1", links)["h1-h2"]
    assert conn["proposals"] == ["aes128gcm16-prfsha256-ecp256"]
    assert conn["children"]["sites"]["rekey_time"] == "1m"
    assert links["h1-h2"].source["rekey_time"] == "topology x: link h1-h2 (link)"


def test_ah_proposals_make_ah_children():
    links = intent([{"name": "t", "type": "mesh", "members": "lab",
                     "overrides": {"ah_proposals": ["sha384"]}}])  # fmt: skip
    child = host_connections("h1", links)["h1-h2"]["children"]["sites"]
    assert child["ah_proposals"] == ["sha384"] and "esp_proposals" not in child


def test_ends_that_disagree_are_an_error_unless_the_link_decides():
    hostvars, groups = inventory(2)
    hostvars["h1"]["keyway_overrides"] = {"dpd_delay": "10s"}
    hostvars["h2"]["keyway_overrides"] = {"dpd_delay": "20s"}
    mesh = [{"name": "core", "type": "mesh", "members": "lab"}]
    (problem,) = problems_of(mesh, hostvars, groups)
    assert problem.startswith("topology core: link h1-h2: conflicting overrides for dpd_delay")
    assert "host h1: keyway_overrides says '10s'" in problem
    links = intent(
        [{"name": "p", "type": "links", "links": [{"ends": ["h1", "h2"], "dpd_delay": "15s"}]}],
        hostvars,
        groups,
    )
    assert host_connections("h1", links)["h1-h2"]["dpd_delay"] == "15s"


def test_initiator_both_and_trap():
    links = intent(
        [
            {
                "name": "core",
                "type": "mesh",
                "members": ["h1", "h2"],
                "overrides": {"initiator": "both"},
            }
        ]
    )
    for name in ("h1", "h2"):
        assert (
            host_connections(name, links)["h1-h2"]["children"]["sites"]["start_action"] == "start"
        )
    links = intent(
        [
            {
                "name": "core",
                "type": "mesh",
                "members": ["h1", "h2"],
                "overrides": {"start_action": "trap"},
            }
        ]
    )
    for name in ("h1", "h2"):
        assert host_connections(name, links)["h1-h2"]["children"]["sites"]["start_action"] == "trap"


def test_external_peers_bring_their_own_psk_and_the_managed_end_starts():
    hostvars, groups = inventory(2)
    external = {
        "cloud": {
            "address": "192.0.2.99",
            "id": "vpn.example.net",
            "sites": ["10.99.0.0/16"],
            "psk": "an-external-psk-of-some-length",
        }
    }
    links = intent(
        [{"name": "s2s", "type": "site_to_site", "pairs": [["h2", "cloud"]]}],
        hostvars,
        groups,
        external_peers=external,
    )
    conn = host_connections("h2", links)["cloud-h2"]
    assert conn["remote"]["id"] == "vpn.example.net"
    assert conn["children"]["sites"]["start_action"] == "start"
    refs = psk_refs("h2", links)
    assert refs == {"cloud-h2": {"external": "cloud"}}
    assert host_psks(refs, None, external) == {"cloud-h2": "an-external-psk-of-some-length"}
    assert "an-external-psk" not in repr(links)


def test_derived_psks_match_on_both_ends_differ_per_link_and_version_and_survive_renames():
    links = intent([{"name": "core", "type": "mesh", "members": "lab"}])
    p1 = host_psks(psk_refs("h1", links), MASTER, None)
    p2 = host_psks(psk_refs("h2", links), MASTER, None)
    assert p1["h1-h2"] == p2["h1-h2"] and len(set(p1.values())) == 3
    assert len(p1["h1-h2"]) >= 32
    # The IKE identity, not the inventory name, keys the derivation.
    assert link_psk(MASTER, "h1", "h2", 1) == link_psk(MASTER, "h2", "h1", 1) == p1["h1-h2"]
    assert link_psk(MASTER, "h1", "h2", 2) != p1["h1-h2"]
    hostvars, groups = inventory(2)
    hostvars["renamed"] = {**hostvars.pop("h1"), "keyway_ike_id": "h1"}
    groups["lab"] = ["renamed", "h2"]
    renamed = intent([{"name": "core", "type": "mesh", "members": "lab"}], hostvars, groups)
    assert host_psks(psk_refs("h2", renamed), MASTER, None)["h2-renamed"] == p1["h1-h2"]
    bumped = intent(
        [{"name": "core", "type": "mesh", "members": "lab", "overrides": {"psk_version": 2}}]
    )
    # A rotation: version 2 is sent, version 1 still accepted, until retired.
    rotating = host_psks(psk_refs("h1", bumped), MASTER, None)["h1-h2"]
    assert rotating == [link_psk(MASTER, "h1", "h2", 2), p1["h1-h2"]]
    retired = intent(
        [
            {
                "name": "core",
                "type": "mesh",
                "members": "lab",
                "overrides": {"psk_version": 2, "psk_accept_previous": False},
            }
        ]
    )
    assert host_psks(psk_refs("h2", retired), MASTER, None)["h1-h2"] == rotating[0]


@pytest.mark.parametrize(
    ("topologies", "expected"),
    [
        (
            [{"name": "t", "type": "mesh", "members": "nope"}],
            "topology t.members: unknown group 'nope'",
        ),
        ([{"name": "t", "type": "mesh", "members": ["h1", "h9"]}], "unknown host 'h9'"),
        (
            [{"name": "t", "type": "links", "links": [{"ends": ["h1", "h1"]}]}],
            "a link from h1 to itself",
        ),
        (
            [{"name": "t", "type": "ring", "members": "lab"}],
            "topology t: type 'ring' is not one of",
        ),
        (
            [{"name": "t", "type": "mesh", "members": "lab", "overrides": {"colour": 1}}],
            "topology t.overrides.colour: unknown override key",
        ),
        (
            [
                {
                    "name": "t",
                    "type": "mesh",
                    "members": "lab",
                    "overrides": {"ah_proposals": ["sha256"], "esp_proposals": ["aes256gcm16"]},
                }
            ],
            "esp_proposals and ah_proposals exclude each other",
        ),
        (
            [
                {
                    "name": "t",
                    "type": "mesh",
                    "members": "lab",
                    "overrides": {"ah_proposals": ["sha256"], "encap": "force"},
                }
            ],
            "AH cannot be UDP-encapsulated",
        ),
        (
            [{"name": "t", "type": "mesh", "members": "lab", "overrides": {"dataplane": "kernel"}}],
            "set agent_dataplane on the host",
        ),
        (
            [{"name": "t", "type": "mesh", "members": "lab", "hubs": "lab"}],
            "topology t.hubs: unknown key for a mesh topology",
        ),
        (
            [
                {"name": "t", "type": "mesh", "members": "lab"},
                {"name": "u", "type": "mesh", "members": ["h1", "h2"]},
            ],
            "topology u: link h1-h2: also made by topology t",
        ),
        (
            [{"name": "t", "type": "site_to_site", "pairs": [["h1", "bare"]]}],
            "gateway bare protects no sites",
        ),
    ],
)
def test_inconsistent_inventories_are_refused_with_where(topologies, expected):
    hostvars, groups = inventory(3, bare=host(7, sites=False))
    problems = problems_of(topologies, hostvars, groups)
    assert any(expected in p for p in problems), problems


def test_transport_mode_between_gateways_is_refused():
    (problem,) = problems_of(
        [{"name": "t", "type": "links", "links": [{"ends": ["h1", "h2"], "mode": "transport"}]}]
    )
    assert problem.startswith("topology t: link h1-h2: mode transport (from topology t: link")
    assert "h1 and h2 protect sites: use tunnel" in problem


def test_host_level_problems_name_host_and_variable():
    hostvars, groups = inventory(4)
    hostvars["h1"]["keyway_sites"] = ["10.1.0.0/24", "10.1.0.128/25"]
    hostvars["h2"]["keyway_ike_id"] = "h3"
    hostvars["h3"].pop("keyway_address")
    hostvars["h4"]["keyway_address"] = "2001:db8::4"
    problems = problems_of([{"name": "t", "type": "mesh", "members": "lab"}], hostvars, groups)
    text = "\n".join(problems)
    assert "host h1: keyway_sites: 10.1.0.0/24 and 10.1.0.128/25 overlap" in text
    assert "host h3: keyway_address: missing" in text
    assert "topology t: h2 (192.0.2.12) and h4 (2001:db8::4) differ in address family" in text


def test_duplicate_identities_addresses_and_overlapping_sites_across_hosts():
    hostvars, groups = inventory(3)
    hostvars["h2"]["keyway_ike_id"] = "h1"
    hostvars["h3"]["keyway_address"] = "192.0.2.11"
    hostvars["h3"]["keyway_sites"] = ["10.1.0.0/16"]
    text = "\n".join(
        problems_of([{"name": "t", "type": "mesh", "members": "lab"}], hostvars, groups)
    )
    assert "host h2: IKE identity 'h1' is also h1's" in text
    assert "host h3: outer address 192.0.2.11 is also h1's" in text
    assert "topology t: sites of h3 (10.1.0.0/16) and h1 (10.1.0.0/24) overlap" in text


def test_a_master_secret_too_short_says_so():
    (problem,) = problems_of(
        [{"name": "t", "type": "mesh", "members": "lab"}], master_secret_length=12
    )
    assert problem.startswith("keyway_master_secret: 12 characters;") and "at least 32" in problem
    (problem,) = problems_of(
        [{"name": "t", "type": "mesh", "members": "lab"}], master_secret_length=0
    )
    assert problem.startswith("keyway_master_secret: missing")


def test_an_external_peer_without_psk_is_refused():
    hostvars, groups = inventory(1)
    problems = problems_of(
        [{"name": "t", "type": "links", "links": [{"ends": ["h1", "cloud"]}]}],
        hostvars,
        groups,
        external_peers={"cloud": {"address": "192.0.2.99", "sites": ["10.99.0.0/16"]}},
    )
    assert problems == [
        "keyway_external_peers.cloud.psk: missing: an external peer needs its PSK (vault it)"
    ]


def test_values_keywayd_refuses_name_the_variable_that_set_them():
    hostvars, groups = inventory(2)
    hostvars["h2"]["keyway_overrides"] = {"esp_proposals": ["rot13"]}
    (problem,) = problems_of([{"name": "core", "type": "mesh", "members": "lab"}], hostvars, groups)
    assert problem.startswith("topology core: link h1-h2 on host h1:")
    assert "(esp_proposals, set by host h2: keyway_overrides)" in problem


def test_link_psks_are_rfc_5869_hkdf_sha256_as_cryptography_computes_it():
    """The controller derives PSKs with the standard library; deployed links keep their
    keys only if that is exactly HKDF-SHA256 (salt PSK_SALT, info v<N>\\0<id>\\0<id>)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from ansible_collections.keyway.ipsec.plugins.module_utils.intent.topology import PSK_SALT

    for version, ids in ((1, ("h1", "h2")), (7, ("gw.example.net", "10.0.0.1"))):
        first, second = sorted(ids)
        info = f"v{version}\0{first}\0{second}".encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=PSK_SALT, info=info).derive(
            MASTER.encode()
        )
        assert link_psk(MASTER, *ids, version) == base64.b64encode(key).decode()


def test_spokes_behind_nat_dial_the_hub_which_takes_them_from_any_address():
    """keyway_behind_nat (issue 16): two spokes behind home NATs with the same private
    address; the hub accepts each by identity from any address, each spoke initiates,
    and spoke-to-spoke traffic goes through the hub (they cannot reach each other)."""
    hostvars, groups = inventory(3)
    for spoke in ("h2", "h3"):
        hostvars[spoke].update(keyway_address="192.168.1.10", keyway_behind_nat=True)
    links = intent(
        [{"name": "b", "type": "hub_spoke", "hubs": ["h1"], "spokes": ["h2", "h3"]}],
        hostvars,
        groups,
    )
    assert sorted(links) == ["h1-h2", "h1-h3"]  # no direct spoke-to-spoke link
    for spoke in ("h2", "h3"):
        at_hub = host_connections("h1", links)[f"h1-{spoke}"]
        at_spoke = host_connections(spoke, links)[f"h1-{spoke}"]
        assert at_hub["remote_addrs"] == ["%any"] and at_hub["remote"]["id"] == spoke
        assert at_hub["children"]["sites"]["start_action"] == "none"
        assert at_spoke["remote_addrs"] == ["192.0.2.11"]
        assert at_spoke["local_addrs"] == ["192.168.1.10"]
        assert at_spoke["children"]["sites"]["start_action"] == "start"
    # The other spoke's site is reached through the hub.
    assert "10.3.0.0/24" in host_connections("h2", links)["h1-h2"]["children"]["sites"]["remote_ts"]


def test_a_host_behind_nat_initiates_even_against_the_name_order():
    hostvars, groups = inventory(2)
    hostvars["h1"]["keyway_behind_nat"] = True  # h1 sorts first, but h2 cannot reach it
    links = intent([{"name": "core", "type": "mesh", "members": "lab"}], hostvars, groups)
    assert links["h1-h2"].initiators == ("h1",)
    assert host_connections("h2", links)["h1-h2"]["remote_addrs"] == ["%any"]


def test_links_a_nat_makes_impossible_are_refused_with_the_reason():
    hostvars, groups = inventory(4)
    hostvars["h1"]["keyway_behind_nat"] = True
    hostvars["h2"]["keyway_behind_nat"] = True
    hostvars["h4"]["keyway_behind_nat"] = "yes"
    problems = problems_of(
        [
            {"name": "core", "type": "mesh", "members": ["h1", "h2"]},
            {
                "name": "t",
                "type": "links",
                "links": [{"ends": ["h1", "h3"], "start_action": "trap"}],
            },
            {"name": "u", "type": "links", "links": [{"ends": ["h3", "h4"]}]},
        ],
        hostvars,
        groups,
    )
    assert (
        "topology core: link h1-h2: h1 and h2 are both behind NAT (keyway_behind_nat): neither "
        "can reach the other; link them through a hub"
    ) in problems
    assert (
        "topology t: link h1-h3: start_action trap (from topology t: link h1-h3 (link)): h1 is "
        "behind NAT, so only it can initiate; its peer answers"
    ) in problems
    assert "host h4: keyway_behind_nat: 'yes' is not true or false" in problems


def test_auth_pubkey_links_use_certificates_and_need_no_master_secret():
    """Issue 15: `auth: pubkey` (any override level) makes a link authenticate with
    certificates from Keyway's CA: no PSK derived, no master secret needed for it, and
    each host says which identity the CA certifies for it."""
    hostvars, groups = inventory(3)
    topologies = [
        {"name": "core", "type": "mesh", "members": "lab", "overrides": {"auth": "pubkey"}},
    ]
    links = intent(topologies, hostvars, groups, master_secret_length=0)
    conn = host_connections("h1", links)["h1-h2"]
    assert conn["local"] == {"id": "h1", "auth": "pubkey"}
    assert conn["remote"] == {"id": "h2", "auth": "pubkey"}
    assert psk_refs("h1", links) == {}
    assert host_pki("h1", links) == {"identity": "h1"}
    # One link on PSKs among certificates: that one needs the master secret again.
    topologies.append({"name": "pair", "type": "links", "links": [{"ends": ["h1", "h4"]}]})
    hostvars["h4"] = host(4)
    groups["all"].append("h4")
    (problem,) = problems_of(topologies, hostvars, groups, master_secret_length=0)
    assert problem.startswith("keyway_master_secret: missing")
    links = intent(topologies, hostvars, groups)
    assert host_pki("h4", links) is None and list(psk_refs("h4", links)) == ["h1-h4"]


def test_auth_pubkey_with_an_external_peer_is_refused_with_the_reason():
    hostvars, groups = inventory(2)
    external = {
        "cloud": {"address": "192.0.2.99", "sites": ["10.99.0.0/16"], "psk": "p" * 30},
    }
    problems = problems_of(
        [{"name": "s2s", "type": "site_to_site", "pairs": [["h2", "cloud"]],
          "overrides": {"auth": "pubkey"}}],
        hostvars, groups, external_peers=external,
    )  # fmt: skip
    assert problems == [
        "topology s2s: link cloud-h2: auth pubkey (from topology s2s: overrides): cloud is an "
        "external "
        "peer, and Keyway's CA issues certificates only to the hosts it manages; use auth "
        "psk for this link"
    ]
    assert problems_of(
        [{"name": "m", "type": "mesh", "members": "lab", "overrides": {"auth": "rsa"}}],
        hostvars, groups,
    ) == ["topology m.overrides.auth: 'rsa' is not one of ('psk', 'pubkey')"]  # fmt: skip


def test_encap_no_is_plain_esp_and_refused_for_a_host_behind_nat():
    hostvars, groups = inventory(3)
    hostvars["h3"]["keyway_behind_nat"] = True
    links = intent(
        [{"name": "core", "type": "mesh", "members": ["h1", "h2"], "overrides": {"encap": "no"}}],
        hostvars, groups,
    )  # fmt: skip
    assert host_connections("h1", links)["h1-h2"]["encap"] == "no"
    (problem,) = problems_of(
        [{"name": "n", "type": "links", "links": [{"ends": ["h1", "h3"], "encap": "no"}]}],
        hostvars, groups,
    )  # fmt: skip
    assert problem == (
        "topology n: link h1-h3: encap no (from topology n: link h1-h3 (link)): h3 is behind "
        "NAT, and ESP crosses a NAT only UDP-encapsulated; use auto"
    )


def test_an_opportunistic_topology_gives_each_member_one_connection_for_its_prefixes():
    """Issue 16: a mesh defined by policy in the inventory: no links, one keywayd
    connection per member (the same but for its address), certificates for the members'
    addresses, no master secret; the keys that shape it from every override level."""
    hostvars, groups = inventory(3)
    hostvars["h3"]["keyway_overrides"] = {"start_action": "trap", "dpd_delay": 10}
    topologies = [{
        "name": "oe", "type": "opportunistic", "members": "lab",
        "prefixes": ["192.0.2.0/24"], "clear": ["192.0.2.1/32"], "shunt_lifetime": "5m",
        "overrides": {"esp_proposals": ["aes128gcm16"], "ike_rekey_time": "2h"},
    }]  # fmt: skip
    links = intent(topologies, hostvars, groups, master_secret_length=0, defaults={
        "dpd_delay": 10, "mode": "tunnel"})  # fmt: skip
    assert dict(links) == {}  # no links
    conns = {h: host_connections(h, links) for h in ("h1", "h2", "h3")}
    assert conns["h1"] == {
        "oe": {
            "opportunistic": "private-or-clear",
            "local_addrs": ["192.0.2.11"],
            "remote_addrs": ["192.0.2.0/24"],
            "local": {"auth": "pubkey"},
            "remote": {"auth": "pubkey"},
            "shunt_lifetime": "5m",
            "rekey_time": "2h",
            "dpd_delay": 10,  # keyway_defaults' (its mode shapes links only)
            "children": {
                "host": {"esp_proposals": ["aes128gcm16"]},
                "clear": {"mode": "pass", "remote_ts": ["192.0.2.1/32"]},
            },
        }
    }
    assert conns["h3"]["oe"]["local_addrs"] == ["192.0.2.13"]
    assert {h: host_pki(h, links) for h in conns} == {
        f"h{n}": {"identity": f"192.0.2.1{n}"} for n in (1, 2, 3)
    }
    assert psk_refs("h1", links) == {}


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"prefixes": None}, "topology oe.prefixes: is required"),
        ({"policy": "maybe"}, "topology oe.policy: 'maybe' is not one of"),
        ({"overrides": {"mode": "tunnel"}}, "topology oe.overrides.mode: does not apply"),
        ({"members": ["h1", "cloud"]}, "cloud is an external peer"),
        ({"members": ["h1", "h4"]}, "h4 is behind NAT"),
        ({"name": "h1-h2"}, "topology h1-h2: has the name of link h1-h2"),
        ({"prefixes": ["2001:db8::/64"]}, "holds no prefix of the local address's family"),
    ],
)  # fmt: skip
def test_what_an_opportunistic_topology_cannot_hold_is_refused_with_where(change, expected):
    hostvars, groups = inventory(3, h4={**host(4), "keyway_behind_nat": True})
    external = {"cloud": {"address": "192.0.2.99", "psk": "p" * 30}}
    oe = {"name": "oe", "type": "opportunistic", "members": "lab", "prefixes": ["192.0.2.0/24"]}
    oe.update(change)
    topologies = [oe, {"name": "pair", "type": "links", "links": [{"ends": ["h1", "h2"]}]}]
    problems = problems_of(topologies, hostvars, groups, external_peers=external)
    assert any(expected in p for p in problems), problems


def test_a_member_s_certificate_names_its_address_or_its_links_identity_not_both():
    hostvars, groups = inventory(3)
    topologies = [
        {"name": "oe", "type": "opportunistic", "members": "lab", "prefixes": ["192.0.2.0/24"]},
        {"name": "pair", "type": "links", "links": [{"ends": ["h1", "h2"], "auth": "pubkey"}]},
    ]
    problems = problems_of(topologies, hostvars, groups)
    assert any("set keyway_ike_id: 192.0.2.11" in p for p in problems), problems
    for name in ("h1", "h2"):
        hostvars[name]["keyway_ike_id"] = hostvars[name]["keyway_address"]
    links = intent(topologies, hostvars, groups)
    assert host_pki("h1", links) == {"identity": "192.0.2.11"}
    assert set(host_connections("h1", links)) == {"oe", "h1-h2"}
    topologies.append({"name": "oe2", "type": "opportunistic", "members": ["h1"],
                       "prefixes": ["192.0.2.128/25"]})  # fmt: skip
    problems = problems_of(topologies, hostvars, groups)
    assert any("oe (192.0.2.0/24) and oe2 (192.0.2.128/25) overlap" in p for p in problems)
