"""One local process, both sides of its pipes.

The parent's side (handle.py: start, pipes, slot, reap, the job-timeout check) is used by the
coordinator and by a worker host's agent alike; the child's side is loop.py (producer and consumer
loops) and context.py (the `ctx` a task receives).
"""
