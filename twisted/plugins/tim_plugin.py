"""
The C{tim} plugin for C{twist}: C{twist tim --config node.ini}.
"""

from twisted.application.service import ServiceMaker

timtx = ServiceMaker(
    "timtx",
    "timtx.tap",
    "A timtx instant-messaging node (tim 2.0 compatible).",
    "tim",
)
