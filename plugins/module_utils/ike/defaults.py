"""What keywayd proposes when a connection names no proposals, in one place for the
config parser and the engine (no imports: the parser loads without cryptography).
AES-GCM-256 with SHA-384 and X25519 for IKE, AES-GCM-256 for ESP (RFC 8221, RFC 8247)."""

from __future__ import annotations

DEFAULT_IKE_PROPOSALS = ("aes256gcm16-prfsha384-x25519",)
DEFAULT_ESP_PROPOSALS = ("aes256gcm16",)
