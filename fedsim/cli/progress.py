"""Progress on stderr from the first second: the phase under way (reading the scenario, loading data and
building the model and fleet), then the rounds.

On a terminal, phases overwrite one status line and the rounds are a progress bar. Otherwise (a log file, a
pipe, a batch job) there are no phase lines, and the rounds are plain lines, at most one per `PLAIN_EVERY_S`
seconds of wall time plus the last, so a redirected log has no carriage returns, stays short, and an error is
still the one line it would be without progress.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO

__all__ = ["Progress", "PLAIN_EVERY_S"]

PLAIN_EVERY_S = 10.0

RoundFn = Callable[[int, float, "float | None"], None]


class Progress:
    """The progress of one `fedsim run` (nothing at all when `quiet`)."""

    def __init__(self, name: str, quiet: bool = False, stream: TextIO | None = None):
        self.name = name
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._status = False

    def phase(self, text: str) -> None:
        """The step under way, e.g. "loading data, building the model and the fleet"."""
        if self.quiet:
            return
        if self.tty:
            self.stream.write(f"\r\033[K{self.name}: {text}...")
            self.stream.flush()
            self._status = True

    def notice(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(f"fedsim: notice: {text}\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False

    @contextlib.contextmanager
    def rounds(self, total: float | None, unit: str = "round", budget_s: float | None = None) -> Iterator[RoundFn | None]:
        """A callback `(rounds done, simulated s, last accuracy)` for the run; with `budget_s` (asynchronous
        runs) progress is counted in simulated seconds out of the budget."""
        if self.quiet:
            yield None
            return
        self._clear()
        if self.tty:
            from tqdm import tqdm

            with tqdm(total=total, unit=unit, desc=self.name, file=self.stream, dynamic_ncols=True) as bar:
                def update(done: int, sim_s: float, acc: float | None) -> None:
                    bar.set_postfix_str(_state(sim_s, acc), refresh=False)
                    bar.update((min(sim_s, budget_s) if budget_s is not None else done) - bar.n)

                yield update
            return
        last = {"at": time.monotonic(), "line": ""}

        def plain(done: int, sim_s: float, acc: float | None) -> None:
            of = "" if total is None else f"/{total:g}"
            count = f"{min(sim_s, budget_s):.1f}{of} sim s" if budget_s is not None else f"{unit} {done}{of}"
            last["line"] = f"{self.name}: {count}, {_state(sim_s, acc)}"
            now = time.monotonic()
            if now - last["at"] >= PLAIN_EVERY_S:
                self.stream.write(last["line"] + "\n")
                self.stream.flush()
                last["at"], last["line"] = now, ""

        yield plain
        if last["line"]:
            self.stream.write(last["line"] + "\n")
            self.stream.flush()


def _state(sim_s: float, acc: float | None) -> str:
    return f"sim {sim_s:.1f}s" + ("" if acc is None else f" acc {acc:.3f}")
