"""
Tests for L{timtx.chat.accounts}, L{timtx.crypto.ids} and L{timtx.crypto.passwords}.
"""

import os
import stat

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.accounts import AccountService
from timtx.config import AccountsConfig
from timtx.crypto.ids import NodeKeys, b58decode, b58encode
from timtx.crypto.passwords import PasswordHasher
from timtx.persistence.memory import MemoryStore
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimAuth


class Base58Tests(SynchronousTestCase):
    def test_roundTrip(self):
        for data in (b"", b"\0", b"\0\0\x01", b"hello", bytes(range(32))):
            self.assertEqual(b58decode(b58encode(data)), data)
        self.assertEqual(b58encode(b"hello world"), "StV1DL6CwTryKyV")
        self.assertRaises(ValueError, b58decode, "0OIl")


class NodeKeysTests(SynchronousTestCase):
    def test_accountIds(self):
        """
        Account ids are stable for a secret, differ by name, domain and
        secret, and are base58 of 16 bytes.
        """
        keys = NodeKeys(b"s" * 32)
        uid = keys.accountId("alice", "d")
        self.assertEqual(uid, keys.accountId("alice", "d"))
        self.assertEqual(keys.accountId("alice", None), keys.accountId("alice", ""))
        self.assertNotEqual(uid, keys.accountId("alice", "e"))
        self.assertNotEqual(uid, keys.accountId("bob", "d"))
        self.assertNotEqual(uid, NodeKeys(b"t" * 32).accountId("alice", "d"))
        self.assertEqual(len(b58decode(uid)), 16)
        self.assertNotIn("alice", uid)

    def test_fromFile(self):
        """
        The secret file is created with mode 0600 on first use and read
        back after.
        """
        path = os.path.join(self.mktemp(), "dir", "node.key")
        first = NodeKeys.fromFile(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(NodeKeys.fromFile(path).accountId("a", ""), first.accountId("a", ""))

    def test_fromFileRace(self):
        """
        When another node creates the shared key file first (the nodes of a
        cluster on one machine start at once), the later one uses that key
        and leaves no file of its own behind.
        """
        import tempfile

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "node.key")
        winner = NodeKeys(b"w" * 32)
        realMkstemp = tempfile.mkstemp

        def otherNodeFirst(**kwargs):
            with open(path, "w", encoding="ascii") as f:
                f.write((b"w" * 32).hex() + "\n")
            return realMkstemp(**kwargs)

        self.patch(tempfile, "mkstemp", otherNodeFirst)
        keys = NodeKeys.fromFile(path)
        self.assertEqual(keys.accountId("a", ""), winner.accountId("a", ""))
        self.assertEqual(os.listdir(directory), ["node.key"])

    def test_shortSecret(self):
        self.assertRaises(ValueError, NodeKeys, b"short")


class PasswordHasherTests(SynchronousTestCase):
    def test_verify(self):
        hasher = PasswordHasher(16, 1, 1)
        stored = hasher.hash("pw")
        self.assertTrue(stored.startswith("scrypt$16$1$1$"))
        self.assertTrue(hasher.verify("pw", stored))
        self.assertFalse(hasher.verify("pW", stored))
        self.assertNotEqual(stored, hasher.hash("pw"), "salted")
        self.assertFalse(hasher.verify("pw", "garbage"))
        self.assertFalse(hasher.verify("pw", "md5$1$2$3$4$5"))
        self.assertFalse(hasher.needsRehash(stored))
        self.assertTrue(PasswordHasher(32, 1, 1).needsRehash(stored))
        self.assertTrue(PasswordHasher(32, 1, 1).verify("pw", stored), "old parameters still verify")


class AccountServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        config = AccountsConfig(scrypt_n=16, scrypt_r=1, token_ttl=30, password_min_length=3)
        self.service = AccountService(
            config,
            store=self.store,
            keys=NodeKeys(b"k" * 32),
            clock=self.clock,
            runInThread=lambda f, *a: maybeDeferred(f, *a),
        )

    def error(self, d):
        return self.failureResultOf(d, TimProtocolError).value

    def test_register(self):
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret", domain="d")))
        self.assertEqual(uid, self.service.keys.accountId("ann", "d"))
        account = self.successResultOf(self.store.getAccount(uid))
        self.assertNotIn("secret", account.passwordHash)
        self.assertEqual(
            self.error(self.service.register(TimAuth(name="ann", pwd="x12", domain="d"))).code, ErrorCode.ERR_HASEXIST
        )
        self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret", domain="other")))

    def test_registerBadInput(self):
        for auth in (
            TimAuth(pwd="secret"),
            TimAuth(name="", pwd="secret"),
            TimAuth(name="x" * 65, pwd="secret"),
            TimAuth(name="ann"),
            TimAuth(name="ann", pwd="ab"),
            TimAuth(name="ann", pwd="secret", domain="d" * 65),
        ):
            self.assertEqual(self.error(self.service.register(auth)).code, ErrorCode.ERR_PARAMS, auth)

    def test_passwordLogin(self):
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret")))
        grant = self.successResultOf(self.service.authenticate(TimAuth(name="ann", pwd="secret")))
        self.assertEqual(grant.uid, uid)
        for auth in (TimAuth(name="ann", pwd="wrong"), TimAuth(name="bob", pwd="secret"), TimAuth(name="ann")):
            self.assertEqual(self.error(self.service.authenticate(auth)).code, ErrorCode.ERR_AUTH)

    def test_tokens(self):
        """
        A token is below 2**53, logs in once, and expires after token_ttl.
        """
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret")))
        self.assertEqual(self.error(self.service.issueToken(TimAuth(name="ann", pwd="bad"))).code, ErrorCode.ERR_NOPASS)
        token = self.successResultOf(self.service.issueToken(TimAuth(name="ann", pwd="secret")))
        self.assertLess(token, 1 << 53)
        self.assertEqual(self.successResultOf(self.service.authenticate(TimAuth(token=token))).uid, uid)
        self.assertEqual(self.error(self.service.authenticate(TimAuth(token=token))).code, ErrorCode.ERR_TOKEN)
        late = self.successResultOf(self.service.issueToken(TimAuth(name="ann", pwd="secret")))
        self.clock.advance(31)
        self.assertEqual(self.error(self.service.authenticate(TimAuth(token=late))).code, ErrorCode.ERR_TOKEN)

    def test_tokenAsString(self):
        """
        tim 2.1 sends the token as a string with name and domain; a token
        for another account is refused.
        """
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret", domain="d")))
        self.successResultOf(self.service.register(TimAuth(name="bob", pwd="secret", domain="d")))
        token = self.successResultOf(self.service.issueToken(TimAuth(name="ann", pwd="secret", domain="d")))
        other = self.successResultOf(self.service.issueToken(TimAuth(name="ann", pwd="secret", domain="d")))
        grant = self.successResultOf(self.service.authenticate(TimAuth(name="ann", domain="d", token=str(token))))
        self.assertEqual(grant.uid, uid)
        error = self.error(self.service.authenticate(TimAuth(name="bob", domain="d", token=str(other))))
        self.assertEqual(error.code, ErrorCode.ERR_TOKEN)

    def test_spentTokenFallsBackToPassword(self):
        """
        timjs reconnects with its spent token plus name and password; the
        password logs it in.
        """
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret")))
        token = self.successResultOf(self.service.issueToken(TimAuth(name="ann", pwd="secret")))
        self.successResultOf(self.service.authenticate(TimAuth(token=token)))
        grant = self.successResultOf(self.service.authenticate(TimAuth(name="ann", pwd="secret", token=token)))
        self.assertEqual(grant.uid, uid)

    def test_changePassword(self):
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret")))
        self.assertEqual(self.error(self.service.changePassword(uid, "wrong", "newpw")).code, ErrorCode.ERR_MODIFYAUTH)
        self.assertEqual(self.error(self.service.changePassword(uid, "secret", "n")).code, ErrorCode.ERR_PARAMS)
        self.successResultOf(self.service.changePassword(uid, "secret", "newpw"))
        self.successResultOf(self.service.authenticate(TimAuth(name="ann", pwd="newpw")))
        self.error(self.service.authenticate(TimAuth(name="ann", pwd="secret")))

    def test_rehashOnLogin(self):
        """
        A login with a hash of older cost parameters stores a new hash.
        """
        uid = self.successResultOf(self.service.register(TimAuth(name="ann", pwd="secret")))
        self.service.hasher = PasswordHasher(32, 1, 1)
        self.successResultOf(self.service.authenticate(TimAuth(name="ann", pwd="secret")))
        self.assertTrue(self.successResultOf(self.store.getAccount(uid)).passwordHash.startswith("scrypt$32$"))
