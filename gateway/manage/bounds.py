"""Every bound on management input, defined once.

The admin API's OpenAPI schema, its request checks, the console's forms and
the CLI's arguments all take their limits from here; the limits themselves
come from what the backends can hold (see gateway.config).
"""

from __future__ import annotations

from gateway.config import MAX_RATE_PER_MINUTE
from gateway.storage import MAX_BALANCE

__all__ = [
    "AMOUNT_MAX",
    "AUDIT_DEFAULT",
    "BALANCE_MAX",
    "CAP_MAX",
    "EARLIEST",
    "GRACE_MAX_SECONDS",
    "GRANULARITY",
    "KEY_SECRET_MAX",
    "LATEST",
    "LIST_DEFAULT",
    "LIST_MAX",
    "MAX_BUCKETS",
    "NAME_MAX",
    "QUOTA_MAX",
    "RATE_LIMIT_MAX",
    "REASON_MAX",
]

NAME_MAX = 100  # team, key and token names (contract §2)
REASON_MAX = 500  # a grant's reason
RATE_LIMIT_MAX = MAX_RATE_PER_MINUTE
GRACE_MAX_SECONDS = 90 * 86_400
AMOUNT_MAX = 10**12  # one grant or adjustment, either sign
# A balance never grows past this, so balance + any grant stays far inside a
# signed 64-bit integer (SQLite INTEGER, PostgreSQL bigint) and can never wedge.
BALANCE_MAX = MAX_BALANCE
# A key's spend cap (credits per day or month) and a request quota per period.
CAP_MAX = MAX_BALANCE
QUOTA_MAX = 10**12
LIST_DEFAULT = 100
LIST_MAX = 1000
AUDIT_DEFAULT = 50
MAX_BUCKETS = 5000
GRANULARITY = {"minute": 60, "hour": 3600, "day": 86400}
KEY_SECRET_MAX = 200
# Times the backends store and print: 1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
EARLIEST = 0.0
LATEST = 253_402_300_799.0
