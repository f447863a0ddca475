# -*- test-case-name: timtx.test.test_nat_punch -*-
"""
The sans-IO half of hole punching: the coordination messages two nodes
exchange over the relay before they punch (as libp2p's DCUtR does), the
state machines that produce them, and the punch packets' format.  No
sockets, no clock, no Twisted: callers pass C{now}.  L{timtx.nat.punch}
drives it on a socket; docs/nat.md has the wire formats.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import struct
from dataclasses import dataclass
from typing import Sequence

from timtx.nat.stun import Address, StunError


class PunchError(Exception):
    """
    A coordination message is malformed, not authentic, or out of turn.
    """


_MAGIC = b"TXPC"
_VERSION = 1
_CONNECT = 1
_SYNC = 2
_TAG = 32
MAX_ADDRESSES = 8
MAX_CERTIFICATE_BYTES = 4096
MAX_MESSAGE_BYTES = 64 + MAX_ADDRESSES * 19 + MAX_CERTIFICATE_BYTES + _TAG


def coordinationKey(secret: bytes) -> bytes:
    return hmac.new(secret, b"timtx nat punch coordination v1", hashlib.sha256).digest()


@dataclass(frozen=True)
class Connect:
    sessionId: bytes
    nonce: bytes
    addresses: tuple[Address, ...]
    certificate: bytes = b""


@dataclass(frozen=True)
class Sync:
    sessionId: bytes


def encodeMessage(message: Connect | Sync, key: bytes) -> bytes:
    """
    Serialise and authenticate a coordination message with the
    coordination key (L{coordinationKey}).
    """
    if isinstance(message, Sync):
        body = _MAGIC + struct.pack("!BB", _VERSION, _SYNC) + message.sessionId
    else:
        if len(message.addresses) > MAX_ADDRESSES or len(message.certificate) > MAX_CERTIFICATE_BYTES:
            raise PunchError("too many addresses or too large a certificate")
        parts = [_MAGIC, struct.pack("!BB", _VERSION, _CONNECT), message.sessionId, message.nonce]
        parts.append(struct.pack("!B", len(message.addresses)))
        for address in message.addresses:
            packed = address.packed()
            parts.append(struct.pack("!B", len(packed)) + packed + struct.pack("!H", address.port))
        parts.append(struct.pack("!H", len(message.certificate)) + message.certificate)
        body = b"".join(parts)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decodeMessage(data: bytes, key: bytes) -> Connect | Sync:
    """
    Check and parse a coordination message.

    @raise PunchError: if it is malformed, too large, of an unknown version
        or not authenticated by C{key}.
    """
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
        raise PunchError("coordination message too large")
    if len(data) < 6 + 16 + _TAG or data[:4] != _MAGIC:
        raise PunchError("not a punch coordination message")
    body, tag = data[:-_TAG], data[-_TAG:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise PunchError("coordination message not authenticated by the cluster secret")
    version, kind = body[4], body[5]
    if version != _VERSION:
        raise PunchError(f"unknown coordination version {version}")
    sessionId = body[6:22]
    if kind == _SYNC:
        if len(body) != 22:
            raise PunchError("malformed Sync")
        return Sync(sessionId)
    if kind != _CONNECT:
        raise PunchError(f"unknown coordination message {kind}")
    try:
        pos = 22
        nonce = body[pos : pos + 16]
        pos += 16
        count = body[pos]
        pos += 1
        if count > MAX_ADDRESSES:
            raise PunchError("too many addresses")
        addresses = []
        for _ in range(count):
            size = body[pos]
            if size not in (4, 16):
                raise PunchError("bad address length")
            host = str(ipaddress.ip_address(body[pos + 1 : pos + 1 + size]))
            port = struct.unpack("!H", body[pos + 1 + size : pos + 3 + size])[0]
            addresses.append(Address.of(host, port))
            pos += 3 + size
        (certLength,) = struct.unpack("!H", body[pos : pos + 2])
        certificate = body[pos + 2 : pos + 2 + certLength]
        if len(certificate) != certLength or pos + 2 + certLength != len(body) or len(nonce) != 16:
            raise PunchError("malformed Connect")
    except (IndexError, struct.error, ValueError, StunError) as e:
        raise PunchError(f"malformed Connect ({e})") from None
    return Connect(sessionId, nonce, tuple(addresses), certificate)


@dataclass(frozen=True)
class PunchPlan:
    """
    What both sides agreed: who the peer is, the session's key, and when to
    start probing (C{at}, in this node's clock; C{None} until known).
    """

    sessionId: bytes
    sessionKey: bytes
    initiator: bool
    peerAddresses: tuple[Address, ...]
    peerCertificate: bytes
    at: float | None = None
    rtt: float | None = None


def _sessionKey(key: bytes, sessionId: bytes, initiatorNonce: bytes, responderNonce: bytes) -> bytes:
    return hmac.new(key, b"session" + sessionId + initiatorNonce + responderNonce, hashlib.sha256).digest()


@dataclass(frozen=True)
class Step:
    """
    What to do after a coordination message: bytes to send back over the
    relay (if any) and the plan as far as known.
    """

    send: bytes | None
    plan: PunchPlan | None


class PunchInitiator:
    """
    The side that asks for a direct path; it becomes the QUIC client.
    """

    def __init__(self, secret: bytes, addresses: Sequence[Address], *, sessionId: bytes | None = None):
        self._key = coordinationKey(secret)
        self.sessionId = sessionId or os.urandom(16)
        self._nonce = os.urandom(16)
        self._addresses = tuple(addresses)
        self._sentAt: float | None = None
        self.plan: PunchPlan | None = None

    def start(self, now: float) -> bytes:
        self._sentAt = now
        return encodeMessage(Connect(self.sessionId, self._nonce, self._addresses), self._key)

    def receive(self, data: bytes, now: float) -> Step:
        """
        Take the responder's L{Connect}: measure the round trip, plan to
        probe in half of it, and send L{Sync}.

        @raise PunchError: for a bad message or one out of turn.
        """
        message = decodeMessage(data, self._key)
        if self._sentAt is None or self.plan is not None or not isinstance(message, Connect):
            raise PunchError("unexpected coordination message")
        if message.sessionId != self.sessionId:
            raise PunchError("coordination message of another session")
        rtt = max(0.0, now - self._sentAt)
        self.plan = PunchPlan(
            self.sessionId,
            _sessionKey(self._key, self.sessionId, self._nonce, message.nonce),
            True,
            message.addresses,
            message.certificate,
            at=now + rtt / 2,
            rtt=rtt,
        )
        return Step(encodeMessage(Sync(self.sessionId), self._key), self.plan)


class PunchResponder:
    """
    The side asked for a direct path; it becomes the QUIC server and sends
    its certificate.
    """

    def __init__(self, secret: bytes, addresses: Sequence[Address], certificate: bytes = b""):
        self._key = coordinationKey(secret)
        self._nonce = os.urandom(16)
        self._addresses = tuple(addresses)
        self._certificate = certificate
        self.plan: PunchPlan | None = None
        self._synced = False

    def receive(self, data: bytes, now: float) -> Step:
        """
        A L{Connect} gets our L{Connect} back and a plan without a start
        time (pre-open now); the L{Sync} that follows sets the start: now.

        @raise PunchError: for a bad message or one out of turn.
        """
        message = decodeMessage(data, self._key)
        if isinstance(message, Connect):
            if self.plan is not None:
                raise PunchError("second Connect in one session")
            self.plan = PunchPlan(
                message.sessionId,
                _sessionKey(self._key, message.sessionId, message.nonce, self._nonce),
                False,
                message.addresses,
                b"",
            )
            reply = Connect(message.sessionId, self._nonce, self._addresses, self._certificate)
            return Step(encodeMessage(reply, self._key), self.plan)
        if self.plan is None or self._synced or message.sessionId != self.plan.sessionId:
            raise PunchError("unexpected Sync")
        self._synced = True
        self.plan = PunchPlan(
            self.plan.sessionId, self.plan.sessionKey, False, self.plan.peerAddresses, b"", at=now, rtt=None
        )
        return Step(None, self.plan)


# Punch packets: kind (1) | session id (16) | nonce (16) | tag (16).
PROBE = 0x11
ACK = 0x12
PACKET_BYTES = 49


def packet(kind: int, sessionId: bytes, nonce: bytes, key: bytes) -> bytes:
    head = bytes([kind]) + sessionId + nonce
    return head + hmac.new(key, head, hashlib.sha256).digest()[:16]
