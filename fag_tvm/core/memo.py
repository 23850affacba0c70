"""Bounded per-process memo tables for the per-call paths (call plans, bound launches, packed metadata).

A hit is one plain dict lookup -- atomic under the GIL, no lock, which is the point on a path that costs
microseconds; inserts take a lock and a full table is simply emptied (its entries are all cheap to
rebuild, and a working set larger than the bound is not what these tables are for)."""
from __future__ import annotations

import threading
from typing import Any, Hashable


class BoundedMemo(dict):
    """A dict with `put`: insert under a lock, emptying the table first when it holds `maxsize` entries."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self._lock = threading.Lock()

    def put(self, key: Hashable, value: Any) -> Any:
        """Store and return `value`."""
        with self._lock:
            if len(self) >= self.maxsize:
                self.clear()
            self[key] = value
        return value
