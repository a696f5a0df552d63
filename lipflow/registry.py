"""Name → object registries.

A model, constraint, optimizer, parametrization or evaluation is one function or class
registered under a name, so adding one touches one file (and the config schema's enum).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from lipflow.errors import UnknownNameError

T = TypeVar("T")


def import_package_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__name__`` and ``__path__``) but its ``__main__``, so
    each one's ``@REGISTRY.register`` runs: adding an entry is adding a file (and its schema enum name)."""
    for module in pkgutil.iter_modules(path):
        if module.name != "__main__":
            importlib.import_module(f"{package}.{module.name}")


class Registry(Generic[T]):
    """A dict of named entries with a decorator and a "did you mean" lookup."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
