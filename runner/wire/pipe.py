"""Point-to-point channels between the coordinator and one local process.

Each process gets two pipes of its own (multiprocessing.Pipe): one to the coordinator and one inbox
from it, so no lock is shared between processes: a process SIGKILLed in the middle of a write can
only tear its own pipe, which the coordinator reads without blocking and discards at the process's
death. (A multiprocessing.Queue shared by many writers would be left locked and corrupt: the standard
library documents this.) The coordinator never blocks on a pipe either: what a full inbox cannot
take waits in an outbox until the pipe is writable; credit keeps that small.

Why not a multiprocessing.Queue per inbox: measured, its feeder thread (a lock, a notify and a GIL
hand-off per put) took over half of the coordinator's time at 1 M jobs/s.

Frames on a pipe are a 4-byte big-endian length and a msgpack message (runner.wire.messages).
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection

from runner.wire.messages import MAX_FRAME

_HEADER = struct.Struct("!I")
#: what one read takes, into a buffer each reader keeps: os.read(fd, 1 MB) allocated (mmap), shrank
#: (mremap) and freed (munmap) a fresh 1 MB for every read, three system calls and a TLB shoot-down
#: across the coordinator's threads per batch
_READ_SIZE = 1 << 16
_F_SETPIPE_SZ = 1031  # Linux: grow a pipe's buffer, so a batch rarely has to wait in the outbox
PIPE_SIZE = 1 << 20


def take_frames(buffer: bytearray) -> list[bytes] | None:
    """Cut every complete frame off the front of `buffer` (a torn tail stays); None if it holds garbage."""
    frames = []
    start = 0
    with memoryview(buffer) as view:  # one copy per frame (a bytearray slice, then bytes(), made two)
        while len(view) - start >= 4:
            (size,) = _HEADER.unpack_from(view, start)
            if size > MAX_FRAME:
                return None
            end = start + 4 + size
            if end > len(view):
                break
            frames.append(bytes(view[start + 4 : end]))
            start = end
    del buffer[:start]
    return frames


def grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for this user: the default size works, just with more waits


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
        self._chunk = memoryview(bytearray(_READ_SIZE))
        self.eof = False

    def read(self) -> Iterator[bytes]:
        """Every complete frame that can be read now, without blocking."""
        while True:
            try:
                size = os.readv(self.fd, [self._chunk])
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not size:
                self.eof = True
                break
            self._buffer += self._chunk[:size]
            if size < _READ_SIZE:
                break
        frames = take_frames(self._buffer)
        if frames is None:
            self.eof = True  # garbage: stop reading this pipe
            self._buffer.clear()
            return
        yield from frames

    def close(self) -> None:
        self._conn.close()


class FrameSender:
    """The coordinator side of an inbox: never blocks; what the pipe cannot take now waits in `outbox`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        grow_pipe(self.fd)
        self.outbox = bytearray()
        self.broken = False

    def send(self, frame: bytes) -> bool:
        """Queue a frame; True if some of it is still waiting for the pipe (the caller watches for POLLOUT)."""
        if self.broken:
            return False
        data = _HEADER.pack(len(frame)) + frame
        if self.outbox:
            self.outbox += data
            return True
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        except OSError:  # the process is gone; its exit is handled where its sentinel fires
            self.broken = True
            return False
        if written < len(data):
            self.outbox += data[written:]
            return True
        return False

    def flush(self) -> bool:
        """Write what waits; True while something still does."""
        if self.broken or not self.outbox:
            return False
        try:
            written = os.write(self.fd, self.outbox)
        except BlockingIOError:
            return True
        except OSError:
            self.broken = True
            self.outbox.clear()
            return False
        del self.outbox[:written]
        return bool(self.outbox)

    def close(self) -> None:
        self._conn.close()


class FrameReceiver:
    """The process side of an inbox: whole frames, with a timeout."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._fd = conn.fileno()
        self._buffer = bytearray()
        self._chunk = memoryview(bytearray(_READ_SIZE))
        self._ready: deque[bytes] = deque()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def get(self, timeout: float | None) -> bytes | None:
        """The next frame, or None after `timeout` seconds (None: wait for ever). EOFError if the coordinator is gone."""
        while not self._ready:
            if not self._poll.poll(None if timeout is None else int(timeout * 1000)):
                return None
            size = os.readv(self._fd, [self._chunk])
            if not size:
                raise EOFError("the coordinator closed this process's inbox")
            self._buffer += self._chunk[:size]
            frames = take_frames(self._buffer)
            if frames is None:
                raise EOFError("garbage in this process's inbox")
            self._ready.extend(frames)
        return self._ready.popleft()
