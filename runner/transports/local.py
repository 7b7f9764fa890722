"""Point-to-point channels between the coordinator and one local process.

Each process gets its own pipe to the coordinator and its own inbox queue, so no lock is shared
between processes: a process SIGKILLed in the middle of a write can only tear its own pipe, which
the coordinator reads without blocking and discards at the process's death. (A multiprocessing.Queue
shared by many writers would be left locked and corrupt: the standard library documents this.)

Frames on a pipe are a 4-byte big-endian length and a msgpack message (runner.protocol).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection

from runner.protocol import MAX_FRAME

_HEADER = struct.Struct("!I")
_READ_SIZE = 1 << 20


class FrameWriter:
    """The process side: blocking, thread-safe writes of whole frames."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn  # keep the Connection alive: it owns the fd
        self._fd = conn.fileno()
        self._lock = threading.Lock()

    def send(self, frame: bytes) -> None:
        data = _HEADER.pack(len(frame)) + frame
        view = memoryview(data)
        with self._lock:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


class FrameReader:
    """The coordinator side: non-blocking reads, complete frames out, a torn tail ignored."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        self._buffer = bytearray()
        self.eof = False

    def read(self) -> Iterator[bytes]:
        """Every complete frame that can be read now, without blocking."""
        while True:
            try:
                chunk = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self._buffer += chunk
            if len(chunk) < _READ_SIZE:
                break
        yield from self._frames()

    def _frames(self) -> Iterator[bytes]:
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME:
                self.eof = True  # garbage: stop reading this pipe
                buffer.clear()
                return
            end = start + 4 + size
            if end > len(buffer):
                break
            yield bytes(buffer[start + 4 : end])
            start = end
        del buffer[:start]

    def close(self) -> None:
        self._conn.close()
