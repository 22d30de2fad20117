"""fleet.depth_model: the SALF authors' stragglers (drawn depths), their stream, their timing and their policies.

Timing tests use tests/test_timing.py's fleet (timestamps by hand there): backward order fc3, fc2, fc1; device 0
ends fc3 at 25.0 and fc2 at 27.0 s, device 1 at 13.25 and 14.25 s, device 2's download ends at 1.5 s and its
forward pass at 38.5 s, its fc3 at 48.5 and its fc2 at 52.5 s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oracle
from conftest import run, scenario, table
from fedsim.errors import ScenarioError
from fedsim.seeds import KEYED_STREAMS, keyed_rng
from fedsim.spec.depth_model import DepthModelSpec
from fedsim.world.stragglers import NOT_A_STRAGGLER, draw_straggler_depths
from test_timing import TEXT, events_of


def _dm(text: str) -> str:
    return f"fleet.depth_model={text}"


# -- the scenario field ----------------------------------------------------------------------------------------
def test_absent_is_none_and_the_table_is_read():
    assert scenario().fleet.depth_model is None
    assert scenario(_dm("{ stragglers = 0.9 }")).fleet.depth_model == DepthModelSpec(0.9, None)
    assert scenario(_dm('{ stragglers = 0.5, depth = "uniform" }')).fleet.depth_model == DepthModelSpec(0.5, None)
    assert scenario(_dm("{ stragglers = 1, depth = 2 }")).fleet.depth_model == DepthModelSpec(1.0, 2)


@pytest.mark.parametrize("value,field,message", [
    ("{ stragglers = 1.5 }", "fleet.depth_model.stragglers", "must be <= 1, got 1.5"),
    ("{ stragglers = -0.1 }", "fleet.depth_model.stragglers", "must be >= 0, got -0.1"),
    ("{ depth = 2 }", "fleet.depth_model.stragglers", "missing required field"),
    ('{ stragglers = 0.5, depth = "deep" }', "fleet.depth_model.depth", "must be \"uniform\" or an integer >= 0"),
    ("{ stragglers = 0.5, depth = -1 }", "fleet.depth_model.depth", "must be an integer >= 0, got -1"),
    ("{ stragglers = 0.5, depth = 1.5 }", "fleet.depth_model.depth", "must be an integer, got 1.5"),
    ("{ stragglers = 0.5, share = 1 }", "fleet.depth_model.share", "unknown field"),
    ("0.9", "fleet.depth_model", "must be a table, got 0.9"),
])
def test_bad_values_name_the_field_and_the_value(value, field, message):
    with pytest.raises(ScenarioError) as err:
        scenario(_dm(value))
    assert err.value.field == field and message in err.value.message


def test_a_fixed_depth_deeper_than_the_model_is_refused_before_the_run():
    from fedsim.sim.build import build_components

    build_components(scenario(_dm("{ stragglers = 0.5, depth = 3 }")))       # the MLP has 3 layers
    with pytest.raises(ScenarioError) as err:
        build_components(scenario(_dm("{ stragglers = 0.5, depth = 4 }")))
    assert err.value.field == "fleet.depth_model.depth"
    assert "at most the model's 3 layers" in err.value.message and "got 4" in err.value.message


@pytest.mark.parametrize("policy,reason", [
    (['policy.name="wait"'], "no deadline"),
    (['policy.name="partial"'], "fewer samples, not fewer layers"),
    (['policy.name="heterofl"'], "narrower sub-models"),
    (['policy.name="overselect"'], "first participants to finish"),
    (['policy.name="fedasync"', "policy.duration_s=1"], "no rounds"),
    (['policy.name="fedbuff"', "policy.duration_s=1"], "no rounds"),
])
def test_policies_without_a_meaning_for_it_refuse_it_and_say_why(policy, reason):
    with pytest.raises(ScenarioError) as err:
        scenario(_dm("{ stragglers = 0.5 }"), *policy)
    assert err.value.field == "fleet.depth_model"
    assert "cannot run under the depth model" in err.value.message and reason in err.value.message


def test_the_command_line_reports_a_refusal_in_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import BASE_TOML, REPO

    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(tmp_path / "out"),
                           "--set", "fleet.depth_model={ stragglers = 0.5 }", "--set", 'policy.name="wait"'],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "fleet.depth_model: policy wait cannot run under the depth model" in proc.stderr
    assert not (tmp_path / "out").exists()


# -- the draw --------------------------------------------------------------------------------------------------
def test_the_stream_has_its_own_number():
    assert KEYED_STREAMS["depth_model"] == 17
    numbers = list(KEYED_STREAMS.values())
    assert len(set(numbers)) == len(numbers)


def test_the_draw_by_hand():
    """First one uniform per participant (straggler if below p), then one depth on 1..L per participant."""
    spec = DepthModelSpec(0.5, None)
    got = draw_straggler_depths(spec, 6, 4, keyed_rng(9, "depth_model", 2))
    rng = keyed_rng(9, "depth_model", 2)
    u = rng.random(6)
    d = rng.integers(1, 5, size=6)
    assert got.tolist() == [int(d[i]) if u[i] < 0.5 else NOT_A_STRAGGLER for i in range(6)]
    fixed = draw_straggler_depths(DepthModelSpec(0.5, 0), 6, 4, keyed_rng(9, "depth_model", 2))
    assert fixed.tolist() == [0 if u[i] < 0.5 else NOT_A_STRAGGLER for i in range(6)]
    assert draw_straggler_depths(DepthModelSpec(0.0, None), 6, 4, keyed_rng(9, "depth_model", 2)).tolist() == [-1] * 6
    assert draw_straggler_depths(DepthModelSpec(1.0, 3), 6, 4, keyed_rng(9, "depth_model", 2)).tolist() == [3] * 6


def test_the_straggler_share_and_the_depths_match_the_model_within_monte_carlo_error():
    p, n_layers, n, rounds = 0.9, 6, 30, 2000
    draws = np.concatenate([draw_straggler_depths(DepthModelSpec(p, None), n, n_layers,
                                                  keyed_rng(0, "depth_model", r)) for r in range(rounds)])
    total = n * rounds
    share = float((draws != NOT_A_STRAGGLER).mean())
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / total)
    depths = draws[draws != NOT_A_STRAGGLER]
    assert depths.min() == 1 and depths.max() == n_layers     # never 0; every layer reachable
    q = 1 / n_layers
    for d in range(1, n_layers + 1):
        assert abs(float((depths == d).mean()) - q) < 4 * math.sqrt(q * (1 - q) / len(depths)), d


def test_a_run_s_straggler_share_matches_the_model_within_monte_carlo_error(tmp_path):
    """Over 300 rounds of 3 devices (deadline 1000 s: nobody is cut), straggler events and depths delivered."""
    p = 0.3
    out = run(tmp_path, _dm(f"{{ stragglers = {p} }}"), "run.rounds=300", "run.eval_every=300",
              "policy.deadline_s=1000", text=TEXT)
    ev = table(out, "events")
    stragglers = sum(1 for e in ev["event"] if e == "straggler")
    total = 900
    assert abs(stragglers / total - p) < 4 * math.sqrt(p * (1 - p) / total)
    dev = table(out, "devices")
    assert sum(1 for d in dev["depth"] if d < 3) <= stragglers       # a straggler may draw every layer
    assert sorted(set(dev["depth"])) == [1, 2, 3]


# -- simulated time --------------------------------------------------------------------------------------------
def test_stragglers_stop_at_their_depth_by_hand(tmp_path):
    """Everyone a straggler at depth 2, deadline 100 s: each device stops after fc3 and fc2 and the round ends
    when the last one (device 2, at 52.5 s) has delivered its two layers, not at the deadline."""
    out = run(tmp_path, _dm("{ stragglers = 1.0, depth = 2 }"), "policy.deadline_s=100", text=TEXT)
    expected = {
        (-1, "round_start", -1, 0.0),
        (0, "straggler", 1, 0.0), (0, "download_start", -1, 0.0), (0, "download_end", -1, 1.5),
        (0, "forward_end", -1, 20.0), (0, "backward_end", 2, 25.0), (0, "backward_end", 1, 27.0),
        (1, "straggler", 1, 0.0), (1, "download_start", -1, 0.0), (1, "download_end", -1, 1.5),
        (1, "forward_end", -1, 10.75), (1, "backward_end", 2, 13.25), (1, "backward_end", 1, 14.25),
        (2, "straggler", 1, 0.0), (2, "download_start", -1, 0.0), (2, "download_end", -1, 1.5),
        (2, "forward_end", -1, 38.5), (2, "backward_end", 2, 48.5), (2, "backward_end", 1, 52.5),
        (-1, "round_end", -1, 52.5),
    }
    assert sorted(events_of(out, 0)) == sorted(expected)
    dev = table(out, "devices")
    assert dev["depth"][:3] == [2, 2, 2] and dev["layers_computed"][:3] == [2, 2, 2]
    assert dev["status"][:3] == ["partial"] * 3
    assert dev["compute_s"][:3] == [25.5, 12.75, 51.0]
    assert dev["idle_s"][:3] == [25.5, 38.25, 0.0]
    rounds = table(out, "rounds")
    assert rounds["end_s"] == [52.5, 105.0] and rounds["contributors"][0] == [0, 3, 3]


def test_the_deadline_still_cuts_a_straggler_by_hand(tmp_path):
    """Depth 1 for everyone and the 30 s deadline: devices 0 and 1 stop after fc3 (25.0 s, 13.25 s), device 2,
    whose forward pass would end at 38.5 s, is cut at 30 s with nothing: it delivers less than it drew."""
    out = run(tmp_path, _dm("{ stragglers = 1.0, depth = 1 }"), text=TEXT)
    got = events_of(out, 0)
    assert [(e, l, t) for d, e, l, t in got if d == 0] == [
        ("straggler", 2, 0.0), ("download_start", -1, 0.0), ("download_end", -1, 1.5), ("forward_end", -1, 20.0),
        ("backward_end", 2, 25.0)]
    assert [(e, l, t) for d, e, l, t in got if d == 2] == [
        ("straggler", 2, 0.0), ("download_start", -1, 0.0), ("download_end", -1, 1.5), ("cut", -1, 30.0)]
    assert (-1, "deadline", -1, 30.0) in got and (-1, "round_end", -1, 30.0) in got
    dev = table(out, "devices")
    assert dev["depth"][:3] == [1, 1, 0] and dev["status"][:3] == ["partial", "partial", "nothing"]


def test_depth_zero_delivers_nothing_and_drop_discards_stragglers(tmp_path):
    out = run(tmp_path, _dm("{ stragglers = 1.0, depth = 0 }"), "policy.deadline_s=100", text=TEXT)
    got = events_of(out, 0)
    # nothing to compute after the forward pass: each device ends there; -1: no layer reached
    assert [(e, l, t) for d, e, l, t in got if d == 1] == [
        ("straggler", -1, 0.0), ("download_start", -1, 0.0), ("download_end", -1, 1.5), ("forward_end", -1, 10.75)]
    assert table(out, "devices")["status"][:3] == ["nothing"] * 3
    dropped = run(tmp_path, _dm("{ stragglers = 1.0, depth = 2 }"), "policy.deadline_s=100", 'policy.name="drop"',
                  text=TEXT, name="drop")
    assert table(dropped, "rounds")["contributors"][0] == [0, 0, 0]
    kept = run(tmp_path, _dm("{ stragglers = 1.0, depth = 3 }"), "policy.deadline_s=100", 'policy.name="drop"',
               text=TEXT, name="kept")
    assert table(kept, "rounds")["contributors"][0] == [3, 3, 3]      # a straggler that drew every layer counts


def test_no_stragglers_is_the_run_without_the_model(tmp_path):
    """stragglers = 0 draws from its own stream only: every table is the same as without the depth model."""
    plain = run(tmp_path, name="plain")
    zero = run(tmp_path, _dm("{ stragglers = 0.0 }"), name="zero")
    for name in ("events", "devices", "rounds"):
        assert table(plain, name) == table(zero, name), name


def test_other_draws_do_not_move(tmp_path):
    """With stragglers, every device still downloads and computes at the same instants (same slowdowns, same
    batches): the forward_end events are those of the run without the model."""
    plain = run(tmp_path, "policy.deadline_s=1000", name="plain")
    dm = run(tmp_path, _dm("{ stragglers = 0.7 }"), "policy.deadline_s=1000", name="dm")

    def forward_ends(out):
        ev = table(out, "events")
        return [(r, d, t) for r, d, e, t in zip(ev["round"], ev["device"], ev["event"], ev["time_s"])
                if e == "forward_end" and r == 0]

    assert forward_ends(plain) == forward_ends(dm)
    assert table(plain, "devices")["samples"] == table(dm, "devices")["samples"]


# -- aggregation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["module", "tensor"])
def test_salf_aggregates_exactly_the_drawn_depths(tmp_path, granularity):
    """One float64 round with a deadline nobody reaches: every device delivers its drawn depth (the others
    every layer), and the model written is w - lr * the naive per-device layer-wise update of those depths."""
    from fedsim.sim.build import build_components
    from fedsim.sim.server import round_rng

    overrides = ['model.dtype="float64"', f'model.granularity="{granularity}"', "run.rounds=1",
                 "training.momentum=0.0", "policy.deadline_s=1000", _dm("{ stragglers = 0.9 }")]
    out = run(tmp_path, *overrides)
    comp = build_components(scenario(*overrides))
    L, n = comp.profile.n_layers, comp.fleet.n_devices
    drawn = draw_straggler_depths(DepthModelSpec(0.9, None), n, L, keyed_rng(3, "depth_model", 0))
    expected = np.where(drawn != NOT_A_STRAGGLER, drawn, L)
    assert (expected < L).sum() >= 2, "the round must have stragglers short of the whole model"
    dev = table(out, "devices")
    assert dev["depth"] == expected.tolist()
    ev = table(out, "events")
    assert [d for d, e in zip(ev["device"], ev["event"]) if e == "straggler"] == np.flatnonzero(drawn >= 0).tolist()
    assert table(out, "rounds")["contributors"][0] == [int((expected >= L - l).sum()) for l in range(L)]
    rng = round_rng(3, 0)
    batches = [comp.partition.sample_batch(d, 8, rng) for d in range(n)]
    expect = oracle.layerwise_update(comp.model, comp.profile, comp.dataset.x_train, comp.dataset.y_train,
                                     batches, expected)
    final = torch.load(out / "model.pt")
    for name, p in comp.model.named_parameters():
        want = p.detach() if expect[name] is None else p.detach() - 0.1 * expect[name]
        assert torch.allclose(final[name], want, rtol=0, atol=1e-12), name


def test_validate_shows_the_stragglers_drawn():
    from fedsim.sim.build import build_components
    from fedsim.sim.preview import preview

    scn = scenario(_dm("{ stragglers = 0.5 }"))
    got = preview(scn, build_components(scn), rounds=3)
    drawn = np.concatenate([draw_straggler_depths(DepthModelSpec(0.5, None), 8, 3, keyed_rng(3, "depth_model", r))
                            for r in range(3)])
    share = 100 * float((drawn >= 0).mean())
    assert got.lines()[-1] == (f"  depths    fleet.depth_model: {share:.3g}% of participants drawn as stragglers "
                               "(probability 0.5), depth uniform on 1..3")
    assert preview(scenario(), build_components(scenario()), rounds=1).drawn is None
