"""Engine parts with no protocol state: cookies, retransmission, lifetimes."""

from __future__ import annotations

import logging
import random

import pytest

from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine import core
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.cookies import CookieJar
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.retransmit import (
    RetransmitPolicy,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.ike.engine.schedule import (
    LifetimeSchedule,
)

NI, IP, SPI = b"n" * 32, bytes([192, 0, 2, 11]), b"\x01" * 8
from tests.unit.engine.test_establish import established


def test_cookie_is_bound_to_nonce_address_and_spi():
    jar = CookieJar()
    cookie = jar.make(0.0, NI, IP, SPI)
    assert jar.check(1.0, cookie, NI, IP, SPI)
    assert not jar.check(1.0, cookie, b"m" * 32, IP, SPI)
    assert not jar.check(1.0, cookie, NI, bytes([192, 0, 2, 12]), SPI)
    assert not jar.check(1.0, cookie, NI, IP, b"\x02" * 8)
    assert not jar.check(1.0, cookie[:-1], NI, IP, SPI)
    assert not jar.check(1.0, bytes(len(cookie)), NI, IP, SPI)


def test_cookie_survives_one_rotation_not_two():
    jar = CookieJar(rotate_seconds=10)
    cookie = jar.make(0.0, NI, IP, SPI)
    assert jar.check(15.0, cookie, NI, IP, SPI)  # rotated once: previous secret kept
    assert jar.make(15.0, NI, IP, SPI) != cookie
    assert not jar.check(25.0, cookie, NI, IP, SPI)  # rotated twice: gone


def test_two_jars_do_not_accept_each_other_s_cookies():
    assert not CookieJar().check(0.0, CookieJar().make(0.0, NI, IP, SPI), NI, IP, SPI)


def test_retransmit_backs_off_exponentially_and_gives_up():
    policy = RetransmitPolicy(timeout=1.0, base=2.0, tries=3)
    assert [policy.deadline(0.0, n) for n in range(4)] == [1.0, 2.0, 4.0, None]
    assert policy.give_up_after(7.0, 3) == 15.0
    assert policy.total() == 15.0
    assert RetransmitPolicy(timeout=1.0, base=2.0, tries=9, limit=5.0).interval(8) == 5.0


@pytest.mark.parametrize("seed", range(20))
def test_rekey_falls_in_the_jitter_window_before_expiry(seed):
    s = LifetimeSchedule.compute(100.0, 3600, 360, 3960, random.Random(seed))
    assert 100 + 3600 - 360 <= s.rekey_at <= 100 + 3600
    assert s.expire_at == 100 + 3960


def test_jitter_spreads_rekeys():
    rekeys = {
        LifetimeSchedule.compute(0, 3600, 360, 3960, random.Random(i)).rekey_at for i in range(50)
    }
    assert len(rekeys) == 50 and max(rekeys) - min(rekeys) > 180


def test_rekey_never_at_or_after_expiry_and_zero_means_never():
    s = LifetimeSchedule.compute(0, 100, 0, 100, random.Random(1))
    assert s.rekey_at < s.expire_at
    assert LifetimeSchedule.compute(0, 0, 0, 0) == LifetimeSchedule(None, None)


def test_cookie_from_before_a_long_idle_gap_is_refused():
    jar = CookieJar(rotate_seconds=10)
    cookie = jar.make(0.0, NI, IP, SPI)
    assert not jar.check(21.0, cookie, NI, IP, SPI)


def test_a_state_change_outside_the_state_machine_is_logged_as_a_bug(caplog):
    """IKE SA states change only through _set_state, along SA_TRANSITIONS; anything else
    is a bug, said so (every engine test fails on such a line: conftest.py)."""
    pair = established()
    (sa,) = pair.a.sas()
    assert sa.state is core.SaState.ESTABLISHED and sa.state == "established"
    assert core.SA_TRANSITIONS[core.SaState.ESTABLISHED] == {core.SaState.DELETED}
    sa._set_state(core.SaState.AUTH)
    (record,) = [r for r in caplog.records if "not in its state machine" in r.getMessage()]
    assert record.levelno == logging.ERROR and "established -> auth" in record.getMessage()
    caplog.clear()  # this test's own bug line is the point, not a failure
