# -*- test-case-name: timtx.test.test_clusterrouting -*-
"""
The user directory: which nodes hold a user's sessions.

Each user has an I{owner} node, the rendezvous owner of C{user:<uid>}
among the live members (L{timtx.cluster.ownership}).  Every node tells a
user's owner the sessions it holds of that user (C{dir.set}, the whole list
each time, so that a repeat is harmless); the owner keeps them, and is
therefore the one node that knows whether a user is online anywhere, how
many sessions it has, and which is the oldest.

A node that routes to a user asks its owner once (C{dir.get}) and keeps the
answer; the owner remembers who asked and sends each change to them
(C{dir.update}) until they forget the user (C{dir.drop}).  So a message
costs one hop, to the nodes holding the recipient's sessions, and a lookup
only the first time.

An answer is kept only if it is I{sure}: the node asked owns the user in
its own view too, and still does in the asker's.  While views differ after
a membership change, the node an asker takes for the new owner may not
know it yet: it answers what it has (the copy it kept as successor, say),
flagged as not the owner's, and the asker neither keeps it nor trusts it
(L{UserDirectory.route}; the router reads the user's inbox again once it
can be sure, L{timtx.cluster.router}).  Kept, such an answer (often "no
sessions": the registrations go to the owner) would route the user's
messages nowhere until its next change.

Why a login waits for its registration: the owner answers C{dir.set} only
once every node that cached the user has the change (or could not be
reached).  The new session reads its inbox after that, so a message stored
at any moment is either in what it reads or pushed to it by a node that
already knows where it is.

When membership changes, owners move: each node registers its users again
with their new owners, forgets the entries it no longer owns and the cached
users whose owner moved (they are asked again when next needed); a dead
node's sessions are removed by the owners of its users.

The owner keeps a copy of each entry on its successor (the node with the
next highest score for the user, C{dir.replica}), which is the node that
owns the user if the owner goes.  So when a node dies holding sessions of
users it also owned, their new owner knows the sessions were there, and
announces the users offline.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from timtx.cluster.insist import Insistence
from timtx.cluster.membership import ClusterService
from timtx.cluster.ownership import NoOwner, Ownership, userKey
from timtx.cluster.swim import ChangeKind, MemberChange
from timtx.cluster.wire import BadPayload, dumps, loads
from timtx.delivery.registry import overflow

if TYPE_CHECKING:
    from timtx.config import DevicesConfig
    from timtx.delivery.registry import SessionRegistry
    from timtx.delivery.sessions import Session

KIND_SET = "dir.set"
KIND_GET = "dir.get"
KIND_UPDATE = "dir.update"
KIND_DROP = "dir.drop"
KIND_KICK = "dir.kick"
KIND_REPLICA = "dir.replica"
KIND_BACK = "dir.back"


@dataclass(frozen=True)
class Located:
    """
    Where a user's sessions are, as a lookup found (L{UserDirectory.route}).

    @ivar nodes: the nodes holding them.
    @ivar sure: whether the answer is the owner's in both views; if not,
        sessions may be elsewhere too.
    """

    nodes: frozenset[str]
    sure: bool


@dataclass(frozen=True)
class SessionEntry:
    """
    One session as the directory knows it.

    @ivar node: the node holding it.
    @ivar sid: its id, unique on that node.
    @ivar termtyp: its terminal type, for the device limits.
    @ivar loginTime: when it logged in, for C{kick-oldest}.
    """

    node: str
    sid: int
    termtyp: int
    loginTime: float


class UserDirectory:
    """
    This node's part of the user directory: the entries of the users it
    owns, and the nodes of the users it routes to.

    @param sessions: this node's sessions.
    @param maxCached: users whose nodes are kept for routing; the least
        recently used are forgotten (and the owner told) past it.
    @param devices: the device limits, applied by the owner over a user's
        sessions on every node when a node registers a new one.
    @param kick: called with C{(uid, sid)} to log out a session of this
        node that a login elsewhere pushed out (C{kick-oldest}).
    @param lastSessionEnded: called with C{(uid, domain)} by the owner when
        a user's last session in the whole cluster ends.
    @param registeringAgain: called with C{(uid, registered)} as this node
        registers C{uid}'s sessions again, after a membership change, when
        the owner may never have had them (registering them failed or was
        under way: the owner was unreachable, dying, say): the nodes
        storing for C{uid} meanwhile did not push here, so what they stored
        waits in its inbox.  C{registered} fires (with a result or a
        failure) once the new owner has them.
    @param unknownToOwner: called with C{uid} when this node registered
        sessions of C{uid} again (not a login) and the owner did not know
        it held any: the owner may have answered lookups without them
        meanwhile (it took the user over without the copy of its entry),
        so what was stored then waits in the inbox.

    @ivar forgotten: called with the users whose cached nodes this node
        dropped because their owner had held it dead (C{dir.back}): pushes
        routed by them lately may have missed sessions.
    @ivar entries: for each user owned here, its sessions by node.
    @ivar unconfirmed: users whose sessions here their owner may not know
        (their last registration failed or is under way), with that
        registration's number.
    """

    log = Logger()

    def __init__(
        self,
        cluster: ClusterService,
        sessions: SessionRegistry,
        *,
        maxCached: int = 100_000,
        devices: DevicesConfig | None = None,
        kick: Callable[[str, int], object] | None = None,
        lastSessionEnded: Callable[[str, str], object] | None = None,
        registeringAgain: Callable[[str, Deferred[bool]], object] | None = None,
        unknownToOwner: Callable[[str], object] | None = None,
    ):
        self.cluster = cluster
        self.devices = devices
        self.kick: Callable[[str, int], object] = kick or (lambda uid, sid: None)
        self.sessions = sessions
        self.maxCached = maxCached
        self.lastSessionEnded = lastSessionEnded
        self.registeringAgain = registeringAgain
        self.unknownToOwner = unknownToOwner
        self.unconfirmed: dict[str, int] = {}
        self.forgotten: list[Callable[[list[str]], object]] = []
        self._registrations = count(1)
        self.entries: dict[str, dict[str, list[SessionEntry]]] = {}
        #: Copies of the entries of users this node is the successor for:
        #: their domain and sessions by node.
        self.replicas: dict[str, tuple[str, dict[str, list[SessionEntry]]]] = {}
        self._domains: dict[str, str] = {}
        self._subscribers: dict[str, set[str]] = {}
        self._cache: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lookups: dict[str, Deferred[Located]] = {}
        self._sids: dict[Session, int] = {}
        self._nextSid = count(1)
        self._ownership = cluster.ownership
        self._back = Insistence(cluster, KIND_BACK)
        cluster.addHandler(KIND_SET, self._setReceived)
        cluster.addHandler(KIND_GET, self._getReceived)
        cluster.addHandler(KIND_UPDATE, self._updateReceived)
        cluster.addHandler(KIND_DROP, self._dropReceived)
        cluster.addHandler(KIND_KICK, self._kickReceived)
        cluster.addHandler(KIND_REPLICA, self._replicaReceived)
        cluster.addHandler(KIND_BACK, self._backReceived)
        cluster.addObserver(self._membershipChanged)
        cluster.addRestartObserver(self._nodeRestarted)

    @property
    def nodeId(self) -> str:
        return self.cluster.nodeId

    def owner(self, uid: str) -> str:
        try:
            return self.cluster.ownership.owner(userKey(uid))
        except NoOwner:
            return self.nodeId

    def stop(self) -> None:
        """
        The node stops: tell no node again that it is back.
        """
        self._back.stop()

    # This node's sessions.

    def sessionId(self, session: Session) -> int:
        """
        The id of a local session in the directory.
        """
        sid = self._sids.get(session)
        if sid is None:
            sid = self._sids[session] = next(self._nextSid)
        return sid

    def sessionFor(self, uid: str, sid: int) -> Session | None:
        for session in self.sessions.sessionsView(uid):
            if self._sids.get(session) == sid:
                return session
        return None

    def register(self, uid: str, domain: str, admit: Session | None = None) -> Deferred[bool]:
        """
        Tell C{uid}'s owner the sessions this node holds of it now.

        @param admit: a new session among them, to admit within the device
            limits across the cluster.
        @return: fires once the owner has it and has told the nodes that
            route to C{uid} (or failed to), with whether C{admit} was
            admitted; C{True} if the owner could not be asked (the limits
            are then only this node's own).
        """
        sessions = [
            [self.sessionId(s), s.termtyp, s.loginTime] for s in self.sessions.sessionsView(uid) if not s.closed
        ]
        message: dict[str, Any] = {"uid": uid, "domain": domain, "sessions": sessions}
        if admit is not None:
            message["admit"] = self.sessionId(admit)
        number = self.unconfirmed[uid] = next(self._registrations)
        d: Deferred[Any] = self.cluster.request(self.owner(uid), KIND_SET, dumps(message))
        again = admit is None and bool(sessions)
        d.addCallbacks(self._registered, self._registerFailed, callbackArgs=(uid, number, again), errbackArgs=(uid,))
        return d

    def forgetSession(self, session: Session) -> None:
        self._sids.pop(session, None)

    def _registered(self, answer: bytes, uid: str, number: int, again: bool) -> bool:
        if self.unconfirmed.get(uid) == number:
            # Not an older registration answered after a newer one started.
            del self.unconfirmed[uid]
        message = loads(answer)
        # A node of an earlier version does not say: take it as known.
        if again and message.get("known", True) is False and self.unknownToOwner is not None:
            self.unknownToOwner(uid)
        return message.get("admitted") is not False

    def _registerFailed(self, failure: Failure, uid: str) -> bool:
        self.log.warn("registering the sessions of {uid} failed: {why}", uid=uid, why=failure.getErrorMessage())
        return True

    # The owner's side.

    def _setReceived(self, node: str, payload: bytes) -> Deferred[Any]:
        message = loads(payload)
        uid, domain = _text(message, "uid"), _text(message, "domain")
        rows = message.get("sessions")
        if not isinstance(rows, list):
            raise BadPayload("sessions is not a list")
        try:
            sessions = [SessionEntry(node, int(sid), int(termtyp), float(login)) for sid, termtyp, login in rows]
        except (TypeError, ValueError):
            raise BadPayload("sessions are [sid, termtyp, loginTime] lists") from None
        known = node in self.entries.get(uid, {})
        admitted = True
        admit = message.get("admit")
        if isinstance(admit, int):
            sessions, admitted = self._admit(uid, node, sessions, admit)
        d = self._set(uid, domain, node, sessions)
        return d.addCallback(lambda _: dumps({"admitted": admitted, "known": known}))

    def _admit(self, uid: str, node: str, sessions: list[SessionEntry], sid: int) -> tuple[list[SessionEntry], bool]:
        """
        Apply the device limits to the new session C{sid} of C{node}, over
        every session of C{uid} in the cluster, as one node does over its
        own (L{overflow}): refuse it, or log out the oldest wherever they
        are.

        @return: the sessions of C{node} to keep, and whether C{sid} is
            admitted.
        """
        devices = self.devices
        new = next((entry for entry in sessions if entry.sid == sid), None)
        if devices is None or new is None:
            return sessions, True
        byNode = self.entries.get(uid, {})
        existing = [entry for other, entries in byNode.items() if other != node for entry in entries]
        existing.extend(entry for entry in sessions if entry.sid != sid)
        existing.sort(key=lambda e: (e.loginTime, e.node, e.sid))
        victims = overflow(devices, existing, new.termtyp)
        if not victims:
            return sessions, True
        if devices.overflow == "reject":
            return [entry for entry in sessions if entry.sid != sid], False
        for victim in victims:
            self.log.info(
                "kicking session {sid} of {uid} on node {node} to admit a new one",
                sid=victim.sid,
                uid=uid,
                node=victim.node,
            )
            if victim.node in byNode and victim.node != node:
                # Its node registers again once it has logged it out.
                left = [entry for entry in byNode[victim.node] if entry != victim]
                if left:
                    byNode[victim.node] = left
                else:
                    del byNode[victim.node]
            if victim.node == self.nodeId:
                self.kick(uid, victim.sid)
            else:
                d = self.cluster.send(victim.node, KIND_KICK, dumps({"uid": uid, "sid": victim.sid}))
                d.addErrback(self._kickFailed, victim.node)
        return [entry for entry in sessions if entry not in victims], True

    def _kickFailed(self, failure: Failure, node: str) -> None:
        self.log.warn("cannot kick a session on node {node}: {why}", node=node, why=failure.getErrorMessage())

    def _set(self, uid: str, domain: str, node: str, sessions: list[SessionEntry]) -> Deferred[Any]:
        byNode = self.entries.get(uid)
        before = frozenset(byNode) if byNode else frozenset()
        if sessions:
            self._domains[uid] = domain
            if byNode is None:
                byNode = self.entries[uid] = {}
            byNode[node] = sessions
        elif byNode is not None:
            byNode.pop(node, None)
        after = frozenset(self.entries.get(uid, ()))
        if not after:
            self.entries.pop(uid, None)
        self._replicate(uid, domain)
        if before == after:
            return succeed(None)
        if before and not after:
            self._lastEnded(uid)
        return self._publish(uid, after)

    def _successor(self, ownership: Ownership, uid: str) -> str | None:
        """
        The node that would own C{uid} if its owner went, if this node owns
        it.
        """
        try:
            owners = ownership.owners(userKey(uid), 2)
        except NoOwner:
            return None
        return owners[1] if len(owners) == 2 and owners[0] == self.nodeId else None

    def _replicate(self, uid: str, domain: str) -> None:
        successor = self._successor(self.cluster.ownership, uid)
        if successor is None:
            return
        byNode = self.entries.get(uid, {})
        nodes = {node: [[e.sid, e.termtyp, e.loginTime] for e in entries] for node, entries in byNode.items()}
        d = self.cluster.send(successor, KIND_REPLICA, dumps({"uid": uid, "domain": domain, "nodes": nodes}))
        d.addErrback(self._replicateFailed, successor)

    def _replicateFailed(self, failure: Failure, node: str) -> None:
        self.log.info("copying an entry to node {node} failed: {why}", node=node, why=failure.getErrorMessage())

    def _replicaReceived(self, node: str, payload: bytes) -> None:
        message = loads(payload)
        uid, domain, nodes = _text(message, "uid"), message.get("domain"), message.get("nodes")
        if not isinstance(nodes, dict) or not isinstance(domain, str):
            raise BadPayload("domain and nodes are required")
        if not nodes:
            self.replicas.pop(uid, None)
            return
        self.replicas[uid] = (
            domain,
            {
                str(holder): [
                    SessionEntry(str(holder), int(sid), int(termtyp), float(login)) for sid, termtyp, login in rows
                ]
                for holder, rows in nodes.items()
            },
        )

    def _lastEnded(self, uid: str) -> None:
        domain = self._domains.pop(uid, "")
        if self.lastSessionEnded is not None:
            try:
                self.lastSessionEnded(uid, domain)
            except Exception:
                self.log.failure("announcing that {uid} went offline failed", uid=uid)

    def _publish(self, uid: str, nodes: frozenset[str]) -> Deferred[Any]:
        """
        Send the nodes of C{uid} to every node that routes to it, and fire
        once each has it (or could not be told).
        """
        payload = dumps({"uid": uid, "nodes": sorted(nodes)})
        waits = [
            self.cluster.request(subscriber, KIND_UPDATE, payload) for subscriber in self._subscribers.get(uid, ())
        ]
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True)

    def _getReceived(self, node: str, payload: bytes) -> bytes:
        uid = _text(loads(payload), "uid")
        if self.owner(uid) == self.nodeId:
            self._subscribers.setdefault(uid, set()).add(node)
            return dumps({"uid": uid, "nodes": sorted(self.entries.get(uid, ())), "owner": True})
        # The asker's view says this node owns the user, this node's does
        # not (yet): answer what is known here, the copy kept as successor
        # if any, as not the owner's, so that the asker does not keep it.
        replica = self.replicas.get(uid)
        nodes = replica[1] if replica is not None else self.entries.get(uid, {})
        return dumps({"uid": uid, "nodes": sorted(nodes), "owner": False})

    def _dropReceived(self, node: str, payload: bytes) -> None:
        uids = loads(payload).get("uids")
        if not isinstance(uids, list):
            raise BadPayload("uids is not a list")
        for uid in uids:
            subscribers = self._subscribers.get(str(uid))
            if subscribers is not None:
                subscribers.discard(node)
                if not subscribers:
                    del self._subscribers[str(uid)]

    def sessionsOf(self, uid: str) -> list[SessionEntry]:
        """
        Every session of C{uid} in the cluster, oldest first, if this node
        owns C{uid}.
        """
        found = [entry for entries in self.entries.get(uid, {}).values() for entry in entries]
        return sorted(found, key=lambda e: (e.loginTime, e.node, e.sid))

    def _kickReceived(self, node: str, payload: bytes) -> None:
        message = loads(payload)
        self.kick(_text(message, "uid"), int(message.get("sid", 0)))

    # The routing side.

    def nodes(self, uid: str) -> frozenset[str] | None:
        """
        The nodes holding sessions of C{uid} (this one included), if known
        without asking.
        """
        if self.owner(uid) == self.nodeId:
            return frozenset(self.entries.get(uid, ()))
        nodes = self._cache.get(uid)
        if nodes is not None:
            self._cache.move_to_end(uid)
        return nodes

    def locate(self, uid: str) -> Deferred[frozenset[str]]:
        """
        The nodes holding sessions of C{uid}, asking its owner if need be;
        an owner that cannot be asked is taken to say none.  Lookups of one
        user share one request, and their callbacks run in the order they
        were asked.
        """
        return self.route(uid).addCallback(lambda located: located.nodes)

    def route(self, uid: str) -> Deferred[Located]:
        """
        Like L{locate}, and whether the answer is sure: C{False} when the
        owner could not be asked or was not the owner in its own view
        (views differ after a membership change), or ownership moved while
        it answered.  Sessions of C{uid} may then be elsewhere too.
        """
        known = self.nodes(uid)
        if known is not None:
            return succeed(Located(known, True))
        pending = self._lookups.get(uid)
        if pending is None:
            owner = self.owner(uid)
            pending = self._lookups[uid] = Deferred()
            d = self.cluster.request(owner, KIND_GET, dumps({"uid": uid}))
            d.addCallbacks(self._located, self._locateFailed, callbackArgs=(uid, owner), errbackArgs=(uid,))
        waiter: Deferred[Located] = Deferred()
        pending.addCallback(_fan, waiter)
        return waiter

    def _located(self, answer: bytes, uid: str, owner: str) -> None:
        message = loads(answer)
        nodes = frozenset(str(n) for n in message.get("nodes", ()))
        # A node of an earlier version does not say: it answered as owner.
        sure = message.get("owner", True) is not False and self.owner(uid) == owner
        if sure:
            self._remember(uid, nodes)
        pending = self._lookups.pop(uid, None)
        if pending is not None:
            pending.callback(Located(nodes, sure))

    def _locateFailed(self, failure: Failure, uid: str) -> None:
        self.log.warn("cannot locate {uid}: {why}", uid=uid, why=failure.getErrorMessage())
        pending = self._lookups.pop(uid, None)
        if pending is not None:
            pending.callback(Located(frozenset(), False))

    def _remember(self, uid: str, nodes: frozenset[str]) -> None:
        self._cache[uid] = nodes
        self._cache.move_to_end(uid)
        if len(self._cache) > self.maxCached:
            dropped: dict[str, list[str]] = {}
            while len(self._cache) > self.maxCached:
                old, _ = self._cache.popitem(last=False)
                dropped.setdefault(self.owner(old), []).append(old)
            for owner, uids in dropped.items():
                self.cluster.send(owner, KIND_DROP, dumps({"uids": uids})).addErrback(lambda _: None)

    def _updateReceived(self, node: str, payload: bytes) -> None:
        message = loads(payload)
        uid = _text(message, "uid")
        nodes = frozenset(str(n) for n in message.get("nodes", ()))
        if self.owner(uid) == node:
            self._remember(uid, nodes)

    # Membership.

    def _membershipChanged(self, change: MemberChange) -> None:
        new = self.cluster.ownership
        old, self._ownership = self._ownership, new
        if old != new:
            self._promote(new)
        gone = change.kind in (ChangeKind.DIED, ChangeKind.LEFT, ChangeKind.FORGOTTEN)
        if gone:
            # Told again when next back, if held dead meanwhile.
            self._back.forget(change.member.nodeId)
            self._nodeGone(change.member.nodeId)
        elif change.kind is ChangeKind.JOINED and change.previous is not None:
            self._tellBack(change.member.nodeId)
        if old == new:
            return
        moved = self._moved(old, new)
        for uid in [uid for uid in self._cache if moved(uid)]:
            del self._cache[uid]
        for uid in [uid for uid in self.entries if not new.owns(self.nodeId, userKey(uid))]:
            del self.entries[uid]
            self._subscribers.pop(uid, None)
            self._domains.pop(uid, None)
        # Those that went offline meanwhile have nothing left to confirm.
        for uid in set(self.unconfirmed) - set(self.sessions.users()):
            del self.unconfirmed[uid]
        for uid in self.sessions.users():
            if moved(uid) or uid in self.unconfirmed:
                sessions = self.sessions.sessionsView(uid)
                if sessions:
                    self._registerAgain(uid, sessions[0].domain)
        for uid in list(self.entries):
            if self._successor(old, uid) != self._successor(new, uid):
                self._replicate(uid, self._domains.get(uid, ""))

    def _tellBack(self, node: str) -> None:
        """
        C{node}, held dead here, is back: this node dropped its sessions and
        its lookups when it died (L{_nodeGone}); have it register the
        first again and forget the second.  It may never have seen a change
        itself, and would do neither on its own: so it is told until it
        answers, while it lives (L{Insistence}).
        """
        if node == self.nodeId:
            return
        self._back.tell(node, b"")

    def _backReceived(self, node: str, payload: bytes) -> None:
        """
        C{node} held this node dead and sees it back: it has none of this
        node's sessions of the users it owns, and tells it of none of their
        moves.  Register those users again and forget where they were.
        Answered (with nothing) as soon as that is under way; handling it
        twice (C{node} asks again when an answer is lost) costs only
        another registration.
        """
        self._ownerForgot(node, "held this node dead")

    def _ownerForgot(self, node: str, why: str) -> None:
        """
        C{node} has none of this node's sessions of the users it owns, and
        tells it of none of their moves: register those users again and
        forget where they were.
        """
        stale = [uid for uid in self._cache if self.owner(uid) == node]
        for uid in stale:
            del self._cache[uid]
        users = [uid for uid in self.sessions.users() if self.owner(uid) == node]
        for uid in users:
            sessions = self.sessions.sessionsView(uid)
            if sessions:
                self._registerAgain(uid, sessions[0].domain)
        self.log.info(
            "node {node} {why}: registering {users} users again, forgetting {stale} cached",
            node=node,
            why=why,
            users=len(users),
            stale=len(stale),
        )
        if stale:
            for callback in self.forgotten:
                callback(stale)

    def _registerAgain(self, uid: str, domain: str) -> None:
        """
        Register C{uid}'s sessions with its owner after a change of
        membership; if the last registration was not confirmed, tell
        L{registeringAgain}.
        """
        missed = uid in self.unconfirmed
        d = self.register(uid, domain)
        if missed and self.registeringAgain is not None:
            self.registeringAgain(uid, d)

    def _promote(self, new: Ownership) -> None:
        """
        Take the copies of the entries of users this node now owns as its
        own (their holders register again too); forget the copies of users
        it is no longer the successor for.
        """
        for uid, (domain, byNode) in list(self.replicas.items()):
            key = userKey(uid)
            try:
                owners = new.owners(key, 2)
            except NoOwner:
                continue
            if owners[0] == self.nodeId:
                del self.replicas[uid]
                if uid not in self.entries:
                    self.entries[uid] = dict(byNode)
                    self._domains[uid] = domain
            elif owners[1:] != [self.nodeId]:
                del self.replicas[uid]

    def _moved(self, old: Ownership, new: Ownership) -> Callable[[str], bool]:
        def moved(uid: str) -> bool:
            key = userKey(uid)
            try:
                return old.owner(key) != new.owner(key)
            except NoOwner:
                return True

        return moved

    def _nodeRestarted(self, node: str) -> None:
        """
        C{node} was started again, perhaps unseen (before any member held
        it dead, so that no ownership moved).  The sessions its last run
        registered here are gone, and would otherwise be counted (presence,
        device limits) until each user logged in there again; its new run
        registers what it holds over the link this is learnt on, after
        this.  And it knows nothing of this node's sessions of the users it
        owns, nor who cached them: as when it held this node dead, register
        those again and forget what was cached of its users.
        """
        self._nodeGone(node)
        self._ownerForgot(node, "was started again")

    def _nodeGone(self, node: str) -> None:
        """
        C{node} died or left: its sessions are gone, and it routes no more.
        """
        for uid in [uid for uid, byNode in self.entries.items() if node in byNode]:
            self._set(uid, self._domains.get(uid, ""), node, [])
        for uid, subscribers in list(self._subscribers.items()):
            subscribers.discard(node)
            if not subscribers:
                del self._subscribers[uid]
        for uid, nodes in list(self._cache.items()):
            if node in nodes:
                self._cache[uid] = nodes - {node}


def _text(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise BadPayload(f"{key} is not a string")
    return value


def _fan(located: Located, waiter: Deferred[Located]) -> Located:
    waiter.callback(located)
    return located
