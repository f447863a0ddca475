"""
What the endpoint tables (L{timtx.admin.api}, L{timtx.admin.timapi}) are
built from: L{timtx.admin.service.AdminService} provides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from timtx.admin.accounts import AdminFile, AdminTokens
    from timtx.admin.audit import AuditLog
    from timtx.admin.metrics import Sampler
    from timtx.admin.operations import Operations
    from timtx.admin.web import Call
    from timtx.crypto.passwords import PasswordHasher
    from timtx.node import Node


class AdminContext(Protocol):
    node: Node
    operations: Operations
    accounts: AdminFile
    tokens: AdminTokens
    audit: AuditLog
    sampler: Sampler
    hasher: PasswordHasher

    def verify(self, call: Call, name: str, password: str) -> Deferred[Any]:
        """
        The admin account C{name} if C{password} is its password, else
        C{None}.
        """

    def openapi(self) -> dict[str, Any]:
        """
        The OpenAPI document of every endpoint.
        """
