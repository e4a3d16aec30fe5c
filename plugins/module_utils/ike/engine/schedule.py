"""Rekey and expiry times with jitter (strongSwan's rekey_time / rand_time / life_time).

A Child SA with rekey_time R, rand_time J and life_time L rekeys at R - uniform(0, J)
after it was established, and expires hard at L. Spreading rekeys keeps a mesh of peers
from rekeying in lockstep, and makes rekey collisions rarer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LifetimeSchedule:
    rekey_at: float | None  # absolute, caller's clock; None: no time-based rekey
    expire_at: float | None  # hard expiry

    @classmethod
    def compute(
        cls,
        established_at: float,
        rekey_time: float,
        rand_time: float,
        life_time: float,
        rng: random.Random | None = None,
    ) -> LifetimeSchedule:
        rng = rng or random.SystemRandom()
        rekey_at = None
        if rekey_time > 0:
            jitter = rng.uniform(0, min(rand_time, rekey_time)) if rand_time > 0 else 0.0
            rekey_at = established_at + rekey_time - jitter
        expire_at = established_at + life_time if life_time > 0 else None
        if rekey_at is not None and expire_at is not None and rekey_at >= expire_at:
            rekey_at = expire_at - min(1.0, (expire_at - established_at) / 2)
        return cls(rekey_at, expire_at)
