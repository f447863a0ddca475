# -*- test-case-name: timtx.test.test_loginguard -*-
"""
Tests for L{timtx.chat.loginguard} on a fake clock, and for password
guessing against a listening node.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from timtx.chat.loginguard import LoginGuard
from timtx.client import TimHttpError, requestToken
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.frames import LengthPrefixedDecoder, client_frame, length_prefixed, parse_server_frame
from timtx.protocols.structs import TimAck, TimAuth
from timtx.test.base import NodeTestCase
from timtx.testing import httpURL, loggedInClient, uniqueName


class LoginGuardTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.guard = LoginGuard(self.clock, freePerAddress=6, freePerAccountAddress=3, spread=2, window=100)

    def fail(self, uid, address, times=1):
        for _ in range(times):
            self.assertEqual(self.guard.wait(uid, address), 0)
            self.guard.failed(uid, address)

    def test_accountAddressBackoff(self):
        """
        Past the free failures, one address waits 1 s, then 2, then 4 before
        each try at that account; another address is not affected.
        """
        self.fail("ann", "a", 3)
        self.guard.failed("ann", "a")
        self.assertEqual(self.guard.wait("ann", "a"), 1)
        self.assertEqual(self.guard.wait("ann", "b"), 0)
        self.clock.advance(1)
        self.fail("ann", "a")
        self.assertEqual(self.guard.wait("ann", "a"), 2)
        self.clock.advance(2)
        self.fail("ann", "a")
        self.assertEqual(self.guard.wait("ann", "a"), 4)

    def test_successClears(self):
        """
        A success clears the account-and-address budget.
        """
        self.fail("ann", "a", 3)
        self.guard.succeeded("ann", "a")
        self.fail("ann", "a", 3)

    def test_addressBudget(self):
        """
        One address guessing at many accounts backs off for all of them.
        """
        for i in range(6):
            self.fail(f"user{i}", "a")
        self.guard.failed("user6", "a")
        self.assertEqual(self.guard.wait("other", "a"), 1)
        self.assertEqual(self.guard.wait(None, "a"), 1)

    def test_spread(self):
        """
        Once more than C{spread} addresses failed at one account, only
        addresses that logged in to it before may try, until the failures
        age out of the window.
        """
        self.guard.succeeded("ann", "home")
        for address in "xyz":
            self.fail("ann", address)
        self.assertGreater(self.guard.wait("ann", "new"), 0)
        self.assertEqual(self.guard.wait("ann", "home"), 0)
        self.assertEqual(self.guard.wait("bob", "new"), 0)
        self.clock.advance(101)
        self.assertEqual(self.guard.wait("ann", "new"), 0)

    def test_forgottenAfterWindow(self):
        self.fail("ann", "a", 3)
        self.guard.failed("ann", "a")
        self.clock.advance(101)
        self.assertEqual(self.guard.wait("ann", "a"), 0)
        self.assertEqual(self.guard.refusals, 0)

    def test_bounded(self):
        """
        At most C{maxKeys} addresses are remembered.
        """
        guard = LoginGuard(self.clock, maxKeys=10)
        for i in range(1000):
            guard.failed(f"u{i}", f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(guard._byAddress._items), 10)


def tcpLogins(address, source, name, password, count):
    """
    Log in C{count} times over raw TCP from C{source}, each on a new
    connection; return the error codes (blocking: call in a thread).
    """
    codes = []
    frame = length_prefixed(
        client_frame(TimType.TIMAUTH, codec.encode(TimAuth(name=name, pwd=password), Encoding.COMPACT))
    )
    for _ in range(count):
        with socket.create_connection((address.host, address.port), timeout=10, source_address=(source, 0)) as sock:
            sock.sendall(frame)
            decoder = LengthPrefixedDecoder(1 << 20)
            while (reply := decoder.next_frame()) is None:
                data = sock.recv(65536)
                if not data:
                    break
                decoder.feed(data)
            if reply is None:
                codes.append(None)
                continue
            ack = codec.decode(TimAck, parse_server_frame(reply).payload, Encoding.COMPACT)
            codes.append(None if ack.ok else ack.error.code)
    return codes


class PasswordGuessingTests(NodeTestCase):
    sections = {"accounts": {"login_free_failures_per_ip": 10, "login_free_failures_per_account": 5}}

    @inlineCallbacks
    def test_guessingSlowsDown(self):
        """
        Wrong passwords from one address are refused with 5105 once its
        budget is spent, before any password is checked, and every failure
        is logged with the account id and the address, never the password;
        the account's owner logs in from another address meanwhile.
        """
        from twisted.internet.threads import deferToThread

        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        node = yield self.node()
        name = uniqueName()
        owner = yield loggedInClient(reactor, node, name, password="right-one", testCase=self)
        yield owner.disconnect()
        address = node.listeningAddress("client-tcp")
        codes = yield deferToThread(tcpLogins, address, "127.0.0.2", name, "guess-pw-123", 30)
        self.assertEqual(codes[:5], [ErrorCode.ERR_AUTH] * 5)
        self.assertEqual(set(codes[6:]), {ErrorCode.ERR_OVERHZ})
        again = yield loggedInClient(reactor, node, name, password="right-one", registerFirst=False, testCase=self)
        self.assertEqual(again.uid, owner.uid)
        failures = [e for e in observer if e.get("log_format", "").startswith("login failed")]
        self.assertGreaterEqual(len(failures), 5)
        self.assertEqual({(e["uid"], e["peer"]) for e in failures}, {(owner.uid, "127.0.0.2")})
        text = repr([dict(e) for e in observer])
        self.assertNotIn("guess-pw-123", text)
        self.assertNotIn("right-one", text)
        self.assertNotIn(name, text)

    @inlineCallbacks
    def test_tokenRequests(self):
        """
        Wrong passwords on /tim2 token requests end in HTTP 429.
        """
        node = yield self.node(accounts={"login_free_failures_per_ip": 3})
        name = uniqueName()
        yield loggedInClient(reactor, node, name, testCase=self)
        statuses = []
        for _ in range(6):
            try:
                yield requestToken(reactor, httpURL(node), name, "wrong-pw")
            except TimHttpError as e:
                statuses.append(e.status)
            except Exception:
                statuses.append("ack")
        self.assertEqual(statuses[:3], ["ack"] * 3)
        self.assertEqual(set(statuses[4:]), {429})
