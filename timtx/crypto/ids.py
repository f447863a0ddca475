# -*- test-case-name: timtx.test.test_accounts -*-
"""
Identifiers: the node secret, keyed account ids, base58.

An account id ("node" in tim's structs) is the base58 form of
C{HMAC-SHA256(account key, domain NUL name)[:16]}.  The login name is never
stored; without the node secret, a leaked database does not let anyone test
guessed names against ids (tim's CRC64 ids allow exactly that).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}

#: Bytes of HMAC output kept in an account id: 128 bits, so ids never collide
#: in practice.
ACCOUNT_ID_BYTES = 16


def b58encode(data: bytes) -> str:
    """
    Bitcoin-alphabet base58 of C{data}, leading zero bytes kept as C{1}s.
    """
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, digit = divmod(number, 58)
        out.append(_ALPHABET[digit])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """
    @raise ValueError: for a character outside the alphabet.
    """
    number = 0
    for char in text:
        try:
            number = number * 58 + _INDEX[char]
        except KeyError:
            raise ValueError(f"not base58: {char!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


class NodeKeys:
    """
    Keys derived from the node secret, one per purpose, so that no value
    computed for one purpose can be replayed for another.
    """

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the node secret must be at least 16 bytes")
        self._secret = secret
        self.accountKey = self.derive(b"timtx account id v1")
        self.tokenKey = self.derive(b"timtx login token v1")
        self.groupKey = self.derive(b"timtx group id v1")

    def derive(self, purpose: bytes) -> bytes:
        return hmac.new(self._secret, purpose, hashlib.sha256).digest()

    def accountId(self, name: str, domain: str | None) -> str:
        """
        The account id of C{name} in C{domain}; stable for a given secret.
        """
        message = (domain or "").encode("utf-8") + b"\0" + name.encode("utf-8")
        digest = hmac.new(self.accountKey, message, hashlib.sha256).digest()
        return b58encode(digest[:ACCOUNT_ID_BYTES])

    def tokenKeyFor(self, token: int | str) -> bytes:
        """
        What the store keeps for a login token: a keyed hash, so a leaked
        database holds no usable token.
        """
        return hmac.new(self.tokenKey, str(token).encode("ascii", "replace"), hashlib.sha256).digest()

    @classmethod
    def fromFile(cls, path: str) -> NodeKeys:
        """
        Load the secret from C{path}, creating it (mode 0600) if it does not
        exist.  Runs before the reactor starts, so blocking I/O is fine.
        """
        try:
            with open(path, encoding="ascii") as f:
                return cls(bytes.fromhex(f.read().strip()))
        except FileNotFoundError:
            pass
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        secret = secrets.token_bytes(32)
        # Written whole under a private name, then linked into place: the
        # nodes of a cluster on one machine share one key file and may all
        # start at once, so another must never read it half written, and
        # the first to link wins.
        fd, temporary = tempfile.mkstemp(prefix=".node-key-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secret.hex() + "\n")
            os.link(temporary, path)
        except FileExistsError:
            with open(path, encoding="ascii") as f:
                return cls(bytes.fromhex(f.read().strip()))
        finally:
            os.unlink(temporary)
        return cls(secret)


def new_random_id(nbytes: int = ACCOUNT_ID_BYTES) -> str:
    """
    A random base58 id, for groups and virtual rooms.
    """
    return b58encode(secrets.token_bytes(nbytes))
