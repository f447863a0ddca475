"""
Tests for L{timtx.crypto.vault}: stanzas at rest are sealed with AES-GCM.
"""

from twisted.trial.unittest import SynchronousTestCase

from timtx.crypto.ids import NodeKeys
from timtx.crypto.vault import SealError, StanzaVault
from timtx.protocols.structs import TimMessage, TimUserBean


class StanzaVaultTests(SynchronousTestCase):
    def setUp(self):
        self.vault = StanzaVault(NodeKeys(b"v" * 32))
        self.message = TimMessage(msType=2, odType=1, dataString="attack at dawn", mid=5, seq=1)

    def test_roundTrip(self):
        blob = self.vault.sealMessage("p:a:b", 1, self.message)
        self.assertNotIn(b"attack", blob)
        self.assertEqual(self.vault.openMessage("p:a:b", 1, blob), self.message)
        self.assertNotEqual(blob, self.vault.sealMessage("p:a:b", 1, self.message), "fresh nonce each time")
        bean = TimUserBean(nickName="n")
        self.assertEqual(self.vault.openProfile("u", self.vault.sealProfile("u", bean)), bean)
        self.assertEqual(self.vault.openFor("u", self.vault.sealFor("u", self.message)), self.message)

    def test_boundToPlace(self):
        """
        A blob opens only where it was sealed, under the same node secret.
        """
        blob = self.vault.sealMessage("p:a:b", 1, self.message)
        self.assertRaises(SealError, self.vault.openMessage, "p:a:b", 2, blob)
        self.assertRaises(SealError, self.vault.openMessage, "p:a:c", 1, blob)
        self.assertRaises(SealError, self.vault.openFor, "u", blob)
        self.assertRaises(SealError, StanzaVault(NodeKeys(b"w" * 32)).openMessage, "p:a:b", 1, blob)
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        self.assertRaises(SealError, self.vault.openMessage, "p:a:b", 1, tampered)
        self.assertRaises(SealError, self.vault.openMessage, "p:a:b", 1, b"plain")
