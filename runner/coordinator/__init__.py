"""The coordinator: the run's loop and state machine (run.py) and the parts it composes, each owning
its state: ledger.py (where every job is), flow.py (credit, batch sizing, fair dispatch),
supervisor.py (processes: start, scale, restart, exits), members.py (the process records),
hosts.py (worker hosts over ZeroMQ), control.py (status, stop), files.py (results, dead, pending),
locks.py (run-wide locks), report.py (counts and status)."""
