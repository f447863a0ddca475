# -*- test-case-name: timtx.test.test_groupsim -*-
"""
Groups and live rooms across nodes under faults: seeded runs of the
deterministic simulation (L{timtx.test.groupsim}), each with its own
random operations, crashes, partitions and heals, checked afterwards.

A failing seed prints its number, every broken promise and the run's
trace; C{python -m timtx.test.groupsim --seed N [--restarts]} runs it
again, identically.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from timtx.test.groupsim import GroupSim

#: Seeds whose runs find a known bug, and what it is; their tests are
#: skipped with that reason until it is fixed.
KNOWN: dict[tuple[int, bool], str] = {}


def _run(testCase: SynchronousTestCase, seed: int, restarts: bool) -> None:
    reason = KNOWN.get((seed, restarts))
    sim = GroupSim(seed, restarts=restarts)
    sim.run()
    problems = sim.check()
    if reason is not None and problems:
        raise testCase.skipTest(reason)
    if problems:
        option = " --restarts" if restarts else ""
        testCase.fail(
            f"seed {seed}{' (restarts)' if restarts else ''}: {len(problems)} problems "
            f"(python -m timtx.test.groupsim --seed {seed}{option} --trace)\n"
            + "\n".join(problems)
            + "\n\ntrace:\n"
            + "\n".join(sim.trace)
        )


def _seedTest(seed: int, restarts: bool) -> object:
    def test(self: SynchronousTestCase) -> None:
        _run(self, seed, restarts)

    if restarts:
        test.__doc__ = (
            f"Seed {seed}, nodes restarting while messages flow: every group message stored once, under one "
            "seq, with no hole; each device gets them in seq order; the room's frames in order."
        )
    else:
        test.__doc__ = (
            f"Seed {seed}: every confirmed group message reaches every steady member in seq order with no "
            "gap; the room's frames arrive in order, and flow again once all is repaired."
        )
    return test


class GroupSimTests(SynchronousTestCase):
    """
    Crashed nodes restart only once the traffic is over: every promise is
    checked, holes included.
    """


class GroupSimRestartTests(SynchronousTestCase):
    """
    Crashed nodes restart while messages flow: a restarted node delivers a
    group's next message without looking for a gap before it (a known
    limit, docs/cluster.md), so holes are not checked.
    """


for _seed in range(1, 16):
    setattr(GroupSimTests, f"test_seed{_seed}", _seedTest(_seed, False))
for _seed in range(101, 111):
    setattr(GroupSimRestartTests, f"test_seed{_seed}", _seedTest(_seed, True))
