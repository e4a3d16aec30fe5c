"""Retransmission schedule of requests (RFC 7296 section 2.1), as strongSwan does it:
the n-th retransmission waits timeout * base**n, capped; after `tries` the peer is
considered dead. Pure arithmetic: the engine asks for deadlines, it never sleeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetransmitPolicy:
    timeout: float = 4.0
    base: float = 1.8
    tries: int = 5  # retransmissions after the first send
    limit: float = 0.0  # cap on one interval, 0: none

    def interval(self, attempt: int) -> float:
        """Seconds to wait after send number `attempt` (0 is the first send)."""
        value = self.timeout * self.base**attempt
        return min(value, self.limit) if self.limit else value

    def deadline(self, sent_at: float, attempt: int) -> float | None:
        """When to retransmit after send `attempt`; None once the tries are used up
        (then the deadline of giving up is sent_at + interval(attempt))."""
        return sent_at + self.interval(attempt) if attempt < self.tries else None

    def give_up_after(self, sent_at: float, attempt: int) -> float:
        return sent_at + self.interval(attempt)

    def total(self) -> float:
        """Seconds from the first send to giving up."""
        return sum(self.interval(n) for n in range(self.tries + 1))
