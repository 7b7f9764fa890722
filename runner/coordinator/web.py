"""The coordinator's HTTP side: Prometheus' /metrics and /healthz, and the dashboard, beside the loop.

One small threaded HTTP server per address (metrics and the dashboard may share one). Its threads
read only `Monitor.published`, the snapshot the loop replaces once a second, and the run's log file
(for a job's trace); they never touch the loop's live structures.

  GET /metrics                  Prometheus text format (metrics.listen)
  GET /healthz                  200 while the loop turns (and after the run ended), 503 when it has not turned for 5 s
  GET /?token=T                 the dashboard page (dashboard.listen); assets under /static/, served from here
  GET /api/state?token=T        the snapshot as JSON (the page polls it about once a second)
  GET /api/trace?job=N&token=T  a job's trace from the run's log, as `runner logs trace N --json` gives it

The dashboard shows payload errors and tracebacks, so like Jupyter it wants a token: `runner start`
prints the URL with it, and `runner status` shows it again to the same user (a file in the run's
private control folder). It is read-only: only GET and HEAD are served.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from runner.config import RunConfig
from runner.coordinator.monitor import Monitor
from runner.errors import UsageError
from runner.wire import zeromq as wire

#: /healthz answers 503 when the loop has not turned for this long
HEALTHY_S = 5.0
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml"}


#: connections served at once (each a thread); more wait in the listen queue. /metrics and /healthz need no
#: token, so anyone who can reach the port could otherwise hold a thread per idle connection for ever
MAX_CONNECTIONS = 32
#: a connection silent this long is closed (a scraper or a browser sends its request at once)
IDLE_S = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], web: Web, metrics: bool, dashboard: bool) -> None:
        self.web = web
        self.metrics = metrics
        self.dashboard = dashboard
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=IDLE_S):  # every slot taken that long: this one is dropped
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a request that failed was answered 500 (or its client left): never a traceback on the run's console


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = IDLE_S

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not the run's events

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        web, server = self.server.web, self.server
        try:
            if url.path == "/healthz":
                ok, text = web.health()
                self._send(200 if ok else 503, text + "\n", "text/plain; charset=utf-8")
            elif url.path == "/metrics" and server.metrics:
                self._send(200, web.metrics_text(), web.metrics_type)
            elif server.dashboard and url.path.startswith("/static/"):
                self._static(url.path.removeprefix("/static/"))
            elif server.dashboard and url.path in ("/", "/index.html", "/api/state", "/api/trace"):
                if not web.token_ok(query.get("token", [""])[0] or self.headers.get("X-Runner-Token", "")):
                    self._send(403, "a token is needed: open the URL `runner start` printed (or `runner status` shows)\n",
                               "text/plain; charset=utf-8")
                elif url.path == "/api/state":
                    self._send(200, web.state_json(), "application/json")
                elif url.path == "/api/trace":
                    self._send(200, json.dumps(web.trace(query.get("job", [""])[0])), "application/json")
                else:
                    self._static("index.html")
            else:
                self._send(404, "not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a request the handlers did not foresee: answered, never the HTTP thread's end
            try:
                self._send(500, f"error: {type(exc).__name__}\n", "text/plain; charset=utf-8")
            except OSError:
                pass

    def do_POST(self) -> None:
        self._send(405, "read-only\n", "text/plain; charset=utf-8")

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _static(self, name: str) -> None:
        try:
            path = (STATIC / name).resolve()
        except (ValueError, OSError):  # a NUL in the name, a loop of links
            path = STATIC
        if path.parent != STATIC or not path.is_file():
            self._send(404, "not found\n", "text/plain; charset=utf-8")
            return
        self._send(200, path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))

    def _send(self, code: int, body: str | bytes, content_type: str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Web:
    """The HTTP servers of one run: bound when made (a taken port is a usage error), served from start()."""

    def __init__(self, run_cfg: RunConfig, monitor: Monitor, log_path: Path) -> None:
        self.monitor = monitor
        self.log_path = log_path
        self.run_id = monitor.run_id
        self.buckets = sorted(run_cfg.metrics.buckets)
        self.linger = run_cfg.metrics.linger
        self.token = secrets.token_urlsafe(18)
        self.metrics_url: str | None = None
        self.dashboard_url: str | None = None
        self.metrics_type = "text/plain; version=0.0.4; charset=utf-8"
        self._registry: Any = None
        self._state_cache: tuple[Any, str] = (None, "null")  #: (the snapshot, its JSON): held, so `is` can tell a new one
        self._state_lock = threading.Lock()
        self._token_file: Path | None = None
        wanted: dict[str, list[str]] = {}
        if run_cfg.metrics.listen:
            wanted.setdefault(run_cfg.metrics.listen, []).append("metrics")
        if run_cfg.dashboard.listen:
            wanted.setdefault(run_cfg.dashboard.listen, []).append("dashboard")
        self.servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        try:
            for listen, roles in wanted.items():
                try:
                    server = _Server(_address(listen), self, "metrics" in roles, "dashboard" in roles)
                except (OSError, ValueError) as exc:
                    what = " and ".join(roles)
                    raise UsageError(f"cannot serve the {what} on {listen}: {getattr(exc, 'strerror', None) or exc} "
                                     "(is another process using that port? pick another, or port 0 for any free one)") from exc
                self.servers.append(server)
                host, port = server.server_address[:2]
                base = f"http://{listen.rpartition(':')[0]}:{port}"
                if server.metrics:
                    self.metrics_url = f"{base}/metrics"
                    self._registry = _registry(self)
                if server.dashboard:
                    self.dashboard_url = f"{base}/?token={self.token}"
        except UsageError:
            self.close()
            raise

    def start(self) -> None:
        """Serve from threads of their own (start them with the loop's signals blocked: they must not take them)."""
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="runner-http", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.dashboard_url:
            self._token_file = token_file(self.run_id)
            fd = os.open(self._token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.dashboard_url + "\n")

    def close(self) -> None:
        for server in self.servers:
            if self._threads:
                server.shutdown()
            server.server_close()
        self.servers = []
        if self._token_file is not None:
            self._token_file.unlink(missing_ok=True)
            self._token_file = None

    def linger_for(self, stop: Any) -> None:
        """Keep serving the final snapshot `metrics.linger` seconds after the run, or until `stop()` is true (a signal)."""
        deadline = time.monotonic() + self.linger
        while time.monotonic() < deadline and not stop():
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    # -- what the handlers serve (server threads) ---------------------------------------------
    def token_ok(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def health(self) -> tuple[bool, str]:
        snapshot = self.monitor.published
        if snapshot is not None and snapshot["run"]["over"]:
            return True, f"ok: run {self.run_id} is over"
        silent = time.monotonic() - self.monitor.turned
        if silent > HEALTHY_S:
            return False, f"unhealthy: the coordinator's loop has not turned for {silent:.1f}s"
        return True, "ok"

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    def state_json(self) -> str:
        """The snapshot for the page, encoded once per snapshot however many pages poll it."""
        snapshot = self.monitor.published
        with self._state_lock:
            if self._state_cache[0] is not snapshot:
                data = None if snapshot is None else {**snapshot, "pools": {
                    pool: {k: v for k, v in info.items() if k != "hist"} for pool, info in snapshot["pools"].items()}}
                self._state_cache = (snapshot, json.dumps(data))
            return self._state_cache[1]

    def trace(self, job: str) -> dict[str, Any]:
        """A job's trace from the run's log: the same reading as `runner logs trace N --json`."""
        from runner.logs.read import Damage, checked, read_lines
        from runner.logs.trace import job_prefilter, trace

        job = job.strip()
        if not (job.isascii() and job.isdigit() and len(job) < 20):
            return {"error": f"not a job id: {job[:40]!r}"}
        job_id = int(job)
        damage = Damage()
        lines = read_lines([self.log_path], damage, job_prefilter(job_id))
        result = trace(checked(lines, damage), job_id, max_steps=500)
        if not result.found:
            return {"job_id": job_id, "error": f"no line mentions job {job_id} in the log yet (with logs.jobs: failures, "
                                               "only failed jobs are logged; logs.jobs: all logs every job)"}
        return {"job_id": result.job_id, "pool": result.pool, "origin": result.origin, "queued": result.queued,
                "outcome": result.outcome, "attempts": [vars(a) for a in result.attempts],
                "steps": [{"timestamp": s.timestamp, "what": s.what, "detail": s.detail} for s in result.steps],
                "dropped_steps": result.dropped_steps}


def token_file(run_id: str) -> Path:
    """Where `runner status` finds the dashboard's URL: beside the run's control socket, readable by its user only."""
    return Path(wire.control_address(run_id).removeprefix("ipc://")).with_suffix(".dashboard")


def _registry(web: Web) -> Any:
    from prometheus_client import CollectorRegistry

    from runner.coordinator.metrics import SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(web.monitor, web.buckets))
    return registry
