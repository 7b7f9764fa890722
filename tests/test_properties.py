"""Property-based tests (Hypothesis): the ledger's bookkeeping, and the decoders of every message kind.

Ledger: random sequences of produce, take, report, crash, retry, stop and host loss; after every step each
job is in exactly one state (queued, in flight, waiting for a retry, done, dead) and the counts add up.
Decoders: random and mutated frames for every kind never raise anything but ProtocolError.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from runner.coordinator.ledger import Ledger
from runner.errors import ProtocolError
from runner.wire import host_messages as hm
from runner.wire import messages
from runner.wire import zeromq as wire

POOLS = ["a", "b"]
OWNERS = ["a-1", "a-2", "hostb/a-1", "hostb/b-1", "b-1"]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(POOLS)
        self.done: set[int] = set()
        self.dead: set[int] = set()
        self.produced = 0
        self.held: dict[str, list[int]] = {owner: [] for owner in OWNERS}  #: batch ids each owner holds
        self.clock = 0.0

    @rule(pool=st.sampled_from(POOLS), n=st.integers(1, 40))
    def produce(self, pool: str, n: int) -> None:
        first = self.ledger._next_job
        self.ledger.add(pool, n, messages.repack([{"id": first + i} for i in range(n)]), "prod-1")
        self.produced += n

    @rule(pool=st.sampled_from(POOLS), most=st.integers(1, 50), owner=st.sampled_from(OWNERS))
    def take(self, pool: str, most: int, owner: str) -> None:
        batch = self.ledger.take(pool, most, owner)
        if batch is not None:
            assert batch.n <= most
            self.held[owner].append(batch.id)

    @rule(owner=st.sampled_from(OWNERS), k=st.integers(1, 50), fail=st.booleans())
    def report(self, owner: str, k: int, fail: bool) -> None:
        if not self.held[owner]:
            return
        batch = self.ledger.in_flight[self.held[owner][0]]
        done = min(batch.n, batch.done + k)
        newly = self.ledger.settle(batch, done)
        for index in newly:
            job_id = batch.job_id(index)
            if fail and index == newly.start:  # the first settles as a failure: retried (or dead at attempt 3)
                from runner.coordinator.ledger import Job

                job = Job(job_id, batch.pool, batch.attempt(index), batch.payload(index), batch.origin)
                self._fail(job)
            else:
                self.done.add(job_id)
        if done >= batch.n:
            self.held[owner].pop(0)

    def _fail(self, job: Any) -> None:
        if job.attempt >= 3:
            self.dead.add(job.id)
        else:
            job.attempt += 1
            self.clock += 0.001
            self.ledger.schedule_retry(job, self.clock + 1.0)

    @rule(owner=st.sampled_from(OWNERS), charge=st.booleans())
    def crash(self, owner: str, charge: bool) -> None:
        """A process dies: the job in hand (the first unsettled one) is charged, the rest go back untouched."""
        charged, requeue = None, []
        for batch_id in self.held[owner]:
            batch = self.ledger.in_flight.get(batch_id)
            if batch is None:
                continue
            jobs = self.ledger.release(batch)
            if charge and charged is None and jobs:
                charged, jobs = jobs[0], jobs[1:]
            requeue += jobs
        self.held[owner] = []
        if requeue:
            self.ledger.regroup(requeue, front=True)
        if charged is not None:
            self._fail(charged)

    @rule(host=st.sampled_from(["hostb"]))
    def host_lost(self, host: str) -> None:
        for owner in OWNERS:
            if owner.startswith(f"{host}/"):
                self.crash(owner, charge=False)

    @rule(later=st.floats(0, 5))
    def retry(self, later: float) -> None:
        self.clock += later
        due = self.ledger.due_retries(self.clock)
        if due:
            self.ledger.regroup(due, front=True)

    @precondition(lambda self: self.produced > 0)
    @rule()
    def stop(self) -> None:
        """What a stop writes as pending: every unsettled job once, none done or dead; the run is then over."""
        pending = self.ledger.unsettled()
        ids = [job.id for job in pending]
        assert len(ids) == len(set(ids))
        assert not set(ids) & (self.done | self.dead)
        assert set(ids) | self.done | self.dead == set(range(1, self.produced + 1))
        # unsettled() releases what is in flight: start over with a fresh ledger
        self.__init__()  # type: ignore[misc]

    @invariant()
    def every_job_in_exactly_one_state(self) -> None:
        ledger = self.ledger
        queued = [batch.job_id(i) for pool in POOLS for batch in ledger.pending[pool] for i in range(batch.n)]
        flying = [batch.job_id(i) for batch in ledger.in_flight.values() for i in range(batch.done, batch.n)]
        waiting = [job.id for _, _, job in ledger.retries]
        states = [queued, flying, waiting, sorted(self.done), sorted(self.dead)]
        every = [job_id for state in states for job_id in state]
        assert len(every) == len(set(every)), "a job in two states"
        assert set(every) == set(range(1, self.produced + 1)), "a job lost"
        assert ledger.produced == self.produced
        assert sum(ledger.pending_jobs.values()) == len(queued)
        assert ledger.in_flight_jobs == len(flying)
        assert ledger.settled() == (not queued and not flying and not waiting)
        for pool in POOLS:  # payloads travel with their ids, whatever was split, released or regrouped
            for batch in ledger.pending[pool]:
                assert [batch.payload(i)["id"] for i in range(batch.n)] == [batch.job_id(i) for i in range(batch.n)]


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


# -- decoders --------------------------------------------------------------------------------
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5) | st.integers(0, 500), inner, max_size=5),
    max_leaves=20,
)
LOCAL_KINDS = sorted(messages.KNOWN_KINDS)
HOST_KINDS = sorted(hm.KINDS)


def _valid_local(kind: int) -> list[Any]:
    blob = msgpack.packb([{"i": 1}, {"i": 2}], use_bin_type=True)
    return {
        messages.READY: [messages.READY, 12],
        messages.BATCH: [messages.BATCH, "work", 2, blob],
        messages.INVALID: [messages.INVALID, "error", "repr"],
        messages.END: [messages.END, "ok", 3, None, None],
        messages.REPORT: [messages.REPORT, 7, 2, [[0, {"r": 1}]], [[1, "E", "tb", 1.5]], [["work", 2, blob]], {12: 2}],
        messages.LOG: [messages.LOG, {"event": "x", "level": "info"}],
        messages.LOCK: [messages.LOCK, "acquire", "name", 1],
        messages.FATAL: [messages.FATAL, "error", "tb"],
        messages.PROGRESS: [messages.PROGRESS, 7, 0, {"rows": 1200, "of": 5000}],
        messages.TOTAL: [messages.TOTAL, 5000],
        messages.JOBS: [messages.JOBS, 7, 1, 2, None, None, blob, "prod-1"],
        messages.CREDIT: [messages.CREDIT, 10],
        messages.GRANT: [messages.GRANT, "name", 1],
        messages.STOP: [messages.STOP, "done"],
    }[kind]


def _decode_local(data: bytes) -> None:
    for decode in (messages.decode_from_process, messages.decode_to_process):
        try:
            decode(data)
        except ProtocolError:
            pass


def _mutate(data: bytes, draw: Any) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if op == "cut":
            buf = buf[: draw(st.integers(0, len(buf)))]
        elif op == "insert":
            at = draw(st.integers(0, len(buf)))
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif buf:
            at = draw(st.integers(0, len(buf) - 1))
            if op == "flip":
                buf[at] = draw(st.integers(0, 255))
            else:
                del buf[at]
    return bytes(buf)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(LOCAL_KINDS), data=st.data())
def test_local_decoders_raise_only_protocol_error(kind: int, data: Any) -> None:
    valid = messages.pack(_valid_local(kind))
    for decode in (messages.decode_from_process, messages.decode_to_process):
        try:
            decode(valid)
        except ProtocolError:
            pass
    _decode_local(_mutate(valid, data.draw))
    fields = data.draw(st.lists(values, max_size=8))
    _decode_local(msgpack.packb([kind, *fields], use_bin_type=True))
    _decode_local(data.draw(st.binary(max_size=64)))


def _valid_host(kind: int) -> list[bytes]:
    fields: dict[int, list[Any]] = {
        hm.HELLO: ["hostb", ["work"], 2, 123, None],
        hm.WELCOME: ["run-1", "run", "hostb", {"work": {"task": "t:f"}}, {"interval": 1.0, "timeout": 5.0}, "fork"],
        hm.REFUSE: ["no"], hm.SPAWN: ["work-1", "work", "consumer", 1, 0, {"task": "t:f"}], hm.TO: ["work-1"],
        hm.SIGNAL: ["work-1", 15, "stop"], hm.FWD: ["work-1"], hm.EXITED: ["work-1", 0, None, "done", None, None],
        hm.HEARTBEAT: [{"work-1": {"rss": 1 << 20, "running": [7, 0], "running_s": 1.5}}], hm.BYE: ["bye"], hm.RESET: ["again"],
        hm.STATUS: [{"stacks": True}], hm.STOP_RUN: [], hm.REPLY: [{"ok": True}],
        hm.STALLED: ["work-1", [7, 0], 12.5, 12.0, 10.0, "warn", "File x, line 1"], hm.STACKS: [3],
        hm.STACK_DUMPS: [3, {"work-1": {"pid": 99, "pool": "work", "running": [7, 0], "running_s": 1.5, "rss": 1 << 20,
                                        "stack": "File x, line 1"}}],
    }
    parts = [wire.header(kind, 1, *fields[kind])]
    if kind in hm.WITH_FRAME:
        parts.append(messages.pack([messages.CREDIT, 1]))
    return parts


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_every_valid_host_message_parses(kind: int) -> None:
    assert wire.parse(_valid_host(kind)).kind == kind


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(HOST_KINDS), data=st.data())
def test_host_parser_raises_only_protocol_error(kind: int, data: Any) -> None:
    parts = _valid_host(kind)
    candidates = [
        [_mutate(parts[0], data.draw), *parts[1:]],
        [msgpack.packb([hm.PROTOCOL_VERSION, kind, data.draw(values), *data.draw(st.lists(values, max_size=8))], use_bin_type=True)],
        data.draw(st.lists(st.binary(max_size=48), max_size=3)),
    ]
    for candidate in candidates:
        try:
            wire.parse(candidate)
        except ProtocolError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=150_000), max_size=12), cuts=st.lists(st.integers(1, 200_000), max_size=30))
def test_frames_cross_a_real_pipe_whole_and_in_order(frames: list[bytes], cuts: list[int]) -> None:
    """A process's frames, written in pieces of any size (a partial write, a torn read), come out of the
    coordinator's reader whole and in order, however the reads fall (each read fills a buffer kept for it)."""
    import multiprocessing
    import os
    import select
    import threading

    from runner.wire.pipe import FrameReader

    receive, send = multiprocessing.Pipe(duplex=False)
    stream = b"".join(len(frame).to_bytes(4, "big") + frame for frame in frames)
    pieces, start = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[start:start + cut])
        start += cut
    fd = send.fileno()

    def write() -> None:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        send.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    reader = FrameReader(receive)
    got: list[bytes] = []
    while not reader.eof:
        select.select([reader.fd], [], [], 10)
        got.extend(reader.read())
    writer.join(10)
    reader.close()
    assert got == frames
