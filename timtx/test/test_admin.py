# -*- test-case-name: timtx.test.test_admin -*-
"""
Tests for the admin side: accounts, tokens and roles, the REST API and
tim's server API against a real node, bad input, the audit log.
"""

import json
import os
import re
import stat

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from timtx.admin.accounts import (
    ADMIN,
    Admin,
    AdminAccountError,
    AdminFile,
    AdminTokens,
    LoginThrottle,
    checkName,
    checkPassword,
)
from timtx.admin.web import ApiError, isLoopback, validate
from timtx.chat.bans import UserBans
from timtx.client import TimRequestFailed, connect
from timtx.protocols.constants import ErrorCode, MsType, NodeInfo, OdType, TimType
from timtx.protocols.structs import TimNodes
from timtx.test.admintools import ROOT_PASSWORD, WATCHER_PASSWORD, AdminTestCase
from timtx.test.base import waitUntil, within
from timtx.testing import loggedInClient, requireOrSkip, sourceRoot, wsURL


class ValidateTests(SynchronousTestCase):
    """
    The checker of request bodies is the JSON-schema subset the OpenAPI
    document declares.
    """

    schema = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 4, "pattern": "^[a-z]+$"},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
            "tags": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
            "role": {"type": "string", "enum": ["a", "b"]},
            "extra": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }

    def assertRefused(self, value, words):
        error = self.assertRaises(ApiError, validate, value, self.schema)
        self.assertEqual(error.status, 400)
        self.assertIn(words, error.message)

    def test_accepts(self):
        """
        A body within the schema passes.
        """
        validate({"name": "ab", "n": 3, "tags": ["x"], "role": "a", "extra": {"k": "v"}}, self.schema)

    def test_refuses(self):
        """
        Each kind of violation is refused with 400 naming the field.
        """
        self.assertRefused([], "expected object")
        self.assertRefused({}, "body.name is required")
        self.assertRefused({"name": "ab", "other": 1}, "body.other is not a known field")
        self.assertRefused({"name": ""}, "body.name: at least 1")
        self.assertRefused({"name": "abcde"}, "body.name: at most 4")
        self.assertRefused({"name": "A1"}, "body.name: does not match")
        self.assertRefused({"name": "a", "n": True}, "body.n: expected integer")
        self.assertRefused({"name": "a", "n": 1.5}, "body.n: expected integer")
        self.assertRefused({"name": "a", "n": 10}, "body.n: at most 9")
        self.assertRefused({"name": "a", "tags": ["x", "y", "z"]}, "at most 2 items")
        self.assertRefused({"name": "a", "tags": [1]}, "body.tags[0]: expected string")
        self.assertRefused({"name": "a", "role": "c"}, "body.role: expected one of a, b")
        self.assertRefused({"name": "a", "extra": {"k": 1}}, "body.extra.k: expected string")


class AccountsTests(SynchronousTestCase):
    def test_file(self):
        """
        Accounts are written with mode 0600, read back, and read again
        when the file changes; names are unique.
        """
        path = os.path.join(self.mktemp(), "admins.json")
        admins = AdminFile(path)
        self.assertEqual(admins.admins(), {})
        admins.add(Admin("root", ADMIN, "scrypt$2$1$1$c2FsdA==$a2V5", 5.0))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertRaises(AdminAccountError, admins.add, Admin("root", ADMIN, "x", 0))
        other = AdminFile(path)
        self.assertEqual(other.get("root").created, 5.0)
        other.add(Admin("two", "observer", "h", 0))
        self.assertEqual(sorted(admins.admins()), ["root", "two"])
        self.assertTrue(admins.remove("two"))
        self.assertFalse(admins.remove("two"))
        self.assertNotIn("two", other.admins())

    def test_badFile(self):
        """
        A file that is not an admins file means no accounts (and a log
        line), not a crash.
        """
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("{not json")
        self.assertEqual(AdminFile(path).admins(), {})

    def test_names(self):
        """
        Names and passwords are checked.
        """
        checkName("ops.admin@site-1")
        for bad in ["", "-x", "a b", "x" * 65, "é"]:
            self.assertRaises(AdminAccountError, checkName, bad)
        self.assertRaises(AdminAccountError, checkPassword, "short")
        checkPassword("long enough")

    def test_tokens(self):
        """
        Tokens are valid until they expire, can be revoked one by one or
        all of one admin's, and the oldest goes past the cap.
        """
        clock = Clock()
        tokens = AdminTokens(clock, ttl=60, maxTokens=2)
        root = Admin("root", ADMIN, "h", 0)
        first, grant = tokens.issue(root)
        self.assertEqual((grant.name, grant.role, grant.expires), ("root", ADMIN, 60))
        self.assertEqual(tokens.check(first), grant)
        self.assertIsNone(tokens.check(first + "x"))
        clock.advance(60)
        self.assertIsNone(tokens.check(first))
        a, _ = tokens.issue(root)
        b, _ = tokens.issue(root)
        c, _ = tokens.issue(Admin("other", ADMIN, "h", 0))
        self.assertIsNone(tokens.check(a), "the oldest went past maxTokens")
        self.assertEqual(tokens.revokeAll("root"), 1)
        self.assertIsNone(tokens.check(b))
        self.assertTrue(tokens.revoke(c))
        self.assertEqual(len(tokens), 0)

    def test_throttle(self):
        """
        Failed logins from one address are limited; one that succeeds gives
        its place back; other addresses are not affected.
        """
        clock = Clock()
        throttle = LoginThrottle(rate=1.0, burst=2, clock=clock)
        self.assertTrue(throttle.begin("a"))
        throttle.succeeded("a")
        self.assertTrue(throttle.begin("a"))
        self.assertTrue(throttle.begin("a"))
        self.assertFalse(throttle.begin("a"))
        self.assertTrue(throttle.begin("b"))
        clock.advance(1.0)
        self.assertTrue(throttle.begin("a"))
        self.assertTrue(LoginThrottle(0, 1, clock).begin("a"))

    def test_loopback(self):
        for host in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"]:
            self.assertTrue(isLoopback(host), host)
        for host in ["10.0.0.1", "::", "", "name"]:
            self.assertFalse(isLoopback(host), host)


class BansTests(SynchronousTestCase):
    def test_blockAndExpire(self):
        """
        A block lasts its seconds, is kept in its file, and can be lifted.
        """
        clock = Clock()
        clock.advance(1000)
        path = os.path.join(self.mktemp(), "blocks.json")
        bans = UserBans(path, clock)
        self.assertEqual(bans.block("u1", 10), 1010)
        bans.block("u2", 100)
        self.assertEqual(UserBans(path, clock).blocked(), {"u1": 1010, "u2": 1100})
        clock.advance(10)
        self.assertIsNone(bans.blockedUntil("u1"))
        self.assertEqual(bans.blockedUntil("u2"), 1100)
        self.assertTrue(bans.unblock("u2"))
        self.assertFalse(bans.unblock("u2"))
        self.assertEqual(UserBans(path, clock).blocked(), {})
        self.assertRaises(ValueError, bans.block, "u3", 0)
        self.assertRaises(ValueError, UserBans(None, clock, maxEntries=1).block, "u", float("inf"))


class OpenAPITests(AdminTestCase):
    @inlineCallbacks
    def test_document(self):
        """
        C{/api/openapi.json} needs no login and lists every endpoint; each
        that changes anything declares 403, each that needs a login 401.
        """
        answer = yield self.http("GET", "/api/openapi.json")
        self.assertEqual(answer.code, 200)
        document = answer.json
        self.assertEqual(document["openapi"], "3.0.3")
        operations = {op["operationId"]: op for methods in document["paths"].values() for op in methods.values()}
        self.assertEqual(set(operations), {e.name for e in self.admin.endpoints})
        for endpoint in self.admin.endpoints:
            responses = operations[endpoint.name]["responses"]
            self.assertEqual("403" in responses, endpoint.write, endpoint.name)
            self.assertEqual("401" in responses, endpoint.access != "public", endpoint.name)
        for name in ("timRegister", "timMessage", "timOnline", "getUser", "kickUser", "blockUser", "cluster", "store"):
            self.assertIn(name, operations)

    def test_documented(self):
        """
        docs/admin.md lists every endpoint with the role it needs.
        """
        root = sourceRoot()
        if root is None:
            requireOrSkip("no source checkout (docs/ is not installed)")
        doc = root.child("docs").child("admin.md").getContent().decode()
        for endpoint in self.admin.endpoints:
            role = "public" if endpoint.access == "public" else "admin" if endpoint.write else "observer"
            self.assertIn(f"| `{endpoint.method} {endpoint.path}` | {role} |", doc)


class AccessTests(AdminTestCase):
    """
    Who may call what.  Every endpoint needs a login except the document,
    health and login itself; an observer may call none that writes; and a
    refused call changes nothing.
    """

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.alice = yield self.user(self.node, "alice")
        self.vnode = yield self.alice.vroomRegister()

    def pathFor(self, endpoint):
        values = {"uid": self.alice.uid, "name": "root", "gid": "g1", "vnode": self.vnode}
        return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], endpoint.path)

    def bodyFor(self, endpoint):
        uid = self.alice.uid
        bodies = {
            "createAdmin": {"name": "intruder", "password": "intruder-pw", "role": "admin"},
            "createUser": {"name": "mallory", "password": "pw"},
            "blockUser": {"seconds": 100},
            "resetPassword": {"password": "changed"},
            "messageUser": {"text": "from an observer"},
            "broadcast": {"text": "from an observer"},
            "createGroup": {"founder": uid, "topic": "t"},
            "createVRoom": {"founder": uid},
            "timRegister": {"username": "mallory", "password": "pw"},
            "timToken": {"name": uid},
            "timMessage": {"nodes": {"nodelist": [uid]}, "message": {"dataString": "x"}},
            "timModifyUserInfo": {"node": uid, "userbean": {"nickName": "x"}},
            "timResetAuth": {"loginname": "alice", "pwd": "changed"},
            "timBlockUser": {"account": uid, "time": 100},
            "timNewRoom": {"node": uid, "topic": "t"},
            "timModifyRoomInfo": {"unode": uid, "gnode": "g1", "roombean": {"topic": "x"}},
            "timVroom": {"node": uid, "rtype": 1},
        }
        return bodies.get(endpoint.name, {} if endpoint.body is not None else None)

    @inlineCallbacks
    def assertNothingChanged(self):
        node = self.node
        self.assertEqual(sorted(self.admin.accounts.admins()), ["root", "watcher"])
        self.assertEqual(node.bans.blocked(), {})
        self.assertEqual(len(node.sessions.sessionsOf(self.alice.uid)), 1)
        self.assertFalse(self.alice.closed.called)
        self.assertEqual((yield node.store.countInbox(self.alice.uid)), 0)
        self.assertEqual((yield node.store.countFounded(self.alice.uid)), 0)
        self.assertEqual([s.vnode for s in node.vrooms.allStats()], [self.vnode])
        self.assertFalse((yield node.accounts.exists(node.keys.accountId("mallory", None))))
        self.assertIsNotNone((yield node.accounts.checkPassword("alice", "secret", "")))
        self.assertIsNone((yield node.store.getProfile(self.alice.uid)))
        self.assertEqual(self.alice.take(TimType.TIMMESSAGE), [])

    @inlineCallbacks
    def test_unauthenticated(self):
        """
        Without a login, or with a token that is not one, every endpoint
        but the public ones answers 401 and nothing changes.
        """
        checked = 0
        for endpoint in self.admin.endpoints:
            path, body = self.pathFor(endpoint), self.bodyFor(endpoint)
            if endpoint.access == "public":
                continue
            for token in (None, "not-a-token"):
                answer = yield self.http(endpoint.method, path, body, token=token)
                self.assertEqual(answer.code, 401, (endpoint.name, answer))
                self.assertEqual(answer.json["error"]["code"], "unauthorized")
                self.assertIn("Bearer", answer.header(b"www-authenticate"))
                checked += 1
        self.assertGreater(checked, 60)
        yield self.assertNothingChanged()

    @inlineCallbacks
    def test_observerMayNotWrite(self):
        """
        An observer gets 403 from every endpoint that changes anything, and
        nothing changes; the refusals are audited.
        """
        writes = [e for e in self.admin.endpoints if e.write]
        self.assertGreater(len(writes), 20)
        for endpoint in writes:
            answer = yield self.http(
                endpoint.method, self.pathFor(endpoint), self.bodyFor(endpoint), token=self.watcher
            )
            self.assertEqual(answer.code, 403, (endpoint.name, answer))
            self.assertEqual(answer.json["error"]["code"], "forbidden")
        yield self.assertNothingChanged()
        refused = [e for e in self.admin.audit.tail(1000) if e["outcome"] == "forbidden"]
        self.assertEqual({e["action"] for e in refused}, {e.name for e in writes})
        self.assertEqual({e["admin"] for e in refused}, {"watcher"})

    @inlineCallbacks
    def test_observerMayNotWriteWithTimHeaders(self):
        """
        tim's username and password headers carry the role too.
        """
        headers = {"username": "watcher", "password": WATCHER_PASSWORD}
        answer = yield self.http("POST", "/timRegister", {"username": "mallory", "password": "pw"}, headers=headers)
        self.assertEqual(answer.code, 403)
        answer = yield self.http("POST", "/timBlockList", {}, headers=headers)
        self.assertEqual((answer.code, answer.json), (200, {}))
        yield self.assertNothingChanged()

    @inlineCallbacks
    def test_observerReads(self):
        """
        An observer reads everything that only reads.
        """
        for endpoint in self.admin.endpoints:
            if endpoint.write or endpoint.access == "public" or endpoint.name == "logout":
                continue
            answer = yield self.http(
                endpoint.method, self.pathFor(endpoint), self.bodyFor(endpoint), token=self.watcher
            )
            expected = 404 if endpoint.name == "getGroup" else 200
            self.assertEqual(answer.code, expected, (endpoint.name, answer))

    @inlineCallbacks
    def test_adminMayWrite(self):
        """
        The same calls made by an admin succeed (so the refusals above are
        the role's doing).
        """
        answer = yield self.http("POST", f"/api/users/{self.alice.uid}/messages", {"text": "hi"}, token=self.root)
        self.assertEqual((answer.code, answer.json), (200, {"sent": 1}))
        answer = yield self.http("POST", "/api/users", {"name": "mallory", "password": "pw"}, token=self.root)
        self.assertEqual(answer.code, 200)

    @inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password, an unknown admin, and wrong tim headers are 401;
        each refused login is audited without the password.
        """
        for name, password in [("root", "wrong-password"), ("nobody", "whatever-pw")]:
            answer = yield self.http("POST", "/api/login", {"name": name, "password": password})
            self.assertEqual(answer.code, 401)
        answer = yield self.http("POST", "/timOnline", {}, headers={"username": "root", "password": "wrong-password"})
        self.assertEqual(answer.code, 401)
        failed = [e for e in self.admin.audit.tail(100) if e["action"] == "login" and e["outcome"] != "ok"]
        self.assertEqual([e["target"] for e in failed], ["root", "nobody"])
        with open(self.admin.audit.path) as f:
            log = f.read()
        for secret in ("wrong-password", "whatever-pw", ROOT_PASSWORD, self.root):
            self.assertNotIn(secret, log)

    @inlineCallbacks
    def test_loginRateLimit(self):
        """
        Logins from one address past [admin] login_burst get 429 until the
        bucket refills.
        """
        codes = []
        for _ in range(12):
            answer = yield self.http("POST", "/api/login", {"name": "root", "password": "wrong-password"})
            codes.append(answer.code)
        self.assertIn(429, codes)
        self.assertNotIn(200, codes)

    @inlineCallbacks
    def test_logout(self):
        """
        A token ends at logout; a deleted admin's tokens end with it.
        """
        token = yield self.loginAs("root", ROOT_PASSWORD)
        answer = yield self.http("POST", "/api/logout", token=token)
        self.assertEqual(answer.code, 200)
        answer = yield self.http("GET", "/api/me", token=token)
        self.assertEqual(answer.code, 401)
        answer = yield self.http("DELETE", "/api/admins/watcher", token=self.root)
        self.assertEqual(answer.code, 200)
        answer = yield self.http("GET", "/api/me", token=self.watcher)
        self.assertEqual(answer.code, 401)


class BadInputTests(AdminTestCase):
    @inlineCallbacks
    def test_malformedJSON(self):
        """
        A body that is not JSON, or JSON of the wrong shape, is 400 and
        says why.
        """
        for raw in [b"{", b"\xff\xfe", b"[1, 2]", b'{"text": 5}', b'{"text": "x", "bogus": 1}']:
            answer = yield self.http("POST", "/api/broadcast", raw=raw, token=self.root)
            self.assertEqual(answer.code, 400, raw)
            self.assertEqual(answer.json["error"]["code"], "bad_request")
        answer = yield self.http("GET", "/api/sessions?limit=lots", token=self.root)
        self.assertEqual(answer.code, 400)
        answer = yield self.http("GET", "/api/sessions?limit=0", token=self.root)
        self.assertEqual(answer.code, 400)

    @inlineCallbacks
    def test_oversize(self):
        """
        A body over [admin] max_body_bytes is refused with 413 before it is
        read, and the node goes on.
        """
        raw = b'{"text": "' + b"x" * (self.node.config.admin.max_body_bytes + 10) + b'"}'
        answer = yield self.http("POST", "/api/broadcast", raw=raw, token=self.root)
        self.assertEqual(answer.code, 413)
        answer = yield self.http("GET", "/api/me", token=self.root)
        self.assertEqual(answer.code, 200)

    @inlineCallbacks
    def test_oversizeMessage(self):
        """
        A system message over [messages] max_body_bytes is 413.
        """
        text = "x" * (self.node.config.messages.max_body_bytes + 1)
        answer = yield self.http("POST", "/api/broadcast", {"text": text}, token=self.root)
        self.assertEqual(answer.code, 413)

    @inlineCallbacks
    def test_routes(self):
        """
        Unknown paths are 404, a known path with another method 405, odd
        path bytes 400; all in JSON, none with a traceback.
        """
        for method, path, code in [
            ("GET", "/api/nothing", 404),
            ("PUT", "/api/node", 405),
            ("GET", "/api/users/%FF", 400),
            ("GET", "/api/users/" + "x" * 200, 400),
            ("GET", "/api/users/nobody", 404),
            ("GET", "/api/groups/nogroup", 404),
            ("GET", "/api/vrooms/noroom", 404),
            ("DELETE", "/api/admins/nobody", 404),
        ]:
            answer = yield self.http(method, path, token=self.root)
            self.assertEqual(answer.code, code, (method, path, answer))
            self.assertNotIn(b"Traceback", answer.body)
            self.assertIn("error", answer.json)


class UserTests(AdminTestCase):
    @inlineCallbacks
    def test_user(self):
        """
        An account with its sessions; the node's sessions a page at a
        time.
        """
        alice = yield self.user(self.node, "alice", termtyp=3)
        yield self.user(self.node, "bob")
        answer = yield self.http("GET", f"/api/users/{alice.uid}", token=self.watcher)
        user = answer.json
        self.assertEqual(
            (user["uid"], user["online"], user["blockedUntil"], user["groups"]), (alice.uid, True, None, 0)
        )
        (session,) = user["sessions"]
        self.assertEqual((session["termtyp"], session["transport"], session["address"]), (3, "ws", "127.0.0.1"))
        answer = yield self.http("GET", "/api/sessions?limit=1", token=self.watcher)
        self.assertEqual((answer.json["total"], len(answer.json["sessions"])), (2, 1))
        answer = yield self.http("GET", "/api/sessions?offset=1&limit=5", token=self.watcher)
        self.assertEqual(len(answer.json["sessions"]), 1)

    @inlineCallbacks
    def test_kick(self):
        """
        Kicking logs out every session of the account: TIMLOGOUT, then the
        connection closes.
        """
        alice = yield self.user(self.node, "alice", termtyp=1)
        other = yield self.user(self.node, "alice", termtyp=2, registerFirst=False)
        answer = yield self.http("POST", f"/api/users/{alice.uid}/kick", token=self.root)
        self.assertEqual(answer.json, {"kicked": 2})
        for client in (alice, other):
            incoming = yield within(client.next(lambda i: i.timType == TimType.TIMACK))
            self.assertEqual(incoming.body.timType, TimType.TIMLOGOUT)
            yield within(client.closed)
        (entry,) = [e for e in self.admin.audit.tail(10) if e["action"] == "kickUser"]
        self.assertEqual((entry["admin"], entry["target"], entry["sessions"]), ("root", alice.uid, 2))

    @inlineCallbacks
    def test_block(self):
        """
        A blocked account is logged out and cannot log in (4110) until the
        block is lifted.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.http("POST", f"/api/users/{alice.uid}/block", {"seconds": 3600}, token=self.root)
        self.assertEqual(answer.code, 200)
        yield within(alice.closed)
        client = yield connect(reactor, wsURL(self.node))
        self.addCleanup(client.disconnect)
        error = yield self.assertFailure(client.login("alice", "secret"), TimRequestFailed)
        self.assertEqual(error.code, ErrorCode.ERR_BLOCK)
        self.assertEqual(self.node.loginFailures, {"err_block": 1})
        answer = yield self.http("GET", "/api/blocks", token=self.watcher)
        self.assertEqual([b["uid"] for b in answer.json["blocks"]], [alice.uid])
        answer = yield self.http("DELETE", f"/api/users/{alice.uid}/block", token=self.root)
        self.assertEqual(answer.json, {"ok": True})
        yield client.login("alice", "secret")

    @inlineCallbacks
    def test_systemMessage(self):
        """
        A system message reaches the account as msType 1, odType 1, and
        waits in its inbox until acknowledged.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.http(
            "POST", f"/api/users/{alice.uid}/messages", {"text": "maintenance at 10", "udtype": 7}, token=self.root
        )
        self.assertEqual(answer.json, {"sent": 1})
        incoming = yield within(alice.next(TimType.TIMMESSAGE))
        message = incoming.body
        self.assertEqual(
            (message.msType, message.odType, message.dataString, message.udtype), (1, 1, "maintenance at 10", 7)
        )
        self.assertEqual(message.toTid.node, alice.uid)
        yield waitUntil(lambda: self.node.inbox.acked == 1)
        answer = yield self.http("POST", "/api/users/nobody/messages", {"text": "x"}, token=self.root)
        self.assertEqual(answer.code, 404)

    @inlineCallbacks
    def test_broadcast(self):
        """
        A broadcast reaches every account online here, or the ones named.
        """
        alice = yield self.user(self.node, "alice")
        bob = yield self.user(self.node, "bob")
        answer = yield self.http("POST", "/api/broadcast", {"text": "to all"}, token=self.root)
        self.assertEqual(answer.json, {"sent": 2})
        for client in (alice, bob):
            incoming = yield within(client.next(TimType.TIMMESSAGE))
            self.assertEqual((incoming.body.msType, incoming.body.dataString), (MsType.SOURCE_OS, "to all"))
        answer = yield self.http("POST", "/api/broadcast", {"text": "to bob", "users": [bob.uid]}, token=self.root)
        self.assertEqual(answer.json, {"sent": 1})
        incoming = yield within(bob.next(TimType.TIMMESSAGE))
        self.assertEqual(incoming.body.dataString, "to bob")

    @inlineCallbacks
    def test_registerTokenPassword(self):
        """
        An operator registers an account, gets it a login token without its
        password, and sets a new password.
        """
        answer = yield self.http("POST", "/api/users", {"name": "carol", "password": "first"}, token=self.root)
        uid = answer.json["uid"]
        answer = yield self.http("POST", "/api/users", {"name": "carol", "password": "again"}, token=self.root)
        self.assertEqual((answer.code, answer.json["error"]["code"]), (409, "err_hasexist"))
        answer = yield self.http("POST", f"/api/users/{uid}/token", token=self.root)
        token = answer.json["token"]
        client = yield connect(reactor, wsURL(self.node))
        self.addCleanup(client.disconnect)
        login = yield client.login(token=token)
        self.assertEqual(login.n, uid)
        answer = yield self.http("POST", f"/api/users/{uid}/password", {"password": "second"}, token=self.root)
        self.assertEqual(answer.json, {"ok": True})
        self.assertIsNotNone((yield self.node.accounts.checkPassword("carol", "second", "")))

    @inlineCallbacks
    def test_admins(self):
        """
        An admin creates another admin, who can log in; names are unique.
        """
        body = {"name": "second", "password": "second-password", "role": "observer"}
        answer = yield self.http("POST", "/api/admins", body, token=self.root)
        self.assertEqual(answer.json["role"], "observer")
        self.assertNotIn("hash", answer.json)
        answer = yield self.http("POST", "/api/admins", body, token=self.root)
        self.assertEqual(answer.code, 409)
        yield self.loginAs("second", "second-password")
        answer = yield self.http("GET", "/api/admins", token=self.watcher)
        self.assertEqual([a["name"] for a in answer.json["admins"]], ["root", "second", "watcher"])
        answer = yield self.http("POST", "/api/admins", {"name": "x y", "password": "long-password"}, token=self.root)
        self.assertEqual(answer.code, 400)


class GroupAndRoomTests(AdminTestCase):
    @inlineCallbacks
    def test_groups(self):
        """
        A group made for a founder, read back, and dissolved.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.http("POST", "/api/groups", {"founder": alice.uid, "topic": "ops"}, token=self.root)
        gid = answer.json["gid"]
        answer = yield self.http("GET", f"/api/groups/{gid}", token=self.watcher)
        group = answer.json
        self.assertEqual(
            (group["founder"], group["topic"], group["type"], group["members"], group["alive"]),
            (alice.uid, "ops", "open", [alice.uid], True),
        )
        answer = yield self.http("GET", f"/api/users/{alice.uid}/groups", token=self.watcher)
        self.assertEqual(answer.json, {"groups": [gid]})
        answer = yield self.http("DELETE", f"/api/groups/{gid}", token=self.root)
        self.assertEqual(answer.json, {"ok": True})
        answer = yield self.http("DELETE", f"/api/groups/{gid}", token=self.root)
        self.assertEqual(answer.code, 404)

    @inlineCallbacks
    def test_vrooms(self):
        """
        Virtual rooms made for a founder, listed with their statistics, and
        removed (subscribers are told).
        """
        alice = yield self.user(self.node, "alice")
        bob = yield self.user(self.node, "bob")
        answer = yield self.http("POST", "/api/vrooms", {"founder": alice.uid}, token=self.root)
        vnode = answer.json["vnode"]
        yield bob.vroomSubscribe(vnode)
        alice.pushStream(vnode, b"frame")
        yield within(bob.next(TimType.TIMSTREAM))
        answer = yield self.http("GET", "/api/vrooms", token=self.watcher)
        (room,) = answer.json["rooms"]
        self.assertEqual(
            (room["vnode"], room["founder"], room["subscribers"], room["frames"]), (vnode, alice.uid, 1, 1)
        )
        answer = yield self.http("GET", f"/api/vrooms/{vnode}", token=self.watcher)
        self.assertEqual(answer.json["delivered"], 1)
        answer = yield self.http("DELETE", f"/api/vrooms/{vnode}", token=self.root)
        self.assertEqual(answer.json, {"ok": True})
        self.assertEqual(self.node.vrooms.allStats(), [])


class TimApiTests(AdminTestCase):
    """
    tim 2.0's server API, with tim's shapes.
    """

    def tim(self, path, body, **kwargs):
        kwargs.setdefault("headers", {"username": "root", "password": ROOT_PASSWORD})
        return self.http("POST", path, body, **kwargs)

    @inlineCallbacks
    def test_registerAndToken(self):
        """
        /timRegister answers C{{ok, n: account id}}; /timToken a token for
        the account id (C{t}), which logs in.
        """
        answer = yield self.tim("/timRegister", {"username": "dora", "password": "pw", "domain": "d1"})
        self.assertEqual(answer.code, 200)
        ack = answer.json
        self.assertTrue(ack["ok"])
        uid = ack["n"]
        answer = yield self.tim("/timRegister", {"username": "dora", "password": "pw", "domain": "d1"})
        self.assertEqual(answer.json["ok"], False)
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_HASEXIST)
        answer = yield self.tim("/timToken", {"name": uid, "domain": "d1"})
        ack = answer.json
        self.assertEqual((ack["ok"], ack["timType"]), (True, TimType.TIMTOKEN))
        client = yield connect(reactor, wsURL(self.node))
        self.addCleanup(client.disconnect)
        self.assertEqual((yield client.login(token=ack["t"])).n, uid)
        answer = yield self.tim("/timToken", {"name": "nobody"})
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_ACCOUNT)
        answer = yield self.tim("/timToken", {})
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_PARAMS)

    @inlineCallbacks
    def test_message(self):
        """
        /timMessage sends a system message to each listed account; an
        unknown account sends nothing (tim's rule).  The form encoding tim
        accepts works too.
        """
        alice = yield self.user(self.node, "alice")
        body = {"nodes": {"nodelist": [alice.uid]}, "message": {"dataString": "hello", "udtype": 3}}
        answer = yield self.tim("/timMessage", body)
        self.assertEqual(answer.json, {"ok": True, "timType": 0})
        incoming = yield within(alice.next(TimType.TIMMESSAGE))
        self.assertEqual((incoming.body.msType, incoming.body.odType), (MsType.SOURCE_OS, OdType.ORDER_INOF))
        answer = yield self.tim(
            "/timMessage", {"nodes": {"nodelist": [alice.uid, "nobody"]}, "message": {"dataString": "x"}}
        )
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_ACCOUNT)
        form = "nodes=" + json.dumps({"nodelist": [alice.uid]}) + "&message=" + json.dumps({"dataString": "by form"})
        from urllib.parse import quote

        raw = "&".join(f"{k}={quote(v)}" for k, v in (pair.split("=", 1) for pair in form.split("&"))).encode()
        answer = yield self.tim(
            "/timMessage",
            None,
            raw=raw,
            headers={
                "username": "root",
                "password": ROOT_PASSWORD,
                "content-type": "application/x-www-form-urlencoded",
            },
        )
        self.assertEqual(answer.json["ok"], True)
        incoming = yield within(alice.next(TimType.TIMMESSAGE))
        self.assertEqual(incoming.body.dataString, "by form")
        self.assertEqual(alice.take(TimType.TIMMESSAGE), [])

    @inlineCallbacks
    def test_blockUser(self):
        """
        /timBlockUser blocks for C{time} seconds and logs the account out;
        /timBlockList lists it; a negative time unblocks.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.tim("/timBlockUser", {"account": alice.uid, "time": 600})
        self.assertEqual(answer.json["n"], alice.uid)
        yield within(alice.closed)
        answer = yield self.tim("/timBlockList", {})
        self.assertEqual(list(answer.json), [alice.uid])
        self.assertIsInstance(answer.json[alice.uid], int)
        answer = yield self.tim("/timBlockUser", {"account": alice.uid, "time": -1})
        answer = yield self.tim("/timBlockList", {})
        self.assertEqual(answer.json, {})

    @inlineCallbacks
    def test_online(self):
        """
        /timOnline lists the Tid of each session here.
        """
        alice = yield self.user(self.node, "alice", resource="phone", termtyp=2)
        answer = yield self.tim("/timOnline", {})
        self.assertEqual(answer.json, [{"node": alice.uid, "resource": "phone", "termtyp": 2}])

    @inlineCallbacks
    def test_rooms(self):
        """
        /timNewRoom creates a group for its founder; /timModifyRoomInfo
        changes it as a manager would; /timVroom registers a virtual room.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.tim("/timNewRoom", {"node": alice.uid, "topic": "first", "gtype": 1})
        gid = answer.json["n"]
        state = yield self.node.directory.get(gid)
        self.assertEqual((state.group.founder, state.group.gtype), (alice.uid, 1))
        answer = yield self.tim(
            "/timModifyRoomInfo", {"unode": alice.uid, "gnode": gid, "roombean": {"topic": "second"}}
        )
        self.assertEqual(answer.json["ok"], True)
        answer = yield self.http("GET", f"/api/groups/{gid}", token=self.root)
        self.assertEqual(answer.json["topic"], "second")
        answer = yield self.tim("/timModifyRoomInfo", {"unode": "nobody", "gnode": gid, "roombean": {"topic": "x"}})
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_ACCOUNT)
        answer = yield self.tim("/timVroom", {"node": alice.uid, "rtype": 1})
        vnode = answer.json["n"]
        self.assertEqual(self.node.vrooms.stats(vnode).founder, alice.uid)

    @inlineCallbacks
    def test_userInfoAndPassword(self):
        """
        /timModifyUserInfo sets a profile; /timResetAuth a password.
        """
        alice = yield self.user(self.node, "alice")
        answer = yield self.tim("/timModifyUserInfo", {"node": alice.uid, "userbean": {"nickName": "Al"}})
        self.assertEqual(answer.json["ok"], True)
        profiles = yield within(alice.nodes(NodeInfo.USERINFO, nodelist=[alice.uid]))
        self.assertIsInstance(profiles, TimNodes)
        self.assertEqual(profiles.usermap[alice.uid].nickName, "Al")
        answer = yield self.tim("/timResetAuth", {"loginname": "alice", "pwd": "new-one"})
        self.assertEqual(answer.json, {"ok": True, "timType": 0, "n": "alice"})
        self.assertIsNotNone((yield self.node.accounts.checkPassword("alice", "new-one", "")))
        answer = yield self.tim("/timResetAuth", {"loginname": "nobody", "pwd": "x"})
        self.assertEqual(answer.json["error"]["code"], ErrorCode.ERR_ACCOUNT)

    @inlineCallbacks
    def test_bearerToo(self):
        """
        tim's endpoints take a bearer token as well.
        """
        answer = yield self.http("POST", "/timOnline", {}, token=self.watcher)
        self.assertEqual((answer.code, answer.json), (200, []))


class AuditTests(AdminTestCase):
    @inlineCallbacks
    def test_lines(self):
        """
        Each action is one JSON line: when, who, from where, what, on what,
        the outcome; reads are not written.
        """
        alice = yield loggedInClient(reactor, self.node, "alice", testCase=self)
        yield self.http("POST", f"/api/users/{alice.uid}/block", {"seconds": 60}, token=self.root)
        yield self.http("GET", "/api/blocks", token=self.root)
        with open(self.admin.audit.path) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([line["action"] for line in lines], ["login", "login", "blockUser"])
        block = lines[-1]
        self.assertEqual(
            {k: block[k] for k in ("admin", "role", "address", "target", "outcome", "seconds")},
            {
                "admin": "root",
                "role": "admin",
                "address": "127.0.0.1",
                "target": alice.uid,
                "outcome": "ok",
                "seconds": 60,
            },
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.admin.audit.path).st_mode), 0o600)
