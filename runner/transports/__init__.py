"""How messages move: local pipes and queues (local.py), ZeroMQ between hosts (zeromq.py)."""
