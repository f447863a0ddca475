"""
The client side of C{python -m bench.natmesh --throughput}: a user on one
node sends 1:1 messages to a user on another, with a window of them in
flight, and prints one JSON line: how many, how long from the first send to
the last one received, whether all arrived.

    python -m bench.natmeshclient --sender ws://A/tim --recipient ws://B/tim --messages N --window W
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

from timtx.client import connect, register
from timtx.protocols.codec import Encoding
from timtx.protocols.constants import Business, TimType


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    alice, bob = f"alice{os.getpid()}", f"bob{os.getpid()}"
    yield register(reactor, args.sender.replace("ws://", "http://").replace("/tim", "/tim2"), alice, "secret")
    yield register(reactor, args.recipient.replace("ws://", "http://").replace("/tim", "/tim2"), bob, "secret")
    sender = yield connect(reactor, args.sender, Encoding.COMPACT)
    yield sender.login(alice, "secret")
    recipient = yield connect(reactor, args.recipient, Encoding.COMPACT)
    yield recipient.login(bob, "secret")
    yield sender.business(Business.ADDROSTER, node=recipient.uid)
    yield recipient.business(Business.ADDROSTER, node=sender.uid)
    payload = "x" * args.size
    for _ in range(20):  # warm up: links, caches
        yield sender.postMessage(recipient.uid, payload)
    for _ in range(20):
        yield recipient.next(lambda i: i.timType == TimType.TIMMESSAGE, timeout=30)
    received = 0
    done: defer.Deferred[None] = defer.Deferred()

    @defer.inlineCallbacks
    def receive() -> Any:
        nonlocal received
        while received < args.messages:
            got = yield recipient.next(lambda i: i.timType in (TimType.TIMMESSAGE, TimType.TIMOFFLINEMSG), timeout=60)
            if got.timType == TimType.TIMOFFLINEMSG:
                received += len(got.body.messageList or ())
            else:
                received += 1
        done.callback(None)

    receiving = receive()
    receiving.addErrback(lambda f: done.called or done.errback(f))
    started = time.perf_counter()
    sent = 0

    @defer.inlineCallbacks
    def lane() -> Any:
        nonlocal sent
        while sent < args.messages:
            sent += 1
            yield sender.postMessage(recipient.uid, payload, timeout=60)

    yield defer.gatherResults([lane() for _ in range(args.window)])
    confirmed = time.perf_counter() - started
    yield done
    seconds = time.perf_counter() - started
    sys.stdout.write(
        json.dumps({"messages": args.messages, "received": received, "seconds": seconds, "confirmed_s": confirmed})
        + "\n"
    )
    sys.stdout.flush()
    yield sender.disconnect()
    yield recipient.disconnect()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.natmeshclient")
    parser.add_argument("--sender", required=True)
    parser.add_argument("--recipient", required=True)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--size", type=int, default=200)
    args = parser.parse_args(argv)
    task.react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main(sys.argv[1:])
