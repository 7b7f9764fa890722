"""Memory of this machine's processes, read from /proc and the cgroup: RSS samples and OOM kills.

RSS is sampled (at most every SAMPLE_S by the coordinator for its processes, by the agent on a
worker host), so `max_rss` and `memory_limit` are sampled limits: a process may pass one for up to
a sample's length, and a spike shorter than that may go unseen.
"""

from __future__ import annotations

import os
from pathlib import Path

#: RSS is read at most this often
SAMPLE_S = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None) -> int | None:
    """The resident set size of a process now (from /proc/PID/statm), None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def format_bytes(n: float) -> str:
    """`2.1 GiB`, `2 GiB`, `300 MiB`: binary units, one decimal at most."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    text = f"{n:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def _cgroup_files() -> list[Path]:
    """The memory-event files of this process's cgroup that may hold an `oom_kill` count (v2, then v1)."""
    found: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    root = Path("/sys/fs/cgroup")
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":
            found += [root / relative / "memory.events", root / "unified" / relative / "memory.events"]
        elif "memory" in controllers.split(","):
            found += [root / "memory" / relative / "memory.oom_control", root / "memory" / "memory.oom_control"]
    return found


def read_oom_kills(path: Path) -> int | None:
    """The `oom_kill N` count of a cgroup v2 memory.events or v1 memory.oom_control file."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


class OomKills:
    """The kernel's OOM-kill count for our cgroup, where readable: a SIGKILL that comes while it rises
    was the OOM killer's ("out of memory"); otherwise the runner can only say "possibly"."""

    def __init__(self) -> None:
        self.path = next((p for p in _cgroup_files() if read_oom_kills(p) is not None), None)
        self.seen = self.count()

    def count(self) -> int | None:
        return read_oom_kills(self.path) if self.path is not None else None

    def sample(self) -> None:
        """The baseline, taken with every RSS sample (before the kill, so a rise is seen)."""
        self.seen = self.count()

    def rose(self) -> bool:
        now = self.count()
        return now is not None and self.seen is not None and now > self.seen
