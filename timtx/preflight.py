# -*- test-case-name: timtx.test.test_preflight -*-
"""
Checks of a configuration that need more than the config itself: that the
store plugin exists, that the data directory can be used, that an existing
SQLite file is one, that C{[cluster]} has what it needs and its secret and
TLS files can be read.  C{twist tim} and C{python -m timtx --check-config} run
them before anything listens, so that every problem a config can have is
one message naming the file, section and key, and one exit status.

Also the node's files on disk: the data directory is made private (0700)
and a warning names anything in it that others may read.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

from timtx.cluster.membership import checkClusterConfig, loadSecret, loadTLS
from timtx.config import Config, ConfigError, load
from timtx.persistence import storeFactory

#: The exit status of every configuration problem, in C{twist tim} and in
#: C{python -m timtx --check-config} (EX_USAGE, as twist uses for bad
#: options).
CONFIG_ERROR_STATUS = 64

#: What every SQLite database file starts with.
SQLITE_HEADER = b"SQLite format 3\x00"

log = Logger()


def checkedConfig(path: str) -> Config:
    """
    The config at C{path}, loaded and checked as far as can be without
    starting a node.

    @raise ConfigError: for any problem.
    """
    config = load(path)
    checkConfig(config)
    return config


def checkConfig(config: Config) -> None:
    """
    @raise ConfigError: naming the section and key at fault.
    """
    try:
        storeFactory(config.store.backend)
    except KeyError as e:
        raise ConfigError(str(e.args[0]), config.path, "store", "backend") from None
    _checkDataDir(config)
    if config.store.backend == "sqlite":
        _checkSQLiteFile(config)
    if config.cluster.listen:
        # The keys [cluster] needs together, its secret and TLS files: read
        # now, so that a node with a bad cluster setup does not start.
        checkClusterConfig(config)
        loadSecret(config)
        loadTLS(config)


#: Stores that live in one process: the embedded SQLite store hands out
#: inbox ids from a counter in memory (and the memory store is memory).
PROCESS_LOCAL_STORES = ("sqlite", "memory")

#: The endpoints whose sockets a parent can bind for its node processes.
SHAREABLE_ENDPOINTS = ("tcp", "tcp6", "ssl")


def checkProcesses(config: Config, count: int) -> None:
    """
    Check that C{count} node processes can run on this config (nothing to
    check for one): they need a store they all share, and listeners that a
    parent can bind and hand them.

    @raise ConfigError: naming the key at fault.
    """
    if count <= 1:
        return
    backend = config.store.backend
    if backend in PROCESS_LOCAL_STORES:
        raise ConfigError(
            f"{count} processes need a store they all share (postgresql, mariadb or sharded); "
            f"the {backend} store belongs to one process",
            config.path,
            "node",
            "processes",
        )
    listeners = (
        ("client", "listen", config.client.listen),
        ("client", "tcp_listen", config.client.tcp_listen),
        ("admin", "listen", config.admin.listen),
        ("cluster", "listen", config.cluster.listen),
    )
    for section, key, description in listeners:
        if description and description.split(":", 1)[0] not in SHAREABLE_ENDPOINTS:
            raise ConfigError(
                f"with {count} processes only tcp:, tcp6: and ssl: endpoints can be used", config.path, section, key
            )


def _checkDataDir(config: Config) -> None:
    directory = config.resolve(config.node.data_dir)
    existing = directory
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ConfigError(f"{existing} is not a directory", config.path, "node", "data_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == directory else f"cannot be created ({existing} is not writable)"
        raise ConfigError(f"{directory} {what}", config.path, "node", "data_dir")


def _checkSQLiteFile(config: Config) -> None:
    path = config.store_path
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a database file", config.path, "store", "path")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror})", config.path, "store", "path") from None
    if head and head != SQLITE_HEADER:
        raise ConfigError(f"{path} is not an SQLite database", config.path, "store", "path")


def privateDataDir(config: Config) -> str:
    """
    Make the data directory (mode 0700) if it is missing, and warn about
    anything in it that users other than the node's may read: the store
    holds password hashes and who talks to whom, sealed or not.

    @return: the directory.
    """
    directory = config.resolve(config.node.data_dir)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
    wide = []
    for path in [directory, *(os.path.join(directory, name) for name in sorted(os.listdir(directory)))]:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if stat.S_IMODE(mode) & 0o077:
            wide.append(f"{path} ({stat.S_IMODE(mode):04o})")
    if wide:
        log.warn(
            "readable or writable by other users: {paths}; make them private (chmod 700 on the directory, "
            "600 on files)",
            paths=", ".join(wide),
        )
    return directory
