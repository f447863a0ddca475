# -*- test-case-name: timtx.test.test_vault -*-
"""
Stanzas at rest: encoded, then sealed with AES-256-GCM.

tim "encrypts" stored messages with an 8-byte repeating XOR mask whose
default key leaves almost every byte unchanged.  timtx seals every stored
stanza (history rows, inbox copies, profiles) with an AEAD under a key
derived from the node secret.  The associated data binds each blob to where
it belongs (conversation and sequence, or owner), so a blob copied into
another row does not open.

Keys have ids.  Key 1 is derived from the node secret; more keys (ids 2 to
65535) come from files named in C{[store] data_keys}, and C{[store]
data_key} says which one new blobs are sealed with.  A blob says which key
sealed it, so blobs under an older key keep opening while a re-encryption
(L{timtx.chat.reseal}) moves them to the new one; once none is left, the old
key can be retired (C{[store] retired_keys}).

Blob layouts:

  - C{[1][12-byte nonce][ciphertext + 16-byte tag]}: key 1, as every blob
    written before key ids existed;
  - C{[2][key id, 2 bytes big-endian][12-byte nonce][ciphertext + tag]}.
"""

from __future__ import annotations

import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from timtx.crypto.ids import NodeKeys
from timtx.protocols import codec
from timtx.protocols.structs import TimMessage, TimRoomBean, TimUserBean

_LEGACY = b"\x01"
_WITH_ID = b"\x02"
_NONCE_BYTES = 12
#: The key derived from the node secret.
NODE_KEY = 1
#: Highest key id a blob can name.
MAX_KEY_ID = 0xFFFF


class SealError(Exception):
    """
    A blob did not open: wrong key, wrong place, or tampered with.
    """


class KeyringError(Exception):
    """
    The keys configured cannot be used; the message says why.
    """


def headerOf(keyId: int) -> bytes:
    """
    The bytes every blob sealed with key C{keyId} starts with.
    """
    return _LEGACY if keyId == NODE_KEY else _WITH_ID + keyId.to_bytes(2, "big")


def keyOf(blob: bytes) -> int | None:
    """
    The id of the key that sealed C{blob}, or C{None} if it is not a blob.
    """
    if blob[:1] == _LEGACY:
        return NODE_KEY
    if blob[:1] == _WITH_ID and len(blob) >= 3:
        return int.from_bytes(blob[1:3], "big")
    return None


class Sealer:
    """
    AES-256-GCM under one of several keys, each known by its id.

    @param keys: key id to 32-byte key.
    @param writeKey: the id of the key new blobs are sealed with.
    """

    def __init__(self, keys: dict[int, bytes], writeKey: int = NODE_KEY):
        if writeKey not in keys:
            raise KeyringError(f"key {writeKey} is to seal new data but it is not in the keyring")
        self._aeads = {keyId: AESGCM(key) for keyId, key in keys.items()}
        self.writeKey = writeKey
        self.header = headerOf(writeKey)
        self._write = self._aeads[writeKey]

    @property
    def keyIds(self) -> list[int]:
        return sorted(self._aeads)

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return self.header + nonce + self._write.encrypt(nonce, plaintext, aad)

    def open(self, aad: bytes, blob: bytes) -> bytes:
        keyId = keyOf(blob)
        start = 1 if keyId == NODE_KEY else 3
        if keyId is None or len(blob) < start + _NONCE_BYTES + 16:
            raise SealError("not a sealed stanza")
        aead = self._aeads.get(keyId)
        if aead is None:
            raise SealError(f"sealed with key {keyId}, which this node does not have")
        try:
            return aead.decrypt(blob[start : start + _NONCE_BYTES], blob[start + _NONCE_BYTES :], aad)
        except InvalidTag:
            raise SealError("stanza does not open here") from None


def loadKeyring(
    keys: NodeKeys, files: dict[int, str], writeKey: int = 0, retired: tuple[int, ...] = ()
) -> tuple[dict[int, bytes], int]:
    """
    The stanza keys: key 1 from the node secret, others from C{files}
    (key id to a file holding 32 bytes in hex, as C{node.key} does), less
    the C{retired} ones.  Runs before the reactor starts: blocking I/O is
    fine.

    @param writeKey: the key new blobs are sealed with; 0 for the highest
        id of C{files} (key 1 if there is none).
    @return: key id to key, and the write key's id.
    @raise KeyringError: for a file that cannot be read, an id out of
        range, or a write key that is retired or unknown.
    """
    ring = {NODE_KEY: keys.derive(b"timtx stanza key v1")}
    for keyId, path in files.items():
        if not 2 <= keyId <= MAX_KEY_ID:
            raise KeyringError(f"key ids run from 2 to {MAX_KEY_ID} (1 is the node secret's): {keyId}")
        try:
            with open(path, encoding="ascii") as f:
                secret = bytes.fromhex(f.read().strip())
        except (OSError, ValueError) as e:
            raise KeyringError(f"cannot read key {keyId} from {path}: {e}") from None
        if len(secret) < 32:
            raise KeyringError(f"key {keyId} in {path} is shorter than 32 bytes")
        ring[keyId] = NodeKeys(secret).derive(b"timtx stanza key v1")
    write = writeKey or max(ring)
    if write in retired:
        raise KeyringError(f"key {write} is retired: it cannot seal new data")
    for keyId in retired:
        ring.pop(keyId, None)
    if write not in ring:
        raise KeyringError(f"[store] data_key = {write}, but no such key is configured")
    return ring, write


def newKeyFile(path: str) -> None:
    """
    Write a new random key to C{path} (mode 0600), for C{[store] data_keys}.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_bytes(32).hex() + "\n")


class StanzaVault:
    """
    Encodes and seals what the engine stores, and opens it again.

    @param ring: key id to key and the write key's id (L{loadKeyring}); by
        default key 1 alone, from C{keys}.
    """

    def __init__(self, keys: NodeKeys, ring: tuple[dict[int, bytes], int] | None = None):
        if ring is None:
            ring = ({NODE_KEY: keys.derive(b"timtx stanza key v1")}, NODE_KEY)
        self._sealer = Sealer(*ring)

    @property
    def writeKey(self) -> int:
        """
        The id of the key new blobs are sealed with.
        """
        return self._sealer.writeKey

    @property
    def writeHeader(self) -> bytes:
        """
        What blobs sealed with the write key start with.
        """
        return self._sealer.header

    @property
    def keyIds(self) -> list[int]:
        return self._sealer.keyIds

    def reseal(self, aad: bytes, blob: bytes) -> bytes | None:
        """
        C{blob} sealed again with the write key, or C{None} if it is
        already.

        @raise SealError: if it does not open.
        """
        if blob.startswith(self._sealer.header):
            return None
        return self._sealer.seal(aad, self._sealer.open(aad, blob))

    def sealMessage(self, conv: str, seq: int, message: TimMessage) -> bytes:
        return self._sealer.seal(messageAAD(conv, seq), codec.encode_compact(message))

    def sealEncodedMessage(self, conv: str, seq: int, compact: bytes) -> bytes:
        """
        L{sealMessage} for a message already encoded (Thrift compact, tim
        2.0 layout): a caller that sends those bytes too encodes once.
        """
        return self._sealer.seal(messageAAD(conv, seq), compact)

    def openMessage(self, conv: str, seq: int, blob: bytes) -> TimMessage:
        return codec.decode_compact(TimMessage, self._sealer.open(messageAAD(conv, seq), blob))

    def sealFor(self, uid: str, message: TimMessage) -> bytes:
        """
        Seal a copy of C{message} kept for C{uid} (an inbox entry).
        """
        return self._sealer.seal(inboxAAD(uid), codec.encode_compact(message))

    def sealEncodedFor(self, uid: str, compact: bytes) -> bytes:
        """
        L{sealFor} for a message already encoded (as L{sealEncodedMessage}).
        """
        return self._sealer.seal(inboxAAD(uid), compact)

    def openFor(self, uid: str, blob: bytes) -> TimMessage:
        return codec.decode_compact(TimMessage, self._sealer.open(inboxAAD(uid), blob))

    def sealProfile(self, uid: str, bean: TimUserBean) -> bytes:
        return self._sealer.seal(profileAAD(uid), codec.encode_compact(bean))

    def openProfile(self, uid: str, blob: bytes) -> TimUserBean:
        return codec.decode_compact(TimUserBean, self._sealer.open(profileAAD(uid), blob))

    def sealRoom(self, gid: str, bean: TimRoomBean) -> bytes:
        return self._sealer.seal(roomAAD(gid), codec.encode_compact(bean))

    def openRoom(self, gid: str, blob: bytes) -> TimRoomBean:
        return codec.decode_compact(TimRoomBean, self._sealer.open(roomAAD(gid), blob))


def messageAAD(conv: str, seq: int) -> bytes:
    """
    The associated data of the history row C{(conv, seq)}: a blob copied
    into another row does not open.
    """
    return b"message\0" + conv.encode() + b"\0" + str(seq).encode()


def inboxAAD(uid: str) -> bytes:
    return b"inbox\0" + uid.encode()


def profileAAD(uid: str) -> bytes:
    return b"profile\0" + uid.encode()


def roomAAD(gid: str) -> bytes:
    return b"room\0" + gid.encode()
