"""
A lean tim client for load generation.

L{timtx.client.TimClient} is convenient but builds an autobahn protocol, a
decoded L{timtx.client.Incoming} and a waiter scan per frame.  Ten thousand
of them on a core shared with the node would measure the generator.  Here:

  - L{WsFramer}: RFC 6455 framing by hand, sans-IO.  Client frames carry an
    all-zero masking key, which the server unmasks with the same XOR work as
    any other key; the generator then needs no per-byte work at all.
  - L{LeanConnection}: one Twisted protocol per connection.  It answers the
    server's ack bit at once (as tim clients do), decodes only TIMACKs, and
    hands every other frame to its C{role} undecoded.
  - L{findMarkers}: load messages carry C{~B<sender>.<seq>.<ns>~} in their
    text or body, which reads the same in Thrift compact and in JSON, so a
    receiver finds who sent what, and when, without decoding the struct.
  - L{Tim2}: registration and tokens over HTTP C{/tim2} through a pool of
    persistent connections (one TCP connection per request would leave tens
    of thousands of sockets in TIME_WAIT).
"""

from __future__ import annotations

import base64
import re
import struct
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from timtx.chat.loginwebhook import BytesProducer
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.frames import client_frame, parse_server_frame
from timtx.protocols.structs import TimAck, TimAuth, TimStruct
from timtx.transports.eager import writeNow

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

_ZERO_MASK = b"\0\0\0\0"
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def wsFrame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """
    One final client frame (masked, with a zero key) holding C{payload}.
    """
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0x80 | 126)) + _U16.pack(size)
    else:
        header = bytes((first, 0x80 | 127)) + _U64.pack(size)
    return header + _ZERO_MASK + payload


class WsFramer:
    """
    Splits the server's byte stream into WebSocket messages.

    @ivar maxMessage: the largest message accepted.
    """

    maxMessage = 1 << 26

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self._fragmentOpcode = OP_BINARY

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """
        @return: whole messages C{(opcode, payload)}, control frames
            included, in order.
        """
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        offset = 0
        end = len(buffer)
        while end - offset >= 2:
            first, second = buffer[offset], buffer[offset + 1]
            size = second & 0x7F
            start = offset + 2
            if size == 126:
                if end - start < 2:
                    break
                (size,) = _U16.unpack_from(buffer, start)
                start += 2
            elif size == 127:
                if end - start < 8:
                    break
                (size,) = _U64.unpack_from(buffer, start)
                start += 8
            if size > self.maxMessage:
                raise ValueError(f"WebSocket frame of {size} bytes")
            masked = second & 0x80
            if masked:
                if end - start < 4:
                    break
                mask = bytes(buffer[start : start + 4])
                start += 4
            if end - start < size:
                break
            payload = bytes(buffer[start : start + size])
            if masked:
                payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
            offset = start + size
            opcode = first & 0x0F
            fin = first & 0x80
            if opcode >= OP_CLOSE:
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                if self._fragments is None:
                    raise ValueError("continuation without a first fragment")
                self._fragments.append(payload)
                if fin:
                    out.append((self._fragmentOpcode, b"".join(self._fragments)))
                    self._fragments = None
            elif fin:
                out.append((opcode, payload))
            else:
                self._fragments = [payload]
                self._fragmentOpcode = opcode
        if offset:
            del buffer[:offset]
        return out


#: What load messages carry: sender index, sequence number, send time (ns).
MARKER = re.compile(rb"~B(\d+)\.(\d+)\.(\d+)~")


def marker(sender: int, seq: int, sentNs: int) -> str:
    return f"~B{sender}.{seq}.{sentNs}~"


def findMarkers(payload: bytes) -> list[tuple[int, int, int]]:
    """
    Every C{(sender, seq, sentNs)} in C{payload}: one for a message, several
    for a TimMessageList.
    """
    return [(int(a), int(b), int(c)) for a, b, c in MARKER.findall(payload)]


def padded(text: str, size: int) -> str:
    """
    C{text} padded with C{x} to C{size} characters (never cut).
    """
    return text + "x" * (size - len(text)) if size > len(text) else text


class ConnectionFailed(Exception):
    pass


class LeanConnection(Protocol):
    """
    One tim session over WebSocket.

    @ivar role: receives C{role.frameReceived(self, timType, payload,
        acked)} for every frame but TIMACK and TIMPING; C{acked} says whether
        the frame asked for (and got) an acknowledgement.
    @ivar index: the user index this connection belongs to.
    """

    ORIGIN = "https://github.com/donnie4w/tim"

    def __init__(self, role: Any, index: int, encoding: Encoding, hostport: str):
        self.role = role
        self.index = index
        self.encoding = encoding
        self.hostport = hostport
        self.uid: str | None = None
        self.opened: Deferred[LeanConnection] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.isOpen = False
        self._head = b""
        self._framer = WsFramer()
        #: The acknowledgements of the read being handled.
        self._acks: list[bytes] = []
        #: (timType answered, Deferred) of requests waiting for their TIMACK.
        self._ackWaiters: list[tuple[int, Deferred[TimAck]]] = []
        self.errors: list[TimAck] = []
        #: Per-connection scratch space for roles.
        self.state: Any = None

    # Transport.

    def connectionMade(self) -> None:
        key = base64.b64encode(self.index.to_bytes(16, "big")).decode("ascii")
        self.transport.write(  # type: ignore[union-attr]
            (
                f"GET /tim HTTP/1.1\r\nHost: {self.hostport}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: {self.ORIGIN}\r\n\r\n"
            ).encode("ascii")
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.isOpen:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.errback(ConnectionFailed(head.split(b"\r\n", 1)[0].decode("latin-1")))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.isOpen = True
            self.opened.callback(self)
            if not data:
                return
        acks: list[bytes] = []
        self._acks = acks
        for opcode, payload in self._framer.feed(data):
            if opcode == OP_BINARY or opcode == OP_TEXT:
                self._timFrame(payload)
            elif opcode == OP_PING:
                self.transport.write(wsFrame(payload, OP_PONG))  # type: ignore[union-attr]
            elif opcode == OP_CLOSE:
                self.transport.write(wsFrame(payload[:2], OP_CLOSE))  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
        if acks:
            # The acks of one read leave in one send, at once: the
            # generator's CPU is taken from the node it measures.
            writeNow(self.transport, b"".join(acks))

    def connectionLost(self, reason: Any = None) -> None:
        self.isOpen = False
        if not self.opened.called:
            self.opened.errback(ConnectionFailed(str(reason.value) if reason else "closed"))
        waiters, self._ackWaiters = self._ackWaiters, []
        for _, d in waiters:
            d.errback(ConnectionFailed("connection closed"))
        self.role.connectionLost(self)
        self.closed.callback(None)

    # tim frames.

    def _timFrame(self, data: bytes) -> None:
        first = data[0]
        if first & 0x80:
            # Acknowledged at the end of the read, as tim clients do:
            # [TIMACK][same 4 bytes].
            self._acks.append(wsFrame(b"\x0c" + data[1:5]))
            timType, payload, acked = first & 0x7F, data[5:], True
        else:
            timType, payload, acked = first, data[1:], False
        if timType == TimType.TIMACK:
            ack = codec.decode(TimAck, payload, self.encoding)
            for i, (answered, d) in enumerate(self._ackWaiters):
                if answered == ack.timType:
                    del self._ackWaiters[i]
                    d.callback(ack)
                    return
            if not ack.ok:
                self.errors.append(ack)
            self.role.ackReceived(self, ack)
        elif timType != TimType.TIMPING:
            self.role.frameReceived(self, timType, payload, acked)

    def sendRaw(self, frame: bytes) -> None:
        self.transport.write(wsFrame(frame))  # type: ignore[union-attr]

    def send(self, timType: int, body: TimStruct | None = None) -> None:
        payload = b"" if body is None else codec.encode(body, self.encoding)
        self.transport.write(wsFrame(client_frame(timType, payload, self.encoding)))  # type: ignore[union-attr]

    def request(self, timType: int, body: TimStruct | None, answered: int | None = None) -> Deferred[TimAck]:
        """
        Send a frame and wait for the TIMACK answering C{answered} (the
        frame's own type by default), ok or not.
        """
        d: Deferred[TimAck] = Deferred()
        self._ackWaiters.append((timType if answered is None else answered, d))
        self.send(timType, body)
        return d

    def login(self, name: str | None = None, pwd: str | None = None, token: int | None = None) -> Deferred[TimAck]:
        d = self.request(TimType.TIMAUTH, TimAuth(name=name, pwd=pwd, token=token, resource="bench", termtyp=1))

        def loggedIn(ack: TimAck) -> TimAck:
            if ack.ok:
                self.uid = ack.n
            return ack

        return d.addCallback(loggedIn)

    def close(self) -> Deferred[None]:
        if self.transport is not None and self.isOpen:
            self.transport.write(wsFrame(b"\x03\xe8", OP_CLOSE))  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
        return self.closed


class _Factory(ClientFactory):
    def __init__(self, connection: LeanConnection):
        self.connection = connection

    def buildProtocol(self, addr: Any) -> LeanConnection:
        return self.connection

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connection.opened.called:
            self.connection.opened.errback(ConnectionFailed(str(reason.value)))


def openConnection(
    reactor: Any, host: str, port: int, role: Any, index: int, encoding: Encoding
) -> Deferred[LeanConnection]:
    """
    Connect and finish the WebSocket handshake.
    """
    connection = LeanConnection(role, index, encoding, f"{host}:{port}")
    reactor.connectTCP(host, port, _Factory(connection), timeout=60)
    return connection.opened


class Tim2:
    """
    C{/tim2} requests over at most C{concurrency} persistent connections.
    """

    def __init__(self, reactor: Any, url: str, concurrency: int = 16):
        self.url = url.encode("ascii")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = concurrency
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool)
        self.limit = DeferredSemaphore(concurrency)

    def _post(self, timType: int, auth: TimAuth) -> Deferred[TimAck]:
        body = client_frame(timType, codec.encode_compact(auth))

        async def post() -> TimAck:
            response = await self.agent.request(
                b"POST", self.url, Headers({b"Content-Type": [b"application/octet-stream"]}), BytesProducer(body)
            )
            content = await readBody(response)
            if response.code != 200:
                raise ConnectionFailed(f"/tim2 answered HTTP {response.code}")
            return codec.decode(TimAck, parse_server_frame(content).payload, Encoding.COMPACT)

        return self.limit.run(lambda: Deferred.fromCoroutine(post()))

    def register(self, name: str, pwd: str) -> Deferred[TimAck]:
        return self._post(TimType.TIMREGISTER, TimAuth(name=name, pwd=pwd))

    def token(self, name: str, pwd: str) -> Deferred[TimAck]:
        return self._post(TimType.TIMTOKEN, TimAuth(name=name, pwd=pwd))

    def close(self) -> Deferred[Any]:
        return self.pool.closeCachedConnections()


def nowNs() -> int:
    return time.time_ns()


Callback = Callable[..., Any]
