# -*- test-case-name: timtx.test.test_flow -*-
"""
Tests for L{timtx.delivery.flow}: the one flow control of 1:1 pushes and
group fan-out.
"""

from twisted.trial.unittest import SynchronousTestCase

from timtx.delivery.flow import FlowControl


class _Session:
    closed = False


class FlowControlTests(SynchronousTestCase):
    def setUp(self):
        self.caughtUp = []
        self.flow = FlowControl(3, caughtUp=self.caughtUp.append)
        self.session = _Session()

    def test_untracked(self):
        """
        A session that never started, or ended, gets no pushes.
        """
        self.assertIsNone(self.flow.admit(self.session))
        self.flow.start(self.session).live = True
        self.flow.end(self.session)
        self.assertIsNone(self.flow.admit(self.session))

    def test_notLiveIsSkipped(self):
        """
        A session still reading what it missed is skipped, and the skip is
        noted so that its reader looks once more.
        """
        state = self.flow.start(self.session)
        self.assertIsNone(self.flow.admit(self.session))
        self.assertTrue(state.skipped)
        self.assertEqual(state.unacked, 0)

    def test_windowThenBacklog(self):
        """
        A live session takes C{maxUnacked} pushes; the next one makes it
        backlogged, and once every push is acknowledged, C{caughtUp} runs
        once.
        """
        state = self.flow.start(self.session)
        state.live = True
        for _ in range(3):
            self.assertIs(self.flow.admit(self.session), state)
        self.assertIsNone(self.flow.admit(self.session))
        self.assertEqual((state.live, state.backlogged, state.unacked), (False, True, 3))
        self.flow.acked(self.session)
        self.flow.acked(self.session)
        self.assertEqual(self.caughtUp, [])
        self.flow.acked(self.session)
        self.assertEqual(self.caughtUp, [self.session])
        self.assertFalse(state.backlogged)
        self.flow.acked(self.session)
        self.assertEqual((state.unacked, self.caughtUp), (0, [self.session]))

    def test_closedSessionNotCaughtUp(self):
        """
        A backlogged session that closed is not sent its backlog.
        """
        state = self.flow.start(self.session)
        state.live = True
        for _ in range(4):
            self.flow.admit(self.session)
        self.session.closed = True
        for _ in range(3):
            self.flow.acked(self.session)
        self.assertEqual(self.caughtUp, [])
