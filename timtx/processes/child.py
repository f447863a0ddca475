# -*- test-case-name: timtx.test.test_processes -*-
"""
The node of a child process: it serves the listening sockets its parent
bound (L{AdoptingNode}) and stops when its parent is gone
(L{watchParent}).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.config import Config
from timtx.node import Listener, Node
from timtx.processes.sockets import AdoptedEndpoint


class AdoptingNode(Node):
    """
    A L{Node} whose listeners named in C{adopted} (C{client-ws},
    C{client-tcp}, C{admin}; C{cluster} for its peers) serve the inherited
    socket of that file descriptor instead of binding their own.
    """

    def __init__(self, config: Config, reactor: Any, *, adopted: Mapping[str, int], **kwargs: Any):
        # Set first: Node.__init__ adds the client listeners.
        self.adopted = dict(adopted)
        super().__init__(config, reactor, **kwargs)
        peers = self.adopted.get("cluster")
        if self.cluster is not None and peers is not None:
            self.cluster.listenEndpoint = AdoptedEndpoint(reactor, config.cluster.listen, peers)

    def addListener(self, description: str, factory: Any, name: str) -> Listener:
        fd = self.adopted.get(name)
        if fd is None:
            return super().addListener(description, factory, name)
        listener = Listener(AdoptedEndpoint(self.reactor, description, fd), description, factory, name)
        self._listeners[name] = listener
        listener.setServiceParent(self)
        return listener


@implementer(IReadDescriptor)
class _ParentPipe:
    """
    The child's stdin, a pipe its parent holds open: it reads end of file
    when the parent is gone, however it went (a C{kill -9} included).
    """

    log = Logger()

    def __init__(self, reactor: Any, fd: int, gone: Callable[[], None]):
        self.reactor = reactor
        self.fd = fd
        self.gone = gone
        #: Whether this process stops anyway (the reactor then closes
        #: every descriptor it watches: not a sign of the parent).
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "parent"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            self._parentGone()
        return None

    def connectionLost(self, reason: Failure) -> None:
        # epoll reports a pipe whose writer closed as a hang-up, which the
        # reactor turns into this call, without doRead.
        if not self.stopping:
            self._parentGone()

    def _parentGone(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.log.warn("the parent process is gone: stopping")
        self.gone()


def watchParent(reactor: Any, fd: int = 0) -> None:
    """
    Stop C{reactor} when the parent closes this process's stdin (C{fd}).
    """

    def gone() -> None:
        if reactor.running:
            reactor.stop()

    pipe = _ParentPipe(reactor, fd, gone)
    reactor.addReader(pipe)
    reactor.addSystemEventTrigger("before", "shutdown", pipe.stop)


def detachFromTerminal() -> None:
    """
    Leave the terminal's process group: Ctrl-C reaches only the parent,
    which stops its children with SIGTERM, so that none gets two signals.
    """
    try:
        os.setpgid(0, 0)
    except (AttributeError, OSError):
        pass
