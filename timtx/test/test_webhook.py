# -*- test-case-name: timtx.test.test_webhook -*-
"""
Tests for L{timtx.chat.loginwebhook}: the answer is bounded in time and
size, whatever the webhook does.
"""

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from timtx.chat.loginwebhook import LoginWebhook
from timtx.protocols.structs import TimAuth

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"


class _Hook(Protocol):
    """
    Answers every request as C{self.factory.mode} says.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.loop = None

    def dataReceived(self, data):
        if b"\r\n\r\n" not in data or self.loop is not None:
            return
        mode = self.factory.mode
        if mode == "endless":
            # An answer that never ends: 1 and then more, forever.
            self.transport.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\n1\r\n")
            self.loop = LoopingCall(lambda: self.transport.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n"))
            self.loop.start(0.001)
        elif mode == "slow-body":
            # Headers at once, the body never.
            self.transport.write(HEAD + b"Content-Length: 1\r\n\r\n")
            self.loop = False
        elif mode == "yes":
            self.transport.write(HEAD + b"Content-Length: 1\r\n\r\n1")

    def connectionLost(self, reason):
        if self.loop:
            self.loop.stop()


class WebhookTests(TestCase):
    @inlineCallbacks
    def hook(self, mode, timeout=0.5):
        factory = Factory.forProtocol(_Hook)
        factory.mode = mode
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        webhook = LoginWebhook(reactor, f"http://127.0.0.1:{port.getHost().port}/", timeout)
        allowed = yield webhook.approve(TimAuth(name="ann", pwd="secret"))
        return allowed

    @inlineCallbacks
    def test_yes(self):
        self.assertIs((yield self.hook("yes")), True)

    @inlineCallbacks
    def test_endlessBody(self):
        """
        An answer that never ends is read up to a few bytes: its first byte
        decides, at once.
        """
        self.assertIs((yield self.hook("endless", timeout=30)), True)

    @inlineCallbacks
    def test_bodyNeverComes(self):
        """
        Headers without a body: a refusal after the timeout, logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertIs((yield self.hook("slow-body")), False)
        self.assertTrue([e for e in observer if "webhook failed" in e.get("log_format", "")])

    def test_plainHttpOffLoopback(self):
        """
        A plain http:// webhook off loopback is warned about: passwords
        would cross the network in clear.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        LoginWebhook(reactor, "http://auth.example.com/hook", 1.0)
        LoginWebhook(reactor, "https://auth.example.com/hook", 1.0)
        LoginWebhook(reactor, "http://127.0.0.1:9/hook", 1.0)
        warned = [e for e in observer if "in clear" in e.get("log_format", "")]
        self.assertEqual([e["url"] for e in warned], ["http://auth.example.com/hook"])
