"""The slot: a small shared array per process, written by the child, read by its parent.

It tells the parent which job the process is running, since when and when the task last called
`ctx.heartbeat()`, without a message per job: that is how `job_timeout` and `stall_timeout` are
enforced and how a crash is charged to the right job.
"""

#: index of the batch id, the job's index in it, and the job's start (time.monotonic(); 0: between jobs)
SLOT_BATCH, SLOT_INDEX, SLOT_STARTED = 0, 1, 2
#: index of the last ctx.heartbeat() (time.monotonic(); 0: none yet)
SLOT_BEAT = 3
#: doubles in the slot
SLOT_SIZE = 4
