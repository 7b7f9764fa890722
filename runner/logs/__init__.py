"""Run logs: the contract (contract.py), the writer (writer.py) and the readers (read, runs, trace, summary, timeline).

`from runner import logs` gives the contract and the writer; the readers are imported by name
(`from runner.logs.read import ...`), so writing a log never loads what reading one needs.
"""

from runner.logs.contract import CONTEXT_KEYS, EVENTS, HOST, LEVELS, RESERVED_PREFIXES
from runner.logs.writer import RunLog, configure, dumps, dumps_line, human, iso_now, loggable

__all__ = ["CONTEXT_KEYS", "EVENTS", "HOST", "LEVELS", "RESERVED_PREFIXES", "RunLog", "configure", "dumps", "dumps_line", "human", "iso_now", "loggable"]
