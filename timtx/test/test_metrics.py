# -*- test-case-name: timtx.test.test_metrics -*-
"""
Tests for the node's numbers: histograms, timed store calls, C{/metrics},
the dashboard's data and files, and what the logs never hold.
"""

import json
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from timtx.admin.metrics import Sampler, frameTypeLabel
from timtx.admin.service import STATIC_FILES, staticFile
from timtx.persistence.errors import SequenceConflict, StoreUnavailable
from timtx.persistence.memory import MemoryStore
from timtx.persistence.timed import TimedStore
from timtx.protocols.constants import TimType
from timtx.protocols.structs import Tid
from timtx.test.admintools import ROOT_PASSWORD, AdminTestCase
from timtx.test.base import waitUntil, within
from timtx.testing import sourceRoot
from timtx.util.histogram import Histogram, StoreStats, percentile


class HistogramTests(SynchronousTestCase):
    def test_buckets(self):
        """
        Values fall in the first bucket whose bound they do not exceed;
        larger ones in the overflow bucket; cumulative counts as Prometheus
        wants them.
        """
        h = Histogram([1.0, 2.0, 5.0])
        for value in (0.5, 1.0, 1.5, 5.0, 7.0):
            h.observe(value)
        self.assertEqual(h.counts, [2, 1, 1, 1])
        self.assertEqual(h.cumulative(), [2, 3, 4, 5])
        self.assertEqual((h.count, h.sum), (5, 15.0))
        self.assertRaises(ValueError, Histogram, [2.0, 1.0])

    def test_percentile(self):
        """
        Quantiles interpolate inside their bucket; none without data; the
        overflow bucket reports the last bound.
        """
        bounds = [1.0, 2.0, 4.0]
        self.assertIsNone(percentile(bounds, [0, 0, 0, 0], 0.5))
        self.assertEqual(percentile(bounds, [10, 0, 0, 0], 0.5), 0.5)
        self.assertEqual(percentile(bounds, [0, 10, 0, 0], 0.5), 1.5)
        self.assertEqual(percentile(bounds, [5, 0, 5, 0], 0.99), 2.0 + 2.0 * 4.9 / 5)
        self.assertEqual(percentile(bounds, [0, 0, 0, 3], 0.5), 4.0)

    def test_since(self):
        """
        What was observed after a snapshot.
        """
        h = Histogram([1.0])
        h.observe(0.5)
        before = h.snapshot()
        h.observe(2.0)
        self.assertEqual(h.since(before), ([0, 1], 2.0))


class TimedStoreTests(SynchronousTestCase):
    def test_timesEveryOperation(self):
        """
        Each operation's result passes through unchanged and its latency and
        outcome are recorded; a store that cannot be reached makes the store
        unavailable until a call succeeds.
        """
        stats = StoreStats()
        store = TimedStore(MemoryStore(), stats.observe)
        self.successResultOf(store.open())
        self.assertEqual(store.name, "memory")
        self.assertEqual(self.successResultOf(store.countInbox("u")), 0)
        self.assertEqual(stats.latency["countInbox"].count, 1)
        self.assertEqual(stats.outcomes, {"ok": 1, "unavailable": 0, "conflict": 0, "error": 0})

        class Down:
            name = "down"

            def countInbox(self, uid):
                return fail(StoreUnavailable("down"))

            def getAccount(self, uid):
                return fail(ValueError("bug"))

            def appendMessages(self, messages):
                return fail(SequenceConflict("c", 1))

            def relationsOf(self, uid):
                return succeed([])

        down = TimedStore(Down(), stats.observe)
        self.failureResultOf(down.countInbox("u"), StoreUnavailable)
        self.assertFalse(stats.available)
        self.failureResultOf(down.getAccount("u"), ValueError)
        # A fence refusing a write is the store working, not an error.
        self.failureResultOf(down.appendMessages([]), SequenceConflict)
        self.assertEqual(stats.outcomes, {"ok": 1, "unavailable": 1, "conflict": 1, "error": 1})
        self.successResultOf(down.relationsOf("u"))
        self.assertTrue(stats.available)
        self.assertEqual(stats.merged().count, 5)


class SamplerTests(SynchronousTestCase):
    def test_lagAndRates(self):
        """
        The sampler measures how late its timer ran and turns counters into
        rates per second.
        """
        from timtx.node import Node
        from timtx.testing import testConfig

        clock = Clock()
        node = Node(testConfig(self.mktemp()), reactor, clock=clock, store=MemoryStore())
        sampler = Sampler(node, clock)
        sampler.start()
        node.conversations.stored = 10
        clock.advance(1.0)
        node.conversations.stored = 30
        clock.advance(1.5)  # the tick was due at 2.0
        sampler.stop()
        self.assertEqual(sampler.lag.count, 2)
        self.assertAlmostEqual(sampler.lag.sum, 0.5)
        recent = sampler.recent(10)
        self.assertEqual(recent["totals"]["stored"], 30)
        self.assertAlmostEqual(recent["rates"]["stored"], 30 / 2.5)
        self.assertEqual(len(recent["series"]["messages"]), 2)

    def test_labels(self):
        self.assertEqual(frameTypeLabel(TimType.TIMMESSAGE), "message")
        self.assertEqual(frameTypeLabel(TimType.TIMBUSINESS), "business")
        self.assertEqual(frameTypeLabel(127), "unknown")


def parse(text):
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families, name, **labels):
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError((name, labels))


class MetricsTests(AdminTestCase):
    @inlineCallbacks
    def test_scrape(self):
        """
        /metrics needs no login on loopback and is Prometheus text: counters
        move with traffic, and no label carries a user id.
        """
        alice = yield self.user(self.node, "alice")
        bob = yield self.user(self.node, "bob")
        yield self.befriend(self.node, alice, bob)
        for n in range(5):
            alice.sendMessage(bob.uid, f"m{n}")
        yield waitUntil(lambda: self.node.inbox.acked >= 5)
        answer = yield self.http("GET", "/metrics")
        self.assertEqual(answer.code, 200)
        self.assertTrue(answer.header(b"content-type").startswith("text/plain"))
        text = answer.body.decode()
        families = parse(text)
        self.assertEqual(value(families, "timtx_sessions"), 2)
        self.assertEqual(value(families, "timtx_logins_total"), 2)
        self.assertGreaterEqual(value(families, "timtx_messages_stored_total"), 5)
        self.assertEqual(value(families, "timtx_frames_received_total", type="message"), 5)
        self.assertGreaterEqual(value(families, "timtx_deliveries_total", kind="direct"), 5)
        self.assertGreaterEqual(value(families, "timtx_ack_latency_seconds_count", kind="direct"), 5)
        self.assertGreater(
            value(families, "timtx_store_operation_duration_seconds_count", operation="appendMessages"), 0
        )
        self.assertEqual(value(families, "timtx_store_available"), 1)
        self.assertEqual(value(families, "timtx_cluster_members", state="alive"), 1)
        self.assertIn("process_resident_memory_bytes", families)
        for name in families:
            self.assertRegex(name, r"^(timtx|process)_[a-z0-9_]+$")
        for uid in (alice.uid, bob.uid):
            self.assertNotIn(uid, text)
        self.assertNotIn("alice", text)
        root = sourceRoot()
        if root is not None:
            doc = root.child("docs").child("monitoring.md").getContent().decode()
            for family in families.values():
                if family.name.startswith("timtx_"):
                    suffix = "_total" if family.type == "counter" else ""
                    self.assertIn(f"| `{family.name}{suffix}` |", doc, "docs/monitoring.md lists every metric")

    @inlineCallbacks
    def test_openMetrics(self):
        """
        A scraper asking for OpenMetrics gets it.
        """
        answer = yield self.http("GET", "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        self.assertIn("openmetrics", answer.header(b"content-type"))
        self.assertTrue(answer.body.endswith(b"# EOF\n"))

    @inlineCallbacks
    def test_groupAndSlowReaders(self):
        """
        Group fan-out counts per message; a slow reader dropped is counted.
        """
        alice = yield self.user(self.node, "alice")
        bob = yield self.user(self.node, "bob")
        gid = (yield alice.business(8, node="g")).n
        yield bob.business(9, node=gid)
        alice.sendMessage(None, "to the group", roomTid=Tid(node=gid), msType=3)
        yield within(bob.next(lambda i: i.timType == TimType.TIMMESSAGE and i.body.dataString == "to the group"))
        self.assertGreaterEqual(self.node.fanout.messages, 1)
        self.assertGreaterEqual(self.node.fanout.delivered, 1)
        self.assertEqual(self.node.fanout.fanoutSeconds.count, self.node.fanout.messages)
        (sink,) = [s.sink for s in self.node.sessions.sessionsOf(bob.uid)]
        sink.outputLimitExceeded()
        yield within(bob.closed)
        yield waitUntil(lambda: self.node.slowReadersDropped == 1)
        families = parse((yield self.http("GET", "/metrics")).body.decode())
        self.assertEqual(value(families, "timtx_slow_readers_dropped_total"), 1)
        self.assertGreaterEqual(value(families, "timtx_fanout_duration_seconds_count"), 1)


class MetricsAuthTests(AdminTestCase):
    adminSections = {"admin": {"metrics_auth": "always"}}

    @inlineCallbacks
    def test_login(self):
        """
        With metrics_auth = always, /metrics wants a token.
        """
        answer = yield self.http("GET", "/metrics")
        self.assertEqual(answer.code, 401)
        answer = yield self.http("GET", "/metrics", token=self.watcher)
        self.assertEqual(answer.code, 200)


class DashboardTests(AdminTestCase):
    @inlineCallbacks
    def test_files(self):
        """
        The dashboard's files come from the package, under a policy that
        allows nothing from elsewhere; the page refers to nothing outside
        this listener.
        """
        answer = yield self.http("GET", "/")
        self.assertEqual(answer.code, 200)
        self.assertIn("default-src 'none'", answer.header(b"content-security-policy"))
        page = answer.body.decode()
        for reference in re.findall(r'(?:src|href)="([^"]+)"', page):
            self.assertTrue(reference.startswith("/") or reference == "data:,", reference)
        for name, kind in STATIC_FILES.items():
            answer = yield self.http("GET", f"/static/{name}")
            self.assertEqual((answer.code, answer.header(b"content-type")), (200, kind))
            self.assertEqual(answer.body, staticFile(name))
            self.assertNotRegex(answer.body.decode(), r"https?://(?!www\.w3\.org/2000/svg)")
        answer = yield self.http("GET", "/static/nothing.js")
        self.assertEqual(answer.code, 404)

    @inlineCallbacks
    def test_data(self):
        """
        /api/dashboard has what the page shows.
        """
        yield self.user(self.node, "alice")
        answer = yield self.http("GET", "/api/dashboard?window=5", token=self.watcher)
        data = answer.json
        self.assertEqual(data["node"]["id"], data["cluster"]["self"])
        self.assertEqual(data["gauges"]["sessions"], 1)
        for key in ("fanout", "store", "ackDirect", "lag"):
            self.assertIn("p99", data["latency"][key])
        for key in ("messages", "deliveries", "sessions", "fanoutP99", "storeP99", "lag"):
            self.assertIn(key, data["series"])
        self.assertEqual(data["store"], {"backend": "memory", "open": True, "available": True})


PLANTED = {
    "userPassword": "Planted-User-Password-5d1f",
    "adminPassword": "Planted-Admin-Password-8a2c",
    "body": "Planted message body 77e1",
    "systemText": "Planted system text 4b90",
}


class LogSecretsTests(AdminTestCase):
    """
    A representative workload with planted secrets; no log event, as
    text or as a JSON line, holds any of them.
    """

    @inlineCallbacks
    def test_noSecretsLogged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        answer = yield self.http(
            "POST", "/api/admins", {"name": "planter", "password": PLANTED["adminPassword"]}, token=self.root
        )
        self.assertEqual(answer.code, 200)
        admin = yield self.loginAs("planter", PLANTED["adminPassword"])
        yield self.http("POST", "/api/login", {"name": "planter", "password": PLANTED["adminPassword"] + "x"})
        alice = yield self.user(self.node, "alice", password=PLANTED["userPassword"])
        bob = yield self.user(self.node, "bob", password=PLANTED["userPassword"])
        yield self.befriend(self.node, alice, bob)
        alice.sendMessage(bob.uid, PLANTED["body"])
        yield within(bob.next(TimType.TIMMESSAGE))
        token = (yield self.http("POST", f"/api/users/{alice.uid}/token", token=admin)).json["token"]
        yield self.http("POST", "/api/broadcast", {"text": PLANTED["systemText"]}, token=admin)
        yield self.http("POST", f"/api/users/{bob.uid}/password", {"password": PLANTED["userPassword"]}, token=admin)
        yield self.http("POST", "/timOnline", {}, headers={"username": "root", "password": ROOT_PASSWORD})
        yield self.http("POST", "/timOnline", {}, headers={"username": "root", "password": PLANTED["adminPassword"]})
        yield self.http("POST", f"/api/users/{alice.uid}/kick", token=admin)
        yield within(alice.closed)
        self.assertGreater(len(events), 10)
        secrets = [*PLANTED.values(), admin, str(token), ROOT_PASSWORD, self.root]
        for event in events:
            for rendered in (formatEvent(event) or "", eventAsJSON(event)):
                for secret in secrets:
                    self.assertNotIn(secret, rendered, event)
        texts = [formatEvent(e) or "" for e in events]
        self.assertTrue(any(t.startswith(f"login {alice.uid}") for t in texts))
        self.assertTrue(any(t.startswith(f"logout {alice.uid}") for t in texts))
        self.assertTrue(any(t.startswith("admin kickUser") for t in texts))
        self.assertTrue(any(t.startswith("admin login planter") and t.endswith("unauthorized") for t in texts))
        with open(self.admin.audit.path) as f:
            audit = f.read()
        for secret in secrets:
            self.assertNotIn(secret, audit)
        json.loads(audit.splitlines()[-1])
