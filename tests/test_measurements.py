"""Loaders for the real measurement files, and the `measured` compute calibration round trip."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from fedsim.errors import DataError, FedsimError
from fedsim.world.lenet import MnnLeNet, train_flops_per_sample
from fedsim.world.measurements import (
    LENET_TRAIN_FLOPS_PER_SAMPLE, MNIST_SHAPE, REFERENCE_PHONES, BandwidthShape, effective_speed_flops, find_time_tables, flash_bandwidth_bps,
    load_ai_benchmark, load_flash_bandwidth, load_time_table, lognormal_from_moments, measured_speed_flops,
    phone_speeds_flops, sample_bandwidth_bps, sample_phone_speeds_flops,
)
from fedsim.learn.profile import Granularity, build_profile
from fedsim.world.timing import plan_round

from conftest import TRACES_DIR as TRACES

ONDEVICE = TRACES / "ondevice_training"
AI_BENCHMARK = TRACES / "flash" / "raw_ai_benchmark_list.json"
FLASH = TRACES / "flash" / "speed_distri.json"

needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"measurement traces not found at {TRACES}")

# MnnLeNet per sample: forward conv1 2*24*24*20*25, conv2 2*8*8*50*20*25, ip1 2*800*400, ip2 2*400*10;
# backward conv1 weight grad only (first layer), conv2 input grad only (frozen), ip1 and ip2 both.
LENET_FWD = 576_000 + 3_200_000 + 640_000 + 8_000
LENET_BWD = 576_000 + 3_200_000 + 1_280_000 + 16_000


def raw_time_table(path) -> dict[int, float]:
    """The file read here, independently of the loader: batchsize -> expr_train."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {int(row["batchsize"]): float(row["expr_train"]) for row in csv.DictReader(fh)}


def raw_time_table_files() -> dict[str, dict[str, str]]:
    """device -> model -> path of `ondevice_training/DEVICE/time_table_MODEL.csv`, listed with os.listdir."""
    found: dict[str, dict[str, str]] = {}
    for device in os.listdir(ONDEVICE):
        for name in os.listdir(ONDEVICE / device):
            if name.startswith("time_table_") and name.endswith(".csv"):
                found.setdefault(device, {})[name[len("time_table_"):-len(".csv")]] = str(ONDEVICE / device / name)
    return found


@needs_traces
def test_time_tables_are_the_raw_files_in_milliseconds():
    files = raw_time_table_files()
    tables = find_time_tables(ONDEVICE)
    assert {d: {m: str(p) for m, p in models.items()} for d, models in tables.items()} == files
    assert files and all("Lenet" in models for models in files.values())    # the reference model, on every phone
    for device, models in files.items():
        for model, path in models.items():
            table = load_time_table(path)
            assert table == raw_time_table(path), (device, model)
            batches = sorted(table)
            assert batches == [2**k for k in range(len(batches))], (device, model)   # 1, 2, 4, ... as measured
            times = [table[b] for b in batches]
            assert all(a < b for a, b in zip(times, times[1:])), (device, model)    # a bigger batch takes longer
        # Milliseconds: a LeNet step on 16 images at the measured time is an effective speed a phone CPU has,
        # between 0.1 GFLOP/s and 1 TFLOP/s (read as seconds or microseconds it would leave that range 1000x).
        speed = 16 * (LENET_FWD + LENET_BWD) / (load_time_table(files[device]["Lenet"])[16] / 1000)
        assert 1e8 < speed < 1e12, (device, speed)


def positive_score(value) -> float | None:
    try:
        x = float(str(value).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) and x > 0 else None


@needs_traces
def test_real_ai_benchmark_file_loads_row_for_row():
    rows = json.loads(AI_BENCHMARK.read_text(encoding="utf-8"))
    bench = load_ai_benchmark(AI_BENCHMARK)
    usable = [(i, r) for i, r in enumerate(rows) if positive_score(r.get("CPU_F_AI_Score")) is not None]
    assert bench.skipped_rows == tuple(i for i in range(len(rows)) if i not in dict(usable))
    assert [(p.model, p.cpu, p.cpu_f_ai_score) for p in bench.phones] == \
        [(r["Model"].strip(), r["CPU"].strip(), float(r["CPU_F_AI_Score"])) for _, r in usable]
    assert [p.year for p in bench.phones] == [int(r["Year"]) if r["Year"].strip().isdigit() else None
                                              for _, r in usable]
    assert bench.scores().tolist() == [p.cpu_f_ai_score for p in bench.phones]
    # The phone of the XIAOMI time tables is, per the benchmark's cpuinfo log, a Snapdragon 855 phone.
    mi9 = bench.find(REFERENCE_PHONES["XIAOMI"])
    assert mi9.model == REFERENCE_PHONES["XIAOMI"] and "Snapdragon 855" in mi9.cpu
    assert mi9.cpu_f_ai_score == next(float(r["CPU_F_AI_Score"]) for r in rows if r["Model"] == mi9.model)


@needs_traces
def test_real_flash_file_loads_user_for_user():
    users = json.loads(FLASH.read_text(encoding="utf-8"))
    flash = load_flash_bandwidth(FLASH)
    assert flash.user_ids == tuple(users) and flash.n_users == len(users)
    for name, key in (("down_mean_kbps", "down_u"), ("down_sigma_kbps", "down_sigma"), ("up_mean_kbps", "up_u"),
                      ("up_sigma_kbps", "up_sigma")):
        values = getattr(flash, name)
        assert values.shape == (len(users),) and values.tolist() == [float(u[key]) for u in users.values()], name
    assert np.all(flash.down_mean_kbps > 0) and np.all(flash.up_mean_kbps > 0)
    assert np.all(flash.down_sigma_kbps >= 0) and np.all(flash.up_sigma_kbps >= 0)


def test_reference_lenet_flops_are_counted_from_the_model():
    model = MnnLeNet()
    assert sum(p.numel() for p in model.parameters()) == (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 400 + 400) + \
        (400 * 10 + 10)
    profile = build_profile(model, (1, 28, 28), Granularity.MODULE)
    assert profile.fwd_flops_per_sample == LENET_FWD and profile.bwd_flops_per_sample == LENET_BWD
    assert train_flops_per_sample(model, (1, 28, 28)) == 9_496_000
    # the number calibration uses (so that it imports no torch) is this count, float for float
    assert LENET_TRAIN_FLOPS_PER_SAMPLE == train_flops_per_sample(MnnLeNet(), MNIST_SHAPE)
    # Training conv2 too would add its weight gradient.
    assert train_flops_per_sample(MnnLeNet(train_conv2=True), (1, 28, 28)) == 9_496_000 + 3_200_000


@needs_traces
def test_calibration_round_trip():
    """Simulated time of one LeNet batch of 16 through the timing model = the measured time, on every phone."""
    profile = build_profile(MnnLeNet(), (1, 28, 28), Granularity.MODULE)
    for device, models in raw_time_table_files().items():
        path = models["Lenet"]
        measured_ms = raw_time_table(path)[16]
        speed = measured_speed_flops(path, 16)
        assert speed == 16 * 9_496_000 / (measured_ms / 1000), device
        one = np.ones(1)
        plan = plan_round(profile, np.array([0]), np.array([speed]), one, np.array([16.0]), np.array([1]),
                          one, one, np.zeros(1))
        simulated_ms = 1000.0 * (plan.forward_s[0] + plan.backward_s[0].sum())
        # equal in real numbers; 13 roundings of at most 2^-53 in floats (see test_realism), < 2^-49 in all
        assert simulated_ms == pytest.approx(measured_ms, rel=2.0**-49, abs=0), device


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
def test_flash_bandwidth_per_device_has_its_users_mean_in_bit_per_s():
    """20,000 draws per user and direction: each sample mean is within 5 standard errors (sd / sqrt(n)) of the
    user's mean in bit/s (1,000 x kbit/s), down from down_u and up from up_u."""
    users = json.loads(FLASH.read_text(encoding="utf-8"))
    flash = load_flash_bandwidth(FLASH)
    n = 20_000
    down, up = flash_bandwidth_bps(flash, np.repeat(np.arange(flash.n_users), n), np.random.default_rng(0))
    assert down.shape == up.shape == (flash.n_users * n,) and down.min() > 0 and up.min() > 0
    for u, stats in enumerate(users.values()):
        for draws, mean, sd in ((down, stats["down_u"], stats["down_sigma"]), (up, stats["up_u"], stats["up_sigma"])):
            got = draws[u * n:(u + 1) * n].mean()
            assert abs(got - 1000 * mean) <= 5 * 1000 * sd / math.sqrt(n), (u, got, mean)


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
    usable = {i for i, r in enumerate(rows) if positive_score(r.get("CPU_F_AI_Score")) is not None}
    assert {3, 10, 20} <= usable
    rows[3]["CPU_F_AI_Score"] = ""
    rows[10]["CPU_F_AI_Score"] = "N/A"
    del rows[20]["CPU_F_AI_Score"]
    path = tmp_path / "ai.json"
    path.write_text(json.dumps(rows))
    bench = load_ai_benchmark(path)
    assert bench.skipped_rows == tuple(sorted(set(range(len(rows))) - usable | {3, 10, 20}))
    assert len(bench.phones) == len(usable) - 3


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
