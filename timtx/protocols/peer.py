# -*- test-case-name: timtx.test.test_peerwire -*-
"""
The peer protocol between timtx nodes, without I/O: bytes in, events out,
bytes to send.

Encoding: a compact binary layout defined here (big-endian integers,
length-prefixed strings), the same in every version's handshake so that
two versions can always tell each other what they speak.  What the
application sends (L{PeerConnection.sendMessage} and friends) is opaque
bytes under a short ASCII I{kind}; membership messages are one such kind
(L{timtx.cluster.swim} encodes them).

Every frame::

    [4-byte length L][1-byte type][body]                 before authentication
    [4-byte length L][1-byte type][body][16-byte tag]    after it

L counts everything after itself.  Before authentication a frame may hold at
most L{HANDSHAKE_MAX_FRAME_BYTES}, so a stranger cannot make a node buffer
much; after it, the configured maximum applies.

Theory of operation: both ends send L{FrameType.HELLO} as soon as the
connection opens: a magic string, the range of versions they speak, their
role (the end that dialled is the I{initiator}), a fresh random 32-byte
nonce, a per-process session id, their node id and the features they offer.
Each end then picks the highest version both speak (or refuses with
L{CloseCode.UNSUPPORTED_VERSION} and a reason that names both ranges) and
sends L{FrameType.AUTH}: HMAC-SHA256 under the cluster secret over a label
naming its role and the version, and the SHA-256 of both HELLO bodies
(initiator's first).  Each checks the other's tag in constant time.  A tag
covers both nonces, so a recorded handshake replayed later fails against the
fresh nonce of the end it is replayed to; the role label keeps one end's tag
from being reflected back as the other's; the node ids are inside the
HELLOs, so a tag cannot be reused for another node.  A node also refuses a
HELLO carrying its own node id (a connection to itself, or a reflection).

Once both tags check, every later frame in each direction carries a 16-byte
tag: HMAC-SHA256 truncated to 128 bits, keyed per direction with keys derived
from the secret and the handshake, over an implicit 64-bit frame counter, the
type and the body.  Frames cannot be injected, altered, replayed, reordered
or dropped without the link closing.  The traffic is not encrypted: without
TLS under it, anyone on the path can read it.

Versioning: this is version 1.  Frame types from L{EXTENSION_TYPES} up are
ignored when unknown (after their tag is checked), so an end may add such
frames under a negotiated feature without a new version; an unknown type
below it is a protocol error.  HELLO bodies may grow at the end: fields after
the ones defined here are ignored but covered by the AUTH tags.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Iterable, NoReturn

from timtx.protocols.errors import FrameTooLarge
from timtx.protocols.frames import LengthPrefixedDecoder

#: The version this module speaks.
PROTOCOL_VERSION = 1
#: The first bytes of every HELLO body.
MAGIC = b"TIMTX-PEER"
#: The largest frame accepted before the peer has authenticated.
HANDSHAKE_MAX_FRAME_BYTES = 4096
#: The default largest frame once authenticated.
DEFAULT_MAX_FRAME_BYTES = 32 << 20
#: Bytes of the random nonce in a HELLO.
NONCE_BYTES = 32
#: Bytes of the session id in a HELLO: the same for every link of one run of
#: a node, so a peer can tell a restart from a second link.
SESSION_BYTES = 8
#: Bytes of the tag on each authenticated frame.
TAG_BYTES = 16
#: The shortest cluster secret accepted, in bytes.
MIN_SECRET_BYTES = 16
#: The longest reason carried by a CLOSE frame, in bytes of UTF-8.
MAX_REASON_BYTES = 512
#: The longest PING or PONG body.
MAX_PING_BYTES = 64
#: Frame types from this value up are extensions, ignored when unknown.
EXTENSION_TYPES = 0x40

#: Node ids: 1 to 64 characters of letters, digits, C{.}, C{_} and C{-}.
NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: Message kinds and feature names: 1 to 64 such characters.
KIND_PATTERN = NODE_ID_PATTERN

_LENGTH = struct.Struct(">I")
_HELLO_HEAD = struct.Struct(f">{len(MAGIC)}sHHB{NONCE_BYTES}s{SESSION_BYTES}s")
_COUNTER = struct.Struct(">Q")
_REQUEST_ID = struct.Struct(">I")
_CODE = struct.Struct(">H")

#: The largest request id; ids wrap around within 32 bits.
MAX_REQUEST_ID = 0xFFFFFFFF


class FrameType(IntEnum):
    HELLO = 0x01
    AUTH = 0x02
    #: A reason for closing: C{[2-byte code][UTF-8 text]}.
    CLOSE = 0x03
    #: Liveness check; answered with PONG carrying the same bytes.
    PING = 0x04
    PONG = 0x05
    #: One-way: C{[1-byte kind length][kind][payload]}.
    MESSAGE = 0x10
    #: C{[4-byte request id][1-byte kind length][kind][payload]}.
    REQUEST = 0x11
    #: C{[4-byte request id][1-byte status][payload]}.
    RESPONSE = 0x12


class CloseCode(IntEnum):
    """
    Why a link was closed, as carried by a CLOSE frame.
    """

    NORMAL = 1
    PROTOCOL_ERROR = 2
    UNSUPPORTED_VERSION = 3
    AUTHENTICATION_FAILED = 4
    FRAME_TOO_LARGE = 5
    DUPLICATE_LINK = 6
    SELF_CONNECTION = 7
    HANDSHAKE_TIMEOUT = 8
    OVERLOADED = 9
    NOT_RESPONDING = 10
    SHUTTING_DOWN = 11


class ResponseStatus(IntEnum):
    """
    The outcome carried by a RESPONSE frame.
    """

    OK = 0
    #: The handler failed; the payload is a short UTF-8 reason.
    ERROR = 1
    #: No handler for the request's kind.
    UNKNOWN_KIND = 2
    #: The responder has too many requests from this node in progress.
    BUSY = 3


class Role(IntEnum):
    INITIATOR = 0
    RESPONDER = 1


class PeerState(Enum):
    AWAITING_HELLO = "awaiting-hello"
    AWAITING_AUTH = "awaiting-auth"
    ESTABLISHED = "established"
    CLOSED = "closed"


class PeerProtocolError(Exception):
    """
    The peer sent something this end will not accept; the link must close.

    @ivar code: the L{CloseCode} sent to the peer.
    @ivar reason: a short text for the peer and the log; never a traceback.
    """

    def __init__(self, code: CloseCode, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name.lower().replace('_', ' ')}: {self.reason}"


# Events.


@dataclass(frozen=True, slots=True)
class Established:
    """
    Both ends have proved they hold the cluster secret.

    @ivar peerId: the peer's node id, as authenticated.
    @ivar version: the protocol version in use.
    @ivar features: the features both ends offered.
    @ivar session: the peer's session id (the same for each link of one run).
    """

    peerId: str
    version: int
    features: frozenset[str]
    session: bytes
    linkId: bytes = b""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RequestReceived:
    requestId: int
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    requestId: int
    status: ResponseStatus
    payload: bytes


@dataclass(frozen=True, slots=True)
class PingReceived:
    """
    The peer asks for a PONG with these bytes; L{PeerConnection} does not
    answer by itself, so the driver decides.
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """
    The peer is closing the link and says why.
    """

    code: int
    reason: str


Event = Established | MessageReceived | RequestReceived | ResponseReceived | PingReceived | PongReceived | CloseReceived


@dataclass(frozen=True, slots=True)
class Hello:
    """
    A decoded HELLO body.
    """

    minVersion: int
    maxVersion: int
    role: Role
    nonce: bytes
    session: bytes
    nodeId: str
    features: tuple[str, ...]


def encodeHello(hello: Hello) -> bytes:
    """
    The body of a HELLO frame.

    @raise ValueError: if a field cannot be encoded.
    """
    nodeId = hello.nodeId.encode("ascii")
    if len(hello.nonce) != NONCE_BYTES or len(hello.session) != SESSION_BYTES:
        raise ValueError("nonce or session of the wrong size")
    if len(hello.features) > 255:
        raise ValueError("too many features")
    parts = [
        _HELLO_HEAD.pack(MAGIC, hello.minVersion, hello.maxVersion, hello.role, hello.nonce, hello.session),
        bytes((len(nodeId),)),
        nodeId,
        bytes((len(hello.features),)),
    ]
    for feature in hello.features:
        name = feature.encode("ascii")
        parts += [bytes((len(name),)), name]
    return b"".join(parts)


def decodeHello(body: bytes) -> Hello:
    """
    @raise PeerProtocolError: if C{body} is not a HELLO.
    """
    if len(body) < len(MAGIC) or body[: len(MAGIC)] != MAGIC:
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, "not a timtx peer (bad HELLO magic)")
    reader = _Reader(body, "HELLO")
    _, minVersion, maxVersion, role, nonce, session = reader.unpack(_HELLO_HEAD)
    if role not in (Role.INITIATOR, Role.RESPONDER):
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, f"malformed HELLO: unknown role {role}")
    if minVersion > maxVersion or minVersion < 1:
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, f"malformed HELLO: version range {minVersion}-{maxVersion}")
    nodeId = reader.shortText()
    if not NODE_ID_PATTERN.match(nodeId):
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, "malformed HELLO: invalid node id")
    features = tuple(reader.shortText() for _ in range(reader.byte()))
    if not all(KIND_PATTERN.match(feature) for feature in features):
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, "malformed HELLO: invalid feature name")
    # Anything after this is a later version's field: ignored, but covered
    # by the AUTH tags because the whole body is.
    return Hello(minVersion, maxVersion, Role(role), nonce, session, nodeId, features)


class _Reader:
    """
    Reads fields from a frame body; running short is a protocol error
    naming the frame.
    """

    __slots__ = ("data", "offset", "end", "what")

    def __init__(self, data: bytes, what: str, offset: int = 0, end: int | None = None):
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end
        self.what = what

    def _short(self) -> PeerProtocolError:
        return PeerProtocolError(CloseCode.PROTOCOL_ERROR, f"malformed {self.what}: truncated")

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        if self.end - self.offset < layout.size:
            raise self._short()
        values = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return values

    def byte(self) -> int:
        if self.offset >= self.end:
            raise self._short()
        value = self.data[self.offset]
        self.offset += 1
        return value

    def shortText(self) -> str:
        size = self.byte()
        end = self.offset + size
        if end > self.end:
            raise self._short()
        raw = self.data[self.offset : end]
        self.offset = end
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, f"malformed {self.what}: non-ASCII name") from None

    def rest(self) -> bytes:
        return self.data[self.offset : self.end]


def _label(text: str, version: int) -> bytes:
    return f"timtx-peer/{version} {text}".encode("ascii")


def _transcript(initiatorHello: bytes, responderHello: bytes) -> bytes:
    return hashlib.sha256(
        _LENGTH.pack(len(initiatorHello)) + initiatorHello + _LENGTH.pack(len(responderHello)) + responderHello
    ).digest()


def authTag(secret: bytes, role: Role, version: int, initiatorHello: bytes, responderHello: bytes) -> bytes:
    """
    The AUTH tag the end playing C{role} sends, given both HELLO bodies.
    """
    label = _label(f"auth {role.name.lower()}", version)
    return hmac.digest(secret, label + _transcript(initiatorHello, responderHello), "sha256")


class PeerConnection:
    """
    One end of a peer link.

    Feed it received bytes with L{receiveData} and take events with
    L{nextEvent} until it returns C{None}; send with the C{send*} methods;
    write what L{dataToSend} returns.  The HELLO is ready to send as soon as
    the object exists.

    @ivar state: a L{PeerState}.
    @ivar peerId: the peer's node id once its HELLO arrived (authenticated
        only once L{state} is L{PeerState.ESTABLISHED}), else C{None}.
    @ivar linkId: once the peer's HELLO arrived, the SHA-256 of both HELLOs:
        the same at both ends and different for every link, so both can
        pick the same one of two links deterministically.
    @ivar closeCode: once closed, the L{CloseCode} (ours or the peer's).
    @ivar closeReason: once closed, why.
    """

    def __init__(
        self,
        nodeId: str,
        secret: bytes,
        *,
        initiator: bool,
        maxFrameBytes: int = DEFAULT_MAX_FRAME_BYTES,
        features: Iterable[str] = (),
        session: bytes | None = None,
        nonce: bytes | None = None,
        versions: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION),
    ):
        if not NODE_ID_PATTERN.match(nodeId):
            raise ValueError(f"invalid node id {nodeId!r}")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must have at least {MIN_SECRET_BYTES} bytes")
        features = tuple(features)
        for feature in features:
            if not KIND_PATTERN.match(feature):
                raise ValueError(f"invalid feature name {feature!r}")
        self.nodeId = nodeId
        self.role = Role.INITIATOR if initiator else Role.RESPONDER
        self.maxFrameBytes = maxFrameBytes
        self.versions = versions
        self.features = frozenset(features)
        self.state = PeerState.AWAITING_HELLO
        self.peerId: str | None = None
        self.peerSession: bytes | None = None
        self.version: int | None = None
        self.negotiatedFeatures: frozenset[str] = frozenset()
        self.linkId: bytes | None = None
        self.closeCode: int | None = None
        self.closeReason: str | None = None
        self._secret = secret
        self._decoder = LengthPrefixedDecoder(min(HANDSHAKE_MAX_FRAME_BYTES, maxFrameBytes))
        self._out: list[bytes] = []
        self._sendMac: hmac.HMAC | None = None
        self._receiveMac: hmac.HMAC | None = None
        self._sent = 0
        self._received = 0
        self._expectedTag: bytes | None = None
        self._receiveKey = b""
        self._hello = encodeHello(
            Hello(
                versions[0],
                versions[1],
                self.role,
                nonce if nonce is not None else os.urandom(NONCE_BYTES),
                session if session is not None else os.urandom(SESSION_BYTES),
                nodeId,
                features,
            )
        )
        self._emit(FrameType.HELLO, [self._hello])

    # Output.

    def dataToSend(self) -> list[bytes]:
        """
        The bytes to write, in order, since the last call.
        """
        out, self._out = self._out, []
        return out

    def _emit(self, frameType: int, body: list[bytes]) -> None:
        size = 1 + sum(map(len, body))
        mac = self._sendMac
        if mac is None:
            self._out += [_LENGTH.pack(size) + bytes((frameType,)), *body]
            return
        head = bytes((frameType,))
        h = mac.copy()
        h.update(_COUNTER.pack(self._sent))
        h.update(head)
        for part in body:
            h.update(part)
        self._sent += 1
        self._out += [_LENGTH.pack(size + TAG_BYTES) + head, *body, h.digest()[:TAG_BYTES]]

    def _requireEstablished(self) -> None:
        if self.state is not PeerState.ESTABLISHED:
            raise RuntimeError(f"cannot send on a link that is {self.state.value}")

    def sendMessage(self, kind: str, payload: bytes) -> None:
        """
        Queue a one-way message.

        @raise ValueError: for an invalid kind.
        @raise RuntimeError: if the link is not established.
        """
        self._requireEstablished()
        self._emit(FrameType.MESSAGE, [_kindHeader(kind), payload])

    def sendRequest(self, requestId: int, kind: str, payload: bytes) -> None:
        """
        Queue a request; the peer answers with a RESPONSE carrying
        C{requestId}.
        """
        self._requireEstablished()
        self._emit(FrameType.REQUEST, [_REQUEST_ID.pack(requestId) + _kindHeader(kind), payload])

    def sendResponse(self, requestId: int, status: ResponseStatus, payload: bytes = b"") -> None:
        self._requireEstablished()
        self._emit(FrameType.RESPONSE, [_REQUEST_ID.pack(requestId) + bytes((status,)), payload])

    def sendPing(self, data: bytes = b"") -> None:
        self._requireEstablished()
        if len(data) > MAX_PING_BYTES:
            raise ValueError(f"a PING carries at most {MAX_PING_BYTES} bytes")
        self._emit(FrameType.PING, [data])

    def sendPong(self, data: bytes) -> None:
        self._requireEstablished()
        self._emit(FrameType.PONG, [data[:MAX_PING_BYTES]])

    def close(self, code: CloseCode, reason: str) -> None:
        """
        Queue a CLOSE with C{reason} (unless already closed); nothing more
        is sent or received after it.
        """
        if self.state is PeerState.CLOSED:
            return
        self._emit(FrameType.CLOSE, [_CODE.pack(code) + _truncate(reason)])
        self._closed(code, reason)

    def _closed(self, code: int, reason: str) -> None:
        self.state = PeerState.CLOSED
        self.closeCode = code
        self.closeReason = reason

    # Input.

    def receiveData(self, data: bytes) -> None:
        """
        Buffer received bytes; L{nextEvent} parses them.
        """
        if self.state is not PeerState.CLOSED:
            self._decoder.feed(data)

    def nextEvent(self) -> Event | None:
        """
        The next event, or C{None} when more bytes are needed (or the link
        is closed).

        @raise PeerProtocolError: if the peer broke the protocol or failed
            to authenticate.  The link is then closed and L{dataToSend}
            holds a CLOSE saying why.
        """
        while self.state is not PeerState.CLOSED:
            try:
                frame = self._decoder.next_frame()
            except FrameTooLarge as e:
                limit = "the handshake limit" if self._receiveMac is None else "the limit"
                self._fail(CloseCode.FRAME_TOO_LARGE, f"frame of {e.size} bytes exceeds {limit} of {e.limit}")
            if frame is None:
                return None
            event = self._frameReceived(frame)
            if event is not None:
                return event
        return None

    def _fail(self, code: CloseCode, reason: str) -> NoReturn:
        error = PeerProtocolError(code, reason)
        self.close(code, reason)
        raise error

    def _frameReceived(self, frame: bytes) -> Event | None:
        if not frame:
            self._fail(CloseCode.PROTOCOL_ERROR, "empty frame")
        if self._receiveMac is not None:
            return self._authenticatedFrame(frame)
        frameType = frame[0]
        body = frame[1:]
        if frameType == FrameType.CLOSE:
            return self._closeReceived(body)
        if self.state is PeerState.AWAITING_HELLO:
            if frameType != FrameType.HELLO:
                self._fail(CloseCode.PROTOCOL_ERROR, "not a timtx peer (expected HELLO)")
            self._helloReceived(body)
            return None
        if frameType != FrameType.AUTH:
            self._fail(CloseCode.PROTOCOL_ERROR, f"expected AUTH, got frame type {frameType}")
        return self._authReceived(body)

    def _helloReceived(self, body: bytes) -> None:
        try:
            hello = decodeHello(body)
        except PeerProtocolError as e:
            self._fail(e.code, e.reason)
        if hello.role == self.role:
            self._fail(CloseCode.PROTOCOL_ERROR, f"both ends claim to be the {self.role.name.lower()}")
        if hello.nodeId == self.nodeId:
            self._fail(CloseCode.SELF_CONNECTION, f"connected to itself (node id {self.nodeId})")
        low = max(self.versions[0], hello.minVersion)
        high = min(self.versions[1], hello.maxVersion)
        if low > high:
            self._fail(
                CloseCode.UNSUPPORTED_VERSION,
                f"no common protocol version: this node speaks {self.versions[0]}-{self.versions[1]}, "
                f"node {hello.nodeId} speaks {hello.minVersion}-{hello.maxVersion}",
            )
        self.version = high
        self.peerId = hello.nodeId
        self.peerSession = hello.session
        self.negotiatedFeatures = self.features & frozenset(hello.features)
        if self.role is Role.INITIATOR:
            helloI, helloR = self._hello, body
        else:
            helloI, helloR = body, self._hello
        peerRole = Role.RESPONDER if self.role is Role.INITIATOR else Role.INITIATOR
        self._expectedTag = authTag(self._secret, peerRole, high, helloI, helloR)
        self._emit(FrameType.AUTH, [authTag(self._secret, self.role, high, helloI, helloR)])
        transcript = _transcript(helloI, helloR)
        self.linkId = transcript
        keys = {
            role: hmac.digest(self._secret, _label(f"frames from {role.name.lower()}", high) + transcript, "sha256")
            for role in Role
        }
        # Every frame after an end's AUTH carries a tag: ours from now on,
        # the peer's once its AUTH has been checked.
        self._sendMac = hmac.new(keys[self.role], digestmod=hashlib.sha256)
        self._receiveKey = keys[peerRole]
        self.state = PeerState.AWAITING_AUTH

    def _authReceived(self, body: bytes) -> Event:
        assert self._expectedTag is not None and self.peerId is not None and self.version is not None
        if not hmac.compare_digest(body, self._expectedTag):
            self._fail(CloseCode.AUTHENTICATION_FAILED, f"node {self.peerId} failed authentication (wrong secret?)")
        self._receiveMac = hmac.new(self._receiveKey, digestmod=hashlib.sha256)
        self._decoder.maxFrameBytes = self.maxFrameBytes
        self.state = PeerState.ESTABLISHED
        assert self.peerSession is not None and self.linkId is not None
        return Established(self.peerId, self.version, self.negotiatedFeatures, self.peerSession, self.linkId)

    def _authenticatedFrame(self, frame: bytes) -> Event | None:
        assert self._receiveMac is not None
        if len(frame) < 1 + TAG_BYTES:
            self._fail(CloseCode.PROTOCOL_ERROR, "frame too short for its tag")
        h = self._receiveMac.copy()
        h.update(_COUNTER.pack(self._received))
        h.update(memoryview(frame)[:-TAG_BYTES])
        if not hmac.compare_digest(h.digest()[:TAG_BYTES], frame[-TAG_BYTES:]):
            self._fail(CloseCode.AUTHENTICATION_FAILED, "frame with a bad tag (altered, replayed or out of order)")
        self._received += 1
        frameType = frame[0]
        end = len(frame) - TAG_BYTES
        if frameType == FrameType.MESSAGE:
            reader = _Reader(frame, "MESSAGE", 1, end)
            kind = _readKind(reader)
            return MessageReceived(kind, reader.rest())
        if frameType == FrameType.REQUEST:
            reader = _Reader(frame, "REQUEST", 1, end)
            (requestId,) = reader.unpack(_REQUEST_ID)
            kind = _readKind(reader)
            return RequestReceived(requestId, kind, reader.rest())
        if frameType == FrameType.RESPONSE:
            reader = _Reader(frame, "RESPONSE", 1, end)
            (requestId,) = reader.unpack(_REQUEST_ID)
            status = reader.byte()
            if status not in ResponseStatus._value2member_map_:
                self._fail(CloseCode.PROTOCOL_ERROR, f"malformed RESPONSE: unknown status {status}")
            return ResponseReceived(requestId, ResponseStatus(status), reader.rest())
        body = frame[1:end]
        if frameType == FrameType.PING:
            if len(body) > MAX_PING_BYTES:
                self._fail(CloseCode.PROTOCOL_ERROR, "malformed PING: too long")
            return PingReceived(body)
        if frameType == FrameType.PONG:
            return PongReceived(body)
        if frameType == FrameType.CLOSE:
            return self._closeReceived(body)
        if frameType >= EXTENSION_TYPES:
            return None
        self._fail(CloseCode.PROTOCOL_ERROR, f"unknown frame type {frameType}")

    def _closeReceived(self, body: bytes) -> CloseReceived:
        reader = _Reader(body, "CLOSE")
        (code,) = reader.unpack(_CODE)
        reason = reader.rest()[:MAX_REASON_BYTES].decode("utf-8", "replace")
        self._closed(code, reason)
        return CloseReceived(code, reason)


def _kindHeader(kind: str) -> bytes:
    if not KIND_PATTERN.match(kind):
        raise ValueError(f"invalid message kind {kind!r}")
    return bytes((len(kind),)) + kind.encode("ascii")


def _readKind(reader: _Reader) -> str:
    kind = reader.shortText()
    if not KIND_PATTERN.match(kind):
        raise PeerProtocolError(CloseCode.PROTOCOL_ERROR, f"malformed {reader.what}: invalid kind")
    return kind


def _truncate(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_REASON_BYTES]


def closeCodeName(code: int) -> str:
    """
    A readable name for a CLOSE code, known or not.
    """
    try:
        return CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        return f"code {code}"
