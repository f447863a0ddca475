"""
End-to-end tests of the foundation through a listening node: registration
and tokens over /tim2, login and ping over WebSocket and raw TCP in both
encodings, device limits, timeouts, limits and every kind of bad input.
"""

import json
import os
import socket

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.web import resource, server

from timtx.client import (
    ClientTimeout,
    TimHttpError,
    TimRequestFailed,
    connect,
    register,
    requestToken,
)
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.frames import LengthPrefixedDecoder, client_frame, length_prefixed, parse_server_frame
from timtx.protocols.structs import TimAck, TimAuth, TimMessage
from timtx.test.base import NodeTestCase, within
from timtx.testing import (
    httpURL,
    loggedInClient,
    selfSignedCertificate,
    startNode,
    tcpURL,
    testConfig,
    uniqueName,
    wsURL,
)


class LoginTestsMixin:
    """
    Run for each transport and encoding.
    """

    @inlineCallbacks
    def test_registerTokenLogin(self):
        """
        Register and get a token over /tim2, log in with the token, ping.
        """
        node = yield self.node()
        name = uniqueName()
        uid = yield register(reactor, httpURL(node), name, "pw1", "dom", self.encoding)
        ack = yield requestToken(reactor, httpURL(node), name, "pw1", "dom", self.encoding)
        self.assertEqual((ack.ok, ack.timType, ack.n), (True, TimType.TIMTOKEN, str(ack.t)))
        client = yield self.client(node)
        login = yield client.login(token=ack.t, resource="phone", termtyp=2)
        self.assertEqual((login.ok, login.timType, login.n), (True, TimType.TIMAUTH, uid))
        yield client.ping()
        session = node.sessions.sessionsOf(uid)[0]
        self.assertEqual((session.resource, session.termtyp, session.encoding), ("phone", 2, self.encoding))

    @inlineCallbacks
    def test_passwordLoginAndFailure(self):
        """
        A wrong password gets error 4105 in the client's encoding and the
        connection may try again; the right one logs in.
        """
        node = yield self.node()
        name = uniqueName()
        yield register(reactor, httpURL(node), name, "pw1")
        client = yield self.client(node)
        failure = yield self.assertFailure(client.login(name, "wrong"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        login = yield client.login(name, "pw1")
        self.assertTrue(login.ok)
        again = yield client.login(name, "pw1")
        self.assertEqual(again.n, login.n, "a second TIMAUTH is answered ok")

    @inlineCallbacks
    def test_spentToken(self):
        node = yield self.node()
        name = uniqueName()
        yield register(reactor, httpURL(node), name, "pw1")
        ack = yield requestToken(reactor, httpURL(node), name, "pw1")
        first = yield self.client(node)
        yield first.login(token=ack.t)
        second = yield self.client(node)
        failure = yield self.assertFailure(second.login(token=ack.t), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_TOKEN)

    @inlineCallbacks
    def test_frameBeforeLogin(self):
        """
        A frame other than TIMAUTH or TIMPING before login gets error 4105
        and the connection is closed.  A ping is answered.
        """
        node = yield self.node()
        client = yield self.client(node)
        yield client.ping()
        client.send(TimType.TIMMESSAGE, TimMessage(msType=2, odType=1))
        incoming = yield client.next(TimType.TIMACK)
        self.assertEqual(self.errorOf(incoming, TimType.TIMMESSAGE), ErrorCode.ERR_AUTH)
        yield within(client.closed)
        self.assertEqual(len(node.connections), 0)

    @inlineCallbacks
    def test_badFrames(self):
        """
        Unknown types, malformed payloads and missing required fields each
        get an error ack, and the connection survives until max_bad_frames.
        """
        node = yield self.node(client={"max_bad_frames": 4})
        node.dispatcher.route(TimType.TIMMESSAGE, TimMessage, lambda session, message: None)
        client = yield loggedInClient(reactor, node, encoding=self.encoding, transport=self.transport, testCase=self)
        flag = 0x80 if self.encoding is Encoding.JSON else 0
        client.sendRaw(bytes([0x7E | flag]) + b"x")
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), 0x7E), ErrorCode.ERR_PARAMS)
        client.sendRaw(bytes([TimType.TIMMESSAGE | flag]) + b"\xff\xff\x01")
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), 90), ErrorCode.ERR_FORMAT)
        missing = b'{"odType": 1}' if self.encoding is Encoding.JSON else codec.encode_compact(TimAuth(name="x"))
        client.sendRaw(bytes([TimType.TIMMESSAGE | flag]) + missing)
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), 90), ErrorCode.ERR_PARAMS)
        yield client.ping()
        client.sendRaw(bytes([TimType.TIMREGISTER | flag]))
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), 14), ErrorCode.ERR_INTERFACE)
        yield within(client.closed)

    @inlineCallbacks
    def test_deviceLimitReject(self):
        """
        With C{overflow = reject}, a login over type_limit gets 4111 and the
        old session stays.
        """
        node = yield self.node(devices={"limit": 3, "type_limit": 1, "overflow": "reject"})
        name = uniqueName()
        first = yield loggedInClient(
            reactor, node, name, encoding=self.encoding, transport=self.transport, testCase=self, termtyp=1
        )
        second = yield self.client(node)
        failure = yield self.assertFailure(second.login(name, "secret", termtyp=1), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_OVERENTRY)
        yield first.ping()
        other = yield self.client(node)
        yield other.login(name, "secret", termtyp=2)
        self.assertEqual(len(node.sessions.sessionsOf(first.uid)), 2)

    @inlineCallbacks
    def test_deviceLimitKickOldest(self):
        """
        With C{overflow = kick-oldest}, the old session gets TIMLOGOUT and is
        closed; the new one works.
        """
        node = yield self.node(devices={"limit": 1, "type_limit": 1, "overflow": "kick-oldest"})
        name = uniqueName()
        first = yield loggedInClient(
            reactor, node, name, encoding=self.encoding, transport=self.transport, testCase=self
        )
        second = yield self.client(node)
        yield second.login(name, "secret", termtyp=5)
        logout = yield first.next(TimType.TIMACK)
        self.assertEqual(logout.body, TimAck(ok=True, timType=TimType.TIMLOGOUT))
        yield within(first.closed)
        yield second.ping()
        self.assertEqual(len(node.sessions.sessionsOf(second.uid)), 1)

    @inlineCallbacks
    def test_authTimeout(self):
        """
        A connection that does not log in within auth_timeout is closed.
        """
        clock = Clock()
        node = yield self.node(clock=clock, client={"auth_timeout": 5.0})
        client = yield self.client(node)
        yield client.ping()
        clock.advance(4.9)
        yield client.ping()
        clock.advance(0.2)
        yield within(client.closed)

    @inlineCallbacks
    def test_idleTimeout(self):
        """
        An authenticated connection is closed after idle_timeout without a
        frame; any frame, a ping say, resets the timer.
        """
        clock = Clock()
        node = yield self.node(clock=clock, client={"idle_timeout": 30.0})
        client = yield loggedInClient(reactor, node, encoding=self.encoding, transport=self.transport, testCase=self)
        for _ in range(3):
            clock.advance(20)
            yield client.ping()
        clock.advance(31)
        yield within(client.closed)

    @inlineCallbacks
    def test_rateLimit(self):
        """
        Frames over request_rate get error 5105 and are not handled.
        """
        clock = Clock()
        node = yield self.node(clock=clock, client={"request_rate": 1.0, "request_burst": 3})
        client = yield loggedInClient(reactor, node, encoding=self.encoding, transport=self.transport, testCase=self)
        # The login used one token.
        for _ in range(2):
            yield client.ping()
        client.send(TimType.TIMPING)
        self.assertEqual(self.errorOf((yield client.next(TimType.TIMACK)), TimType.TIMPING), ErrorCode.ERR_OVERHZ)
        clock.advance(1.0)
        yield client.ping()

    @inlineCallbacks
    def test_loginAttempts(self):
        node = yield self.node(client={"max_login_attempts": 2})
        client = yield self.client(node)
        yield self.assertFailure(client.login("nobody", "x"), TimRequestFailed)
        yield self.assertFailure(client.login("nobody", "x"), TimRequestFailed)
        yield within(client.closed)


class WebSocketCompactLoginTests(LoginTestsMixin, NodeTestCase):
    transport = "ws"
    encoding = Encoding.COMPACT


class WebSocketJSONLoginTests(LoginTestsMixin, NodeTestCase):
    transport = "ws"
    encoding = Encoding.JSON


class TCPCompactLoginTests(LoginTestsMixin, NodeTestCase):
    transport = "tcp"
    encoding = Encoding.COMPACT


class TCPJSONLoginTests(LoginTestsMixin, NodeTestCase):
    transport = "tcp"
    encoding = Encoding.JSON


class SQLiteLoginTests(NodeTestCase):
    backend = "sqlite"

    @inlineCallbacks
    def test_accountsPersist(self):
        """
        With the SQLite store an account survives a node restart.
        """
        config = testConfig(self.mktemp(), backend="sqlite")
        node = yield startNode(self, reactor, config)
        uid = yield register(reactor, httpURL(node), "persistent", "pw1")
        yield node.stopService()
        again = yield startNode(self, reactor, config)
        client = yield connect(reactor, wsURL(again))
        self.addCleanup(client.disconnect)
        login = yield client.login("persistent", "pw1")
        self.assertEqual(login.n, uid)


class RawTCPTests(NodeTestCase):
    transport = "tcp"

    @inlineCallbacks
    def rawConnection(self, node):
        received = []
        done = Deferred()

        class Raw(Protocol):
            def dataReceived(self, data):
                received.append(data)

            def connectionLost(self, reason):
                done.callback(None)

        address = node.listeningAddress("client-tcp")
        protocol = yield connectProtocol(TCP4ClientEndpoint(reactor, address.host, address.port), Raw())
        self.addCleanup(protocol.transport.loseConnection)
        return protocol, received, done

    @inlineCallbacks
    def test_smallWritesLeaveAtOnce(self):
        """
        The node turns Nagle's algorithm off on a raw TCP client's socket
        (autobahn does it for WebSocket ones): a push is not held back
        behind the previous one's acknowledgement.
        """
        node = yield self.node()
        protocol, received, done = yield self.rawConnection(node)
        yield deferLater(reactor, 0, lambda: None)
        ours = protocol.transport.getHost().port
        (server,) = [
            reader
            for reader in reactor.getReaders()
            if isinstance(reader, tcp.Server) and reader.getPeer().port == ours
        ]
        self.assertTrue(server.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_byteByByte(self):
        """
        A login frame written one byte at a time, followed at once by a
        ping, is understood.
        """
        node = yield self.node()
        yield register(reactor, httpURL(node), "bytewise", "pw1")
        protocol, received, done = yield self.rawConnection(node)
        auth = codec.encode_compact(TimAuth(name="bytewise", pwd="pw1"))
        data = length_prefixed(client_frame(TimType.TIMAUTH, auth)) + length_prefixed(b"\x0d")
        for i in range(len(data)):
            protocol.transport.write(data[i : i + 1])
            yield deferLater(reactor, 0, lambda: None)
        decoder = LengthPrefixedDecoder(1 << 20)
        frames = []
        for _ in range(500):
            decoder.feed(b"".join(received))
            del received[:]
            while (frame := decoder.next_frame()) is not None:
                frames.append(parse_server_frame(frame))
            if len(frames) >= 2:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        # Pings skip the queue of frames, so the order of the two answers
        # depends on when the password check ends.
        self.assertEqual(sorted(f.timType for f in frames), [TimType.TIMACK, TimType.TIMPING])
        ack = codec.decode_compact(TimAck, next(f for f in frames if f.timType == TimType.TIMACK).payload)
        self.assertEqual((ack.ok, ack.timType), (True, TimType.TIMAUTH))

    @inlineCallbacks
    def test_oversizeFrame(self):
        """
        A length prefix over max_frame_bytes gets error 4114 and a close.
        """
        node = yield self.node(client={"max_frame_bytes": 1024})
        protocol, received, done = yield self.rawConnection(node)
        protocol.transport.write((1025).to_bytes(4, "big"))
        yield within(done)
        stream = b"".join(received)
        ack = codec.decode_compact(TimAck, parse_server_frame(stream[4:]).payload)
        self.assertEqual((ack.ok, ack.error.code), (False, ErrorCode.ERR_BIGDATA))


class WebSocketTests(NodeTestCase):
    @inlineCallbacks
    def test_oversizeMessage(self):
        """
        A WebSocket message over max_frame_bytes is closed with 1009.
        """
        node = yield self.node(client={"max_frame_bytes": 1024})
        client = yield self.client(node)
        client.sendRaw(b"\x10" + b"x" * 2000)
        yield within(client.closed)
        self.assertEqual(client.closeCode, 1009)

    @inlineCallbacks
    def test_origin(self):
        """
        By default any non-empty Origin is accepted and a missing one
        refused; an allowlist refuses other origins.
        """
        node = yield self.node()
        yield self.assertFailure(connect(reactor, wsURL(node), origin=None), Exception)
        client = yield self.client(node, origin="https://anything.example")
        yield client.ping()
        strict = yield self.node(client={"allowed_origins": ("https://ok.example",)})
        yield self.assertFailure(connect(reactor, wsURL(strict), origin="https://bad.example"), Exception)
        allowed = yield self.client(strict, origin="https://ok.example")
        yield allowed.ping()
        lax = yield self.node(client={"allow_missing_origin": True})
        bare = yield self.client(lax, origin=None)
        yield bare.ping()

    @inlineCallbacks
    def test_maxConnections(self):
        node = yield self.node(client={"max_connections": 2})
        yield self.client(node)
        yield self.client(node, transport="tcp")
        yield self.assertFailure(connect(reactor, wsURL(node)), Exception)
        refused = yield connect(reactor, tcpURL(node))
        yield within(refused.closed)


class Tim2Tests(NodeTestCase):
    @inlineCallbacks
    def post(self, node, body):
        from twisted.web.client import Agent, readBody

        from timtx.chat.loginwebhook import BytesProducer

        response = yield Agent(reactor).request(b"POST", httpURL(node).encode(), None, BytesProducer(body))
        content = yield readBody(response)
        return response.code, content

    @inlineCallbacks
    def test_registerTwice(self):
        node = yield self.node()
        yield register(reactor, httpURL(node), "twice", "pw1", encoding=Encoding.JSON)
        failure = yield self.assertFailure(register(reactor, httpURL(node), "twice", "pw2"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_HASEXIST)

    @inlineCallbacks
    def test_replyLayout(self):
        """
        The reply is [0x0C] + TimAck in the request's encoding, without the
        JSON bit, as tim answers.
        """
        node = yield self.node()
        body = client_frame(
            TimType.TIMREGISTER, json.dumps({"name": "lay", "pwd": "pw1", "domain": None}).encode(), Encoding.JSON
        )
        code, content = yield self.post(node, body)
        self.assertEqual(code, 200)
        self.assertEqual(content[0], 0x0C)
        reply = json.loads(content[1:])
        self.assertEqual((reply["ok"], reply["timType"]), (True, 14))
        self.assertEqual(reply["n"], node.keys.accountId("lay", ""))

    @inlineCallbacks
    def test_badRequests(self):
        """
        Invalid JSON and truncated compact get 4113; other frame types 4107;
        an empty body 4113.
        """
        node = yield self.node()
        for body, code in [
            (b"\x8e{not json", ErrorCode.ERR_FORMAT),
            (b"\x0e\x18", ErrorCode.ERR_FORMAT),
            (b"\x10\x00", ErrorCode.ERR_INTERFACE),
            (b"", ErrorCode.ERR_FORMAT),
        ]:
            status, content = yield self.post(node, body)
            self.assertEqual(status, 200)
            encoding = Encoding.JSON if body[:1] == b"\x8e" else Encoding.COMPACT
            ack = codec.decode(TimAck, content[1:], encoding)
            self.assertEqual((ack.ok, ack.error.code), (False, code), body)

    @inlineCallbacks
    def test_oversizeBody(self):
        node = yield self.node(client={"max_frame_bytes": 1024})
        status, _ = yield self.post(node, b"\x0e" + b"x" * 5000)
        self.assertEqual(status, 413)

    @inlineCallbacks
    def test_forbidden(self):
        node = yield self.node(accounts={"forbid_register": True, "forbid_token": True})
        error = yield self.assertFailure(register(reactor, httpURL(node), "x", "pw1"), TimHttpError)
        self.assertEqual(error.status, 403)
        error = yield self.assertFailure(requestToken(reactor, httpURL(node), "x", "pw1"), TimHttpError)
        self.assertEqual(error.status, 403)

    @inlineCallbacks
    def test_rateLimit(self):
        clock = Clock()
        node = yield self.node(clock=clock, accounts={"http_rate": 1.0, "http_burst": 2})
        yield register(reactor, httpURL(node), "r1", "pw1")
        yield register(reactor, httpURL(node), "r2", "pw1")
        error = yield self.assertFailure(register(reactor, httpURL(node), "r3", "pw1"), TimHttpError)
        self.assertEqual(error.status, 429)
        clock.advance(1)
        yield register(reactor, httpURL(node), "r3", "pw1")


class WebhookTests(NodeTestCase):
    @inlineCallbacks
    def test_webhook(self):
        """
        The login webhook gets the TimAuth as JSON; "1" admits, anything
        else refuses with 4105.
        """
        seen = []

        class Hook(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                body = json.loads(request.content.read())
                seen.append(body)
                return b"1" if body["name"] == "welcome" else b"0"

        port = reactor.listenTCP(0, server.Site(Hook()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        node = yield self.node(accounts={"login_webhook": url})
        yield register(reactor, httpURL(node), "welcome", "pw1")
        yield register(reactor, httpURL(node), "unwelcome", "pw1")
        client = yield self.client(node)
        yield client.login("welcome", "pw1", resource="r")
        other = yield self.client(node)
        failure = yield self.assertFailure(other.login("unwelcome", "pw1"), TimRequestFailed)
        self.assertEqual(failure.code, ErrorCode.ERR_AUTH)
        self.assertEqual([(s["name"], s.get("resource")) for s in seen], [("welcome", "r"), ("unwelcome", None)])


class TLSTests(NodeTestCase):
    @inlineCallbacks
    def test_tls(self):
        """
        With ssl: endpoints, register over https, log in over wss and TLS
        TCP, with the certificate verified.
        """
        directory = os.path.abspath(self.mktemp())
        certPath, keyPath = selfSignedCertificate(directory)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        node = yield self.node(client={"listen": endpoint, "tcp_listen": endpoint})
        with open(certPath, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        ws = node.listeningAddress("client-ws").port
        tcp = node.listeningAddress("client-tcp").port
        uid = yield register(reactor, f"https://localhost:{ws}/tim2", "secure", "pw1", trustRoot=trust)
        for url in (f"wss://localhost:{ws}/tim", f"tls://localhost:{tcp}"):
            client = yield connect(reactor, url, tlsOptions=optionsForClientTLS("localhost", trust))
            self.addCleanup(client.disconnect)
            login = yield client.login("secure", "pw1", termtyp=len(url))
            self.assertEqual(login.n, uid)
        untrusted = connect(reactor, f"tls://localhost:{tcp}")
        try:
            client = yield untrusted
        except Exception:
            pass
        else:
            self.addCleanup(client.disconnect)
            yield self.assertFailure(client.ping(timeout=5), Exception)


_ = (succeed, ClientTimeout)
