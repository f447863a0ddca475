# -*- test-case-name: timtx.test.test_swim -*-
"""
Tests for L{timtx.cluster.swim} (the core, message by message) and, through
L{timtx.cluster.simulation}, for the protocol's behaviour in a cluster:
detection and join times, partitions, loss, load and ownership.

Times asserted are simulated seconds of a seeded run: deterministic, not
wall-clock thresholds.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from timtx.cluster.ownership import Ownership
from timtx.cluster.simulation import Simulation
from timtx.cluster.swim import (
    MAX_UPDATES,
    Ack,
    Alive,
    ChangeKind,
    Dead,
    Gossip,
    Member,
    MemberState,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Swim,
    SwimConfig,
    SwimDecodeError,
    Sync,
    _Probe,
    decodeMessage,
    encodeMessage,
)

ALIVE, SUSPECT, DEAD, LEFT = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


def core(nodeId, now=0.0, config=None, **kwargs):
    return Swim(nodeId, f"{nodeId}:7000", now=now, config=config or SwimConfig(), rng=random.Random(7), **kwargs)


class Harness:
    """
    Cores that deliver to each other instantly, except across C{cut} pairs.
    """

    def __init__(self, *nodeIds, config=None):
        self.now = 0.0
        self.cores = {nodeId: core(nodeId, config=config) for nodeId in nodeIds}
        self.cut = set()
        self.log = []

    def flush(self):
        while True:
            moved = False
            for source, swim in list(self.cores.items()):
                for target, message in swim.messagesToSend():
                    moved = True
                    self.log.append((source, target, message))
                    if frozenset((source, target)) in self.cut or target not in self.cores:
                        continue
                    self.cores[target].receive(source, decodeMessage(encodeMessage(message)), self.now)
            if not moved:
                return

    def join(self):
        first, *rest = self.cores
        for nodeId in rest:
            self.cores[nodeId].join(first, self.now)
            self.flush()
        self.run(1.0)

    def run(self, seconds):
        end = self.now + seconds
        while True:
            deadlines = [t for t in (swim.nextTimer() for swim in self.cores.values()) if t is not None]
            upcoming = min(deadlines, default=None)
            if upcoming is None or upcoming > end:
                self.now = end
                return
            self.now = upcoming
            for swim in self.cores.values():
                swim.tick(self.now)
            self.flush()

    def state(self, observer, nodeId):
        member = self.cores[observer].member(nodeId)
        return member.state if member else None

    def kinds(self, observer, nodeId):
        return [c.kind for c in self.cores[observer].takeChanges() if c.member.nodeId == nodeId]


class CoreTests(SynchronousTestCase):
    def test_joinBySync(self):
        """
        A sync with one member makes both know each other, and through
        gossip the rest of the cluster.
        """
        h = Harness("a", "b", "c")
        h.join()
        for observer in "abc":
            self.assertEqual([m.nodeId for m in h.cores[observer].liveMembers()], ["a", "b", "c"])
        member = h.cores["c"].member("b")
        self.assertEqual((member.address, member.clientAddresses), ("b:7000", ()))
        self.assertTrue(h.cores["a"].joined)

    def test_joinedChange(self):
        h = Harness("a", "b")
        h.join()
        [change] = [c for c in h.cores["a"].takeChanges() if c.member.nodeId == "b"]
        self.assertEqual((change.kind, change.previous), (ChangeKind.JOINED, None))

    def test_pingAck(self):
        """
        A ping for this node is answered with an ack of the same sequence
        number; one for another node is ignored.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("b", 0, "b:1"),)), 0.0)
        a.messagesToSend()
        a.receive("b", Ping(5, "a"), 0.0)
        a.receive("b", Ping(6, "x"), 0.0)
        [(target, ack)] = a.messagesToSend()
        self.assertEqual((target, type(ack), ack.seq), ("b", Ack, 5))

    def test_strangerSync(self):
        """
        A message from a node not known as live gets a sync back (at most
        one per probe interval), so a missed broadcast or a healed
        partition costs one exchange.
        """
        a = core("a")
        a.receive("b", Ping(5, "a"), 0.0)
        a.receive("b", Ping(6, "a"), 0.1)
        syncs = [(t, m) for t, m in a.messagesToSend() if isinstance(m, Sync)]
        self.assertEqual([(t, m.reply) for t, m in syncs], [("b", False)])
        a.receive("b", Ping(7, "a"), 1.0)
        self.assertEqual(len([m for _, m in a.messagesToSend() if isinstance(m, Sync)]), 1)

    def test_failedProbeSuspectsThenDeclaresDead(self):
        """
        A member that answers neither direct nor indirect probes becomes
        suspect at the end of the probe period and dead when the suspicion
        times out.
        """
        h = Harness("a", "b", "c")
        h.join()
        for swim in h.cores.values():
            swim.takeChanges()
        del h.cores["c"]
        h.run(10.0)
        for observer in "ab":
            self.assertEqual(h.state(observer, "c"), DEAD)
            changes = [c for c in h.cores[observer].takeChanges() if c.member.nodeId == "c"]
            self.assertEqual([c.kind for c in changes], [ChangeKind.SUSPECTED, ChangeKind.DIED])
            suspected, died = (c.member.since for c in changes)
            self.assertGreaterEqual(died - suspected, h.cores[observer].config.suspicionTimeout(3) - 0.01)
        self.assertEqual([m.nodeId for m in h.cores["a"].liveMembers()], ["a", "b"])

    def test_indirectProbe(self):
        """
        When the direct path fails, a member asked to probe for the prober
        gets the ack through: no suspicion.
        """
        h = Harness("a", "b", "c")
        h.join()
        h.cut.add(frozenset("ac"))
        h.run(10.0)
        self.assertEqual(h.state("a", "c"), ALIVE)
        self.assertEqual(h.state("c", "a"), ALIVE)
        relayed = [m for s, t, m in h.log if isinstance(m, PingReq)]
        self.assertTrue(relayed)

    def test_nackFromRelay(self):
        """
        A relay that gets no ack from the target in time sends a nack to
        the prober.
        """
        b = core("b")
        b.receive("c", Sync((Member("c", 0, ALIVE, "c:1"), Member("t", 0, ALIVE, "t:1"))), 0.0)
        b.messagesToSend()
        b.receive("c", PingReq(41, "t"), 0.0)
        [(target, ping)] = b.messagesToSend()
        self.assertEqual((target, type(ping), ping.target), ("t", Ping, "t"))
        b.tick(0.0 + b.config.probeTimeout)
        self.assertIn(("c", Nack(41)), [(t, m) for t, m in b.messagesToSend() if isinstance(m, Nack)])

    def test_relayForwardsAck(self):
        b = core("b")
        b.receive("c", Sync((Member("c", 0, ALIVE, "c:1"), Member("t", 0, ALIVE, "t:1"))), 0.0)
        b.messagesToSend()
        b.receive("c", PingReq(41, "t"), 0.0)
        [(_, ping)] = b.messagesToSend()
        b.receive("t", Ack(ping.seq), 0.01)
        [(target, ack)] = b.messagesToSend()
        self.assertEqual((target, type(ack), ack.seq), ("c", Ack, 41))

    def test_refutation(self):
        """
        A node told it is suspect raises its incarnation and says it is
        alive; the others believe it.
        """
        h = Harness("a", "b", "c")
        h.join()
        before = h.cores["c"].incarnation
        h.cores["a"].receive("b", Gossip((Suspect("c", before, "b"),)), h.now)
        self.assertEqual(h.state("a", "c"), SUSPECT)
        h.flush()
        h.run(1.0)
        self.assertEqual(h.cores["c"].incarnation, before + 1)
        for observer in "ab":
            self.assertEqual(h.state(observer, "c"), ALIVE)
        self.assertIn(ChangeKind.RECOVERED, h.kinds("a", "c"))

    def test_refuteRaisesIncarnationAndAwareness(self):
        c = core("c", incarnation=4)
        c.receive("b", Gossip((Alive("b", 0, "b:1"), Suspect("c", 6, "b"))), 0.0)
        self.assertEqual((c.incarnation, c.awareness, c.local.state), (7, 1, ALIVE))
        c.receive("b", Ping(1, "c"), 0.0)
        ack = [m for _, m in c.messagesToSend() if isinstance(m, Ack)][0]
        self.assertIn(Alive("c", 7, "c:7000", (), {}), ack.updates)

    def test_deadRefutedToo(self):
        """
        A node declared dead while alive refutes, and is back everywhere.
        """
        h = Harness("a", "b", "c")
        h.join()
        # a has not heard from c for longer than a suspicion takes.
        h.now += h.cores["a"].config.suspicionTimeout(3)
        h.cores["a"].receive("b", Gossip((Dead("c", h.cores["c"].incarnation, "b"),)), h.now)
        self.assertEqual(h.state("a", "c"), DEAD)
        h.flush()
        h.run(2.0)
        for observer in "ab":
            self.assertEqual(h.state(observer, "c"), ALIVE)
        self.assertEqual(h.kinds("a", "c")[-2:], [ChangeKind.DIED, ChangeKind.JOINED])

    def test_deadVerdictAboutUndoubtedMemberIsSuspicion(self):
        """
        Another node's verdict of death about a member this one heard from
        itself within the shortest suspicion timeout (a stale verdict from
        the far side of a healed partition, say) only makes it suspect; it
        refutes and never dies.  Without such news from the member, the
        verdict is taken.
        """
        h = Harness("a", "b", "c")
        h.join()
        for swim in h.cores.values():
            swim.takeChanges()
        h.cores["a"].receive("b", Gossip((Dead("c", h.cores["c"].incarnation, "b"),)), h.now)
        self.assertEqual(h.state("a", "c"), SUSPECT)
        h.flush()
        h.run(5.0)
        self.assertEqual(h.state("a", "c"), ALIVE)
        self.assertEqual(h.kinds("a", "c"), [ChangeKind.SUSPECTED, ChangeKind.RECOVERED])
        a = core("a")
        a.receive("b", Gossip((Alive("c", 1, "c:1"),)), 0.0)
        a.receive("d", Gossip((Dead("c", 1, "d"),)), 0.1)
        self.assertEqual(a.member("c").state, DEAD)

    def test_staleUpdatesIgnored(self):
        """
        Updates with an incarnation older than the one known change nothing.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("c", 5, "c:1"),)), 0.0)
        a.receive("b", Gossip((Suspect("c", 4, "b"), Dead("c", 4, "b"), Alive("c", 5, "elsewhere:1"))), 0.0)
        member = a.member("c")
        self.assertEqual((member.state, member.incarnation, member.address), (ALIVE, 5, "c:1"))
        a.receive("b", Gossip((Suspect("unknown", 1, "b"),)), 0.0)
        self.assertIsNone(a.member("unknown"))

    def test_deadComesBackWithNewIncarnation(self):
        a = core("a")
        a.receive("b", Gossip((Alive("c", 1, "c:1"),)), 0.0)
        a.receive("b", Gossip((Dead("c", 1, "b"),)), 1.0)
        a.receive("b", Gossip((Alive("c", 1, "c:1"),)), 2.0)
        self.assertEqual(a.member("c").state, DEAD)
        a.receive("b", Gossip((Alive("c", 2, "c:2"),)), 3.0)
        member = a.member("c")
        self.assertEqual((member.state, member.address, member.since), (ALIVE, "c:2", 3.0))
        kinds = [c.kind for c in a.takeChanges()]
        self.assertEqual(kinds, [ChangeKind.JOINED, ChangeKind.DIED, ChangeKind.JOINED])

    def test_lifeguardSuspicionShrinks(self):
        """
        With Lifeguard, a suspicion starts at C{suspicionMaxMult} times the
        shortest timeout and drops to the shortest once another member
        independently confirms it; the first accuser does not count twice.
        """
        config = SwimConfig(suspicionMult=3, suspicionMaxMult=4)
        a = core("a", config=config)
        for name in "bcde":
            a.receive("x", Gossip((Alive(name, 0, f"{name}:1"),)), 0.0)
        a.receive("b", Gossip((Suspect("e", 0, "b"),)), 10.0)
        shortest = config.suspicionTimeout(5)
        self.assertEqual(a.nextTimer() <= 10.0 + shortest, True)
        # Find the suspicion deadline: the latest pending timer.
        self.assertEqual(a._suspicions["e"].deadline(), 10.0 + 4 * shortest)
        a.receive("b", Gossip((Suspect("e", 0, "b"),)), 10.1)
        self.assertEqual(a._suspicions["e"].deadline(), 10.0 + 4 * shortest)
        a.receive("c", Gossip((Suspect("e", 0, "c"),)), 10.2)
        self.assertEqual(a._suspicions["e"].deadline(), 10.0 + shortest)
        a.tick(10.0 + shortest)
        self.assertEqual(a.member("e").state, DEAD)

    def test_noConfirmationsInSmallClusters(self):
        """
        With too few members to confirm, a suspicion uses the shortest
        timeout at once.
        """
        a = core("a", config=SwimConfig(suspicionMult=4))
        a.receive("b", Gossip((Alive("b", 0, "b:1"), Alive("c", 0, "c:1"))), 0.0)
        a.receive("b", Gossip((Suspect("c", 0, "b"),)), 0.0)
        self.assertEqual(a._suspicions["c"].deadline(), SwimConfig(suspicionMult=4).suspicionTimeout(3))

    def test_buddySystem(self):
        """
        The ping of a suspect member carries the suspicion, so it can
        refute at once.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("b", 0, "b:1"),)), 0.0)
        a.receive("c", Gossip((Suspect("b", 0, "c"),)), 0.0)
        a.messagesToSend()
        a.tick(a.config.probeInterval)
        pings = [m for t, m in a.messagesToSend() if isinstance(m, Ping)]
        self.assertEqual(pings[0].target, "b")
        self.assertIn(Suspect("b", 0, "a"), pings[0].updates)

    def test_awareness(self):
        """
        Missed nacks raise the score (stretching the probe interval); acks
        lower it.
        """
        h = Harness("a", "b", "c", "d")
        h.join()
        a = h.cores["a"]
        # Isolate a: every probe fails and no relay answers, not even a nack.
        for other in "bcd":
            h.cut.add(frozenset(("a", other)))
        h.run(3.0)
        self.assertGreater(a.awareness, 0)
        self.assertLessEqual(a.awareness, a.config.awarenessMax - 1)
        h.cut.clear()
        h.run(30.0)
        self.assertEqual(a.awareness, 0)

    def test_lagRaisesAwarenessAndPadsTimeouts(self):
        """
        An event loop that ran a timer late by more than half the probe
        timeout counts against local health (once per probe interval), and
        the lag pads every timeout of this node for a while (at most the
        longest suspicion timeout); small lag does neither.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("b", 0, "b:1"), Alive("c", 0, "c:1"))), 0.0)
        a.messagesToSend()
        timeout = a.config.probeTimeout
        a.observeLag(timeout / 4, 0.0)
        self.assertEqual(a.awareness, 0)
        a.observeLag(0.5, 0.0)
        a.observeLag(0.5, 0.01)
        self.assertEqual(a.awareness, 1)
        self.assertEqual(a.localLag(0.01), 0.5)
        a.observeLag(0.5, a.config.probeInterval)
        self.assertEqual(a.awareness, 2)
        # The next probe's timeout: 3 x 0.15 s plus the 0.5 s lag.
        pings = []
        while not pings:
            probeAt = a.nextTimer()
            a.tick(probeAt)
            pings = [m for _, m in a.messagesToSend() if isinstance(m, Ping)]
        a.tick(probeAt + 3 * timeout + 0.49)
        self.assertEqual([m for _, m in a.messagesToSend() if isinstance(m, PingReq)], [])
        a.tick(probeAt + 3 * timeout + 0.51)
        self.assertNotEqual([m for _, m in a.messagesToSend() if isinstance(m, PingReq)], [])
        # Forgotten in time.
        self.assertEqual(a.localLag(1000.0), 0.0)
        # A long stall pads at most the longest suspicion timeout.
        a.observeLag(60.0, 1000.0)
        config = a.config
        self.assertEqual(a.localLag(1000.0), config.suspicionTimeout(3) * config.suspicionMaxMult)

    def test_lateAckStretchesPatience(self):
        """
        An ack that comes after its probe ended shows the member is alive
        but slow: its next probe waits that much longer, and so does a
        suspicion of it, up to the shortest suspicion timeout more.
        """
        h = Harness("a", "b", "c")
        h.join()
        a = h.cores["a"]
        self.assertEqual(a.slowness("b", h.now), 0.0)
        # a probes b; b's ack comes 0.6 s later, after the probe ended.
        h.cut.add(frozenset("ab"))
        h.cut.add(frozenset("bc"))
        seqs = []
        logged = len(h.log)
        while not seqs:
            h.run(0.05)
            seqs = [
                m.seq
                for s, t, m in h.log[logged:]
                if s == "a" and t == "b" and isinstance(m, Ping) and isinstance(a._acks.get(m.seq), _Probe)
            ]
        sentAt = h.now
        h.run(0.6)
        a.receive("b", Ack(seqs[0]), h.now)
        self.assertLess(abs(a.slowness("b", h.now) - (h.now - sentAt)), 0.06)
        a.receive("b", Ack(seqs[0]), h.now + 5)
        self.assertLessEqual(a.slowness("b", h.now), a.config.suspicionTimeout(3))
        # Much later acks are capped.
        a._roundTrip("b", 30.0, h.now)
        self.assertEqual(a.slowness("b", h.now), a.config.suspicionTimeout(3))

    def test_slowSuspectGetsLonger(self):
        """
        A suspicion of a member seen slow waits twice its slowness more
        before the member is declared dead.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("b", 0, "b:1"), Alive("c", 0, "c:1"))), 0.0)
        a._roundTrip("b", 0.5, 0.0)
        a.receive("c", Gossip((Suspect("b", 0, "c"), Suspect("c", 0, "b"))), 0.0)
        suspicions = a._suspicions
        self.assertAlmostEqual(suspicions["b"].deadline() - suspicions["c"].deadline(), 1.0)
        # Its late ack since counts too: the verdict is put off.
        a._roundTrip("c", 0.4, 0.5)
        deadline = suspicions["c"].deadline()
        a.takeChanges()
        a.tick(deadline)
        self.assertEqual(a.takeChanges(), [])
        self.assertAlmostEqual(suspicions["c"].deadline(), deadline + 0.8)

    def test_leave(self):
        """
        A leaving node tells every live member at once; they mark it left
        and it takes no further part.
        """
        h = Harness("a", "b", "c")
        h.join()
        h.cores["c"].leave(h.now)
        h.flush()
        for observer in "ab":
            self.assertEqual(h.state(observer, "c"), LEFT)
            self.assertEqual(h.kinds(observer, "c")[-1], ChangeKind.LEFT)
        c = h.cores["c"]
        self.assertEqual((c.left, c.local.state, c.nextTimer()), (True, LEFT, None))
        c.receive("a", Ping(1, "c"), h.now)
        self.assertEqual(c.messagesToSend(), [])
        h.run(5.0)
        self.assertEqual(h.state("a", "c"), LEFT)

    def test_piggybackBounded(self):
        """
        A message carries at most C{maxPiggyback} updates, and each update
        goes out at most the retransmit limit of times.
        """
        config = SwimConfig(maxPiggyback=3, retransmitMult=2)
        a = core("a", config=config)
        a.receive("b", Gossip(tuple(Alive(f"n{i}", 0, "x:1") for i in range(10))), 0.0)
        limit = config.retransmitLimit(a.liveCount())
        sent = {}
        for seq in range(100):
            a.receive("b", Ping(seq, "a"), 0.0)
            [ack] = [m for _, m in a.messagesToSend() if isinstance(m, Ack)]
            self.assertLessEqual(len(ack.updates), 3)
            for update in ack.updates:
                sent[update.nodeId] = sent.get(update.nodeId, 0) + 1
        self.assertEqual(set(sent.values()), {limit})
        self.assertEqual(len(sent), 10)

    def test_syncMerge(self):
        """
        A sync's dead members become suspects here (they get their chance to
        refute); left members are left.
        """
        a = core("a")
        a.receive("b", Gossip((Alive("c", 0, "c:1"), Alive("d", 0, "d:1"))), 0.0)
        a.receive(
            "b", Sync((Member("c", 0, DEAD, "c:1"), Member("d", 0, LEFT, "d:1"), Member("b", 3, ALIVE, "b:1"))), 1.0
        )
        self.assertEqual([a.member(n).state for n in "bcd"], [ALIVE, SUSPECT, LEFT])
        [(target, reply)] = [(t, m) for t, m in a.messagesToSend() if isinstance(m, Sync) and m.reply]
        self.assertEqual((target, reply.reply), ("b", True))
        self.assertEqual({m.nodeId for m in reply.members}, {"a", "b", "c", "d"})

    def test_syncReplyNotAnswered(self):
        a = core("a")
        a.receive("b", Sync((Member("b", 0, ALIVE, "b:1"),), reply=True), 0.0)
        self.assertEqual([m for _, m in a.messagesToSend() if isinstance(m, Sync)], [])

    def test_olderRunOverruled(self):
        """
        A claim that this node is alive with a higher incarnation (from an
        earlier run) is overruled with a higher one still.
        """
        a = core("a", incarnation=0)
        a.receive("b", Sync((Member("a", 7, ALIVE, "old:1"), Member("b", 0, ALIVE, "b:1"))), 0.0)
        self.assertEqual(a.incarnation, 8)
        self.assertEqual(a.local.address, "a:7000")

    def test_linkLostProbesNext(self):
        """
        A failed link makes its member the next one probed.
        """
        a = core("a")
        a.receive("x", Gossip(tuple(Alive(f"n{i}", 0, "x:1") for i in range(20))), 0.0)
        a.messagesToSend()
        a.linkLost("n13", 0.0)
        a.linkLost("n13", 0.0)
        a.linkLost("nobody", 0.0)
        a.tick(a.config.probeInterval)
        pings = [(t, m) for t, m in a.messagesToSend() if isinstance(m, Ping)]
        self.assertEqual(pings[0][0], "n13")

    def test_update(self):
        """
        Changing what a node advertises raises its incarnation and reaches
        the others as an update.
        """
        h = Harness("a", "b")
        h.join()
        h.kinds("b", "a")
        h.cores["a"].update(h.now, clientAddresses=["ws://a/tim"], meta={"nat": "none"})
        h.run(1.0)
        member = h.cores["b"].member("a")
        self.assertEqual((member.clientAddresses, dict(member.meta)), (("ws://a/tim",), {"nat": "none"}))
        self.assertEqual(h.kinds("b", "a"), [ChangeKind.UPDATED])

    def test_forgetDead(self):
        """
        Dead members are forgotten after C{deadMemberTTL}.
        """
        a = core("a", config=SwimConfig(deadMemberTTL=20.0))
        a.receive("b", Gossip((Alive("c", 0, "c:1"), Dead("c", 0, "b"))), 0.0)
        a.takeChanges()
        for t in range(0, 30):
            a.tick(float(t))
        self.assertIsNone(a.member("c"))
        self.assertEqual([c.kind for c in a.takeChanges() if c.member.nodeId == "c"], [ChangeKind.FORGOTTEN])

    def test_config(self):
        self.assertRaises(ValueError, SwimConfig, probeInterval=0.1, probeTimeout=0.2)
        self.assertRaises(ValueError, SwimConfig, suspicionMult=0)
        self.assertRaises(ValueError, SwimConfig, gossipInterval=0)
        self.assertRaises(ValueError, SwimConfig, indirectChecks=-1)
        self.assertRaises(ValueError, Swim, "bad id", "x:1", now=0.0)
        config = SwimConfig()
        self.assertEqual(config.suspicionTimeout(5), 3 * config.probeInterval)
        self.assertAlmostEqual(config.suspicionTimeout(100), 6 * config.probeInterval)
        self.assertEqual((config.retransmitLimit(9), config.retransmitLimit(10)), (4, 8))


class CodecTests(SynchronousTestCase):
    def test_roundTrip(self):
        updates = (
            Alive("n1", 3, "10.0.0.1:7946", ("ws://h/tim", "tcp://h:5121"), {"nat": "eim"}),
            Suspect("n2", 0, "n1"),
            Dead("n3", 9, "n3"),
        )
        messages = [
            Ping(1, "n2", updates),
            PingReq(2, "n3"),
            Ack(3, updates[:1]),
            Nack(4),
            Gossip(updates),
            Sync((Member("n1", 3, ALIVE, "a:1", ("ws://x",), {"k": "v"}), Member("n2", 1, LEFT, "b:1")), True),
        ]
        for message in messages:
            self.assertEqual(decodeMessage(encodeMessage(message)), message)

    def test_invalid(self):
        """
        Anything but a valid message raises L{SwimDecodeError}.
        """
        bad = [
            b"",
            b"\xff",
            b"[]",
            b'{"t":"pong"}',
            b'{"t":"ping","seq":-1,"target":"a"}',
            b'{"t":"ping","seq":1.5,"target":"a"}',
            b'{"t":"ping","seq":true,"target":"a"}',
            b'{"t":"ping","seq":9007199254740992,"target":"a"}',
            b'{"t":"ping","seq":1,"target":"a b"}',
            b'{"t":"ack","seq":1,"up":{}}',
            b'{"t":"ack","seq":1,"up":[["alive","a",1,"x"]]}',
            b'{"t":"ack","seq":1,"up":[["alive","a",1,"x",[],[]]]}',
            b'{"t":"ack","seq":1,"up":[["alive","a",1,"x",[1],{}]]}',
            b'{"t":"ack","seq":1,"up":[["alive","a",1,"x",[],{"k":1}]]}',
            b'{"t":"ack","seq":1,"up":[["zombie","a",1,"b"]]}',
            b'{"t":"ack","seq":1,"up":[["dead","a",1,"b","extra"]]}',
            b'{"t":"sync","members":[["a",1,"undead","x",[],{}]]}',
            b'{"t":"sync","members":{}}',
            b'{"t":"sync","members":[],"reply":"yes"}',
            b"[" * 100000,
        ]
        for data in bad:
            self.assertRaises(SwimDecodeError, decodeMessage, data)
        many = encodeMessage(Gossip(tuple(Suspect("a", 1, "b") for _ in range(MAX_UPDATES + 1))))
        self.assertRaises(SwimDecodeError, decodeMessage, many)
        self.assertRaises(SwimDecodeError, decodeMessage, encodeMessage(Ping(1, "a")).replace(b"a", b"x" * 300))

    def test_randomBytes(self):
        """
        Random and mutated input either decodes or raises
        L{SwimDecodeError} (bounded: 500 runs).
        """
        rng = random.Random(3)
        valid = encodeMessage(Gossip((Alive("n1", 3, "h:1", ("ws://x",), {"a": "b"}),)))
        for _ in range(500):
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                decodeMessage(bytes(data))
            except SwimDecodeError:
                pass


def ids(n):
    return [f"n{i:02d}" for i in range(n)]


class SimulationTests(SynchronousTestCase):
    """
    The protocol in seeded simulated clusters with the default
    configuration: 0.3 s probes, 0.15 s probe timeout, 3 indirect probes,
    suspicion multiplier 3.
    """

    #: The default configuration's promise: a dead node is declared dead by
    #: every live member within this many seconds.
    detectionBound = 5.0

    def converged(self, n, seed, **kwargs):
        sim = Simulation(seed, **kwargs)
        sim.start(ids(n))
        self.assertIsNotNone(sim.runUntil(sim.converged, 10.0), "the cluster never converged")
        return sim

    def detectionTime(self, n, seed, reset=False):
        sim = self.converged(n, seed)
        sim.run(sim.rng.uniform(0, 5))
        victim = ids(n)[sim.rng.randrange(1, n)]
        sim.crash(victim, reset=reset)
        took = sim.runUntil(lambda: sim.allSee(victim, [DEAD]), 30.0)
        self.assertIsNotNone(took, f"n={n} seed={seed}: {victim} never declared dead by all")
        return took

    def test_crashDetectedWithinBound(self):
        """
        A node that stops silently is declared dead by every other member
        within 5 s, in clusters of 5 and 50 (10 and 4 seeds).
        """
        times = [self.detectionTime(5, seed) for seed in range(10)]
        times += [self.detectionTime(50, seed) for seed in range(4)]
        for took in times:
            self.assertLess(took, self.detectionBound)

    def test_crashWithResetFaster(self):
        """
        When peers see their links to the crashed node break (a killed
        process), it is probed at once: dead everywhere within 3 s.
        """
        for seed in range(5):
            self.assertLess(self.detectionTime(5, seed, reset=True), 3.0)

    def test_joinSeenByAll(self):
        """
        A node joining a converged 20-node cluster through one seed is seen
        alive by every member within 1.5 s.
        """
        for seed in range(3):
            sim = self.converged(20, seed)
            sim.addNode("newcomer", ["n05"])
            took = sim.runUntil(lambda sim=sim: sim.allSee("newcomer", [ALIVE]), 10.0)
            self.assertIsNotNone(took)
            self.assertLess(took, 1.5)

    def test_manyStartTogether(self):
        """
        Fifty nodes started at once through the same seed converge within
        2 s.
        """
        sim = Simulation(5)
        sim.start(ids(50))
        took = sim.runUntil(sim.converged, 10.0)
        self.assertIsNotNone(took)
        self.assertLess(took, 2.0)

    def test_partitionHeals(self):
        """
        A partition splits the cluster into two views; once it heals, the
        periodic reconnect sync merges them into one within 15 s.
        """
        sim = self.converged(10, 2)
        left, right = ids(10)[:4], ids(10)[4:]
        sim.partition(left, right)
        sim.run(10.0)
        for node in sim.running():
            expected = set(left) if node.nodeId in left else set(right)
            self.assertEqual(node.live(), expected)
        sim.heal()
        took = sim.runUntil(sim.converged, 30.0)
        self.assertIsNotNone(took, "the views never merged")
        self.assertLess(took, 15.0)

    def test_rareFalsePositivesUnderLoss(self):
        """
        With 10% of messages lost, over 60 s in a 20-node cluster, live
        nodes are almost never declared dead (suspicion and refutation do
        their work) and the cluster ends converged.
        """
        sim = self.converged(20, 1, loss=0.1)
        start = sim.now()
        sim.run(60.0)
        deaths = [c for node in sim.running() for t, c in node.changes if t >= start and c.kind is ChangeKind.DIED]
        suspicions = [
            c for node in sim.running() for t, c in node.changes if t >= start and c.kind is ChangeKind.SUSPECTED
        ]
        self.assertGreater(len(suspicions), 0, "loss never caused a suspicion: the test tests nothing")
        # 20 nodes x 150 probes each: a handful of verdicts at most.
        self.assertLessEqual(len(deaths), 3)
        self.assertIsNotNone(sim.runUntil(sim.converged, 10.0))

    def test_constantLoad(self):
        """
        In a quiet cluster each node sends the same number of messages per
        probe period with 5 nodes as with 50: about 2 (a ping and an ack).
        """
        perPeriod = {}
        for n in (5, 50):
            sim = self.converged(n, 3)
            sim.run(5.0)
            before = sim.messages
            sim.run(20.0)
            perPeriod[n] = (sim.messages - before) / n / (20.0 / sim.config.probeInterval)
        self.assertLess(perPeriod[5], 2.5)
        self.assertLess(perPeriod[50], 2.5)
        self.assertLess(abs(perPeriod[50] - perPeriod[5]), 0.25)

    def test_ownershipAgrees(self):
        """
        Once views converge, every node computes the same owner for every
        key; after a crash is detected, only the dead node's keys move.
        """
        sim = self.converged(8, 4)
        keys = [f"user:{i}" for i in range(300)]
        views = {node.ownership() for node in sim.running()}
        self.assertEqual(len(views), 1)
        [before] = views
        sim.crash("n03")
        self.assertIsNotNone(sim.runUntil(lambda: sim.allSee("n03", [DEAD]), 10.0))
        views = {node.ownership() for node in sim.running()}
        self.assertEqual(views, {Ownership(set(before.nodes) - {"n03"})})
        [after] = views
        for key in keys:
            if before.owner(key) != "n03":
                self.assertEqual(after.owner(key), before.owner(key))

    def test_gracefulLeave(self):
        """
        A node that leaves is seen as left by all at once.
        """
        sim = self.converged(10, 6)
        sim.leave("n04")
        took = sim.runUntil(lambda: sim.allSee("n04", [LEFT]), 5.0)
        self.assertIsNotNone(took)
        self.assertLess(took, 0.1)

    def test_restart(self):
        """
        A crashed node restarted (remembering its incarnation) is seen
        alive again by all within 2 s.
        """
        sim = self.converged(6, 8)
        sim.crash("n02")
        sim.runUntil(lambda: sim.allSee("n02", [DEAD]), 10.0)
        sim.restart("n02", ["n04"])
        took = sim.runUntil(sim.converged, 10.0)
        self.assertIsNotNone(took)
        self.assertLess(took, 2.0)

    def slowRun(self, n, seed, lagAware=True, busy=(0.1, 0.5)):
        """
        Run a converged cluster of C{n} for 60 s with C{n01}'s event loop
        saturated (each iteration busy 0.1-0.5 s); the deaths and
        suspicions seen, and whether it ended converged.
        """
        sim = self.converged(n, seed, lagAware=lagAware)
        start = sim.now()
        sim.slow("n01", busy)
        sim.run(60.0)
        changes = [c.kind for node in sim.running() for t, c in node.changes if t >= start]
        sim.slow("n01", None)
        return changes.count(ChangeKind.DIED), changes.count(ChangeKind.SUSPECTED), sim.converged()

    def test_slowNodeNeitherAccusesNorFlaps(self):
        """
        A node whose event loop is saturated (it reads and answers 0.1 to
        0.5 s late) is suspected now and then and refutes, but in 60 s
        nobody is declared dead: not the slow node (its late acks stretch
        the others' patience), not the healthy ones (it does not judge
        before it has read, and its own lag makes it patient).  A plain
        driver (timers before reads, no lag counted) suspects more.
        """
        for n in (3, 5):
            for seed in range(4):
                deaths, suspicions, converged = self.slowRun(n, seed)
                self.assertEqual(deaths, 0, f"n={n} seed={seed}")
                self.assertTrue(converged)
            self.assertLess(
                sum(self.slowRun(n, seed)[1] for seed in range(2)),
                sum(self.slowRun(n, seed, lagAware=False)[1] for seed in range(2)),
            )

    def test_deadNodeDetectedNextToSlowOne(self):
        """
        With a saturated node in the cluster, a node that stops silently is
        still declared dead by every other member within 5 s, and so is
        the slow node when it stops in turn.
        """
        for n in (3, 5):
            for seed in range(3):
                sim = self.converged(n, seed)
                sim.slow("n01", (0.1, 0.5))
                sim.run(10.0)
                sim.crash("n02")
                took = sim.runUntil(lambda sim=sim: sim.allSee("n02", [DEAD]), 30.0)
                self.assertIsNotNone(took)
                self.assertLess(took, self.detectionBound)
                sim.crash("n01")
                took = sim.runUntil(lambda sim=sim: sim.allSee("n01", [DEAD]), 30.0)
                self.assertIsNotNone(took)
                self.assertLess(took, self.detectionBound)

    def test_repeatable(self):
        """
        The same seed gives the same run, message for message.
        """

        def run():
            sim = self.converged(6, 11, loss=0.05)
            sim.crash("n01")
            sim.run(10.0)
            return sim.messages, sim.bytes, [(t, c.kind, c.member.nodeId) for t, c in sim.nodes["n00"].changes]

        self.assertEqual(run(), run())
