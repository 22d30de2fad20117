"""Resume under churn, on a shared network and with HeteroFL: a run stopped after a checkpoint and resumed
writes the same three Parquet files, byte for byte, and the same model as an uninterrupted run.

The run is stopped from its progress callback (a KeyboardInterrupt after round `stop_after`, as Ctrl-C
would), so it is cheap; tests/test_resume.py covers SIGKILL. Each test first checks that the straight run
really exercises the feature after the checkpoint (devices leaving, shared links, narrower sub-models),
and that the resumed run started from the checkpoint rather than from round 0.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from conftest import BASE_TOML, scenario, table
from test_behaviours import TINY

TABLES = ("events", "rounds", "devices")


def _straight_and_resumed(tmp_path, *overrides, text=BASE_TOML, rounds=6, every=2, stop_after=3):
    from fedsim.output.checkpoint import load_checkpoint
    from fedsim.run import resume_run, run_scenario

    scn = scenario(f"run.rounds={rounds}", *overrides, text=text)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_scenario(scn, straight)

    def stop(done, sim_s, acc):
        if done == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scn, resumed, stop, checkpoint_every=every)
    checkpoint_round = stop_after // every * every
    state = load_checkpoint(resumed)
    assert state["next_round"] == checkpoint_round
    assert state["clock_at"] == table(straight, "rounds")["end_s"][checkpoint_round - 1]
    done = []
    resume_run(resumed, lambda d, sim_s, acc: done.append(d))
    assert done == list(range(checkpoint_round + 1, rounds + 1))      # from the checkpoint, not from round 0
    return straight, resumed, checkpoint_round


def _assert_identical(a, b):
    for name in TABLES:
        ta, tb = pq.read_table(a / f"{name}.parquet"), pq.read_table(b / f"{name}.parquet")
        assert ta.schema.equals(tb.schema, check_metadata=True), name
        assert ta.equals(tb), name
        assert (a / f"{name}.parquet").read_bytes() == (b / f"{name}.parquet").read_bytes(), name
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _after(run_dir, name, first_round):
    t = table(run_dir, name)
    return [{k: t[k][i] for k in t} for i, r in enumerate(t["round"]) if r >= first_round]


CHURN = ('fleet.classes[0].availability={ on_s = { dist = "exponential", mean = 0.25 }, '
         'off_s = { dist = "exponential", mean = 0.15 } }',
         'fleet.classes[1].availability={ on_s = { dist = "exponential", mean = 0.3 }, '
         'off_s = { dist = "exponential", mean = 0.1 }, initial = "online" }')


def test_resume_with_renewal_churn(tmp_path):
    straight, resumed, k = _straight_and_resumed(tmp_path, *CHURN, "fleet.participants=4", rounds=8, every=3,
                                                 stop_after=4)
    # after the checkpoint devices leave mid-round, and the online sets (hence the participants) change
    later = _after(straight, "devices", k)
    assert any(row["status"] == "offline" for row in later)
    assert len({tuple(sorted(r["device"] for r in later if r["round"] == q)) for q in range(k, 8)}) > 1
    _assert_identical(straight, resumed)


def test_resume_into_a_round_that_waits_for_devices(tmp_path):
    # test_behaviours' availability: rounds [5, 47], [47, 60] (everyone leaves), then nobody until 65:
    # [65, 147.5] with device 2, and [147.5, 230] with devices 0 (back since 70) and 2. The checkpoint
    # after round 1 is taken at 60, when nobody is online.
    path = tmp_path / "avail.csv"
    path.write_text("device,start_s,end_s\n0,5,60\n0,70,1000\n1,12,55\n2,65,1000\n")
    straight, resumed, k = _straight_and_resumed(tmp_path, f"fleet.availability_file={str(path)!r}", text=TINY,
                                                 rounds=4, every=2, stop_after=3)
    assert table(straight, "rounds")["start_s"] == [5.0, 47.0, 65.0, 147.5]
    assert table(straight, "rounds")["end_s"] == [47.0, 60.0, 147.5, 230.0]
    _assert_identical(straight, resumed)


# classes share one access point each (20 Mbit/s both ways); the fast class reaches it over a Rayleigh-faded
# wireless link drawn per round; uploads stream, and the slow devices churn
NETWORK = ('network.preset="shared_ap"', "network.ap_bandwidth_bps=2e7", "network.ap_latency_s=0.002",
           'network.upload_mode="streaming"', 'network.classes.fast.access="wireless"',
           "network.classes.fast.bandwidth_hz=2e5", "network.classes.fast.up_tx_power_w=0.2",
           "network.classes.fast.down_tx_power_w=1.0", "network.classes.fast.distance_m=100.0",
           CHURN[0])


def test_resume_on_a_shared_network(tmp_path):
    straight, resumed, k = _straight_and_resumed(tmp_path, *NETWORK)
    ev = _after(straight, "events", k)
    assert any(e["event"] == "upload_end" for e in ev) and any(e["event"] == "offline" for e in ev)
    # the fast class's transfer times change from round to round (fading), so the draws after the
    # checkpoint matter
    downloads = {(e["round"], e["device"]): e["time_s"] for e in ev if e["event"] == "download_end" and e["device"] >= 4}
    starts = dict(zip(table(straight, "rounds")["round"], table(straight, "rounds")["start_s"]))
    assert len({round(t - starts[r], 12) for (r, _), t in downloads.items()}) > 3
    _assert_identical(straight, resumed)


def test_resume_with_heterofl(tmp_path):
    # automatic widths: at 0.05 s the slow class (mean speed 2.27e6 FLOP/s, mean slowdown 1.5) gets width
    # 1/2, the fast class 1; with momentum 0.5 the optimizer state and the frozen entries must both carry over
    straight, resumed, k = _straight_and_resumed(tmp_path, 'policy.name="heterofl"', "policy.deadline_s=0.05")
    ev = _after(straight, "events", k)
    sizes = {e["bytes"] for e in ev if e["event"] == "download_end"}
    assert sizes == {4808, 10600}
    assert any(r["status"] == "complete" and r["class"] == "slow" for r in _after(straight, "devices", k))
    _assert_identical(straight, resumed)


def test_resume_restores_the_policy_state(tmp_path):
    """SALF unbiased learns the depth histogram of every device-round: the checkpoint holds it (the depths of the
    rounds before it), and the resumed run, whose scales depend on it, is identical to the straight one."""
    import json

    import numpy as np

    from fedsim.output.checkpoint import load_checkpoint
    from fedsim.run import run_scenario

    overrides = ('policy.aggregation="unbiased"', "policy.deadline_s=0.05")
    straight, resumed, k = _straight_and_resumed(tmp_path, *overrides)
    _assert_identical(straight, resumed)
    devices = table(straight, "devices")
    assert len(set(devices["depth"])) > 2          # partial depths: the unbiased scales are not all 1
    # the checkpoint of a run stopped after round k holds the histogram of rounds 0..k-1
    again = tmp_path / "again"

    def stop(done, sim_s, acc):
        if done == k:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario("run.rounds=6", *overrides), again, stop, checkpoint_every=k)
    n_layers = 3
    before = [d for r, d in zip(devices["round"], devices["depth"]) if r < k]
    assert json.loads(load_checkpoint(again)["policy_state"]) == np.bincount(before, minlength=n_layers + 1).tolist()
