"""CountingStore: a TCPStore client that counts its operations, for tests and benchmarks.

It wraps a real store client and forwards every call, counting calls and keys per kind of key
(``kind(key)``, e.g. ``"group"`` for a group build's keys) into counters shared by its clones.
It keeps the extended API (``multi_get``, ``multi_set``, ``append``, ``has_extended_api``), so
code above it takes the same path as on the bare ``TCPStore``. :func:`count_rendezvous_stores`
makes every :class:`~elastic_ep.groups.Rendezvous` of the process use counting clients.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from torch.distributed import Store

from elastic_ep.groups import rendezvous


class StoreCounts:
    """Calls and keys per kind, shared by the clients of one process (thread-safe)."""

    def __init__(self, kind: Callable[[str], str]) -> None:
        self.kind = kind
        self.calls: collections.Counter[str] = collections.Counter()
        self.keys: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def count(self, keys: list[str]) -> None:
        with self.lock:
            kind = self.kind(keys[0])
            self.calls[kind] += 1
            self.keys[kind] += len(keys)

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()
            self.keys.clear()


class CountingStore(Store):
    """A store client that counts its operations into ``counts`` (see the module docstring)."""

    def __init__(self, inner: Any, counts: StoreCounts) -> None:
        super().__init__()
        self._inner = inner
        self._counts = counts
        self.port = getattr(inner, "port", None)

    def set(self, key: str, value: Any) -> None:
        self._counts.count([key])
        self._inner.set(key, value)

    def get(self, key: str) -> bytes:
        self._counts.count([key])
        return self._inner.get(key)

    def add(self, key: str, value: int) -> int:
        self._counts.count([key])
        return int(self._inner.add(key, value))

    def check(self, keys: list[str]) -> bool:
        self._counts.count(keys)
        return bool(self._inner.check(keys))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._counts.count(keys)
        if timeout is None:
            self._inner.wait(keys)
        else:
            self._inner.wait(keys, timeout)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        self._counts.count([key])
        return self._inner.compare_set(key, expected, desired)

    def delete_key(self, key: str) -> bool:
        self._counts.count([key])
        return bool(self._inner.delete_key(key))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        self._counts.count(keys)
        return self._inner.multi_get(keys)

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        self._counts.count(keys)
        self._inner.multi_set(keys, values)

    def append(self, key: str, value: Any) -> None:
        self._counts.count([key])
        self._inner.append(key, value)

    def has_extended_api(self) -> bool:
        return bool(self._inner.has_extended_api())

    def num_keys(self) -> int:
        return int(self._inner.num_keys())

    def set_timeout(self, timeout: timedelta) -> None:
        self._inner.set_timeout(timeout)

    def clone(self) -> CountingStore:
        return CountingStore(self._inner.clone(), self._counts)


def count_rendezvous_stores(counts: StoreCounts) -> None:
    """Make every ``Rendezvous`` this process builds from now on use counting clients."""
    real = rendezvous.TCPStore

    def counting(*args: Any, **kwargs: Any) -> CountingStore:
        return CountingStore(real(*args, **kwargs), counts)

    rendezvous.TCPStore = counting  # type: ignore[assignment,misc]
