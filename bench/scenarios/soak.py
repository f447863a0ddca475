"""
f) Soak: mixed traffic in rounds, with every client connecting and
disconnecting each round, for C{minutes}.

Each round every user logs in; pairs exchange 1:1 messages (closed loop);
a founder sends to a group of online members; a publisher streams into a
virtual room that members subscribe to; then everyone logs out.  After each
round the node's resident memory and open descriptors are read.  The first
third of the rounds warms the node up; the goals compare the last round
with the end of the warm-up:

  - resident memory grows less than 5% after warm-up,
  - no descriptor leak (the node holds no more descriptors than after the
    first round),
  - nothing lost: every 1:1 and group message reached every recipient
    (stream frames are best effort and reported apart).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from bench.nodeproc import waitFor
from bench.runner import COMMON, Param, Result, Run, Scenario
from bench.scenarios.common import deliverySummary, fmt, measuredRun, raiseIfUnsupported
from bench.scenarios.direct import DirectRole
from bench.scenarios.group import GroupRole
from bench.scenarios.vroom import VroomRole
from bench.wire import LeanConnection
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import TimType

#: The goals of issue 10.
RSS_GROWTH_GOAL = 0.05


class SoakRole(GroupRole):
    """
    Every operation the soak drives: those of the 1:1, group and room
    scenarios under names of their own.
    """

    op_direct = DirectRole.op_send
    _sender = DirectRole._sender
    op_groupCreate = GroupRole.op_create
    op_groupJoin = GroupRole.op_join
    op_groupSend = GroupRole.op_send
    op_roomCreate = VroomRole.op_create
    op_roomSubscribe = VroomRole.op_subscribe
    op_roomSend = VroomRole.op_send

    def frameReceived(self, connection: LeanConnection, timType: int, payload: bytes, acked: bool) -> None:
        if timType == TimType.TIMSTREAM and connection.encoding is Encoding.JSON:
            # As the room scenario: binary fields are base64 in JSON.
            payload = base64.b64decode(json.loads(payload).get("body") or "")
        super().frameReceived(connection, timType, payload, acked)


class Soak(Scenario):
    name = "soak"
    letter = "f"
    title = "Soak: mixed traffic, connections coming and going"
    role = "bench.scenarios.soak:SoakRole"
    params = (
        Param("minutes", float, 30.0, 0.3, "minutes to run (at least three rounds)"),
        Param("pairs", int, 50, 5, "pairs of users exchanging 1:1 messages"),
        Param("messages", int, 20, 5, "1:1 messages each user sends per round"),
        Param("members", int, 100, 10, "group members (from the same users), founder included"),
        Param("posts", int, 5, 3, "group messages per round"),
        Param("subscribers", int, 50, 5, "room subscribers (from the same users)"),
        Param("frames", int, 20, 5, "stream frames per round"),
        Param("rate", float, 20.0, 20.0, "group messages and stream frames per second"),
        Param("body", int, 100, 100, "characters of text per message"),
        Param("timeout", float, 120.0, 60.0, "seconds to wait for deliveries in each phase"),
        *COMMON,
    )

    def nodeSections(self, params: dict) -> dict:
        return {"messages": {"noauth": True}, "store": {"backend": "sqlite"}, "groups": {"member_notices": False}}

    async def drive(self, run: Run) -> Result:
        p = run.params
        workers = run.workers
        users = list(range(max(2 * p["pairs"], p["members"], p["subscribers"] + 1)))
        # Both users of pair k (2k and 2k+1) live in the worker of pair k.
        owner = lambda i: (i // 2) % workers.count  # noqa: E731
        usersOf = run.share(users, owner)
        pairsOf = run.share(range(p["pairs"]))
        founder, publisher = 0, 0
        members = users[1 : p["members"]]
        membersOf = run.share(members, owner)
        subscribers = users[1 : p["subscribers"] + 1]
        subscribersOf = run.share(subscribers, owner)
        run.log(f"registering {len(users)} users")
        await workers.all("register", lambda w: {"indices": usersOf(w)})
        deadline = time.monotonic() + 60 * p["minutes"]
        rounds: list[dict[str, Any]] = []
        lost = duplicates = 0
        gid = vnode = None
        streamExpected = streamReceived = 0
        while len(rounds) < 3 or time.monotonic() < deadline:
            await workers.all("login", lambda w: {"indices": usersOf(w)})
            if gid is None:
                created = await workers.one(owner(founder), "groupCreate", indices=[founder])
                raiseIfUnsupported(created, "groups")
                gid = created["gids"][str(founder)]
                await workers.all("groupJoin", lambda w, gid=gid: {"memberships": [(i, gid) for i in membersOf(w)]})
            if vnode is None:
                # The room stays; subscriptions end with each session.
                room = await workers.one(owner(publisher), "roomCreate", index=publisher)
                raiseIfUnsupported(room, "virtual rooms")
                vnode = room["vnode"]
            await workers.all("roomSubscribe", lambda w, vnode=vnode: {"indices": subscribersOf(w), "vnode": vnode})
            # 1:1, closed loop.
            tallies, cpu = await measuredRun(
                run,
                lambda w: 2 * len(pairsOf(w)) * p["messages"],
                lambda w: ("direct", {"pairs": pairsOf(w), "count": p["messages"], "window": 4}),
                p["timeout"],
                profiled=False,
            )
            direct = deliverySummary(tallies, cpu)
            # The group.
            tallies, cpu = await measuredRun(
                run,
                lambda w: len(membersOf(w)) * p["posts"],
                lambda w, gid=gid: (
                    "groupSend",
                    {"groups": {str(founder): gid}, "count": p["posts"], "rate": p["rate"]},
                ),
                p["timeout"],
                [owner(founder)],
                profiled=False,
            )
            group = deliverySummary(tallies, cpu)
            # The room: best effort.
            tallies, cpu = await measuredRun(
                run,
                lambda w: len(subscribersOf(w)) * p["frames"],
                lambda w, vnode=vnode: (
                    "roomSend",
                    {"index": publisher, "vnode": vnode, "count": p["frames"], "rate": p["rate"]},
                ),
                min(p["timeout"], 10.0),
                [owner(publisher)],
                profiled=False,
            )
            stream = deliverySummary(tallies, cpu)
            await workers.all("logout", {})
            # Let the node see every close before reading it.
            await waitFor(run.reactor, 1.0)
            rounds.append(
                {
                    "rss_kb": run.node.rssKB(),
                    "open_files": run.node.openFiles(),
                    "direct": direct["received"],
                    "group": group["received"],
                    "lost": direct["lost"] + group["lost"],
                }
            )
            lost += direct["lost"] + group["lost"]
            duplicates += direct["duplicates"] + group["duplicates"]
            streamExpected += stream["expected"]
            streamReceived += stream["received"]
            run.log(
                f"round {len(rounds)}: rss {rounds[-1]['rss_kb'] / 1024:.1f} MiB, "
                f"{rounds[-1]['open_files']} files, lost {rounds[-1]['lost']}"
            )
        # Caches (relations, duplicate keys, the database's pages) fill in
        # the first rounds: the first third warms up.
        warmup = max(1, len(rounds) // 3)
        first, last = rounds[warmup - 1], rounds[-1]
        growth = (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"]
        result = Result(lost=lost)
        result.metrics.update(
            {
                "rounds": len(rounds),
                "rss_kb_first": first["rss_kb"],
                "rss_kb_last": last["rss_kb"],
                "rss_growth": round(growth, 4),
                "open_files_first": first["open_files"],
                "open_files_last": last["open_files"],
                "lost": lost,
                "duplicates": duplicates,
                "stream_frames": f"{streamReceived} of {streamExpected}",
                "per_round": rounds,
            }
        )
        result.rows = [
            ("rounds", f"{len(rounds)} in {fmt(p['minutes'])} min"),
            (
                "per round",
                f"{2 * p['pairs']} users log in and out; {2 * p['pairs'] * p['messages']} 1:1 messages; "
                f"{p['posts']} group messages to {len(members)} members; {p['frames']} stream frames to "
                f"{len(subscribers)} subscribers",
            ),
            (
                "resident memory after warm-up → last",
                f"{first['rss_kb'] / 1024:.1f} → {last['rss_kb'] / 1024:.1f} MiB ({100 * growth:+.1f}%)",
            ),
            ("open descriptors after warm-up → last", f"{first['open_files']} → {last['open_files']}"),
            ("1:1 and group messages lost", str(lost)),
            ("duplicates", str(duplicates)),
            ("stream frames (best effort)", f"{streamReceived} of {streamExpected}"),
        ]
        result.goals = [
            ("resident memory grows < 5% after warm-up", f"{100 * growth:+.1f}%", growth < RSS_GROWTH_GOAL),
            (
                "no descriptor leak",
                f"{first['open_files']} → {last['open_files']}",
                last["open_files"] <= first["open_files"],
            ),
            ("0 lost", str(lost), lost == 0),
        ]
        return result
