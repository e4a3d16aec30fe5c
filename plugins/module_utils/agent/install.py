"""From a negotiated Child SA (the engine's ChildSaReady) to what a data plane installs:
the outbound and inbound SA pair and the child's policies.

Used by keywayd and by the test peers, so that both install a Child SA the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ..dataplane import base
from ..ike.constants import EncrId, IntegId
from ..ike.engine.events import ChildSaReady

# The data plane's algorithm names (dataplane/base.py) for the IKE transform IDs.
ENCR_NAMES = {
    EncrId.AES_GCM_16: "aes-gcm-16",
    EncrId.CHACHA20_POLY1305: "chacha20-poly1305",
    EncrId.AES_CBC: "aes-cbc",
    EncrId.NULL: "null",
}
INTEG_NAMES = {
    IntegId.NONE: None,
    IntegId.HMAC_SHA2_256_128: "hmac-sha2-256-128",
    IntegId.HMAC_SHA2_384_192: "hmac-sha2-384-192",
    IntegId.HMAC_SHA2_512_256: "hmac-sha2-512-256",
}


def unsupported_child(spec) -> str | None:
    """What of an ESP or AH proposal (a parsed ProposalSpec) the data planes cannot
    install (None: all of it); else it would negotiate and then fail to install."""
    encr = [i for i, _unused in spec.encr if i not in ENCR_NAMES]
    integ = [i for i in spec.integ if i not in INTEG_NAMES]
    if not (encr or integ):
        return None
    names = [EncrId(i).name for i in encr] + [IntegId(i).name for i in integ]
    known = sorted(n for n in ENCR_NAMES.values() if n) + sorted(
        n for n in INTEG_NAMES.values() if n
    )
    return (
        f"keywayd's data planes do not implement {', '.join(names)} "
        f"(they implement {', '.join(known)})"
    )


def _family(prefix: str) -> int:
    return ipaddress.ip_network(prefix, strict=False).version


def selector_pairs(local_ts: Iterable[str], remote_ts: Iterable[str]) -> list[tuple[str, str]]:
    """Every (local, remote) prefix pair of the same address family."""
    remote = list(remote_ts)
    return [(lo, re) for lo in local_ts for re in remote if _family(lo) == _family(re)]


def child_sa_specs(
    child: ChildSaReady,
    reqid: int,
    *,
    encap: bool | None = None,
    lifetime: base.Lifetime = base.Lifetime(),  # noqa: B008 (frozen, shared safely)
    replay_window: int = 128,
    mark_in: tuple[int, int] | None = None,
    mark_out: tuple[int, int] | None = None,
    if_id_in: int = 0,
    if_id_out: int = 0,
    nat_t_port: int = 4500,
) -> tuple[base.SaSpec, base.SaSpec]:
    """The (outbound, inbound) SAs of a Child SA; `encap` None follows the IKE SA.
    ESP in UDP goes between our `nat_t_port` and the peer's port as the IKE SA saw it
    (a NAT in front of the peer may have mapped it)."""
    try:
        enc_alg = None if child.protocol == "ah" else ENCR_NAMES[child.encr_id]
        integ_alg = INTEG_NAMES[child.integ_id]
    except KeyError:
        raise base.DataPlaneError(
            f"{child.connection}/{child.child}: negotiated {child.proposal}, which the data "
            "plane does not implement"
        ) from None
    use_encap = child.udp_encap if encap is None else encap
    if use_encap and child.protocol == "ah":
        # RFC 3948 encapsulates ESP only: AH, which covers the outer addresses, cannot
        # cross a NAT at all.
        raise base.DataPlaneError(
            f"{child.connection}/{child.child}: AH cannot be UDP-encapsulated (a NAT between "
            "the peers, or encap: force); use ESP"
        )
    common = dict(
        proto=base.IpsecProto(child.protocol),
        mode=base.Mode(child.mode),
        reqid=reqid,
        enc_alg=enc_alg,
        integ_alg=integ_alg,
        esn=child.esn,
        lifetime=lifetime,
        replay_window=replay_window,
    )
    me, peer = child.local_address, child.remote_address
    # An SA selector holds one prefix pair; with several, the SA gets none and inbound
    # packets are checked against the IN policies that name its reqid (as XFRM does).
    pairs = selector_pairs(child.local_ts, child.remote_ts)
    out_sel = in_sel = None
    if len(pairs) == 1:
        out_sel = base.Selector(pairs[0][0], pairs[0][1])
        in_sel = base.Selector(pairs[0][1], pairs[0][0])
    out = base.SaSpec(
        src=me,
        dst=peer,
        spi=child.spi_out,
        enc_key=child.key_out,
        integ_key=child.integ_key_out,
        selector=out_sel,
        mark=mark_out,
        if_id=if_id_out,
        encap=base.UdpEncap(nat_t_port, child.encap_port) if use_encap else None,
        **common,
    )
    inbound = base.SaSpec(
        src=peer,
        dst=me,
        spi=child.spi_in,
        enc_key=child.key_in,
        integ_key=child.integ_key_in,
        selector=in_sel,
        mark=mark_in,
        if_id=if_id_in,
        encap=base.UdpEncap(child.encap_port, nat_t_port) if use_encap else None,
        **common,
    )
    return out, inbound


def child_policies(
    local_ts: Iterable[str],
    remote_ts: Iterable[str],
    *,
    reqid: int,
    local_address: str,
    remote_address: str,
    mode: str = "tunnel",
    protocol: str = "esp",
    action: base.PolicyAction = base.PolicyAction.PROTECT,
    mark_in: tuple[int, int] | None = None,
    mark_out: tuple[int, int] | None = None,
    if_id_in: int = 0,
    if_id_out: int = 0,
) -> list[base.PolicySpec]:
    """OUT, IN and FWD policies for every selector pair of a child (FWD only in tunnel
    mode, where forwarded traffic from the remote site is checked too)."""
    policies = []
    ipsec_mode = base.Mode(mode if mode in ("tunnel", "transport") else "tunnel")
    proto = base.IpsecProto(protocol)
    for lo, re in selector_pairs(local_ts, remote_ts):
        templates_out = templates_in = ()
        if action == base.PolicyAction.PROTECT:
            tunnel = ipsec_mode == base.Mode.TUNNEL
            templates_out = (
                base.Template(
                    proto,
                    ipsec_mode,
                    reqid,
                    local_address if tunnel else "",
                    remote_address if tunnel else "",
                ),
            )
            templates_in = (
                base.Template(
                    proto,
                    ipsec_mode,
                    reqid,
                    remote_address if tunnel else "",
                    local_address if tunnel else "",
                ),
            )
        out_sel, in_sel = base.Selector(lo, re), base.Selector(re, lo)
        policies.append(
            base.PolicySpec(
                out_sel,
                base.Direction.OUT,
                action,
                templates_out,
                mark=mark_out,
                if_id=if_id_out,
            )
        )
        directions = [base.Direction.IN]
        if ipsec_mode == base.Mode.TUNNEL:
            directions.append(base.Direction.FWD)
        for direction in directions:
            policies.append(
                base.PolicySpec(
                    in_sel, direction, action, templates_in, mark=mark_in, if_id=if_id_in
                )
            )
    return policies
