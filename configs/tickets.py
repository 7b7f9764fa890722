"""The tutorial's ticket grab: everyone may look at once, buying is serialised by a run-wide lock.

The tickets live in a JSON file (the tutorial's shared disk state). Without the lock, two buyers
can read the same count and both buy the last ticket; with `ctx.lock("tickets")` that never happens.
"""

import json
import os
import random
import time


def open_sale(ctx, buyers=12, tickets=3, state="tickets.json"):
    """Put `tickets` on sale, then let `buyers` people in."""
    with ctx.lock("tickets"):
        with open(state, "w") as f:
            json.dump({"count": tickets}, f)
    for buyer in range(1, buyers + 1):
        yield {"buyer": buyer, "state": state}


def _read(state):
    with open(state) as f:
        return json.load(f)["count"]


def buy(ctx, job):
    """Look (concurrently), then buy under the lock: read, decrement, write."""
    time.sleep(random.uniform(0, 0.01))  # the tutorial's network delay while looking
    ctx.log.info("tickets.seen", buyer=job["buyer"], left=_read(job["state"]))
    with ctx.lock("tickets"):
        left = _read(job["state"])
        if left <= 0:
            return {"buyer": job["buyer"], "bought": False}
        time.sleep(random.uniform(0, 0.005))  # the delay while paying: the race window
        tmp = f"{job['state']}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"count": left - 1}, f)
        os.replace(tmp, job["state"])
    return {"buyer": job["buyer"], "bought": True}
