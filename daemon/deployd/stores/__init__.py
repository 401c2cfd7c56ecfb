"""Lease stores, chosen by name and imported only when selected.

``google-cloud-firestore`` is imported only when the config selects the
Firestore store, so an SQLite daemon starts without loading it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from deployd.errors import ConfigError

if TYPE_CHECKING:
    from deployd.config import Config
    from deployd.stores.base import LeaseStore

_STORES = {
    "sqlite": ("deployd.stores.sqlite", "SQLiteStore", None),
    "firestore": ("deployd.stores.firestore", "FirestoreStore", "google-cloud-firestore"),
}


def create_store(config: Config) -> LeaseStore:
    """Import the store module that ``config.store.kind`` names and build the store."""
    kind = config.store.kind
    if kind not in _STORES:
        raise ConfigError("store.kind", kind, f"use one of {', '.join(sorted(_STORES))}")
    module_name, class_name, package = _STORES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if package is None:
            raise
        raise ConfigError(
            "store.kind",
            kind,
            f"the {package} package is not installed ({exc}); install it with "
            f"'pip install {package}' in deployd's environment",
        ) from exc
    store_class = getattr(module, class_name)
    store: LeaseStore = store_class.from_config(config)
    return store
