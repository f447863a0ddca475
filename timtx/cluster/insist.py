# -*- test-case-name: timtx.test.test_routerdoubt -*-
"""
Telling a live node something it must hear (L{Insistence}).

A one-way message (L{ClusterService.send}) fires once written to a link,
not once handled: a link lost under it loses it unseen.  So this asks
instead (a request, which the receiving handler answers, with nothing if
it returns nothing) and asks again until the node answers, with the
backoff links are dialled with (L{ClusterService.retryPolicy}: 0.25 s
doubling to 10 s, each attempt waiting at most C{request_timeout} for its
answer), while the node stays a live member in this node's view.  A node
held dead or gone is not asked again: whoever insists tells it again if it
matters, when it is back.  At most one telling per node waits at a time.

A node that answers with an error heard it (L{PeerRequestFailed}): its
handler failed, or it runs a version without a handler for the kind,
which took such a message as one-way and ignored it.  Asking again would
change nothing, so it is told once, as before.  A node that runs a
version handling the kind as one-way answers the request (a handler serves
both): it is told as an upgraded one is.

A timed out attempt may have been handled: what is told this way must be
harmless to handle twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.cluster.membership import ClusterService, PeerRequestFailed


@dataclass
class _Telling:
    payload: bytes
    attempts: int = 0
    request: Deferred[bytes] | None = None
    timer: IDelayedCall | None = None


class Insistence:
    """
    Tell live nodes C{kind} until each answers.

    @param cluster: the cluster its requests go through, on whose clock
        and with whose backoff attempts are repeated.
    @param kind: the kind of every telling.
    """

    log = Logger()

    def __init__(self, cluster: ClusterService, kind: str):
        self.cluster = cluster
        self.kind = kind
        self._tellings: dict[str, _Telling] = {}
        self._stopped = False

    def tell(self, node: str, payload: bytes) -> None:
        """
        Tell C{node} C{payload} until it answers, unless it is being told
        already (that telling goes on).
        """
        if self._stopped or node in self._tellings:
            return
        telling = self._tellings[node] = _Telling(payload)
        self._attempt(node, telling)

    def telling(self, node: str) -> bool:
        """
        Whether C{node} is being told and has not answered yet.
        """
        return node in self._tellings

    def forget(self, node: str) -> None:
        """
        Tell C{node} no more (it was held dead, or left).
        """
        telling = self._tellings.pop(node, None)
        if telling is None:
            return
        if telling.timer is not None and telling.timer.active():
            telling.timer.cancel()
        if telling.request is not None:
            telling.request.cancel()

    def stop(self) -> None:
        """
        This node stops: tell nothing more, and cancel what waits.
        """
        self._stopped = True
        for node in list(self._tellings):
            self.forget(node)

    def _attempt(self, node: str, telling: _Telling) -> None:
        telling.timer = None
        telling.attempts += 1
        d = telling.request = self.cluster.request(node, self.kind, telling.payload)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(node, telling), errbackArgs=(node, telling))

    def _answered(self, answer: bytes, node: str, telling: _Telling) -> None:
        if self._tellings.get(node) is telling:
            del self._tellings[node]

    def _failed(self, failure: Failure, node: str, telling: _Telling) -> None:
        if self._tellings.get(node) is not telling:
            # Forgotten (cancelled, say) meanwhile.
            return
        telling.request = None
        if isinstance(failure.value, PeerRequestFailed):
            del self._tellings[node]
            self.log.info(
                "node {node} heard {kind!r} but answered: {why}",
                node=node,
                kind=self.kind,
                why=failure.value.reason,
            )
            return
        member = self.cluster.member(node)
        if member is None or not member.live:
            del self._tellings[node]
            return
        delay = self.cluster.retryPolicy(telling.attempts)
        self.log.info(
            "telling node {node} {kind!r} failed (attempt {attempts}), again in {delay:.2f}s: {why}",
            node=node,
            kind=self.kind,
            attempts=telling.attempts,
            delay=delay,
            why=failure.getErrorMessage(),
        )
        telling.timer = self.cluster.clock.callLater(delay, self._attempt, node, telling)
