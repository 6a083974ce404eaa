"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A secret is ``whsec_`` + base64 of 24 random bytes. A delivery carries
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``:
``v1,<base64(HMAC-SHA256(key bytes, "{id}.{timestamp}.{body}"))>``, one per
secret in use, separated by spaces (two while a rotated secret's grace lasts).
Hand-written: the stdlib's hmac and base64 are the whole of it, and the
specification's own Python package would pull in an HTTP client generator.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

__all__ = ["SECRET_PREFIX", "new_secret", "signature", "signature_header"]

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC>`` of one message under one secret."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signature_header(secrets_in_use: Sequence[str], message_id: str, timestamp: int,
                     body: bytes) -> str:  # fmt: skip
    return " ".join(signature(s, message_id, timestamp, body) for s in secrets_in_use)
