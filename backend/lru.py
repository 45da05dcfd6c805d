"""``SizedLRU``: the one bounded, thread-safe least-recently-used store the backend keeps its memories in.

Everything the backend remembers between requests (embeddings, the label configs /setup brought, the previous
click's logits, what a task image was) is bounded, because requests decide what goes in: a store that grew
with every distinct key would let callers grow the process. Each store measures its values its own way
(bytes, characters, one per entry), so the bound is a total size with an optional cap on the entry count.
A value larger than the whole budget is not stored, and leaves an earlier value of its key in place.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """At most ``max_size`` in total of ``size(value)`` (and ``max_entries`` values); least recent go first."""

    def __init__(self, max_size: int, size: Callable[[V], int], max_entries: int | None = None) -> None:
        self.max_size = max_size
        self.max_entries = max_entries
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def newest(self, matches: Callable[[K], bool]) -> V | None:
        """The most recent value whose key ``matches`` (now the most recent of all), or None."""
        with self._lock:
            for key in reversed(self._items):
                if matches(key):
                    self._items.move_to_end(key)
                    return self._items[key]
        return None

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` as the most recent, dropping the least recent past the bounds; False if it alone
        is over the size budget (then nothing changes)."""
        size = self._size(value)
        if size > self.max_size:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= self._size(old)
            self._items[key] = value
            self._total += size
            while self._total > self.max_size or (self.max_entries is not None
                                                  and len(self._items) > self.max_entries):
                _, dropped = self._items.popitem(last=False)
                self._total -= self._size(dropped)
        return True

    def pop(self, key: K) -> V | None:
        with self._lock:
            value = self._items.pop(key, None)
            if value is not None:
                self._total -= self._size(value)
            return value

    def pop_where(self, matches: Callable[[K, V], bool]) -> int:
        """Drop every entry for which ``matches(key, value)``; returns how many."""
        with self._lock:
            keys = [key for key, value in self._items.items() if matches(key, value)]
            for key in keys:
                self._total -= self._size(self._items.pop(key))
        return len(keys)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def total(self) -> int:
        """The summed size of the values kept."""
        with self._lock:
            return self._total
