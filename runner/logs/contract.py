"""The log contract (README, "Log events"): the events the runner writes, their levels and the fields lines carry.

Field order and names are a contract: tools read them, and `runner.logs.EVENTS` is documented.
"""

from __future__ import annotations

import socket

#: every event the runner itself writes (the log contract; README "Log events"); tools read this list
EVENTS = frozenset({
    "run.started", "run.stopping", "run.finished", "worker.started", "worker.exited", "worker.crashed", "pool.failed",
    "producer.finished", "producer.failed", "job.queued", "batch.sent", "job.done", "job.failed", "job.retried", "job.dead",
    "queue.full", "progress", "lock.broken", "protocol.error", "report.stale",
    "host.joined", "host.lost", "host.left", "host.refused",
    # the runner itself failed (issue 10)
    "run.crashed",
    # crash-safe runs (issue 11): a coordinator resumed the run from its journal; `runner retry` re-runs a dead job
    "run.resumed", "job.rerun",
    # stuck jobs and memory limits (issue 12)
    "job.stalled",
})
#: event namespaces that belong to the runner: a name in them that is not in EVENTS is unknown
RESERVED_PREFIXES = ("run.", "worker.", "pool.", "producer.", "job.", "batch.", "queue.", "lock.", "host.", "protocol.", "report.")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: the context every line carries, in the order it is written
CONTEXT_KEYS = ("timestamp", "level", "event", "run_id", "host", "pid", "role", "pool", "worker")
#: what a line must carry to be shown at all; event-specific fields are checked by the readers that need them
REQUIRED = ("timestamp", "level", "event")
#: fields an analysis needs from an event; a line without them is skipped and counted as damaged
NEEDS = {
    "job.queued": ("job_id",), "job.done": ("job_id",), "job.failed": ("job_id",), "job.retried": ("job_id",),
    "job.dead": ("job_id",), "worker.started": ("worker",), "worker.crashed": ("worker",), "progress": ("done",),
    "run.finished": ("status",),
}
#: a job.failed `cause` meaning its process died under it (`crash`: written before causes were named)
DIED = frozenset({"crash", "crashed", "timed_out", "stalled", "memory"})
#: a run's log is <run_id>.jsonl; these side files beside it are not run logs
LOG_SUFFIX = ".jsonl"
SIDE_FILES = (".dead.jsonl", ".pending.jsonl")
#: this machine: the `host` of lines written here
HOST = socket.gethostname()
