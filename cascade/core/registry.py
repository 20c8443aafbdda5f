"""One registry per role: tasks, networks, methods, loggers.

Names are snake_case and identical to the values used in YAML configs. Registering a
name twice is an error; an unknown name raises with the list of known names; a dotted
path (``my_pkg.my_module.MyTask``) reaches a user's own class without registering it.

``cascade/`` imports no concrete task or method: those live in packages that declare the
``cascade.plugins`` entry point (``tasks`` and ``baselines`` in this repository) and are
imported the first time a registry is read.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from cascade.core.errors import CascadeError

T = TypeVar("T")

_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import every package registered under the ``cascade.plugins`` entry point, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group="cascade.plugins"):
        ep.load()


class Registry(Generic[T]):
    """A name -> object map for one role.

    Args:
        role: what the entries are ("task", "network", "method"), used in messages.
    """

    def __init__(self, role: str):
        self.role = role
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            ValueError: ``name`` is already registered.
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.role} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries or "." in name

    def get(self, name: str) -> T:
        """The entry called ``name``, or the object at dotted path ``name``.

        Raises:
            CascadeError: unknown name (the message lists the known ones and the nearest).
        """
        load_plugins()
        if name in self._entries:
            return self._entries[name]
        if "." in name:
            return _import_dotted(name, self.role)
        raise CascadeError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        known = self.names()
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown {self.role} {name!r}{hint}; known: {', '.join(known)}"


def _import_dotted(path: str, role: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise CascadeError(f"cannot import {role} {path!r}: {exc}") from None


TASKS: Registry = Registry("task")
NETWORKS: Registry = Registry("network")
METHODS: Registry = Registry("method")
#: where training's scalars go besides ``metrics.json`` (:class:`cascade.contracts.loggers.Logger`)
LOGGERS: Registry = Registry("logger")
