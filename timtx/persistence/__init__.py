"""
Storage plugins behind L{IMessageStore}.

Plugins are found by the name in C{[store] backend}: the built-in ones here,
others through L{twisted.plugin.getPlugins} of L{IStoreFactory}.  The
server plugins are imported only when used, so that a node on SQLite needs
no database driver.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from zope.interface import implementer

from timtx.persistence.errors import (
    DuplicateConflict,
    SchemaTooNew,
    SequenceConflict,
    StoreOutcomeUnknown,
    StoreUnavailable,
)
from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.memory import MemoryStoreFactory
from timtx.persistence.sqlite import SQLiteStoreFactory


@implementer(IStoreFactory)
class LazyStoreFactory:
    """
    A built-in plugin whose module (and driver) is imported on first use.

    @param path: C{module:Class} of the real factory.
    """

    def __init__(self, name: str, description: str, path: str):
        self.name = name
        self.description = description
        self.path = path

    def load(self) -> Any:
        module, _, attribute = self.path.partition(":")
        return getattr(import_module(module), attribute)()

    def makeStore(self, config: Any, reactor: Any) -> Any:
        try:
            factory = self.load()
        except ImportError as e:
            # A broken install: say so when the node opens its store, as
            # any other reason it cannot start.
            return _Unloadable(self.name, f"the {self.name} store cannot be loaded: {e}")
        return factory.makeStore(config, reactor)


class _Unloadable:
    """
    Stands for a store whose module cannot be imported: opening it fails.
    """

    available = False

    def __init__(self, name: str, why: str):
        self.name = name
        self._why = why

    def open(self) -> Any:
        from twisted.internet.defer import fail

        return fail(StoreUnavailable(self._why))

    def close(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(None)


BUILTIN_STORES: dict[str, Any] = {
    factory.name: factory
    for factory in (
        MemoryStoreFactory(),
        SQLiteStoreFactory(),
        LazyStoreFactory(
            "postgresql",
            "A PostgreSQL server (txpostgres, connection pool, group commit); for clusters.",
            "timtx.persistence.postgresql:PostgreSQLStoreFactory",
        ),
        LazyStoreFactory(
            "mariadb",
            "A MariaDB server (connection pool in threads, group commit); for clusters.",
            "timtx.persistence.mariadb:MariaDBStoreFactory",
        ),
    )
}


def storeFactories() -> dict[str, Any]:
    """
    Every storage plugin by name: the built-in ones, then any other
    L{IStoreFactory} found in C{twisted/plugins/}.
    """
    from twisted.plugin import getPlugins

    found = dict(BUILTIN_STORES)
    for factory in getPlugins(IStoreFactory):
        found.setdefault(factory.name, factory)
    return found


def makeStore(config: Any, reactor: Any) -> Any:
    """
    The store C{config} describes, not yet opened: its C{[store] backend},
    over several databases if C{[store] shards} lists them
    (L{timtx.persistence.sharded.ShardedStore}).

    @raise KeyError: for an unknown backend.
    """
    store = config.store
    factory = storeFactory(store.backend)
    if not store.shards:
        return factory.makeStore(config, reactor)
    if store.backend not in ("postgresql", "memory"):
        return _Unloadable(
            store.backend,
            f"[store] shards needs backend = postgresql (a sharded {store.backend} store is not supported)",
        )
    from timtx.persistence.sharded import ShardedStore

    if store.backend == "memory":
        from timtx.persistence.memory import MemoryStore

        databases: dict[str, Any] = {}

        def openShard(dsn: str) -> Any:
            return databases.setdefault(dsn, MemoryStore())

    else:
        from timtx.persistence.postgresql import PostgreSQLStore
        from timtx.persistence.rows import poolOptions

        def openShard(dsn: str) -> Any:
            return PostgreSQLStore(reactor, dsn, **poolOptions(store))

    cluster = getattr(config, "cluster", None)
    return ShardedStore(
        openShard,
        list(store.shards),
        reactor,
        backend=store.backend,
        mapPoll=store.map_poll,
        mapLease=store.map_lease,
        repairInterval=store.repair_interval,
        holdTimeout=getattr(store, "statement_timeout", 10.0),
        nodeName=getattr(cluster, "node_id", "") or None,
    )


def storeFactory(name: str) -> Any:
    """
    @raise KeyError: with the known names, if none is called C{name}.
    """
    if name in BUILTIN_STORES:
        return BUILTIN_STORES[name]
    factories = storeFactories()
    if name not in factories:
        raise KeyError(f"no storage plugin {name!r} (known: {', '.join(sorted(factories))})")
    return factories[name]


__all__ = [
    "IMessageStore",
    "IStoreFactory",
    "SchemaTooNew",
    "SequenceConflict",
    "DuplicateConflict",
    "StoreOutcomeUnknown",
    "StoreUnavailable",
    "makeStore",
    "storeFactories",
    "storeFactory",
]
