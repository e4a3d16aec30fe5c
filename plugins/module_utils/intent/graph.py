"""The intent as a Graphviz picture: hosts (managed and external) with their sites, one
edge per link coloured by topology, pointing from the end that initiates, and, given
each link's state (intent/status.py), links that are up drawn green and the others red.

The DOT text is the product; `dot -Tsvg` (Debian's graphviz) renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .status import EXTERNAL, UP

# Colour-blind-safe (Okabe-Ito), one per topology in order of first appearance.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
UP_COLOUR, DOWN_COLOUR = "#1a9641", "#d7191c"


def _quote(text: str) -> str:
    """A DOT string: backslashes and quotes escaped, line breaks as DOT's \\n."""
    escaped = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def intent_dot(
    intent: Mapping[str, Any], link_states: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """DOT text for `intent` (the keyway.ipsec.intent filter's result). `link_states`:
    for each link, each managed end's state (link_status rows); None draws no state."""
    links = intent.get("links", {})
    managed = set(intent.get("hosts", {}))
    sites: dict[str, set[str]] = {}
    for link in links.values():
        for end in link["ends"]:
            sites.setdefault(end, set()).update(link.get("ts", {}).get(end, []))
    topologies = list(dict.fromkeys(link["topology"] for link in links.values()))
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(topologies)}

    lines = [
        "digraph keyway {",
        '  graph [rankdir=LR, fontname="Helvetica", fontsize=11, overlap=false];',
        '  node [shape=box, style="rounded", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.6];',
    ]
    for host in sorted(sites):
        label = "\n".join([host, *sorted(sites[host])])
        style = "" if host in managed else ', style="dashed", color="#666666"'
        tooltip = "managed by Keyway" if host in managed else "external peer"
        lines.append(f"  {_quote(host)} [label={_quote(label)}, tooltip={_quote(tooltip)}{style}];")
    for name, link in sorted(links.items()):
        a, b = link["ends"]
        starts = set(link.get("initiators", [])) or {a}
        tail, head = (b, a) if starts == {b} else (a, b)
        attrs = {"color": colour[link["topology"]], "tooltip": f"{name} ({link['topology']})"}
        if starts == {a, b}:
            attrs["dir"] = "both"
        if link.get("settings", {}).get("start_action") == "trap":
            attrs["style"] = "dashed"  # up on the first packet
        if link_states is not None:
            ends = link_states.get(name, {})
            up = bool(ends) and all(s in (UP, EXTERNAL) for s in ends.values())
            attrs["color"] = UP_COLOUR if up else DOWN_COLOUR
            attrs["penwidth"] = "2"
            if not up:
                attrs["label"] = (
                    ", ".join(
                        f"{end}: {state}" for end, state in sorted(ends.items()) if state != UP
                    )
                    or "not seen"
                )
        rendered = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
        lines.append(f"  {_quote(tail)} -> {_quote(head)} [{rendered}];")
    if topologies and link_states is None:
        lines.append("  subgraph cluster_legend {")
        lines.append('    label="topologies"; style="dotted";')
        for name in topologies:
            lines.append(
                f"    {_quote('legend ' + name)} [label={_quote(name)}, shape=plaintext, "
                f"fontcolor={_quote(colour[name])}];"
            )
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def link_states(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """link_status rows to {link: {end: state}}."""
    states: dict[str, dict[str, str]] = {}
    for row in rows:
        states.setdefault(row["link"], {})[row["end"]] = row["state"]
    return states
