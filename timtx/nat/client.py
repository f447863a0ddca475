# -*- test-case-name: timtx.test.test_nat_server -*-
"""
STUN client transactions (RFC 8489 section 6.2.1) over a socket they are
handed, and L{NatSocket}: the one UDP socket a NAT'd node uses for STUN,
hole punching and the QUIC channel, since all three must share the NAT
mapping the node learned.

Retransmission follows the RFC: the first request, then again after RTO,
2*RTO, 4*RTO... (each interval capped at C{maxRto}) for C{retransmissions}
sends in all, then a final wait of C{finalWait} * RTO before the
transaction fails with L{StunTimeout}.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from timtx.nat import stun
from timtx.nat.stun import Address, Message, MessageClass, StunError


class StunTimeout(Exception):
    """
    A STUN transaction got no valid answer in time.
    """


class StunTransactionError(Exception):
    """
    The server answered with a STUN error response.
    """

    def __init__(self, code: int, reason: str):
        super().__init__(f"STUN error {code}: {reason}")
        self.code = code
        self.reason = reason


class _Transaction:
    __slots__ = ("server", "data", "deferred", "sends", "rto", "call", "anySource")

    def __init__(self, server: Address | None, data: bytes, deferred: Deferred[Any], rto: float, anySource: bool):
        self.server = server
        self.data = data
        self.deferred = deferred
        self.sends = 0
        self.rto = rto
        self.call: IDelayedCall | None = None
        self.anySource = anySource


@dataclass
class StunClientStats:
    requests: int = 0
    retransmissions: int = 0
    timeouts: int = 0
    #: Responses with no transaction, from the wrong source, or with bad
    #: integrity: ignored, the transaction keeps waiting.
    ignored: int = 0


class StunClient:
    """
    Client transactions: L{request} sends, L{handle} is fed every decoded
    STUN response the socket receives.

    @ivar key: the cluster's short-term key, added to every request and
        required on every response; C{None} for a public server.
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[bytes, Address], None],
        key: bytes | None,
        *,
        rto: float = 0.5,
        maxRto: float = 3.0,
        retransmissions: int = 7,
        finalWait: int = 16,
        maxPending: int = 64,
        username: str | None = None,
    ):
        self.clock = clock
        self.key = key
        self.rto = rto
        self.maxRto = maxRto
        self.retransmissions = retransmissions
        self.finalWait = finalWait
        self.maxPending = maxPending
        self.username = username
        self.stats = StunClientStats()
        self._send = send
        self._pending: dict[bytes, _Transaction] = {}

    def request(
        self,
        server: Address,
        *,
        changePort: bool = False,
        changeIp: bool = False,
        dialBack: Address | None = None,
        transactionId: bytes | None = None,
    ) -> Deferred[Message]:
        """
        Send a Binding request to C{server} and retransmit it until answered.

        @return: fires with the success response, or fails with
            L{StunTransactionError} for an error response or L{StunTimeout}.
        @raise StunError: if C{maxPending} transactions are already open.
        """
        if len(self._pending) >= self.maxPending:
            raise StunError(f"more than {self.maxPending} STUN transactions open")
        txid = transactionId or os.urandom(12)
        data = stun.bindingRequest(
            txid,
            key=self.key,
            username=self.username,
            changeIp=changeIp,
            changePort=changePort,
            dialBack=dialBack,
        )
        d: Deferred[Message] = Deferred(lambda _: self._cancel(txid))
        transaction = _Transaction(server, data, d, self.rto, False)
        self._pending[txid] = transaction
        self.stats.requests += 1
        self._transmit(txid, transaction)
        return d

    def expect(self, transactionId: bytes, timeout: float) -> Deferred[tuple[Message, Address]]:
        """
        Wait for an authenticated success response with C{transactionId}
        from any source: the dial-back a peer was asked to send to this
        socket by a request from another one.

        @return: fires with the response and its source, or fails with
            L{StunTimeout} after C{timeout} seconds.
        """
        d: Deferred[tuple[Message, Address]] = Deferred(lambda _: self._cancel(transactionId))
        transaction = _Transaction(None, b"", d, timeout, True)
        self._pending[transactionId] = transaction
        transaction.call = self.clock.callLater(timeout, self._timeout, transactionId)
        return d

    def _transmit(self, txid: bytes, transaction: _Transaction) -> None:
        assert transaction.server is not None
        transaction.sends += 1
        if transaction.sends > 1:
            self.stats.retransmissions += 1
        self._send(transaction.data, transaction.server)
        if transaction.sends >= self.retransmissions:
            # RFC 8489: Rm times the initial RTO after the last send.
            wait = min(self.rto, self.maxRto) * self.finalWait
            transaction.call = self.clock.callLater(wait, self._timeout, txid)
        else:
            wait = transaction.rto
            transaction.rto = min(transaction.rto * 2, self.maxRto)
            transaction.call = self.clock.callLater(wait, self._transmit, txid, transaction)

    def _timeout(self, txid: bytes) -> None:
        transaction = self._pending.pop(txid, None)
        if transaction is None:  # pragma: no cover: the call is cancelled on finish
            return
        self.stats.timeouts += 1
        transaction.call = None
        where = str(transaction.server) if transaction.server else "a dial-back"
        transaction.deferred.errback(StunTimeout(f"no STUN answer from {where}"))

    def _cancel(self, txid: bytes) -> None:
        self._finish(txid)

    def _finish(self, txid: bytes) -> _Transaction | None:
        transaction = self._pending.pop(txid, None)
        if transaction is not None and transaction.call is not None and transaction.call.active():
            transaction.call.cancel()
        return transaction

    def handle(self, message: Message, source: Address) -> bool:
        """
        Match a response to its transaction.

        @return: whether it belonged to one.
        """
        if message.messageClass not in (MessageClass.SUCCESS, MessageClass.ERROR):
            return False
        transaction = self._pending.get(message.transactionId)
        if transaction is None:
            self.stats.ignored += 1
            return False
        server = transaction.server
        if server is not None and source != server and (self.key is None or message.messageClass is MessageClass.ERROR):
            # A CHANGE-REQUEST answer comes from another port: with a key,
            # integrity (which covers the transaction id) vouches for it;
            # without one, it must at least come from the same host.
            if self.key is not None or source.host != server.host:
                self.stats.ignored += 1
                return False
        if self.key is not None and not message.verify(self.key):
            if message.messageClass is MessageClass.ERROR and message.errorCode and message.errorCode.code == 401:
                # The server could not check our integrity: a wrong secret.
                self._finish(message.transactionId)
                transaction.deferred.errback(StunTransactionError(401, "Unauthorized: is the cluster secret the same?"))
                return True
            self.stats.ignored += 1
            return False
        self._finish(message.transactionId)
        if message.messageClass is MessageClass.ERROR:
            error = message.errorCode or stun.ErrorCode(500, "no ERROR-CODE")
            transaction.deferred.errback(StunTransactionError(error.code, error.reason))
        elif transaction.anySource:
            transaction.deferred.callback((message, source))
        else:
            transaction.deferred.callback(message)
        return True

    def cancelAll(self) -> None:
        for txid in list(self._pending):
            transaction = self._finish(txid)
            if transaction is not None:
                transaction.deferred.errback(StunTimeout("socket closed"))


#: First bytes of timtx punch packets (L{timtx.nat.punch}): outside STUN's
#: 0-3 and QUIC's 64-255 (RFC 7983 / RFC 9443 demultiplexing).
PUNCH_FIRST_BYTES = frozenset({0x11, 0x12})


@dataclass
class NatSocketStats:
    received: int = 0
    #: Datagrams that were not STUN, punch or QUIC for a known peer.
    dropped: int = 0
    #: STUN datagrams that did not decode.
    malformed: int = 0


class NatSocket(DatagramProtocol):
    """
    The UDP socket a node uses towards NAT'd peers, demultiplexing by first
    byte: STUN responses to L{stun}'s client, punch packets to the punch
    session they name, QUIC packets to the channel of their source address.
    Anything else is counted and dropped.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, key: bytes | None, **stunOptions: Any):
        self.clock = clock
        self.stun = StunClient(clock, self.send, key, **stunOptions)
        self.stats = NatSocketStats()
        self.punchHandlers: dict[bytes, Callable[[bytes, Address], None]] = {}
        self.quicHandlers: dict[Address, Callable[[bytes, Address], None]] = {}
        self._sources: dict[Any, Address] = {}

    @property
    def address(self) -> Address:
        """
        The bound address (possibly 0.0.0.0).
        """
        host = self._udp().getHost()
        return Address.of(host.host, host.port)

    def _udp(self) -> Any:
        assert self.transport is not None, "not listening"
        return self.transport

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.stats.received += 1
        if not data:
            self.stats.dropped += 1
            return
        source = self._sources.get(addr)
        if source is None:
            # Parsing the address is a measurable part of a datagram's cost;
            # remember the few peers a node talks to.
            if len(self._sources) >= 1024:
                self._sources.clear()
            source = self._sources[addr] = Address.of(addr[0], addr[1])
        first = data[0]
        if first < 4:
            try:
                message = stun.decode(data)
            except StunError:
                self.stats.malformed += 1
                return
            if not self.stun.handle(message, source):
                self.stats.dropped += 1
        elif first in PUNCH_FIRST_BYTES:
            handler = self.punchHandlers.get(data[1:17])
            if handler is None:
                self.stats.dropped += 1
            else:
                handler(data, source)
        elif first & 0x40:
            quic = self.quicHandlers.get(source)
            if quic is None:
                self.stats.dropped += 1
            else:
                quic(data, source)
        else:
            self.stats.dropped += 1

    def send(self, data: bytes, target: Address) -> None:
        """
        Send a datagram, ignoring the errors a connectionless socket reports
        for earlier datagrams (ICMP unreachable); callers retransmit.
        """
        try:
            self._udp().write(data, (target.host, target.port))
        except OSError as e:
            self.log.debug("UDP send to {target} failed: {error}", target=str(target), error=e)

    @contextlib.contextmanager
    def hopLimit(self, hops: int) -> Iterator[None]:
        """
        Send with the IP TTL (IPv6 hop limit) set to C{hops}, then restore
        it: punch pre-open packets die between the two NATs (docs/nat.md).
        """
        sock = self._udp().getHandle()
        if sock.family == socket.AF_INET6:
            level, option = socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
        else:
            level, option = socket.IPPROTO_IP, socket.IP_TTL
        before = sock.getsockopt(level, option)
        sock.setsockopt(level, option, hops)
        try:
            yield
        finally:
            sock.setsockopt(level, option, before)

    def connectionRefused(self) -> None:  # pragma: no cover: unconnected socket
        pass

    def doStop(self) -> None:
        self.stun.cancelAll()
        super().doStop()
