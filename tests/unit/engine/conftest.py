"""Every engine test also checks the IKE SA state machine: a state change outside
SA_TRANSITIONS is logged as a bug, and fails the test that made it."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def only_state_machine_transitions(caplog):
    caplog.set_level(logging.ERROR, logger="keyway.ike")
    yield
    bugs = [r.getMessage() for r in caplog.records if "not in its state machine" in r.getMessage()]
    assert not bugs, bugs
