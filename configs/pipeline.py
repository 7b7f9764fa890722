"""Stage chaining: bake -> decorate -> eat. A consumer feeds the next pool with ctx.emit.

An emitted job is delivered only when the job that emitted it succeeds, so a decorator that crashes
and is retried never sends the same bun on twice.
"""


def bake(ctx, buns=30):
    for number in range(1, buns + 1):
        yield {"bun": number}


def decorate(ctx, job):
    ctx.emit({**job, "icing": "chocolate" if job["bun"] % 2 else "vanilla"}, to="eat")


def eat(ctx, job):
    return f"bun {job['bun']} with {job['icing']} icing"
