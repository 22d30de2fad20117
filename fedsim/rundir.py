"""A run directory's lifecycle: its status file, written atomically, and its metadata.

`status.json` says `running`, `completed` or `failed`. Analysis and sweeps read it, so a run that died
is never taken for a finished one. Files that must never be seen half-written go through
write-to-temporary-then-rename.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
from pathlib import Path

from fedsim.errors import FedsimError, TraceError

__all__ = ["RunStatus", "write_atomic", "write_status", "read_status", "prepare_run_dir"]

STATUS_FILE = "status.json"


class RunStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_status(run_dir: Path, status: RunStatus, **info) -> None:
    body = {"status": status.value, **info}
    write_atomic(run_dir / STATUS_FILE, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


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


def prepare_run_dir(run_dir: Path) -> None:
    """Create `run_dir`; an earlier fedsim run there is replaced, anything else is refused."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise FedsimError(f"{run_dir}: exists and is not a directory")
        if any(run_dir.iterdir()) and not (run_dir / STATUS_FILE).exists():
            raise FedsimError(f"{run_dir}: exists, is not empty and is not a fedsim run directory; "
                              "choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
