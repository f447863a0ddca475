# -*- test-case-name: timtx.test.test_vault -*-
"""
Stanzas at rest: encoded, then sealed with AES-256-GCM.

tim "encrypts" stored messages with an 8-byte repeating XOR mask whose
default key leaves almost every byte unchanged.  timtx seals every stored
stanza (history rows, inbox copies, profiles) with an AEAD under a key
derived from the node secret.  The associated data binds each blob to where
it belongs (conversation and sequence, or owner), so a blob copied into
another row does not open.

Blob layout: C{[version 1][12-byte random nonce][ciphertext + 16-byte tag]}.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from timtx.crypto.ids import NodeKeys
from timtx.protocols import codec
from timtx.protocols.structs import TimMessage, TimRoomBean, TimUserBean

_VERSION = b"\x01"
_NONCE_BYTES = 12


class SealError(Exception):
    """
    A blob did not open: wrong key, wrong place, or tampered with.
    """


class Sealer:
    def __init__(self, key: bytes):
        self._aead = AESGCM(key)

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, aad: bytes, blob: bytes) -> bytes:
        if blob[:1] != _VERSION or len(blob) < 1 + _NONCE_BYTES + 16:
            raise SealError("not a sealed stanza")
        try:
            return self._aead.decrypt(blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :], aad)
        except InvalidTag:
            raise SealError("stanza does not open here") from None


class StanzaVault:
    """
    Encodes and seals what the engine stores, and opens it again.
    """

    def __init__(self, keys: NodeKeys):
        self._sealer = Sealer(keys.derive(b"timtx stanza key v1"))

    def sealMessage(self, conv: str, seq: int, message: TimMessage) -> bytes:
        return self._sealer.seal(_messageAAD(conv, seq), codec.encode_compact(message))

    def openMessage(self, conv: str, seq: int, blob: bytes) -> TimMessage:
        return codec.decode_compact(TimMessage, self._sealer.open(_messageAAD(conv, seq), blob))

    def sealFor(self, uid: str, message: TimMessage) -> bytes:
        """
        Seal a copy of C{message} kept for C{uid} (an inbox entry).
        """
        return self._sealer.seal(b"inbox\0" + uid.encode(), codec.encode_compact(message))

    def openFor(self, uid: str, blob: bytes) -> TimMessage:
        return codec.decode_compact(TimMessage, self._sealer.open(b"inbox\0" + uid.encode(), blob))

    def sealProfile(self, uid: str, bean: TimUserBean) -> bytes:
        return self._sealer.seal(b"profile\0" + uid.encode(), codec.encode_compact(bean))

    def openProfile(self, uid: str, blob: bytes) -> TimUserBean:
        return codec.decode_compact(TimUserBean, self._sealer.open(b"profile\0" + uid.encode(), blob))

    def sealRoom(self, gid: str, bean: TimRoomBean) -> bytes:
        return self._sealer.seal(b"room\0" + gid.encode(), codec.encode_compact(bean))

    def openRoom(self, gid: str, blob: bytes) -> TimRoomBean:
        return codec.decode_compact(TimRoomBean, self._sealer.open(b"room\0" + gid.encode(), blob))


def _messageAAD(conv: str, seq: int) -> bytes:
    return b"message\0" + conv.encode() + b"\0" + str(seq).encode()
