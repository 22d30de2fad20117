"""Studies of fedsim traces: latency / energy / accuracy trade-offs, read from the Parquet files only.

Each script runs as `python -m analysis.NAME DIR [--out OUT]`, where DIR is a run directory or a sweep
directory (`index.parquet` + `runs/`), and writes PNG figures, Markdown tables and CSV files into
`DIR/analysis/` (or OUT):

    accuracy_time   test accuracy vs simulated time, mean and min-max band over seeds
    deadline        final accuracy, time and energy to a target accuracy, against the deadline
    pareto          latency / energy / accuracy Pareto front across runs
    layer_updates   per-layer update frequency and contributors (SALF favours the last layers)
    gantt           device timeline of one round, from events.parquet
    depths          histogram of the depths stragglers reached
    report          one self-contained HTML page with all of the above

This package never imports `fedsim`: the trace schema (fedsim/output/trace.py, docs) is the contract, so the
scripts work on traces copied to any machine with pyarrow, numpy and matplotlib.
"""

SCRIPTS = ["accuracy_time", "deadline", "pareto", "layer_updates", "gantt", "depths"]
