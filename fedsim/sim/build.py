"""Turn a validated Scenario into the objects of a run: data, partition, model, profile, fleet.

Each component draws from its own stream of the run's seed (fedsim.seeds), so changing, say, the fleet does
not change the model's initial weights or the data partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.learn.data import Dataset, Partition, partition_dirichlet, partition_iid
from fedsim.learn.datasets import DataRequest, check_dataset, check_partition
from fedsim.errors import DataError, FedsimError, ScenarioError
from fedsim.seeds import component_rng
from fedsim.spec.fields import printable
from fedsim.spec.plugins import call_plugin
from fedsim.world.fleet import Fleet, scenario_fleet
from fedsim.world.stragglers import check_depth_model
from fedsim.learn.grads import GradPath, resolve_paths
from fedsim.learn.loss import check_loss, load_loss
from fedsim.learn.models import build_model, check_model_io
from fedsim.learn.profile import Granularity, ModelProfile, build_profile
from fedsim.spec.scenario import Scenario

__all__ = ["Components", "build_components", "load_data"]


@dataclass(frozen=True)
class Components:
    dataset: Dataset
    partition: Partition
    model: torch.nn.Module
    profile: ModelProfile
    fleet: Fleet


def load_data(scn: Scenario) -> tuple[Dataset, Partition]:
    """The data set `data.name` names, loaded from the data stream, and its partition across the fleet: the
    data set's own, or `data.partition` drawn from the partition stream. Every problem is a ScenarioError."""
    spec, seed, source = scn.data, scn.run.seed, scn.source
    label = f"data set {spec.name!r}"
    request = DataRequest(source, scn.fleet.n_devices, spec.samples_per_device, component_rng(seed, "data"))
    dataset = call_plugin(spec.loader.load, request, source=source, field="data.name", label=label)
    problem = check_dataset(dataset)
    if problem is not None:
        raise ScenarioError(source, "data.name", f"{label}: load {problem}")
    n_samples = len(dataset.y_train)
    own = call_plugin(spec.loader.partition, dataset, request, component_rng(seed, "partition"), source=source,
                      field="data.name", label=label)
    if own is not None:
        problem = check_partition(own, request.n_devices, n_samples)
        if problem is not None:
            raise ScenarioError(source, "data.name", f"{label}: partition {problem}")
        return dataset, own
    try:
        if spec.partition == "iid":
            if spec.samples_per_device > n_samples:
                raise ScenarioError(source, "data.samples_per_device",
                                    f"must be at most the {n_samples} training samples of {label} (an iid "
                                    f"partition gives each device distinct samples), got {spec.samples_per_device}")
            return dataset, partition_iid(n_samples, request.n_devices, spec.samples_per_device,
                                          component_rng(seed, "partition"))
        return dataset, partition_dirichlet(dataset.y_train.numpy(), request.n_devices, spec.samples_per_device,
                                            spec.dirichlet_alpha, dataset.num_classes,
                                            component_rng(seed, "partition"))
    except DataError as exc:
        raise ScenarioError(source, "data.partition", f"{label}: {printable(str(exc))}") from None


def build_components(scn: Scenario) -> Components:
    """Everything a run needs, checked: every problem with the data, the model, the loss or the measurement
    files is a FedsimError naming the scenario field, raised here, before any output exists."""
    dataset, partition = load_data(scn)
    spec = scn.data
    generator = torch.Generator().manual_seed(int(component_rng(scn.run.seed, "model").integers(2**62)))
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
    check_depth_model(scn.fleet.depth_model, profile.n_layers, scn.source)
    fleet = scenario_fleet(scn)
    check_loss(load_loss(scn.training.loss, scn.source), model, dataset.x_train, dataset.y_train,
               vmapped=GradPath.VMAP in paths, source=scn.source)
    return Components(dataset, partition, model, profile, fleet)
