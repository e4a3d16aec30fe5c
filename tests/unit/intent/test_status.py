"""Both ends' view of every link: up, agreeing on their SA pair, or flagged."""

from __future__ import annotations

from ansible_collections.keyway.ipsec.plugins.module_utils.intent.status import (
    link_status,
    psk_rotation,
)

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


def rotation_intent(previous: bool) -> dict:
    ref = {"ids": ["h1", "h2"], "version": 2, "previous": previous}
    return {
        "hosts": {
            "h1": {"psk_refs": {"h1-h2": ref, "h1-partner": {"external": "partner"}}},
            "h2": {"psk_refs": {"h1-h2": ref}},
        },
        "links": {
            "h1-h2": {"topology": "core", "ends": ["h1", "h2"]},
            "h1-partner": {"topology": "partner", "ends": ["h1", "partner"]},
        },
    }


def test_a_retirement_is_blocked_while_an_end_still_sends_the_previous_psk():
    # h1 rotated (holds v2 and v1), h2 did not (v1 only): retiring v1 would cut h1-h2.
    states = {"h1": {"h1-h2": {"held": 2, "current": True}},
              "h2": {"h1-h2": {"held": 1, "current": False}}}  # fmt: skip
    rotation = psk_rotation(rotation_intent(previous=False), states, {})
    assert rotation["ready"] == []
    assert rotation["blockers"] == [
        "h1-h2: h2 still sends the previous PSK (it has not converged the rotation); "
        "retiring version 1 now would cut the link: converge the rotation on every end first"
    ]
    assert [r["step"] for r in rotation["rows"]] == ["retire", "retire"]


def test_an_end_outside_the_run_blocks_a_retirement_and_both_current_allow_it():
    states = {"h1": {"h1-h2": {"held": 2, "current": True}}}
    (blocker,) = psk_rotation(rotation_intent(previous=False), states, {})["blockers"]
    assert blocker.startswith("h1-h2: h2 is not in this run;")
    states["h2"] = {"h1-h2": {"held": 2, "current": True}}
    rotation = psk_rotation(rotation_intent(previous=False), states, {})
    assert rotation["blockers"] == [] and rotation["ready"] == ["h1-h2"]


def test_a_rotation_in_progress_shows_which_psk_each_end_authenticated_with():
    states = {"h1": {"h1-h2": {"held": 2, "current": True}},
              "h2": {"h1-h2": {"held": 2, "current": True}}}  # fmt: skip
    old = {"connection": "h1-h2", "state": "established", "age": 50, "psk_index": 1}
    new = {"connection": "h1-h2", "state": "established", "age": 2, "psk_index": 0}
    rotation = psk_rotation(rotation_intent(previous=True), states, {"h1": [old, new], "h2": [old]})
    assert [(r["end"], r["authenticated"], r["step"]) for r in rotation["rows"]] == [
        ("h1", "newest", "rotate"), ("h2", "previous", "rotate")
    ]  # fmt: skip
    # Rotating (the previous PSK still accepted) never blocks; external links never show.
    assert rotation["blockers"] == [] and rotation["ready"] == ["h1-h2"]
    assert rotation["table"][1].split() == ["h1-h2", "h1", "v2", "2", "yes", "newest", "rotate"]


def test_links_out_of_any_rotation_are_not_listed():
    states = {"h1": {"h1-h2": {"held": 1, "current": True}},
              "h2": {"h1-h2": {"held": 1, "current": True}}}  # fmt: skip
    rotation = psk_rotation(rotation_intent(previous=False), states, {})
    assert rotation["rows"] == [] and rotation["blockers"] == []
