"""The project's exception hierarchy: every error a user can cause is a `FedsimError`.

The CLI turns any `FedsimError` into one line on stderr and exit code 2, so messages must name the
file, the field and the offending value.
"""

from __future__ import annotations

__all__ = ["FedsimError", "ScenarioError", "DataError", "ScenarioFileError", "TraceError", "NumericalError"]


class FedsimError(Exception):
    """Base class of every error fedsim raises on bad input or a failed run."""


class ScenarioError(FedsimError):
    """A scenario file (or a --set override) is malformed or out of range.

    `str(err)` reads `FILE: FIELD.PATH: message, got VALUE`.
    """

    def __init__(self, source: str, field: str, message: str):
        self.source = source
        self.field = field
        self.message = message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")


class DataError(FedsimError):
    """A dataset or measurement file is missing, truncated or not of the expected format."""


class ScenarioFileError(ScenarioError, DataError):
    """A file a scenario field names (dataset, availability file, measurements) is unreadable or malformed.

    `str(err)` reads `SCENARIO: FIELD: FILE: message`; it is both a ScenarioError and a DataError.
    """


class TraceError(FedsimError):
    """A trace directory is missing, incomplete or of another schema version."""


class NumericalError(FedsimError):
    """NaN or Inf appeared in a gradient or a loss."""
