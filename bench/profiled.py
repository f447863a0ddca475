"""
C{python -m bench.profiled <session file> <twist arguments>}: run C{twist}
under pyinstrument and save the profile session when the node stops.

C{pyinstrument -m twisted ...} writes nothing for a node stopped by
SIGTERM: C{twist} ends by re-raising the signal against itself, so no exit
handler runs.  This wrapper saves the session just before that.
pyinstrument samples the main thread, the reactor's; the SQLite thread is
not in the profile.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from pyinstrument import Profiler
    from twisted.application.twist import _twist

    path = argv[1]
    profiler = Profiler(interval=0.001)
    saved: list[bool] = []

    def save() -> None:
        if not saved:
            saved.append(True)
            profiler.stop().save(path)

    original = _twist._exitWithSignal

    def exitWithSignal(sig: int) -> None:
        save()
        original(sig)

    _twist._exitWithSignal = exitWithSignal  # type: ignore[assignment]
    profiler.start()
    try:
        _twist.Twist.main(["twist", *argv[2:]])
    finally:
        save()


if __name__ == "__main__":
    main(sys.argv)
