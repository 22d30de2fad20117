"""Every benchmark runs in a small --quick form and its final JSON line holds results that a broken benchmark
would get wrong: the gradient engine agrees with the naive loop, counts match the scenario, and the figures
derived from one another agree.

No timing assertions: the machines are shared and noisy; docs/PERFORMANCE.md holds the measured figures.
"""

from __future__ import annotations

import importlib
import json
import math
import tomllib

import pytest

from conftest import REPO


def run_benchmark(name: str, capsys, *argv: str) -> dict:
    """`python -m benchmarks.NAME --quick ARGV`, in this process: its result, checked to be its last line."""
    result = importlib.import_module(f"benchmarks.{name}").main(["--quick", *argv])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert len(lines) > 3, "a readable table comes before the JSON line"
    assert result["benchmark"] == name and result["quick"] is True
    return result


def test_grad_benchmark(capsys):
    r = run_benchmark("grad", capsys, "--participants", "6")
    assert r["participants"] == 6 and r["batch"] == 16 and r["stragglers"] == 0.9 and r["data"] in {"mnist", "random"}
    threads = set(r["mm_peak_gflops"])
    assert threads and all(int(t) >= 1 and r["mm_peak_gflops"][t] > 0 for t in threads)
    for name, layers in (("mlp", 3), ("cnn", 4)):    # the paper's 784-32-16-10 MLP; its CNN: 2 conv + 2 linear
        assert r[f"{name}_layers"] == layers
        # 6 participants: round(0.9 * 6) = 5 stragglers (depths 0..L-1) and one device delivering every layer
        assert 1 <= r[f"{name}_contributors"] <= 6 and r[f"{name}_useful_mflop"] > 0
        # fedsim's layer sums equal the naive per-device loop's up to float32 rounding (unit 2^-24 = 6e-8; sums of
        # at most 96 per-sample gradients in different orders; about 2e-7 is usual): 1e-5 catches any real error
        assert 0 <= r[f"{name}_rel_err"] < 1e-5, r[f"{name}_rel_err"]
        by_threads, naive_by_threads = r[f"{name}_ms_by_threads"], r[f"{name}_naive_ms_by_threads"]
        assert set(by_threads) == set(naive_by_threads) == threads
        assert str(r["threads_best"][name]) in threads
        assert r[f"{name}_ms"] == min(by_threads.values()) == by_threads[str(r["threads_best"][name])]
        assert r[f"{name}_naive_ms"] == min(naive_by_threads.values())
        # derived figures, each rounded to 3 significant places or better: agreement to 2% at least
        assert r[f"{name}_speedup"] == pytest.approx(r[f"{name}_naive_ms"] / r[f"{name}_ms"], rel=0.02)
        assert r[f"{name}_gflops"] == pytest.approx(r[f"{name}_useful_mflop"] / r[f"{name}_ms"], rel=0.02)
        peak = r["mm_peak_gflops"][str(r["threads_best"][name])]
        assert r[f"{name}_peak_fraction"] == pytest.approx(r[f"{name}_gflops"] / peak, rel=0.02)


def test_end_to_end_benchmark(capsys):
    r = run_benchmark("end_to_end", capsys, "--rounds", "1", "--threads", "1")
    assert r["rounds"] == r["fedsim_rounds"] == 1 and r["threads"] == 1 and r["data"] in {"mnist", "random"}
    # the paper scenario has stragglers every round, so a round lasts its deadline at most
    deadline_s = tomllib.loads((REPO / "scenarios" / "paper_mnist_mlp.toml").read_text())["policy"]["deadline_s"]
    assert 0 < r["fedsim_sim_time_s"] <= deadline_s
    # both evaluate on the 10,000 test images (MNIST's, or the stand-in's of the same shapes): whole counts
    for key in ("fedsim_accuracy", "replica_accuracy"):
        assert 0 <= r[key] <= 1 and math.isclose(r[key] * 10_000, round(r[key] * 10_000), abs_tol=1e-6), key
    assert r["fedsim_s"] > 0 and r["replica_s"] > 0
    assert r["e2e_speedup"] == pytest.approx(r["replica_s"] / r["fedsim_s"], rel=0.02)


def test_engine_benchmark(capsys):
    r = run_benchmark("engine", capsys, "--devices", "100", "--fleet-devices", "2000")
    rounds, devices, layers = r["rounds"], r["devices"], r["layers"]
    assert (rounds, devices, layers) == (2, 100, 10)     # --quick: 2 rounds; benchmarks.models:deep_mlp
    # The deadline cuts most devices partway through the backward pass.
    assert 0 < r["straggler_fraction"] < 1 and 0 < r["mean_depth"] < layers
    # Ideal uploads and a star network: a device's round is one timeout per phase it completes: download,
    # forward, then one per backward layer, as many as its depth (what it delivers); no uploads.
    phases = r["phase_events"]
    assert set(phases) == {"download_end", "forward_end", "backward_end", "upload_end"} and phases["upload_end"] == 0
    assert phases["backward_end"] == pytest.approx(rounds * devices * r["mean_depth"], abs=0.5)  # 3 decimals
    assert rounds * devices >= phases["download_end"] >= phases["forward_end"] > 0
    # Everything else is a few events per round (its deadline, the end of its devices, the server's wait), none
    # per device: a device round costs the events of its phases and nothing more.
    assert 0 < r["events"] - sum(phases.values()) <= 5 * rounds
    assert r["events_per_round"] == round(r["events"] / rounds)
    # events/s and ms per round come from the same event time: their product is the events per round
    assert r["events_per_s"] * r["round_event_ms"] / 1000 == pytest.approx(r["events"] / rounds, rel=0.02)
    assert r["by_upload_mode"] == {"ideal": {"events_per_s": r["events_per_s"], "round_event_ms": r["round_event_ms"],
                                             "round_event_ms_at_once": r["round_event_ms_at_once"]}}
    assert r["round_event_ms_at_once"] > 0
    assert r["bare_simpy_events_per_s"] > 0 and r["setup_round_ms"] > 0 and r["finish_round_ms"] > 0
    # The memory run: the fleet asked for, its round completed; well under the 2 GB target of 100,000 devices.
    assert r["fleet_devices"] == 2000 and r["fleet_rounds"] == r["fleet_rounds_run"] == 1
    assert 0 < r["fleet_rss_mb"] < 2048 and r["fleet_100k_rss_mb"] is None


def test_scale_benchmark(capsys):
    r = run_benchmark("scale", capsys)
    sizes = [(f["devices"], f["participants"], f["churn"]) for f in r["fleets"]]
    assert sizes == [(1_000, 100, False), (10_000, 100, False), (1_000, 1_000, False), (1_000, 100, True)]
    assert r["rounds"] == 2 and r["ms_per_round_1k_churn"] == pytest.approx(r["fleets"][3]["ms_per_round"], abs=6e-4)
    for f in r["fleets"]:
        # SALF, 3 layers, star network, ideal uploads: a participant's round is at most download, forward and
        # 3 backward timeouts, plus a few events of the round itself, and never less than its download
        assert f["participants"] <= f["events_per_round"] <= 5 * f["participants"] + 10
        assert f["import_s"] > 0 and f["build_s"] > 0 and f["ms_per_round"] > 0 and f["simpy_ms_per_round"] > 0
        assert f["last_round_s"] > 0 and f["event_path_ms_per_round"] > 0
        assert f["rss_mb"] > 50
    assert r["build_s_1m"] is None and r["rss_mb_1m"] is None     # --quick leaves the million out
    # the headline is the raw figure to 3 decimals, the table's to 4: equal up to those roundings
    assert r["ms_per_round_k1000"] == pytest.approx(r["fleets"][2]["ms_per_round"], abs=6e-4)
    # n flows of 1..n kB on one 8 Mbit/s link end one by one; the last when every bit has crossed the link
    n = r["shared_link_flows"]
    assert n == 200 and r["shared_link_end_s"] == pytest.approx(8e3 * n * (n + 1) / 2 / 8e6, rel=1e-12)
    assert r["shared_link_1000_s"] is None and r["shared_link_3000_s"] is None     # --quick: 200 flows only


def test_scale_paired_ratio(capsys):
    from benchmarks.scale import main

    main(["--paired", "200", "3000", "--rounds", "3"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["small"], r["large"], r["participants"], r["churn"], r["rounds"]) == (200, 3000, 100, False, 3)
    assert r["small_ms_per_round"] > 0 and r["large_ms_per_round"] > 0 and r["ratio"] > 0


def test_startup_benchmark(capsys):
    """The commands that need no model import no torch; building the paper MLP imports torch but neither
    torch._dynamo (FlopCounterMode) nor sympy (Module.to_empty); the figures add up."""
    r = run_benchmark("startup", capsys)
    assert r["repeats"] == 1 and len(r["commands"]) == 4
    assert all(c["modules"] == [] and c["wall_s"] > 0 for c in r["commands"].values())
    assert r["build_modules"] == ["torch"] and r["build_data"] in {"mnist", "synthetic"}
    assert r["import_build_s"] == pytest.approx(r["import_s"] + r["build_s"], abs=2e-4)
    assert r["build_process_s"] >= r["import_build_s"] - 1e-3


def test_round_parts_benchmark(capsys):
    r = run_benchmark("round_parts", capsys)
    assert (r["devices"], r["participants"], r["rounds"]) == (400, 200, 2)
    assert r["participants"] <= r["events_per_round"] <= 5 * r["participants"] + 10
    # the parts are nested in the round: set-up, events and the end add up to it (medians of two rounds: means)
    assert r["ms_round"] == pytest.approx(r["ms_setup_round"] + r["ms_events"] + r["ms_finish_round"], abs=2e-3)
    assert 0 < r["ms_sample_batches"] <= r["ms_setup_round"] and r["ms_events"] > 0
    assert 0 < r["ms_aggregate"] + r["ms_device_rows"] + r["ms_trace_flush"] <= r["ms_finish_round"]
    assert r["ms_bare_SimPy"] > 0
