"""The slot: a small shared array per process, written by the child, read by its parent.

It tells the parent which job the process is running, since when and when the task last called
`ctx.heartbeat()`, without a message per job: that is how `job_timeout` and `stall_timeout` are
enforced and how a crash is charged to the right job.
"""

#: index of the batch id, the job's index in it (-1: between jobs), the job's start (time.monotonic(); 0: between
#: jobs; in per-batch timing the batch's start), and 1.0 if jobs are timed one by one (0.0: per batch)
SLOT_BATCH, SLOT_INDEX, SLOT_STARTED, SLOT_TIMED = 0, 1, 2, 3
#: index of the last ctx.heartbeat() (time.monotonic(); 0: none yet)
SLOT_BEAT = 4
#: doubles in the slot
SLOT_SIZE = 5
