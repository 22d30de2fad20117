"""Loaders for the real measurement files, and the `measured` compute calibration round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedsim.errors import DataError, FedsimError
from fedsim.measurements import (
    REFERENCE_PHONES, BandwidthShape, MnnLeNet, effective_speed_flops, find_time_tables, flash_bandwidth_bps,
    load_ai_benchmark, load_flash_bandwidth, load_time_table, lognormal_from_moments, measured_speed_flops,
    phone_speeds_flops, sample_bandwidth_bps, sample_phone_speeds_flops, train_flops_per_sample,
)
from fedsim.profile import Granularity, build_profile
from fedsim.timing import plan_round

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
ONDEVICE = TRACES / "ondevice_training"
AI_BENCHMARK = TRACES / "flash" / "raw_ai_benchmark_list.json"
FLASH = TRACES / "flash" / "speed_distri.json"
PHONES = ("XIAOMI", "MEIZU_Freq_1708800", "MEIZU_Core_f0")

needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"measurement traces not found at {TRACES}")

# MnnLeNet per sample: forward conv1 2*24*24*20*25, conv2 2*8*8*50*20*25, ip1 2*800*400, ip2 2*400*10;
# backward conv1 weight grad only (first layer), conv2 input grad only (frozen), ip1 and ip2 both.
LENET_FWD = 576_000 + 3_200_000 + 640_000 + 8_000
LENET_BWD = 576_000 + 3_200_000 + 1_280_000 + 16_000


@needs_traces
def test_every_real_time_table_loads():
    tables = find_time_tables(ONDEVICE)
    assert set(tables) == set(PHONES)
    assert sum(len(models) for models in tables.values()) == 13
    for device, models in tables.items():
        for model, path in models.items():
            table = load_time_table(path)
            assert {1, 2, 4, 8, 16} <= set(table), (device, model)
            assert all(ms > 0 for ms in table.values())
            # Training a batch takes longer than training a smaller one.
            assert table[16] > table[1], (device, model)


@needs_traces
@pytest.mark.parametrize("phone", PHONES)
def test_lenet_batch_16_takes_17_to_21_ms(phone):
    assert 17.0 <= load_time_table(ONDEVICE / phone / "time_table_Lenet.csv")[16] <= 21.0


@needs_traces
def test_real_ai_benchmark_and_flash_files_load():
    bench = load_ai_benchmark(AI_BENCHMARK)
    assert len(bench.phones) + len(bench.skipped_rows) == 333 and len(bench.phones) >= 300
    mi9 = bench.find(REFERENCE_PHONES["XIAOMI"])
    assert mi9.cpu == "Snapdragon 855" and mi9.year == 2019 and mi9.cpu_f_ai_score == 3603.0
    assert np.all(bench.scores() > 0)
    flash = load_flash_bandwidth(FLASH)
    assert flash.n_users == 19 and len(set(flash.user_ids)) == 19
    for arr in (flash.down_mean_kbps, flash.up_mean_kbps):
        assert arr.shape == (19,) and np.all(arr > 0)
    assert flash.down_mean_kbps[0] == 7491.4 and flash.up_sigma_kbps[0] == pytest.approx(2767.319309367822)


def test_reference_lenet_flops_are_counted_from_the_model():
    model = MnnLeNet()
    assert sum(p.numel() for p in model.parameters()) == 349_980
    profile = build_profile(model, (1, 28, 28), Granularity.MODULE)
    assert profile.fwd_flops_per_sample == LENET_FWD and profile.bwd_flops_per_sample == LENET_BWD
    assert train_flops_per_sample(model, (1, 28, 28)) == 9_496_000
    # Training conv2 too would add its weight gradient.
    assert train_flops_per_sample(MnnLeNet(train_conv2=True), (1, 28, 28)) == 9_496_000 + 3_200_000


@needs_traces
@pytest.mark.parametrize("phone", PHONES)
def test_calibration_round_trip(phone):
    """Simulated time of one LeNet batch of 16 through the timing model = the measured time."""
    path = ONDEVICE / phone / "time_table_Lenet.csv"
    measured_ms = load_time_table(path)[16]
    speed = measured_speed_flops(path, 16)
    assert speed == effective_speed_flops(measured_ms, 16 * 9_496_000)
    profile = build_profile(MnnLeNet(), (1, 28, 28), Granularity.MODULE)
    one = np.ones(1)
    plan = plan_round(profile, np.array([0]), np.array([speed]), one, np.array([16.0]), np.array([1]),
                      one, one, np.zeros(1))
    simulated_ms = 1000.0 * (plan.forward_s[0] + plan.backward_s[0].sum())
    assert simulated_ms == pytest.approx(measured_ms, rel=1e-12)
    assert abs(simulated_ms - measured_ms) <= 0.1 * measured_ms   # the acceptance criterion


def test_effective_speed_arithmetic_and_checks():
    assert effective_speed_flops(20.0, 2e8) == 1e10
    with pytest.raises(FedsimError):
        effective_speed_flops(0.0, 1e6)
    with pytest.raises(FedsimError):
        effective_speed_flops(10.0, float("nan"))


@needs_traces
def test_phone_spread_from_ai_benchmark_scores():
    bench = load_ai_benchmark(AI_BENCHMARK)
    ref = bench.find("Xiaomi Mi 9").cpu_f_ai_score
    speeds = phone_speeds_flops(8e9, ref, np.array([ref, 2 * ref, ref / 4]))
    assert speeds.tolist() == [8e9, 16e9, 2e9]
    drawn = sample_phone_speeds_flops(bench, 8e9, ref, 1000, np.random.default_rng(0))
    allowed = set(phone_speeds_flops(8e9, ref, bench.scores()).tolist())
    assert drawn.shape == (1000,) and set(drawn.tolist()) <= allowed and len(set(drawn.tolist())) > 100


def test_bandwidth_draws_match_the_users_moments():
    rng = np.random.default_rng(3)
    mean, sd = np.full(400_000, 4000.0), np.full(400_000, 2000.0)
    x = sample_bandwidth_bps(mean, sd, rng, BandwidthShape.LOGNORMAL)
    assert x.mean() == pytest.approx(4e6, rel=0.01) and x.std() == pytest.approx(2e6, rel=0.02) and x.min() > 0
    y = sample_bandwidth_bps(mean, sd, rng, BandwidthShape.TRUNCATED_NORMAL)
    assert y.min() > 0 and y.mean() == pytest.approx(4e6, rel=0.03)
    d = lognormal_from_moments(4000.0, 2000.0)
    assert d.mean == pytest.approx(4000.0) and d.a < 4000.0


@needs_traces
def test_flash_bandwidth_per_device():
    flash = load_flash_bandwidth(FLASH)
    users = np.arange(10) % flash.n_users
    down, up = flash_bandwidth_bps(flash, users, np.random.default_rng(0))
    assert down.shape == up.shape == (10,) and np.all(down > 0) and np.all(up > 0)
    # kbit/s to bit/s: user means are thousands of kbit/s, so draws are in the Mbit/s range.
    assert 1e5 < np.median(down) < 1e8


GOOD_TABLE = ",batchsize,expr_train,expr_infer,session_infer\n1,1,10.0,0.5,0.3\n2,16,17.5,2.5,2.1\n"
BAD_TABLES = [
    (",batchsize,expr_infer\n1,1,0.5\n", "missing column(s) expr_train"),
    (GOOD_TABLE.replace("17.5", "fast"), "row 2 (line 3): expr_train: not a number, got 'fast'"),
    (GOOD_TABLE.replace("2,16,", "2,x,"), "row 2 (line 3): batchsize: not an integer, got 'x'"),
    (GOOD_TABLE.replace("17.5", "-3"), "row 2 (line 3): expr_train: must be a positive number of ms, got '-3'"),
    (GOOD_TABLE.replace("17.5", "nan"), "row 2 (line 3): expr_train: must be a positive number"),
    (GOOD_TABLE.replace("2,16,", "2,1,"), "row 2 (line 3): batchsize: 1 appears twice"),
    (GOOD_TABLE.replace(",0.5,0.3", ""), "row 1 (line 2): 3 fields, the header has 5"),
    (GOOD_TABLE.split("\n")[0] + "\n", "no rows"),
    ("", "empty file"),
]


@pytest.mark.parametrize("text, problem", BAD_TABLES)
def test_malformed_time_tables(tmp_path, text, problem):
    path = tmp_path / "time_table_Lenet.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_time_table(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_time_table_missing_and_batch_absent(tmp_path):
    with pytest.raises(DataError, match="cannot read the time table"):
        load_time_table(tmp_path / "none.csv")
    path = tmp_path / "t.csv"
    path.write_text(GOOD_TABLE)
    assert load_time_table(path) == {1: 10.0, 16: 17.5}
    with pytest.raises(DataError, match=r"t.csv: no row for batchsize 8 \(rows: \[1, 16\]\)"):
        measured_speed_flops(path, 8)


@needs_traces
def test_ai_benchmark_skips_and_counts_unparsable_scores(tmp_path):
    rows = json.loads(AI_BENCHMARK.read_text())
    rows[3]["CPU_F_AI_Score"] = ""
    rows[10]["CPU_F_AI_Score"] = "N/A"
    del rows[20]["CPU_F_AI_Score"]
    path = tmp_path / "ai.json"
    path.write_text(json.dumps(rows))
    bench = load_ai_benchmark(path)
    assert bench.skipped_rows == (3, 10, 20) and len(bench.phones) == 330


@pytest.mark.parametrize("content, problem", [
    ('[{"Model": "A", "CPU_F_AI_Score": "10"}, 5]', "row 1: expected an object, got int"),
    ('[{"Model": "A", "CPU_F_AI_Score": "10"}, {"CPU_F_AI_Score": "10"}]', "row 1: Model: missing"),
    ('{"Model": "A"}', "expected a JSON list"),
    ('[{"Model": "A", "CPU_F_AI_Score": "10"},', "malformed JSON at line 1"),
    ('[{"Model": "A", "CPU_F_AI_Score": "?"}]', "no row has a usable CPU_F_AI_Score"),
])
def test_malformed_ai_benchmark(tmp_path, content, problem):
    path = tmp_path / "ai.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_ai_benchmark(path)
    assert str(path) in str(info.value) and problem in str(info.value)


FLASH_OK = {"u1": {"down_u": 100.0, "down_sigma": 10.0, "up_u": 50.0, "up_sigma": 5.0}}


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d["u2"].pop("up_u"), "row 1 (user 'u2'): up_u: missing or not a finite number, got None"),
    (lambda d: d["u2"].update(down_u="fast"), "row 1 (user 'u2'): down_u: missing or not a finite number"),
    (lambda d: d["u2"].update(down_u=0), "row 1 (user 'u2'): down_u: must be positive, got 0"),
    (lambda d: d["u2"].update(up_sigma=-1.0), "row 1 (user 'u2'): up_sigma: must be >= 0, got -1.0"),
    (lambda d: d.update(u2=[1, 2]), "row 1 (user 'u2'): expected an object, got list"),
])
def test_malformed_flash_bandwidth(tmp_path, mutate, problem):
    data = {"u1": dict(FLASH_OK["u1"]), "u2": dict(FLASH_OK["u1"])}
    mutate(data)
    path = tmp_path / "speed_distri.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        load_flash_bandwidth(path)
    assert str(path) in str(info.value) and problem in str(info.value)


@needs_traces
def test_truncated_copy_of_a_real_file_is_a_data_error(tmp_path):
    path = tmp_path / "speed_distri.json"
    shutil.copy(FLASH, path)
    path.write_text(path.read_text()[:300])
    with pytest.raises(DataError, match=r"speed_distri.json: malformed JSON at line"):
        load_flash_bandwidth(path)
