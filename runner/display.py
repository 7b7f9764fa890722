"""What a person sees while a run goes and when it ends: a live line on a TTY, then a summary per pool.

It is fed snapshots (plain dicts the coordinator builds), never the coordinator itself.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runner.console import guard

#: the live line is redrawn at most this often
REFRESH_S = 0.25
COUNTS = ("produced", "done", "failed", "dead", "queued", "in_flight")


class Display:
    def __init__(self, console: Console, out: Console, tty: bool) -> None:
        self.console = console  #: stderr: logs and the live line
        self.out = out  #: stdout: the summary
        self.tty = tty
        self._live: Live | None = None
        self._last = 0.0
        self.rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self.rate = 0.0  #: jobs done per second over the last second or so

    def start(self, snapshot: dict[str, Any]) -> None:
        if self.tty:
            self._live = Live(self._render(snapshot), console=self.console, refresh_per_second=4, transient=True)
            with guard(self.console.file):
                self._live.start()

    def due(self, now: float) -> bool:
        """True when a new snapshot would be shown (so the coordinator builds one only then)."""
        return now - self._last >= REFRESH_S

    def update(self, snapshot: dict[str, Any]) -> None:
        self._last = time.monotonic()
        text = self._render(snapshot)
        if self._live is not None:
            with guard(self.console.file):
                self._live.update(text)

    def _render(self, snapshot: dict[str, Any]) -> Text:
        counts = snapshot["counts"]
        now = time.monotonic()
        mark_time, mark_done = self.rate_mark
        if now - mark_time >= 1.0:
            self.rate = (counts["done"] - mark_done) / (now - mark_time)
            self.rate_mark = (now, counts["done"])
        elapsed = snapshot["elapsed_s"]
        text = Text()
        text.append(f"{snapshot['name']} ", style="bold")
        for key in COUNTS:
            style = "red" if key in ("failed", "dead") and counts[key] else ""
            text.append(f"{key.replace('_', ' ')} ", style="dim")
            text.append(f"{counts[key]:,}  ", style=style)
        text.append(f"{self.rate:,.0f} jobs/s  ", style="cyan")
        text.append(f"{int(elapsed // 60):02d}:{elapsed % 60:04.1f}", style="dim")
        if snapshot["full"]:
            text.append(f"  queue full: {', '.join(snapshot['full'])}", style="yellow")
        return text

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            with guard(self.console.file):
                live.stop()

    def summary(self, end: dict[str, Any]) -> None:
        """The end of a run: a table per pool, then where its files are (nothing if stdout is gone)."""
        with guard(self.out.file):
            self._summary(end)

    def _summary(self, end: dict[str, Any]) -> None:
        table = Table(title=f"run {end['run_id']}: {end['status']} (exit {end['exit_code']})", title_justify="left")
        for column in ("pool", "done", "failed", "retried", "dead", "p50 ms", "p95 ms", "jobs/s"):
            table.add_column(column, justify="left" if column == "pool" else "right")
        for pool, s in end["pools"].items():
            table.add_row(pool, *(_fmt(s[k]) for k in ("done", "failed", "retried", "dead", "p50_ms", "p95_ms", "jobs_per_s")))
        self.out.print(table)
        self.out.print(f"log: {end['log_file']}", highlight=False, soft_wrap=True)
        if end["pending"]:
            where = f"in {end['pending_file']}" if end["pending_file"] else "(the pending file could not be written: see above)"
            self.out.print(f"pending: {end['pending']} unfinished job(s) {where}", highlight=False, soft_wrap=True)
        if end["dead"]:
            self.out.print(f"dead: {end['dead']} job(s) in {end['dead_file']}", highlight=False, soft_wrap=True)
        if end["error"]:
            self.out.print(f"failed: {end['error']}", highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,}"


