# -*- test-case-name: timtx.test.test_accounts -*-
"""
Salted scrypt password hashes.

A hash is stored as C{scrypt$<n>$<r>$<p>$<salt b64>$<key b64>} so that the
cost can be raised later without breaking existing accounts: a login with
old parameters still verifies, and L{PasswordHasher.needsRehash} says when
to store a new hash.

Hashing costs tens of milliseconds of CPU on purpose, so callers run it in a
thread pool; C{hashlib.scrypt} releases the GIL while it works.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

_SALT_BYTES = 16
_KEY_BYTES = 32


@dataclass(frozen=True)
class PasswordHasher:
    n: int = 16384
    r: int = 8
    p: int = 1

    def hash(self, password: str) -> str:
        salt = secrets.token_bytes(_SALT_BYTES)
        key = self._derive(password, salt, self.n, self.r, self.p)
        return "$".join(["scrypt", str(self.n), str(self.r), str(self.p), _b64(salt), _b64(key)])

    def verify(self, password: str, stored: str) -> bool:
        """
        Whether C{password} matches C{stored}.  A malformed stored hash
        matches nothing.
        """
        try:
            scheme, n, r, p, salt, key = stored.split("$")
            if scheme != "scrypt":
                return False
            expected = base64.b64decode(key)
            actual = self._derive(password, base64.b64decode(salt), int(n), int(r), int(p))
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(expected, actual)

    def burn(self, password: str) -> None:
        """
        Spend the time of one verification, for logins to unknown accounts,
        so that response time does not tell which accounts exist.
        """
        self._derive(password, b"\0" * _SALT_BYTES, self.n, self.r, self.p)

    def needsRehash(self, stored: str) -> bool:
        return not stored.startswith(f"scrypt${self.n}${self.r}${self.p}$")

    @staticmethod
    def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=_KEY_BYTES
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
