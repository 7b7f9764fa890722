"""`runner worker`: a host's agent (agent.py: joining, reconnecting, giving up) and its session with
a coordinator (session.py: relaying frames, supervising the processes of this host)."""
