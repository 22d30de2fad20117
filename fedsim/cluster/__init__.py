"""Dask cluster back ends, handed in from the command line: sharded gradients for a run, runs of a sweep.

Nothing below `fedsim.cli` imports this package; Dask itself is imported only when a cluster is asked for.
"""
