"""
Tests for L{timtx.transports.wsspeed}: the small-frame masker gives
autobahn's bytes.
"""

import os
import random

from twisted.trial.unittest import SynchronousTestCase

from timtx.transports import wsspeed as autobahn_tuning


class SmallXorMaskerTests(SynchronousTestCase):
    def test_sameAsAutobahn(self):
        """
        For random masks, lengths and chunkings, the small masker unmasks
        exactly as autobahn's own.
        """
        rng = random.Random(7)
        for _ in range(300):
            mask = os.urandom(4)
            data = os.urandom(rng.randrange(0, 300))
            ours = autobahn_tuning.SmallXorMasker(mask)
            theirs = autobahn_tuning._original(mask, len(data))
            position = 0
            while position < len(data):
                step = rng.randrange(1, 40)
                chunk = data[position : position + step]
                self.assertEqual(ours.process(chunk), bytes(theirs.process(chunk)))
                self.assertEqual(ours.pointer(), theirs.pointer())
                position += step

    def test_largeFramesKeepAutobahns(self):
        masker = autobahn_tuning.create_xor_masker(b"abcd", autobahn_tuning.SMALL_FRAME + 1)
        self.assertNotIsInstance(masker, autobahn_tuning.SmallXorMasker)
        self.assertIsInstance(autobahn_tuning.create_xor_masker(b"abcd", 10), autobahn_tuning.SmallXorMasker)

    def test_lazyPformat(self):
        self.assertEqual(f"{autobahn_tuning.LazyPformat([1, 2])}", "[1, 2]")
