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
from timtx.cluster.resends import appendAnswer, refusalAnswer
from timtx.cluster.wire import integer, pack, text, thrift, unpack
from timtx.protocols import codec
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimMessage

KIND_APPEND = "conv.append"

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

    def appendAndRoute(
        self, conv: str, sender: str, message: TimMessage, recipient: str, keep: bool, dedupe: tuple[str, int] | None
    ) -> Deferred[Appended]:
        try:
            owner = self.cluster.ownership.owner(conversationKey(conv))
        except NoOwner:
            owner = self.cluster.nodeId
        if owner == self.cluster.nodeId:
            return super().appendAndRoute(conv, sender, message, recipient, keep, dedupe)
        payload = pack(
            conv.encode(),
            sender.encode(),
            codec.encode_compact(message),
            recipient.encode(),
            b"1" if keep else b"",
            b"%d" % dedupe[1] if dedupe is not None else b"",
        )
        sent = False

        def failed(failure: Failure) -> Any:
            if not sent:
                # Refused before anything left this node (the owner is not
                # a live member here, or too busy): store it here.
                return super(ClusterMessaging, self).appendAndRoute(conv, sender, message, recipient, keep, dedupe)
            if failure.check(TimProtocolError):
                return failure
            return Failure(MaybeStored(ErrorCode.ERR_DATABASE, "message may not be stored, send it again"))

        d: Deferred[Any] = self.cluster.request(owner, KIND_APPEND, payload)
        d.addCallbacks(appendAnswer, failed)
        sent = True
        self.forwarded += 1
        return d

    def _appendReceived(self, node: str, payload: bytes) -> Deferred[bytes]:
        conv, sender, body, recipient, keep, clientId = unpack(payload, 6)
        message = thrift(TimMessage, body)
        dedupe = (text(sender), integer(clientId)) if clientId else None
        to = text(recipient)
        self.appendedForOthers += 1
        d = super().appendAndRoute(text(conv), text(sender), message, to, bool(keep), dedupe)
        if dedupe is not None and self.duplicates.peek(*dedupe)[0]:
            # The sender's keys are in memory here too (it has a session
            # here): add this one, so a resend through this node is known.
            self.duplicates.remember(dedupe[0], dedupe[1], d, text(conv))
        return d.addCallbacks(
            lambda appended: pack(b"ok", _compact(appended), b"%d" % appended.qids[to]),
            refusalAnswer,
        )


def _compact(appended: Appended) -> bytes:
    """
    The stored message in compact, as it was sealed (encoded once).
    """
    return appended.compact if appended.compact is not None else codec.encode_compact(appended.message)
