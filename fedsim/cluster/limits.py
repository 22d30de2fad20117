"""Wall-clock limits of talking to a Dask cluster (never the simulated clock, which lives in the engine).

Every call to the cluster is bounded by one of these; the modules of `fedsim.cluster` read them here at
call time (tests shorten them). docs/DISTRIBUTED.md, Faults, lists what each one ends in.
"""

from __future__ import annotations

__all__ = ["CALL_TIMEOUT_S", "CLOSE_TIMEOUT_S", "CONNECT_TIMEOUT_S", "LOAD_TIMEOUT_S", "RESUBMITS",
           "START_TIMEOUT_S", "TASK_MIN_FLOPS", "TASK_TIMEOUT_S", "WORKER_WAIT_S"]

CONNECT_TIMEOUT_S = 30       # reach a scheduler (--cluster ADDRESS), or the one fedsim started
START_TIMEOUT_S = 120        # local:N: the workers start (each imports torch); at least one must be up
WORKER_WAIT_S = 120          # a cluster without workers: wait this long for one
CALL_TIMEOUT_S = 30          # one request to the scheduler (the workers' list)
CLOSE_TIMEOUT_S = 5          # each of: freeing a run's data on the workers, closing the client, a LocalCluster
LOAD_TIMEOUT_S = 300         # every worker builds the run's data before round 0
TASK_TIMEOUT_S = 30          # a round fails if none of its tasks finishes for this long (plus the data build
TASK_MIN_FLOPS = 1e9         # time measured before round 0, plus its largest task at this many FLOP/s)
RESUBMITS = 2                # a shard task found cancelled (its inputs were lost) is submitted again this often
