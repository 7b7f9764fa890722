"""The local control socket: `runner status` and `runner stop` for the user who started the run.

  client -> coordinator   [STATUS] / [STOP_RUN]        (runner.wire.host_messages, checked like any message)
                          [STATUS, {"stacks": true}]   the status with every busy process's stack
  coordinator -> client   [REPLY, dict]                the status, {"ok": true, "run_id": ...}, or {"error": ...}

A status with stacks is answered later, once the stacks are in (`later`): the loop never waits.

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
    def __init__(self, context: zmq.Context, run_id: str, reply: Callable[[int], dict[str, Any]], log: Any,
                 later: Callable[[Callable[[dict[str, Any]], None]], None] | None = None) -> None:
        self.address = wire.control_address(run_id)
        self._reply = reply
        self._later = later
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
                envelope = wire.parse(parts)
                kind = envelope.kind
                if kind not in (wire.STATUS, wire.STOP_RUN):
                    raise ProtocolError(f"message kind {kind} is not a control request (STATUS, STOP_RUN)")
                if self._later is not None and wire.wants_stacks(envelope):
                    self._later(self._answer_to(identity))
                    continue
                body = self._reply(kind)
            except ProtocolError as exc:
                self.log.error("protocol.error", peer="control", error=str(exc))
                body = {"error": f"bad request: {exc}"}
            self._send(identity, body)

    def _answer_to(self, identity: bytes) -> Callable[[dict[str, Any]], None]:
        return lambda reply: self._send(identity, reply)

    def _send(self, identity: bytes, reply: dict[str, Any]) -> None:
        try:
            self.sock.send_multipart([identity, wire.header(wire.REPLY, 0, reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client left or stopped reading (a status that waited for stacks and gave up): nobody to tell

    def close(self) -> None:
        self.sock.close(0)
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)
