# -*- test-case-name: timtx.test.test_pgmove -*-
"""
Operator commands of C{python -m timtx}: C{shards status|add|move}.

They work on the databases directly (blocking, no reactor), while nodes
serve traffic; see docs/storage.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """
    Where a long command is: a bar redrawn in place on a terminal, a line
    per phase and every tenth elsewhere (a log, a pipe).
    """

    width = 30

    def __init__(self, out: TextIO, tty: bool | None = None):
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._phase = ""
        self._tenth = -1
        self._detail = ""
        self._drawn = 0.0

    def __call__(self, phase: str, done: int, total: int, detail: str) -> None:
        if phase != self._phase:
            if self._phase and self.tty:
                self.out.write("\n")
            self._phase = phase
            self._tenth = -1
        fraction = min(1.0, done / total) if total else 1.0
        if self.tty:
            now = time.monotonic()
            if fraction < 1.0 and now - self._drawn < 0.1:
                return
            self._drawn = now
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            counts = f"{done:,}/{total:,}" if total else ""
            self.out.write(f"\r{phase:<8} [{bar}] {fraction:4.0%} {counts} {detail}"[:200].ljust(100))
        else:
            tenth = int(fraction * 10)
            if tenth == self._tenth and (fraction < 1.0 or detail == self._detail):
                return
            self._tenth = tenth
            self._detail = detail
            self.out.write(f"{phase}: {fraction:.0%} ({done:,}/{total:,}) {detail}\n")
        self.out.flush()

    def end(self) -> None:
        if self._phase and self.tty:
            self.out.write("\n")
            self.out.flush()


def directoryOf(args: argparse.Namespace) -> tuple[str, float]:
    """
    The directory's DSN and the nodes' map lease, from C{--directory} or
    the node config given with C{--config}.
    """
    lease = 10.0
    if args.config:
        from timtx.config import load

        config = load(args.config)
        lease = config.store.map_lease
        if not args.directory:
            if config.store.backend != "postgresql" or not config.store.shards:
                raise SystemExit(f"{args.config}: [store] is not sharded PostgreSQL (set backend and shards)")
            return config.store.shards[0], lease
    if not args.directory:
        raise SystemExit("give the node config (--config node.ini) or the directory's DSN (--directory)")
    return args.directory, lease


def shards(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from timtx.persistence import pgmove
    from timtx.persistence.placement import parseSlots

    directory, lease = directoryOf(args)
    try:
        if args.action == "status":
            found = pgmove.status(directory)
            out.write(json.dumps(found, indent=2) + "\n" if args.json else formatStatus(found))
            return 0
        if args.action == "add":
            shard = pgmove.addShard(directory, args.dsn)
            out.write(
                f"shard {shard} added ({pgmove.describe(args.dsn)}); it owns no slots yet: "
                f"move some with `python -m timtx shards move --slots LO-HI --to {shard}`\n"
            )
            return 0
        bar = ProgressBar(out)
        mover = pgmove.Mover(
            directory, bar, batch=args.batch, lease=lease, waitTimeout=args.wait, verify=not args.no_verify
        )
        try:
            if args.abort:
                aborted = mover.abort()
                bar.end()
                out.write("no move to abandon\n" if aborted is None else f"move {aborted.id} abandoned\n")
                return 0
            if args.resume:
                resumed = mover.resume()
                moves = [] if resumed is None else [resumed]
            else:
                if not args.slots or args.to is None:
                    raise SystemExit("shards move needs --slots LO-HI and --to SHARD (or --resume, --abort)")
                lo, hi = parseSlots(args.slots)
                moves = mover.move(lo, hi, args.to)
            bar.end()
            for move in moves:
                out.write(f"move {move.id}: slots {move.slots}, shard {move.source} -> {move.target}: {move.detail}\n")
            if not moves:
                out.write("nothing to move\n")
            return 0
        finally:
            mover.close()
    except (pgmove.MoveError, ValueError) as e:
        out.flush()
        print(f"timtx shards: {e}", file=sys.stderr)
        return 1


def formatStatus(found: dict[str, Any]) -> str:
    lines = [f"shard map version {found['version']}" + (" (a move is under way)" if found["moving"] else "")]
    lines.append(f"{'shard':>5}  {'slots':>5}  {'ranges':<24} database")
    for shard in found["shards"]:
        lines.append(
            f"{shard['shard']:>5}  {shard['slots']:>5}  {', '.join(shard['ranges']) or '-':<24} {shard['database']}"
        )
    nodes = found["nodes"]
    lines.append(f"nodes: {len(nodes)}")
    for node in nodes:
        lines.append(f"  {node['node']}: map {node['version']}, seen {node['seen']}s ago")
    if found["moves"]:
        lines.append("moves:")
    for move in found["moves"][:5]:
        share = f" {move['copied'] / move['total']:.0%}" if move["total"] and move["phase"] == "copy" else ""
        lines.append(
            f"  #{move['id']} slots {move['slots']} shard {move['source']} -> {move['target']}: "
            f"{move['phase']}{share} {move['detail']}".rstrip()
        )
    return "\n".join(lines) + "\n"


def addShardsParser(sub: Any) -> None:
    p = sub.add_parser("shards", help="the shard map of a sharded PostgreSQL store: status, add, move")
    p.add_argument("action", choices=("status", "add", "move"))
    p.add_argument("dsn", nargs="?", help="add: the new shard's database (it must exist)")
    p.add_argument("--config", help="a node's INI file: its [store] shards name the directory")
    p.add_argument("--directory", help="the directory's DSN (the first of [store] shards)")
    p.add_argument("--slots", help="move: the slots, such as 2048-4095")
    p.add_argument("--to", type=int, help="move: the shard that takes them")
    p.add_argument("--resume", action="store_true", help="move: go on with the unfinished move")
    p.add_argument("--abort", action="store_true", help="move: abandon the unfinished move (before its switch)")
    p.add_argument("--batch", type=int, default=2000, help="move: rows per copy statement (default 2000)")
    p.add_argument("--wait", type=float, default=120.0, help="move: seconds to wait for nodes (default 120)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="move: do not compare the range on both shards while it is held (for ranges of millions of rows)",
    )
    p.add_argument("--json", action="store_true", help="status: as JSON")


def keys(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """
    C{python -m timtx keys new|status|reencrypt|retire}.
    """
    from timtx.crypto.vault import KeyringError, newKeyFile

    if args.action == "new":
        if not args.path:
            raise SystemExit("keys new needs the path of the file to write")
        try:
            newKeyFile(args.path)
        except OSError as e:
            print(f"timtx keys: cannot write {args.path}: {e}", file=sys.stderr)
            return 1
        out.write(f"{args.path}: a new key; add it to [store] data_keys as ID:{args.path} on every node\n")
        return 0
    if not args.config:
        raise SystemExit("give the node config: --config node.ini")
    from twisted.internet.task import react

    result: list[int] = []

    def main(reactor: Any) -> Any:
        d = _keysWithStore(reactor, args, out)
        d.addCallback(result.append)
        return d

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    except KeyringError as e:
        print(f"timtx keys: {e}", file=sys.stderr)
        return 1
    return result[0] if result else 1


def _keysWithStore(reactor: Any, args: argparse.Namespace, out: TextIO) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(_keysCommand(reactor, args, out))


async def _keysCommand(reactor: Any, args: argparse.Namespace, out: TextIO) -> int:
    from timtx.chat.reseal import Resealer
    from timtx.config import load
    from timtx.crypto.ids import NodeKeys
    from timtx.crypto.vault import KeyringError, StanzaVault, loadKeyring
    from timtx.persistence import makeStore
    from timtx.persistence.errors import SchemaTooNew, StoreUnavailable

    config = load(args.config)
    nodeKeys = NodeKeys.fromFile(config.key_path)
    try:
        ring = loadKeyring(nodeKeys, config.data_key_paths, config.store.data_key, config.store.retired_keys)
    except KeyringError as e:
        print(f"timtx keys: [store] data_keys: {e}", file=sys.stderr)
        return 1
    vault = StanzaVault(nodeKeys, ring)
    store = makeStore(config, reactor)
    try:
        await store.open()
    except (StoreUnavailable, SchemaTooNew) as e:
        print(f"timtx keys: {e}", file=sys.stderr)
        return 1
    try:
        bar = ProgressBar(out)
        resealer = Resealer(store=store, vault=vault, clock=reactor, rate=args.rate, progress=bar)
        counts = await resealer.count()
        if args.action == "status":
            out.write(f"new data is sealed with key {vault.writeKey}; this node has keys {vault.keyIds}\n")
            for keyId in sorted(counts):
                what = f"key {keyId}" if keyId else "not sealed (written by something else)"
                out.write(f"{what}: {counts[keyId]:,} blobs\n")
            if not counts:
                out.write("nothing is sealed yet\n")
            return 0
        if args.action == "reencrypt":
            done = await resealer.run()
            bar.end()
            out.write(f"{done:,} blobs re-encrypted with key {vault.writeKey}")
            out.write(
                f"; {resealer.unopened:,} did not open (not sealed, or sealed with a key this node lacks)\n"
                if resealer.unopened
                else "\n"
            )
            return 0 if not resealer.unopened else 1
        keyId = args.key if args.key is not None else (int(args.path) if (args.path or "").isdigit() else None)
        if keyId is None:
            raise SystemExit("keys retire needs the id of the key: keys retire 1 --config node.ini")
        if keyId == vault.writeKey:
            print(f"timtx keys: key {keyId} seals new data ([store] data_key); it cannot be retired", file=sys.stderr)
            return 1
        left = counts.get(keyId, 0)
        if left:
            print(
                f"timtx keys: {left:,} blobs are still sealed with key {keyId}: "
                "run `python -m timtx keys reencrypt` first",
                file=sys.stderr,
            )
            return 1
        out.write(
            f"no data is sealed with key {keyId} any more: add {keyId} to [store] retired_keys on every node"
            + (" and remove it from data_keys (then delete its file)" if keyId != 1 else "")
            + "\n"
        )
        return 0
    finally:
        await store.close()


def addKeysParser(sub: Any) -> None:
    p = sub.add_parser("keys", help="keys at rest: new, status, reencrypt, retire")
    p.add_argument("action", choices=("new", "status", "reencrypt", "retire"))
    p.add_argument("path", nargs="?", help="new: the key file to write; retire: the key id")
    p.add_argument("--config", help="the node's INI file (its store and keys)")
    p.add_argument("--key", type=int, help="retire: the key id")
    p.add_argument("--rate", type=float, default=0.0, help="reencrypt: most blobs per second (default: no limit)")
