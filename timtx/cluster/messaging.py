# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
1:1 messages stored and routed by their conversation's owner.

The owner of C{conv:<conversation>} among the live members numbers a 1:1
conversation's messages and routes them: the node a sender is on checks a
message (permissions, duplicates) and hands it to the owner
(C{conv.append}); the owner stores it, and once durable sends the echo to
the sender's sessions and the push to the recipient's, wherever they are.
Since one node routes all of a conversation, and messages from one node to
another keep their order, every device of either party gets the
conversation in seq order, even when both parties send at once from
different nodes.

The sender's node asks the owner to leave the echo to its own sessions
to it (C{conv.echo}, offered in the handshake).  When the owner would have
sent that echo at once (it knows the sender's sessions are there), it
leaves it and says so in its answer, which carries the stored message
anyway and comes on the same link right where the echo would have come;
the sender's node then echoes it to its sessions.  A crossing message
costs one peer message less (two instead of three when the recipient's
node owns the conversation, three instead of four when a third node
does).  An owner that does not offer it is asked as before.

When the owner cannot be reached at all, the sender's node stores and
routes the message itself: the store fences the numbers, so a moment of
two owners costs a retry, never a duplicate seq.  Whenever a node numbers a
conversation right after another node did (ownership moved, or two nodes
numbered it at once), its first message is pushed after the recipient's
sessions looked in the inbox (C{HANDOVER_WINDOW}): the other node's last
push may still be on its way, and the look sends what it finds first, in
order.  When the owner was asked
and did not answer, the message may or may not be stored: the client is
asked to send it again, and the resend is recognised by its id.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from timtx.chat.conversations import Appended
from timtx.chat.messagerules import MaybeStored
from timtx.chat.messaging import PersonalMessaging
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import NoOwner, conversationKey
from timtx.cluster.resends import appendOutcome, refusalAnswer
from timtx.cluster.router import ClusterRouter
from timtx.cluster.wire import integer, pack, text, thrift, unpack
from timtx.delivery.encoded import Encoded
from timtx.protocols import codec
from timtx.protocols.constants import ErrorCode, TimType
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage

KIND_APPEND = "conv.append"
#: Offered by a node that leaves the echo to the sender's node when asked.
ECHO_FEATURE = "conv.echo"

#: Seconds within which a conversation's position moved by another node
#: marks this node's next batch of it a handover
#: (L{timtx.chat.conversations.Conversations.handoverWindow}), pushed after
#: a look so that it cannot overtake that node's last push: longer than a
#: push takes between two live nodes, as the router's C{movedHorizon} is.
HANDOVER_WINDOW = 10.0


class ClusterMessaging(PersonalMessaging):
    """
    L{PersonalMessaging} whose appends go to the conversation's owner.

    @ivar forwarded: messages handed to another node's conversation owner.
    @ivar appendedForOthers: messages stored here for senders on other
        nodes.
    """

    def __init__(self, *args: Any, cluster: ClusterService, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.forwarded = 0
        self.appendedForOthers = 0
        cluster.addHandler(KIND_APPEND, self._appendReceived)
        # Echoes only by a router that can leave a node out.
        self._echoRouter = self.router if isinstance(self.router, ClusterRouter) else None
        if self._echoRouter is not None:
            cluster.offer(ECHO_FEATURE)

    def appendAndRoute(
        self, conv: str, sender: str, message: TimMessage, recipient: str, keep: bool, dedupe: tuple[str, int] | None
    ) -> Deferred[Appended]:
        try:
            owner = self.cluster.ownership.owner(conversationKey(conv))
        except NoOwner:
            owner = self.cluster.nodeId
        if owner == self.cluster.nodeId:
            return super().appendAndRoute(conv, sender, message, recipient, keep, dedupe)
        fields = [
            conv.encode(),
            sender.encode(),
            codec.encode_compact(message),
            recipient.encode(),
            b"1" if keep else b"",
            b"%d" % dedupe[1] if dedupe is not None else b"",
        ]
        router = self._echoRouter
        echoHere = router is not None and ECHO_FEATURE in self.cluster.peerFeatures(owner)
        if echoHere:
            fields.append(b"1")
        sent = False

        def answered(answer: bytes) -> Appended:
            appended, leftHere = appendOutcome(answer)
            if leftHere:
                assert router is not None
                # Where the owner's echo would have come: just before its
                # answer, after what it sent here earlier.
                router.sendHere(sender, TimType.TIMMESSAGE, Encoded(appended.message, appended.compact))
            return appended

        def failed(failure: Failure) -> Any:
            if not sent:
                # Refused before anything left this node (the owner is not
                # a live member here, or too busy): store it here.
                return super(ClusterMessaging, self).appendAndRoute(conv, sender, message, recipient, keep, dedupe)
            if failure.check(TimProtocolError):
                return failure
            return Failure(MaybeStored(ErrorCode.ERR_DATABASE, "message may not be stored, send it again"))

        d: Deferred[Any] = self.cluster.request(owner, KIND_APPEND, pack(*fields))
        d.addCallbacks(answered, failed)
        sent = True
        self.forwarded += 1
        return d

    def _appendReceived(self, node: str, payload: bytes) -> Deferred[bytes]:
        conv, sender, body, recipient, keep, clientId, *echoes = unpack(payload, 6, optional=1)
        message = thrift(TimMessage, body)
        dedupe = (text(sender), integer(clientId)) if clientId else None
        to = text(recipient)
        self.appendedForOthers += 1
        leftToIt: list[bytes] = []
        if echoes and echoes[0] and self._echoRouter is not None:
            d = self.conversations.append(text(conv), text(sender), message, (to,), keep=bool(keep), dedupe=dedupe)
            d.addCallback(self._appendedFor, text(sender), to, node, leftToIt)
        else:
            d = super().appendAndRoute(text(conv), text(sender), message, to, bool(keep), dedupe)
        if dedupe is not None and self.duplicates.peek(*dedupe)[0]:
            # The sender's keys are in memory here too (it has a session
            # here): add this one, so a resend through this node is known.
            self.duplicates.remember(dedupe[0], dedupe[1], d, text(conv))
        return d.addCallbacks(
            lambda appended: pack(b"ok", _compact(appended), b"%d" % appended.qids[to], *leftToIt),
            refusalAnswer,
        )

    def _appendedFor(
        self, appended: Appended, sender: str, recipient: str, node: str, leftToIt: list[bytes]
    ) -> Appended:
        """
        Route a message stored for a sender on C{node}, which asked to echo
        it to its own sessions itself: left to it when this node would
        have sent it there at once (L{ClusterRouter.sendExcept}).
        C{leftToIt} gets the answer's field that says whether it was.
        """
        router = self._echoRouter
        assert router is not None
        encoded = Encoded(appended.message, appended.compact)
        leftToIt.append(b"1" if router.sendExcept(sender, TimType.TIMMESSAGE, encoded, node) else b"")
        return self._pushAppended(appended, recipient, encoded)


def _compact(appended: Appended) -> bytes:
    """
    The stored message in compact, as it was sealed (encoded once).
    """
    return appended.compact if appended.compact is not None else codec.encode_compact(appended.message)
