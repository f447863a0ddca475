# -*- test-case-name: timtx.test.test_flow -*-
"""
Flow control of pushes: which sessions may be pushed to now.

Every push that asks for an ack (a 1:1 message from the inbox, a group
message) goes through one L{FlowControl}.  A session is pushed to only while
it is I{live}: caught up with what it missed, and not too far behind in
acknowledging.  A session that is not live is skipped, and what it was not
pushed waits where it is stored (its inbox, a group's history) until the
session reads it in order.

Two rules, for every kind of push alike:

  - a session still reading what it missed (after login, or after falling
    behind) is not pushed to; the push is noted as I{skipped}, so that the
    reader looks once more before going live;
  - a session with C{maxUnacked} pushes unacknowledged stops being live and
    is I{backlogged}; once it has acknowledged them all, C{caughtUp(session)}
    runs, which sends the backlog in order before it goes live again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet.interfaces import IDelayedCall

if TYPE_CHECKING:
    from timtx.delivery.sessions import Session


#: Offline-listed inbox entries a session remembers (L{SessionFlow.listed}).
LISTED_REMEMBERED = 64


class SessionFlow:
    """
    What flow control and the inbox reader know about one session.

    @ivar live: whether pushes go out now.
    @ivar draining: whether what it missed is being sent as lists.
    @ivar quiet: the drain under way is the node's own check after login: it
        ends without TIMOFFLINEMSGEND, unless the client asks meanwhile.
    @ivar backlogged: it stopped acknowledging and missed pushes since.
    @ivar skipped: something was not pushed because it was not live; the
        drain then looks once more before going live.
    @ivar inFlight: qid -> ack id of inbox entries pushed live and not yet
        acknowledged.
    @ivar unacked: pushes of any kind not yet acknowledged.
    @ivar timer: the wait for the client to ask for what it missed.
    @ivar held: pushes wait until the inbox is read again
        (L{timtx.delivery.inbox.InboxDelivery.hold}); no drain makes it
        live meanwhile.
    @ivar listed: the last L{LISTED_REMEMBERED} inbox entries (qids) it got
        in offline lists, or C{None} before any: a push of one of them that
        arrives late (from a node that stored it just before a conversation
        changed owners) is not sent again, out of order.
    """

    __slots__ = ("live", "draining", "quiet", "backlogged", "skipped", "inFlight", "unacked", "timer", "held", "listed")

    def __init__(self) -> None:
        self.live = False
        self.draining = False
        self.quiet = False
        self.backlogged = False
        self.skipped = False
        self.inFlight: dict[int, int] = {}
        self.unacked = 0
        self.timer: IDelayedCall | None = None
        self.held = False
        self.listed: dict[int, None] | None = None

    def noteListed(self, qids: list[int]) -> None:
        """
        Remember that C{qids} went out in an offline list.
        """
        listed = self.listed
        if listed is None:
            listed = self.listed = {}
        for qid in qids:
            listed[qid] = None
        # Late pushes come shortly after the list that overtook them: the
        # newest entries are the ones worth remembering.
        while len(listed) > LISTED_REMEMBERED:
            del listed[next(iter(listed))]


class FlowControl:
    """
    The L{SessionFlow} of every session on this node, and the two decisions
    made from it: may a push go out (L{admit}), and has a session caught up
    (L{acked}).

    @param maxUnacked: pushes a session may leave unacknowledged before it
        stops getting them.
    @param caughtUp: called with a backlogged session once it has
        acknowledged every push.
    """

    def __init__(self, maxUnacked: int, caughtUp: Callable[[Session], object]):
        self.maxUnacked = maxUnacked
        self._caughtUp = caughtUp
        self._states: dict[Session, SessionFlow] = {}

    def start(self, session: Session) -> SessionFlow:
        """
        Track a session that just logged in; it is not live yet.
        """
        state = self._states[session] = SessionFlow()
        return state

    def end(self, session: Session) -> SessionFlow | None:
        """
        Forget a session that ended.
        """
        return self._states.pop(session, None)

    def state(self, session: Session) -> SessionFlow | None:
        return self._states.get(session)

    def admit(self, session: Session) -> SessionFlow | None:
        """
        Decide whether one push may go to C{session} now, and count it if so.
        Called once per session on the fan-out hot path.

        @return: the session's state if the push goes out; C{None} if the
            session is not tracked, not live (the push is noted as skipped)
            or too far behind (it becomes backlogged).
        """
        state = self._states.get(session)
        if state is None:
            return None
        if not state.live:
            state.skipped = True
            return None
        if state.unacked >= self.maxUnacked:
            # It stopped acknowledging; what it misses waits where it is
            # stored.
            state.live = False
            state.backlogged = True
            return None
        state.unacked += 1
        return state

    def acked(self, session: Session) -> None:
        """
        One push admitted for C{session} was acknowledged.
        """
        state = self._states.get(session)
        if state is None:
            return
        if state.unacked:
            state.unacked -= 1
        if state.backlogged and not state.unacked and not session.closed:
            state.backlogged = False
            self._caughtUp(session)
