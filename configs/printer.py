"""The tutorial's shared printer: three colleagues print at once, but pages never interleave.

Each document's pages are appended to one output file while holding `ctx.lock("printer")`, so a
document is always printed whole; the tutorial's join()-based version made everyone wait in a fixed
order, the lock lets whoever comes first print first.
"""

import random
import time


def colleagues(ctx, documents=3, pages=4, output="printer.txt"):
    for number in range(1, documents + 1):
        yield {"doc": f"colleague-{number}", "pages": pages, "output": output}


def print_document(ctx, job):
    with ctx.lock("printer"):
        with open(job["output"], "a") as out:
            out.write(f"start {job['doc']}\n")
            for page in range(1, job["pages"] + 1):
                out.flush()
                time.sleep(random.uniform(0, 0.005))
                out.write(f"{job['doc']} page {page}\n")
            out.write(f"end {job['doc']}\n")
    return {"doc": job["doc"], "printer_pid": ctx.worker}
