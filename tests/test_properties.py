"""Property-based tests (Hypothesis) of the policy contract, on random small fleets.

1. Every synchronous policy's update equals its naive definition: a float64 loop, one device at a time
   with plain torch autograd, that averages per layer over the devices that delivered it (salf) or over
   the devices the policy keeps (drop, wait, overselect, partial, heterofl), then applies server SGD with
   momentum. Checked at the aggregation level (random delivered depths, every gradient path) and end to
   end (random fleets and deadlines; the oracle reads the delivered depths from the trace and redraws the
   mini-batches from the round's own stream).
2. SALF (and drop) with a deadline nobody misses is `wait`: same model, same trace.
3. Traces keep their invariants for random scenarios, every policy, churn, shared links, every upload mode.

Examples are derandomized and no example database is used, so every run checks the same scenarios; a
failure is reported unshrunk unless FEDSIM_PROPERTY_SHRINK=1.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis import strategies as st
from torch import nn

from oracle import round_inputs

SYNC_POLICIES = ("salf", "drop", "wait", "partial", "heterofl", "overselect")
UPLOAD_MODES = ("ideal", "after_compute", "streaming")
LR = 0.1
SAMPLES_PER_DEVICE = 12


# A failing example is reported as generated (its scenario is in the notes, and derandomized runs replay it):
# shrinking simulations costs minutes per failing test. FEDSIM_PROPERTY_SHRINK=1 shrinks it first.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("FEDSIM_PROPERTY_SHRINK") == "1" else [])


def props(n: int):
    """Settings of every property here: n examples, reproducible (no random seed, no database)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- models of any depth (user factories, so the scenario can name them) -------------------------------
class Chain(nn.Module):
    """in -> 6 -> ... -> 6 -> classes: `depth` linear modules with ReLU between them."""

    def __init__(self, n_in: int, n_out: int, depth: int):
        super().__init__()
        sizes = [n_in] + [6] * (depth - 1) + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        x = torch.flatten(x, 1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.relu(x)
        return x


def chain1(input_shape, num_classes):
    return Chain(math.prod(input_shape), num_classes, 1)


def chain2(input_shape, num_classes):
    return Chain(math.prod(input_shape), num_classes, 2)


def chain4(input_shape, num_classes):
    return Chain(math.prod(input_shape), num_classes, 4)


MODELS = ("mlp", f"{__name__}:chain1", f"{__name__}:chain2", f"{__name__}:chain4")


def param_layers(model: nn.Module, granularity: str) -> dict[str, int]:
    """Forward index of the layer of every parameter (these models call their modules in registration
    order): a module's parameters together, or each tensor alone."""
    names = [n for n, _ in model.named_parameters()]
    if granularity == "tensor":
        return {n: i for i, n in enumerate(names)}
    owners: list[str] = []
    for n in names:
        owner = n.rsplit(".", 1)[0]
        if owner not in owners:
            owners.append(owner)
    return {n: owners.index(n.rsplit(".", 1)[0]) for n in names}


# -- scenarios ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    speed: float
    down: float
    up: float
    latency: float
    slow_hi: float


def _log10(lo: float, hi: float):
    return st.floats(lo, hi).map(lambda e: float(f"{10.0 ** e:.4g}"))


devices = st.builds(Device, speed=_log10(5.0, 7.0), down=_log10(5.0, 8.0), up=_log10(5.0, 8.0),
                    latency=st.sampled_from([0.0, 1e-3, 4e-3]), slow_hi=st.sampled_from([1.0, 1.5, 3.0]))


@st.composite
def similar_devices(draw):
    """Devices of one kind, each up to 2x faster or slower: deadlines then split them at many depths."""
    base = draw(devices)
    factors = draw(st.lists(st.floats(0.5, 2.0), min_size=2, max_size=6))
    return [Device(float(f"{base.speed * f:.4g}"), base.down, base.up, base.latency, base.slow_hi) for f in factors]


fleets = st.one_of(st.lists(devices, min_size=1, max_size=6), similar_devices())


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def scenario_text(fleet: list[Device], policy: dict, *, model: str = "mlp", granularity: str = "module",
                  rounds: int = 1, batch: int = 4, steps: int = 1, momentum: float = 0.0, upload: str = "ideal",
                  participants: int | None = None, churn: tuple[float, float] | None = None,
                  shared_ap: float | None = None, seed: int = 1, grad_path: str = "auto") -> str:
    lines = [
        "[run]", 'name = "prop"', f"seed = {seed}", f"rounds = {rounds}",
        "[model]", f"name = {_toml(model)}", f"granularity = {_toml(granularity)}", 'dtype = "float64"',
        "[data]", 'name = "synthetic"', f"samples_per_device = {SAMPLES_PER_DEVICE}", "test_samples_per_device = 3",
        "[training]", f"batch_size = {batch}", f"lr = {LR}", f"momentum = {momentum}", f"local_steps = {steps}",
        f"grad_path = {_toml(grad_path)}",
        "[fleet]", f"participants = {_toml('all' if participants is None else participants)}",
    ]
    for i, d in enumerate(fleet):
        lines += ["[[fleet.classes]]", f'name = "c{i}"', "count = 1", f"speed_flops = {d.speed!r}",
                  f"downlink_bps = {d.down!r}", f"uplink_bps = {d.up!r}", f"latency_s = {d.latency!r}",
                  "power_compute_w = 2.0", "power_tx_w = 1.25", "power_rx_w = 0.5", "power_idle_w = 0.125"]
        if d.slow_hi > 1.0:
            lines.append(f'slowdown = {{ dist = "uniform", low = 1.0, high = {d.slow_hi!r} }}')
        if churn is not None:
            lines.append(f'availability = {{ on_s = {{ dist = "exponential", mean = {churn[0]!r} }}, '
                         f'off_s = {{ dist = "exponential", mean = {churn[1]!r} }} }}')
    lines += ["[network]", f"upload_mode = {_toml(upload)}"]
    if shared_ap is not None:
        lines += ['preset = "shared_ap"', f"ap_bandwidth_bps = {shared_ap!r}", "ap_latency_s = 0.0005"]
    lines.append("[policy]")
    lines += [f"{k} = {_toml(v)}" for k, v in policy.items()]
    return "\n".join(lines) + "\n"


def parse(text: str):
    from fedsim.spec.scenario import parse_scenario

    return parse_scenario(text, "prop.toml", [])


def round_s(profile, d: Device, batch: int, steps: int = 1, upload: str = "ideal",
            shared_ap: float | None = None) -> tuple[float, float]:
    """About how long a device's round takes (at its mean slowdown): until its backward pass starts, and
    from then on. Used to scale deadlines, churn and run lengths, so the cases are interesting."""
    per_flop = (1.0 + d.slow_hi) / 2 * batch / d.speed
    down, up = (d.down, d.up) if shared_ap is None else (min(d.down, shared_ap), min(d.up, shared_ap))
    before = d.latency + 8 * profile.total_bytes / down
    step_flops = profile.fwd_flops_per_sample + profile.bwd_flops_per_sample
    before += (profile.fwd_flops_per_sample + (steps - 1) * step_flops) * per_flop
    after = profile.bwd_flops_per_sample * per_flop
    if upload != "ideal":
        after += profile.n_layers * d.latency + 8 * profile.total_bytes / up
    return before, after


def _short(v: float) -> float:
    return float(f"{v:.6g}")


def realise(fleet: list[Device], policy: dict, options: dict, scales: dict):
    """The scenario text and its components, with times given relative to the devices' round times:
    `scales` may hold deadline = (fraction, device), churn = (on, off) and span (asynchronous runs)."""
    from fedsim.sim.build import build_components

    probe = dict(policy, deadline_s=1.0) if "deadline" in scales else dict(policy)
    if "span" in scales:
        probe["duration_s"] = 1.0
    comp = build_components(parse(scenario_text(fleet, probe, **dict(options, churn=None))))
    phases = [round_s(comp.profile, d, options.get("batch", 4), options.get("steps", 1), options.get("upload", "ideal"),
                      options.get("shared_ap")) for d in fleet]
    times = [a + b for a, b in phases]
    policy, options = dict(policy), dict(options, churn=None)
    if "deadline" in scales:         # somewhere in the backward pass (or uploads) of one device
        fraction, pick = scales["deadline"]
        before, after = phases[pick % len(fleet)]
        if policy["name"] == "partial":      # partial plans the whole round (a prefix of the batch)
            before, after = 0.0, before + after
        policy["deadline_s"] = _short(max(before + fraction * after, 1e-3 * (before + after)))
    if "span" in scales:
        policy["duration_s"] = _short(scales["span"] * max(times))
        policy["eval_every_s"] = _short(policy["duration_s"] / 3)
    if scales.get("churn") is not None:
        on, off = scales["churn"]
        options["churn"] = (_short(on * max(times)), _short(off * max(times)))
    return scenario_text(fleet, policy, **options), comp, policy, options


@dataclass
class Run:
    scn: object
    events: dict
    devices: dict
    rounds: dict
    model: dict


def simulate(text: str, components=None) -> Run:
    from fedsim.run import run_scenario

    scn = parse(text)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run_scenario(scn, out, components=components)
        tabs = {n: pq.read_table(out / f"{n}.parquet").to_pydict() for n in ("events", "devices", "rounds")}
        model = torch.load(out / "model.pt")
    return Run(scn, tabs["events"], tabs["devices"], tabs["rounds"], model)


# -- the naive oracle: one device at a time, float64, plain autograd -----------------------------------------
def device_grad(net: nn.Module, params: dict, x, y, idx) -> tuple[float, dict]:
    """The gradient of one device's mini-batch mean loss at `params`, on a fresh float64 copy."""
    m = copy.deepcopy(net).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(params[n])
    index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    loss = F.cross_entropy(m(x[index].double()), y[index])
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return float(loss.detach()), {n: g for (n, _), g in zip(m.named_parameters(), grads)}


def naive_layerwise(net, params, layer_of, n_layers, x, y, batches, counted, divisor="count", scales=None):
    """Layer l: sum of g_i over devices with counted depth >= L - l, over their number (or over all
    participants); None where nobody reached l. Returns (update, contributors, mean loss of senders)."""
    grads, losses = {}, []
    for i, d in enumerate(counted):
        if d > 0:
            loss, grads[i] = device_grad(net, params, x, y, batches[i])
            losses.append(loss)
    contributors = [sum(1 for d in counted if d >= n_layers - l) for l in range(n_layers)]
    update = {}
    for name, l in layer_of.items():
        members = [i for i, d in enumerate(counted) if d >= n_layers - l]
        if not members:
            update[name] = None
            continue
        total = sum(grads[i][name] for i in members)
        div = len(members) if divisor == "count" else len(counted)
        update[name] = total / div * (1.0 if scales is None else scales[l])
    return update, contributors, (sum(losses) / len(losses) if losses else None)


def mlp_forward(p: dict, x):
    h = F.relu(F.linear(torch.flatten(x, 1), p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    return F.linear(h, p["fc3.weight"], p["fc3.bias"])


def mlp_slices(params: dict, width: float) -> dict[str, tuple[slice, ...]]:
    """HeteroFL: the sub-model keeps the first ceil(width * h) hidden units of the 32-16 MLP."""
    h1, h2 = max(1, math.ceil(32 * width)), max(1, math.ceil(16 * width))
    rows = {"fc1": h1, "fc2": h2, "fc3": params["fc3.weight"].shape[0]}
    cols = {"fc1": params["fc1.weight"].shape[1], "fc2": h1, "fc3": h2}
    out = {}
    for name in params:
        module, kind = name.split(".")
        out[name] = (slice(0, rows[module]), slice(0, cols[module])) if kind == "weight" else (slice(0, rows[module]),)
    return out


def naive_fedavg(net, params, x, y, step_batches, weights, widths=None, n_participants=None):
    """Weighted entrywise mean of the devices' parameter changes after plain local SGD, over lr; entries
    no device held are marked. Devices of width < 1 (HeteroFL, mlp only) train the leading slices."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    wsum = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    for k, batches in enumerate(step_batches):
        width = 1.0 if widths is None else widths[k]
        if widths is not None:
            where = mlp_slices(params, width)
        else:
            where = {n: tuple(slice(None) for _ in p.shape) for n, p in params.items()}
        local = {n: params[n][where[n]].clone().requires_grad_(True) for n in params}
        for s, idx in enumerate(batches):
            index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
            if widths is not None:
                out = mlp_forward(local, x[index].double())
            else:
                out = torch.func.functional_call(net, local, (x[index].double(),))
            loss = F.cross_entropy(out, y[index])
            if s == 0:
                losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, list(local.values()))
            with torch.no_grad():
                local = {n: (p - LR * g).requires_grad_(True) for (n, p), g in zip(local.items(), grads)}
        for n in params:
            total[n][where[n]] += weights[k] * (params[n][where[n]] - local[n].detach())
            wsum[n][where[n]] += weights[k]
    if not step_batches:
        return {n: None for n in params}, None, None
    update, held = {}, {}
    for n in params:
        held[n] = wsum[n] > 0
        update[n] = torch.where(held[n], total[n] / wsum[n].clamp_min(1e-300), torch.zeros_like(total[n])) / LR
        if n_participants is not None:           # drop, aggregation "all": missing devices count as zero
            update[n] = update[n] * len(step_batches) / n_participants
    return update, held, sum(losses) / len(losses)


def naive_sgd(params: dict, bufs: dict, update: dict, momentum: float, held: dict | None = None) -> None:
    """Server SGD with momentum; a tensor with no update is left alone (its momentum too)."""
    for n, g in update.items():
        if g is None:
            continue
        bufs[n] = g.clone() if n not in bufs else momentum * bufs[n] + g
        step = params[n] - LR * bufs[n]
        params[n] = step if held is None else torch.where(held[n], step, params[n])


def unbiased_scales(history: np.ndarray, n_layers: int, n: int) -> list[float]:
    """1 / (1 - P_l^n), P_l = fraction of device-rounds so far (this one included) that missed layer l."""
    total = history.sum()
    out = []
    for l in range(n_layers):
        p = history[: n_layers - l].sum() / total
        out.append(min(1.0 / max(1.0 - p ** n, 1e-3), 1e3))
    return out


# -- trace helpers ------------------------------------------------------------------------------------------
def device_events(events: dict) -> dict[tuple[int, int], list[tuple[int, float, str, int, float]]]:
    """(round, device) -> [(row, time, event, layer, energy)] in file order (device events only)."""
    out = defaultdict(list)
    cols = zip(*(events[k] for k in ("round", "device", "time_s", "event", "layer", "energy_j")))
    for row, (r, d, t, e, layer, energy) in enumerate(cols):
        if d >= 0:
            out[(r, d)].append((row, t, e, layer, energy))
    return out


def rows_of_round(devices: dict, r: int) -> list[int]:
    return [i for i, rr in enumerate(devices["round"]) if rr == r]


def expected_selection(n: int, rng: np.random.Generator, policy: dict, participants: int | None) -> np.ndarray:
    """The participants of a round without churn, drawn as the README describes (sorted sample)."""
    if policy["name"] == "overselect":
        k = min(policy.get("k") or participants or n, n)
        size = min(math.ceil(policy["fraction"] * k - 1e-9), n)
    else:
        size = n if participants is None else min(participants, n)
    if size >= n:
        return np.arange(n)
    return np.sort(rng.choice(np.arange(n), size=size, replace=False))


# =========================================================================================================
# 1a. Aggregation: random delivered depths, every gradient path, against the naive loop
# =========================================================================================================
@props(40)
@given(data=st.data(), model_name=st.sampled_from(MODELS), granularity=st.sampled_from(["module", "tensor"]),
       path=st.sampled_from(["grouped", "vmap", "loop"]),
       rule=st.sampled_from(["salf:mean", "salf:unbiased", "salf:all", "drop:mean", "drop:all", "wait"]))
def test_layerwise_aggregation_equals_per_device_definition(data, model_name, granularity, path, rule):
    from fedsim.learn.grads import GradientEngine
    from fedsim.learn.models import build_model
    from fedsim.learn.profile import Granularity, build_profile
    from fedsim.policies import Aggregation
    from fedsim.policies.drop import Drop
    from fedsim.policies.salf import Salf
    from fedsim.policies.wait import Wait

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="init seed"))
    model = build_model(model_name, (60,), 10, generator=gen, dtype=torch.float64)
    profile = build_profile(model, (60,), Granularity(granularity))
    layer_of = param_layers(model, granularity)
    n_layers = max(layer_of.values()) + 1
    assert profile.layer_of_param() == layer_of

    n = data.draw(st.integers(1, 6), label="devices")
    x = torch.randn(30, 60, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (30,), generator=gen)
    batches = [np.array(data.draw(st.lists(st.integers(0, 29), min_size=1, max_size=6, unique=True)), dtype=np.int64)
               for _ in range(n)]
    depths = np.array(data.draw(st.lists(st.integers(0, n_layers), min_size=n, max_size=n), label="depths"))
    earlier = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n_layers + 1, max_size=n_layers + 1)))
    history = earlier + np.bincount(depths, minlength=n_layers + 1)

    name, _, how = rule.partition(":")
    policy = {"salf": lambda: Salf(deadline_s=1.0, aggregation=Aggregation(how)),
              "drop": lambda: Drop(deadline_s=1.0, aggregation=Aggregation(how)), "wait": Wait}[name]()
    engine = GradientEngine(model, profile, x, y, path=path)
    upd = policy.aggregate(round_inputs(profile, depths, batches, history), engine)

    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    counted = depths if name == "salf" else np.where(depths == n_layers, n_layers, 0)
    scales = unbiased_scales(history, n_layers, n) if how == "unbiased" else None
    expect, contributors, loss = naive_layerwise(model, params, layer_of, n_layers, x, y, batches, counted,
                                                 "all" if how == "all" else "count", scales)
    assert upd.contributors.tolist() == contributors
    assert (upd.train_loss is None) == (loss is None)
    if loss is not None:
        assert upd.train_loss == pytest.approx(loss, rel=1e-12)
    for k, ref in expect.items():
        if ref is None:
            assert upd.grads.get(k) is None, k
        else:
            assert torch.allclose(upd.grads[k], ref, rtol=0, atol=1e-12), k


# =========================================================================================================
# 1b. End to end: a random fleet, deadline and policy; the model after the run against the naive loop
# =========================================================================================================
churn_scales = st.one_of(st.none(), st.tuples(st.sampled_from([1.0, 3.0, 10.0]), st.sampled_from([0.2, 1.0])))
deadline_scales = st.tuples(st.one_of(st.sampled_from([0.5, 0.8, 0.3, 1.0, 1.2, -0.1]), st.floats(0.05, 1.2)),
                            st.integers(0, 5))


@st.composite
def sync_runs(draw, name: str):
    fleet = draw(fleets)
    n = len(fleet)
    policy: dict = {"name": name}
    heavy = False
    model = "mlp" if name == "heterofl" else draw(st.sampled_from(MODELS))
    steps = 1 if name in ("salf", "partial") else draw(st.sampled_from([1, 2]))
    churn = draw(churn_scales)
    participants = None if churn is not None else draw(st.one_of(st.none(), st.integers(1, n)))
    if name == "salf":
        policy["aggregation"] = draw(st.sampled_from(["mean", "unbiased", "all"]))
    elif name == "drop":
        policy["aggregation"] = draw(st.sampled_from(["mean", "all"]))
    elif name == "heterofl":
        widths = draw(st.lists(st.sampled_from([1.0, 0.5, 0.25, 0.1]), min_size=n, max_size=n))
        if draw(st.booleans()):
            # a full-width device whose compute-bound round straddles the deadline (slowdown 1-3x): the
            # entries only it holds are left out in some rounds, while server momentum remembers them
            fleet = [Device(2e5, 1e8, 1e8, 0.0, 3.0)] + fleet[:5]
            widths = [1.0] + [min(w, 0.5) for w in widths[:5]]
            heavy = True
        policy["widths"] = {f"c{i}": w for i, w in enumerate(widths)}
    elif name == "partial" and draw(st.booleans()):
        # compute-bound devices: the deadline leaves each a different prefix of its mini-batch
        fleet = [Device(d.speed, 1e8, 1e8, 0.0, d.slow_hi) for d in fleet]
        heavy = True
    elif name == "overselect":             # select more than K (K < n), keep the first K
        churn, participants = None, None
        policy["fraction"] = draw(st.sampled_from([1.0, 1.5, 2.0]))
        if draw(st.booleans()):
            policy["k"] = draw(st.integers(1, n))
        else:
            participants = draw(st.integers(1, n))
    options = dict(
        model=model, granularity=draw(st.sampled_from(["module", "tensor"])),
        # the unbiased scale and HeteroFL's untouched entries (with momentum) depend on earlier rounds
        rounds=draw(st.integers(2, 3) if policy.get("aggregation") == "unbiased" or name == "heterofl"
                    else st.integers(1, 2)),
        batch=draw(st.integers(2, 6)), steps=steps,
        momentum=0.5 if name == "heterofl" else draw(st.sampled_from([0.0, 0.5])),
        upload=draw(st.sampled_from(UPLOAD_MODES)), participants=participants,
        shared_ap=draw(st.one_of(st.none(), _log10(5.0, 7.0))), seed=draw(st.integers(0, 1000)),
        grad_path=draw(st.sampled_from(["auto", "grouped", "vmap", "loop"])),
    )
    scales = {"churn": churn}
    if name in ("salf", "drop", "partial", "heterofl"):
        scales["deadline"] = (draw(st.floats(0.4, 1.0)), draw(st.integers(0, 5)) if name == "partial" else 0) if heavy \
            else draw(deadline_scales)
    return fleet, policy, options, scales


@pytest.mark.parametrize("name", SYNC_POLICIES)
@props(10)
@given(data=st.data())
def test_sync_policy_update_equals_per_device_definition(name, data):
    fleet, policy, options, scales = data.draw(sync_runs(name))
    text, comp, policy, options = realise(fleet, policy, options, scales)
    note(text)
    start = copy.deepcopy(comp.model)
    run = simulate(text, comp)
    note(f"depths {run.devices['depth']} status {run.devices['status']}")
    layer_of = param_layers(start, options["granularity"])
    n_layers = max(layer_of.values()) + 1
    kinds = {"none" if d == 0 else "all" if d == n_layers else "some" for d in run.devices["depth"]}
    event(f"steps={options['steps']} depths={'+'.join(sorted(kinds))} stopped={'stopped' in run.events['event']}")

    x, y = comp.dataset.x_train, comp.dataset.y_train
    n = len(fleet)
    name, steps, batch = policy["name"], options["steps"], options["batch"]
    params = {k: p.detach().clone().double() for k, p in start.named_parameters()}
    bufs: dict = {}
    history = np.zeros(n_layers + 1, dtype=np.int64)
    per_device = device_events(run.events)
    assert run.rounds["round"] == list(range(options["rounds"]))
    for r in range(options["rounds"]):
        rows = rows_of_round(run.devices, r)
        part = [run.devices["device"][i] for i in rows]
        depths = np.array([run.devices["depth"][i] for i in rows])
        rng = np.random.default_rng(np.random.SeedSequence(options["seed"], spawn_key=(7, r)))
        if options["churn"] is None:
            assert part == expected_selection(n, rng, policy, options["participants"]).tolist()
        else:
            assert part == sorted(set(part))
        step_batches = [[comp.partition.sample_batch(d, batch, rng) for _ in range(steps)] for d in part]
        for d, bs in zip(part, step_batches):    # each device trains on its own samples
            assert all(d * SAMPLES_PER_DEVICE <= i < (d + 1) * SAMPLES_PER_DEVICE for b in bs for i in b)
        history += np.bincount(depths, minlength=n_layers + 1)
        complete = [k for k, dep in enumerate(depths) if dep == n_layers]
        held = None
        if name == "salf":
            how = policy["aggregation"]
            scales = unbiased_scales(history, n_layers, len(part)) if how == "unbiased" else None
            update, contributors, loss = naive_layerwise(start, params, layer_of, n_layers, x, y,
                                                         [b[0] for b in step_batches], depths,
                                                         "all" if how == "all" else "count", scales)
        else:
            members = complete
            weights = [1.0] * len(members)
            widths = None
            batches = [step_batches[k] for k in members]
            if name == "overselect":             # the first K to finish (ties: participant order)
                k_ = min(policy.get("k") or options["participants"] or len(part), len(part))
                done_at = {k: per_device[(r, part[k])][-1][1] for k in complete}
                members = sorted(sorted(complete, key=lambda k: (done_at[k], k))[:k_])
                if len(complete) >= k_:          # ... and the round ends as the K-th finishes
                    assert run.rounds["end_s"][r] == sorted(done_at.values())[k_ - 1], f"round {r}"
                weights, batches = [1.0] * len(members), [step_batches[k] for k in members]
            elif name == "partial":
                samples = [run.devices["samples"][rows[k]] for k in complete]
                members = [k for k, s in zip(complete, samples) if s > 0]
                weights = [float(run.devices["samples"][rows[k]]) for k in members]
                batches = [[step_batches[k][0][: int(w)]] for k, w in zip(members, weights)]
            elif name == "heterofl":
                widths = [policy["widths"][f"c{part[k]}"] for k in members]
            contributors = [len(members)] * n_layers
            every = policy.get("aggregation") == "all"
            if steps == 1 and name in ("drop", "wait", "overselect"):
                counted = [n_layers if k in members else 0 for k in range(len(part))]
                update, contributors, loss = naive_layerwise(start, params, layer_of, n_layers, x, y,
                                                             [b[0] for b in step_batches], counted,
                                                             "all" if every else "count")
            else:
                update, held, loss = naive_fedavg(start, params, x, y, batches, weights, widths,
                                                  len(part) if every else None)
        assert run.rounds["contributors"][r] == contributors, f"round {r}"
        got_loss = run.rounds["train_loss"][r]
        assert (got_loss is None) == (loss is None), f"round {r}"
        if loss is not None:
            assert got_loss == pytest.approx(loss, rel=1e-9), f"round {r}"
        naive_sgd(params, bufs, update, options["momentum"], held)
    for k, want in params.items():
        assert torch.allclose(run.model[k], want, rtol=0, atol=1e-9), k


# =========================================================================================================
# 2. SALF (and drop) with a deadline nobody misses is `wait`
# =========================================================================================================
@st.composite
def no_miss_cases(draw):
    """(policy:aggregation, upload mode, churn): churn makes devices miss layers however long the deadline,
    so only drop (mean) still equals wait, and not in after_compute mode, whose plan looks past the instant
    a device leaves."""
    other = draw(st.sampled_from(["salf:mean", "salf:unbiased", "salf:all", "drop:mean", "drop:all"]))
    upload = draw(st.sampled_from(UPLOAD_MODES))
    churn = None
    if other == "drop:mean" and upload != "after_compute":
        churn = draw(st.one_of(st.none(), st.just((0.3, 0.05))))
    return other, upload, churn


@props(30)
@given(fleet=fleets, model=st.sampled_from(MODELS), granularity=st.sampled_from(["module", "tensor"]),
       rounds=st.integers(1, 3), momentum=st.sampled_from([0.0, 0.5]), shared_ap=st.one_of(st.none(), _log10(5.0, 7.0)),
       seed=st.integers(0, 1000), case=no_miss_cases(), slack=st.one_of(st.just(1.0), st.floats(1.0 + 1e-6, 3.0)))
# devices that went offline (churn) and a deadline exactly at the round's end: nobody was cut, no `deadline` event
@example(fleet=[Device(s, 1526000.0, 116100.0, 0.004, 3.0) for s in (179700.0, 190000.0, 190900.0, 110300.0,
                                                                      77800.0, 131100.0)],
         model="test_properties:chain4", granularity="tensor", rounds=1, momentum=0.0, shared_ap=None, seed=986,
         case=("drop:mean", "streaming", (0.3, 0.05)), slack=1.0)
def test_deadline_nobody_misses_equals_wait(fleet, model, granularity, rounds, momentum, shared_ap, seed, case, slack):
    other, upload, churn = case
    options = dict(model=model, granularity=granularity, rounds=rounds, momentum=momentum, upload=upload,
                   churn=churn, shared_ap=shared_ap, seed=seed)
    wait = simulate(scenario_text(fleet, {"name": "wait"}, **options))
    longest = max(wait.rounds["duration_s"])
    # a deadline exactly at the slowest finish counts as met; only the first round starts at 0 exactly
    # (later, start + (end - start) may round below end); after_compute plans at the exact instant are
    # test_after_compute_plan_meets_a_deadline_it_ends_on_exactly
    if slack == 1.0 and (rounds > 1 or upload == "after_compute"):
        slack = 1.0 + 1e-9
    name, _, how = other.partition(":")
    text = scenario_text(fleet, {"name": name, "deadline_s": longest * slack, "aggregation": how}, **options)
    note(text)
    run = simulate(text)
    for k in wait.model:
        assert torch.equal(run.model[k], wait.model[k]), k
    assert run.events == wait.events
    assert run.devices == wait.devices
    a, b = dict(run.rounds), dict(wait.rounds)
    assert a.pop("policy") != b.pop("policy")
    assert b.pop("deadline_s") == [None] * len(b["round"]) and None not in a.pop("deadline_s")
    assert a == b


@props(10)
@example(fleet=[Device(1e5, 353300.0, 1.028e7, 0.0, 1.0)], seed=0)
@given(fleet=fleets, seed=st.integers(0, 1000))
def test_after_compute_plan_meets_a_deadline_it_ends_on_exactly(fleet, seed):
    options = dict(upload="after_compute", seed=seed)
    wait = simulate(scenario_text(fleet, {"name": "wait"}, **options))
    deadline = wait.rounds["end_s"][0]         # the slowest device's last upload ends then (round 0 starts at 0)
    run = simulate(scenario_text(fleet, {"name": "salf", "deadline_s": deadline}, **options))
    assert run.devices["depth"] == wait.devices["depth"]


# =========================================================================================================
# 3. Trace invariants, every policy (asynchronous ones included), churn, shared links, upload modes
# =========================================================================================================
@st.composite
def any_runs(draw, name: str):
    fleet = draw(fleets)
    n = len(fleet)
    policy: dict = {"name": name}
    scales: dict = {"churn": draw(churn_scales)}
    rounds = draw(st.integers(1, 3))
    if name == "heterofl":
        policy["widths"] = {f"c{i}": w for i, w in enumerate(draw(st.lists(st.sampled_from([1.0, 0.5, 0.1]),
                                                                                  min_size=n, max_size=n)))}
    elif name == "overselect":
        policy["fraction"] = draw(st.sampled_from([1.0, 1.5, 3.0]))
    elif name in ("fedasync", "fedbuff"):
        policy["max_staleness"] = draw(st.integers(0, 3))
        policy["staleness_exponent"] = 0.5
        if draw(st.booleans()):
            policy["max_concurrency"] = draw(st.integers(1, n))
        if name == "fedbuff":
            policy["buffer_size"] = draw(st.integers(1, 3))
        scales["span"] = draw(st.floats(1.0, 6.0))
        rounds = 40                  # an upper bound on server updates
    if name in ("salf", "drop", "partial", "heterofl"):
        scales["deadline"] = draw(deadline_scales)
    options = dict(
        model="mlp" if name == "heterofl" else draw(st.sampled_from(MODELS)),
        granularity=draw(st.sampled_from(["module", "tensor"])), rounds=rounds,
        batch=draw(st.integers(1, 6)), upload=draw(st.sampled_from(UPLOAD_MODES)),
        participants=draw(st.one_of(st.none(), st.integers(1, n))),
        shared_ap=draw(st.one_of(st.none(), _log10(5.0, 7.0))), seed=draw(st.integers(0, 1000)),
        steps=1 if name in ("salf", "fedasync", "fedbuff") else draw(st.sampled_from([1, 2])),
    )
    return fleet, policy, options, scales


def _check_device_round(key, evs: list, row: dict, n_layers: int, upload: str, layerwise: bool) -> None:
    """One device's events in one round (or one asynchronous job) against its devices row."""
    kinds = [e for _, _, e, _, _ in evs]
    times = [t for _, t, _, _, _ in evs]
    assert kinds[0] == "download_start" and kinds.count("download_start") == 1, key
    assert times == sorted(times), key
    ends = [k for k, e in enumerate(kinds) if e in ("cut", "offline", "stopped")]
    # every device-round ends once: at most one stop per lane (streaming has two lanes), nothing after it
    assert len(ends) <= (2 if upload == "streaming" else 1), (key, kinds)
    assert all(k >= len(kinds) - len(ends) for k in ends), (key, kinds)
    assert len({kinds[k] for k in ends}) <= 1, (key, kinds)
    assert ("offline" in kinds) == (row["status"] == "offline"), (key, kinds, row["status"])
    backward = [layer for _, _, e, layer, _ in evs if e == "backward_end"]
    uploaded = [layer for _, _, e, layer, _ in evs if e == "upload_end"]
    # the backward pass runs last layer first: what a device computed is a suffix, in that order
    assert backward == list(range(n_layers - 1, n_layers - 1 - len(backward), -1)), (key, backward)
    assert row["layers_computed"] == len(backward), key
    if upload == "ideal":
        assert uploaded == [], key
    else:
        assert uploaded == backward[: len(uploaded)], (key, uploaded)
        assert kinds.count("upload_start") in (len(uploaded), len(uploaded) + 1), key
    assert 0 <= row["depth"] <= n_layers, key
    if layerwise:                    # delivered = the last `depth` layers
        assert row["depth"] == (len(backward) if upload == "ideal" else len(uploaded)), key
    if "cut" in kinds:
        assert row["depth"] < n_layers, key
    # energy in devices.parquet is recomputable from the events
    spent = row["energy_download_j"] + row["energy_compute_j"] + row["energy_upload_j"]
    assert sum(e for *_, e in evs) == pytest.approx(spent, rel=1e-9, abs=1e-12), key
    assert row["energy_j"] == pytest.approx(spent + row["energy_idle_j"], rel=1e-12, abs=1e-15), key


def _status_matches(row: dict, n_layers: int) -> bool:
    if row["status"] == "offline":
        return True
    return row["status"] == ("complete" if row["depth"] == n_layers else "nothing" if row["depth"] == 0 else "partial")


@pytest.mark.parametrize("name", SYNC_POLICIES + ("fedasync", "fedbuff"))
@props(10)
@given(data=st.data())
def test_trace_invariants(name, data):
    fleet, policy, options, scales = data.draw(any_runs(name))
    text, comp, policy, options = realise(fleet, policy, options, scales)
    note(text)
    n_layers = comp.profile.n_layers
    asynchronous = name in ("fedasync", "fedbuff")
    run = simulate(text, comp)
    ev, dev, rnd = run.events, run.devices, run.rounds
    ends = {e for e in ev["event"] if e in ("cut", "offline", "stopped", "update_discarded")}
    event("ends: " + "+".join(sorted(ends)))
    n_rows = len(dev["round"])
    dev_rows = [{k: dev[k][i] for k in dev} for i in range(n_rows)]

    # simulated time never goes backward: events in file order, rounds in order
    assert ev["time_s"] == sorted(ev["time_s"])
    assert all(t >= 0 for t in ev["time_s"])
    assert all(s <= e for s, e in zip(rnd["start_s"], rnd["end_s"]))
    assert rnd["end_s"] == sorted(rnd["end_s"])
    assert all(d == pytest.approx(e - s, abs=1e-12) for s, e, d in zip(rnd["start_s"], rnd["end_s"], rnd["duration_s"]))
    assert all(0 <= row["depth"] <= n_layers and _status_matches(row, n_layers) for row in dev_rows)
    assert sum(rnd["energy_j"]) == pytest.approx(sum(dev["energy_j"]), rel=1e-9, abs=1e-12)
    assert all(len(c) == n_layers for c in rnd["contributors"])
    if options["churn"] is None:
        assert "offline" not in dev["status"]

    if asynchronous:
        _check_async(run, policy, options, dev_rows, n_layers)
        return
    per = device_events(ev)

    # synchronous: rounds 0..R-1, back to back, each with its round_start/round_end, every device-round once
    rounds = options["rounds"]
    assert rnd["round"] == list(range(rounds))
    assert all(e <= s for e, s in zip(rnd["end_s"], rnd["start_s"][1:]))
    server = Counter((r, e) for r, d, e in zip(ev["round"], ev["device"], ev["event"]) if d < 0)
    for r in range(rounds):
        assert server[(r, "round_start")] == 1 and server[(r, "round_end")] == 1, r
        assert server[(r, "deadline")] <= 1, r
    for r, d, t, e in zip(ev["round"], ev["device"], ev["time_s"], ev["event"]):
        assert rnd["start_s"][r] <= t <= rnd["end_s"][r], (r, d, e)
        if d < 0 and e in ("round_end", "deadline"):
            assert t == rnd["end_s"][r]
        if d < 0 and e == "round_start":
            assert t == rnd["start_s"][r]
    keys = [(row["round"], row["device"]) for row in dev_rows]
    assert len(set(keys)) == len(keys)
    assert set(keys) == set(per)
    layerwise = name in ("salf", "drop", "wait", "overselect", "partial", "heterofl")
    for key, row in zip(keys, dev_rows):
        evs = per[key]
        _check_device_round(key, evs, row, n_layers, options["upload"], layerwise)
        assert evs[0][1] == rnd["start_s"][key[0]], key        # every participant starts with the round
        if options["upload"] != "streaming":                     # one lane: phases back to back
            busy = row["download_s"] + row["compute_s"] + row["upload_s"] + row["idle_s"]
            assert busy == pytest.approx(rnd["duration_s"][key[0]], rel=1e-9, abs=1e-12), key
        if "stopped" in [e for _, _, e, _, _ in evs]:
            assert name == "overselect", key
    for r in range(rounds):
        depths = [row["depth"] for row in dev_rows if row["round"] == r]
        assert rnd["participants"][r] == len(depths)
        assert rnd["delivered_any"][r] == sum(d > 0 for d in depths)
        assert rnd["completed"][r] == sum(d == n_layers for d in depths)
        if name == "salf":
            assert rnd["contributors"][r] == [sum(d >= n_layers - l for d in depths) for l in range(n_layers)]
        if server[(r, "deadline")]:
            assert rnd["end_s"][r] == pytest.approx(rnd["start_s"][r] + policy["deadline_s"], rel=1e-12)
            assert any(row["status"] != "complete" for row in dev_rows if row["round"] == r)


def _check_async(run: Run, policy: dict, options: dict, dev_rows: list, n_layers: int) -> None:
    ev, rnd = run.events, run.rounds
    duration = policy["duration_s"]
    k = policy.get("buffer_size", 1)
    assert max(ev["time_s"], default=0.0) <= duration
    assert all(e <= duration for e in rnd["end_s"])
    # jobs: one devices row per download; a device runs one job at a time, each ending exactly once
    jobs: dict[int, list[list]] = defaultdict(list)
    cols = zip(ev["round"], ev["device"], ev["time_s"], ev["event"], ev["layer"])
    for row, (version, device, t, e, layer) in enumerate(cols):
        if device < 0 or e == "update_discarded":
            continue
        if e == "download_start":
            jobs[device].append([])
        jobs[device][-1].append((version, row, t, e, layer))
    rows_by_device = Counter(row["device"] for row in dev_rows)
    for device, device_jobs in jobs.items():
        assert rows_by_device[device] == len(device_jobs), device
    for device, device_jobs in jobs.items():
        for a, b in zip(device_jobs, device_jobs[1:]):
            assert a[-1][2] <= b[0][2], device             # the next job starts after the previous ends
        for job in device_jobs:
            assert len({x[0] for x in job}) == 1              # one model version per job
            kinds = [x[3] for x in job]
            backward = [x[4] for x in job if x[3] == "backward_end"]
            assert backward == list(range(n_layers - 1, n_layers - 1 - len(backward), -1)), (device, backward)
            ends = [i for i, e in enumerate(kinds) if e in ("cut", "offline", "stopped")]
            assert "cut" not in kinds, (device, kinds)      # no deadline
            assert len(ends) <= (2 if options["upload"] == "streaming" else 1), (device, kinds)
            assert all(i >= len(kinds) - len(ends) for i in ends), (device, kinds)
    # server updates: indices 0..U-1 in time order, each applying K updates of complete devices
    applied = [(r, t) for r, d, t, e in zip(ev["round"], ev["device"], ev["time_s"], ev["event"])
               if e == "update_applied"]
    assert [r for r, _ in applied] == list(range(len(applied)))
    assert len(applied) <= options["rounds"]
    updates = [i for i, p in enumerate(rnd["participants"]) if p > 0]
    assert [rnd["round"][i] for i in updates] == list(range(len(applied)))
    assert [rnd["end_s"][i] for i in updates] == [t for _, t in applied]
    complete = Counter(row["round"] for row in dev_rows if row["status"] == "complete")
    for u in range(len(applied)):
        assert complete[u] == k == rnd["participants"][updates[u]], u
    assert all(row["depth"] in (0, n_layers) for row in dev_rows)
    assert all((row["status"] == "complete") == (row["depth"] == n_layers) for row in dev_rows)
    # staleness: a device's applied updates are its delivered, not discarded jobs, in order; each was at
    # most max_staleness versions old when it arrived, and is applied at or after its arrival
    steps_at = [t for _, t in applied]
    discarded = {(d, t) for d, t, e in zip(ev["device"], ev["time_s"], ev["event"]) if e == "update_discarded"}
    last = "upload_end" if options["upload"] != "ideal" else "backward_end"
    for device, device_jobs in jobs.items():
        arrived = [(job[0][0], job[-1][2]) for job in device_jobs if sum(x[3] == last for x in job) == n_layers]
        for version, t in arrived:
            if (device, t) in discarded:       # staler than max_staleness at arrival
                assert sum(a <= t for a in steps_at) - version > policy["max_staleness"], (device, version, t)
        kept = [(v, t) for v, t in arrived if (device, t) not in discarded]
        rounds = [row["round"] for row in dev_rows if row["device"] == device and row["status"] == "complete"]
        assert len(rounds) <= len(kept), device
        for (version, t), u in zip(kept, rounds):
            assert sum(a < t for a in steps_at) - version <= policy["max_staleness"], (device, version, t)
            assert version <= u and steps_at[u] >= t, (device, version, t, u)
    evals = [i for i, p in enumerate(rnd["participants"]) if p == 0]
    assert evals and rnd["end_s"][evals[-1]] == max(rnd["end_s"])
