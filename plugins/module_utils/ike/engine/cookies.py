"""Stateless COOKIEs against half-open floods (RFC 7296 section 2.6).

Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>). The secret rotates; a
cookie made with the previous secret is still accepted for one period, so clients that
were just asked to retry are not turned away by a rotation.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field

COOKIE_VERSION_SIZE = 4


@dataclass
class CookieJar:
    """Makes and checks cookies; `now` is the caller's clock in seconds."""

    rotate_seconds: float = 120.0
    _secrets: dict[int, bytes] = field(default_factory=dict, repr=False)
    _version: int = 0
    _rotated_at: float | None = None

    def _current(self, now: float) -> tuple[int, bytes]:
        if self._rotated_at is None or now - self._rotated_at >= self.rotate_seconds:
            # Keep the secret that was current until now, unless it aged out too.
            stale = self._rotated_at is None or now - self._rotated_at >= 2 * self.rotate_seconds
            previous = {} if stale else {self._version: self._secrets[self._version]}
            self._version = (self._version + 1) & 0xFFFFFFFF
            self._secrets = {**previous, self._version: os.urandom(32)}
            self._rotated_at = now
        return self._version, self._secrets[self._version]

    @staticmethod
    def _digest(secret: bytes, nonce_i: bytes, ip_i: bytes, spi_i: bytes) -> bytes:
        return hmac.new(secret, nonce_i + ip_i + spi_i, hashlib.sha256).digest()

    def make(self, now: float, nonce_i: bytes, ip_i: bytes, spi_i: bytes) -> bytes:
        """The cookie for an initiator (ip_i: its packed address, spi_i: its 8-byte SPI)."""
        version, secret = self._current(now)
        return struct.pack("!I", version) + self._digest(secret, nonce_i, ip_i, spi_i)

    def check(self, now: float, cookie: bytes, nonce_i: bytes, ip_i: bytes, spi_i: bytes) -> bool:
        """True if `cookie` is one this jar made for these values, current or previous."""
        self._current(now)
        if len(cookie) != COOKIE_VERSION_SIZE + 32:
            return False
        (version,) = struct.unpack_from("!I", cookie)
        secret = self._secrets.get(version)
        if secret is None:
            return False
        return hmac.compare_digest(cookie[4:], self._digest(secret, nonce_i, ip_i, spi_i))
