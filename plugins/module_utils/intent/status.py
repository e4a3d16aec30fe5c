"""Every link of the intent as both of its ends see it, and where they disagree.

Input: the intent (the keyway.ipsec.intent filter's result) and, for each managed host
that answered, keywayd's `list-sas` (as keyway.ipsec.agent_info gathers it). A link is
well when each managed end has an established IKE SA with a Child SA and, where both
ends are managed, one Child SA's SPIs match crosswise (my outbound SPI is the peer's
inbound one): then both ends use the same SA pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

UP, IKE_ONLY, CONNECTING, DOWN, NOT_SEEN, EXTERNAL = (
    "up", "IKE SA only", "connecting", "down", "not seen", "external",
)  # fmt: skip


def _end_view(name: str, sas: list[dict] | None) -> dict[str, Any]:
    if sas is None:
        return {"state": NOT_SEEN, "children": []}
    mine = [sa for sa in sas if sa.get("connection") == name]
    established = [sa for sa in mine if sa.get("state") == "established"]
    children = [c for sa in established for c in sa.get("children", [])]
    if children:
        state = UP
    elif established:
        state = IKE_ONLY
    else:
        state = CONNECTING if mine else DOWN
    return {"state": state, "children": children}


def link_status(intent: Mapping[str, Any], sas_by_host: Mapping[str, list[dict] | None]):
    """{"rows": one per link end, "problems": one line per link that is not well}."""
    managed = set(intent.get("hosts", {}))
    rows, problems = [], []
    for name, link in sorted(intent.get("links", {}).items()):
        views = {}
        for end in link["ends"]:
            if end not in managed:
                views[end] = {"state": EXTERNAL, "children": []}
                continue
            views[end] = _end_view(name, sas_by_host.get(end))
            newest = min(views[end]["children"], key=lambda c: c.get("age", 0), default=None)
            rows.append(
                {
                    "link": name,
                    "topology": link["topology"],
                    "end": end,
                    "state": views[end]["state"],
                    "spi_in": newest["spi_in"] if newest else "",
                    "spi_out": newest["spi_out"] if newest else "",
                    "proposal": newest["proposal"] if newest else "",
                    "bytes_in": newest.get("bytes_in", 0) if newest else 0,
                    "bytes_out": newest.get("bytes_out", 0) if newest else 0,
                    "age": newest.get("age") if newest else None,
                }
            )
        problem = _problem(views)
        if problem:
            problems.append(f"{name} ({link['topology']}): {problem}")
    return {"rows": rows, "problems": problems, "table": _table(rows, problems)}


def _problem(views: dict[str, dict]) -> str | None:
    managed = {end: v for end, v in views.items() if v["state"] != EXTERNAL}
    not_up = {end: v["state"] for end, v in managed.items() if v["state"] != UP}
    if not_up:
        return ", ".join(f"{state} at {end}" for end, state in sorted(not_up.items()))
    if len(managed) == 2:
        (a, va), (b, vb) = sorted(managed.items())
        pairs_b = {(c["spi_in"], c["spi_out"]) for c in vb["children"]}
        if not any((c["spi_out"], c["spi_in"]) in pairs_b for c in va["children"]):
            return f"the ends disagree: no Child SA of {a} is the other half of one of {b}'s"
    return None


def _table(rows: list[dict], problems: list[str]) -> list[str]:
    """Rows as aligned text, narrow enough not to wrap in Ansible's output."""
    header = ("link", "end", "state", "SPI in", "SPI out", "ESP", "bytes in/out", "age")
    cells = [header]
    for r in rows:
        age = "" if r["age"] is None else str(r["age"])
        bytes_ = f"{r['bytes_in']}/{r['bytes_out']}"
        cells.append((r["link"], r["end"], r["state"], r["spi_in"], r["spi_out"],
                      r["proposal"], bytes_, age))  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return lines + [f"PROBLEM {p}" for p in problems]
