"""A run directory's lifecycle: its marker, its lock, its status file, and atomic writes.

A run directory is fedsim's or it is not touched:

- `fedsim-run.json` (the marker) is written when fedsim makes the directory. It holds the marker format,
  the scenario (file name, text, overrides, folder) and the scenario's identity (a hash of the parsed
  scenario with and without its seed). fedsim only ever writes into, resumes or replaces a directory that
  carries a marker, or an empty or new one; anything else is refused and nothing is deleted.
- A lock (`flock` on the directory itself) is held for the life of a run or a resume, so a second writer
  fails at once. A `running` status with no lock held means the process died: the run is *interrupted*
  and can be continued with `fedsim run --resume`.
- `status.json` says `running`, `completed` or `failed`. Analysis and sweeps read it, so a run that died
  is never taken for a finished one. Replacing a run (`--force`, or a sweep redoing a stale run) removes
  only the files fedsim writes; a user's own files in the directory stay.

Every file is written to a temporary name in the same directory, flushed to disk, then renamed, so a
reader (or a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedsim.errors import FedsimError, TraceError

__all__ = ["RunStatus", "RunLock", "write_atomic", "write_status", "read_status", "prepare_run_dir",
           "existing_marker", "open_run_dir", "run_state", "read_marker", "write_marker", "scenario_identity", "resolved_scenario",
           "clear_run_files", "clear_temporaries", "STATUS_FILE", "MARKER_FILE", "FEDSIM_FILES"]

STATUS_FILE = "status.json"
MARKER_FILE = "fedsim-run.json"
MARKER_FORMAT = 1
# Every name fedsim writes into a run directory (temporaries are `.NAME.tmp`); `--force` removes only these,
# in this order: the checkpoint before the journals it points into, the marker last, so a crash while
# clearing leaves a directory that is still recognised as fedsim's.
FEDSIM_FILES = ("checkpoint.pt", "status.json", "events.parquet", "rounds.parquet", "devices.parquet",
                "events.arrows", "rounds.arrows", "devices.arrows", "model.pt", "params.json", "trace.json",
                MARKER_FILE)


class RunStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename; no temporary is left on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_os_error():
            tmp.unlink(missing_ok=True)
        raise


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, OSError)


def write_status(run_dir: Path, status: RunStatus, **info) -> None:
    body = {"status": status.value, **info}
    write_atomic(Path(run_dir) / STATUS_FILE, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / STATUS_FILE
    try:
        body = json.loads(path.read_text())
        RunStatus(body["status"])
    except FileNotFoundError:
        raise TraceError(f"{run_dir}: not a fedsim run directory (no {STATUS_FILE})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: unreadable status file: {exc}") from None
    return body


# -- the marker ----------------------------------------------------------------------------------

def _effective_tree(text: str, overrides) -> dict:
    from fedsim.spec.overrides import apply_overrides

    return apply_overrides(tomllib.loads(text), list(overrides), "<scenario>")


def _digest(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def resolved_scenario(text: str, overrides) -> dict:
    """The scenario as one JSON-able tree: the TOML text with the overrides applied (dates as text)."""
    return json.loads(json.dumps(_effective_tree(text, overrides), default=str))


def scenario_identity(text: str, overrides, ignored: tuple[str, ...] = ()) -> dict[str, str]:
    """Hashes of the parsed scenario (TOML after overrides; comments and layout do not count): `scenario`
    identifies the run exactly, `group` the same scenario with any seed (what analysis aggregates over).
    Fields in `ignored` (dotted paths: fields the run's policy or data set does not read) do not count, so
    `wait` runs written with different deadlines are one scenario."""
    tree = _effective_tree(text, overrides)
    for path in ignored:
        *tables, key = path.split(".")
        node = tree
        for name in tables:
            node = node.get(name, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(key, None)
    unseeded = json.loads(json.dumps(tree, default=repr))
    unseeded.get("run", {}).pop("seed", None)
    return {"scenario": _digest(tree), "group": _digest(unseeded)}


def write_marker(run_dir: Path, scenario, base_dir: Path | None) -> None:
    """Record that fedsim owns `run_dir`, and which scenario it holds (enough to run it again)."""
    from fedsim import __version__

    body = {
        "fedsim_run": MARKER_FORMAT,
        "fedsim_version": __version__,
        "run_name": scenario.run.name,
        "scenario": {"source": scenario.source, "text": scenario.text, "overrides": list(scenario.overrides),
                     "base_dir": None if base_dir is None else str(Path(base_dir).resolve())},
        "identity": scenario_identity(scenario.text, scenario.overrides, scenario.all_ignored),
    }
    write_atomic(Path(run_dir) / MARKER_FILE, (json.dumps(body, indent=2) + "\n").encode())


def read_marker(run_dir: Path) -> dict | None:
    """The marker of `run_dir`, or None if it has none (or not one fedsim wrote)."""
    try:
        body = json.loads((Path(run_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("fedsim_run") != MARKER_FORMAT:
        return None
    scenario = body.get("scenario")
    if not isinstance(scenario, dict) or not isinstance(scenario.get("text"), str):
        return None
    return body


# -- the lock ------------------------------------------------------------------------------------

class RunLock:
    """An exclusive OS lock on a run directory, held until `release` (or the process dies)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FedsimError(f"{self.run_dir}: another fedsim process is writing this run directory"
                                  f"{_pid_note(self.run_dir)}; wait for it to finish or choose another --out") from None
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)         # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_note(run_dir: Path) -> str:
    try:
        pid = read_status(run_dir).get("pid")
    except TraceError:
        return ""
    return "" if pid is None else f" (pid {pid})"


def _is_locked(run_dir: Path) -> bool:
    try:
        RunLock(run_dir).release()
    except FedsimError:
        return True
    return False


@dataclass(frozen=True)
class RunState:
    """What a run directory holds: `completed`, `failed`, `running` (a live process holds its lock),
    `interrupted` (status `running` but no process: resumable), or `empty`."""
    state: str
    status: dict


def run_state(run_dir: Path, lock_held: bool = False) -> RunState:
    """`lock_held`: the caller holds the directory's lock, so a `running` status is stale."""
    run_dir = Path(run_dir)
    try:
        status = read_status(run_dir)
    except TraceError:
        return RunState("empty", {})
    state = status["status"]
    if state == RunStatus.RUNNING.value and (lock_held or not _is_locked(run_dir)):
        state = "interrupted"
    return RunState(state, status)


# -- preparing a directory -----------------------------------------------------------------------

def clear_temporaries(run_dir: Path) -> None:
    """Remove the temporaries a crash may have left (`.NAME.tmp` of fedsim's files)."""
    for name in FEDSIM_FILES:
        path = Path(run_dir) / f".{name}.tmp"
        if path.exists():
            path.unlink(missing_ok=True)


def _foreign(run_dir: Path) -> list[str]:
    """Entries of `run_dir` that are not a temporary of fedsim's (which a crash may leave behind)."""
    temporaries = {f".{name}.tmp" for name in FEDSIM_FILES}
    return [p.name for p in run_dir.iterdir() if p.name not in temporaries]


def clear_run_files(run_dir: Path) -> None:
    """Remove what fedsim wrote into `run_dir` (its files and their temporaries), nothing else."""
    for name in FEDSIM_FILES:
        for path in (run_dir / f".{name}.tmp", run_dir / name):
            if path.exists():
                path.unlink(missing_ok=True)


def _describe(run_dir: Path, marker: dict, state: RunState) -> str:
    rounds = state.status.get("rounds_done")
    source = marker["scenario"].get("source", "?")
    if state.state == "completed":
        return f"holds a completed run of {source}"
    if state.state == "interrupted":
        return f"holds an interrupted run of {source} ({rounds} rounds done); continue it with " \
               f"`fedsim run --resume {run_dir}`"
    return f"holds a {state.state} run of {source}"


def prepare_run_dir(run_dir: Path, force: bool = False) -> RunLock:
    """Make `run_dir` ready for a new run and return its lock (the caller releases it when done).

    A new or empty directory is used as it is. A directory with fedsim's marker holding a failed run is
    replaced; one holding a completed or interrupted run only with `force`. Replacing removes fedsim's
    files only. Anything else (a file, a folder of other files, a run directory of an older format) is
    refused and nothing in it is touched.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FedsimError(f"{run_dir}: exists and is not a directory; choose another --out")
    if run_dir.is_dir() and _foreign(run_dir) and read_marker(run_dir) is None:
        raise FedsimError(f"{run_dir}: exists, is not empty and is not a fedsim run directory "
                          f"(no {MARKER_FILE}); nothing was changed; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        marker = read_marker(run_dir)        # again, under the lock: another process may have made it
        if marker is not None:
            state = run_state(run_dir, lock_held=True)
            if state.state in ("completed", "interrupted") and not force:
                raise FedsimError(f"{run_dir}: {_describe(run_dir, marker, state)}; nothing was changed; "
                                  "give --force to replace it, or choose another --out")
            clear_run_files(run_dir)
        elif _foreign(run_dir):
            raise FedsimError(f"{run_dir}: exists, is not empty and is not a fedsim run directory "
                              f"(no {MARKER_FILE}); nothing was changed; choose another --out")
        clear_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def existing_marker(run_dir: Path) -> dict:
    """The marker of an existing run directory; TraceError if there is no directory or it is not fedsim's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceError(f"{run_dir}: no such run directory")
    marker = read_marker(run_dir)
    if marker is None:
        raise TraceError(f"{run_dir}: not a fedsim run directory (no readable {MARKER_FILE})")
    return marker


def open_run_dir(run_dir: Path) -> tuple[RunLock, dict]:
    """Lock an existing run directory to resume it; returns the lock and the marker."""
    run_dir = Path(run_dir)
    marker = existing_marker(run_dir)
    lock = RunLock(run_dir)
    try:
        clear_temporaries(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, marker
