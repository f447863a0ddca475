# -*- test-case-name: timtx.test.test_admin -*-
"""
Admin accounts, their roles, and login tokens.

There is no default account and no setup page: accounts are created with
C{python -m timtx admin create-admin} (which writes the admins file
directly, so it works before the node has ever started) or by an admin
through the API.  The file holds each name, its role and a salted scrypt
hash of its password (L{timtx.crypto.passwords}); it is written atomically
with mode 0600 and read again whenever it changes on disk.

Roles:
  - C{admin}: everything;
  - C{observer}: reads only.  Every endpoint that changes anything refuses
    it with 403 (L{timtx.admin.web}).

A login gives a random token valid for C{[admin] token_ttl} seconds.  The
node keeps only a hash of each token, so that what it holds in memory is no
use to whoever reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

ADMIN = "admin"
OBSERVER = "observer"
ROLES = (ADMIN, OBSERVER)

#: Admin names: what a shell and a log line take without quoting.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 256


class AdminAccountError(ValueError):
    """
    An admin account cannot be created or changed as asked; the message
    says why.
    """


@dataclass(frozen=True)
class Admin:
    """
    One admin account.

    @ivar passwordHash: see L{timtx.crypto.passwords.PasswordHasher}.
    @ivar created: Unix seconds.
    """

    name: str
    role: str
    passwordHash: str
    created: float

    @property
    def mayWrite(self) -> bool:
        return self.role == ADMIN


def checkName(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise AdminAccountError(
            "a name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    return name


def checkRole(role: str) -> str:
    if role not in ROLES:
        raise AdminAccountError(f"the role is one of {', '.join(ROLES)}")
    return role


def checkPassword(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AdminAccountError(f"a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


class AdminFile:
    """
    The admins file: read when it changed on disk, written atomically.

    @param path: the file; it need not exist yet.
    """

    log = Logger()

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._admins: dict[str, Admin] = {}

    def _fileStamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_size)

    def admins(self) -> dict[str, Admin]:
        """
        Every account, by name, as the file holds them now.
        """
        stamp = self._fileStamp()
        if stamp != self._stamp:
            self._admins = self._read() if stamp is not None else {}
            self._stamp = stamp
        return dict(self._admins)

    def get(self, name: str) -> Admin | None:
        return self.admins().get(name)

    def _read(self) -> dict[str, Admin]:
        try:
            with open(self.path, encoding="utf-8") as f:
                stored = json.load(f)
            return {
                name: Admin(name, entry["role"], entry["hash"], float(entry.get("created", 0)))
                for name, entry in stored["admins"].items()
                if NAME_PATTERN.match(name) and entry.get("role") in ROLES
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # Nobody can log in until it is fixed; the node keeps running.
            self.log.error("cannot read the admins file {path}: {error}", path=self.path, error=str(e))
            return {}

    def _write(self, admins: dict[str, Admin]) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        data = {
            "admins": {a.name: {"role": a.role, "hash": a.passwordHash, "created": a.created} for a in admins.values()}
        }
        fd, temporary = tempfile.mkstemp(prefix=".admins-", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise
        self._stamp = None

    def add(self, admin: Admin) -> None:
        """
        @raise AdminAccountError: if the name is taken.
        """
        admins = self.admins()
        if admin.name in admins:
            raise AdminAccountError(f"an admin named {admin.name!r} exists")
        admins[admin.name] = admin
        self._write(admins)

    def replace(self, admin: Admin) -> None:
        """
        Store C{admin} whether or not its name exists (a new password, say).
        """
        admins = self.admins()
        admins[admin.name] = admin
        self._write(admins)

    def remove(self, name: str) -> bool:
        admins = self.admins()
        if admins.pop(name, None) is None:
            return False
        self._write(admins)
        return True


@dataclass(frozen=True)
class Grant:
    """
    Who a token, or a name and password, stands for.

    @ivar expires: Unix seconds, or C{None} for a request that logged in
        with its own name and password (tim's headers).
    """

    name: str
    role: str
    expires: float | None = None

    @property
    def mayWrite(self) -> bool:
        return self.role == ADMIN


def _tokenKey(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class AdminTokens:
    """
    Login tokens, kept as hashes, each valid for C{ttl} seconds; at most
    C{maxTokens} at once (the oldest goes first).
    """

    def __init__(self, clock: IReactorTime, ttl: float, maxTokens: int):
        self.clock = clock
        self.ttl = ttl
        self.maxTokens = maxTokens
        self._grants: OrderedDict[bytes, Grant] = OrderedDict()

    def issue(self, admin: Admin) -> tuple[str, Grant]:
        token = secrets.token_urlsafe(32)
        grant = Grant(admin.name, admin.role, self.clock.seconds() + self.ttl)
        self._purge()
        while len(self._grants) >= self.maxTokens:
            self._grants.popitem(last=False)
        self._grants[_tokenKey(token)] = grant
        return token, grant

    def check(self, token: str) -> Grant | None:
        """
        The grant of C{token} if it is valid now.
        """
        key = _tokenKey(token)
        grant = self._grants.get(key)
        if grant is None:
            return None
        if grant.expires is not None and grant.expires <= self.clock.seconds():
            del self._grants[key]
            return None
        return grant

    def revoke(self, token: str) -> bool:
        return self._grants.pop(_tokenKey(token), None) is not None

    def revokeAll(self, name: str) -> int:
        """
        End every token of C{name} (its account was removed or changed).
        """
        keys = [key for key, grant in self._grants.items() if grant.name == name]
        for key in keys:
            del self._grants[key]
        return len(keys)

    def __len__(self) -> int:
        return len(self._grants)

    def _purge(self) -> None:
        now = self.clock.seconds()
        for key in [key for key, grant in self._grants.items() if grant.expires is not None and grant.expires <= now]:
            del self._grants[key]


class LoginThrottle:
    """
    Admin logins per client address: at most C{burst} tried at once, then
    C{rate} a second on average; a login that succeeds gives its place
    back, so that scripts logging in often are not locked out, while
    guessing passwords is.  At most C{maxKeys} addresses are remembered
    (the least recently used go first).  A C{rate} of 0 allows everything.
    """

    def __init__(self, rate: float, burst: int, clock: IReactorTime, maxKeys: int = 10000):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.maxKeys = maxKeys
        self._levels: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def begin(self, key: str) -> bool:
        """
        Whether a login from C{key} may be tried now; if so it holds a
        place until L{succeeded}.
        """
        if not self.rate:
            return True
        now = self.clock.seconds()
        tokens, last = self._levels.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._levels[key] = (tokens, now)
        while len(self._levels) > self.maxKeys:
            self._levels.popitem(last=False)
        return allowed

    def succeeded(self, key: str) -> None:
        found = self._levels.get(key)
        if found is not None:
            tokens, last = found
            self._levels[key] = (min(self.burst, tokens + 1), last)


def describe(admin: Admin) -> dict[str, Any]:
    """
    An account as the API shows it: never its hash.
    """
    return {"name": admin.name, "role": admin.role, "created": admin.created}
