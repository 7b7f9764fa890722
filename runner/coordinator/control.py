"""The local control socket: `runner status` and `runner stop` for the user who started the run.

  client -> coordinator   [STATUS] / [STOP_RUN]        (runner.wire.host_messages, checked like any message)
  coordinator -> client   [REPLY, dict]                the status, {"ok": true, "run_id": ...}, or {"error": ...}

It lives at ipc://$TMPDIR/runner-<uid>/<run_id>.ctl, in a folder only that user may enter. The
same requests also reach the bound address of a multi-host run (hosts.py); both answer through
the one `reply` function the coordinator gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import zmq

from runner.errors import ProtocolError
from runner.wire import zeromq as wire


class ControlSocket:
    def __init__(self, context: zmq.Context, run_id: str, reply: Callable[[int], dict[str, Any]], log: Any) -> None:
        self.address = wire.control_address(run_id)
        self._reply = reply
        self.log = log
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)

    def serve(self) -> None:
        """Answer every request waiting (never blocks)."""
        while True:
            try:
                identity, *parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind = wire.parse(parts).kind
                if kind not in (wire.STATUS, wire.STOP_RUN):
                    raise ProtocolError(f"message kind {kind} is not a control request (STATUS, STOP_RUN)")
                body = self._reply(kind)
            except ProtocolError as exc:
                self.log.error("protocol.error", peer="control", error=str(exc))
                body = {"error": f"bad request: {exc}"}
            try:
                self.sock.send_multipart([identity, wire.header(wire.REPLY, 0, body)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client left, or stopped reading: nothing to tell it

    def close(self) -> None:
        self.sock.close(0)
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
