"""
Continuous 1:1 and group traffic through real nodes, for tests that break
or change the store underneath it (an outage, a slot move), and the checks
that nothing acknowledged was lost or stored twice.

Each sender keeps a few messages in flight, each with its own client id.
A message is I{confirmed} when its echo comes back (the node stored it); a
refused one (C{ERR_DATABASE}, "try again") is sent again with the same id
after a short wait, as a tim client would, until it is confirmed.
Receivers record every message they get, pushed or in offline lists.
"""

import itertools

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.structs import Tid

_ids = itertools.count(1_000_000)


class Participant:
    """
    One logged-in client: what it sent, what it got.

    @ivar confirmed: client id to the mid of its echo.
    @ivar received: per sender and client id, the mids received (a mid
        twice means a delivery repeated; two mids for one id, a message
        stored twice).
    @ivar refusals: the error acks received: C{(code, text)}.
    """

    def __init__(self, client):
        self.client = client
        self.uid = client.uid
        self.confirmed = {}
        self.pending = {}
        self.received = {}
        self.refusals = []
        #: client id to C{(to, gid)}.
        self.sentTo = {}
        self.frames = 0
        client.onFrame = self._frame

    def _frame(self, incoming):
        self.frames += 1
        if incoming.timType == TimType.TIMMESSAGE:
            self._message(incoming.body)
        elif incoming.timType == TimType.TIMOFFLINEMSG:
            for message in incoming.body.messageList or ():
                self._message(message)
        elif (
            incoming.timType == TimType.TIMACK and not incoming.body.ok and incoming.body.timType == TimType.TIMMESSAGE
        ):
            error = incoming.body.error
            self.refusals.append((error.code if error else None, error.info if error else None))
            waiting = self.pending.get(incoming.body.t)
            if waiting is not None:
                waiting.refused = True

    def _message(self, message):
        if message.fromTid is not None and message.fromTid.node == self.uid:
            waiting = self.pending.pop(message.id, None)
            if waiting is not None:
                self.confirmed[message.id] = message.mid
                waiting.done.callback(message.mid)
            return
        if message.odType != 1 or message.id is None:
            return
        sender = message.fromTid.node if message.fromTid else None
        self.received.setdefault((sender, message.id), []).append(message.mid)

    def send(self, to=None, gid=None):
        """
        Send one message and resend it until confirmed.

        @return: a L{Deferred} firing with its mid.
        """
        clientId = next(_ids)
        waiting = _Waiting(clientId, to, gid)
        self.pending[clientId] = waiting
        self.sentTo[clientId] = (to, gid)
        self._transmit(waiting)
        return waiting.done

    def _transmit(self, waiting):
        waiting.refused = False
        waiting.sent += 1
        if not self.client.connected:
            return
        if waiting.gid is not None:
            self.client.sendMessage(
                None, f"g{waiting.clientId}", id=waiting.clientId, msType=3, roomTid=Tid(node=waiting.gid)
            )
        else:
            self.client.sendMessage(waiting.to, f"m{waiting.clientId}", id=waiting.clientId)


class _Waiting:
    def __init__(self, clientId, to, gid):
        self.clientId = clientId
        self.to = to
        self.gid = gid
        self.refused = False
        self.sent = 0
        self.done = Deferred()


class Traffic:
    """
    Senders sending in a loop until stopped: each route a 1:1 pair or a
    group, at most C{window} messages in flight per route; refused
    messages are sent again every C{resendAfter} seconds.

    @param routes: C{(participant, to, gid)} triples, one of C{to} and
        C{gid} set.
    """

    def __init__(self, reactor, routes, window=2, resendAfter=0.2, pause=0.005):
        self.reactor = reactor
        self.routes = routes
        self.window = window
        self.resendAfter = resendAfter
        self.pause = pause
        self.running = False
        self.sent = 0
        self.participants = list({id(r[0]): r[0] for r in routes}.values())
        self._resender = None

    def start(self):
        self.running = True
        for route in self.routes:
            for _ in range(self.window):
                self._next(route)
        self._resend()

    def _next(self, route, _=None):
        if not self.running:
            return
        participant, to, gid = route
        self.sent += 1
        d = participant.send(to, gid)
        d.addCallback(lambda _: deferLater(self.reactor, self.pause, lambda: None))
        d.addCallback(lambda _: self._next(route))

    def _resend(self):
        for p in self.participants:
            for waiting in list(p.pending.values()):
                if waiting.refused:
                    p._transmit(waiting)
        self._resender = self.reactor.callLater(self.resendAfter, self._resend)

    def cancel(self):
        """
        Stop at once, waiting for nothing (a test's cleanup).
        """
        self.running = False
        if self._resender is not None and self._resender.active():
            self._resender.cancel()

    def stop(self, timeout=30.0):
        """
        Stop sending; fires once every message sent is confirmed.
        """
        self.running = False
        d = Deferred()
        deadline = self.reactor.seconds() + timeout

        def poll():
            pending = sum(len(p.pending) for p in self.participants)
            if not pending:
                self.cancel()
                d.callback(None)
            elif self.reactor.seconds() > deadline:
                self.cancel()
                d.errback(AssertionError(f"{pending} messages never confirmed"))
            else:
                self.reactor.callLater(0.05, poll)

        poll()
        return d


def undelivered(participants, members):
    """
    What was confirmed and not received, and what was stored twice.

    @param members: gid to the participants that must receive its messages.
    @return: C{(lost, duplicated)}: lists of C{(sender uid, client id,
        recipient uid)}.
    """
    byUid = {p.uid: p for p in participants}
    lost = []
    duplicated = []
    for sender in participants:
        for clientId, mid in sender.confirmed.items():
            to, gid = sender.sentTo[clientId]
            recipients = [byUid[to]] if to is not None else [m for m in members[gid] if m is not sender]
            for recipient in recipients:
                mids = recipient.received.get((sender.uid, clientId))
                if mids is None:
                    lost.append((sender.uid, clientId, recipient.uid))
                elif set(mids) != {mid}:
                    duplicated.append((sender.uid, clientId, recipient.uid))
    return lost, duplicated


def refusalsAreRetryable(testCase, participants):
    """
    Every refusal a sender got says "try again" (or "send it again") with
    tim's C{ERR_DATABASE}, and no traceback.
    """
    for p in participants:
        for code, text in p.refusals:
            testCase.assertEqual(code, ErrorCode.ERR_DATABASE, text)
            testCase.assertIn("again", text)
            testCase.assertNotIn("Traceback", text)
