# -*- test-case-name: timtx.test.test_nat_server -*-
"""
The STUN server every reachable node runs for its NAT'd peers.

It answers Binding requests with the address it saw them come from
(XOR-MAPPED-ADDRESS), from one of two sockets: the primary and an alternate
port, which RFC 5780's OTHER-ADDRESS names and CHANGE-REQUEST selects.  Only
cluster members get answers: a request must carry MESSAGE-INTEGRITY(-SHA256)
keyed from the cluster secret (L{timtx.nat.stun.clusterKey}); without it, or
with a wrong one, the requester gets error 401 and nothing else, and the
request is counted.  Every source address is rate limited, so the server
cannot be used to flood anyone: a response is never larger than a request
plus a few dozen bytes, and the dial-back (L{stun.Attr.XOR_DIAL_BACK_ADDRESS})
is only honoured for members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from timtx.nat import stun
from timtx.nat.stun import Address, MessageClass, StunError
from timtx.util.ratelimit import KeyedBuckets

#: Receive buffer per datagram: larger than any STUN message accepted.
MAX_DATAGRAM = 2048


@dataclass
class StunServerStats:
    """
    What a server did with the datagrams it received.
    """

    answered: int = 0
    #: Requests without integrity or with a wrong one: error 401, no answer.
    unauthorized: int = 0
    #: Datagrams that were not STUN or not well formed: dropped.
    malformed: int = 0
    #: Datagrams over the per-source rate: dropped.
    limited: int = 0
    #: Well-formed STUN that was not a Binding request: dropped.
    ignored: int = 0
    #: Requests refused with another error (420 unknown attribute, say).
    refused: int = 0
    dialBacks: int = 0


class StunResponder:
    """
    The logic shared by a server's primary and alternate sockets: checks,
    counters and rate limits.

    @ivar key: the cluster's short-term key; C{None} answers anyone (a
        public STUN server, for tests and for operators who want one).
    """

    log = Logger()
    software = "timtx"

    def __init__(
        self,
        clock: IReactorTime,
        key: bytes | None,
        *,
        rate: float = 20.0,
        burst: int = 40,
        maxSources: int = 10000,
    ):
        self.key = key
        self.stats = StunServerStats()
        self._buckets = KeyedBuckets(rate, burst, clock, maxKeys=maxSources)
        self.primary: StunServer | None = None
        self.alternate: StunServer | None = None

    def handle(self, data: bytes, source: Address, via: StunServer) -> None:
        """
        Answer one datagram that arrived on C{via}.
        """
        if not self._buckets.take(source.host):
            self.stats.limited += 1
            return
        try:
            request = stun.decode(data)
        except StunError:
            self.stats.malformed += 1
            return
        if request.messageClass is not MessageClass.REQUEST or request.method != stun.Method.BINDING:
            self.stats.ignored += 1
            return
        txid = request.transactionId
        integrity = request.integrity or stun.Integrity.SHA256
        if self.key is not None and not request.verify(self.key):
            self.stats.unauthorized += 1
            self.log.debug("STUN request without valid integrity from {source}", source=str(source))
            via.send(stun.bindingError(txid, 401, "Unauthorized", software=self.software), source)
            return
        key = self.key
        unknown = request.unknownRequired()
        if unknown:
            self.stats.refused += 1
            via.send(
                stun.bindingError(txid, 420, "Unknown Attribute", unknown=unknown, key=key, integrity=integrity), source
            )
            return
        change = request.changeRequest or (False, False)
        other = self._other(via)
        if any(change) and other is None:
            self.stats.refused += 1
            via.send(
                stun.bindingError(
                    txid, 420, "No alternate address", unknown=[stun.Attr.CHANGE_REQUEST], key=key, integrity=integrity
                ),
                source,
            )
            return
        sender = other if any(change) and other is not None else via
        response = stun.bindingSuccess(
            txid,
            source,
            key=key,
            integrity=integrity,
            other=other.address if other is not None else None,
            origin=sender.address,
            software=self.software,
        )
        dialBack = request.dialBackAddress
        if dialBack is not None and self.key is not None:
            # Sent from the socket the requester did not use, so the target
            # sees a source it never sent to (when it did not send to this
            # host at all, that tests endpoint-independent filtering).
            self.stats.dialBacks += 1
            (other or via).send(stun.bindingSuccess(txid, dialBack, key=key, integrity=integrity), dialBack)
        self.stats.answered += 1
        sender.send(response, source)

    def _other(self, via: StunServer) -> StunServer | None:
        if via is self.primary:
            return self.alternate
        return self.primary


class StunServer(DatagramProtocol):
    """
    One socket of a STUN server; see L{listenStun}.
    """

    def __init__(self, responder: StunResponder):
        self.responder = responder

    @property
    def address(self) -> Address:
        assert self.transport is not None, "not listening"
        host = self.transport.getHost()
        return Address.of(host.host, host.port)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        try:
            source = Address.of(addr[0], addr[1])
        except StunError:  # pragma: no cover: the kernel gives literals
            return
        self.responder.handle(data, source, self)

    def send(self, data: bytes, target: Address) -> None:
        assert self.transport is not None, "not listening"
        try:
            self.transport.write(data, (target.host, target.port))
        except OSError as e:  # unreachable or unroutable: the client retries
            self.responder.log.debug("STUN send to {target} failed: {error}", target=str(target), error=e)


@dataclass
class StunService:
    """
    A listening STUN server: its primary and alternate sockets.
    """

    responder: StunResponder
    ports: list[Any]

    @property
    def address(self) -> Address:
        assert self.responder.primary is not None
        return self.responder.primary.address

    @property
    def alternateAddress(self) -> Address | None:
        return self.responder.alternate.address if self.responder.alternate is not None else None

    def stopListening(self) -> Any:
        from twisted.internet.defer import gatherResults, maybeDeferred

        return gatherResults([maybeDeferred(port.stopListening) for port in self.ports])


def listenStun(
    reactor: IReactorUDP,
    clock: IReactorTime,
    key: bytes | None,
    *,
    port: int = 0,
    alternatePort: int | None = 0,
    interface: str = "",
    rate: float = 20.0,
    burst: int = 40,
) -> StunService:
    """
    Listen for STUN on C{interface}: C{port} and, unless C{alternatePort} is
    C{None}, a second port for CHANGE-REQUEST and dial-backs.  Port 0 picks
    a free one.
    """
    responder = StunResponder(clock, key, rate=rate, burst=burst)
    responder.primary = StunServer(responder)
    ports = [reactor.listenUDP(port, responder.primary, interface, MAX_DATAGRAM)]
    if alternatePort is not None:
        responder.alternate = StunServer(responder)
        try:
            ports.append(reactor.listenUDP(alternatePort, responder.alternate, interface, MAX_DATAGRAM))
        except BaseException:
            # Not half a server: the primary port closes too.
            ports[0].stopListening()
            raise
    return StunService(responder, ports)
