"""The intent as a picture: every end a node with its sites, every link an edge from
its initiator, coloured by topology, or by state when the state is given; Graphviz
renders it."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.graph import (
    DOWN_COLOUR,
    UP_COLOUR,
    intent_dot,
    link_states,
)

INTENT = {
    "hosts": {"h1": {}, "h2": {}, "h4": {}},
    "links": {
        "h1-h2": {"topology": "core", "ends": ["h1", "h2"], "initiators": ["h1"],
                  "ts": {"h1": ["10.1.0.0/24"], "h2": ["10.2.0.0/24"]}, "settings": {}},
        "h1-h4": {"topology": "branches", "ends": ["h1", "h4"], "initiators": ["h4"],
                  "ts": {"h1": ["10.1.0.0/24"], "h4": ["10.4.0.0/24"]},
                  "settings": {"start_action": "trap"}},
        "h2-partner": {"topology": "partner", "ends": ["h2", "partner"],
                       "initiators": ["h2", "partner"],
                       "ts": {"h2": ["10.2.0.0/24"], "partner": ["10.9.0.0/24"]},
                       "settings": {}},
    },
}  # fmt: skip


def test_ends_links_initiators_and_topologies_are_drawn():
    dot = intent_dot(INTENT)
    assert '"h1" [label="h1\\n10.1.0.0/24"' in dot
    assert '"partner" [label="partner\\n10.9.0.0/24", tooltip="external peer", ' in dot
    assert 'style="dashed", color="#666666"];' in dot
    assert '"h4" -> "h1"' in dot  # the spoke initiates
    core, branches, partner = (line for line in dot.splitlines() if " -> " in line)
    assert '"h1" -> "h2"' in core and 'dir="both"' in partner
    assert 'style="dashed"' in branches  # trap: up on the first packet
    colours = {line.split('color="')[1][:7] for line in (core, branches, partner)}
    assert len(colours) == 3  # one per topology
    assert "cluster_legend" in dot


def test_the_state_colours_each_link():
    rows = [
        {"link": "h1-h2", "end": "h1", "state": "up"},
        {"link": "h1-h2", "end": "h2", "state": "up"},
        {"link": "h1-h4", "end": "h1", "state": "up"},
        {"link": "h1-h4", "end": "h4", "state": "down"},
        {"link": "h2-partner", "end": "h2", "state": "up"},
    ]
    edges = [line for line in intent_dot(INTENT, link_states(rows)).splitlines() if " -> " in line]
    by_link = {line.split('tooltip="')[1].split(" ")[0]: line for line in edges}
    assert UP_COLOUR in by_link["h1-h2"] and UP_COLOUR in by_link["h2-partner"]
    assert DOWN_COLOUR in by_link["h1-h4"] and 'label="h4: down"' in by_link["h1-h4"]


def test_graphviz_renders_it_as_svg_with_every_host():
    svg = subprocess.run(["dot", "-Tsvg"], input=intent_dot(INTENT), capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    titles = {t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}title")}
    assert {"h1", "h2", "h4", "partner", "h1->h2", "h4->h1", "h2->partner"} <= titles
