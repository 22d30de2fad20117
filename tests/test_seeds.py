"""The registry of named random streams (fedsim.seeds) gives, bit for bit, the generators each component
has always drawn from: any change here would change every shipped scenario's trace."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim import seeds

SEEDS = [0, 3, 12345, 2**63 - 1]


def _same(a: np.random.Generator, b: np.random.Generator) -> None:
    np.testing.assert_array_equal(a.integers(0, 2**63, 64), b.integers(0, 2**63, 64))
    np.testing.assert_array_equal(a.random(16), b.random(16))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, index", [("data", 0), ("partition", 1), ("model", 2), ("fleet", 3)])
def test_component_streams_are_the_children_of_the_seed(seed, name, index):
    # how fedsim.sim.build drew them: child `index` of four
    _same(seeds.component_rng(seed, name), np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[index]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, index", [("churn", 4), ("network", 5)])
def test_churn_and_network_streams(seed, name, index):
    # how fedsim.sim.server drew them: child `index` of index + 1
    _same(seeds.component_rng(seed, name),
          np.random.default_rng(np.random.SeedSequence(seed).spawn(index + 1)[index]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, number", [("round", 7), ("job", 11), ("select", 12), ("batch", 20)])
def test_keyed_streams(seed, name, number):
    for key in (0, 1, 7, 99_999):
        _same(seeds.keyed_rng(seed, name, key),
              np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(number, key))))


def test_the_engines_draw_from_the_registry():
    from fedsim.sim.async_engine import job_rng, select_rng
    from fedsim.sim.server import round_rng

    for seed in SEEDS:
        _same(round_rng(seed, 5), seeds.keyed_rng(seed, "round", 5))
        _same(job_rng(seed, 5), seeds.keyed_rng(seed, "job", 5))
        _same(select_rng(seed, 5), seeds.keyed_rng(seed, "select", 5))


def test_stream_numbers_are_unique_and_streams_differ():
    numbers = [*seeds.COMPONENT_STREAMS.values(), *seeds.KEYED_STREAMS.values()]
    assert len(numbers) == len(set(numbers))
    first = {name: seeds.component_rng(3, name).integers(0, 2**63) for name in seeds.COMPONENT_STREAMS}
    first |= {name: seeds.keyed_rng(3, name, 0).integers(0, 2**63) for name in seeds.KEYED_STREAMS}
    assert len(set(first.values())) == len(first)


def test_unknown_stream_names_fail():
    with pytest.raises(KeyError):
        seeds.component_rng(1, "round")
    with pytest.raises(KeyError):
        seeds.keyed_rng(1, "data", 0)


def test_build_draws_from_the_registry():
    """The model's initial weights and the partition of a built run come from the named streams."""
    import torch

    from conftest import scenario
    from fedsim.learn.models import build_model
    from fedsim.sim.build import build_components

    scn = scenario()
    comp = build_components(scn)
    generator = torch.Generator().manual_seed(int(seeds.component_rng(3, "model").integers(2**62)))
    want = build_model("mlp", comp.dataset.input_shape, comp.dataset.num_classes, generator=generator)
    for got, ref in zip(comp.model.parameters(), want.parameters(), strict=True):
        assert torch.equal(got, ref)
