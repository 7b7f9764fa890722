"""`runner resume` and `runner retry`: a run's journal read back, checked, and handed to a coordinator.

Refusals are one paragraph and exit 2 (the run is alive; its pools changed; a replayed producer's
params changed); a run that had finished already says so and exits 0.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from runner.config import Config, config_from_data, load_config
from runner.coordinator import journal as J
from runner.coordinator.resume import DeadFileState, JournalState, load
from runner.errors import UsageError
from runner.logs.runs import first_line, tail_lines

#: the statuses of a run whose coordinator ended it for good (`stopped` and `crashed` runs resume)
FINISHED = ("finished", "failed")
_STAMP = re.compile(r"-(\d{8}T\d{6}Z)-[0-9a-f]+\Z")


def _journals(logs_dir: Path, name: str | None = None) -> list[Path]:
    """Journals in a folder, newest first (by the stamp in the run id)."""
    if not logs_dir.is_dir():
        return []
    found = [p for p in logs_dir.glob("*.journal") if name is None or _run_name(p.name.removesuffix(".journal")) == name]

    def stamp(path: Path) -> str:
        match = _STAMP.search(path.name.removesuffix(".journal"))
        return match.group(1) if match else ""

    return sorted(found, key=lambda p: (stamp(p), p.stat().st_mtime), reverse=True)


def _run_name(run_id: str) -> str:
    match = _STAMP.search(run_id)
    return run_id[: match.start()] if match else run_id


def _refuse_alive(path: Path) -> None:
    if J.is_alive(path):
        run_id = path.name.removesuffix(".journal")
        raise UsageError(f"run {run_id} is still running (its coordinator holds {path}): nothing to resume. "
                         f"`runner status {run_id}` shows it; `runner stop {run_id}` stops it.")


def latest_unfinished(logs_dir: Path, name: str) -> JournalState | None:
    """The newest run of `name` whose coordinator did not end it (a crash, a kill, a stop)."""
    for path in _journals(logs_dir, name):
        _refuse_alive(path)
        state = load(path)
        if state.finished not in FINISHED:
            return state
        return None  # the newest run finished: nothing to resume
    return None


def resumable(cfg: Config) -> JournalState | None:
    """`runner start --config X --resume`: the newest unfinished run of the config's name, checked against it."""
    state = latest_unfinished(Path(cfg.run.logs.dir), cfg.run.name)
    if state is not None:
        check_against(state, cfg)
    return state


def check_against(state: JournalState, cfg: Config) -> None:
    """The config a resume will run must keep the run's name and results file, the journal's pools, and each
    replayed producer's task and params."""
    _keeps(state, "name", state.config.get("name"), cfg.run.name)
    _keeps(state, "results", state.config.get("results"), cfg.run.results)
    old = {p["name"]: role for role in ("producers", "consumers") for p in state.config[role]}
    new = {p.name: ("producers" if p in cfg.run.producers else "consumers") for p in cfg.run.all_pools()}
    if old != new:
        gone = sorted(set(old) - set(new))
        added = sorted(set(new) - set(old))
        moved = sorted(name for name in set(old) & set(new) if old[name] != new[name])
        parts = [f"removed or renamed: {', '.join(gone)}" if gone else "", f"new: {', '.join(added)}" if added else "",
                 f"changed role: {', '.join(moved)}" if moved else ""]
        raise UsageError(f"cannot resume run {state.run_id}: its pools no longer match the config "
                         f"({'; '.join(p for p in parts if p)}). The journal's jobs belong to the pools it names.")
    for producer in state.config["producers"]:
        keys = [f"{producer['name']}-{i}" for i in range(1, producer.get("processes", 1) + 1)]
        if all(state.ended.get(key) not in (None, "stopped") for key in keys):
            continue  # it had ended: it will not run again, its params may change
        now = cfg.run.pool(producer["name"])
        for field in ("task", "params", "processes"):
            if getattr(now, field) != producer.get(field, 1 if field == "processes" else None):
                raise UsageError(f"cannot resume run {state.run_id}: producer {producer['name']!r} is replayed from where it "
                                 f"stopped, so its {field} cannot change ({producer.get(field)!r} in the journal, "
                                 f"{getattr(now, field)!r} now)")


def config_of(state: JournalState, overrides: list[str], logs_dir: Path) -> Config:
    """The run's config as journaled (the file may have moved or changed), with `--set` on top."""
    data = copy.deepcopy(state.config)
    data.setdefault("logs", {})["dir"] = str(logs_dir)  # where the journal was found is where the run's files are
    cfg = config_from_data(data, overrides, state.config_path or "(journal)", state.base_dir)
    _keeps(state, "logs.dir", str(logs_dir), str(cfg.run.logs.dir))
    check_against(state, cfg)
    return cfg


def _keeps(state: JournalState, key: str, journaled: object, now: object) -> None:
    """Where the run's files are is the run's identity: its journal's offsets belong to those files."""
    if journaled != now:
        raise UsageError(f"cannot resume run {state.run_id} with {key} changed ({journaled!r} in the journal, {now!r} now): "
                         "a resumed run keeps its name and its files. `--set` may change processes, timeouts, retries "
                         "and the like")


def _journal_of(run_id: str | None, last: str | None, logs_dir: Path) -> Path | None:
    if run_id and last:
        raise UsageError("give a RUN_ID or --last NAME, not both")
    if last:
        journals = _journals(logs_dir, last)
        for path in journals:
            _refuse_alive(path)
            if load(path).finished not in FINISHED:
                return path
        if journals:
            return None
        raise UsageError(f"no run named {last!r} with a journal in {logs_dir}/")
    if not run_id:
        raise UsageError("which run? give a RUN_ID (see `runner runs`) or --last NAME")
    path = J.journal_path(logs_dir, run_id)
    if not path.exists():
        log = logs_dir / f"{run_id}.jsonl"
        why = "it ran with `journal: false`" if log.exists() else "no such run there"
        raise UsageError(f"no journal {path} ({why}): nothing to resume")
    return path


def to_resume(run_id: str | None, last: str | None, logs_dir: Path, overrides: list[str]) -> tuple[JournalState | None, str]:
    """The journal of the run to resume, read and checked; (None, why) when there is nothing to do."""
    path = _journal_of(run_id, last, logs_dir)
    if path is None:
        return None, f"the newest run named {last} finished already: nothing to resume"
    _refuse_alive(path)
    state = load(path)
    if state.finished in FINISHED:
        hint = f"; `runner retry {state.run_id}` re-runs its {len(state.dead)} dead job(s)" if state.dead else ""
        return None, f"run {state.run_id} finished already ({state.finished}): nothing to resume{hint}"
    config_of(state, overrides, logs_dir)  # refusals (pools, a replayed producer's params) before anything starts
    return state, ""


def _dead_lines(path: Path) -> dict[int, dict[str, Any]]:
    lines: dict[int, dict[str, Any]] = {}
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict) and isinstance(line.get("job_id"), int):
                lines[line["job_id"]] = line
    return lines


def _without_journal(run_id: str, logs_dir: Path) -> DeadFileState:
    """A `journal: false` run, for `runner retry`: its config read again from the file its log names, its
    dead jobs (payloads included) from its dead file, its counts from its last `run.finished`."""
    log = logs_dir / f"{run_id}.jsonl"
    start = first_line(log)
    finished: dict[str, Any] | None = None
    for fields in tail_lines(log):  # backwards: a run.finished before any (re)start means it finished
        if fields.get("event") == "run.finished":
            finished = fields
            break
        if fields.get("event") in ("run.resumed", "run.started"):
            break
    if start is None or start.get("event") != "run.started":
        raise UsageError(f"run {run_id}: its log {logs_dir / f'{run_id}.jsonl'} has no run.started: nothing to retry")
    if finished is None or finished.get("status") not in FINISHED:
        how = "did not finish (its coordinator died, or it still runs)" if finished is None else f"was {finished.get('status')}"
        raise UsageError(f"run {run_id} {how}, and it ran with `journal: false`, so it cannot be resumed; "
                         f"`runner retry` re-runs the dead jobs of a finished run only. The unfinished jobs of a stopped "
                         f"or crashed run are in {logs_dir / f'{run_id}.pending.jsonl'}, if it could write them.")
    config_path = str(start.get("config") or "")
    try:
        cfg = load_config(config_path)
    except UsageError as exc:
        raise UsageError(f"run {run_id} ran with `journal: false`, so `runner retry` reads its config again from the "
                         f"file its log names: {exc}") from exc
    state = DeadFileState(J.journal_path(logs_dir, run_id), run_id=run_id, name=cfg.run.name,
                          config={**cfg.run.model_dump(mode="json"), "journal": False},
                          config_path=str(cfg.path), base_dir=cfg.base_dir, finished=str(finished["status"]))
    consumers = {c.name for c in cfg.run.consumers}
    for job_id, line in _dead_lines(logs_dir / f"{run_id}.dead.jsonl").items():
        pool, attempts = line.get("pool"), line.get("attempts")
        if not isinstance(pool, str) or not isinstance(attempts, int):
            continue  # not a line the runner wrote
        if pool not in consumers:
            raise UsageError(f"cannot retry run {run_id}: its dead job {job_id} belongs to pool {pool!r}, which its "
                             f"config {cfg.path} no longer has")
        state.dead[job_id] = (pool, attempts)
        state.payloads[job_id] = (pool, str(line.get("origin") or "retry"), line.get("payload"))
    pools = finished.get("pools")
    pools = pools if isinstance(pools, dict) else {}
    state.done = {pool: int(info.get("done", 0)) for pool, info in pools.items() if isinstance(info, dict)}
    produced = finished.get("produced")
    state._grow(max([produced if isinstance(produced, int) else 0, *state.dead]))  # ids the rerun's new jobs (emitted ones) must not reuse
    return state


def to_retry(run_id: str, jobs: list[int], error: str | None, logs_dir: Path) -> tuple[JournalState, dict[int, int], str]:
    """(the run's journal, or its dead file's stand-in; dead job id -> attempts made; a listing) for `runner retry`."""
    if not J.journal_path(logs_dir, run_id).exists() and (logs_dir / f"{run_id}.jsonl").exists():
        state: JournalState = _without_journal(run_id, logs_dir)
    else:
        path = _journal_of(run_id, None, logs_dir)
        assert path is not None
        _refuse_alive(path)
        state = load(path)
    if state.finished not in FINISHED:
        raise UsageError(f"run {run_id} did not finish (its coordinator died or was stopped): `runner resume {run_id}` first")
    lines = _dead_lines(logs_dir / f"{run_id}.dead.jsonl")
    try:
        pattern = re.compile(error) if error else None
    except re.error as exc:
        raise UsageError(f"--error {error!r}: not a regular expression: {exc}") from exc
    chosen = {job_id: attempts for job_id, (_pool, attempts) in sorted(state.dead.items())
              if attempts > 0 and (not jobs or job_id in jobs)
              and (pattern is None or pattern.search(str(lines.get(job_id, {}).get("error", ""))))}
    if not chosen:
        return state, chosen, f"run {run_id}: no dead job to re-run" + (" matches" if jobs or error else "")
    listing = [f"job {job_id} ({state.dead[job_id][0]}): {attempts} attempt(s), "
               f"{lines.get(job_id, {}).get('error', '(error not in the dead file)')}" for job_id, attempts in chosen.items()]
    listing.append(f"{len(chosen)} job(s) would run again")
    return state, chosen, "\n".join(listing)
