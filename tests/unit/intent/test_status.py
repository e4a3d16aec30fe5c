"""Both ends' view of every link: up, agreeing on their SA pair, or flagged."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.status import link_status

INTENT = {
    "hosts": {"h1": {}, "h2": {}},
    "links": {
        "h1-h2": {"topology": "core", "ends": ["h1", "h2"]},
        "h2-partner": {"topology": "partner", "ends": ["h2", "partner"]},
    },
}


def sa(connection, spi_in, spi_out, state="established", age=5):
    child = {"spi_in": spi_in, "spi_out": spi_out, "proposal": "aes256gcm16", "age": age}
    return {"connection": connection, "state": state, "children": [child]}


def test_links_up_on_the_same_sa_pair_raise_no_problem():
    status = link_status(
        INTENT,
        {
            "h1": [sa("h1-h2", "aa", "bb")],
            "h2": [sa("h1-h2", "bb", "aa"), sa("h2-partner", "cc", "dd")],
        },
    )
    assert status["problems"] == []
    assert [(r["link"], r["end"], r["state"]) for r in status["rows"]] == [
        ("h1-h2", "h1", "up"), ("h1-h2", "h2", "up"), ("h2-partner", "h2", "up")
    ]  # fmt: skip
    assert status["table"][1].split()[:5] == ["h1-h2", "h1", "up", "aa", "bb"]


def test_ends_that_do_not_share_an_sa_pair_are_flagged():
    status = link_status(
        INTENT,
        {
            "h1": [sa("h1-h2", "aa", "bb")],
            "h2": [sa("h1-h2", "bb", "ee"), sa("h2-partner", "c", "d")],
        },
    )
    assert status["problems"] == [
        "h1-h2 (core): the ends disagree: no Child SA of h1 is the other half of one of h2's"
    ]


def test_a_rekey_in_progress_still_agrees_through_one_pair():
    both = [sa("h1-h2", "aa", "bb", age=100), sa("h1-h2", "a2", "b2", age=1)]
    mirrored = [sa("h1-h2", "b2", "a2", age=1), sa("h2-partner", "c", "d")]
    status = link_status(INTENT, {"h1": both, "h2": mirrored})
    assert status["problems"] == []
    assert status["rows"][0]["spi_in"] == "a2"  # the newest Child SA is shown


def test_down_unseen_and_half_open_ends_are_flagged():
    status = link_status(INTENT, {"h1": [sa("h1-h2", "aa", "bb", state="auth")], "h2": None})
    assert status["problems"] == [
        "h1-h2 (core): connecting at h1, not seen at h2",
        "h2-partner (partner): not seen at h2",
    ]
    ike_only = {"connection": "h2-partner", "state": "established", "children": []}
    status = link_status(INTENT, {"h1": [], "h2": [ike_only]})
    assert status["problems"] == [
        "h1-h2 (core): down at h1, down at h2",
        "h2-partner (partner): IKE SA only at h2",
    ]
