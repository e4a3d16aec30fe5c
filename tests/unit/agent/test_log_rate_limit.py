"""keywayd's rate limit on what unauthenticated senders can make it log."""

from __future__ import annotations

import logging

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.keywayd import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("keyway.untrusted", logging.INFO, __file__, 1, msg, args, None)


def test_each_template_passes_its_burst_per_window_then_reports_what_it_dropped():
    clock = Clock()
    limit = RateLimit(burst=3, window=60.0, clock=clock)
    garbage = "dropped datagram from %s: %s"
    passed = [limit.filter(record(garbage, ("192.0.2.1", n), "short")) for n in range(1000)]
    assert passed == [True] * 3 + [False] * 997
    # Another template has its own budget: one flood does not hide other messages.
    assert limit.filter(record("IKE_SA_INIT from %s matches no connection", "x"))
    clock.now = 59.9
    assert not limit.filter(record(garbage, "a", "b"))
    clock.now = 60.0
    summary = record(garbage, "a", "b")
    assert limit.filter(summary)
    assert summary.getMessage() == "dropped datagram from a: b [998 similar messages suppressed]"
    # The new window's budget counts the summary line.
    assert [limit.filter(record(garbage, "a", "b")) for _ in range(3)] == [True, True, False]


def test_a_quiet_template_is_never_annotated():
    clock = Clock()
    limit = RateLimit(burst=2, window=10.0, clock=clock)
    for step in range(5):
        clock.now = step * 10.0
        rec = record("UDP error: %s", "refused")
        assert limit.filter(rec) and rec.getMessage() == "UDP error: refused"
