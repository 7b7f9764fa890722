"""What a person sees while a run goes and when it ends: a live line on a TTY, then a summary per pool."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from runner.coordinator import Coordinator


class Progress:
    def __init__(self, console: Console, out: Console, tty: bool) -> None:
        self.console = console  #: stderr: logs and the live line
        self.out = out  #: stdout: the summary
        self.tty = tty
        self._live: Live | None = None
        self._last = 0.0
        self.rate_mark: tuple[float, int] = (time.monotonic(), 0)
        self.rate = 0.0

    def start(self, coordinator: Coordinator) -> None:
        if self.tty:
            self._live = Live(self._render(coordinator), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()

    def update(self, coordinator: Coordinator) -> None:
        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        text = self._render(coordinator)
        if self._live is not None:
            self._live.update(text)

    def _render(self, coordinator: Coordinator) -> Text:
        counts = coordinator.counts()
        now = time.monotonic()
        mark_time, mark_done = self.rate_mark
        if now - mark_time >= 1.0:
            self.rate = (counts["done"] - mark_done) / (now - mark_time)
            self.rate_mark = (now, counts["done"])
        elapsed = now - coordinator.started
        full = [pool for pool, at in coordinator.last_full.items() if now - at < 5.0]
        text = Text()
        text.append(f"{coordinator.run_cfg.name} ", style="bold")
        for key in ("produced", "done", "failed", "dead", "queued", "in_flight"):
            style = "red" if key in ("failed", "dead") and counts[key] else ""
            text.append(f"{key.replace('_', ' ')} ", style="dim")
            text.append(f"{counts[key]:,}  ", style=style)
        text.append(f"{self.rate:,.0f} jobs/s  ", style="cyan")
        text.append(f"{int(elapsed // 60):02d}:{elapsed % 60:04.1f}", style="dim")
        if full:
            text.append(f"  queue full: {', '.join(full)}", style="yellow")
        return text

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, coordinator: Coordinator, status: str, code: int, pending: int) -> None:
        pools = coordinator.pool_summary()
        table = Table(title=f"run {coordinator.run_id}: {status} (exit {code})", title_justify="left")
        for column in ("pool", "done", "failed", "retried", "dead", "p50 ms", "p95 ms", "jobs/s"):
            table.add_column(column, justify="left" if column == "pool" else "right")
        for pool, s in pools.items():
            table.add_row(pool, *(_fmt(s[k]) for k in ("done", "failed", "retried", "dead", "p50_ms", "p95_ms", "jobs_per_s")))
        self.out.print(table)
        self.out.print(f"log: {coordinator.log_path}", highlight=False, soft_wrap=True)
        if pending:
            self.out.print(f"pending: {pending} unfinished job(s) in {coordinator.pending_path}", highlight=False, soft_wrap=True)
        dead = coordinator.counts()["dead"]
        if dead:
            self.out.print(f"dead: {dead} job(s) in {coordinator.dead_path}", highlight=False, soft_wrap=True)
        if coordinator.failure:
            self.out.print(f"failed: {coordinator.failure}", highlight=False, soft_wrap=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,}"
