"""`fedsim run | validate | sweep | policies | report | plot`: the command line.

Bad input exits 2 with one line on stderr, no traceback (`fedsim.cli.main`). The commands that run things are
in `commands.py`, the progress display in `progress.py`, `report`/`plot` (the analysis package) in `study.py`.
"""

from fedsim.cli.main import entry, main

__all__ = ["main", "entry"]
