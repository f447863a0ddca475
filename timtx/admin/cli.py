# -*- test-case-name: timtx.test.test_admin_cli -*-
"""
C{python -m timtx admin ...}: the operator's command line.

C{create-admin} writes the admins file of a node's data directory itself
(C{--config node.ini}), so that the first account can be made before the
node ever starts and without any setup page.  Every other command calls the
node's admin API (C{[admin] listen}) over HTTP, logging in with
C{--user}/C{TIMTX_ADMIN_USER} and a password (asked for, or
C{TIMTX_ADMIN_PASSWORD}), or with a token (C{TIMTX_ADMIN_TOKEN}, printed by
C{login}).

Passwords are never taken as arguments (they would show in C{ps} and in
shell history).  A node that is not running, or an address that does not
answer, gives one line saying so and exit status 3.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_URL = "http://127.0.0.1:5122"


class CommandError(Exception):
    """
    The command failed; the message is for the operator, the status for
    the shell.
    """

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _splitEndpoint(description: str) -> list[str]:
    """
    An endpoint string's fields: split at colons, except escaped ones
    (C{interface=\\:\\:1}).
    """
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def urlFromListen(listen: str) -> str | None:
    """
    The URL of an admin listener given as an endpoint string, or C{None}
    if it cannot be told (a UNIX socket, say).
    """
    parts = _splitEndpoint(listen)
    kind = parts[0]
    if kind not in ("tcp", "tcp6", "ssl") or len(parts) < 2 or not parts[1].isdigit():
        return None
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    host = options.get("interface", "127.0.0.1")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{parts[1]}"


def _loadConfig(path: str | None) -> Any:
    if path is None:
        return None
    from timtx.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def _password(prompt: str, confirm: bool = False) -> str:
    value = os.environ.get("TIMTX_ADMIN_PASSWORD")
    if value:
        return value
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise CommandError("no password: set TIMTX_ADMIN_PASSWORD or give it on standard input", EXIT_USAGE)
        return line.rstrip("\r\n")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise CommandError("the passwords differ", EXIT_USAGE)
    return value


class Client:
    """
    Calls the admin API, logging in once when it first needs to.
    """

    def __init__(self, url: str, user: str | None, token: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.user = user
        self.token = token
        self.timeout = timeout

    def login(self) -> dict[str, Any]:
        if not self.user:
            self.call("GET", "/api/health", auth=False)
            raise CommandError("log in with --user NAME (or TIMTX_ADMIN_USER), or set TIMTX_ADMIN_TOKEN", EXIT_USAGE)
        # Say the node is down before asking for a password, not after.
        self.call("GET", "/api/health", auth=False)
        answer: dict[str, Any] = self.call(
            "POST", "/api/login", {"name": self.user, "password": _password("Password: ")}, auth=False
        )
        self.token = answer["token"]
        return answer

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        if auth and self.token is None:
            self.login()
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise CommandError(_httpError(e), 2 if e.code in (401, 403) else 1) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise CommandError(
                f"cannot reach the admin API at {self.url} ({reason}): is the node running, and is [admin] listen "
                "set to this address?",
                EXIT_UNREACHABLE,
            ) from None
        except (OSError, TimeoutError) as e:
            raise CommandError(f"cannot reach the admin API at {self.url} ({e})", EXIT_UNREACHABLE) from None


def _httpError(error: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(error.read())["error"]["message"]
    except Exception:
        message = error.reason
    if error.code == 401:
        return f"not logged in: {message}"
    if error.code == 403:
        return f"forbidden: {message}"
    return f"{error.code}: {message}"


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = [head] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _when(value: float | None) -> str:
    return "-" if value is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _printSessions(sessions: list[dict[str, Any]]) -> None:
    rows = [
        [s["uid"], s["termtyp"], s["transport"], s["address"], _when(s["since"]), s["unacknowledged"]] for s in sessions
    ]
    print(_table(rows, ["USER", "TERMTYP", "TRANSPORT", "ADDRESS", "SINCE", "UNACKED"]))


def createAdmin(args: argparse.Namespace) -> int:
    from timtx.admin.accounts import Admin, AdminAccountError, AdminFile, checkName, checkPassword, checkRole
    from timtx.crypto.passwords import PasswordHasher

    config = _loadConfig(args.config)
    if config is None:
        raise CommandError("create-admin needs --config node.ini: it writes the node's admins file", EXIT_USAGE)
    try:
        name, role = checkName(args.name), checkRole(args.role)
        password = checkPassword(_password(f"Password for {name}: ", confirm=True))
    except AdminAccountError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    accounts = config.accounts
    hasher = PasswordHasher(accounts.scrypt_n, accounts.scrypt_r, accounts.scrypt_p)
    admins = AdminFile(config.data_path(config.admin.admins_file))
    account = Admin(name, role, hasher.hash(password), time.time())
    try:
        if args.replace:
            admins.replace(account)
        else:
            admins.add(account)
    except AdminAccountError as e:
        raise CommandError(f"{e} (use --replace to set a new password)", 1) from None
    except OSError as e:
        raise CommandError(f"cannot write {admins.path}: {e.strerror}", 1) from None
    print(f"admin {name} ({role}) written to {admins.path}")
    return 0


def _api(args: argparse.Namespace) -> Client:
    config = _loadConfig(args.config)
    url = args.url
    if url is None and config is not None:
        url = urlFromListen(config.admin.listen)
        if url is None:
            raise CommandError("cannot tell the admin API's URL from [admin] listen: give --url", EXIT_USAGE)
    return Client(
        url or DEFAULT_URL, args.user or os.environ.get("TIMTX_ADMIN_USER"), os.environ.get("TIMTX_ADMIN_TOKEN")
    )


def _show(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def runCommand(args: argparse.Namespace) -> int:
    client = _api(args)
    command = args.command
    if command == "login":
        answer = client.login()
        print(answer["token"])
        print(f"# valid until {_when(answer['expires'])}; export TIMTX_ADMIN_TOKEN=<token> to use it", file=sys.stderr)
        return 0
    if command == "sessions":
        if args.uid:
            _printSessions(client.call("GET", f"/api/users/{_quote(args.uid)}/sessions")["sessions"])
        else:
            page = client.call("GET", f"/api/sessions?offset={args.offset}&limit={args.limit}")
            _printSessions(page["sessions"])
            print(f"({len(page['sessions'])} of {page['total']} sessions)")
        return 0
    if command == "cluster":
        cluster = client.call("GET", "/api/cluster")
        rows = [
            [m["id"] + (" *" if m["self"] else ""), m["state"], m["address"], m["incarnation"]]
            for m in cluster["members"]
        ]
        print(_table(rows, ["NODE", "STATE", "ADDRESS", "INCARNATION"]))
        print(f"({cluster['live']} of {cluster['size']} live{'' if cluster['clustered'] else '; no cluster'})")
        return 0
    if command == "blocks":
        blocks = client.call("GET", "/api/blocks")["blocks"]
        print(_table([[b["uid"], _when(b["until"])] for b in blocks], ["USER", "UNTIL"]))
        return 0
    simple: dict[str, Callable[[], Any]] = {
        "node": lambda: client.call("GET", "/api/node"),
        "store": lambda: client.call("GET", "/api/store"),
        "keys": lambda: client.call("GET", "/api/keys"),
        "vrooms": lambda: client.call("GET", "/api/vrooms"),
        "admins": lambda: client.call("GET", "/api/admins"),
        "user": lambda: client.call("GET", f"/api/users/{_quote(args.uid)}"),
        "kick": lambda: client.call("POST", f"/api/users/{_quote(args.uid)}/kick"),
        "block": lambda: client.call("POST", f"/api/users/{_quote(args.uid)}/block", {"seconds": args.seconds}),
        "unblock": lambda: client.call("DELETE", f"/api/users/{_quote(args.uid)}/block"),
        "message": lambda: client.call("POST", f"/api/users/{_quote(args.uid)}/messages", {"text": args.text}),
        "broadcast": lambda: client.call(
            "POST", "/api/broadcast", {"text": args.text, **({"users": args.to} if args.to else {})}
        ),
        "delete-admin": lambda: client.call("DELETE", f"/api/admins/{_quote(args.name)}"),
    }
    _show(simple[command]())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m timtx admin",
        description="Operate a running timtx node through its admin API (docs/admin.md).",
    )
    p.add_argument("--config", "-c", metavar="NODE.INI", help="the node's config: where its admin API listens")
    p.add_argument("--url", help=f"the admin API (default: from --config, else {DEFAULT_URL})")
    p.add_argument("--user", "-u", help="admin name (or TIMTX_ADMIN_USER); the password is asked for")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = commands.add_parser("create-admin", help="create an admin account in the node's admins file (needs --config)")
    c.add_argument("name")
    c.add_argument("--role", default="admin", choices=["admin", "observer"], help="observers only read")
    c.add_argument("--replace", action="store_true", help="replace an existing account (a new password or role)")
    commands.add_parser("login", help="log in and print a token for TIMTX_ADMIN_TOKEN")
    commands.add_parser("node", help="this node: id, version, uptime, listeners")
    commands.add_parser("cluster", help="cluster members and their health")
    commands.add_parser("store", help="store status: backend, reachable, latency, shards and expansion")
    commands.add_parser("keys", help="stanza keys and rotation progress")
    commands.add_parser("vrooms", help="virtual rooms and their statistics")
    commands.add_parser("admins", help="admin accounts")
    c = commands.add_parser("delete-admin", help="remove an admin account")
    c.add_argument("name")
    c = commands.add_parser("sessions", help="sessions on the node, or of one user")
    c.add_argument("uid", nargs="?")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--limit", type=int, default=100)
    c = commands.add_parser("user", help="an account: sessions, block, groups")
    c.add_argument("uid")
    c = commands.add_parser("kick", help="log out every session of a user")
    c.add_argument("uid")
    c = commands.add_parser("block", help="block a user from logging in for SECONDS, and log it out")
    c.add_argument("uid")
    c.add_argument("seconds", type=float)
    c = commands.add_parser("unblock", help="lift a block")
    c.add_argument("uid")
    commands.add_parser("blocks", help="blocked users")
    c = commands.add_parser("message", help="send a user a system message")
    c.add_argument("uid")
    c.add_argument("text")
    c = commands.add_parser("broadcast", help="a system message to everyone online on the node, or to --to users")
    c.add_argument("text")
    c.add_argument("--to", nargs="+", metavar="UID")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "create-admin":
            return createAdmin(args)
        return runCommand(args)
    except CommandError as e:
        print(f"timtx admin: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
