"""A run's log as a Chrome trace-event file: a track per worker process, a slice per job attempt (Perfetto)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

import orjson

from runner.logs.contract import DIED
from runner.logs.read import Damage, LogLine, checked, stamp_seconds


def _us(stamp: str) -> int:
    return round(stamp_seconds(stamp) * 1_000_000)


class Timeline:
    """Writes a Chrome trace-event JSON file while reading: one process per host, one track per OS process.

    Each job attempt with a duration (job.done / job.failed from the worker) is a complete event
    ("ph": "X") ending at its line's timestamp; crashes and run events are instants; `progress`
    feeds counters. Opens in Perfetto (ui.perfetto.dev) and chrome://tracing.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hosts: dict[str, int] = {}
        self.tracks: dict[tuple[int, int], int] = {}  #: (host, pid) -> end of the last slice, µs
        self.count = 0
        self.runs: set[str] = set()
        self.out.write(b'{"traceEvents":[\n')

    def _emit(self, event: dict[str, Any]) -> None:
        if self.count:
            self.out.write(b",\n")
        self.out.write(orjson.dumps(event))
        self.count += 1

    def _track(self, fields: dict[str, Any], pid: Any = None, name: str | None = None) -> tuple[int, int]:
        host = str(fields.get("host"))
        if host not in self.hosts:
            self.hosts[host] = len(self.hosts) + 1
            self._emit({"name": "process_name", "ph": "M", "pid": self.hosts[host], "args": {"name": f"host {host}"}})
        tid = int(pid if pid is not None else fields.get("pid") or 0)
        key = (self.hosts[host], tid)
        if key not in self.tracks:
            self.tracks[key] = 0
            label = name or f"{fields.get('worker')} (pid {tid})"
            self._emit({"name": "thread_name", "ph": "M", "pid": key[0], "tid": tid, "args": {"name": label}})
        return key

    def add(self, line: LogLine) -> None:
        fields, event = line.fields, line.event
        if fields.get("run_id"):
            self.runs.add(str(fields["run_id"]))
        if event == "worker.started":
            restart = fields.get("restart") or 0
            self._track(fields, name=f"{fields.get('worker')} (pid {fields.get('pid')}" + (f", restart {restart})" if restart else ")"))
        elif event in ("job.done", "job.failed") and fields.get("role") != "coordinator" and isinstance(fields.get("duration_ms"), (int, float)):
            key = self._track(fields)
            end = _us(line.timestamp)
            start = max(end - round(fields["duration_ms"] * 1000), self.tracks[key])
            self.tracks[key] = max(self.tracks[key], end)
            failed = event == "job.failed"
            outcome = ("crashed" if fields.get("cause") in DIED else "failed") if failed else "done"
            args = {"job_id": fields.get("job_id"), "attempt": fields.get("attempt"), "pool": fields.get("pool"),
                    "duration_ms": fields["duration_ms"], "outcome": outcome}
            if failed:
                args["error"] = fields.get("error")
            self._emit({"name": f"job {fields.get('job_id')}" + (" failed" if failed else ""), "cat": str(fields.get("pool")),
                        "ph": "X", "ts": start, "dur": max(0, end - start), "pid": key[0], "tid": key[1], "args": args,
                        **({"cname": "terrible"} if failed else {})})
        elif event == "worker.crashed":
            key = self._track(fields)
            self._emit({"name": "worker.crashed", "cat": str(fields.get("pool")), "ph": "i", "s": "t", "ts": _us(line.timestamp),
                        "pid": key[0], "tid": key[1], "args": {k: fields.get(k) for k in ("worker", "reason", "job_id", "code", "signal")}})
        elif event == "progress":
            key = self._track(fields, name="coordinator")
            self._emit({"name": "jobs", "ph": "C", "ts": _us(line.timestamp), "pid": key[0],
                        "args": {k: fields.get(k) or 0 for k in ("done", "queued", "in_flight", "failed", "dead")}})
        elif event.startswith("run.") or event in ("pool.failed", "producer.failed", "host.lost"):
            key = self._track(fields, name="coordinator" if fields.get("role") == "coordinator" else None)
            args = {k: v for k, v in fields.items() if k in ("status", "reason", "signal", "error", "name", "pool")}
            self._emit({"name": event, "ph": "i", "s": "p", "ts": _us(line.timestamp), "pid": key[0], "tid": key[1], "args": args})

    def close(self) -> int:
        other = {"runs": sorted(self.runs), "generator": "runner logs timeline"}
        self.out.write(b'\n],"displayTimeUnit":"ms","otherData":' + orjson.dumps(other) + b"}\n")
        return self.count


def write_timeline(lines: Iterable[LogLine], out: IO[bytes], damage: Damage) -> int:
    """Stream `lines` into `out` as trace-event JSON; returns the number of events written."""
    timeline = Timeline(out)
    for line in checked(lines, damage):
        timeline.add(line)
    return timeline.close()
