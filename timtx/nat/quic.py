# -*- test-case-name: timtx.test.test_nat_quic -*-
"""
A reliable, ordered, congestion-controlled, encrypted channel over a punched
UDP path: QUIC (RFC 9000) from aioquic's sans-IO C{QuicConnection}, driven by
the path's L{NatSocket} and the reactor's C{callLater}; no asyncio loop.

An ordinary Twisted C{Protocol} runs over it unchanged: L{QuicChannel} gives
it an C{ITransport} (L{QuicStreamTransport}) on one bidirectional stream.

Trust (docs/nat.md): each node makes a self-signed certificate at start
(L{NodeCertificate}).  The punch responder, which becomes the QUIC server,
sends its certificate in the coordination exchange, authenticated with the
cluster secret; the client trusts exactly that certificate (it is the only
CA it is given).  The client proves itself in the first 32 bytes of the
stream: an HMAC, keyed with the punch session key (which only the two
members of that session know), over the server certificate's hash.  The
server hands nothing to its protocol before that checks out.

Liveness: the channel sends a QUIC PING every C{keepalive} seconds (under
any NAT's UDP timeout), and if nothing at all arrives from the peer for
C{consentTimeout} seconds it closes, and the protocol's C{connectionLost}
gets L{PathLost}: the mesh falls back to the relay.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from aioquic._buffer import Buffer  # aioquic.buffer re-exports it without __all__
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timtx.nat.punch import PunchedPath
from timtx.nat.stun import Address

ALPN = "timtx-peer/1"
#: The name in every node certificate; the client checks the server's
#: certificate against it and against the one certificate it trusts.
SERVER_NAME = "timtx-node"
_AUTH_BYTES = 32
#: QUIC application error codes.
ERROR_NOT_AUTHENTICATED = 0x101
ERROR_PATH_LOST = 0x102


class PathLost(ConnectionLost):
    """
    The direct path stopped answering: nothing came back within the consent
    timeout.  The mesh should move the peer to the relay.
    """


class NotAuthenticated(ConnectionLost):
    """
    The peer failed the channel's authentication.
    """


@dataclass(frozen=True)
class NodeCertificate:
    """
    A node's QUIC identity: a self-signed EC P-256 certificate for
    L{SERVER_NAME}, made at start and never written to disk.
    """

    certificate: x509.Certificate
    privateKey: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, days: int = 30) -> NodeCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


def _clientProof(sessionKey: bytes, serverCertificate: bytes) -> bytes:
    digest = hashlib.sha256(serverCertificate).digest()
    return hmac.new(sessionKey, b"timtx quic client v1" + digest, hashlib.sha256).digest()


class _Connection(QuicConnection):
    """
    aioquic's connection, plus the one question it has no public answer to:
    has a stream's send buffer drained (for producer back-pressure)?
    """

    def sendDrained(self, streamId: int) -> bool:
        stream = self._streams.get(streamId)
        return stream is None or stream.sender.buffer_is_empty


@dataclass
class ChannelStats:
    datagramsIn: int = 0
    datagramsOut: int = 0
    pings: int = 0
    pingsAcknowledged: int = 0


@implementer(ITransport, IConsumer, IPushProducer)
class QuicStreamTransport:
    """
    The C{ITransport} a protocol sees: one QUIC stream.

    Back-pressure both ways: a registered producer is paused while more
    than L{QuicChannel.highWater} bytes written wait to be sent, and
    C{pauseProducing} holds incoming data (up to the stream's flow-control
    window, after which QUIC itself stops the sender).
    """

    #: How a peer link over it goes, for the members file.
    linkPath = "direct"

    def __init__(self, channel: QuicChannel):
        self._channel = channel
        #: The node the link must authenticate as, when the mesh knows.
        self.peerNodeId: str | None = None
        self.disconnecting = False
        self.producer: Any = None
        self._streaming = False

    # ITransport
    def write(self, data: bytes) -> None:
        if not self.disconnecting and data:
            self._channel._sendStream(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._channel._finish()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._channel.close(reason="aborted")

    def getPeer(self) -> IPv4Address | IPv6Address:
        return _twistedAddress(self._channel.peer)

    def getHost(self) -> IPv4Address | IPv6Address:
        return _twistedAddress(self._channel.path.socket.address)

    # IConsumer
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self._streaming = streaming
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # IPushProducer (the incoming side)
    def pauseProducing(self) -> None:
        self._channel._readPaused = True

    def resumeProducing(self) -> None:
        self._channel._readPaused = False
        self._channel._deliverHeld()

    def stopProducing(self) -> None:
        self.abortConnection()


def _twistedAddress(address: Address) -> IPv4Address | IPv6Address:
    if address.family == 6:
        return IPv6Address("UDP", address.host, address.port)
    return IPv4Address("UDP", address.host, address.port)


class QuicChannel:
    """
    One QUIC connection over a punched path, carrying one protocol.

    @ivar lost: fires with the reason (an exception: L{PathLost},
        C{ConnectionDone}...) once the channel is closed, whoever closed it.
    """

    log = Logger()
    #: Bytes written and not yet sent past which a registered producer is
    #: paused.
    highWater = 1 << 20
    #: Incoming bytes held while the protocol paused reading, past which
    #: the channel stops reading from the socket for this peer (QUIC flow
    #: control then stops the sender).
    maxHeldBytes = 4 << 20

    def __init__(
        self,
        path: PunchedPath,
        clock: IReactorTime,
        protocol: Any,
        configuration: QuicConfiguration,
        *,
        keepalive: float = 15.0,
        consentTimeout: float = 30.0,
        serverCertificate: bytes = b"",
    ):
        self.path = path
        self.peer = path.peer
        self.clock = clock
        self.protocol = protocol
        self.configuration = configuration
        self.keepalive = keepalive
        self.consentTimeout = consentTimeout
        self.stats = ChannelStats()
        self.ready: Deferred[Any] = Deferred()
        self.lost: Deferred[BaseException] = Deferred()
        self.transport = QuicStreamTransport(self)
        self._isClient = path.plan.initiator
        self._proof = _clientProof(path.plan.sessionKey, serverCertificate)
        self._conn: _Connection | None = None
        self._streamId: int | None = None
        self._authenticated = False
        self._pendingAuth = b""
        self._held: list[bytes] = []
        self._heldBytes = 0
        self._readPaused = False
        self._unsent = 0
        self._connected = False
        self._closed = False
        self._timer: IDelayedCall | None = None
        self._pingCall: IDelayedCall | None = None
        self._consentCall: IDelayedCall | None = None
        self._closeCall: IDelayedCall | None = None
        self._flushCall: IDelayedCall | None = None
        self._lastReceived = clock.seconds()
        self._pingId = 0
        self._closeReason: Failure | None = None
        path.socket.quicHandlers[self.peer] = self.datagramReceived

    # Driving aioquic.

    def start(self) -> None:
        """
        The client sends its Initial; the server waits for it.
        """
        if self._isClient:
            self._conn = _Connection(configuration=self.configuration)
            self._conn.connect((self.peer.host, self.peer.port), now=self.clock.seconds())
            self._transmit()
        self._scheduleConsent()

    def datagramReceived(self, data: bytes, source: Address) -> None:
        if self._closed:
            return
        now = self.clock.seconds()
        if self._conn is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=self.configuration.connection_id_length)
            except ValueError:
                return
            if header.packet_type is None or not header.destination_cid:
                return
            self._conn = _Connection(
                configuration=self.configuration, original_destination_connection_id=header.destination_cid
            )
        self.stats.datagramsIn += 1
        self._lastReceived = now
        self._conn.receive_datagram(data, (source.host, source.port), now=now)
        self._process()

    def _process(self) -> None:
        conn = self._conn
        if conn is None:
            return
        while True:
            event = conn.next_event()
            if event is None:
                break
            self._handle(event)
            if self._conn is None:
                return
        self._transmit()
        if self.transport.producer is not None and self._streaming() and self._streamId is not None:
            if self._unsent and conn.sendDrained(self._streamId):
                self._unsent = 0
                self.transport.producer.resumeProducing()

    def _streaming(self) -> bool:
        return bool(self.transport._streaming)

    def _transmit(self) -> None:
        conn = self._conn
        if conn is None:
            return
        now = self.clock.seconds()
        for data, _ in conn.datagrams_to_send(now=now):
            # Always the peer: the channel does not migrate.
            self.stats.datagramsOut += 1
            self.path.socket.send(data, self.peer)
        when = conn.get_timer()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if when is not None:
            self._timer = self.clock.callLater(max(0.0, when - now), self._onTimer)

    def _onTimer(self) -> None:
        self._timer = None
        if self._conn is not None:
            self._conn.handle_timer(now=self.clock.seconds())
            self._process()

    def _handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self._onHandshake()
        elif isinstance(event, events.StreamDataReceived):
            self._onStreamData(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.PingAcknowledged):
            self.stats.pingsAcknowledged += 1
        elif isinstance(event, events.StreamReset):
            self._terminate(Failure(ConnectionLost("the peer reset the stream")))
        elif isinstance(event, events.ConnectionTerminated):
            self._onTerminated(event)

    def _onHandshake(self) -> None:
        assert self._conn is not None
        self._schedulePing()
        if self._isClient:
            self._streamId = self._conn.get_next_available_stream_id()
            self._conn.send_stream_data(self._streamId, self._proof)
            self._authenticated = True
            self._connect()

    def _onStreamData(self, streamId: int, data: bytes, end: bool) -> None:
        if self._streamId is None:
            self._streamId = streamId
        elif streamId != self._streamId:
            return  # one stream per channel; others are ignored
        if not self._authenticated:
            self._pendingAuth += data
            if len(self._pendingAuth) < _AUTH_BYTES:
                if end:
                    self.close(ERROR_NOT_AUTHENTICATED, "stream ended before authentication")
                return
            proof, data = self._pendingAuth[:_AUTH_BYTES], self._pendingAuth[_AUTH_BYTES:]
            self._pendingAuth = b""
            if not hmac.compare_digest(proof, self._proof):
                self.log.warn("QUIC client at {peer} failed authentication", peer=str(self.peer))
                self.close(ERROR_NOT_AUTHENTICATED, "not authenticated")
                return
            self._authenticated = True
            self._connect()
        if data:
            self._deliver(data)
        if end:
            # The peer's protocol closed its side: end ours and the channel.
            self._terminate(Failure(ConnectionDone("the peer closed the stream")))

    def _connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        self.protocol.makeConnection(self.transport)
        self.ready.callback(self.protocol)

    def _deliver(self, data: bytes) -> None:
        if self._readPaused or self._held:
            self._held.append(data)
            self._heldBytes += len(data)
            if self._heldBytes > self.maxHeldBytes:
                self.close(ERROR_PATH_LOST, "receiver overrun")
            return
        self.protocol.dataReceived(data)

    def _deliverHeld(self) -> None:
        while self._held and not self._readPaused:
            data = self._held.pop(0)
            self._heldBytes -= len(data)
            self.protocol.dataReceived(data)

    def _sendStream(self, data: bytes, end: bool = False) -> None:
        conn = self._conn
        if conn is None or self._streamId is None or self._closed:
            return
        conn.send_stream_data(self._streamId, data, end_stream=end)
        self._unsent += len(data)
        # Coalesce: packets are built once per reactor iteration, so many
        # small writes share full-size datagrams, as TCP's buffer does.
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self._flush)
        producer = self.transport.producer
        if producer is not None and self._streaming() and self._unsent > self.highWater:
            if not conn.sendDrained(self._streamId):
                producer.pauseProducing()

    def _flush(self) -> None:
        self._flushCall = None
        self._transmit()

    def _finish(self) -> None:
        """
        The local protocol called C{loseConnection}: send FIN; the peer's
        channel closes the connection when its protocol has read it, and a
        timer closes it anyway if the peer says nothing.
        """
        self._sendStream(b"", end=True)
        self._closeCall = self.clock.callLater(self.consentTimeout, self.close, 0, "close timed out")

    # Liveness.

    def _schedulePing(self) -> None:
        self._pingCall = self.clock.callLater(self.keepalive, self._ping)

    def _ping(self) -> None:
        if self._closed or self._conn is None:
            return
        self._pingId += 1
        self.stats.pings += 1
        self._conn.send_ping(self._pingId)
        self._transmit()
        self._schedulePing()

    def _scheduleConsent(self) -> None:
        due = self._lastReceived + self.consentTimeout
        self._consentCall = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._checkConsent)

    def _checkConsent(self) -> None:
        if self._closed:
            return
        silent = self.clock.seconds() - self._lastReceived
        if silent >= self.consentTimeout:
            self.log.info("direct path to {peer} silent for {silent:.1f}s: closing", peer=str(self.peer), silent=silent)
            failure = Failure(PathLost(f"no packet from {self.peer} for {silent:.1f}s"))
            self.close(ERROR_PATH_LOST, "consent expired", failure)
        else:
            self._scheduleConsent()

    # Closing.

    def close(self, errorCode: int = 0, reason: str = "", failure: Failure | None = None) -> None:
        """
        Close the connection with a QUIC application error code; the
        protocol gets C{connectionLost} with C{failure}, or a reason made
        from the code.
        """
        if self._closed:
            return
        if self._conn is not None:
            self._conn.close(error_code=errorCode, reason_phrase=reason)
            self._transmit()
        if failure is None:
            failure = Failure(ConnectionDone(reason) if errorCode == 0 else ConnectionLost(reason))
        self._terminate(failure)

    def _onTerminated(self, event: events.ConnectionTerminated) -> None:
        if event.error_code == ERROR_NOT_AUTHENTICATED:
            failure = Failure(NotAuthenticated(event.reason_phrase))
        elif event.reason_phrase == "Idle timeout" or event.error_code == ERROR_PATH_LOST:
            failure = Failure(PathLost("QUIC idle timeout"))
        elif event.error_code == 0:
            failure = Failure(ConnectionDone(event.reason_phrase or "closed by the peer"))
        else:
            failure = Failure(ConnectionLost(f"QUIC error {event.error_code}: {event.reason_phrase}"))
        self._terminate(failure)

    def _terminate(self, failure: Failure) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn is not None and not isinstance(failure.value, PathLost):
            self._conn.close(error_code=0, reason_phrase="done")
            self._transmit()
        for call in (self._timer, self._pingCall, self._consentCall, self._closeCall, self._flushCall):
            if call is not None and call.active():
                call.cancel()
        if self.path.socket.quicHandlers.get(self.peer) == self.datagramReceived:
            del self.path.socket.quicHandlers[self.peer]
        self._conn = None
        if self._connected:
            self.protocol.connectionLost(failure)
        elif not self.ready.called:
            self.ready.errback(failure)
        self.lost.callback(failure.value if failure.value is not None else ConnectionLost())

    # Building.

    @classmethod
    def connect(
        cls,
        path: PunchedPath,
        factory: Factory,
        clock: IReactorTime,
        certificate: NodeCertificate,
        *,
        keepalive: float = 15.0,
        consentTimeout: float = 30.0,
    ) -> QuicChannel:
        """
        Open the channel over C{path}: the punch initiator as QUIC client
        (trusting only the certificate the responder sent), the responder
        as server with C{certificate}.  C{channel.ready} fires with the
        connected protocol built by C{factory}.
        """
        addr = _twistedAddress(path.peer)
        protocol = factory.buildProtocol(addr)
        if protocol is None:
            raise ValueError("the factory refused to build a protocol")
        configuration = QuicConfiguration(
            is_client=path.plan.initiator,
            alpn_protocols=[ALPN],
            idle_timeout=consentTimeout * 2,
        )
        if path.plan.initiator:
            if not path.plan.peerCertificate:
                raise ValueError("the responder sent no certificate")
            peer = x509.load_der_x509_certificate(path.plan.peerCertificate)
            configuration.server_name = SERVER_NAME
            configuration.cadata = peer.public_bytes(serialization.Encoding.PEM)
            serverCertificate = path.plan.peerCertificate
        else:
            configuration.certificate = certificate.certificate
            configuration.private_key = certificate.privateKey
            serverCertificate = certificate.der
        channel = cls(
            path,
            clock,
            protocol,
            configuration,
            keepalive=keepalive,
            consentTimeout=consentTimeout,
            serverCertificate=serverCertificate,
        )
        channel.start()
        return channel
