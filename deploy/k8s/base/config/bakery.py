"""The bun shop from the multiprocessing tutorial, done properly: no bun is ever left uneaten.

The tutorial's consumer quits after `q.get(timeout=3)` and can leave buns in the queue; here an
idle eater retires only while others remain, and the run ends when every bun is eaten.
"""

import random
import time


def bake(ctx, buns=10, pause=0.0):
    """A baker yields buns, now and then slowly (a slow producer must not leave buns uneaten)."""
    for number in range(1, buns + 1):
        if pause:
            time.sleep(random.uniform(0, pause))
        yield {"bun": number, "baker": ctx.worker}


def eat(ctx, job):
    """An eater eats one bun."""
    time.sleep(random.uniform(0, 0.01))
    ctx.log.info("bun.eaten", bun=job["bun"], baker=job["baker"])
    return f"{ctx.worker} ate bun {job['bun']} from {job['baker']}"
