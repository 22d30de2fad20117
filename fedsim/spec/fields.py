"""Typed reading of one TOML table, with errors that name the file, the field path and the bad value.

Every scenario section is read through a `Fields` view; a view remembers which keys were read so
unknown keys (usually typos) are reported instead of silently ignored.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Iterable

from fedsim.errors import ScenarioError

__all__ = ["Fields", "MISSING", "printable", "show_key"]

_SHOW_CHARS = 120      # a value quoted in a message is cut to this many characters


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def printable(text: str) -> str:
    """`text` on one line: control characters, line separators and lone surrogates escaped, so that a
    message quoting a hostile name or value stays one line on stderr."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


def _cut(text: str) -> str:
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}... ({len(text)} characters)"


def _show_int(value: int) -> str:
    """An integer for a message: huge ones (str() refuses more than 4300 digits) by their size."""
    if abs(value) < 10**30:
        return str(value)
    return f"{'-' if value < 0 else ''}an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return _show_int(value)
    if isinstance(value, str):
        return _cut(printable(repr(value)))
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        if len(value) > 4:
            return f"a list of {len(value)} items"
        return _cut("[" + ", ".join(_show(v) for v in value) + "]")
    return _cut(printable(repr(value)))


def show_key(key: str) -> str:
    """A table key as written in a field path: bare if it is a TOML bare key, else quoted and escaped."""
    if key and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in key):
        return key
    return '"' + _cut(printable(key.replace("\\", "\\\\").replace('"', '\\"'))) + '"'


class Fields:
    """A read-only view of one TOML table at `path` inside `source`."""

    # When a set: every field path read (present or not) is added to it; the scenario reference's test
    # (tests/test_reference.py) collects the fields the readers know this way.
    seen: set[str] | None = None

    def __init__(self, table: Any, source: str, path: str):
        if not isinstance(table, dict):
            raise ScenarioError(source, path, f"must be a table, got {_show(table)}")
        self.table = table
        self.source = source
        self.path = path
        self._read: set[str] = set()

    # -- plumbing ---------------------------------------------------------------------------------
    def field(self, key: str) -> str:
        key = show_key(key)
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ScenarioError:
        return ScenarioError(self.source, self.field(key), message)

    def has(self, key: str) -> bool:
        return key in self.table

    def read_keys(self) -> frozenset[str]:
        """The keys read so far (present or not)."""
        return frozenset(self._read)

    def _typo_of(self, key: str, candidates: Iterable[str]) -> str | None:
        close = difflib.get_close_matches(key, [c for c in candidates if isinstance(c, str)], n=1, cutoff=0.75)
        return close[0] if close else None

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self._read.add(key)
        if Fields.seen is not None:
            Fields.seen.add(self.field(key))
        if key not in self.table:
            if default is MISSING:
                typo = self._typo_of(key, set(self.table) - self._read)
                hint = f" ({self.field(typo)} is given: a typo?)" if typo is not None else ""
                raise self.error(key, f"missing required field{hint}")
            return default
        return self.table[key]

    def sub(self, key: str, default_empty: bool = False) -> "Fields":
        value = self.raw(key, {} if default_empty else MISSING)
        return Fields(value, self.source, self.field(key))

    def sub_list(self, key: str) -> list["Fields"]:
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise self.error(key, f"must be a non-empty list of tables, got {_show(value)}")
        return [Fields(item, self.source, f"{self.field(key)}[{i}]") for i, item in enumerate(value)]

    def ignored_or_unknown(self, own: Iterable[str], others: Callable[[], Iterable[str]],
                           reader: str) -> tuple[str, ...]:
        """The keys not read here that `others()` (the fields other policies or data sets read; asked only when a
        key is left unread, as it may import them all) read, as field paths; any other unread key is an error
        naming the closest known field. `own`: the keys `reader` may read."""
        unread = sorted(set(self.table) - self._read)
        if not unread:
            return ()
        own, others = set(own) | self._read, set(others())
        ignored = []
        for key in unread:
            if key in others:
                ignored.append(self.field(key))
                continue
            close = self._typo_of(key, own | others)
            hint = f"did you mean {self.field(close)}? " if close is not None else ""
            raise self.error(key, f"unknown field; {hint}({reader} reads: {', '.join(sorted(own))})")
        self._read.update(self.table)
        return tuple(ignored)

    def finish(self) -> None:
        """Reject keys nobody read: a misspelt field must not be ignored silently."""
        unknown = sorted(set(self.table) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            close = self._typo_of(unknown[0], self._read)
            hint = f"did you mean {self.field(close)}? " if close is not None else ""
            raise self.error(unknown[0], f"unknown field; {hint}(known fields here: {known})")

    # -- typed readers ----------------------------------------------------------------------------
    def integer(self, key: str, default: Any = MISSING, *, low: int | None = None,
                high: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                value = int(value)
            else:
                raise self.error(key, f"must be an integer, got {_show(value)}")
        if low is not None and value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise self.error(key, f"must be {what}, got {_show_int(value)}")
        if high is not None and value > high:
            raise self.error(key, f"must be at most {high}, got {_show_int(value)}")
        return value

    def number(self, key: str, default: Any = MISSING, *, low: float | None = None,
               high: float | None = None, low_open: bool = False) -> float:
        value = self.raw(key, default)
        return self.check_number(key, value, low=low, high=high, low_open=low_open)

    def check_number(self, key: str, value: Any, *, low: float | None = None,
                     high: float | None = None, low_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise self.error(key, f"must be a finite number, got {_show(value)}") from None
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value}")
        if low is not None and (value <= low if low_open else value < low):
            raise self.error(key, f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and value > high:
            raise self.error(key, f"must be <= {high:g}, got {value:g}")
        return value

    def optional_number(self, key: str, **limits: Any) -> float | None:
        if self.raw(key, None) is None:
            return None
        return self.number(key, **limits)

    def string(self, key: str, default: Any = MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {_show(value)}")
        return value

    def choice(self, key: str, options: Iterable[str], default: Any = MISSING) -> str:
        options = tuple(options)
        value = self.raw(key, default)
        if value not in options:
            raise self.error(key, f"must be one of {', '.join(options)}; got {_show(value)}")
        return value

    def existing_path(self, key: str, base_dir: Path | None, *, kind: str, what: str, default: Any = MISSING) -> Path | None:
        """A path as written (relative to the working directory), else relative to the scenario's folder,
        so shipped scenarios run from any directory. `kind` is "file" or "dir"; None if absent."""
        if self.raw(key, default) is None:
            return None
        path = Path(self.string(key, default))
        if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            raise self.error(key, f"{what} does not exist, got {str(path)!r}")
        return path

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_show(value)}")
        return value
