"""
Storage plugins behind L{IMessageStore}.

Plugins are found by the name in C{[store] backend}: the built-in ones here,
others through L{twisted.plugin.getPlugins} of L{IStoreFactory}.
"""

from __future__ import annotations

from typing import Any

from timtx.persistence.interfaces import IMessageStore, IStoreFactory
from timtx.persistence.memory import MemoryStoreFactory
from timtx.persistence.sqlite import SQLiteStoreFactory

BUILTIN_STORES: dict[str, Any] = {factory.name: factory for factory in (MemoryStoreFactory(), SQLiteStoreFactory())}


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


__all__ = ["IMessageStore", "IStoreFactory", "storeFactories", "storeFactory"]
