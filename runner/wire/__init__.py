"""Every message of the runner and how it travels: messages.py (the kinds), pipe.py (frames over a
local process's pipes), zeromq.py (sockets between hosts, CURVE keys, the control request)."""
