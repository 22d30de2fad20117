"""Connecting to a Dask cluster: `--cluster` parsed, a client (and the LocalCluster fedsim started) opened and
closed as one session.

`--cluster` takes a Dask scheduler address (`tcp://host:8786`) or `local[:N]` (fedsim starts a
`LocalCluster` of N single-thread worker processes, N = the number of cores by default).
Dask is optional (`pip install "fedsim[dask]"`): nothing here imports it until a cluster is asked for.
See docs/DISTRIBUTED.md for clusters on Slurm and the cost model.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from fedsim.errors import FedsimError

__all__ = ["ClusterError", "ClusterSpec", "ClusterSession", "DASK_INSTALL", "CONNECT_TIMEOUT_S", "connect",
           "open_cluster", "parse_cluster", "require_dask", "single_thread"]

DASK_INSTALL = 'pip install "fedsim[dask]"'
DISTRIBUTED_POLICIES = ("salf", "drop", "wait", "overselect")
# Wall-clock limits of talking to the cluster (never the simulated clock, which lives in the engine).
CONNECT_TIMEOUT_S = 30
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's adaptive mmap
# threshold: every activation buffer over 128 KB is then mapped and unmapped pass after pass, and the page
# faults (6.8 M, 7.6 s of system time) made a paper-CNN shard 1.9x slower than the same code in a plain
# process. Workers of local:N start without it (None unsets it); other clusters: docs/DISTRIBUTED.md.
WORKER_DASK_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


class ClusterError(FedsimError):
    """--cluster is malformed, Dask is missing, the scheduler cannot be reached, or the cluster lost the work."""


def require_dask():
    """The `distributed` module, or a ClusterError saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"--cluster needs Dask, which is not installed ({exc}); install it with: "
                           f"{DASK_INSTALL}") from None
    return distributed


# -- connecting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterSpec:
    address: str | None = None          # a running scheduler, e.g. tcp://10.0.0.5:8786
    local_workers: int | None = None    # or: start a LocalCluster of this many single-thread processes


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def parse_cluster(text: str) -> ClusterSpec:
    """`local`, `local:N` or a scheduler address."""
    text = str(text).strip()
    if not text:
        raise ClusterError("--cluster: empty; give a Dask scheduler ADDRESS (tcp://host:8786) or local[:N]")
    name, sep, count = text.partition(":")
    if name != "local":
        return ClusterSpec(address=text)
    if not sep:
        return ClusterSpec(local_workers=_cores())
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n < 1:
        raise ClusterError(f"--cluster {text}: N in local:N must be a positive integer, got {count!r}")
    return ClusterSpec(local_workers=n)


def _close_quietly(*things) -> None:
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close()


class ClusterSession:
    """A Dask client and, if fedsim started it, the LocalCluster behind it; `close()` ends what was opened.

    A finalizer closes them too if the session is dropped without `close()` (an error between connecting
    and running), so a LocalCluster's worker processes never outlive the command.
    """

    def __init__(self, client, cluster=None, owned: bool = True):
        self.client = client
        self.cluster = cluster
        self._finalizer = weakref.finalize(self, _close_quietly, client if owned else None, cluster)

    def close(self) -> None:
        self._finalizer()


def open_cluster(cluster) -> ClusterSession:
    """Connect to `cluster`: a `--cluster` text, a ClusterSpec, or a `distributed.Client` (used as is)."""
    distributed = require_dask()
    if isinstance(cluster, distributed.Client):
        return ClusterSession(cluster, owned=False)
    spec = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    if spec.local_workers is not None:
        import logging

        import dask

        # Processes with one thread each: two single-thread processes beat one two-thread process for this
        # work (docs/DISTRIBUTED.md). The scheduler's HTTP server on any free port: the fixed default
        # (8787) clashes between concurrent commands.
        with dask.config.set(WORKER_DASK_CONFIG):      # read by each nanny now, kept for its restarts
            local = distributed.LocalCluster(n_workers=spec.local_workers, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.ERROR)
        try:
            return ClusterSession(distributed.Client(local), local)
        except BaseException:
            local.close()
            raise
    try:
        client = distributed.Client(spec.address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(f"--cluster {spec.address}: cannot reach a Dask scheduler there "
                           f"({type(exc).__name__}: {exc}); start one (docs/DISTRIBUTED.md) or use "
                           "--cluster local:N") from None
    return ClusterSession(client)


@contextlib.contextmanager
def connect(cluster) -> Iterator[Any]:
    """`with connect("local:2") as client:` a Dask client, closed (with its LocalCluster) on exit."""
    session = open_cluster(cluster)
    try:
        yield session.client
    finally:
        session.close()


def single_thread() -> None:
    """Worker side: one torch thread per task (the worker runs as many tasks at once as it has threads)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


