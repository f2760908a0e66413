"""An in-process LRU of cached responses, bounded by bytes.

Values are the serialized entry (bytes, as stored in Redis) plus the time they
expire; the size counted is the value's length plus a fixed overhead per item
for the key, the tuple and the dict slot, so the bound holds for many small
entries too.
"""

from __future__ import annotations

from collections import OrderedDict

ITEM_OVERHEAD = 200  # bytes: key string, tuple, OrderedDict node


class ByteLRU:
    __slots__ = ("max_bytes", "bytes", "_items", "evictions")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, now: float) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= now:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, expires: float) -> None:
        size = len(value) + ITEM_OVERHEAD
        if size > self.max_bytes:
            return  # one entry larger than the whole cache: keep it in Redis only
        if key in self._items:
            self._drop(key)
        self._items[key] = (value, expires)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _expires) = self._items.popitem(last=False)
            self.bytes -= len(old) + ITEM_OVERHEAD
            self.evictions += 1

    def discard(self, key: str) -> None:
        if key in self._items:
            self._drop(key)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self.bytes -= len(value) + ITEM_OVERHEAD
