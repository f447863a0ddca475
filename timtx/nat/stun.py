# -*- test-case-name: timtx.test.test_nat_stun -*-
"""
STUN messages (RFC 8489), sans-IO: bytes in, L{Message} out, and back.

No sockets, no clock, no Twisted.  L{decode} checks everything a peer could
get wrong (header, lengths, padding, attribute order, FINGERPRINT, address
families) and raises L{StunError} for all of it, never another exception, so
a server can drop a bad datagram with one C{except}.  Sizes are bounded
(L{MAX_MESSAGE_BYTES}, L{MAX_ATTRIBUTES}) because every byte comes from an
unauthenticated UDP source.

Integrity is checked separately (L{Message.verify}) because the key depends
on who the message claims to be from: cluster nodes share one short-term key
derived from the cluster secret (L{clusterKey}).

Beyond RFC 8489 this module knows RFC 5780's OTHER-ADDRESS, RESPONSE-ORIGIN
and CHANGE-REQUEST, and one timtx attribute, XOR-DIAL-BACK-ADDRESS: "also
send this response to that address", which lets a node learn whether it can
be reached from an address it never sent to (docs/nat.md).  A server acts on
it only for requests with valid integrity, that is from cluster members.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_BYTES = 20
#: Largest message accepted or built.  STUN over UDP must fit one datagram
#: without fragmentation (RFC 8489 section 6.1: 576 bytes for IPv4 unless
#: the path MTU is known); 1280 is IPv6's minimum MTU less headers' room.
MAX_MESSAGE_BYTES = 1280
#: Most attributes in one message; a binding needs fewer than ten.
MAX_ATTRIBUTES = 32
_FINGERPRINT_XOR = 0x5354554E


class StunError(Exception):
    """
    A STUN message is malformed, or cannot be built as asked.  The only
    exception L{decode} raises.
    """


class MessageClass(enum.IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(enum.IntEnum):
    BINDING = 0x001


class Attr(enum.IntEnum):
    """
    Attribute types this module reads or writes.
    """

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003  # RFC 5780
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026  # RFC 5780
    RESPONSE_PORT = 0x0027  # RFC 5780
    #: timtx: also send the response to this (XOR-encoded) address, from the
    #: server's alternate address.  In the comprehension-required range so a
    #: server that does not know it answers 420 instead of ignoring it.
    XOR_DIAL_BACK_ADDRESS = 0x7C01
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780


#: Attributes this module understands; a request with another
#: comprehension-required attribute (type below 0x8000) gets error 420.
KNOWN_ATTRIBUTES = frozenset(int(a) for a in Attr)


class Integrity(enum.Enum):
    """
    Which MESSAGE-INTEGRITY attribute to add: RFC 5389's HMAC-SHA1 or RFC
    8489's HMAC-SHA256, which cluster nodes use between themselves.
    """

    SHA1 = Attr.MESSAGE_INTEGRITY
    SHA256 = Attr.MESSAGE_INTEGRITY_SHA256


@dataclass(frozen=True, order=True)
class Address:
    """
    A UDP address: a normalised IPv4 or IPv6 literal and a port.
    """

    host: str
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> Address:
        """
        Normalise C{host} (C{"::FFFF:1.2.3.4"} and C{"::ffff:102:304"} are
        one address).

        @raise StunError: if C{host} is not an IP literal or C{port} is out
            of range.
        """
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise StunError(f"not an IP address: {host!r}") from None
        if not 0 <= port <= 0xFFFF:
            raise StunError(f"port out of range: {port}")
        return cls(str(ip), port)

    @property
    def family(self) -> int:
        return 6 if ":" in self.host else 4

    def packed(self) -> bytes:
        return ipaddress.ip_address(self.host).packed

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ErrorCode:
    code: int
    reason: str


@dataclass(frozen=True)
class Message:
    """
    One decoded STUN message.

    @ivar attributes: every attribute as (type, value) in wire order,
        padding removed; the typed properties read them.
    @ivar raw: the message's bytes, kept to check integrity.
    """

    method: int
    messageClass: MessageClass
    transactionId: bytes
    attributes: tuple[tuple[int, bytes], ...]
    raw: bytes = b""

    def get(self, attrType: int) -> bytes | None:
        """
        The value of the first attribute of C{attrType}; later duplicates
        are ignored, as RFC 8489 section 14 says.
        """
        for t, value in self.attributes:
            if t == attrType:
                return value
        return None

    def _address(self, attrType: int, xor: bool) -> Address | None:
        value = self.get(attrType)
        if value is None:
            return None
        return decodeAddress(value, self.transactionId if xor else None)

    @property
    def xorMappedAddress(self) -> Address | None:
        return self._address(Attr.XOR_MAPPED_ADDRESS, True)

    @property
    def mappedAddress(self) -> Address | None:
        return self._address(Attr.MAPPED_ADDRESS, False)

    @property
    def otherAddress(self) -> Address | None:
        return self._address(Attr.OTHER_ADDRESS, False)

    @property
    def responseOrigin(self) -> Address | None:
        return self._address(Attr.RESPONSE_ORIGIN, False)

    @property
    def dialBackAddress(self) -> Address | None:
        return self._address(Attr.XOR_DIAL_BACK_ADDRESS, True)

    @property
    def changeRequest(self) -> tuple[bool, bool] | None:
        """
        RFC 5780's CHANGE-REQUEST flags as (change IP, change port).
        """
        value = self.get(Attr.CHANGE_REQUEST)
        if value is None:
            return None
        flags = struct.unpack("!I", value)[0]
        return bool(flags & 4), bool(flags & 2)

    @property
    def software(self) -> str | None:
        return self._text(Attr.SOFTWARE)

    @property
    def username(self) -> str | None:
        return self._text(Attr.USERNAME)

    def _text(self, attrType: int) -> str | None:
        value = self.get(attrType)
        return None if value is None else value.decode("utf-8")

    @property
    def errorCode(self) -> ErrorCode | None:
        value = self.get(Attr.ERROR_CODE)
        if value is None:
            return None
        return ErrorCode(value[2] * 100 + value[3], value[4:].decode("utf-8"))

    @property
    def integrity(self) -> Integrity | None:
        """
        The strongest integrity attribute present, if any.
        """
        types = {t for t, _ in self.attributes}
        if Attr.MESSAGE_INTEGRITY_SHA256 in types:
            return Integrity.SHA256
        if Attr.MESSAGE_INTEGRITY in types:
            return Integrity.SHA1
        return None

    def unknownRequired(self) -> list[int]:
        """
        Comprehension-required attribute types this module does not know.
        """
        return sorted({t for t, _ in self.attributes if t < 0x8000 and t not in KNOWN_ATTRIBUTES})

    def verify(self, key: bytes) -> bool:
        """
        Whether the message carries a MESSAGE-INTEGRITY-SHA256 (preferred)
        or MESSAGE-INTEGRITY computed with C{key}.  A message with neither
        is not verified.
        """
        integrity = self.integrity
        if integrity is None:
            return False
        offset = 0
        pos = HEADER_BYTES
        for t, value in self.attributes:
            size = 4 + _padded(len(value))
            if t == integrity.value:
                offset = pos
                expected = _mac(integrity, key, self.raw, offset, len(value))
                return hmac.compare_digest(expected[: len(value)], value)
            pos += size
        return False  # pragma: no cover: integrity was found above


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _mac(integrity: Integrity, key: bytes, raw: bytes, offset: int, size: int) -> bytes:
    """
    The HMAC over C{raw} up to C{offset} (where the integrity attribute of
    C{size} bytes starts), with the header's length set as if the message
    ended right after that attribute (RFC 8489 sections 14.5 and 14.6).
    """
    length = offset + 4 + size - HEADER_BYTES
    data = raw[:2] + struct.pack("!H", length) + raw[4:offset]
    digest = hashlib.sha1 if integrity is Integrity.SHA1 else hashlib.sha256
    return hmac.new(key, data, digest).digest()


def _crc(raw: bytes, offset: int) -> int:
    length = offset + 8 - HEADER_BYTES
    data = raw[:2] + struct.pack("!H", length) + raw[4:offset]
    return (zlib.crc32(data) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF


# Message type: two class bits interleaved with twelve method bits.


def _encodeType(method: int, messageClass: MessageClass) -> int:
    c = int(messageClass)
    return (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)


def _decodeType(value: int) -> tuple[int, MessageClass]:
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    c = ((value & 0x0010) >> 4) | ((value & 0x0100) >> 7)
    return method, MessageClass(c)


def looksLikeStun(data: bytes) -> bool:
    """
    Cheap demultiplexing test (RFC 7983): the first two bits are zero and
    the magic cookie is in place.  Does not validate the rest.
    """
    return len(data) >= HEADER_BYTES and data[0] < 4 and data[4:8] == _COOKIE_BYTES


def decode(data: bytes, maxBytes: int = MAX_MESSAGE_BYTES) -> Message:
    """
    Parse one STUN message.

    @raise StunError: for anything malformed: a short or long datagram, a
        bad header, a length that disagrees with the datagram, an attribute
        overrunning the message, too many attributes, a bad address, a
        misplaced or wrong FINGERPRINT, an attribute after MESSAGE-INTEGRITY
        other than the ones allowed there.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise StunError("not bytes")
    data = bytes(data)
    if len(data) > maxBytes:
        raise StunError(f"message of {len(data)} bytes, more than {maxBytes}")
    if len(data) < HEADER_BYTES:
        raise StunError("shorter than a STUN header")
    messageType, length = struct.unpack("!HH", data[:4])
    if messageType & 0xC000:
        raise StunError("first two bits not zero")
    if data[4:8] != _COOKIE_BYTES:
        raise StunError("no magic cookie")
    if length % 4 or HEADER_BYTES + length != len(data):
        raise StunError("length field disagrees with the datagram")
    method, messageClass = _decodeType(messageType)
    transactionId = data[8:20]
    attributes: list[tuple[int, bytes]] = []
    pos = HEADER_BYTES
    seenIntegrity = False
    seenSha256 = False
    while pos < len(data):
        if len(attributes) >= MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if pos + 4 > len(data):
            raise StunError("truncated attribute header")
        attrType, attrLength = struct.unpack("!HH", data[pos : pos + 4])
        end = pos + 4 + attrLength
        if end > len(data) or pos + 4 + _padded(attrLength) > len(data):
            raise StunError(f"attribute 0x{attrType:04x} overruns the message")
        value = data[pos + 4 : end]
        if attrType == Attr.FINGERPRINT:
            if attrLength != 4:
                raise StunError("FINGERPRINT is not 4 bytes")
            if end != len(data):
                raise StunError("FINGERPRINT is not the last attribute")
            if struct.unpack("!I", value)[0] != _crc(data, pos):
                raise StunError("wrong FINGERPRINT")
        elif seenSha256 or (seenIntegrity and attrType != Attr.MESSAGE_INTEGRITY_SHA256):
            # RFC 8489 section 14.5: only MESSAGE-INTEGRITY-SHA256 and
            # FINGERPRINT may follow MESSAGE-INTEGRITY.  A receiver must
            # ignore what follows; refusing is simpler and as safe.
            raise StunError(f"attribute 0x{attrType:04x} after MESSAGE-INTEGRITY")
        _checkValue(attrType, value)
        if attrType == Attr.MESSAGE_INTEGRITY:
            if seenSha256:
                raise StunError("MESSAGE-INTEGRITY after MESSAGE-INTEGRITY-SHA256")
            seenIntegrity = True
        elif attrType == Attr.MESSAGE_INTEGRITY_SHA256:
            seenSha256 = True
        attributes.append((attrType, value))
        pos += 4 + _padded(attrLength)
    return Message(method, messageClass, transactionId, tuple(attributes), data)


def _checkValue(attrType: int, value: bytes) -> None:
    """
    Validate the attributes the typed properties of L{Message} read, so
    that reading them never raises.
    """
    if attrType in (
        Attr.MAPPED_ADDRESS,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.OTHER_ADDRESS,
        Attr.RESPONSE_ORIGIN,
        Attr.XOR_DIAL_BACK_ADDRESS,
        Attr.ALTERNATE_SERVER,
    ):
        decodeAddress(value, None)
    elif attrType == Attr.MESSAGE_INTEGRITY:
        if len(value) != 20:
            raise StunError("MESSAGE-INTEGRITY is not 20 bytes")
    elif attrType == Attr.MESSAGE_INTEGRITY_SHA256:
        if not 16 <= len(value) <= 32 or len(value) % 4:
            raise StunError("MESSAGE-INTEGRITY-SHA256 is not 16 to 32 bytes in steps of 4")
    elif attrType == Attr.CHANGE_REQUEST:
        if len(value) != 4:
            raise StunError("CHANGE-REQUEST is not 4 bytes")
    elif attrType == Attr.ERROR_CODE:
        if len(value) < 4 or not 3 <= value[2] <= 6 or value[3] > 99 or len(value) > 4 + 763:
            raise StunError("malformed ERROR-CODE")
        _utf8(value[4:], "ERROR-CODE reason")
    elif attrType in (Attr.SOFTWARE, Attr.USERNAME, Attr.REALM, Attr.NONCE):
        if len(value) > 763:
            raise StunError("text attribute longer than 763 bytes")
        _utf8(value, "text attribute")


def _utf8(value: bytes, what: str) -> None:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise StunError(f"{what} is not UTF-8") from None


def decodeAddress(value: bytes, transactionId: bytes | None) -> Address:
    """
    Decode a (XOR-)MAPPED-ADDRESS-style value; XOR-decoded when
    C{transactionId} is given.

    @raise StunError: for an unknown family or a wrong length.
    """
    if len(value) < 4 or value[0] != 0:
        raise StunError("malformed address attribute")
    family = value[1]
    port = struct.unpack("!H", value[2:4])[0]
    raw = value[4:]
    if family == 1 and len(raw) == 4:
        pass
    elif family == 2 and len(raw) == 16:
        pass
    else:
        raise StunError("address attribute of unknown family or wrong length")
    if transactionId is not None:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transactionId
        raw = bytes(a ^ b for a, b in zip(raw, mask[: len(raw)], strict=True))
    return Address(str(ipaddress.ip_address(raw)), port)


def encodeAddress(address: Address, transactionId: bytes | None = None) -> bytes:
    """
    The value of a (XOR-)MAPPED-ADDRESS-style attribute for C{address}.
    """
    raw = address.packed()
    port = address.port
    if transactionId is not None:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transactionId
        raw = bytes(a ^ b for a, b in zip(raw, mask[: len(raw)], strict=True))
    return struct.pack("!BBH", 0, 1 if len(raw) == 4 else 2, port) + raw


def encodeErrorCode(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise StunError(f"error code out of range: {code}")
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")[:763]


def encodeChangeRequest(changeIp: bool, changePort: bool) -> bytes:
    return struct.pack("!I", (4 if changeIp else 0) | (2 if changePort else 0))


def encode(
    method: int,
    messageClass: MessageClass,
    transactionId: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    key: bytes | None = None,
    integrity: Integrity = Integrity.SHA256,
    fingerprint: bool = True,
) -> bytes:
    """
    Build one message: C{attributes} in order, then, with C{key}, the
    C{integrity} attribute, then FINGERPRINT unless told not to.

    @raise StunError: for a transaction id that is not 12 bytes, an
        attribute value over 65535 bytes, or a message over
        L{MAX_MESSAGE_BYTES}.
    """
    if len(transactionId) != 12:
        raise StunError("a transaction id is 12 bytes")
    body = bytearray()
    for attrType, value in attributes:
        if len(value) > 0xFFFF:
            raise StunError("attribute value too long")
        body += struct.pack("!HH", attrType, len(value)) + value + b"\x00" * (_padded(len(value)) - len(value))
    head = struct.pack("!HH", _encodeType(method, messageClass), 0) + _COOKIE_BYTES + transactionId
    message = bytearray(head + body)
    if key is not None:
        size = 20 if integrity is Integrity.SHA1 else 32
        offset = len(message)
        message += struct.pack("!HH", integrity.value, size) + _mac(integrity, key, bytes(message), offset, size)
    if fingerprint:
        offset = len(message)
        message += struct.pack("!HHI", Attr.FINGERPRINT, 4, _crc(bytes(message), offset))
    struct.pack_into("!H", message, 2, len(message) - HEADER_BYTES)
    if len(message) > MAX_MESSAGE_BYTES:
        raise StunError(f"message of {len(message)} bytes, more than {MAX_MESSAGE_BYTES}")
    return bytes(message)


# The messages cluster nodes exchange.


def clusterKey(secret: bytes) -> bytes:
    """
    The short-term credential (RFC 8489 section 9.1) every member of a
    cluster shares: derived from the cluster secret, so the secret itself
    never keys a packet an outsider can see.
    """
    return hmac.new(secret, b"timtx nat stun v1", hashlib.sha256).digest()


def bindingRequest(
    transactionId: bytes,
    *,
    key: bytes | None = None,
    username: str | None = None,
    changeIp: bool = False,
    changePort: bool = False,
    dialBack: Address | None = None,
    software: str | None = None,
) -> bytes:
    """
    A Binding request, with integrity if C{key} is given.
    """
    attrs: list[tuple[int, bytes]] = []
    if software:
        attrs.append((Attr.SOFTWARE, software.encode("utf-8")))
    if username:
        attrs.append((Attr.USERNAME, username.encode("utf-8")))
    if changeIp or changePort:
        attrs.append((Attr.CHANGE_REQUEST, encodeChangeRequest(changeIp, changePort)))
    if dialBack is not None:
        attrs.append((Attr.XOR_DIAL_BACK_ADDRESS, encodeAddress(dialBack, transactionId)))
    return encode(Method.BINDING, MessageClass.REQUEST, transactionId, attrs, key=key)


def bindingSuccess(
    transactionId: bytes,
    mapped: Address,
    *,
    key: bytes | None = None,
    integrity: Integrity = Integrity.SHA256,
    other: Address | None = None,
    origin: Address | None = None,
    software: str | None = None,
) -> bytes:
    """
    A Binding success response telling the client its reflexive address.
    """
    attrs: list[tuple[int, bytes]] = []
    if software:
        attrs.append((Attr.SOFTWARE, software.encode("utf-8")))
    attrs.append((Attr.XOR_MAPPED_ADDRESS, encodeAddress(mapped, transactionId)))
    if origin is not None:
        attrs.append((Attr.RESPONSE_ORIGIN, encodeAddress(origin)))
    if other is not None:
        attrs.append((Attr.OTHER_ADDRESS, encodeAddress(other)))
    return encode(Method.BINDING, MessageClass.SUCCESS, transactionId, attrs, key=key, integrity=integrity)


def bindingError(
    transactionId: bytes,
    code: int,
    reason: str,
    *,
    key: bytes | None = None,
    integrity: Integrity = Integrity.SHA256,
    unknown: Sequence[int] = (),
    software: str | None = None,
) -> bytes:
    """
    A Binding error response; C{unknown} fills UNKNOWN-ATTRIBUTES (for 420).
    """
    attrs: list[tuple[int, bytes]] = []
    if software:
        attrs.append((Attr.SOFTWARE, software.encode("utf-8")))
    attrs.append((Attr.ERROR_CODE, encodeErrorCode(code, reason)))
    if unknown:
        attrs.append((Attr.UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in unknown[:16])))
    return encode(Method.BINDING, MessageClass.ERROR, transactionId, attrs, key=key, integrity=integrity)
