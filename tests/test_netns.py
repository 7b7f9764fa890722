"""Separate hosts for real: network namespaces joined by a bridge, the coordinator and each worker host in its own.

Needs root and a working `ip netns` (skipped with the reason otherwise; CI runs as root). Every address is
a 10.x test address that exists only on this machine's own bridge, made here and removed in the fixture's
finally. Latency and loss use `tc ... netem` when the kernel has it; a kernel without sch_netem gets the
same impairment from a userspace link (two TAP devices and a process that delays each frame 100 ms and
drops 5 % of them), so real packets are still delayed and lost under real TCP.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Command, log_events, runner_cli, start_host_run, start_worker, wait_for
from test_multihost import TASKS, config, exactly_once, finish, hosts_of, joined

pytestmark = pytest.mark.timeout(120)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"rnprobe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


REASON = _unavailable()
if REASON:
    pytestmark = [pytestmark, pytest.mark.skip(reason=REASON)]

#: a userspace netem: frames between two TAP devices, each delayed and some dropped (argv: tap_a tap_b delay loss ready)
WIRE = r'''
import fcntl, heapq, os, random, select, struct, sys, time
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
def tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd
a, b = tap(sys.argv[1]), tap(sys.argv[2])
delay, loss = float(sys.argv[3]), float(sys.argv[4])
open(sys.argv[5], "w").close()
other, queue, seq = {a: b, b: a}, [], 0
while True:
    wait = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
    ready, _, _ = select.select([a, b], [], [], wait)
    for fd in ready:
        frame = os.read(fd, 65536)
        if random.random() >= loss:
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, other[fd], frame))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, fd, frame = heapq.heappop(queue)
        try:
            os.write(fd, frame)
        except OSError:
            pass
'''


def sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


class Lab:
    """Hosts on one bridge: each a namespace with one link and a 10.231.N.x/24 address."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.231.{secrets.randbelow(250) + 1}"
        self.bridge = f"rb{self.tag}"
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.wires: list[subprocess.Popen[bytes]] = []
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, address, root-side link)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add(self, name: str, number: int, impaired: tuple[float, float] | None = None) -> str:
        """A host `name` at SUBNET.number; `impaired` = (delay s, loss fraction) on its link, both ways."""
        ns = f"rn{self.tag}{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        outside, inside = f"v{self.tag}h{number}o", f"v{self.tag}h{number}i"
        netem = impaired is not None and netem_works()
        if impaired is None or netem:
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        else:
            ready = self.folder / f"wire-{name}.ready"
            wire = subprocess.Popen([sys.executable, "-c", WIRE, outside, inside, str(impaired[0]), str(impaired[1]), str(ready)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.wires.append(wire)
            wait_for(lambda: ready.exists() or wire.poll() is not None, what="the userspace link")
            assert wire.poll() is None, "the userspace link could not open /dev/net/tun"
        self.links.append(outside)
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "link", "set", outside, "master", self.bridge)
        sh("ip", "link", "set", outside, "up")
        address = f"{self.subnet}.{number}"
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{address}/24", "dev", inside],
                     ["ip", "link", "set", inside, "up"]):
            sh("ip", "netns", "exec", ns, *argv)
        if netem:
            assert impaired is not None
            rule = ["netem", "delay", f"{impaired[0] * 1000:g}ms", "loss", f"{impaired[1] * 100:g}%"]
            sh("tc", "qdisc", "add", "dev", outside, "root", *rule)
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inside, "root", *rule)
        self.hosts[name] = (ns, address, outside)
        return address

    def prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[name][0]]

    def link(self, name: str, up: bool) -> None:
        sh("ip", "link", "set", self.hosts[name][2], "up" if up else "down")

    def reachable(self, source: str, target: str) -> bool:
        """A TCP SYN from `source` to `target` is answered (a refusal counts: the packet got there)."""
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(3)\n"
                 "try:\n    s.connect((sys.argv[1], 9))\nexcept ConnectionRefusedError:\n    pass\n")
        done = subprocess.run([*self.prefix(source), sys.executable, "-c", probe, self.hosts[target][1]], capture_output=True)
        return done.returncode == 0

    def close(self) -> None:
        for wire in self.wires:
            wire.kill()
            wire.wait()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in reversed(self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)


_NETEM: list[bool] = []


def netem_works() -> bool:
    """Whether this kernel has sch_netem (asked once, on a throwaway veth)."""
    if not _NETEM:
        name = f"rnq{secrets.token_hex(2)}"
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        try:
            tried = subprocess.run(["tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms"], capture_output=True)
            _NETEM.append(tried.returncode == 0)
        finally:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    return _NETEM[0]


@pytest.fixture
def lab(tmp_path: Path):
    made = Lab(tmp_path)
    commands: list[Command] = []
    made.commands = commands  # type: ignore[attr-defined]
    try:
        yield made
    finally:
        for command in commands:
            if command.process.poll() is None:
                command.kill_group(signal.SIGKILL)
                command.process.wait(10)
        made.close()


def start(lab: Lab, folder: Path, cfg: dict[str, Any], *args: str) -> Any:
    run = start_host_run(folder, cfg, *args, tasks=TASKS, prefix=lab.prefix("coord"))
    lab.commands.append(run.proc)  # type: ignore[attr-defined]
    wait_for(lambda: log_events(folder, "run.started") or run.process.poll() is not None, what="run.started")
    assert run.process.poll() is None, run.proc.stderr[-3000:]
    return run


def join(lab: Lab, folder: Path, bind: str, name: str, *args: str) -> Command:
    command = start_worker(folder, bind, name, *args, prefix=lab.prefix(name))
    lab.commands.append(command)  # type: ignore[attr-defined]
    return command


def test_partitioned_host_loses_nothing_and_rejoins(lab: Lab, tmp_path: Path) -> None:
    """CURVE on: a worker host whose link goes down mid-run is lost, its jobs run elsewhere, it joins again."""
    coordinator_ip = lab.add("coord", 1)
    lab.add("hostb", 2)
    lab.add("hostd", 3)
    assert lab.reachable("hostb", "coord")
    assert runner_cli("keys", "generate", "keys", "--worker", "hostb", "--worker", "hostd", "--worker", "worker", cwd=tmp_path).returncode == 0
    bind = f"tcp://{coordinator_ip}:5555"
    gate, gate2 = tmp_path / "gate", tmp_path / "gate2"
    cfg = config(n=60, work=0.1, gates=[[0, str(gate)], [30, str(gate2)]])
    cfg["consumers"][0]["params"]["announce"] = True
    run = start(lab, tmp_path, cfg, "--bind", bind, "--keys", "keys")
    workers = [join(lab, tmp_path, bind, name, "--keys", "keys", "--processes", "2") for name in ("hostb", "hostd")]
    joined(tmp_path, "hostb", "hostd")
    # `runner status` across the network, with a worker key the coordinator authorizes
    status = subprocess.run([*lab.prefix("hostd"), sys.executable, "-m", "runner", "status", "--json", "--connect", bind,
                             "--keys", "keys"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert {"hostb", "hostd"} <= set(__import__("json").loads(status.stdout)["hosts"])
    gate.touch()
    wait_for(lambda: log_events(tmp_path, "job.begin", host="hostb"), what="hostb running a job")
    lab.link("hostb", up=False)
    lost = wait_for(lambda: log_events(tmp_path, "host.lost", host="hostb"), what="host.lost hostb")[0]
    assert "heartbeat" in lost["reason"]
    lab.link("hostb", up=True)
    wait_for(lambda: len(log_events(tmp_path, "host.joined", host="hostb")) >= 2, timeout=30, what="hostb joining again")
    gate2.touch()
    finish(run, *workers, timeout=90)
    results = exactly_once(run, 60)
    assert hosts_of(results)["hostd"], hosts_of(results)
    assert "coordinator lost" in workers[0].stderr


def test_latency_and_loss_still_finish(lab: Lab, tmp_path: Path) -> None:
    """100 ms each way and 5 % of packets lost on one worker host's link: every job once, nothing stuck."""
    coordinator_ip = lab.add("coord", 1)
    lab.add("hostb", 2, impaired=(0.1, 0.05))
    lab.add("hostd", 3)
    bind = f"tcp://{coordinator_ip}:5556"
    gate = tmp_path / "gate"
    cfg = config(n=80, work=0.02, gate=gate, heartbeat={"interval": "200ms", "timeout": "3s"})
    run = start(lab, tmp_path, cfg, "--bind", bind, "--insecure")
    workers = [join(lab, tmp_path, bind, name, "--insecure", "--processes", "2") for name in ("hostb", "hostd")]
    joined(tmp_path, "hostb", "hostd", timeout=40)
    gate.touch()
    finish(run, *workers, timeout=90)
    results = exactly_once(run, 80)
    assert hosts_of(results)["hostb"] and hosts_of(results)["hostd"], hosts_of(results)
