"""The model zoo: the SALF paper's MLP and CNN, plus factories named by import path ("package.module:function")
or registered by an installed package in the entry-point group `fedsim.models` (see fedsim.spec.plugins).

Every model is initialised from an explicit `torch.Generator` so that two runs of a scenario with
the same seed start from bit-identical weights, and so that building a model never perturbs the
global RNG that other parts of a run (or a user's own code) may rely on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.spec.plugins import call_plugin, check_plugin_name, load_plugin, what_happened
from fedsim.spec.scenario import MODEL_GROUP, MODEL_PATHS

__all__ = ["MODEL_NAMES", "MLP", "CNN", "build_model", "check_model_io", "materialise", "scaled_width"]

MODEL_NAMES = tuple(MODEL_PATHS)     # ("mlp", "cnn")

_FIELD = "model.name"
_FORM = "package.module:function"


def scaled_width(hidden: int, width: float) -> int:
    """Hidden size of a HeteroFL sub-model; rounding up keeps every layer at least one unit wide."""
    return max(1, math.ceil(hidden * width))


class MLP(nn.Module):
    """784-32-16-10 on MNIST: the SALF paper's fully connected model."""

    flops_in_submodules = True      # forward calls only its layers and parameter-free functions (learn.profile)

    def __init__(self, in_features: int, num_classes: int, width: float = 1.0):
        super().__init__()
        h1, h2 = scaled_width(32, width), scaled_width(16, width)
        # Built on the meta device: the default constructors would draw from the global RNG.
        self.fc1 = nn.Linear(in_features, h1, device="meta")
        self.fc2 = nn.Linear(h1, h2, device="meta")
        self.fc3 = nn.Linear(h2, num_classes, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """The SALF paper's LeNet-style CNN: two 5x5 conv + 2x2 max-pool stages, then two linear layers."""

    flops_in_submodules = True      # forward calls only its layers and parameter-free functions (learn.profile)

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0):
        super().__init__()
        channels, height, width_px = input_shape
        c1, c2, hidden = (scaled_width(h, width) for h in (6, 6, 50))
        self.conv1 = nn.Conv2d(channels, c1, 5, device="meta")
        self.conv2 = nn.Conv2d(c1, c2, 5, device="meta")
        self.fc1 = nn.Linear(c2 * _cnn_side(height) * _cnn_side(width_px), hidden, device="meta")
        self.fc2 = nn.Linear(hidden, num_classes, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def _cnn_side(side: int) -> int:
    """Spatial size after conv5 -> pool2 -> conv5 -> pool2 (no padding, floor pooling)."""
    return ((side - 4) // 2 - 4) // 2


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    generator: torch.Generator,
    width: float = 1.0,
    dtype: torch.dtype = torch.float32,
    source: str = "<scenario>",
) -> nn.Module:
    """Build model `name` for samples of `input_shape` (no batch dimension) and `num_classes` outputs.

    `name` is one of `MODEL_NAMES`, or names a factory called as `function(input_shape, num_classes)`: a
    name registered in the entry-point group `fedsim.models`, or an import path "package.module:function".
    `width` in (0, 1] scales the hidden sizes of the built-in models (HeteroFL sub-models). Mistakes in the
    scenario raise `ScenarioError` attributed to `source`; the global torch RNG is left exactly as it was.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not 0 < width <= 1:
        raise ScenarioError(source, "model.width", f"must be in (0, 1], got {width}")

    if name not in MODEL_NAMES:
        check_plugin_name(name, group=MODEL_GROUP, builtins=MODEL_PATHS, source=source, field=_FIELD,
                          kind="model", form=_FORM)
        if width != 1:
            raise ScenarioError(
                source, "model.width",
                f"width scaling needs a built-in model ({', '.join(MODEL_NAMES)}), got {width} for {name!r}",
            )
        model = _build_from_factory(name, input_shape, num_classes, generator, source)
    else:
        model = _build_zoo(name, input_shape, num_classes, width, source)
        # Materialise the meta-device parameters, then draw them from `generator` only.
        materialise(model)
        _reset_parameters(model, generator)
    # Cast after initialisation so the float64 model is the float32 one upcast, seed for seed.
    return model.to(dtype)


def _build_zoo(name: str, input_shape: tuple[int, ...], num_classes: int, width: float,
               source: str) -> nn.Module:
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, width)
    if len(input_shape) != 3:
        raise ScenarioError(source, _FIELD, f"cnn needs image input (C, H, W), got input shape {input_shape}")
    if _cnn_side(input_shape[1]) < 1 or _cnn_side(input_shape[2]) < 1:
        raise ScenarioError(source, _FIELD, f"cnn needs images of at least 16x16, got input shape {input_shape}")
    return CNN(input_shape, num_classes, width)  # type: ignore[arg-type]


def materialise(model: nn.Module) -> None:
    """Give every meta-device parameter uninitialised CPU storage of its shape and dtype, in place. (What
    `Module.to_empty` does, without its `empty_like` on meta tensors, which imports sympy: about 1 s.)"""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                   requires_grad=param.requires_grad))


def _reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Re-run PyTorch's default Linear/Conv2d `reset_parameters`, drawing from `generator`."""
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _build_from_factory(name: str, input_shape: tuple[int, ...], num_classes: int,
                        generator: torch.Generator, source: str) -> nn.Module:
    factory = load_plugin(name, group=MODEL_GROUP, builtins=MODEL_PATHS, source=source, field=_FIELD,
                          kind="model factory", form=_FORM, check=callable, expected="callable")
    # User code initialises through the global RNG, which we may not disturb. So we fork it (CPU
    # only: devices=[]), seed the fork from `generator` so the result is still reproducible, and
    # fork_rng restores the caller's global state on exit. numpy's and `random`'s global state are
    # not forked: factories that draw from them are not reproducible through `generator`.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = call_plugin(factory, input_shape, num_classes, source=source, field=_FIELD,
                            label=f"the factory {name!r}")
    if not isinstance(model, nn.Module):
        raise ScenarioError(
            source, _FIELD, f"factory {name!r} must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def check_model_io(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, *, name: str,
                   what: str = "the data", source: str = "<scenario>") -> None:
    """One forward pass of one sample: the model must take inputs of `input_shape` and return a tensor of
    shape [1, num_classes]. A mismatch is a ScenarioError on model.name, before any run output exists.

    Evaluation mode, no gradient, buffers restored and the global RNG forked: the model is left as it was.
    """
    first = next(iter(model.parameters()), None)
    sample = torch.zeros((1, *input_shape), dtype=first.dtype if first is not None else torch.float32)
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            out = model(sample)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ScenarioError(source, _FIELD, f"model {name!r} does not take the inputs of {what}: one sample of "
                                            f"shape {list(sample.shape)} {what_happened(exc)}") from None
    finally:
        model.train(training)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved and b.shape == saved[k].shape:
                    b.copy_(saved[k])
    if not isinstance(out, torch.Tensor):
        raise ScenarioError(source, _FIELD, f"model {name!r} must return one tensor of class scores, got "
                                            f"{type(out).__name__}")
    if tuple(out.shape) != (1, num_classes):
        raise ScenarioError(source, _FIELD, f"model {name!r} returns shape {list(out.shape)} for one sample of "
                                            f"shape {[1, *input_shape]}; expected [1, {num_classes}] "
                                            f"({num_classes} classes in {what})")
    if not out.is_floating_point():
        raise ScenarioError(source, _FIELD, f"model {name!r} must return floating-point class scores, got "
                                            f"{out.dtype}")
