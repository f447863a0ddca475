# -*- test-case-name: timtx.test.test_peerprotocol -*-
"""
The peer protocol between timtx nodes on Twisted: L{PeerProtocol} drives
the sans-IO L{timtx.protocols.peer.PeerConnection} and hands what
arrives to an L{IPeerHandler}.

Without TLS under it, peer traffic is plaintext: every frame is
authenticated (a node without the cluster secret can neither join nor
inject, alter or replay frames), but anyone on the path can read it.
L{PeerTLS} adds mutual TLS: each node presents a certificate issued by the
cluster CA and accepts only peers that do; a node that dials also checks the
certificate names the host it dialled (service-identity).

Limits are class attributes a subclass may set, as
L{twisted.protocols.basic.IntNStringReceiver.MAX_LENGTH} is; left at
C{None} they come from the factory's L{PeerSettings} (the node's
C{[cluster]} configuration); L{PeerProtocol.linkLimits} resolves them once
per link and may be overridden to decide per link, as the client transports'
C{connectionLimits} does.  What happens at a limit is a method a subclass
may override: L{PeerProtocol.protocolError}, L{PeerProtocol.outputLimitExceeded},
L{PeerProtocol.handshakeTimedOut}, L{PeerProtocol.notResponding}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from timtx.protocols.peer import (
    DEFAULT_MAX_FRAME_BYTES,
    SESSION_BYTES,
    CloseCode,
    CloseReceived,
    Established,
    MessageReceived,
    PeerConnection,
    PeerProtocolError,
    PeerState,
    PingReceived,
    RequestReceived,
    ResponseReceived,
    ResponseStatus,
    closeCodeName,
)
from timtx.transports.nodelay import sendSmallWritesAtOnce


class IPeerHandler(Interface):
    """
    What a L{PeerProtocol} tells about its link.  Every call comes from the
    reactor thread; none may block.
    """

    def peerEstablished(link: PeerProtocol) -> None:
        """
        C{link} authenticated its peer (C{link.peerId}); it may now send.
        """

    def peerMessageReceived(link: PeerProtocol, kind: str, payload: bytes) -> None:
        """
        A one-way message arrived.
        """

    def peerRequestReceived(link: PeerProtocol, requestId: int, kind: str, payload: bytes) -> None:
        """
        A request arrived; answer it with C{link.sendResponse(requestId, ...)}
        (or on another link to the same peer).
        """

    def peerResponseReceived(link: PeerProtocol, requestId: int, status: ResponseStatus, payload: bytes) -> None:
        """
        The answer to a request this node sent.
        """

    def peerLinkLost(link: PeerProtocol, reason: str) -> None:
        """
        A link that had connected closed, established or not; C{reason}
        says why (and C{link.closeCode} when a peer or this node gave one).
        """


def _newSession() -> bytes:
    return os.urandom(SESSION_BYTES)


class PeerTraffic:
    """
    Bytes that went over every link of one node, both ways, since it
    started (links that closed included): what the mesh costs, for
    C{timtx_cluster_peer_bytes_total} and the benchmarks.  Counted as the
    link hands bytes to its transport and as they arrive, so TLS adds its
    own overhead on top.

    @ivar sent: bytes written to links.
    @ivar received: bytes read from links.
    """

    __slots__ = ("sent", "received")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


@dataclass(frozen=True)
class PeerSettings:
    """
    What every link of one node shares.

    @ivar nodeId: this node's id.
    @ivar secret: the cluster secret.
    @ivar session: identifies this run of the node to its peers, so a peer
        can tell a restart from a second link.
    @ivar traffic: the bytes its links carried (mutable, shared by them).
    """

    nodeId: str
    secret: bytes
    maxFrameBytes: int = DEFAULT_MAX_FRAME_BYTES
    maxOutputBytes: int = 64 << 20
    handshakeTimeout: float = 5.0
    linkTimeout: float = 10.0
    features: tuple[str, ...] = ()
    session: bytes = field(default_factory=_newSession)
    traffic: PeerTraffic = field(default_factory=PeerTraffic, compare=False)


@dataclass(frozen=True)
class LinkLimits:
    """
    The limits of one peer link (see C{[cluster]} in
    C{docs/configuration.md}).

    @ivar maxFrameBytes: the largest frame once authenticated (4 KiB
        before).
    @ivar maxOutputBytes: bytes that may wait for a peer that stopped
        reading before the link is dropped.
    @ivar handshakeTimeout: seconds to complete the handshake.
    @ivar linkTimeout: seconds without input while output waits before a
        PING, and as long again before the link is closed.
    """

    maxFrameBytes: int
    maxOutputBytes: int
    handshakeTimeout: float
    linkTimeout: float


class PeerProtocol(Protocol):
    """
    One peer link.  Set by the factory: C{handler}, C{settings}, C{clock},
    C{initiator}.

    @ivar peerId: the peer's node id once established, else C{None}.
    @ivar peerSession: the peer's session id once established.
    @ivar linkId: an id both ends give this link (a hash of the handshake).
    @ivar version: the protocol version in use once established.
    @ivar features: the features both ends offered.
    @ivar established: whether the handshake completed.
    @ivar closeCode: why the link closed, if a code was given.
    @ivar closeReason: why the link closed, in words.
    @ivar congested: whether the transport asked us to stop writing.
    @ivar backlog: bytes written since the link became congested.
    """

    logger = Logger()

    #: Largest frame accepted once authenticated; C{None}: the settings'.
    maxFrameBytes: int | None = None
    #: Bytes that may wait for a slow peer; C{None}: the settings'.
    maxOutputBytes: int | None = None
    #: Seconds to complete the handshake; C{None}: the settings'.
    handshakeTimeout: float | None = None
    #: Seconds without input while output waits; C{None}: the settings'.
    linkTimeout: float | None = None

    transport: Any
    handler: IPeerHandler
    settings: PeerSettings
    limits: LinkLimits
    clock: IReactorTime
    initiator: bool = False

    peerId: str | None = None
    peerSession: bytes | None = None
    linkId: bytes = b""
    version: int | None = None
    features: frozenset[str] = frozenset()
    established = False
    closeCode: int | None = None
    closeReason: str | None = None
    congested = False
    backlog = 0

    _conn: PeerConnection | None = None
    _handshakeTimer: IDelayedCall | None = None
    _livenessTimer: IDelayedCall | None = None
    _received = False
    _pinged = False
    _closing = False

    def linkLimits(self) -> LinkLimits:
        """
        The limits of a new link: each class attribute above that is set,
        else the factory's settings.  Override to decide them per link.
        """
        settings = self.settings

        def chosen(mine: Any, default: Any) -> Any:
            return default if mine is None else mine

        return LinkLimits(
            maxFrameBytes=chosen(self.maxFrameBytes, settings.maxFrameBytes),
            maxOutputBytes=chosen(self.maxOutputBytes, settings.maxOutputBytes),
            handshakeTimeout=chosen(self.handshakeTimeout, settings.handshakeTimeout),
            linkTimeout=chosen(self.linkTimeout, settings.linkTimeout),
        )

    # Connection events.

    def connectionMade(self) -> None:
        settings = self.settings
        self.limits = self.linkLimits()
        self._conn = PeerConnection(
            settings.nodeId,
            settings.secret,
            initiator=self.initiator,
            maxFrameBytes=self.limits.maxFrameBytes,
            features=settings.features,
            session=settings.session,
        )
        sendSmallWritesAtOnce(self.transport)
        self.transport.registerProducer(self, True)
        self._handshakeTimer = self.clock.callLater(self.limits.handshakeTimeout, self._handshakeExpired)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or self._closing:
            return
        self._received = True
        self._pinged = False
        self.settings.traffic.received += len(data)
        conn.receiveData(data)
        while not self._closing:
            try:
                event = conn.nextEvent()
            except PeerProtocolError as e:
                self._flush()
                self.protocolError(e)
                return
            if event is None:
                break
            self._handle(event)
        self._flush()

    def _handle(self, event: object) -> None:
        if isinstance(event, MessageReceived):
            self.handler.peerMessageReceived(self, event.kind, event.payload)
        elif isinstance(event, RequestReceived):
            self.handler.peerRequestReceived(self, event.requestId, event.kind, event.payload)
        elif isinstance(event, ResponseReceived):
            self.handler.peerResponseReceived(self, event.requestId, event.status, event.payload)
        elif isinstance(event, PingReceived):
            assert self._conn is not None
            self._conn.sendPong(event.data)
        elif isinstance(event, Established):
            self._cancel("_handshakeTimer")
            self.peerId = event.peerId
            self.peerSession = event.session
            self.linkId = event.linkId
            self.version = event.version
            self.features = event.features
            self.established = True
            self.handler.peerEstablished(self)
        elif isinstance(event, CloseReceived):
            self.closeCode = event.code
            self.closeReason = f"{self._who()} closed the link ({closeCodeName(event.code)}): {event.reason}"
            self.logger.info("{reason}", reason=self.closeReason)
            self._loseTransport()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        self._cancel("_handshakeTimer")
        self._cancel("_livenessTimer")
        if self.closeReason is None:
            self.closeReason = "connection lost" if reason is None else f"connection lost: {reason.getErrorMessage()}"
        self.handler.peerLinkLost(self, self.closeReason)

    # Sending.

    def sendMessage(self, kind: str, payload: bytes) -> bool:
        """
        Send a one-way message.

        @return: whether it was written (not if the link is closing).
        """
        return self._send(lambda conn: conn.sendMessage(kind, payload))

    def sendRequest(self, requestId: int, kind: str, payload: bytes) -> bool:
        return self._send(lambda conn: conn.sendRequest(requestId, kind, payload))

    def sendResponse(self, requestId: int, status: ResponseStatus, payload: bytes = b"") -> bool:
        return self._send(lambda conn: conn.sendResponse(requestId, status, payload))

    def _send(self, queue: Any) -> bool:
        conn = self._conn
        if self._closing or conn is None or conn.state is not PeerState.ESTABLISHED:
            return False
        queue(conn)
        return self._flush()

    def close(self, code: CloseCode, reason: str) -> None:
        """
        Tell the peer why, then close the link after what was written.
        """
        if self._closing:
            return
        if self.closeReason is None:
            self.closeCode = code
            self.closeReason = f"closed by this node ({closeCodeName(code)}): {reason}"
        if self._conn is not None:
            self._conn.close(code, reason)
            self._flush()
        self._loseTransport()

    def _flush(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        parts = conn.dataToSend()
        if not parts or self._closing:
            return not self._closing
        size = sum(map(len, parts))
        if self.congested:
            self.backlog += size
            if self.backlog > self.limits.maxOutputBytes:
                self.outputLimitExceeded(self.backlog)
                return False
        self.settings.traffic.sent += size
        self.transport.writeSequence(parts)
        if self._livenessTimer is None and conn.state is PeerState.ESTABLISHED:
            self._received = False
            self._livenessTimer = self.clock.callLater(self.limits.linkTimeout, self._livenessCheck)
        return True

    # Limits and their hooks.

    def protocolError(self, error: PeerProtocolError) -> None:
        """
        The peer broke the protocol, sent an oversize frame or failed to
        authenticate; the CLOSE saying why is already written.  Logs it and
        closes the link.
        """
        self.closeCode = error.code
        self.closeReason = f"refused {self._who()}: {error}"
        self.logger.warn("{reason}", reason=self.closeReason)
        self._loseTransport()

    def outputLimitExceeded(self, backlog: int) -> None:
        """
        More than C{maxOutputBytes} wait for a peer that does not read.
        Logs it and drops the link at once (its buffers are freed).
        """
        self.closeCode = CloseCode.OVERLOADED
        self.closeReason = f"dropped {self._who()}: {backlog} bytes unread, over {self.limits.maxOutputBytes}"
        self.logger.warn("{reason}", reason=self.closeReason)
        self._closing = True
        self.transport.abortConnection()

    def handshakeTimedOut(self) -> None:
        """
        The handshake took longer than C{handshakeTimeout}.
        """
        seconds = self.limits.handshakeTimeout
        self.logger.info("handshake with {who} timed out after {seconds}s", who=self._who(), seconds=seconds)
        self.close(CloseCode.HANDSHAKE_TIMEOUT, f"no handshake within {seconds:g}s")

    def notResponding(self) -> None:
        """
        Nothing came back for two link timeouts while output waited, not
        even the answer to a PING.
        """
        seconds = self.limits.linkTimeout
        self.logger.info("{who} stopped answering for {seconds}s", who=self._who(), seconds=2 * seconds)
        self.close(CloseCode.NOT_RESPONDING, f"nothing received for {2 * seconds:g}s")
        self.transport.abortConnection()

    def _handshakeExpired(self) -> None:
        self._handshakeTimer = None
        if not self.established and not self._closing:
            self.handshakeTimedOut()

    def _livenessCheck(self) -> None:
        self._livenessTimer = None
        if self._closing or self._conn is None:
            return
        if self._received:
            return
        if self._pinged:
            self.notResponding()
            return
        self._pinged = True
        self._conn.sendPing(b"alive?")
        self._flush()
        if self._livenessTimer is None:
            self._livenessTimer = self.clock.callLater(self.limits.linkTimeout, self._livenessCheck)

    # Producer: the transport tells us when its buffer is full.

    def pauseProducing(self) -> None:
        self.congested = True

    def resumeProducing(self) -> None:
        self.congested = False
        self.backlog = 0

    def stopProducing(self) -> None:
        pass

    # Helpers.

    def _who(self) -> str:
        if self.peerId is not None:
            return f"node {self.peerId}"
        transport = getattr(self, "transport", None)
        peer = transport.getPeer() if transport is not None else None
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        return f"peer {host}:{port}" if host is not None else "peer"

    def _loseTransport(self) -> None:
        if not self._closing:
            self._closing = True
            # TLS closes only once no producer is registered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            setattr(self, name, None)
            if call.active():
                call.cancel()


class PeerFactory(Factory):
    """
    Builds L{PeerProtocol}s (or a registered subclass) for one role: a
    listening node's links are responders, a dialling node's initiators.
    """

    def __init__(
        self,
        handler: IPeerHandler,
        settings: PeerSettings,
        clock: IReactorTime,
        *,
        initiator: bool,
        protocol: type[PeerProtocol] = PeerProtocol,
    ):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.initiator = initiator
        self.peerProtocol = protocol

    def buildProtocol(self, addr: Any) -> PeerProtocol:
        link = self.peerProtocol()
        link.factory = self
        link.handler = self.handler
        link.settings = self.settings
        link.clock = self.clock
        link.initiator = self.initiator
        return link


class PeerTLS:
    """
    Mutual TLS between the nodes of a cluster: each presents a certificate
    issued by the cluster CA and accepts only peers that do.

    @ivar certificate: this node's certificate and key.
    @ivar authority: the cluster CA's certificate.
    """

    def __init__(self, certificate: Any, authority: Any):
        self.certificate = certificate
        self.authority = authority

    @classmethod
    def fromFiles(cls, certPath: str, keyPath: str, caPath: str) -> PeerTLS:
        """
        Load PEM files.

        @raise OSError: if a file cannot be read.
        @raise ValueError: if a file holds no usable certificate or key.
        """
        from twisted.internet.ssl import Certificate, PrivateCertificate

        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        try:
            certificate = PrivateCertificate.loadPEM(read(certPath) + b"\n" + read(keyPath))
            authority = Certificate.loadPEM(read(caPath))
        except OSError:
            raise
        except Exception as e:
            raise ValueError(f"not a PEM certificate and key ({e})") from None
        return cls(certificate, authority)

    def serverOptions(self) -> Any:
        """
        For a listening node: present this node's certificate, require one
        from the peer and check the CA issued it.
        """
        return self.certificate.options(self.authority)

    def clientOptions(self, hostname: str) -> Any:
        """
        For a dialling node: present this node's certificate and check the
        peer's names C{hostname} (a DNS name or an IP address).
        """
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname, trustRoot=self.authority, clientCertificate=self.certificate)

    def wrapServerFactory(self, factory: IProtocolFactory) -> IProtocolFactory:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(self.serverOptions(), False, factory)

    def wrapClientEndpoint(self, endpoint: IStreamClientEndpoint, hostname: str) -> IStreamClientEndpoint:
        from twisted.internet.endpoints import wrapClientTLS

        return wrapClientTLS(self.clientOptions(hostname), endpoint)
