"""Turn a validated Scenario into the objects of a run: data, partition, model, profile, fleet.

Each component draws from its own child of `SeedSequence(run.seed)`, so changing, say, the fleet does
not change the model's initial weights or the data partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.data import Dataset, Partition, load_mnist, make_synthetic, partition_dirichlet, partition_iid
from fedsim.fleet import Fleet, build_fleet
from fedsim.models import build_model
from fedsim.profile import Granularity, ModelProfile, build_profile
from fedsim.scenario import Scenario

__all__ = ["Components", "build_components", "STREAMS"]

# child index of SeedSequence(seed) for each component (rounds use their own spawn key, see server.py)
STREAMS = {"data": 0, "partition": 1, "model": 2, "fleet": 3}


@dataclass(frozen=True)
class Components:
    dataset: Dataset
    partition: Partition
    model: torch.nn.Module
    profile: ModelProfile
    fleet: Fleet


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(len(STREAMS))[STREAMS[stream]])


def build_components(scn: Scenario) -> Components:
    seed = scn.run.seed
    n_devices = scn.fleet.n_devices
    spec = scn.data
    if spec.name == "mnist":
        dataset = load_mnist(spec.dir)
        labels = dataset.y_train.numpy()
        if spec.partition == "iid":
            partition = partition_iid(len(labels), n_devices, spec.samples_per_device, _rng(seed, "partition"))
        else:
            partition = partition_dirichlet(labels, n_devices, spec.samples_per_device, spec.dirichlet_alpha,
                                            dataset.num_classes, _rng(seed, "partition"))
    else:
        dataset, partition = make_synthetic(spec.synthetic_alpha, spec.synthetic_beta, n_devices,
                                            spec.samples_per_device, spec.test_samples_per_device,
                                            _rng(seed, "data"))
    generator = torch.Generator().manual_seed(int(_rng(seed, "model").integers(2**62)))
    dtype = torch.float64 if scn.model.dtype == "float64" else torch.float32
    model = build_model(scn.model.name, dataset.input_shape, dataset.num_classes, generator=generator,
                        dtype=dtype, source=scn.source)
    profile = build_profile(model, dataset.input_shape, Granularity(scn.model.granularity))
    fleet = build_fleet(scn.fleet, _rng(seed, "fleet"), scn.source)
    return Components(dataset, partition, model, profile, fleet)
