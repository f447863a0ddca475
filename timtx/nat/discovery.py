# -*- test-case-name: timtx.test.test_nat_server -*-
"""
NAT behaviour discovery (RFC 5780, adapted to cluster peers): what address
the node's socket has outside, whether its NAT keeps that address whatever
the destination (RFC 4787 endpoint-independent mapping, which hole punching
needs), and whether anyone can reach it unasked.

The tests run in an order that cannot disturb what they measure.  A Linux
NAT that receives a packet with no mapping records the flow anyway, and a
later outgoing packet on the same five-tuple must then take another port;
so the one probe expected to be dropped comes from an address the node never
sends to later:

 1. the socket asks server A for its mapped address M;
 2. a helper socket asks server B to send a response to M from B's alternate
    port (XOR-DIAL-BACK-ADDRESS).  The socket never sent anything to B's host:
    if it arrives, the NAT filters nothing (endpoint-independent filtering)
    and the node is reachable at M;
 3. the socket asks B for its mapped address: the same M means
    endpoint-independent mapping, another means endpoint-dependent;
 4. if the dial-back did not arrive, the socket asks A to answer from A's
    alternate port (CHANGE-REQUEST): arriving means address-dependent
    filtering, not arriving address-and-port-dependent.

With one server only steps 1 and 4 run: mapping stays unknown.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from timtx.nat.client import NatSocket, StunTimeout, StunTransactionError
from timtx.nat.stun import Address

log = Logger()


class Mapping(enum.Enum):
    """
    RFC 4787 mapping behaviour, as far as two servers can tell.
    """

    #: No NAT, or one that keeps the mapped address for every destination:
    #: a peer can be told the address and punch to it.
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    #: Address- or address-and-port-dependent (symmetric): the address a
    #: peer would need is unknowable in advance; stay on the relay.
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


class Filtering(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NatReport:
    """
    What discovery learned about one socket.

    @ivar local: the socket's own address (the source address routing picks
        towards the first server, with the socket's port).
    @ivar mapped: the address the first server saw, or C{None} if no server
        answered.
    @ivar reachable: a server's dial-back, from an address this socket had
        never sent to, arrived.
    """

    local: Address
    mapped: Address | None
    mapping: Mapping
    filtering: Filtering
    reachable: bool
    servers: tuple[Address, ...] = ()

    @property
    def behindNat(self) -> bool:
        return self.mapped is not None and self.mapped != self.local

    @property
    def punchable(self) -> bool:
        """
        Whether a peer can punch to L{mapped}: the mapping does not depend
        on the destination.
        """
        return self.mapped is not None and self.mapping is Mapping.ENDPOINT_INDEPENDENT


def localAddressToward(bound: Address, server: Address) -> Address:
    """
    The source address the kernel picks to reach C{server} from a socket
    bound to C{bound} (which may be the wildcard).  A connected UDP socket
    tells without sending anything.
    """
    if bound.host not in ("0.0.0.0", "::"):
        return bound
    family = socket.AF_INET6 if server.family == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((server.host, server.port))
        host = probe.getsockname()[0]
    return Address.of(host, bound.port)


@inlineCallbacks
def discover(
    reactor: Any,
    sock: NatSocket,
    servers: Sequence[Address],
    *,
    dialBackWait: float = 1.0,
    clock: IReactorTime | None = None,
) -> Any:
    """
    Learn C{sock}'s mapped address and its NAT's behaviour from
    C{servers} (cluster members running L{timtx.nat.server}; at least two
    for the mapping behaviour, reachability and filtering).

    @param reactor: provides C{listenUDP} for the short-lived helper
        socket, and is the clock unless C{clock} is given.
    @param dialBackWait: seconds to wait for the dial-back after the
        server confirmed it sent it.
    @return: a L{Deferred} firing with a L{NatReport}.  Servers that do not
        answer make the report say less (C{UNKNOWN}); it does not fail.
    """
    clock = clock or reactor
    if not servers:
        raise ValueError("discovery needs at least one server")
    first = servers[0]
    local = localAddressToward(sock.address, first)
    try:
        answer = yield sock.stun.request(first)
    except (StunTimeout, StunTransactionError) as e:
        log.info("NAT discovery: {server} did not answer ({error})", server=str(first), error=e)
        return NatReport(local, None, Mapping.UNKNOWN, Filtering.UNKNOWN, False, tuple(servers))
    mapped = answer.xorMappedAddress
    if mapped is None:
        return NatReport(local, None, Mapping.UNKNOWN, Filtering.UNKNOWN, False, tuple(servers))

    mapping = Mapping.UNKNOWN
    filtering = Filtering.UNKNOWN
    reachable = False
    if len(servers) > 1:
        second = servers[1]
        reachable = yield _dialBack(reactor, clock, sock, second, mapped, dialBackWait)
        if reachable:
            filtering = Filtering.ENDPOINT_INDEPENDENT
        try:
            answer = yield sock.stun.request(second)
        except (StunTimeout, StunTransactionError) as e:
            log.info("NAT discovery: {server} did not answer ({error})", server=str(second), error=e)
        else:
            again = answer.xorMappedAddress
            if again is not None:
                same = again == mapped
                mapping = Mapping.ENDPOINT_INDEPENDENT if same else Mapping.ENDPOINT_DEPENDENT
    if filtering is Filtering.UNKNOWN:
        try:
            yield sock.stun.request(first, changePort=True)
        except StunTimeout:
            filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
        except StunTransactionError:
            pass  # the server has no alternate port
        else:
            filtering = Filtering.ADDRESS_DEPENDENT
    return NatReport(local, mapped, mapping, filtering, reachable, tuple(servers))


@inlineCallbacks
def _dialBack(reactor: Any, clock: IReactorTime, sock: NatSocket, server: Address, target: Address, wait: float) -> Any:
    """
    Ask C{server}, from a fresh socket, to send to C{target} (C{sock}'s
    mapped address), and say whether C{sock} received it.
    """
    helper = NatSocket(clock, sock.stun.key, rto=sock.stun.rto, maxRto=sock.stun.maxRto, retransmissions=3)
    interface = "::" if server.family == 6 else "0.0.0.0"
    port = reactor.listenUDP(0, helper, interface=interface)
    txid = os.urandom(12)
    arrived: Deferred[Any] = sock.stun.expect(txid, wait * 10)
    try:
        try:
            yield helper.stun.request(server, dialBack=target, transactionId=txid)
        except (StunTimeout, StunTransactionError) as e:
            log.info("NAT discovery: no dial-back from {server} ({error})", server=str(server), error=e)
            arrived.cancel()
            return False
        if arrived.called:
            return True
        timer = clock.callLater(wait, arrived.cancel)
        try:
            yield arrived
        except Exception:
            return False
        if timer.active():
            timer.cancel()
        return True
    finally:
        if not arrived.called:
            arrived.cancel()
        arrived.addErrback(lambda _: None)
        yield port.stopListening()
