"""IKE identities as text: an address, an FQDN, user@FQDN, an ASN.1 distinguished
name written as strongSwan writes one, attribute by attribute in the certificate's own
order: "C=CH, O=Keyway, CN=moon" (the reverse of RFC 4514's order), or a KEY_ID in
strongSwan's "@#" hex form ("@#4a5b..."); "@moon.lab" is the FQDN moon.lab, as there.

A DN travels as DER (ID_DER_ASN1_DN). Two spellings of one DN ("c=CH,O=Keyway,CN=moon")
are the same identity: `canonical` gives the form keywayd compares and shows. Pure
Python: the config parser uses it without cryptography; `dn_der` (which builds the DER
with cryptography) is only called when an IKE message is made.
"""

from __future__ import annotations

import re

# Attribute names strongSwan uses, and their OIDs.
DN_ATTRIBUTES = {
    "C": "2.5.4.6",
    "ST": "2.5.4.8",
    "L": "2.5.4.7",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "CN": "2.5.4.3",
    "SN": "2.5.4.4",
    "GN": "2.5.4.42",
    "serialNumber": "2.5.4.5",
    "T": "2.5.4.12",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "E": "1.2.840.113549.1.9.1",
}
_NAME_OF = {oid: name for name, oid in DN_ATTRIBUTES.items()}
_BY_UPPER = {name.upper(): name for name in DN_ATTRIBUTES} | {"EMAILADDRESS": "E"}
_DN = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*|\d+(\.\d+)+)\s*=")


class IdentityError(ValueError):
    """An identity that cannot be written or read."""


def is_dn(text: str) -> bool:
    """A distinguished name: `attribute=value`, which no address, FQDN or user@FQDN is."""
    return bool(_DN.match(text))


def dn_parts(text: str) -> list[tuple[str, str]]:
    """(OID, value) pairs of a DN written "C=CH, O=Keyway, CN=moon" ("\\," escapes a
    comma in a value)."""
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    pairs = []
    for part in parts:
        name, equals, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name or not value:
            raise IdentityError(f"{text!r}: {part.strip()!r} is not attribute=value")
        if re.fullmatch(r"\d+(\.\d+)+", name):
            oid = name
        elif name.upper() in _BY_UPPER:
            oid = DN_ATTRIBUTES[_BY_UPPER[name.upper()]]
        else:
            known = ", ".join(DN_ATTRIBUTES)
            raise IdentityError(f"{text!r}: unknown attribute {name!r} (known: {known})")
        pairs.append((oid, value))
    return pairs


def dn_text(pairs: list[tuple[str, str]]) -> str:
    """The canonical text of (OID, value) pairs: "C=CH, O=Keyway, CN=moon"."""
    return ", ".join(f"{_NAME_OF.get(oid, oid)}={value.replace(',', chr(92) + ',')}"
                     for oid, value in pairs)  # fmt: skip


def canonical(text: str) -> str:
    """The identity keywayd compares and shows: a DN respelled, a KEY_ID in lowercase
    hex, "@fqdn" without its "@", anything else as is."""
    if is_dn(text):
        return dn_text(dn_parts(text))
    if is_key_id(text):
        return key_id_text(key_id(text))
    if text.startswith("@") and "@" not in text[1:]:
        return text[1:]
    return text


def is_key_id(text: str) -> bool:
    return text.startswith("@#")


def key_id(text: str) -> bytes:
    """The bytes of a KEY_ID written "@#hex"."""
    try:
        data = bytes.fromhex(text[2:].replace(":", ""))
    except ValueError:
        raise IdentityError(f"{text!r}: a KEY_ID is @# and hex digits") from None
    if not data:
        raise IdentityError(f"{text!r}: an empty KEY_ID")
    return data


def key_id_text(data: bytes) -> str:
    return "@#" + data.hex()


def dn_der(text: str) -> bytes:
    """The DER of a DN written as text (ID_DER_ASN1_DN data)."""
    from cryptography import x509
    from cryptography.x509.oid import ObjectIdentifier

    attributes = [x509.NameAttribute(ObjectIdentifier(oid), v) for oid, v in dn_parts(text)]
    return x509.Name(attributes).public_bytes()


def dn_from_der(data: bytes) -> list[tuple[str, str]]:
    """(OID, value) pairs of a DER Name, in its order; IdentityError if malformed."""
    body, rest = _tlv(data, 0x30)
    if rest:
        raise IdentityError("bytes after the Name")
    pairs = []
    while body:
        rdn, body = _tlv(body, 0x31)
        while rdn:
            pair, rdn = _tlv(rdn, 0x30)
            oid, pair = _tlv(pair, 0x06)
            if not pair:
                raise IdentityError("attribute without a value")
            tag = pair[0]
            value, pair = _tlv(pair, tag)
            if pair:
                raise IdentityError("bytes after an attribute's value")
            pairs.append((_oid(oid), _string(tag, value)))
    return pairs


def _tlv(data: bytes, tag: int) -> tuple[bytes, bytes]:
    """(the value of the DER element with `tag` that starts `data`, what follows it)."""
    if len(data) < 2 or data[0] != tag:
        raise IdentityError(f"expected DER tag {tag:#04x}")
    length, offset = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 3 or len(data) < 2 + count:
            raise IdentityError("bad DER length")
        length, offset = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
    if len(data) < offset + length:
        raise IdentityError("DER element longer than its data")
    return data[offset : offset + length], data[offset + length :]


def _oid(data: bytes) -> str:
    if not data or data[-1] & 0x80:
        raise IdentityError("bad OID")
    arcs, value = [], 0
    for byte in data:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _string(tag: int, data: bytes) -> str:
    codecs = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1",
              0x1E: "utf-16-be", 0x1C: "utf-32-be"}  # fmt: skip
    if tag not in codecs:
        raise IdentityError(f"attribute value of DER type {tag:#04x}")
    try:
        return data.decode(codecs[tag])
    except UnicodeDecodeError:
        raise IdentityError("attribute value does not decode") from None
