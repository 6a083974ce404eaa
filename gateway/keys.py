"""API key format: generate, parse, checksum, hash and display prefix.

``ckiq_live_`` / ``ckiq_test_`` + 32 base62 random characters + a 6-character
base62 CRC32 of everything before it (the GitHub token scheme), so a typo or a
forged string is rejected here, before any lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "BASE62",
    "ParsedKey",
    "checksum",
    "display_prefix",
    "generate_key",
    "generate_token",
    "hash_secret",
    "parse_key",
]

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
KEY_PREFIXES = {"ckiq_live_": "live", "ckiq_test_": "test"}
RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 6
KEY_LENGTH = 10 + RANDOM_LENGTH + CHECKSUM_LENGTH
DISPLAY_PREFIX_LENGTH = 14
TOKEN_PREFIX = "ckiq_mgmt_"  # noqa: S105 - a prefix, not a secret

Environment = Literal["live", "test"]


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key whose format and checksum are right; it may still be unknown."""

    text: str
    environment: Environment


# Every pair of base62 digits, in order: a CRC32 (< 62**6) is three of them.
# Checked on every request, so three table lookups instead of six divisions.
_PAIRS = tuple(a + b for a in BASE62 for b in BASE62)
_PAIR = len(_PAIRS)


def checksum(body: str) -> str:
    """CRC32 of the ASCII body, as 6 base62 digits, most significant first."""
    high, rest = divmod(zlib.crc32(body.encode("ascii")), _PAIR * _PAIR)
    middle, low = divmod(rest, _PAIR)
    return _PAIRS[high] + _PAIRS[middle] + _PAIRS[low]


def _random_part() -> str:
    return "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))


def generate_key(environment: Environment) -> str:
    """A new key for ``environment``: 32 random base62 chars, about 190 bits."""
    body = ("ckiq_live_" if environment == "live" else "ckiq_test_") + _random_part()
    return body + checksum(body)


def generate_token() -> str:
    """A team-scoped management token; same shape, its own prefix."""
    body = TOKEN_PREFIX + _random_part()
    return body + checksum(body)


def parse_key(text: str) -> ParsedKey | None:
    """Return the key if its shape and checksum are right, else ``None``."""
    if len(text) != KEY_LENGTH:
        return None
    environment = KEY_PREFIXES.get(text[:10])
    if environment is None:
        return None
    rest = text[10:]
    if not _BASE62_SET.issuperset(rest):
        return None
    if checksum(text[:-CHECKSUM_LENGTH]) != text[-CHECKSUM_LENGTH:]:
        return None
    return ParsedKey(text, "live" if environment == "live" else "test")


def is_token_shaped(text: str) -> bool:
    """True for a well-formed management token (prefix, base62, checksum)."""
    if len(text) != KEY_LENGTH or not text.startswith(TOKEN_PREFIX):
        return False
    if not _BASE62_SET.issuperset(text[10:]):
        return False
    return checksum(text[:-CHECKSUM_LENGTH]) == text[-CHECKSUM_LENGTH:]


def hash_secret(text: str, pepper: bytes | None) -> str:
    """What the store keeps instead of the secret: SHA-256, or HMAC-SHA-256 with a pepper."""
    data = text.encode("ascii")
    if pepper:
        return hmac.new(pepper, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def display_prefix(text: str) -> str:
    """The part of a key that lists and logs may show: ``ckiq_live_`` + 4."""
    return text[:DISPLAY_PREFIX_LENGTH]
