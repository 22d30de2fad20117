"""Connecting to a Dask cluster: `--cluster` parsed, a client (and the LocalCluster fedsim started) opened and
closed as one session, within the limits of `fedsim.cluster.limits`.

`--cluster` takes a Dask scheduler address (`tcp://host:8786`) or `local[:N]` (fedsim starts a
`LocalCluster` of N single-thread worker processes, N = the number of cores by default).
Dask is optional (`pip install "fedsim[dask]"`): nothing here imports it until a cluster is asked for.
See docs/DISTRIBUTED.md for clusters on Slurm, the fault behaviour and the cost model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from fedsim.cluster import limits
from fedsim.errors import FedsimError

__all__ = ["ClusterError", "ClusterSpec", "ClusterSession", "DASK_INSTALL", "address_of", "connect", "nthreads",
           "one_line", "open_cluster", "parse_cluster", "require_dask", "single_thread"]

DASK_INSTALL = 'pip install "fedsim[dask]"'
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


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (Dask's messages can span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    """Close clients and clusters, each within limits.CLOSE_TIMEOUT_S, ignoring their errors."""
    for thing in things:
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close(timeout=limits.CLOSE_TIMEOUT_S)


class ClusterSession:
    """A Dask client and, if fedsim started it, the LocalCluster behind it; `close()` ends what was opened.

    `label` names the cluster in messages: the `--cluster` text and the scheduler's address. `quiet`, if
    given, is closed last (it holds Dask's logging at CRITICAL while fedsim's client lives: a fault ends
    in one line of fedsim's, not in Dask's reconnection reports). A finalizer closes them too if the
    session is dropped without `close()` (an error between connecting and running), so a LocalCluster's
    worker processes never outlive the command.
    """

    def __init__(self, client, cluster=None, owned: bool = True, label: str | None = None,
                 quiet: contextlib.ExitStack | None = None):
        self.client = client
        self.cluster = cluster
        self.label = label if label is not None else address_of(client)
        self._finalizer = weakref.finalize(self, _end_session, client if owned else None, cluster, quiet)

    def close(self) -> None:
        self._finalizer()


def _end_session(client, cluster, quiet) -> None:
    _close_quietly(client, cluster)
    if quiet is not None:
        quiet.close()


def _quiet_dask() -> contextlib.ExitStack:
    """Dask's log handler at CRITICAL until the returned stack is closed."""
    from distributed.utils import silence_logging_cmgr

    stack = contextlib.ExitStack()
    stack.enter_context(silence_logging_cmgr(logging.CRITICAL))
    return stack


def address_of(client) -> str:
    with contextlib.suppress(Exception):
        return str(client.scheduler.address)
    return "the Dask scheduler"


def open_cluster(cluster) -> ClusterSession:
    """Connect to `cluster`: a `--cluster` text, a ClusterSpec, or a `distributed.Client` (used as is)."""
    distributed = require_dask()
    if isinstance(cluster, distributed.Client):
        return ClusterSession(cluster, owned=False)
    spec = cluster if isinstance(cluster, ClusterSpec) else parse_cluster(cluster)
    if spec.local_workers is not None:
        return _start_local(distributed, spec.local_workers)
    quiet = _quiet_dask()
    try:
        client = distributed.Client(spec.address, timeout=limits.CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        quiet.close()
        raise ClusterError(f"--cluster {spec.address}: cannot reach a Dask scheduler there "
                           f"({one_line(exc)}); start one (docs/DISTRIBUTED.md) or use "
                           "--cluster local:N") from None
    except BaseException:
        quiet.close()
        raise
    return ClusterSession(client, label=spec.address, quiet=quiet)


def _start_local(distributed, n: int) -> ClusterSession:
    """A LocalCluster of n single-thread worker processes, started within limits.START_TIMEOUT_S.

    Processes with one thread each: two single-thread processes beat one two-thread process for this
    work (docs/DISTRIBUTED.md). The scheduler's HTTP server on any free port: the fixed default (8787)
    clashes between concurrent commands. Dask's own logs are silenced: a fault ends in one line of fedsim's.
    The workers are started in the background and waited for here, so a worker that never comes up
    (killed while starting, say) costs a bounded wait, not a hang; the run goes on with the others.
    """
    import dask

    local = client = None
    try:
        with dask.config.set(WORKER_DASK_CONFIG):      # read by each nanny when created, kept for its restarts
            local = distributed.LocalCluster(n_workers=0, threads_per_worker=1, processes=True,
                                             dashboard_address=":0", silence_logs=logging.CRITICAL)
            label = f"local:{n} ({local.scheduler_address})"
            client = distributed.Client(local, timeout=limits.CONNECT_TIMEOUT_S)
            local.scale(n)
            deadline = time.monotonic() + limits.START_TIMEOUT_S
            while True:
                up = len(nthreads(client, label))
                settled = len(local.workers) >= n           # every start attempt ended, well or not
                if up >= n or (settled and up >= 1):
                    break
                if time.monotonic() > deadline or (settled and not _starting(local)):
                    raise ClusterError(f"--cluster {label}: {up} of {n} Dask workers started within "
                                       f"{limits.START_TIMEOUT_S} s; check the machine's memory and load, "
                                       "or ask for fewer")
                time.sleep(0.1)
    except BaseException:
        _close_quietly(client, local)
        raise
    return ClusterSession(client, local, label=label)


def _starting(local) -> bool:
    """Whether a worker of this LocalCluster is still starting (or restarting)."""
    from distributed.core import Status

    return any(getattr(w, "status", None) in (Status.init, Status.starting) for w in local.workers.values())


def nthreads(client, label: str) -> dict[str, int]:
    """The live workers and their threads, asked of the scheduler within limits.CALL_TIMEOUT_S."""
    try:
        return client.nthreads(callback_timeout=limits.CALL_TIMEOUT_S)
    except Exception as exc:
        raise ClusterError(f"--cluster {label}: the Dask scheduler did not answer within {limits.CALL_TIMEOUT_S} s "
                           f"({one_line(exc)})") from None


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
