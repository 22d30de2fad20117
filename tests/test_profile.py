import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from fedsim.errors import FedsimError
from fedsim.learn.models import build_model
from fedsim.learn.profile import Granularity, LayerInfo, ModelProfile, build_profile

MNIST = (1, 28, 28)
MODULE, TENSOR = Granularity.MODULE, Granularity.TENSOR


def model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return build_model(name, MNIST, 10, generator=torch.Generator().manual_seed(0), dtype=dtype)


def by_name(profile: ModelProfile) -> dict[str, LayerInfo]:
    return {layer.name: layer for layer in profile.layers}


def test_mlp_layers_module_granularity():
    profile = build_profile(model("mlp"), MNIST, MODULE)
    assert profile.granularity is MODULE and profile.input_shape == MNIST
    assert [layer.name for layer in profile.layers] == ["fc1", "fc2", "fc3"]
    assert [layer.index for layer in profile.layers] == [0, 1, 2]
    assert profile.layers[0].param_names == ("fc1.weight", "fc1.bias")
    assert [layer.n_params for layer in profile.layers] == [784 * 32 + 32, 32 * 16 + 16, 16 * 10 + 10]


def test_mlp_layers_tensor_granularity():
    profile = build_profile(model("mlp"), MNIST, TENSOR)
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert [layer.name for layer in profile.layers] == names
    assert [layer.param_names for layer in profile.layers] == [(n,) for n in names]
    assert profile.n_layers == 6 and profile.layers[1].n_params == 32


def test_cnn_layers_both_granularities():
    assert [layer.name for layer in build_profile(model("cnn"), MNIST, MODULE).layers] == [
        "conv1", "conv2", "fc1", "fc2"]
    assert [layer.name for layer in build_profile(model("cnn"), MNIST, TENSOR).layers] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("dtype, elem", [(torch.float32, 4), (torch.float64, 8)])
def test_sizes_in_bytes(dtype, elem):
    profile = build_profile(model("mlp", dtype), MNIST, MODULE)
    assert [layer.size_bytes for layer in profile.layers] == [
        elem * (784 * 32 + 32), elem * (32 * 16 + 16), elem * (16 * 10 + 10)]
    assert profile.total_bytes == elem * 25_818
    tensor = build_profile(model("mlp", dtype), MNIST, TENSOR)
    assert tensor.total_bytes == profile.total_bytes and by_name(tensor)["fc1.bias"].size_bytes == elem * 32


def test_mlp_flops_module_granularity():
    layers = by_name(build_profile(model("mlp"), MNIST, MODULE))
    # Forward: 2 FLOPs per MAC. Backward: weight grad, plus input grad except for the first layer.
    assert layers["fc1"].fwd_flops_per_sample == 2 * 784 * 32
    assert layers["fc1"].bwd_flops_per_sample == 2 * 784 * 32
    assert layers["fc2"].fwd_flops_per_sample == 2 * 32 * 16
    assert layers["fc2"].bwd_flops_per_sample == 2 * 2 * 32 * 16
    assert layers["fc3"].fwd_flops_per_sample == 2 * 16 * 10
    assert layers["fc3"].bwd_flops_per_sample == 2 * 2 * 16 * 10


def test_mlp_flops_tensor_granularity():
    layers = by_name(build_profile(model("mlp"), MNIST, TENSOR))
    assert layers["fc1.weight"].fwd_flops_per_sample == 2 * 784 * 32
    assert layers["fc1.bias"].fwd_flops_per_sample == 0
    assert layers["fc1.bias"].bwd_flops_per_sample == 32
    assert layers["fc1.weight"].bwd_flops_per_sample == 2 * 784 * 32 - 32
    assert layers["fc2.bias"].bwd_flops_per_sample == 16
    assert layers["fc2.weight"].bwd_flops_per_sample == 2 * 2 * 32 * 16 - 16
    assert layers["fc3.bias"].bwd_flops_per_sample == 10


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_totals_do_not_depend_on_granularity(name):
    module, tensor = (build_profile(model(name), MNIST, g) for g in (MODULE, TENSOR))
    assert module.fwd_flops_per_sample == tensor.fwd_flops_per_sample
    assert module.bwd_flops_per_sample == tensor.bwd_flops_per_sample
    assert module.fwd_flops_per_sample == sum(layer.fwd_flops_per_sample for layer in module.layers)


def test_cnn_flops():
    layers = by_name(build_profile(model("cnn"), MNIST, MODULE))
    assert layers["conv1"].fwd_flops_per_sample == 2 * (1 * 5 * 5) * 6 * 24 * 24
    assert layers["conv1"].bwd_flops_per_sample == 2 * (1 * 5 * 5) * 6 * 24 * 24  # no input grad
    assert layers["conv2"].fwd_flops_per_sample == 2 * (6 * 5 * 5) * 6 * 8 * 8
    assert layers["conv2"].bwd_flops_per_sample == 2 * 2 * (6 * 5 * 5) * 6 * 8 * 8
    assert layers["fc1"].fwd_flops_per_sample == 2 * 96 * 50
    assert layers["fc1"].bwd_flops_per_sample == 2 * 2 * 96 * 50
    tensor = by_name(build_profile(model("cnn"), MNIST, TENSOR))
    assert tensor["conv1.bias"].bwd_flops_per_sample == 6 * 24 * 24
    assert tensor["conv2.bias"].bwd_flops_per_sample == 6 * 8 * 8


class Reordered(nn.Module):
    """Registers `late` before `early` but calls `early` first."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(8, 3)
        self.early = nn.Linear(4, 8)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_layers_follow_call_order_not_registration_order():
    profile = build_profile(Reordered(), (4,), MODULE)
    assert [layer.name for layer in profile.layers] == ["early", "late"]
    assert profile.layers[0].fwd_flops_per_sample == 2 * 4 * 8
    assert profile.layers[0].bwd_flops_per_sample == 2 * 4 * 8
    tensor = build_profile(Reordered(), (4,), TENSOR)
    assert [layer.name for layer in tensor.layers] == ["early.weight", "early.bias", "late.weight", "late.bias"]


def test_backward_order_and_param_lookup():
    profile = build_profile(model("cnn"), MNIST, MODULE)
    assert profile.backward_order == (3, 2, 1, 0)
    assert build_profile(model("cnn"), MNIST, TENSOR).backward_order == tuple(range(7, -1, -1))
    lookup = profile.layer_of_param()
    assert lookup["conv1.weight"] == lookup["conv1.bias"] == 0 and lookup["fc2.bias"] == 3
    assert len(lookup) == 8


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_profiling_leaves_model_untouched():
    net = WithBatchNorm()
    net.fc.weight.grad = torch.full_like(net.fc.weight, 7.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for granularity in Granularity:
        profile = build_profile(net, (4,), granularity)
    assert [layer.name for layer in profile.layers] == ["fc.weight", "fc.bias", "bn.weight", "bn.bias"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(net.fc.weight.grad, torch.full_like(net.fc.weight, 7.0))
    assert net.fc.bias.grad is None and net.bn.weight.grad is None
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks


def test_zoo_profile_leaves_no_grads():
    net = model("mlp")
    before = [p.detach().clone() for p in net.parameters()]
    build_profile(net, MNIST, MODULE)
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)


def test_unused_parameterised_module_raises():
    net = Unused()
    with pytest.raises(FedsimError, match="spare"):
        build_profile(net, (4,), MODULE)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


class Scaled(nn.Module):
    """Owns a parameter directly and also has a parameterised child."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_parent_layer_does_not_count_its_children():
    profile = build_profile(nn.Sequential(nn.Flatten(), Scaled()), (5,), MODULE)
    assert [layer.name for layer in profile.layers] == ["1", "1.lin"]
    assert profile.layers[0].param_names == ("1.scale",)
    assert profile.layers[0].fwd_flops_per_sample == 0
    assert profile.layers[1].fwd_flops_per_sample == 2 * 5 * 3


# -- FLOPs counted from shapes against FlopCounterMode ---------------------------------------------------------

def _sequential_2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, stride=2),
        nn.ReLU6(), nn.Conv2d(8, 4, 3, dilation=2, padding=2, padding_mode="reflect", bias=False),
        nn.MaxPool2d(2, ceil_mode=True), nn.Dropout2d(0.5), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(4),
        nn.AdaptiveMaxPool2d(3), nn.Flatten(), nn.Linear(36, 20), nn.LayerNorm(20), nn.LeakyReLU(), nn.Linear(20, 20),
        nn.ELU(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Dropout(0.5), nn.Identity(), nn.Linear(20, 10),
        nn.Softmax(dim=1), nn.LogSoftmax(dim=1))


def _sequential_1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.MaxPool1d(2), nn.AvgPool1d(2),
                         nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(12, 5))


def _sequential_3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.MaxPool3d(2), nn.AvgPool3d(1), nn.Flatten(), nn.Linear(54, 4))


def _rows() -> nn.Module:
    """A Linear applied to every row of a (5, 6) sample, then unflattened and flattened again."""
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (5, 4)), nn.Flatten(),
                         nn.Linear(20, 3))


def _frozen(net: nn.Module, *names: str, bias_only: str | None = None) -> nn.Module:
    for name in names:
        net.get_submodule(name).requires_grad_(False)
    if bias_only is not None:
        net.get_submodule(bias_only).weight.requires_grad_(False)
    return net


def _lenet(train_conv2: bool) -> nn.Module:
    from fedsim.world.lenet import MnnLeNet

    return MnnLeNet(train_conv2)


KNOWN_MODELS = {
    "mlp": (lambda: model("mlp"), MNIST),
    "mlp-float64": (lambda: model("mlp", torch.float64), MNIST),
    "mlp-width-0.5": (lambda: build_model("mlp", MNIST, 10, generator=torch.Generator().manual_seed(0), width=0.5),
                      MNIST),
    "cnn": (lambda: model("cnn"), MNIST),
    "cnn-cifar-width-0.25": (lambda: build_model("cnn", (3, 32, 32), 10, generator=torch.Generator().manual_seed(0),
                                                 width=0.25), (3, 32, 32)),
    "cnn-float64": (lambda: model("cnn", torch.float64), MNIST),
    "lenet": (lambda: _lenet(False), MNIST),
    "lenet-conv2-trained": (lambda: _lenet(True), MNIST),
    "sequential-2d": (lambda: _sequential_2d().eval(), (3, 12, 12)),
    "sequential-2d-train-mode": (lambda: _sequential_2d(), (3, 12, 12)),
    "sequential-1d": (_sequential_1d, (2, 20)),
    "sequential-3d": (_sequential_3d, (1, 8, 8, 8)),
    "rows": (_rows, (5, 6)),
    "first-frozen": (lambda: _frozen(_sequential_2d().eval(), "0"), (3, 12, 12)),
    "bias-only": (lambda: _frozen(_sequential_1d(), bias_only="0"), (2, 20)),
    "middle-frozen": (lambda: _frozen(model("cnn"), "conv2"), MNIST),
}


@pytest.mark.parametrize("granularity", [MODULE, TENSOR])
@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_flops_from_shapes_equal_flop_counter_mode(name, granularity):
    """Every built-in model (the zoo at several widths and dtypes, the calibration LeNet) and models of every
    module type counted from shapes, with frozen layers: the same profile, float for float, both ways."""
    make, shape = KNOWN_MODELS[name]
    torch.manual_seed(0)
    analytic = build_profile(make(), shape, granularity, use_flop_counter=False)
    torch.manual_seed(0)
    counted = build_profile(make(), shape, granularity, use_flop_counter=True)
    assert analytic == counted
    assert build_profile(make(), shape, granularity) == counted       # the default picks the analytic count
    assert analytic.fwd_flops_per_sample > 0


class Doubled(nn.Linear):
    """A Linear whose forward is not Linear's: its FLOPs are not known from its type."""

    def forward(self, x):
        return super().forward(x) @ torch.ones(self.out_features, self.out_features)


def test_unknown_modules_are_counted_by_flop_counter_mode():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), Doubled(3, 3))
    profile = build_profile(net, (4,), MODULE)
    assert profile == build_profile(net, (4,), MODULE, use_flop_counter=True)
    # the extra matmul (2 * 3 * 3 forward, and its input gradient) is in the count: not Linear's formula
    assert profile.layers[1].fwd_flops_per_sample == 2 * 3 * 3 + 2 * 3 * 3
    with pytest.raises(FedsimError, match="unknown cost"):
        build_profile(net, (4,), MODULE, use_flop_counter=False)
    # a model flagged as calling only its layers but owning a parameter itself is not counted from shapes
    with pytest.raises(FedsimError, match="unknown cost"):
        build_profile(type("Flagged", (Scaled,), {"flops_in_submodules": True})(), (5,), MODULE,
                      use_flop_counter=False)


def test_profiling_the_built_in_models_imports_no_dynamo_or_sympy():
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from fedsim.learn.models import build_model\n"
            "from fedsim.learn.profile import Granularity, build_profile\n"
            "from fedsim.world.lenet import MnnLeNet, train_flops_per_sample\n"
            "for name in ('mlp', 'cnn'):\n"
            "    m = build_model(name, (1, 28, 28), 10, generator=torch.Generator().manual_seed(0))\n"
            "    build_profile(m, (1, 28, 28), Granularity.TENSOR)\n"
            "train_flops_per_sample(MnnLeNet(), (1, 28, 28))\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
