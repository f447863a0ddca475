"""
e) Codec: encode and decode time and size of tim structs, Thrift compact
(the C{thrift} C codec) against JSON, through L{timtx.protocols.codec}
exactly as the node calls it.  In-process: no node, no workers.

Each figure is the best of C{repeat} timings of a loop long enough to take
about C{seconds}, divided by its length.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

from bench.runner import Param, Result, Run, Scenario
from timtx.protocols import codec
from timtx.protocols.codec import Encoding
from timtx.protocols.structs import Tid, TimAck, TimAuth, TimMessage, TimMessageList, TimStream, TimStruct

UID = "7Hx3kQ2mVfZr9sLpT4wYcB"  # an account id's length: base58 of 16 bytes


def samples() -> list[tuple[str, TimStruct]]:
    """
    What a node encodes and decodes most: a 1:1 message as pushed, a login
    reply, an offline list, a login, a stream frame.
    """
    message = TimMessage(
        msType=2,
        odType=1,
        id=4_503_599_627_370_495,
        mid=1_234_567_890_123_456,
        seq=42,
        fromTid=Tid(node=UID, resource="web", termtyp=1),
        toTid=Tid(node=UID[::-1]),
        dataString="Hello! " * 14 + "ok",
        timestamp=1_767_225_600_000_000_000,
    )
    return [
        ("TimMessage, 100-char text, as pushed", message),
        ("TimAck, login reply", TimAck(ok=True, timType=16, n=UID)),
        ("TimAuth, token login", TimAuth(token=4_503_599_627_370_495, resource="web", termtyp=1)),
        ("TimMessageList, 50 messages (offline batch)", TimMessageList(id=7, messageList=[message] * 50)),
        (
            "TimStream, 1 KiB body, as pushed",
            TimStream(id=99, VNode=UID, fromNode=UID, dtype=1, body=bytes(range(256)) * 4),
        ),
    ]


def timePerCall(f: Callable[[], Any], seconds: float, repeat: int) -> float:
    """
    Seconds per call of C{f}: the best of C{repeat} loops of about
    C{seconds} each.
    """
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            f()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or n >= 1 << 24:
            break
        n *= 4
    n = max(1, int(n * seconds / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - start) / n)
    return best


class Codec(Scenario):
    name = "codec"
    letter = "e"
    title = "Codec: Thrift compact vs JSON"
    role = ""
    params = (
        Param("seconds", float, 0.5, 0.02, "seconds per timing loop"),
        Param("repeat", int, 5, 2, "timing loops per figure (best taken)"),
    )

    async def drive(self, run: Run) -> Result:
        p = run.params
        result = Result()
        rows = []
        for label, struct in samples():
            cls = type(struct)
            entry: dict[str, Any] = {}
            for encoding in (Encoding.COMPACT, Encoding.JSON):
                data = codec.encode(struct, encoding)
                if codec.decode(cls, data, encoding) != struct:
                    raise AssertionError(f"{label} does not survive {encoding.value}")
                encodeUs = 1e6 * timePerCall(partial(codec.encode, struct, encoding), p["seconds"], p["repeat"])
                decodeUs = 1e6 * timePerCall(partial(codec.decode, cls, data, encoding), p["seconds"], p["repeat"])
                entry[encoding.value] = {
                    "bytes": len(data),
                    "encode_us": round(encodeUs, 2),
                    "decode_us": round(decodeUs, 2),
                }
            result.metrics[label] = entry
            c, j = entry["compact"], entry["json"]
            rows.append(
                (
                    label,
                    f"{c['bytes']}",
                    f"{c['encode_us']} / {c['decode_us']}",
                    f"{j['bytes']}",
                    f"{j['encode_us']} / {j['decode_us']}",
                )
            )
        result.metrics["thrift_c_codec"] = codec.ACCELERATED
        result.header = (
            "Struct",
            "compact bytes",
            "compact encode / decode µs",
            "JSON bytes",
            "JSON encode / decode µs",
        )
        result.rows = rows
        return result
