"""Per-layer profile of a model: parameter names, size in bytes and FLOPs, in forward order.

The simulator schedules one event per layer's backward completion (SALF runs the backward pass
from the last layer to the first), so it needs each layer's cost. FLOPs are measured from the
model itself with `torch.utils.flop_counter.FlopCounterMode` on a small random batch:

* A "layer" is a module that owns parameters directly (`recurse=False`), ordered by its first
  call in a real forward pass, not by registration order.
* FlopCounterMode (torch 2.13) attributes both forward and backward ops to the module whose
  forward produced them, keyed by `"<RootClass>.<fqn>"`; its backward tracking follows the
  autograd graph through gradient hooks, so a layer's weight- and input-gradient matmuls/convs
  land under the layer's own name. A layer's count includes submodules that it calls, so the
  counts of its direct children are subtracted.
* Only what FlopCounterMode counts is counted: matmuls and convolutions (2 FLOPs per MAC). Bias
  adds, bias-gradient reductions, activations and pooling count zero; parameter-free modules
  (ReLU, pooling, flatten) are not layers, and any FLOPs they have are in no layer.
* The first layer's backward has no input gradient (the batch does not require grad), as in
  real training, so it only costs the weight gradient.
* The profiling batch is float noise of the model's dtype, so models that take integer input
  (embeddings) cannot be profiled. Parameters owned by the root module make a layer named after
  its class, which is always first since the root is called first.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedsim.errors import FedsimError

__all__ = ["Granularity", "LayerInfo", "ModelProfile", "build_profile", "PROFILE_BATCH_SIZE"]

# Counted FLOPs are linear in the batch size, so any batch gives the same per-sample numbers; a
# small one keeps profiling to milliseconds. More than 1 so batch and feature axes cannot be confused.
PROFILE_BATCH_SIZE = 4


class Granularity(enum.Enum):
    MODULE = "module"  # a parameterised module's weight and bias together = one layer
    TENSOR = "tensor"  # every parameter tensor is its own layer (how the SALF authors' code counts)


@dataclass(frozen=True)
class LayerInfo:
    index: int  # position in forward order, 0 = first layer
    name: str  # "fc1" (module) or "fc1.weight" (tensor)
    param_names: tuple[str, ...]  # names as in model.named_parameters()
    n_params: int
    size_bytes: int  # n_params * element size of the model dtype
    fwd_flops_per_sample: float
    bwd_flops_per_sample: float


@dataclass(frozen=True)
class ModelProfile:
    layers: tuple[LayerInfo, ...]  # forward order
    granularity: Granularity
    input_shape: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(layer.size_bytes for layer in self.layers)

    @property
    def fwd_flops_per_sample(self) -> float:
        return sum(layer.fwd_flops_per_sample for layer in self.layers)

    @property
    def bwd_flops_per_sample(self) -> float:
        return sum(layer.bwd_flops_per_sample for layer in self.layers)

    @property
    def backward_order(self) -> tuple[int, ...]:
        """Layer indices in the order their backward completes: last layer first."""
        return tuple(reversed(range(len(self.layers))))

    def layer_of_param(self) -> dict[str, int]:
        return {name: layer.index for layer in self.layers for name in layer.param_names}


@contextlib.contextmanager
def _record_first_calls(modules: dict[nn.Module, str], order: list[str],
                        out_numel: dict[str, int]) -> Iterator[None]:
    """Append each module's name to `order` at its first call; sum its output sizes in `out_numel`."""
    def pre_hook(module: nn.Module, _args: object) -> None:
        name = modules[module]
        if name not in order:
            order.append(name)

    def post_hook(module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            name = modules[module]
            out_numel[name] = out_numel.get(name, 0) + output.numel()

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


_Counts = dict[str, dict[object, int]]


def _measure(model: nn.Module, input_shape: tuple[int, ...], owners: dict[nn.Module, str]
             ) -> tuple[list[str], dict[str, int], _Counts, _Counts]:
    """One forward + backward pass under FlopCounterMode.

    Returns the owners' first-call order, their summed output sizes, and the per-module counts
    after the forward pass and after the backward pass. Op names cannot tell forward from backward
    (a Linear's backward and a bias-free forward are both aten.mm), hence the two snapshots.
    """
    first = next(iter(model.parameters()))
    generator = torch.Generator(device=first.device).manual_seed(0)
    batch = torch.randn((PROFILE_BATCH_SIZE, *input_shape), generator=generator,
                        dtype=first.dtype, device=first.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Forward passes may update buffers (BatchNorm running statistics): profiling must not.
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    order: list[str] = []
    out_numel: dict[str, int] = {}
    counter = FlopCounterMode(display=False)
    try:
        with _record_first_calls(owners, order, out_numel), counter:
            try:
                output = model(batch)
            except Exception as exc:
                raise FedsimError(f"profiling {type(model).__name__}: its forward pass on a batch of shape "
                                  f"{list(batch.shape)} raised {type(exc).__name__}: {_brief(exc)}") from None
            forward_counts = counter.get_flop_counts()
            if not isinstance(output, torch.Tensor):
                raise FedsimError(f"profiling {type(model).__name__}: its forward pass must return one tensor, "
                                  f"got {type(output).__name__}")
            if trainable:
                if not output.requires_grad:
                    raise FedsimError(f"profiling {type(model).__name__}: its output does not depend on any "
                                      "trainable parameter, so there is nothing to backpropagate")
                # autograd.grad rather than .backward(): the model's .grad fields stay untouched.
                try:
                    torch.autograd.grad(output.sum(), trainable, allow_unused=True)
                except Exception as exc:
                    raise FedsimError(f"profiling {type(model).__name__}: its backward pass raised "
                                      f"{type(exc).__name__}: {_brief(exc)}") from None
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved_buffers[name])
    return order, out_numel, forward_counts, counter.get_flop_counts()


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())      # one line
    return text if len(text) <= 300 else text[:300] + "..."


def build_profile(model: nn.Module, input_shape: tuple[int, ...], granularity: Granularity) -> ModelProfile:
    """Profile `model` for samples of `input_shape` (no batch dimension) at `granularity`."""
    input_shape = tuple(int(d) for d in input_shape)
    named_modules = dict(model.named_modules())
    # Owners come from the de-duplicated parameter list, so a tied parameter belongs to one layer.
    params_of: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for full_name, param in model.named_parameters():
        owner, _, _ = full_name.rpartition(".")
        params_of.setdefault(owner, []).append((full_name, param))
    if not params_of:
        raise FedsimError(f"cannot profile {type(model).__name__}: it has no parameters, so it has no layers to "
                          "train or deliver")
    owners = {named_modules[name]: name for name in params_of}

    order, out_numel, fwd_counts, all_counts = _measure(model, input_shape, owners)
    never_called = [name or "<root>" for name in params_of if name not in order]
    if never_called:
        raise FedsimError(
            f"cannot profile {type(model).__name__}: parameterised module(s) {', '.join(never_called)} "
            "are never called in forward, so they have no place in the backward order"
        )

    root = type(model).__name__

    def key(fqn: str) -> str:
        return f"{root}.{fqn}" if fqn else root

    def own_flops(fqn: str, backward: bool) -> float:
        def total(name: str) -> int:
            after_forward = sum(fwd_counts.get(key(name), {}).values())
            return sum(all_counts.get(key(name), {}).values()) - after_forward if backward else after_forward
        children = (f"{fqn}.{c}" if fqn else c for c, _ in named_modules[fqn].named_children())
        return (total(fqn) - sum(total(c) for c in children)) / PROFILE_BATCH_SIZE

    layers: list[LayerInfo] = []
    for fqn in order:
        module = named_modules[fqn]
        params = params_of[fqn]
        fwd, bwd = own_flops(fqn, backward=False), own_flops(fqn, backward=True)
        if granularity is Granularity.MODULE:
            layers.append(_layer(len(layers), fqn or root, params, fwd, bwd))
            continue
        for (name, param), (t_fwd, t_bwd) in zip(params, _split_tensors(module, params, fwd, bwd,
                                                                       out_numel.get(fqn, 0))):
            layers.append(_layer(len(layers), name, [(name, param)], t_fwd, t_bwd))
    return ModelProfile(layers=tuple(layers), granularity=granularity, input_shape=input_shape)


def _layer(index: int, name: str, params: list[tuple[str, nn.Parameter]], fwd: float, bwd: float) -> LayerInfo:
    return LayerInfo(
        index=index, name=name, param_names=tuple(n for n, _ in params), n_params=sum(p.numel() for _, p in params),
        size_bytes=sum(p.numel() * p.element_size() for _, p in params),
        fwd_flops_per_sample=fwd, bwd_flops_per_sample=bwd,
    )


def _split_tensors(module: nn.Module, params: list[tuple[str, nn.Parameter]], fwd: float, bwd: float,
                   out_numel: int) -> list[tuple[float, float]]:
    """Share a module's FLOPs among its tensors so that TENSOR totals equal MODULE totals.

    Forward FLOPs all go to the first tensor (the weight): FlopCounterMode does not count bias adds.
    For Linear and ConvNd the bias gets one add per output-gradient element per sample (reducing
    dL/dy over the batch/spatial axes: out_features for Linear, C_out*H_out*W_out for Conv2d) and
    the weight the rest of the measured backward (its weight and input gradients). FlopCounterMode
    does not count that reduction, so this is a convention for splitting, not an extra cost. Other
    modules split their backward FLOPs in proportion to tensor sizes.
    """
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and [n.rpartition(".")[2] for n, _ in params] == [
            "weight", "bias"]:
        bias_bwd = min(bwd, out_numel / PROFILE_BATCH_SIZE)
        return [(fwd, bwd - bias_bwd), (0.0, bias_bwd)]
    total = sum(p.numel() for _, p in params)
    return [(fwd if i == 0 else 0.0, bwd * p.numel() / total if total else 0.0) for i, (_, p) in enumerate(params)]
