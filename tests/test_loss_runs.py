"""training.loss end to end: the servers (synchronous and asynchronous) train and evaluate on the named loss."""

from __future__ import annotations

import pytest
import torch

from conftest import run, scenario, table

H = "tests.helper_losses"
CASES = {"salf": (), "wait": ('policy.name="wait"', "training.local_steps=2"),
         "fedbuff": ('policy.name="fedbuff"', "policy.duration_s=0.3", "policy.eval_every_s=0.1")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_trains_and_evaluates_on_the_named_loss(tmp_path, case):
    from fedsim.learn.evaluate import evaluate
    from fedsim.learn.loss import load_loss
    from fedsim.sim.build import build_components

    sets = CASES[case]
    plain = table(run(tmp_path, *sets, name="plain"), "rounds")
    out = run(tmp_path, *sets, f'training.loss="{H}:smoothed"', name="smoothed")
    rounds = table(out, "rounds")
    trained = [x for x in rounds["train_loss"] if x is not None]
    assert trained and trained != [x for x in plain["train_loss"] if x is not None]
    comp = build_components(scenario(*sets))
    comp.model.load_state_dict(torch.load(out / "model.pt"))
    want = evaluate(comp.model, comp.dataset.x_test, comp.dataset.y_test, loss=load_loss(f"{H}:smoothed"))
    last = [x for x in rounds["test_loss"] if x is not None][-1]
    assert last == pytest.approx(want.loss, rel=1e-6)
    assert evaluate(comp.model, comp.dataset.x_test, comp.dataset.y_test).loss != pytest.approx(last, rel=1e-3)
