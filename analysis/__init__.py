"""Studies of fedsim traces: latency / energy / accuracy trade-offs, read from the run directories only.

Each study runs as `python -m analysis.NAME DIR [--out OUT]` from a checkout (installed, the package is
`fedsim_analysis`; `fedsim plot KIND DIR` and `fedsim report DIR` run the same code). DIR is a run
directory, a sweep directory or any folder of runs; the figures (PNG) and tables (Markdown, CSV) go to
OUT, by default `DIR/analysis/`, and nowhere else:

    accuracy_time   (kind accuracy) test accuracy against simulated time, one curve per group: the headline
    deadline        final accuracy, time and energy to a target accuracy, against the deadline
    pareto          the time / energy / accuracy Pareto front of the groups
    layer_updates   (kind layers) per-layer update frequency and contributors (SALF favours the last layers)
    depths          the depths stragglers reached
    gantt           a device timeline of one round: stragglers and interrupted devices, by class
    report          one self-contained HTML page: every figure, one section per group
    paper_check     (kind paper-check) the SALF paper's claims: one table, three figures
    equal_time      (kind equal-time) policies at equal simulated time, each at its best deadline

Runs are grouped by scenario (analysis.runs): the runs of one scenario that differ only by seed form a
group; groups are never pooled; a run found twice counts once; across seeds, the mean and the sample
standard deviation (ddof=1).

This package never imports `fedsim`: the trace schema (fedsim/output/trace.py, docs) and the run
directory's JSON files are the contract, so the studies work on traces copied to any machine with pyarrow,
numpy and matplotlib.
"""

SCRIPTS = ["accuracy_time", "deadline", "pareto", "layer_updates", "depths", "gantt"]
KINDS = {"accuracy": "accuracy_time", "deadline": "deadline", "pareto": "pareto", "layers": "layer_updates",
         "depths": "depths", "gantt": "gantt", "paper-check": "paper_check",
         "equal-time": "equal_time"}
