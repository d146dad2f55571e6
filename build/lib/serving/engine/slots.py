"""The device slot table: which adapter version sits in which slot, in LRU order, and how many
queued or running batches hold each (a held slot is never evicted or reused)."""
from __future__ import annotations

from collections import Counter, OrderedDict


class NoFreeSlot(RuntimeError):
    pass


class SlotTable:
    """Device slots 1..n (0 = no adapter), keyed by an adapter version's key (ref and identity)."""

    def __init__(self, num_slots: int, on_free=lambda key, slot: None):
        self.free = list(range(num_slots, 0, -1))
        self.on_free = on_free  # called before a slot leaves its version (evicted, dropped)
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # LRU first
        self.refs: Counter[str] = Counter()
        self.doomed: set[str] = set()  # dropped while held: freed when the last holder releases
        self.evictions = 0

    def acquire(self, key: str, load, evict: bool = True) -> int:
        """The slot holding `key`, after `load(slot)` filled a free (or evicted) one if needed; held
        until release(). A load that fails gives its slot back."""
        if key in self.slot_of:
            self.slot_of.move_to_end(key)
        else:
            if not self.free and not evict:
                raise NoFreeSlot("no free device slot")
            if not self.free:
                victim = next((k for k in self.slot_of if self.refs[k] == 0), None)
                if victim is None:
                    raise NoFreeSlot("every device slot is in use by a queued or running batch")
                self._free(victim)
                self.evictions += 1
            slot = self.free.pop()
            try:
                load(slot)
            except BaseException:
                self.free.append(slot)
                raise
            self.slot_of[key] = slot
        self.refs[key] += 1
        return self.slot_of[key]

    def release(self, key: str) -> None:
        self.refs[key] -= 1
        if self.refs[key] <= 0:
            del self.refs[key]
            if key in self.doomed:
                self.doomed.discard(key)
                self._free(key)

    def drop(self, key: str) -> None:
        """Forget a version that is gone: now if no batch holds it, else when the last one releases it."""
        if key not in self.slot_of:
            return
        if self.refs[key] == 0:
            self._free(key)
        else:
            self.doomed.add(key)

    def _free(self, key: str) -> None:
        if key in self.slot_of:
            self.on_free(key, self.slot_of[key])
            self.free.append(self.slot_of.pop(key))
