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
    return _aligned(cells) + [f"PROBLEM {p}" for p in problems]


def _aligned(cells: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells (the header first) as lines with aligned columns."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _authenticated(name: str, sas: list[dict] | None) -> str:
    """Which PSK the newest established IKE SA of connection `name` authenticated with
    ("newest", "previous"), or why none did."""
    if sas is None:
        return NOT_SEEN
    mine = [sa for sa in sas if sa.get("connection") == name]
    established = [sa for sa in mine if sa["state"] == "established"]
    if not established:
        return DOWN
    newest = min(established, key=lambda sa: sa.get("age") or 0)
    return ("newest", "previous")[min(newest.get("psk_index") or 0, 1)]


def psk_rotation(
    intent: Mapping[str, Any],
    psk_states: Mapping[str, Mapping[str, Any] | None],
    sas_by_host: Mapping[str, list[dict] | None],
):
    """The links in a PSK rotation (an end is to accept the previous PSK beside the
    newest, or still holds one the intent retires), and what retiring now would break.

    `psk_states`: for each managed host of the run, keyway.ipsec.agent_config's
    `psk_state` (per connection: PSK files held, whether the one it sends is the
    newest); None or absent: not seen. `sas_by_host`: keywayd's list-sas, for the
    "authenticated with" column. Retiring a link's previous PSK is safe only when every
    managed end already sends the newest: an end that does not (it has not converged
    the rotation, or is not in the run) would lose the link."""
    rows, ready, blockers = [], [], []
    for name, link in sorted(intent.get("links", {}).items()):
        ends = [end for end in link["ends"] if end in intent.get("hosts", {})]
        refs = {end: intent["hosts"][end]["psk_refs"].get(name, {}) for end in ends}
        if any("external" in ref for ref in refs.values()):
            continue  # an external peer's PSK is its own, not versioned
        states = {end: ((psk_states.get(end) or {}).get(name)) for end in ends}
        accepts_previous = any(ref.get("previous") for ref in refs.values())
        retiring = not accepts_previous and any(
            (st or {}).get("held", 0) > 1 for st in states.values()
        )
        if not (accepts_previous or retiring):
            continue
        version = max(ref.get("version", 1) for ref in refs.values())
        for end in ends:
            st = states[end]
            rows.append(
                {
                    "link": name,
                    "end": end,
                    "version": version,
                    "holds": NOT_SEEN if st is None else str(st["held"]),
                    "sends_newest": None if st is None else st["current"],
                    "authenticated": _authenticated(name, sas_by_host.get(end)),
                    "step": "retire" if retiring else "rotate",
                }
            )
        behind = sorted(end for end, st in states.items() if not (st or {}).get("current"))
        if not behind:
            ready.append(name)
        elif retiring:
            why = [
                f"{end} is not in this run"
                if states[end] is None
                else f"{end} still sends the previous PSK (it has not converged the rotation)"
                for end in behind
            ]
            blockers.append(
                f"{name}: {', '.join(why)}; retiring version {version - 1} now would cut "
                "the link: converge the rotation on every end first"
            )
    return {"rows": rows, "ready": ready, "blockers": blockers, "table": _rotation_table(rows)}


def _rotation_table(rows: list[dict]) -> list[str]:
    header = ("link", "end", "version", "PSKs held", "sends newest", "authenticated", "step")
    yes_no = {True: "yes", False: "no", None: NOT_SEEN}
    cells = [header] + [
        (r["link"], r["end"], f"v{r['version']}", r["holds"], yes_no[r["sends_newest"]],
         r["authenticated"], r["step"])
        for r in rows
    ]  # fmt: skip
    return _aligned(cells)
