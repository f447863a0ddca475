# -*- test-case-name: timtx.test.test_config -*-
"""
The node's configuration: an INI file parsed once into frozen, typed
sections.

Every key is declared here with its type, default and meaning; the same
declarations validate files, build L{Config} objects for tests and write the
reference in C{docs/configuration.md} (C{python -m timtx.config}).  A file
with an unknown section or key, or a value of the wrong type, raises one
L{ConfigError} that names the file, section and key and says what was
expected, before anything listens.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor


class ConfigError(Exception):
    """
    The configuration cannot be used.

    @ivar path: the file, or C{None} for settings built in code.
    @ivar section: the section at fault, if any.
    @ivar key: the key at fault, if any.
    @ivar message: what was wrong and what was expected.
    """

    def __init__(self, message: str, path: str | None = None, section: str | None = None, key: str | None = None):
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or "configuration"
        if self.section:
            where += f": [{self.section}]"
            if self.key:
                where += f" {self.key}"
        return f"{where}: {self.message}"


# Value types.  Each parses one string and raises ValueError with a message
# that says what was expected.


@dataclass(frozen=True)
class Kind:
    expected: str
    parse: Callable[[str], Any]


def _int(low: int | None = None, high: int | None = None) -> Kind:
    if low is not None and high is not None:
        expected = f"an integer from {low} to {high}"
    elif low is not None:
        expected = f"an integer of at least {low}"
    else:
        expected = "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""), 10)
        except ValueError:
            raise ValueError(expected) from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(expected)
        return value

    return Kind(expected, parse)


def _seconds(low: float = 0.0) -> Kind:
    expected = f"a number of seconds of at least {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(expected) from None
        if value != value or value < low or value == float("inf"):
            raise ValueError(expected)
        return value

    return Kind(expected, parse)


def _rate() -> Kind:
    expected = "a number per second of at least 0 (0 disables the limit)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(expected) from None
        if value != value or value < 0 or value == float("inf"):
            raise ValueError(expected)
        return value

    return Kind(expected, parse)


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("true or false")


BOOL = Kind("true or false", _parse_bool)


def _parse_reachable(text: str) -> str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if _parse_bool(text) else "false"
    except ValueError:
        raise ValueError("true, false or auto") from None


REACHABLE = Kind("true, false or auto", _parse_reachable)
TEXT = Kind("text", lambda text: text)


def _choice(*choices: str) -> Kind:
    expected = "one of " + ", ".join(choices)

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(expected)
        return text

    return Kind(expected, parse)


def _parse_endpoint(text: str) -> str:
    if not text:
        return text
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        raise ValueError(f"a Twisted server endpoint string such as tcp:5120:interface=127.0.0.1 ({e})") from None
    kind, _, rest = text.partition(":")
    if kind in ("tcp", "tcp6", "ssl"):
        port = rest.split(":", 1)[0]
        if port.startswith("port="):
            port = port[5:]
        if not port.isdigit() or int(port) > 65535:
            raise ValueError("a port from 0 to 65535")
    return text


ENDPOINT = Kind("a Twisted server endpoint string, or empty to disable", _parse_endpoint)


def _parse_url(text: str) -> str:
    if not text:
        return text
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("an http:// or https:// URL, or empty")
    return text


URL = Kind("an http:// or https:// URL, or empty", _parse_url)


def _parse_words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


WORDS = Kind("a comma-separated list", _parse_words)


def _parse_thresholds(text: str) -> tuple[str, ...]:
    words = _parse_words(text)
    if words and (len(words) != 3 or not all(w.isdigit() for w in words)):
        raise ValueError("three non-negative integers, comma-separated, or empty")
    return words


THRESHOLDS = Kind("three integers, comma-separated, or empty", _parse_thresholds)


def splitHostPort(text: str) -> tuple[str, int]:
    """
    C{("host", port)} from C{host:port} or C{[v6 address]:port}.

    @raise ValueError: if C{text} is not of that form.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise ValueError("host:port, such as 10.0.0.2:7946 or [fd00::2]:7946")
    return host, int(port)


def _parse_hostport(text: str) -> str:
    if text:
        splitHostPort(text)
    return text


def _parse_hostports(text: str) -> tuple[str, ...]:
    words = _parse_words(text)
    for word in words:
        splitHostPort(word)
    return words


HOSTPORT = Kind("host:port, or empty", _parse_hostport)
HOSTPORTS = Kind("host:port, comma-separated", _parse_hostports)


def _parse_data_keys(text: str) -> tuple[tuple[int, str], ...]:
    keys = []
    for word in _parse_words(text):
        keyId, sep, path = word.partition(":")
        if not sep or not keyId.strip().isdigit() or not path.strip():
            raise ValueError("id:path pairs, comma-separated, such as 2:keys/data-2.key")
        keys.append((int(keyId), path.strip()))
    return tuple(keys)


DATA_KEYS = Kind("id:path pairs, comma-separated", _parse_data_keys)


def _parse_key_ids(text: str) -> tuple[int, ...]:
    words = _parse_words(text)
    if not all(w.isdigit() and 1 <= int(w) <= 65535 for w in words):
        raise ValueError("key ids from 1 to 65535, comma-separated")
    return tuple(int(w) for w in words)


KEY_IDS = Kind("key ids, comma-separated", _parse_key_ids)


def _parse_node_id(text: str) -> str:
    from timtx.protocols.peer import NODE_ID_PATTERN

    if text and not NODE_ID_PATTERN.match(text):
        raise ValueError("1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return text


NODE_ID = Kind("a node id (letters, digits, . _ -), or empty", _parse_node_id)


def option(default: Any, kind: Kind, doc: str) -> Any:
    """
    Declare one key: its default (as a parsed value), its L{Kind} and a line
    for the reference.
    """
    return field(default=default, metadata={"kind": kind, "doc": doc})


# The sections.


@dataclass(frozen=True)
class NodeConfig:
    data_dir: str = option(
        "timtx-data",
        TEXT,
        "Directory for the node's key and embedded database. Relative paths are taken from the config file's directory.",
    )
    key_file: str = option(
        "",
        TEXT,
        "File holding the node secret that keys account ids and token hashes; created (mode 0600) if missing. "
        "Empty means `node.key` in data_dir. Every node of one cluster needs the same secret.",
    )
    gc_thresholds: tuple[str, ...] = option(
        ("100000", "50", "1000"),
        THRESHOLDS,
        "Python garbage-collector thresholds set once the node has started under `twist` (three integers, "
        "comma-separated), after moving what startup allocated out of the collector's view (gc.freeze). "
        "Python's defaults (700, 10, 10) make a busy node pause often; empty leaves the collector alone.",
    )
    gc_full_interval: float = option(
        60.0,
        _seconds(0),
        "Seconds between two full garbage collections under `twist`. With the raised thresholds the collector "
        "rarely looks at its older generations by itself, so objects in reference cycles that lived through a "
        "young collection (a closed connection, its session) would stay for tens of minutes or for good; "
        "0 leaves it to the thresholds.",
    )
    worker_threads: int = option(
        2, _int(1, 64), "Threads for CPU-heavy work off the reactor thread, such as password hashing."
    )
    malloc_mmap_threshold: int = option(
        131072,
        _int(0, 1 << 30),
        "Under `twist`, on glibc: buffers of at least this many bytes are mapped and returned to the system "
        "when freed, so memory held by connections that closed is given back. 0 leaves glibc's dynamic "
        "threshold, which keeps such memory in the heap.",
    )
    processes: int = option(
        1,
        _int(0, 1024),
        "Node processes `twist tim` starts on this host. 1 runs the node in the `twist` process itself, as "
        "always; more starts a parent that binds the client and admin ports and that many child processes "
        'that share the client ports and form one cluster (docs/cluster.md, "Many processes per host"); '
        "0 means one per CPU core. Needs a shared store (postgresql, mariadb, sharded). "
        "`twist tim --processes N` overrides it.",
    )
    restart_delay: float = option(
        1.0,
        _seconds(0.05),
        "With processes above 1: seconds the parent waits before restarting a node process that died; the wait "
        "doubles with each death in a row, up to restart_delay_max.",
    )
    restart_delay_max: float = option(
        30.0,
        _seconds(0.05),
        "With processes above 1: the longest wait before restarting a node process. A process that ran this "
        "long before dying is restarted after restart_delay again.",
    )
    stop_timeout: float = option(
        30.0,
        _seconds(1),
        "With processes above 1: seconds the parent waits, once stopping, for its node processes to end after "
        "SIGTERM before it kills them (SIGKILL).",
    )


@dataclass(frozen=True)
class ClientConfig:
    listen: str = option(
        "tcp:5120:interface=127.0.0.1",
        ENDPOINT,
        "Where tim clients connect: WebSocket at `/tim` and HTTP POST at `/tim2`. "
        "Use an `ssl:` endpoint for TLS (wss:// and https://). Empty disables it.",
    )
    tcp_listen: str = option(
        "tcp:5121:interface=127.0.0.1",
        ENDPOINT,
        "Raw TCP clients: each frame prefixed by its 4-byte big-endian length. `ssl:` for TLS; empty disables it.",
    )
    allowed_origins: tuple[str, ...] = option(
        ("*",),
        WORDS,
        "WebSocket `Origin` values accepted, comma-separated; `*` accepts any non-empty origin (tim's rule).",
    )
    allow_missing_origin: bool = option(
        False, BOOL, "Accept WebSocket handshakes without an `Origin` header (tim refuses them)."
    )
    max_frame_bytes: int = option(
        1 << 20,
        _int(64, 1 << 30),
        "Largest frame accepted, in bytes. A larger WebSocket message is closed with 1009, "
        "a larger TCP frame with error 4114 and a close, a larger /tim2 body with HTTP 413.",
    )
    max_bad_frames: int = option(
        5, _int(1), "Malformed, unknown or refused frames a connection may send before it is closed."
    )
    auth_timeout: float = option(10.0, _seconds(0.1), "Seconds a connection has to log in before it is closed.")
    idle_timeout: float = option(
        600.0,
        _seconds(0),
        "Seconds an authenticated connection may stay silent before it is closed; tim clients ping every "
        "10 to 15 s. 0 disables the timeout.",
    )
    max_connections: int = option(
        50000, _int(0), "Client connections this node accepts at once; more are refused. 0 means no limit."
    )
    max_output_bytes: int = option(
        4 << 20,
        _int(1024),
        "Bytes that may wait to be written to one slow connection. Past it the connection is dropped; "
        "its undelivered messages wait in its inbox for the next login, so a slow reader never holds up others.",
    )
    max_queued_frames: int = option(
        64,
        _int(1),
        "Frames from one connection waiting to be handled; past this the node stops reading from that "
        "connection until it catches up.",
    )
    request_rate: float = option(
        200.0,
        _rate(),
        "Frames per second one connection may send on average (token bucket; pings included, acks not: "
        "an ack only releases work). Over it, a frame gets error 5105 carrying its message id where it has "
        "one. 0 disables the limit.",
    )
    request_burst: int = option(400, _int(1), "Frames one connection may send at once above request_rate.")
    max_login_attempts: int = option(3, _int(1), "Failed logins one connection may make before it is closed.")
    max_frame_bytes_before_login: int = option(
        8192,
        _int(64, 1 << 30),
        "Largest frame accepted before login, in bytes: what TIMAUTH and TIMPING need. An unauthenticated "
        "client cannot make the node buffer more.",
    )
    max_connections_per_ip: int = option(
        1000,
        _int(0),
        "Sockets one IP address may hold on the client ports at once, counted from accept (before any "
        "upgrade or login); more are closed at once. 0 means no limit. Behind a reverse proxy every client "
        "has the proxy's address: raise it or set 0 there.",
    )
    request_timeout: float = option(
        10.0,
        _seconds(0),
        "Seconds an HTTP connection on the client port has to send a whole request (head and body), "
        "however slowly it writes, and to send the next one on a kept-alive connection; then it is cut "
        "off. A WebSocket upgrade ends it (auth_timeout applies from there). 0 disables it.",
    )
    fd_reserve: int = option(
        64,
        _int(0),
        "File descriptors kept free for the store, logs and work under way: new client sockets are refused "
        "while fewer would be left, so that existing work never fails with EMFILE.",
    )
    listen_backlog: int = option(
        1024,
        _int(1, 65535),
        "Listen backlog of the client ports (TCP and SSL endpoint strings that do not set `backlog=`); "
        "Twisted's default of 50 drops connections in a burst. The kernel caps it at net.core.somaxconn.",
    )
    default_generation: str = option(
        "2.0",
        _choice("2.0", "2.1"),
        "The tim generation (`2.0` or `2.1`) of a session whose login does not tell: one that logs in with "
        "a name and password. It decides the Thrift layout of group profiles (TimRoomBean). A string token "
        "makes a session 2.1, a numeric one 2.0; see docs/protocol.md.",
    )


@dataclass(frozen=True)
class AccountsConfig:
    forbid_register: bool = option(False, BOOL, "Refuse registration on /tim2 with HTTP 403 (tim's forbidregister).")
    forbid_token: bool = option(False, BOOL, "Refuse token requests on /tim2 with HTTP 403 (tim's forbidtoken).")
    token_ttl: float = option(60.0, _seconds(1), "Seconds a one-time login token stays valid.")
    scrypt_n: int = option(16384, _int(2, 1 << 20), "scrypt CPU/memory cost for password hashes; a power of two.")
    scrypt_r: int = option(8, _int(1, 64), "scrypt block size.")
    scrypt_p: int = option(1, _int(1, 16), "scrypt parallelism.")
    name_max_length: int = option(64, _int(1, 1024), "Longest login name, in characters.")
    domain_max_length: int = option(64, _int(0, 1024), "Longest domain, in characters.")
    password_min_length: int = option(1, _int(1, 1024), "Shortest password accepted at registration or change.")
    password_max_length: int = option(256, _int(1, 4096), "Longest password accepted.")
    http_rate: float = option(
        20.0,
        _rate(),
        "Requests per second one IP address may make to /tim2 (register, token) on average; over it, "
        "HTTP 429 with error 5105. 0 disables the limit.",
    )
    http_burst: int = option(100, _int(1), "Requests one IP address may make to /tim2 at once above http_rate.")
    login_free_failures_per_ip: int = option(
        20,
        _int(1),
        "Failed logins (WebSocket, TCP or /tim2 token) one address may make within login_failure_window before "
        "it must wait before each further try: 1 s, then 2, 4, ... up to login_backoff_max. Waiting logins "
        "get error 5105 (HTTP 429 on /tim2) before any password is checked.",
    )
    login_free_failures_per_account: int = option(
        5,
        _int(1),
        "Failed logins one address may make at one account within login_failure_window before it backs off "
        "for that account; the account's owner from another address is not affected.",
    )
    login_spread_ips: int = option(
        10,
        _int(1),
        "Addresses that may fail at one account within login_failure_window before the account takes logins "
        "only from addresses that logged in to it before (a guess spread over many addresses).",
    )
    login_failure_window: float = option(
        900.0, _seconds(1), "Seconds after its last failure that a failure budget is forgotten."
    )
    login_backoff_max: float = option(900.0, _seconds(1), "The longest wait after failed logins, in seconds.")
    login_webhook: str = option(
        "",
        URL,
        "If set, every login is POSTed to this URL as the TimAuth JSON and allowed only if the response "
        "body starts with `1` (tim's connectauthurl). The JSON holds the password or token in clear: use "
        "https:// or a loopback address (a plain http:// URL elsewhere is warned about at start). At most "
        "64 bytes of the answer are read.",
    )
    login_webhook_timeout: float = option(
        5.0,
        _seconds(0.1),
        "Seconds to wait for the login webhook's whole answer, connection, headers and body; then the login is refused.",
    )


@dataclass(frozen=True)
class DevicesConfig:
    limit: int = option(4, _int(0), "Sessions one account may have at once (tim's device.limit). 0 means no limit.")
    type_limit: int = option(
        1,
        _int(0),
        "Sessions one account may have per terminal type, TimAuth.termtyp (tim's devicetype.limit). 0 means no limit.",
    )
    overflow: str = option(
        "kick-oldest",
        _choice("kick-oldest", "reject"),
        "What a login over a limit does: `kick-oldest` sends the oldest session concerned TIMLOGOUT and closes it; "
        "`reject` refuses the new login with error 4111, as tim 2.0 does.",
    )


@dataclass(frozen=True)
class MessagesConfig:
    noauth: bool = option(
        False, BOOL, "Let users message anyone, friends or not (tim's message.noauth). Blocks still apply."
    )
    recall_window: float = option(
        0.0,
        _seconds(0),
        "Seconds after sending during which a sender may recall a message; 0 means always (tim's rule).",
    )
    max_body_bytes: int = option(
        65536,
        _int(1, 1 << 30),
        "Largest message content: dataString and dataBinary together, plus extend and extra, in bytes. "
        "Larger messages get error 4114.",
    )
    dedupe_window: float = option(
        300.0,
        _seconds(0),
        "Seconds during which a resend with the same sender and client id is answered with the original "
        "message instead of being stored again. 0 turns deduplication off.",
    )
    dedupe_memory_keys: int = option(
        100_000,
        _int(1),
        "Most recent message ids (of all senders together) the node keeps in memory to recognise resends, "
        "about 360 bytes each. A resend of an id pushed out by newer ones before dedupe_window ends costs a "
        "trip to the store, which still refuses to store it again (at 1,000 messages a second the default "
        "keeps 100 seconds of ids in memory).",
    )
    history_limit: int = option(100, _int(1, 10000), "Most messages one TIMPULLMESSAGE returns, whatever it asks for.")
    offline_batch: int = option(
        50,
        _int(1, 1000),
        "Messages per TIMOFFLINEMSG list; each list waits for its ack before the next (tim sends 10).",
    )
    offline_push_after: float = option(
        3.0,
        _seconds(0),
        "Seconds after login the node waits for the client to ask for its offline messages (TIMOFFLINEMSG) "
        "before sending them unasked. New messages reach the session once its offline messages are out.",
    )
    max_unacked: int = option(
        1000,
        _int(1),
        "Pushes one session may leave unacknowledged; past it the node stops pushing to it and sends the rest "
        "as offline lists once it catches up.",
    )


@dataclass(frozen=True)
class PresenceConfig:
    open: bool = option(
        False, BOOL, "Let users send presence to anyone; by default only to friends (tim lets anyone reach anyone)."
    )
    offline_block: bool = option(
        False,
        BOOL,
        "Send no automatic offline presence when a user's last session ends (tim's presence.offline.block).",
    )
    max_targets: int = option(100, _int(1, 100000), "Most users one TIMPRESENCE may name in toList.")


@dataclass(frozen=True)
class RosterConfig:
    notify_block: bool = option(
        True, BOOL, "Tell a user who was blocked (bnType 7), as tim does. Turn off to block silently."
    )
    unblock_on_remove: bool = option(
        True,
        BOOL,
        "Removing a user from the roster (TIMBUSINESS rtype 6) also lifts the caller's block on that user, "
        "as tim 2.0 does: the only way a tim client can unblock. Turn off to keep blocks until rtype 101.",
    )


@dataclass(frozen=True)
class ProfilesConfig:
    read: str = option(
        "anyone",
        _choice("anyone", "friends"),
        "Who may read a user's profile (TIMNODES 4): `anyone` (tim's rule) or `friends`. Users always read their own.",
    )
    max_batch: int = option(100, _int(1, 10000), "Most users one TIMNODES 4 request may name.")
    max_field_chars: int = option(1024, _int(1, 1 << 20), "Longest text field of a profile, in characters.")
    max_profile_bytes: int = option(
        16384, _int(64, 1 << 24), "Largest encoded profile, in bytes; larger gets error 4114."
    )


@dataclass(frozen=True)
class GroupsConfig:
    member_cap: int = option(
        10000,
        _int(2),
        "Most members a group may have unless its founder sets a cap (timtx extension); joins past it get 4111.",
    )
    max_member_cap: int = option(100000, _int(2), "Highest cap a founder may set for a group.")
    max_created_per_user: int = option(500, _int(1), "Groups one user may found.")
    member_notices: bool = option(
        True,
        BOOL,
        "Tell members when someone joins or leaves (timtx extension: bnType 110 and 111 group notices, kept in "
        "the group's history).",
    )
    member_notices_max: int = option(
        500,
        _int(0),
        "Join and leave notices are sent only in groups of at most this many members: in a group of thousands "
        "they would be most of the traffic. 0 means no limit.",
    )
    manager_recall: bool = option(
        True, BOOL, "Let the founder and managers recall any member's group message (timtx extension)."
    )
    join_request_ack: bool = option(
        False,
        BOOL,
        'Acknowledge a request to join a private group to the requester with n2 = "pending" (timtx '
        'extension). Off by default, as tim 2.0: tim clients read any ok ack to a join as "joined".',
    )
    cursor_flush_interval: float = option(
        1.0,
        _seconds(0.01),
        "Seconds between writes of how far members have read their groups; after a crash a member may get at "
        "most this much again.",
    )
    cache_groups: int = option(10000, _int(1), "Groups held in memory with their member lists.")


@dataclass(frozen=True)
class VRoomsConfig:
    idle_expiry: float = option(
        600.0,
        _seconds(0),
        "Seconds a virtual room may go without a stream frame before it is removed (tim: 10 minutes). "
        "Rooms are checked every tenth of this, at least every second and at most every minute. 0 keeps rooms "
        "until their founder removes them.",
    )
    max_rooms_per_user: int = option(
        16, _int(0), "Virtual rooms one user may have founded at once; more get error 4111. 0 means no limit."
    )
    max_subscribers: int = option(
        10000, _int(0), "Subscribed sessions one room may have; more get error 4111. 0 means no limit."
    )
    max_publishers: int = option(
        64, _int(0), "Users a founder may grant push permission in one room; more get 4111. 0 means no limit."
    )
    max_subscriptions: int = option(64, _int(1), "Rooms one session may be subscribed to at once; more get error 4111.")
    stream_buffer_bytes: int = option(
        1 << 20,
        _int(0),
        "Stream bytes that may wait for one subscriber that reads slower than the stream arrives (beyond "
        "Twisted's 64 KiB write buffer), so bursts pass; past it that subscriber's frames are dropped and "
        "counted until it catches up. At most half of [client] max_output_bytes is used, so messages and acks "
        "always have room.",
    )
    node_stream_buffer_bytes: int = option(
        4 << 20,
        _int(0),
        "In a cluster: stream bytes that may wait for one other node that takes them slower than they come "
        "(beyond its link's write buffer); past it frames for that node are dropped and counted, and its "
        "subscribers see them as missed, so a slow or dead node holds up neither the publisher nor the other "
        "nodes. At most half of [cluster] max_peer_output_bytes is used, so other traffic always has room.",
    )
    max_publishing_sessions: int = option(
        256,
        _int(1),
        "In a cluster: publishing sessions per room whose last frame each node remembers, so that a frame of "
        "theirs that arrives after a later one (a push held up while the room's holder moved) is dropped, not "
        "delivered out of order; past it the session heard from longest ago is forgotten.",
    )
    max_stream_bytes: int = option(
        262144,
        _int(1, 1 << 30),
        "Largest TimStream body pushed with TIMSTREAM, in bytes; larger gets error 4114. Frames are also bounded "
        "by [client] max_frame_bytes.",
    )
    bigdata_max_bytes: int = option(
        16 << 20,
        _int(64, 256 << 20),
        "Largest big payload (TIMBIGSTRING, TIMBIGBINARY, TIMBIGBINARYSTREAM), header included, in bytes. "
        "Larger gets error 4114. A logged-in WebSocket client may send one message this large for it.",
    )
    bigdata_timeout: float = option(
        30.0,
        _seconds(0.1),
        "Seconds a big payload spread over several messages has to arrive whole; after it the connection "
        "gets error 4113 and is closed.",
    )


@dataclass(frozen=True)
class StoreConfig:
    backend: str = option(
        "sqlite",
        TEXT,
        "Storage plugin: `sqlite` (embedded, the default), `postgresql`, `mariadb` (servers a cluster can share, "
        "see docs/storage.md), `memory` (nothing survives a restart).",
    )
    path: str = option("tim.db", TEXT, "SQLite database file; relative paths are taken from data_dir.")
    synchronous: str = option(
        "full",
        _choice("full", "normal"),
        "SQLite durability: `full` syncs every commit (nothing acknowledged is lost on power failure); "
        "`normal` may lose the last commits on power failure but not on a crash of the process.",
    )
    batch_max: int = option(256, _int(1, 100000), "Most write operations committed in one transaction (group commit).")
    sqlite_process: bool = option(
        True,
        BOOL,
        "Run the `sqlite` store's database work in a child process of the node, so that it does not share "
        "the node's GIL (a third more 1:1 messages a second on two cores, see docs/benchmarks.md); "
        "`false` runs it in a thread of the node process. A child that dies is restarted.",
    )
    dsn: str = option(
        "",
        TEXT,
        "The database server of `postgresql` (`postgresql://user:password@host:port/database` or libpq's "
        "`host=... dbname=...`) or `mariadb` (`mariadb://user:password@host:port/database`). "
        "The database must exist; the node creates its tables.",
    )
    mariadb_driver: str = option(
        "auto",
        _choice("auto", "mysqlclient", "pymysql"),
        "Driver of `mariadb`: `auto` takes mysqlclient (C, less CPU per query; `pip install mysqlclient`, "
        "needs libmariadb-dev to build) when installed, else PyMySQL (pure Python, installed with timtx).",
    )
    pool_size: int = option(
        4,
        _int(1, 1000),
        "Connections `postgresql` and `mariadb` keep to the server: writes go through one of them in group "
        "commits, reads share the others.",
    )
    statement_timeout: float = option(
        10.0,
        _seconds(0.1),
        "Seconds a statement may run on `postgresql` or `mariadb`; a connection silent for longer than this "
        "plus connect_timeout is taken as lost.",
    )
    connect_timeout: float = option(
        5.0, _seconds(0.1), "Seconds to wait for a connection to `postgresql` or `mariadb` to open."
    )
    reconnect_initial: float = option(
        0.5,
        _seconds(0.01),
        "While the database server is unreachable, seconds before the first reconnection attempt; the wait "
        "doubles after each failure (with jitter) up to reconnect_max. With `sqlite` and sqlite_process, "
        "the same waits before starting a new child process after one ended.",
    )
    reconnect_max: float = option(10.0, _seconds(0.01), "Longest wait between two reconnection attempts.")
    shards: tuple[str, ...] = option(
        (),
        WORDS,
        "A store split over several databases of `postgresql` (docs/storage.md#sharding): their DSNs, "
        "comma-separated, the first being the directory that keeps the shard map. Read once, to make the map "
        "when the directory has none; later shards are added with `python -m timtx shards add`. Empty: one "
        "database, `dsn`.",
    )
    data_keys: tuple[tuple[int, str], ...] = option(
        (),
        DATA_KEYS,
        "Keys that seal data at rest besides key 1 (derived from the node secret): `id:path` pairs, "
        "comma-separated, ids 2 to 65535, each file 32 random bytes in hex (`python -m timtx keys new PATH`); "
        "relative paths are taken from data_dir. Every node of a cluster needs the same keys. See "
        "docs/storage.md#keys-at-rest.",
    )
    data_key: int = option(
        0,
        _int(0, 65535),
        "The key new data is sealed with: an id of data_keys, or 1; 0 takes the highest id configured.",
    )
    retired_keys: tuple[int, ...] = option(
        (),
        KEY_IDS,
        "Key ids this node no longer opens (retire one with `python -m timtx keys retire ID` once no data uses it).",
    )
    reseal_rate: float = option(
        500.0,
        _rate(),
        "While data is sealed with keys other than data_key, blobs per second this node re-encrypts in the "
        "background (0: none; run `python -m timtx keys reencrypt` instead, or let one node of a cluster do it).",
    )
    map_poll: float = option(
        1.0,
        _seconds(0.05),
        "Sharded store: seconds between two looks at the shard map, each also recording that this node is "
        "alive (ten times as often while a move is under way).",
    )
    map_lease: float = option(
        10.0,
        _seconds(0.5),
        "Sharded store: a node that could not confirm the shard map for this many seconds refuses store calls "
        "(slots may have moved); the mover waits this long for a node that stopped answering.",
    )
    repair_interval: float = option(
        5.0,
        _seconds(0.1),
        "Sharded store: seconds between two looks for writes spanning shards that a crash or an unreachable "
        "shard left half done, and how old one must be for any node to finish it.",
    )


def _seconds_within(low: float, high: float) -> Kind:
    expected = f"a number of seconds from {low:g} to {high:g}"
    base = _seconds(low)

    def parse(text: str) -> float:
        try:
            value = float(base.parse(text))
        except ValueError:
            raise ValueError(expected) from None
        if value > high:
            raise ValueError(expected)
        return value

    return Kind(expected, parse)


@dataclass(frozen=True)
class NatConfig:
    """
    NAT traversal (docs/nat.md): the STUN server reachable nodes run for
    their NAT'd peers, discovery, hole punching and the direct QUIC channel.
    """

    reachable: str = option(
        "true",
        REACHABLE,
        "Whether other nodes can dial this node's cluster address. `false` for a node behind a NAT (or a "
        "firewall that lets nothing in): it dials the reachable members itself and the others reach it through "
        "one of them, its relay (docs/nat.md). `auto`: it starts as `false` and asks the first reachable member "
        "it links with to dial it back; if that arrives, it is reachable from then on.",
    )
    relay: bool = option(
        True,
        BOOL,
        "Whether this node, when reachable, relays peer traffic between members that cannot dial each other. "
        "A relay forwards bytes it cannot read (each relayed link is authenticated end to end).",
    )
    relay_rate: int = option(
        1 << 20,
        _int(0),
        "Bytes per second one node may send through this relay on average (0: no limit); more wait in "
        "relay_max_queued_bytes.",
    )
    relay_burst: int = option(
        256 << 10, _int(64 << 10), "Bytes one node may send through this relay at once above relay_rate."
    )
    relay_max_queued_bytes: int = option(
        4 << 20,
        _int(0),
        "Bytes of one node's relayed traffic held while it is over relay_rate; past it the relayed link that "
        "overflows is closed (counted as limited).",
    )
    relay_max_circuits: int = option(
        64, _int(1), "Relayed links one node may have open through this relay at once; more are refused."
    )
    stun_port: int = option(
        0,
        _int(0, 65535),
        "UDP port of this reachable node's STUN server (3478 is STUN's), which answers cluster members only "
        "(requests keyed from the cluster secret); NAT'd members learn their NAT's behaviour from it, which they "
        "need for a direct path. 0 (the default) runs no server: no new port opens unasked, and a node behind NAT "
        "has no use for one.",
    )
    stun_alternate_port: int = option(
        3479,
        _int(0, 65535),
        "Second UDP port of the STUN server, from which it answers CHANGE-REQUEST and dial-back requests, so "
        "peers can tell how their NAT filters. 0 runs without it (peers learn less).",
    )
    stun_interface: str = option(
        "",
        TEXT,
        "Addresses the STUN server binds, comma-separated (one server on each, so that every answer comes from "
        "the address asked); empty: the host of [cluster] advertise. Each is advertised to the members as "
        "ADDRESS:stun_port; give two (a host with two addresses) so that NAT'd members can tell their NAT's "
        "mapping.",
    )
    stun_rate: float = option(
        20.0, _seconds(0), "STUN requests per second one source address may make on average; more are dropped."
    )
    stun_burst: int = option(40, _int(1), "STUN requests one source address may make at once above stun_rate.")
    stun_rto: float = option(
        0.5,
        _seconds_within(0.05, 10),
        "First STUN retransmission timeout, in seconds; it doubles on each retransmission (RFC 8489).",
    )
    stun_max_rto: float = option(3.0, _seconds_within(0.05, 60), "Cap on the doubled STUN retransmission timeout.")
    stun_retransmissions: int = option(
        7, _int(1, 16), "STUN requests sent per transaction (the first and its retransmissions) before giving up."
    )
    dialback_wait: float = option(
        1.0,
        _seconds_within(0.05, 30),
        "Seconds discovery waits for a peer's dial-back, the test of whether this node is reachable unasked.",
    )
    direct: bool = option(
        True,
        BOOL,
        "Whether a node that cannot be dialled tries for a direct path (punched UDP, QUIC) to the other NAT'd "
        "members it talks to through a relay; it stays relayed when either side's NAT maps endpoint-dependently.",
    )
    udp_port: int = option(
        0,
        _int(0, 65535),
        "Local UDP port of the socket used for discovery, punching and the direct channel; 0 lets the system pick.",
    )
    punch_ttl: int = option(
        2,
        _int(0, 64),
        "IP TTL of the pre-open packets sent before a punch: enough hops to leave this node's NAT, too few to "
        "reach the peer's. 0 skips the pre-open.",
    )
    punch_interval: float = option(
        0.05, _seconds_within(0.005, 5), "Seconds between punch probes while waiting for the peer's answer."
    )
    punch_timeout: float = option(
        5.0, _seconds_within(0.1, 60), "Seconds a punch attempt probes before it fails and the peer stays relayed."
    )
    punch_attempts: int = option(
        3, _int(1, 10), "Punch attempts per peer before the pair stays on the relay (libp2p DCUtR makes 3)."
    )
    keepalive: float = option(
        15.0,
        _seconds_within(0.1, 25),
        "Seconds between keepalives on a direct path; at most 25, under the UDP timeout of common NATs (30 s).",
    )
    consent_timeout: float = option(
        30.0,
        _seconds_within(0.5, 600),
        "Seconds a direct path may stay silent before it is declared lost and the peer moves back to the relay; "
        "longer than keepalive.",
    )

    def __post_init__(self) -> None:
        if self.consent_timeout <= self.keepalive:
            raise ConfigError("must be longer than keepalive", section="nat", key="consent_timeout")


@dataclass(frozen=True)
class ClusterConfig:
    listen: str = option(
        "",
        ENDPOINT,
        "Where other nodes of the cluster connect (the peer protocol), as a Twisted endpoint string such as "
        "`tcp:7946:interface=10.0.0.1`. Empty (the default) runs this node alone, with no cluster. Use a `tcp:` "
        "endpoint; for TLS set `tls_cert`, `tls_key` and `tls_ca`.",
    )
    advertise: str = option(
        "",
        HOSTPORT,
        "The `host:port` other nodes dial to reach this one. Empty means the listen endpoint's interface and "
        "port, which must then name a specific address.",
    )
    seeds: tuple[str, ...] = option(
        (),
        HOSTPORTS,
        "Nodes to join through, as `host:port`, comma-separated. Any one that answers is enough; this node's own "
        "address may be among them. Members known from an earlier run are tried too.",
    )
    secret: str = option(
        "",
        TEXT,
        "The cluster secret, at least 16 bytes, the same on every node: peers prove they know it (HMAC "
        "challenge-response) and every peer frame is authenticated with keys derived from it. Prefer "
        "`secret_file`.",
    )
    secret_file: str = option(
        "",
        TEXT,
        "File holding the cluster secret (surrounding whitespace ignored); relative paths are taken from the "
        "config file's directory.",
    )
    node_id: str = option(
        "",
        NODE_ID,
        "This node's id in the cluster. Empty means a random id made on first start and kept in `data_dir/node-id`.",
    )
    tls_cert: str = option(
        "",
        TEXT,
        "PEM certificate of this node for peer TLS, issued by the cluster CA. Empty: peer traffic is plaintext.",
    )
    tls_key: str = option("", TEXT, "PEM private key of `tls_cert`.")
    tls_ca: str = option(
        "",
        TEXT,
        "PEM certificate of the cluster CA. With TLS, each node accepts only peers whose certificate this CA "
        "issued, and checks the certificate of a node it dials against the host it dialled.",
    )
    probe_interval: float = option(
        0.3,
        _seconds(0.01),
        "Seconds between failure-detection probes (SWIM). Each node probes one member per interval, so its "
        "load does not grow with the cluster.",
    )
    probe_timeout: float = option(
        0.15,
        _seconds(0.001),
        "Seconds to wait for a probe's answer before asking other members to probe; must be shorter than "
        "`probe_interval`. Set it near the 99th percentile of the round trip between nodes.",
    )
    indirect_probes: int = option(
        3, _int(0, 16), "Members asked to probe a member that did not answer, before it is suspected."
    )
    suspicion_mult: int = option(
        3,
        _int(1, 100),
        "A suspected member is declared dead after `suspicion_mult * max(1, log10(members)) * probe_interval` "
        "seconds unless it refutes, once another member confirms the suspicion.",
    )
    suspicion_max_mult: int = option(
        3,
        _int(1, 100),
        "Before any confirmation, the suspicion timeout is this many times longer (Lifeguard), so a slow node "
        "does not get healthy ones declared dead.",
    )
    retransmit_mult: int = option(
        4,
        _int(1, 100),
        "Each membership change is piggybacked `retransmit_mult * ceil(log10(members + 1))` times.",
    )
    max_piggyback: int = option(32, _int(1, 256), "Most membership changes carried by one message.")
    gossip_interval: float = option(
        0.2, _seconds(0.01), "Seconds between gossip rounds, which run only while there are changes to spread."
    )
    gossip_nodes: int = option(3, _int(0, 64), "Members each gossip round sends changes to.")
    push_pull_interval: float = option(
        30.0,
        _seconds(1),
        "Seconds between full-state syncs with a random member (longer in clusters of over 32 members).",
    )
    reconnect_interval: float = option(
        5.0,
        _seconds(0.1),
        "Seconds between syncs with a random dead member, which merges the views once a partition heals.",
    )
    dead_member_ttl: float = option(
        3600.0, _seconds(1), "Seconds a dead or departed member stays listed (and tried for reconnection)."
    )
    leave_on_stop: bool = option(
        True,
        BOOL,
        "Tell the cluster when the node stops, so others move its work at once instead of detecting a failure.",
    )
    max_peer_frame_bytes: int = option(
        32 << 20,
        _int(4096, 1 << 30),
        "Largest peer frame accepted, in bytes; a larger one closes the link. It must exceed the largest client "
        "payload routed between nodes ([vrooms] bigdata_max_bytes).",
    )
    max_peer_output_bytes: int = option(
        64 << 20,
        _int(65536),
        "Bytes that may wait to be written to one peer (a slow node, or one being dialled); past it the link is "
        "dropped, so one slow node cannot exhaust another's memory.",
    )
    handshake_timeout: float = option(
        5.0, _seconds(0.1), "Seconds a new peer link has to complete the handshake before it is closed."
    )
    link_timeout: float = option(
        10.0,
        _seconds(0.1),
        "Seconds a peer link may go without receiving anything while this node has sent on it; then it is "
        "pinged, and closed if it stays silent as long again.",
    )
    request_timeout: float = option(
        10.0, _seconds(0.01), "Seconds a request to another node waits for its answer by default."
    )
    max_inflight_requests: int = option(
        1000,
        _int(1),
        "Requests this node may have waiting on one peer, and requests one peer may have in progress here; past "
        "it new requests fail at once as busy.",
    )
    conversation_owner: bool = option(
        True,
        BOOL,
        "Store and route each 1:1 conversation on the node that owns it, so that every device of either party "
        "gets it in seq order even when both send at once from different nodes; a message then crosses two "
        "links when that node holds neither party. false: the sender's node stores and routes (always one "
        "link), and only what one node stores arrives in order.",
    )
    group_locates: int = option(
        256,
        _int(1),
        "Members of a group whose nodes a group's owner node looks up in the user directory at a time. Until "
        "every member's nodes are known, a group message goes to every live node instead of only to those "
        "holding members.",
    )


@dataclass(frozen=True)
class AdminConfig:
    listen: str = option(
        "tcp:5122:interface=127.0.0.1",
        ENDPOINT,
        "Where the admin side listens: the dashboard at `/`, the API under `/api/` (OpenAPI document at "
        "`/api/openapi.json`), tim's server API (`/timRegister`, ...) and `/metrics`. Keep it on loopback or a "
        "private network; use an `ssl:` endpoint elsewhere. Empty disables it.",
    )
    admins_file: str = option(
        "admins.json",
        TEXT,
        "File of admin accounts (names, roles, scrypt hashes), written by `python -m timtx admin create-admin`; "
        "relative to data_dir. There is no default account: until one is created nobody can log in.",
    )
    audit_log: str = option(
        "admin-audit.log",
        TEXT,
        "File every admin action is appended to as a JSON line (who, from where, what, on what, the outcome); "
        "relative to data_dir.",
    )
    token_ttl: float = option(
        3600.0, _seconds(60), "Seconds an admin login token stays valid; the dashboard logs in again after it."
    )
    max_tokens: int = option(
        1000, _int(1), "Admin login tokens held at once; past it the oldest is revoked to make room."
    )
    login_rate: float = option(
        1.0,
        _rate(),
        "Failed admin logins (on /api/login, and tim's username/password headers) one IP address may make per "
        "second on average; over it, HTTP 429. A login that succeeds does not count. 0 disables the limit.",
    )
    login_burst: int = option(10, _int(1), "Failed admin logins one IP address may make at once above login_rate.")
    metrics_auth: str = option(
        "remote",
        _choice("remote", "always", "never"),
        "Who must log in to read `/metrics`: `remote` (the default) lets loopback clients scrape without a "
        "token and asks others for one; `always` asks everyone; `never` asks no one.",
    )
    max_body_bytes: int = option(
        1 << 20, _int(1024, 1 << 30), "Largest admin request body, in bytes; larger gets HTTP 413."
    )
    request_timeout: float = option(
        10.0,
        _seconds(0),
        "Seconds an admin connection has to send a whole request; then it is cut off. 0 disables it.",
    )
    max_connections: int = option(
        100, _int(1), "Admin connections open at once; more are refused, so the admin side cannot starve clients."
    )
    max_targets: int = option(
        10000,
        _int(1),
        "Most users one system message may name; a broadcast to everyone online is sent in batches of this size.",
    )


@dataclass(frozen=True)
class Config:
    """
    A whole node configuration.  L{base_dir} is the directory relative paths
    are resolved against: the config file's, or the working directory.
    """

    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    messages: MessagesConfig = field(default_factory=MessagesConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    roster: RosterConfig = field(default_factory=RosterConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    vrooms: VRoomsConfig = field(default_factory=VRoomsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    protocols: Mapping[str, str] = field(default_factory=dict)
    base_dir: str = "."
    path: str | None = None

    def data_path(self, *parts: str) -> str:
        """
        A path under the node's data directory.
        """
        return os.path.join(self.resolve(self.node.data_dir), *parts)

    def resolve(self, path: str) -> str:
        """
        C{path} made absolute against L{base_dir}.
        """
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(path)))

    @property
    def key_path(self) -> str:
        return self.resolve(self.node.key_file) if self.node.key_file else self.data_path("node.key")

    @property
    def data_key_paths(self) -> dict[int, str]:
        """
        C{[store] data_keys} as key id to an absolute path (relative paths
        are taken from the data directory).
        """
        return {keyId: os.path.join(self.data_path(), os.path.expanduser(path)) for keyId, path in self.store.data_keys}

    @property
    def store_path(self) -> str:
        return os.path.join(self.resolve(self.node.data_dir), os.path.expanduser(self.store.path))


#: Sections with declared keys, by name.  C{[protocols]} is free-form: each
#: key names a protocol in the registry, each value a C{module:Class}.
SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "client": ClientConfig,
    "accounts": AccountsConfig,
    "devices": DevicesConfig,
    "messages": MessagesConfig,
    "presence": PresenceConfig,
    "roster": RosterConfig,
    "profiles": ProfilesConfig,
    "groups": GroupsConfig,
    "vrooms": VRoomsConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
    "nat": NatConfig,
    "admin": AdminConfig,
}
FREE_SECTIONS = ("protocols",)


def _build_section(cls: type, section: str, raw: Mapping[str, str], path: str | None) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        spec = fields.get(key)
        if spec is None:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known keys: {known})", path, section, key)
        kind: Kind = spec.metadata["kind"]
        try:
            values[key] = kind.parse(text.strip())
        except ValueError as e:
            raise ConfigError(f"expected {e}, got {text.strip()!r}", path, section, key) from None
    return cls(**values)


def resolveProtocolPath(path: str) -> type:
    """
    The class named by C{"package.module:Class"}.

    @raise ValueError: if C{path} has no colon or does not name a class.
    @raise ImportError: if the module cannot be imported.
    """
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError("expected package.module:Class")
    found = importlib.import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise ValueError(f"{path} is not a class")
    return found


def _check_protocols(raw: Mapping[str, str], path: str | None) -> dict[str, str]:

    for name, target in raw.items():
        try:
            resolveProtocolPath(target.strip())
        except Exception as e:
            raise ConfigError(
                f"expected module:Class of a Protocol, got {target.strip()!r} ({e})", path, "protocols", name
            ) from None
    return {name: target.strip() for name, target in raw.items()}


def from_sections(sections: Mapping[str, Mapping[str, str]], path: str | None = None, base_dir: str = ".") -> Config:
    """
    Build a L{Config} from section name -> key -> text.

    @raise ConfigError: for an unknown section or key, or a bad value.
    """
    built: dict[str, Any] = {}
    for section, raw in sections.items():
        if section in SECTIONS:
            built[section] = _build_section(SECTIONS[section], section, raw, path)
        elif section == "protocols":
            built[section] = _check_protocols(raw, path)
        else:
            known = ", ".join(sorted([*SECTIONS, *FREE_SECTIONS]))
            raise ConfigError(f"unknown section (known sections: {known})", path, section)
    return Config(**built, base_dir=base_dir, path=path)


def load(path: str) -> Config:
    """
    Read and check a C{node.ini}.

    @raise ConfigError: if the file cannot be read or parsed, or holds an
        unknown section or key or a bad value.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00no-default\x00")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"cannot read the file ({e.strerror})", path) from None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"not a valid INI file ({str(e).splitlines()[0]})", path) from None
    sections = {name: dict(parser.items(name)) for name in parser.sections()}
    return from_sections(sections, path=path, base_dir=os.path.dirname(os.path.abspath(path)))


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """
    A copy of C{config} with some keys changed, given as parsed values:
    C{replace(config, client={"max_frame_bytes": 1024})}.  For tests and
    embedding.
    """
    changes: dict[str, Any] = {}
    for name, values in sections.items():
        if name in FREE_SECTIONS:
            changes[name] = dict(values)
        else:
            changes[name] = dataclasses.replace(getattr(config, name), **values)
    return dataclasses.replace(config, **changes)


def reference_markdown() -> str:
    """
    The reference table of every section and key, as in
    C{docs/configuration.md}.
    """
    lines: list[str] = []
    for section, cls in SECTIONS.items():
        lines.append(f"### `[{section}]`")
        lines.append("")
        lines.append("| Key | Default | Type | Meaning |")
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default
            if isinstance(default, bool):
                shown = "true" if default else "false"
            elif isinstance(default, tuple):
                shown = ", ".join(default)
            else:
                shown = str(default)
            shown = f"`{shown}`" if shown else "(empty)"
            kind: Kind = f.metadata["kind"]
            lines.append(f"| `{f.name}` | {shown} | {kind.expected} | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


REFERENCE_MARKER = "<!-- generated reference: python -m timtx.config --write docs/configuration.md -->"


def write_reference(path: str) -> None:
    """
    Replace everything after L{REFERENCE_MARKER} in C{path} with the
    reference.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, marker, _ = text.partition(REFERENCE_MARKER)
    if not marker:
        raise SystemExit(f"{path} has no line {REFERENCE_MARKER}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + marker + "\n\n" + reference_markdown())


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:2] == ["--write"]:
        write_reference(sys.argv[2])
    else:
        print(reference_markdown())
