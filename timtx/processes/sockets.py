# -*- test-case-name: timtx.test.test_processes -*-
"""
Listening sockets made in one process and served in another.

The parent binds each socket from the same endpoint string a node would
listen on (L{bindListening}): it runs Twisted's own parser for it with a
stand-in for the reactor that binds a socket instead of serving, so every
option of C{tcp:}, C{tcp6:} and C{ssl:} means what it means for a node.
A child serves an inherited socket with L{AdoptedEndpoint}: the same
parser, with a stand-in that adopts the socket
(C{IReactorSocket.adoptStreamPort}) where the endpoint would listen, and
for C{ssl:} wraps the factory in TLS as the reactor's C{listenSSL} does.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer


class CannotBind(Exception):
    """
    A socket could not be bound; the message says which and why.
    """


def bindListening(description: str, offset: int = 0) -> socket.socket:
    """
    A socket bound and listening as C{description} says (port moved by
    C{offset} unless it is 0), non-blocking, for a child to adopt.

    @raise CannotBind: if the endpoint is not C{tcp:}, C{tcp6:} or C{ssl:},
        or its address cannot be bound.
    """
    binder = _Binder(offset)
    failures: list[Failure] = []
    try:
        d: Deferred[Any] = serverFromString(binder, description).listen(None)
    except Exception as e:  # a bad ssl: file, a unix: endpoint
        raise CannotBind(_cannotListen(description, e)) from None
    d.addErrback(failures.append)
    if failures:
        error = failures[0].value
        assert error is not None
        raise CannotBind(_cannotListen(description, error))
    assert binder.socket is not None
    return binder.socket


def _cannotListen(description: str, error: BaseException) -> str:
    if isinstance(error, AttributeError):
        why = "only tcp:, tcp6: and ssl: endpoints can be shared by processes"
    elif isinstance(error, OSError):
        why = error.strerror or str(error)
    else:
        why = str(error)
    return f"cannot listen on {description!r}: {why}"


class _Binder:
    """
    What a TCP or SSL server endpoint calls on its reactor, binding a socket
    instead.
    """

    def __init__(self, offset: int):
        self.offset = offset
        self.socket: socket.socket | None = None

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> socket.socket:
        family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As Twisted's own ports: a restarted host rebinds at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((interface, port + self.offset if port else 0))
            s.listen(backlog)
            # Every child accepts from it in its reactor.
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.socket = s
        return s

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> socket.socket:
        return self.listenTCP(port, factory, backlog, interface)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    Serves the inherited listening socket C{fd} as the endpoint
    C{description} would serve its own: plain, or TLS with the
    certificates it names.
    """

    def __init__(self, reactor: Any, description: str, fd: int):
        self.reactor = reactor
        self.description = description
        self.fd = fd

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = serverFromString(_Adopter(self.reactor, self.fd), self.description).listen(
            factory
        )
        return d


class _Adopter:
    """
    What a TCP or SSL server endpoint calls on its reactor, adopting an
    inherited socket instead of binding one.
    """

    def __init__(self, reactor: Any, fd: int):
        self.reactor = reactor
        self.fd = fd

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        # The family of the socket as bound, without taking it over.
        inherited = socket.socket(fileno=self.fd)
        family = inherited.family
        inherited.detach()
        # The reactor serves a duplicate; the inherited descriptor stays
        # open, so that the endpoint may listen again.
        listening: IListeningPort = self.reactor.adoptStreamPort(self.fd, family, factory)
        return listening

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        # What the reactor's listenSSL does on a port of its own.
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface)
