"""
The plain records stores take and return.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    """
    @ivar uid: the account id (tim's "node"), see L{timtx.ids}.
    @ivar domain: the tenant namespace given at registration.
    @ivar passwordHash: see L{timtx.passwords}.
    @ivar created: registration time, Unix seconds.
    """

    uid: str
    domain: str
    passwordHash: str
    created: float


@dataclass(frozen=True)
class TokenGrant:
    """
    What a one-time login token stood for.
    """

    uid: str
    domain: str
