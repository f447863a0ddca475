"""
Random payloads for every routing kind a node handles, from an
authenticated peer: each is handled or refused as malformed (L{BadPayload}
or another L{PeerRequestError}, never "internal error"), nothing else is
logged (trial fails a test on any logged error), and the mesh goes on
routing.

The kinds are read from the node (L{ClusterService.kinds}), so a kind added
later is fuzzed without touching this file.  The peer is trusted (it knows
the cluster secret); what this guards against is a node running other code
or a bug in the sender, which must cost one message, not the link or the
node.
"""

import json
import os
import random

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial.unittest import TestCase

from timtx.cluster.membership import PeerRequestError, PeerRequestFailed, PeerTimeout
from timtx.cluster.wire import BadPayload, pack
from timtx.test.test_clusterrouting import ClusterFixture
from timtx.test.test_messaging import isMessage

#: Field values that have broken parsers before: empty, signs, huge and
#: non-decimal numbers, bytes that are not UTF-8, separators, JSON fragments.
FIELDS = [
    b"",
    b"0",
    b"-1",
    b"1",
    b"18446744073709551617",
    b"1e9",
    b" 7",
    b"nan",
    b"\xff\xfe\x00",
    b"fuzz-user",
    b"fuzz-user@",
    b"node1",
    b"node2",
    b"{}",
    b"[]",
    b"null",
    b'{"uid": "fuzz-user"}',
    b"\x00" * 3,
    b"x" * 300,
]

JSON_KEYS = ["uid", "domain", "sessions", "node", "nodes", "gid", "rid", "seq", "qid", "since", "count", "ids", "x"]


def jsonValue(rng, depth=0):
    choice = rng.randrange(7 if depth < 2 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([0, -1, 1, 2**63, 1.5, True])
    if choice == 2:
        return rng.choice(["", "fuzz-user", "node2", "\u00f6", "0" * 40])
    if choice == 3:
        return []
    if choice == 4:
        return {}
    if choice == 5:
        return [jsonValue(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(JSON_KEYS): jsonValue(rng, depth + 1) for _ in range(rng.randrange(4))}


def randomPayload(rng):
    shape = rng.randrange(4)
    if shape == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    if shape == 1:
        return pack(*(rng.choice(FIELDS) for _ in range(rng.randrange(8))))
    if shape == 2:
        return pack(*(rng.choice(FIELDS) for _ in range(rng.randrange(8))))[: rng.randrange(1, 30)]
    return json.dumps(jsonValue(rng)).encode()


class RoutingFuzzTests(ClusterFixture, TestCase):
    """
    Two nodes; one sends the other random payloads of every kind.
    """

    timeout = 120
    payloadsPerKind = 60

    @inlineCallbacks
    def test_randomPayloads(self):
        node1, node2 = yield self.cluster(2)
        kinds = sorted(node2.cluster.kinds)
        self.assertIn("route.push", kinds)
        # A fixed seed, so that a failure repeats; TIMTX_FUZZ_SEED tries others.
        rng = random.Random(int(os.environ.get("TIMTX_FUZZ_SEED", "1")))
        sent, results = [], []
        for kind in kinds:
            # A kind at a time: what waits on one peer is bounded
            # ([cluster] max_inflight_requests).
            pending = []
            for _ in range(self.payloadsPerKind):
                pending.append(node1.cluster.send("node2", kind, randomPayload(rng)))
                sent.append((kind, None))
                payload = randomPayload(rng)
                pending.append(node1.cluster.request("node2", kind, payload, timeout=10))
                sent.append((kind, payload))
            results += yield DeferredList(pending, consumeErrors=True)
        internal = []
        for (kind, payload), (ok, result) in zip(sent, results, strict=True):
            if ok:
                continue
            if result.check(PeerRequestFailed):
                if result.value.reason == "internal error":
                    internal.append((kind, payload))
            elif not result.check(PeerTimeout):
                result.raiseException()
        self.assertEqual(internal, [], "requests answered 'internal error'")
        # Let one-way messages still on the link be handled before looking.
        alice = yield self.user(node1)
        bob = yield self.user(node2)
        yield self.friends(node1, alice, bob)
        yield alice.postMessage(bob.uid, "still routing")
        self.assertEqual((yield bob.next(isMessage)).body.dataString, "still routing")
        self.flushLoggedErrors(BadPayload, PeerRequestError)
        self.assertEqual(self.flushLoggedErrors(), [])
