"""Sortable run ids: 48-bit millisecond time + 80 random bits, Crockford base32 (ULID layout).

Ids made by one process are strictly increasing even within a millisecond, so
ordering by id is ordering by creation.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_last_ms = -1
_last_random = 0


def new_id(now_ms: int | None = None) -> str:
    global _last_ms, _last_random
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ms <= _last_ms:
        ms = _last_ms
        _last_random = (_last_random + 1) & ((1 << _RANDOM_BITS) - 1)
    else:
        _last_ms = ms
        _last_random = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
    value = (ms << _RANDOM_BITS) | _last_random
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
