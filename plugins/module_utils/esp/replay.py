"""Anti-replay window (RFC 4303 section 3.4.3 and appendix A) with 64-bit ESN inference."""

from __future__ import annotations

_MASK32 = 0xFFFFFFFF


class ReplayWindow:
    """A sliding bitmap of `size` sequence numbers below the highest one accepted.

    check() is side-effect free so the ICV can be verified before update() commits
    (RFC 4303 3.4.3: a forged packet must not move the window).
    """

    __slots__ = ("_bits", "esn", "size", "top")

    def __init__(self, size: int = 128, esn: bool = True) -> None:
        if size < 32:
            raise ValueError(f"replay window {size} is below the RFC 4303 minimum of 32")
        self.size = size
        self.esn = esn
        self.top = 0  # highest accepted 64-bit sequence number, 0: none yet
        self._bits = 0  # bit i set: top - i was received

    def infer(self, seq_low: int) -> int:
        """The full 64-bit sequence number for a received low 32 bits (appendix A2.2)."""
        if not self.esn:
            return seq_low
        top_high, top_low = self.top >> 32, self.top & _MASK32
        bottom = (top_low - self.size + 1) & _MASK32
        if top_low >= self.size - 1:  # case A: window within one subspace
            high = top_high if seq_low >= bottom else top_high + 1
        else:  # case B: window straddles the subspace boundary
            high = top_high - 1 if seq_low >= bottom else top_high
            if high < 0:
                high = 0
        return (high << 32) | seq_low

    def check(self, seq: int) -> bool:
        """True if `seq` (full) is new and inside or ahead of the window."""
        if seq == 0:
            return False
        if seq > self.top:
            return True
        offset = self.top - seq
        if offset >= self.size:
            return False
        return not (self._bits >> offset) & 1

    def update(self, seq: int) -> None:
        """Record `seq` as received (after its ICV verified)."""
        if seq > self.top:
            shift = seq - self.top
            # A jump past the window forgets everything (and avoids a huge shift).
            if shift >= self.size:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self.top = seq
        else:
            self._bits |= 1 << (self.top - seq)
