"""A sweep's progress on stderr: runs done out of the total, and the runs under way with their round.

On a terminal, one bar whose text lists the runs under way (`salf,0.1,s3 r12`: the run's grid values and seed,
and the rounds it has done). Otherwise plain lines: one per finished or failed run, and the runs under way at
most every `PLAIN_EVERY_S` seconds, so a redirected log has no carriage returns. A failed run is always named
with its error, progress or not.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO
from urllib.parse import unquote

__all__ = ["SweepProgress", "short_id", "PLAIN_EVERY_S"]

PLAIN_EVERY_S = 10.0
_SHOWN = 4             # runs under way named on the bar; the others are counted


def short_id(run_id: str) -> str:
    """`policy.name=salf/policy.deadline_s=0.1/seed=3` -> `salf,0.1,s3`."""
    parts = [unquote(p.split("=", 1)[1]) if "=" in p else p for p in run_id.split("/")]
    parts = ["-" if p == "__HIVE_DEFAULT_PARTITION__" else p for p in parts]
    return ",".join(parts[:-1] + [f"s{parts[-1]}"])


class SweepProgress:
    def __init__(self, name: str, total: int, done: int, enabled: bool, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.name, self.total, self.done = name, total, done
        self.under_way: dict[str, int] = {}
        self._said_at = time.monotonic()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", desc=name, file=self.stream, dynamic_ncols=True)

    def _under_way_text(self) -> str:
        items = [f"{short_id(r)} r{n}" for r, n in self.under_way.items()]
        more = f" +{len(items) - _SHOWN}" if len(items) > _SHOWN else ""
        return ("under way: " + ", ".join(items[:_SHOWN]) + more) if items else ""

    def round_done(self, run_id: str, rounds: int) -> None:
        """A run under way finished round `rounds`."""
        self.under_way[run_id] = rounds
        if self.bar is not None:
            self.bar.set_postfix_str(self._under_way_text())
        elif self.enabled and time.monotonic() - self._said_at >= PLAIN_EVERY_S:
            self._say(f"{self.name}: {self.done}/{self.total} runs; {self._under_way_text()}")

    def run_ended(self, run_id: str, failed_error: str | None = None) -> None:
        self.under_way.pop(run_id, None)
        self.done += 1
        if failed_error is not None:             # said even without progress: it is not progress
            message = f"fedsim: run {run_id} failed: {failed_error}"
            if self.bar is not None:
                self.bar.write(message, file=self.stream)
            else:
                self._say(message)
        if self.bar is not None:
            self.bar.set_postfix_str(self._under_way_text(), refresh=False)
            self.bar.update(1)
        elif self.enabled:
            self._say(f"{self.name}: {self.done}/{self.total} runs ({short_id(run_id)} "
                      f"{'failed' if failed_error else 'done'})")

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._said_at = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
