"""List cursors that reveal nothing of other tenants' tasks, the same for every store."""

from __future__ import annotations

import base64
import hashlib
import hmac

from service.errors import InvalidInput


class Cursors:
    """List cursors that reveal nothing: `seq` is global, so in the clear it would tell a tenant
    how many tasks others created between two of its own. A cursor is the seq under a keyed
    permutation (a 4-round Feistel network over HMAC-SHA256) with a tag binding it to its owner;
    the key lives in the database, so cursors outlive a restart."""

    _ROUNDS = 4
    _MASK = 0xFFFFFFFF

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, owner: str, seq: int) -> str:
        left, right = seq >> 32, seq & self._MASK
        for i in range(self._ROUNDS):
            left, right = right, left ^ self._f(i, right)
        body = ((left << 32) | right).to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._tag(owner, body)).decode().rstrip("=")

    def open(self, owner: str, cursor: str | None) -> int:
        if cursor is None:
            return 0
        try:
            raw = base64.urlsafe_b64decode(cursor.encode("ascii") + b"=" * (-len(cursor) % 4))
        except ValueError:  # binascii.Error and UnicodeEncodeError alike
            raw = b""
        body, tag = raw[:8], raw[8:]
        if len(raw) != 16 or not hmac.compare_digest(tag, self._tag(owner, body)):
            raise InvalidInput("not a cursor this service handed out", field="cursor")
        value = int.from_bytes(body, "big")
        left, right = value >> 32, value & self._MASK
        for i in reversed(range(self._ROUNDS)):
            left, right = right ^ self._f(i, left), left
        return (left << 32) | right

    def _f(self, i: int, half: int) -> int:
        digest = hmac.new(self._key, bytes([i]) + half.to_bytes(4, "big"), hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big")

    def _tag(self, owner: str, body: bytes) -> bytes:
        return hmac.new(self._key, b"cursor\0" + owner.encode() + b"\0" + body, hashlib.sha256).digest()[:8]
