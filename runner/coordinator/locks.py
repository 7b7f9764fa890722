"""Run-wide named locks, served by the coordinator as leases.

A multiprocessing.Lock held by a process that dies stays locked for ever; here the holder's death
releases the lock (reported as lock.broken) and the next waiter gets it.
"""

from __future__ import annotations

from collections import deque


class LockTable:
    def __init__(self) -> None:
        self.holders: dict[str, str] = {}
        self.waiters: dict[str, deque[tuple[str, int]]] = {}

    def acquire(self, name: str, who: str, request: int) -> bool:
        """True if `who` holds the lock now; otherwise it waits in line."""
        if name not in self.holders:
            self.holders[name] = who
            return True
        self.waiters.setdefault(name, deque()).append((who, request))
        return False

    def release(self, name: str, who: str) -> tuple[str, int] | None:
        """Release `name` if `who` holds it; returns the (waiter, request) that holds it now."""
        if self.holders.get(name) != who:
            return None
        del self.holders[name]
        line = self.waiters.get(name)
        if line:
            waiter, request = line.popleft()
            self.holders[name] = waiter
            if not line:
                del self.waiters[name]  # no empty line is kept: lock names may be many (one per key)
            return waiter, request
        return None

    def drop(self, who: str) -> tuple[list[str], list[tuple[str, str, int]]]:
        """`who` is gone: (locks it held, [(name, next holder, request)] handed on)."""
        for name, line in list(self.waiters.items()):
            for item in [item for item in line if item[0] == who]:
                line.remove(item)
            if not line:
                del self.waiters[name]
        held = [name for name, holder in self.holders.items() if holder == who]
        handed = []
        for name in held:
            nxt = self.release(name, who)
            if nxt:
                handed.append((name, *nxt))
        return held, handed
