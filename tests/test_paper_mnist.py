"""On real MNIST at the ~90%-straggler deadline, SALF learns more than dropping the stragglers."""

from __future__ import annotations

import numpy as np

from conftest import REPO, table


def test_salf_beats_drop_on_mnist(tmp_path, mnist_dir):
    from fedsim.run import run_scenario
    from fedsim.spec.scenario import load_scenario

    acc: dict[str, list[float]] = {"salf": [], "drop": []}
    for seed in range(3):
        for policy in acc:
            scn = load_scenario(REPO / "scenarios" / "paper_mnist_mlp.toml",
                                [f"data.dir={str(mnist_dir)!r}", f'policy.name="{policy}"', "run.rounds=30",
                                 "run.eval_every=30", f"run.seed={seed}"])
            out = tmp_path / f"{policy}{seed}"
            acc[policy].append(run_scenario(scn, out).test_accuracy)
            status = np.array(table(out, "devices")["status"])
            assert 0.85 <= (status != "complete").mean() <= 0.97, "about 90% of devices are stragglers"
    # single seeds can be close (the first layer has the same contributors under both policies);
    # the mean over seeds separates them clearly (measured: 0.745 against 0.647)
    assert np.mean(acc["salf"]) > np.mean(acc["drop"]) + 0.03, acc
    assert sum(s > d for s, d in zip(acc["salf"], acc["drop"])) >= 2, acc
