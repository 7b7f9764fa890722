"""The one backoff rule: a delay that doubles with each attempt up to a cap.

Job retries use it without jitter (the README documents `retry_backoff` doubling exactly). Restarts of
crashed processes and a worker's reconnects add ±20 % jitter, so many processes or hosts that failed
together do not all come back in the same instant.
"""

from __future__ import annotations

import random

#: spread of a jittered delay: ±20 %
JITTER = 0.2


def backoff(base: float, attempt: int, cap: float, jitter: bool = False) -> float:
    """base, 2·base, 4·base ... for attempt 1, 2, 3 ..., at most `cap`; 0 for attempt 0."""
    if attempt <= 0:
        return 0.0
    delay = min(base * 2 ** (attempt - 1), cap)
    return delay * random.uniform(1 - JITTER, 1 + JITTER) if jitter else delay
