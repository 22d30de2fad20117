"""Turn a validated Scenario into the objects of a run: data, partition, model, profile, fleet.

Each component draws from its own child of `SeedSequence(run.seed)`, so changing, say, the fleet does
not change the model's initial weights or the data partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.learn.data import Dataset, Partition, load_mnist, make_synthetic, partition_dirichlet, partition_iid
from fedsim.errors import DataError, FedsimError, ScenarioError, ScenarioFileError
from fedsim.spec.fields import printable
from fedsim.world.fleet import Fleet, build_fleet
from fedsim.learn.grads import GradPath, resolve_paths
from fedsim.learn.loss import check_loss, load_loss
from fedsim.learn.models import build_model, check_model_io
from fedsim.learn.profile import Granularity, ModelProfile, build_profile
from fedsim.spec.scenario import Scenario

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
    """Everything a run needs, checked: every problem with the data, the model, the loss or the measurement
    files is a FedsimError naming the scenario field, raised here, before any output exists."""
    seed = scn.run.seed
    n_devices = scn.fleet.n_devices
    spec = scn.data
    if spec.name == "mnist":
        try:
            dataset = load_mnist(spec.dir)
        except DataError as exc:
            raise ScenarioFileError(scn.source, "data.dir", printable(str(exc))) from None
        labels = dataset.y_train.numpy()
        if spec.partition == "iid":
            if spec.samples_per_device > len(labels):
                raise ScenarioError(scn.source, "data.samples_per_device",
                                    f"must be at most the {len(labels)} training samples in {str(spec.dir)!r} "
                                    f"(an iid partition gives each device distinct samples), got "
                                    f"{spec.samples_per_device}")
            partition = partition_iid(len(labels), n_devices, spec.samples_per_device, _rng(seed, "partition"))
        else:
            partition = partition_dirichlet(labels, n_devices, spec.samples_per_device, spec.dirichlet_alpha,
                                            dataset.num_classes, _rng(seed, "partition"))
    else:
        try:
            dataset, partition = make_synthetic(spec.synthetic_alpha, spec.synthetic_beta, n_devices,
                                                spec.samples_per_device, spec.test_samples_per_device,
                                                _rng(seed, "data"))
        except DataError as exc:
            raise ScenarioError(scn.source, "data.synthetic_beta" if "beta" in str(exc) else "data.name",
                                str(exc)) from None
    generator = torch.Generator().manual_seed(int(_rng(seed, "model").integers(2**62)))
    dtype = torch.float64 if scn.model.dtype == "float64" else torch.float32
    model = build_model(scn.model.name, dataset.input_shape, dataset.num_classes, generator=generator,
                        dtype=dtype, source=scn.source)
    check_model_io(model, dataset.input_shape, dataset.num_classes, name=scn.model.name,
                   what=f"the {spec.name} data", source=scn.source)
    try:
        paths = resolve_paths(model, scn.training.grad_path)      # 'grouped' is refused for batch-coupled models
    except FedsimError as exc:
        raise ScenarioError(scn.source, "training.grad_path", printable(str(exc))) from None
    try:
        profile = build_profile(model, dataset.input_shape, Granularity(scn.model.granularity))
    except ScenarioError:
        raise
    except FedsimError as exc:
        raise ScenarioError(scn.source, "model.name", f"model {scn.model.name!r}: {printable(str(exc))}") from None
    try:
        fleet = build_fleet(scn.fleet, _rng(seed, "fleet"), scn.source)
    except ScenarioError:
        raise
    except DataError as exc:      # the FLASH measurements under fleet.traces_dir
        raise ScenarioFileError(scn.source, "fleet.traces_dir", printable(str(exc))) from None
    check_loss(load_loss(scn.training.loss, scn.source), model, dataset.x_train, dataset.y_train,
               vmapped=GradPath.VMAP in paths, source=scn.source)
    return Components(dataset, partition, model, profile, fleet)
