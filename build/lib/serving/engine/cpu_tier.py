"""The CPU tier: verified adapters ready to copy into a device slot, LRU, bounded by bytes."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class CpuTier:
    """key -> adapter (anything with `nbytes`). Holds at most `max_bytes` (always at least the
    newest adapter); `in_use(key)` keeps an adapter a batch holds from being evicted."""

    def __init__(self, max_bytes: int, in_use: Callable[[str], bool] = lambda key: False):
        self.max_bytes, self.in_use = max_bytes, in_use
        self.adapters: OrderedDict[str, object] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str):
        adapter = self.adapters.get(key)
        if adapter is not None:
            self.adapters.move_to_end(key)
        return adapter

    def put(self, key: str, adapter) -> list[str]:
        """Add `adapter`; returns the keys evicted to make room (least recently used first)."""
        self.pop(key)
        self.adapters[key] = adapter
        self.nbytes += adapter.nbytes
        evicted = []
        for victim in list(self.adapters):
            if self.nbytes <= self.max_bytes:
                break
            if victim != key and not self.in_use(victim):
                self.pop(victim)
                evicted.append(victim)
        return evicted

    def pop(self, key: str):
        adapter = self.adapters.pop(key, None)
        if adapter is not None:
            self.nbytes -= adapter.nbytes
        return adapter

    def __contains__(self, key: str) -> bool:
        return key in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self):
        return iter(list(self.adapters))
