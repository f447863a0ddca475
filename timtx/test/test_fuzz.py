"""
Random frames at a logged-in session, over a real socket: every one is
answered or ignored, none raises inside the node (trial fails a test on any
logged error), and the connection keeps working.
"""

import json
import random

from twisted.internet.defer import inlineCallbacks

from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType
from timtx.protocols.structs import ALL_STRUCTS, Tid, TimMessage, TimNodes, TimPresence, TimReq
from timtx.test.base import NodeTestCase

FRAME_TYPES = [
    t.value
    for t in TimType
    if t not in (TimType.TIMAUTH, TimType.TIMBIGSTRING, TimType.TIMBIGBINARY, TimType.TIMBIGBINARYSTREAM)
]


def randomValue(rng, depth=0):
    choice = rng.randrange(8 if depth < 2 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([0, 1, -1, 2, 3, 5, 31, 127, 128, 2**31, 2**63 - 1, -(2**63)])
    if choice == 2:
        return rng.choice(["", "x", "ö" * 3, "NoSuchUser", "0" * 40])
    if choice == 3:
        return rng.choice([True, False])
    if choice == 4:
        return 1.5
    if choice == 5:
        return [randomValue(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["node", "toTid", "msType", "odType", "rtype", "x"]): randomValue(rng, depth + 1)}


def plausible(rng, uids, gid):
    """
    A well-formed struct with random field values: reaches the handlers.
    """
    someone = rng.choice(uids + ["NoSuchUser", ""])
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice([TimType.TIMMESSAGE, TimType.TIMREVOKEMESSAGE, TimType.TIMBURNMESSAGE]), TimMessage(
            msType=rng.choice([1, 2, 3, 9]),
            odType=rng.choice([1, 2, 3, 4, 5, 6, 40, 127, -1]),
            toTid=Tid(node=someone) if rng.random() < 0.7 else None,
            roomTid=Tid(node=rng.choice([gid, "NoSuchGroup"])) if rng.random() < 0.3 else None,
            mid=rng.choice([None, 0, 1, 2**40]),
            dataString=rng.choice([None, "hi", "x" * 200]),
            udtype=rng.choice([None, 7]),
        )
    if kind == 1:
        return rng.choice([TimType.TIMBUSINESS, TimType.TIMPULLMESSAGE, TimType.TIMVROOM]), TimReq(
            rtype=rng.randrange(-1, 110),
            node=rng.choice([someone, gid, None]),
            node2=rng.choice([someone, None]),
            reqInt=rng.choice([None, 0, 1, 2, -1, 2**40]),
            reqInt2=rng.choice([None, 0, 1, 5, -3]),
            reqStr=rng.choice([None, "s"]),
        )
    if kind == 2:
        return rng.choice([TimType.TIMPRESENCE, TimType.TIMBROADPRESENCE]), TimPresence(
            toTid=Tid(node=someone) if rng.random() < 0.5 else None,
            toList=[someone] * rng.randrange(3) or None,
            status="s",
            invisible=rng.choice([None, True, False]),
            offline=rng.choice([None, False, True]),
        )
    return TimType.TIMNODES, TimNodes(ntype=rng.randrange(0, 12), nodelist=[someone, gid][: rng.randrange(3)] or None)


class FuzzTests(NodeTestCase):
    timeout = 120

    @inlineCallbacks
    def fuzz(self, encoding, seed):
        node = yield self.node(
            client={"max_bad_frames": 100000, "request_rate": 0.0},
            messages={"noauth": True},
            devices={"limit": 0, "type_limit": 0},
        )
        victim = yield self.user(node, encoding=encoding)
        friend = yield self.user(node, encoding=encoding)
        yield self.befriend(node, victim, friend)
        gid = (yield victim.business(8, node="fuzz", reqInt=2)).n
        rng = random.Random(seed)
        flag = 0x80 if encoding is Encoding.JSON else 0
        for _ in range(600):
            roll = rng.random()
            if roll < 0.5:
                timType, struct = plausible(rng, [victim.uid, friend.uid], gid)
                victim.send(timType, struct)
            elif roll < 0.75:
                timType = rng.choice(FRAME_TYPES + [0, 1, 50, 99, 126])
                if encoding is Encoding.JSON:
                    payload = json.dumps(
                        {k: randomValue(rng) for k in ("msType", "odType", "node", "toTid", "rtype")}
                    ).encode()
                else:
                    cls = rng.choice(ALL_STRUCTS)
                    payload = codec.encode_compact(cls()) + bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
                victim.sendRaw(bytes([timType | flag]) + payload)
            else:
                timType = rng.choice(FRAME_TYPES)
                victim.sendRaw(bytes([timType | flag]) + bytes(rng.randrange(256) for _ in range(rng.randrange(30))))
        yield victim.ping(timeout=60)
        yield friend.ping(timeout=60)
        # The node still serves both.
        friend.sendMessage(victim.uid, "still here")
        got = yield victim.next(lambda i: i.timType == TimType.TIMMESSAGE and i.body.dataString == "still here", 60)
        self.assertEqual(got.body.fromTid.node, friend.uid)
        undefined = [
            i for i in victim.received if i.timType == TimType.TIMACK and i.body.error and i.body.error.code == 5101
        ]
        self.assertEqual(undefined, [], "no internal errors")

    def test_compact(self):
        return self.fuzz(Encoding.COMPACT, 1)

    def test_json(self):
        return self.fuzz(Encoding.JSON, 2)
