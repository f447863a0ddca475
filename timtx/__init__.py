"""
timtx: a decentralized, distributed instant-messaging engine built on
Twisted, speaking tim 2.0's client protocol.
"""

from timtx._version import __version__

__all__ = ["__version__"]
