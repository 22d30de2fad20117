import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.learn.models import MODEL_NAMES, build_model

MNIST = (1, 28, 28)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names():
    assert MODEL_NAMES == ("mlp", "cnn")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_on_mnist(name):
    model = build_model(name, MNIST, 10, generator=gen())
    assert model(torch.zeros(5, *MNIST)).shape == (5, 10)


def test_mlp_structure_and_parameter_count():
    model = build_model("mlp", MNIST, 10, generator=gen())
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (
        784, 32, 16, 10)
    assert n_params(model) == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10 == 25_818


def test_cnn_structure_and_parameter_count():
    model = build_model("cnn", MNIST, 10, generator=gen())
    assert [n for n, _ in model.named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model.fc1.in_features == 96
    expected = (6 * 1 * 25 + 6) + (6 * 6 * 25 + 6) + (96 * 50 + 50) + (50 * 10 + 10)
    assert n_params(model) == expected == 6_422


def test_cnn_on_three_channel_input():
    model = build_model("cnn", (3, 32, 32), 100, generator=gen())
    assert model.conv1.in_channels == 3 and model.fc1.in_features == 6 * 5 * 5
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_width_scales_only_hidden_sizes():
    mlp = build_model("mlp", MNIST, 10, generator=gen(), width=0.5)
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, mlp.fc3.out_features) == (
        784, 16, 8, 10)
    cnn = build_model("cnn", MNIST, 10, generator=gen(), width=0.5)
    assert (cnn.conv1.in_channels, cnn.conv1.out_channels, cnn.conv2.out_channels) == (1, 3, 3)
    assert (cnn.fc1.in_features, cnn.fc1.out_features, cnn.fc2.out_features) == (3 * 16, 25, 10)
    assert cnn(torch.zeros(1, *MNIST)).shape == (1, 10)


def test_tiny_width_keeps_one_unit():
    mlp = build_model("mlp", MNIST, 10, generator=gen(), width=0.001)
    assert (mlp.fc1.out_features, mlp.fc2.out_features) == (1, 1)


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5])
def test_width_out_of_range(width):
    with pytest.raises(ScenarioError) as info:
        build_model("mlp", MNIST, 10, generator=gen(), width=width, source="s.toml")
    assert info.value.field == "model.width" and str(info.value).startswith("s.toml: model.width: ")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_parameters_different_seed_different(name):
    a, b, c = (build_model(name, MNIST, 10, generator=gen(s)) for s in (7, 7, 8))
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_leaves_global_rng_untouched(name):
    before = torch.get_rng_state()
    build_model(name, MNIST, 10, generator=gen())
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_initialisation_matches_pytorch_default(name):
    """Our generator-driven init draws exactly what the default constructors draw from the global RNG."""
    model = build_model(name, MNIST, 10, generator=gen(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        if name == "mlp":
            reference = [nn.Linear(784, 32), nn.Linear(32, 16), nn.Linear(16, 10)]
        else:
            reference = [nn.Conv2d(1, 6, 5), nn.Conv2d(6, 6, 5), nn.Linear(96, 50), nn.Linear(50, 10)]
    expected = [p for layer in reference for p in layer.parameters()]
    for got, want in zip(model.parameters(), expected, strict=True):
        assert torch.equal(got.detach(), want.detach())


def test_initialisation_bounds():
    model = build_model("mlp", MNIST, 10, generator=gen())
    for layer in (model.fc1, model.fc2, model.fc3):
        bound = 1 / math.sqrt(layer.in_features)
        for p in (layer.weight, layer.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_float64(name):
    m64 = build_model(name, MNIST, 10, generator=gen(1), dtype=torch.float64)
    m32 = build_model(name, MNIST, 10, generator=gen(1))
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert m64(torch.zeros(2, *MNIST, dtype=torch.float64)).dtype == torch.float64
    for p64, p32 in zip(m64.parameters(), m32.parameters()):
        assert torch.equal(p64, p32.double())


def test_unsupported_dtype():
    with pytest.raises(ValueError):
        build_model("mlp", MNIST, 10, generator=gen(), dtype=torch.float16)


def test_cnn_needs_image_input():
    with pytest.raises(ScenarioError) as info:
        build_model("cnn", (60,), 10, generator=gen(), source="s.toml")
    assert str(info.value) == "s.toml: model.name: cnn needs image input (C, H, W), got input shape (60,)"


def test_cnn_image_too_small():
    with pytest.raises(ScenarioError, match="at least 16x16"):
        build_model("cnn", (1, 8, 8), 10, generator=gen())


def test_unknown_name_lists_known_models():
    with pytest.raises(ScenarioError) as info:
        build_model("resnet", MNIST, 10, generator=gen())
    assert info.value.field == "model.name"
    assert "'resnet'" in info.value.message and "'mlp'" in info.value.message and "'cnn'" in info.value.message


FACTORIES = """
    import torch
    from torch import nn

    def tiny(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

    def returns_int(input_shape, num_classes):
        return 3

    def raises(input_shape, num_classes):
        raise RuntimeError("boom")

    not_callable = 42
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "fedsim_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / "fedsim_test_broken.py").write_text("raise ValueError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fedsim_test_factories"
    for name in ("fedsim_test_factories", "fedsim_test_broken"):
        sys.modules.pop(name, None)


def test_factory_builds_a_model(factories):
    before = torch.get_rng_state()
    model = build_model(f"{factories}:tiny", MNIST, 10, generator=gen(), dtype=torch.float64)
    assert torch.equal(before, torch.get_rng_state())
    assert isinstance(model, nn.Sequential) and model[1].weight.dtype == torch.float64
    assert model(torch.zeros(3, *MNIST, dtype=torch.float64)).shape == (3, 10)


def test_factory_is_deterministic_in_the_generator(factories):
    a, b, c = (build_model(f"{factories}:tiny", MNIST, 10, generator=gen(s)) for s in (1, 1, 2))
    assert torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, c[1].weight)


@pytest.mark.parametrize("spec, fragment", [
    ("fedsim_no_such_module:tiny", "cannot import module 'fedsim_no_such_module'"),
    ("fedsim_test_broken:tiny", "ValueError: broken at import"),
    ("fedsim_test_factories:missing", "has no attribute 'missing'"),
    ("fedsim_test_factories:not_callable", "is not callable"),
    ("fedsim_test_factories:returns_int", "must return a torch.nn.Module, got int"),
    ("fedsim_test_factories:raises", "raised RuntimeError: boom"),
    (":tiny", "package.module:function"),
    ("fedsim_test_factories:", "package.module:function"),
    ("a:b:c", "package.module:function"),
])
def test_factory_errors(factories, spec, fragment):
    with pytest.raises(ScenarioError) as info:
        build_model(spec, MNIST, 10, generator=gen(), source="s.toml")
    assert info.value.field == "model.name" and info.value.source == "s.toml"
    assert fragment in info.value.message and repr(spec) in info.value.message


def test_factory_rejects_width(factories):
    with pytest.raises(ScenarioError) as info:
        build_model(f"{factories}:tiny", MNIST, 10, generator=gen(), width=0.5)
    assert info.value.field == "model.width"
