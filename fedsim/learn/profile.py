"""Per-layer profile of a model: parameter names, size in bytes and FLOPs, in forward order.

The simulator schedules one event per layer's backward completion (SALF runs the backward pass
from the last layer to the first), so it needs each layer's cost. FLOPs are those
`torch.utils.flop_counter.FlopCounterMode` counts on a small random batch:

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

Counting under FlopCounterMode imports `torch._dynamo` (about 1.2 s), so a model made only of modules whose
counts are known is counted from the shapes seen in the same forward pass instead, with the same formulas
(`_analytic_flops`; `tests/test_profile.py` checks both ways agree on every built-in model): `nn.Linear`,
`nn.Conv1d/2d/3d`, the parameter-free and normalisation modules of `_ZERO_FLOP_MODULES`, `nn.Sequential`, and
models whose class sets `flops_in_submodules = True` (their own forward calls only such modules and
parameter-free functions: fedsim's MLP, CNN and the calibration LeNet). Any other module is counted by
FlopCounterMode.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

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


# Modules in which FlopCounterMode counts no FLOPs (no matmul, no convolution; `tests/test_profile.py`).
_ZERO_FLOP_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d, nn.Identity,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm,
)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _counted_analytically(model: nn.Module) -> bool:
    """Every module is one whose FLOPs `_analytic_flops` knows (exact types: a subclass may change forward)."""
    def known(m: nn.Module) -> bool:
        if getattr(type(m), "flops_in_submodules", False) is True:
            return next(m.parameters(recurse=False), None) is None      # parameters of its own: used how?
        return type(m) in _ZERO_FLOP_MODULES or type(m) in _CONV or type(m) is nn.Linear or type(m) is nn.Sequential

    return all(known(m) for m in model.modules())


def _analytic_flops(module: nn.Module, input_requires_grad: bool, output_shape: tuple[int, ...]) -> tuple[int, int]:
    """(forward, backward) FLOPs of one call of a Linear or ConvNd as FlopCounterMode counts them: 2 per MAC;
    the backward computes the input gradient if the input requires grad and the weight gradient if the weight
    does, each costing the forward's FLOPs (a grouped convolution's weight gradient: `groups` times that)."""
    if type(module) is nn.Linear:
        rows = math.prod(output_shape) // module.out_features
        fwd = 2 * rows * module.in_features * module.out_features
        return fwd, fwd * (int(input_requires_grad) + int(module.weight.requires_grad))
    if type(module) in _CONV:
        c_out, c_in_per_group, *kernel = module.weight.shape
        fwd = 2 * output_shape[0] * c_out * c_in_per_group * math.prod(output_shape[2:]) * math.prod(kernel)
        return fwd, fwd * int(input_requires_grad) + fwd * module.groups * int(module.weight.requires_grad)
    return 0, 0


@contextlib.contextmanager
def _record_first_calls(modules: dict[nn.Module, str], order: list[str], out_numel: dict[str, int],
                        flops: dict[str, list[int]]) -> Iterator[None]:
    """Append each module's name to `order` at its first call; sum its output sizes in `out_numel` and, for
    a Linear or ConvNd, its analytic [forward, backward] FLOPs in `flops`."""
    def pre_hook(module: nn.Module, _args: object) -> None:
        name = modules[module]
        if name not in order:
            order.append(name)

    def post_hook(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            name = modules[module]
            out_numel[name] = out_numel.get(name, 0) + output.numel()
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            fwd, bwd = _analytic_flops(module, x is not None and x.requires_grad, tuple(output.shape))
            counts = flops.setdefault(name, [0, 0])
            counts[0] += fwd
            counts[1] += bwd

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
_Own = dict[str, tuple[float, float]]


def _measure(model: nn.Module, input_shape: tuple[int, ...], owners: dict[nn.Module, str],
             named_modules: dict[str, nn.Module], use_flop_counter: bool | None = None
             ) -> tuple[list[str], dict[str, int], _Own]:
    """One forward + backward pass, counting FLOPs analytically if every module is known (else, or with
    `use_flop_counter=True`, under FlopCounterMode).

    Returns the owners' first-call order, their summed output sizes, and each owner's own (forward,
    backward) FLOPs per sample.
    """
    if use_flop_counter is None:
        use_flop_counter = not _counted_analytically(model)
    first = next(iter(model.parameters()))
    generator = torch.Generator(device=first.device).manual_seed(0)
    batch = torch.randn((PROFILE_BATCH_SIZE, *input_shape), generator=generator,
                        dtype=first.dtype, device=first.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Forward passes may update buffers (BatchNorm running statistics): profiling must not.
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    order: list[str] = []
    out_numel: dict[str, int] = {}
    analytic: dict[str, list[int]] = {}
    if use_flop_counter:
        from torch.utils.flop_counter import FlopCounterMode      # imports torch._dynamo: only when needed

        counter = FlopCounterMode(display=False)
    else:
        counter = contextlib.nullcontext()
    try:
        with _record_first_calls(owners, order, out_numel, analytic), counter:
            try:
                output = model(batch)
            except Exception as exc:
                raise FedsimError(f"profiling {type(model).__name__}: its forward pass on a batch of shape "
                                  f"{list(batch.shape)} raised {type(exc).__name__}: {_brief(exc)}") from None
            forward_counts = counter.get_flop_counts() if use_flop_counter else {}
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
    if not use_flop_counter:
        own = {name: (fwd / PROFILE_BATCH_SIZE, bwd / PROFILE_BATCH_SIZE)
               for name, (fwd, bwd) in ((n, analytic.get(n, (0, 0))) for n in order)}
        return order, out_numel, own
    return order, out_numel, _own_counts(type(model).__name__, order, named_modules, forward_counts,
                                         counter.get_flop_counts())


def _own_counts(root: str, order: list[str], named_modules: dict[str, nn.Module], fwd_counts: _Counts,
                all_counts: _Counts) -> _Own:
    """Each owner's own FLOPs per sample from FlopCounterMode's per-module counts after the forward pass and
    after the backward pass (op names cannot tell forward from backward: a Linear's backward and a bias-free
    forward are both aten.mm, hence the two snapshots), less its direct children's."""
    def key(fqn: str) -> str:
        return f"{root}.{fqn}" if fqn else root

    def own_flops(fqn: str, backward: bool) -> float:
        def total(name: str) -> int:
            after_forward = sum(fwd_counts.get(key(name), {}).values())
            return sum(all_counts.get(key(name), {}).values()) - after_forward if backward else after_forward
        children = (f"{fqn}.{c}" if fqn else c for c, _ in named_modules[fqn].named_children())
        return (total(fqn) - sum(total(c) for c in children)) / PROFILE_BATCH_SIZE

    return {fqn: (own_flops(fqn, False), own_flops(fqn, True)) for fqn in order}


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())      # one line
    return text if len(text) <= 300 else text[:300] + "..."


def build_profile(model: nn.Module, input_shape: tuple[int, ...], granularity: Granularity, *,
                  use_flop_counter: bool | None = None) -> ModelProfile:
    """Profile `model` for samples of `input_shape` (no batch dimension) at `granularity`.

    `use_flop_counter`: count under FlopCounterMode (True), analytically (False: only for models of known
    modules), or analytically when possible (None)."""
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
    if use_flop_counter is False and not _counted_analytically(model):
        raise FedsimError(f"cannot count the FLOPs of {type(model).__name__} analytically: it has modules of "
                          "unknown cost")

    order, out_numel, own = _measure(model, input_shape, owners, named_modules, use_flop_counter)
    never_called = [name or "<root>" for name in params_of if name not in order]
    if never_called:
        raise FedsimError(
            f"cannot profile {type(model).__name__}: parameterised module(s) {', '.join(never_called)} "
            "are never called in forward, so they have no place in the backward order"
        )

    root = type(model).__name__
    layers: list[LayerInfo] = []
    for fqn in order:
        module = named_modules[fqn]
        params = params_of[fqn]
        fwd, bwd = own[fqn]
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
