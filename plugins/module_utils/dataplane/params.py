"""Module parameters to and from the data plane's types, for keyway.ipsec.xfrm_state,
xfrm_policy and xfrm_info: one place that says what a field is called in a playbook and
how an SA or policy is shown (keys never: only their length)."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

from .base import (
    DataPlaneError,
    Direction,
    IpsecProto,
    Lifetime,
    Mode,
    PolicyAction,
    PolicySpec,
    SaSpec,
    Selector,
    Template,
    UdpEncap,
)

SELECTOR_SPEC = dict(
    src=dict(type="str", required=True),
    dst=dict(type="str", required=True),
    proto=dict(type="int", default=0),
    sport=dict(type="int", default=0),
    dport=dict(type="int", default=0),
)
LIFETIME_SPEC = {
    name: dict(type="int", default=0)
    for name in (
        "soft_bytes",
        "hard_bytes",
        "soft_packets",
        "hard_packets",
        "soft_seconds",
        "hard_seconds",
    )
}
MARK_SPEC = dict(value=dict(type="int", required=True), mask=dict(type="int", default=0xFFFFFFFF))


def _mark(raw: dict | None) -> tuple[int, int] | None:
    return (raw["value"], raw["mask"]) if raw else None


# Addresses and prefixes as the kernel reports them (network address, compressed lower
# case IPv6), so that what a playbook writes compares equal to what it reads back.
def _address(text: str) -> str:
    return str(ipaddress.ip_address(text)) if text else ""


def _prefix(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def _selector(raw: dict | None) -> Selector | None:
    if not raw:
        return None
    return Selector(**{**raw, "src": _prefix(raw["src"]), "dst": _prefix(raw["dst"])})


def sa_from_params(p: dict) -> SaSpec:
    encap = p.get("encap")
    return SaSpec(
        src=_address(p["src"]),
        dst=_address(p["dst"]),
        proto=IpsecProto(p["proto"]),
        spi=p["spi"],
        mode=Mode(p["mode"]),
        reqid=p["reqid"],
        enc_alg=p.get("enc_alg"),
        enc_key=bytes.fromhex(p.get("enc_key") or ""),
        integ_alg=p.get("integ_alg"),
        integ_key=bytes.fromhex(p.get("integ_key") or ""),
        icv_bits=p.get("icv_bits") or 128,
        selector=_selector(p.get("selector")),
        encap=UdpEncap(**encap) if encap else None,
        replay_window=p.get("replay_window", 128),
        esn=p.get("esn", True),
        lifetime=Lifetime(**(p.get("lifetime") or {})),
        mark=_mark(p.get("mark")),
        if_id=p.get("if_id") or 0,
    )


def policy_from_params(p: dict) -> PolicySpec:
    # A transport-mode template has no outer addresses (the kernel keeps none).
    templates = tuple(
        Template(
            IpsecProto(t["proto"]),
            Mode(t["mode"]),
            t["reqid"],
            _address(t.get("src") or "") if t["mode"] == "tunnel" else "",
            _address(t.get("dst") or "") if t["mode"] == "tunnel" else "",
        )
        for t in p.get("templates") or ()
    )
    return PolicySpec(
        selector=_selector(p["selector"]),
        direction=Direction(p["dir"]),
        action=PolicyAction(p["action"]),
        templates=templates,
        priority=p.get("priority") or 0,
        mark=_mark(p.get("mark")),
        if_id=p.get("if_id") or 0,
    )


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and isinstance(value, str):  # StrEnum
        return str(value)
    return value


def converge(
    module: Any,
    current: Any,
    wanted: Any,
    *,
    present: bool,
    same: Callable[[Any, Any], bool],
    view: Callable[[Any], dict],
    remove: Callable[[Any], None],
    install: Callable[[Any], None],
    key: str,
) -> None:
    """End an Ansible module that makes the kernel hold `wanted` (present) or nothing in
    its place: changed, check mode and diff, a difference replaced (remove, install),
    DataPlaneError as fail_json; the result carries view(wanted) under `key`."""
    changed = (current is None or not same(current, wanted)) if present else current is not None
    result: dict[str, Any] = {"changed": changed}
    if module._diff:
        result["diff"] = {
            "before": view(current) if current else {},
            "after": view(wanted) if present else {},
        }
    if changed and not module.check_mode:
        try:
            if current is not None:
                remove(current.id)
            if present:
                install(wanted)
        except DataPlaneError as exc:
            module.fail_json(msg=str(exc), **result)
    if present:
        result[key] = view(wanted)
    module.exit_json(**result)


def sa_view(sa: SaSpec) -> dict:
    """An SA as data for task output and diffs: keys shown as their length only."""
    view = _plain(sa)
    for key in ("enc_key", "integ_key"):
        view[key] = f"<{len(getattr(sa, key))} bytes>" if getattr(sa, key) else ""
    if sa.mark is not None:
        view["mark"] = {"value": sa.mark[0], "mask": sa.mark[1]}
    return view


def policy_view(policy: PolicySpec) -> dict:
    view = _plain(policy)
    view["dir"] = view.pop("direction")
    if policy.mark is not None:
        view["mark"] = {"value": policy.mark[0], "mask": policy.mark[1]}
    return view
