"""Every random stream of a run, by name and number: the one place that hands out stream numbers.

A run has one seed (`run.seed`); every random draw comes from a stream derived from it, so changing
one component (the fleet, say) never changes what another draws (the model's initial weights). Two
kinds of stream:

* a **component stream** is drawn from once per run: `SeedSequence(seed, spawn_key=(number,))`, which is
  child `number` of `SeedSequence(seed)` (what `SeedSequence(seed).spawn(n)[number]` gives for any
  n > number);
* a **keyed stream** is one of a family indexed by k (round r, job j, ...):
  `SeedSequence(seed, spawn_key=(number, k))`. A round's draws then do not depend on how the run got
  there, which keeps resumed runs and sweeps identical to straight runs.

Numbers are unique across both kinds. A number, once used, is never reused for something else: traces
of a scenario must stay byte-identical from one version to the next.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COMPONENT_STREAMS", "KEYED_STREAMS", "component_rng", "component_seed_sequence", "keyed_rng",
           "keyed_seed_sequence"]

COMPONENT_STREAMS: dict[str, int] = {
    "data": 0,          # a data set's own draws (synthetic data: the key of its per-device Philox streams)
    "partition": 1,     # the partition of the training samples across devices (iid, dirichlet)
    "model": 2,         # the model's initial weights (through one torch.Generator seed)
    "fleet": 3,         # per-device speeds and link rates (measured phones, FLASH users)
    "churn": 4,         # availability (on/off) periods
    "network": 5,       # the network model: wireless distances of the devices
    "adel": 15,         # ADEL-FL's Monte Carlo sample of device-rounds (policy.deadline_s optimize = "adel")
}

KEYED_STREAMS: dict[str, int] = {
    "round": 7,         # round r of a synchronous run: participants, mini-batches, slowdowns
    "job": 11,          # job j of an asynchronous run: its mini-batch, then its slowdown
    "select": 12,       # the k-th choice of idle devices of an asynchronous run
    "layer_time": 13,   # round r's per-layer backward multipliers (fleet.classes[i].layer_time, when not 1)
    "job_layer_time": 14,   # the same for job j of an asynchronous run
    "flower": 16,       # round r of the flower policy: seeds Python's and NumPy's global generators for the strategy
    "depth_model": 17,  # round r's stragglers and their depths (fleet.depth_model)
    "batch": 20,        # round r's mini-batches of participants planned larger than their first draw (RoundPlan.samples)
}


def component_seed_sequence(seed: int, name: str) -> np.random.SeedSequence:
    """The seed sequence of component stream `name` (a key of COMPONENT_STREAMS)."""
    return np.random.SeedSequence(seed, spawn_key=(COMPONENT_STREAMS[name],))


def component_rng(seed: int, name: str) -> np.random.Generator:
    """A fresh generator on component stream `name`: every call starts the stream from its beginning."""
    return np.random.default_rng(component_seed_sequence(seed, name))


def keyed_seed_sequence(seed: int, name: str, key: int) -> np.random.SeedSequence:
    """The seed sequence of member `key` of keyed stream `name` (a key of KEYED_STREAMS)."""
    return np.random.SeedSequence(seed, spawn_key=(KEYED_STREAMS[name], key))


def keyed_rng(seed: int, name: str, key: int) -> np.random.Generator:
    """A fresh generator on member `key` (a round, a job, a selection step) of keyed stream `name`."""
    return np.random.default_rng(keyed_seed_sequence(seed, name, key))
