"""`fleet.classes[i].layer_time`: a multiplier on each layer's backward duration, per device, round and layer.

Hand-computed on the 3-device fleet of test_timing (batch 1; download ends at 1.5 s; backward fc3, fc2, fc1
takes 160, 64 and 480 FLOPs at 32, 64 and 16 FLOP/s for devices a, b, c).
"""

from __future__ import annotations

import numpy as np

from conftest import run, table
from fedsim.seeds import keyed_rng
from test_timing import TEXT, events_of


def with_layer_time(a: str, b: str, c: str) -> str:
    text = TEXT
    for name, value in (("a", a), ("b", b), ("c", c)):
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\nlayer_time = {value}\n', 1)
    return text


def backward_ends(run_dir, round_=0):
    return {(d, l): t for d, e, l, t in events_of(run_dir, round_) if e == "backward_end"}


def test_fixed_multipliers_by_hand(tmp_path):
    out = run(tmp_path, "run.rounds=1", text=with_layer_time("2", "0.5", "1"))
    # a: forward ends at 20; fc3 takes 5 x 2 = 10 -> 30, exactly at the deadline (counts); fc2 would end at 34
    # b: forward ends at 10.75; 2.5 x 0.5 -> 12.0, 1 x 0.5 -> 12.5, 7.5 x 0.5 -> 16.25
    assert backward_ends(out) == {(0, 2): 30.0, (1, 2): 12.0, (1, 1): 12.5, (1, 0): 16.25}
    assert table(out, "devices")["depth"] == [1, 3, 0]


def clock(start: float, forward_s: float, base_s: list[float], x: np.ndarray) -> list[float]:
    """Backward ends as the engine's clock advances: one phase after another from the round's start."""
    t = start + 1.5
    t = t + forward_s
    out = []
    for b, m in zip(base_s, x.tolist()):
        t = t + b * m
        out.append(t)
    return out


def test_random_multipliers_come_from_their_own_stream(tmp_path):
    exp = '{ dist = "exponential", mean = 1.0 }'
    out = run(tmp_path, "run.rounds=2", "policy.deadline_s=1000", text=with_layer_time(exp, "1", exp))
    for r in range(2):
        rng = keyed_rng(0, "layer_time", r)
        x_a = rng.exponential(1.0, 3)         # class a (device 0), then class c (device 2): class order
        x_c = rng.exponential(1.0, 3)
        start = 0.0 if r == 0 else table(out, "rounds")["end_s"][0]
        got = backward_ends(out, r)
        # backward order: fc3, fc2, fc1 with base durations a: 5, 2, 15; c: 10, 4, 30
        assert [got[(0, l)] for l in (2, 1, 0)] == clock(start, 18.5, [5.0, 2.0, 15.0], x_a)
        assert [got[(2, l)] for l in (2, 1, 0)] == clock(start, 37.0, [10.0, 4.0, 30.0], x_c)
        assert [got[(1, l)] for l in (2, 1, 0)] == [start + 13.25, start + 14.25, start + 21.75]


def test_the_default_draws_nothing(tmp_path):
    plain = run(tmp_path / "a", "run.rounds=2", text=TEXT)
    ones = run(tmp_path / "b", "run.rounds=2", text=with_layer_time("1", "1", '{ dist = "fixed", value = 1 }'))
    for name in ("events", "devices", "rounds"):
        assert table(plain, name) == table(ones, name)
