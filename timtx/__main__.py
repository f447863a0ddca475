"""
C{python -m timtx --version}, C{python -m timtx admin ...} (see
L{timtx.admin.cli}), C{python -m timtx cluster members} (the same as
C{python -m timtx.cluster members}), the operator commands C{shards ...} and C{keys ...}
(L{timtx.commands}); nodes are started with C{twist tim --config node.ini}.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from timtx import __version__
    from timtx.protocols import codec

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:
        from timtx.admin.cli import main as admin

        return admin(argv[1:])
    if argv[:1] == ["cluster"]:
        from timtx.cluster.__main__ import main as cluster

        return cluster(argv[1:])

    parser = argparse.ArgumentParser(
        prog="python -m timtx",
        description="timtx instant-messaging engine. Start a node with: twist tim --config node.ini. "
        "Operate one with: python -m timtx admin --help; see its cluster view with: "
        "python -m timtx cluster members --config node.ini.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--check-config", metavar="PATH", help="validate a node.ini and exit")
    from timtx.commands import addKeysParser, addShardsParser, keys, shards

    sub = parser.add_subparsers(dest="command")
    addShardsParser(sub)
    addKeysParser(sub)
    args = parser.parse_args(argv)
    if args.command == "shards":
        return shards(args)
    if args.command == "keys":
        return keys(args)
    if args.version:
        accelerated = "C codec" if codec.ACCELERATED else "pure-Python codec (slow)"
        print(f"timtx {__version__} ({accelerated})")
        return 0
    if args.check_config:
        from timtx.config import ConfigError
        from timtx.preflight import CONFIG_ERROR_STATUS, checkedConfig

        try:
            checkedConfig(args.check_config)
        except ConfigError as e:
            print(f"timtx: {e}", file=sys.stderr)
            return CONFIG_ERROR_STATUS
        print(f"{args.check_config}: ok")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
