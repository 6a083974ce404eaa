"""Text a client sent, made safe to store, log and show.

aiohttp decodes header bytes with ``surrogateescape``: bytes that are not
UTF-8 become lone surrogates, which no database driver, JSON encoder or
strict stream accepts. One such string in a batch used to make the whole
batch fail; recorded through :func:`safe_text` it cannot.
"""

from __future__ import annotations

__all__ = ["safe_text"]

_ELLIPSIS = "…"


def safe_text(value: str, limit: int | None = None) -> str:
    """``value`` with everything unprintable escaped; at most ``limit`` characters.

    A byte that was not UTF-8 (a lone surrogate from ``surrogateescape``)
    becomes ``\\xHH`` of that byte; an ASCII control character ``\\xHH``;
    any other character ``str.isprintable`` refuses (C1 controls, bidi
    overrides, other surrogates, unassigned) ``\\uHHHH`` or ``\\UHHHHHHHH``
    of its code point, so a raw byte and a character never look alike.
    Printable text, ASCII or not, is returned as it is. The result always
    encodes to UTF-8. A cut is marked with ``…`` and never splits an escape.
    Not reversible: text that already held a backslash escape looks the same.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"safe_text: limit must be at least 1, not {limit}")
    # The common case on the request path: one C-speed scan, no copy.
    if value.isprintable():
        if limit is None or len(value) <= limit:
            return value
        return value[: limit - 1] + _ELLIPSIS
    return _escaped(value, limit)


def _escaped(value: str, limit: int | None) -> str:
    parts: list[str] = []
    size = 0
    for char in value:
        piece = char if char.isprintable() else _escape(char)
        size += len(piece)
        parts.append(piece)
        if limit is not None and size > limit:
            break
    else:
        return "".join(parts)
    assert limit is not None
    # Too long: drop whole pieces until the mark fits.
    while parts and size + len(_ELLIPSIS) > limit:
        size -= len(parts.pop())
    return "".join(parts) + _ELLIPSIS


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
