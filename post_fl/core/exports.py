"""The public names of a subpackage, listed in its ``__init__`` and imported on first use.

Each subpackage's ``__init__`` lists what it offers (``from post_fl.federated import FederatedServer``)
without importing its modules up front: ``post-fl --help`` and ``post-fl show-config`` need only the
config, not torch or transformers, and listing a name must not make importing one module import the
whole package.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, table: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: each name in ``table[module]`` is read from
    ``package.module`` the first time it is asked for."""
    owner = {name: module for module, names in table.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{owner[name]}"), name)
        setattr(import_module(package), name, value)
        return value

    return __getattr__, sorted(owner)
