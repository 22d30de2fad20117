"""The flower policy: a Flower server strategy (message API) run on the simulated fleet.

Skipped when Flower is not installed (pip install "fedsim[flower]"); tests/test_flower_optional.py checks
that fedsim works, and says what to install, without it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason='Flower is not installed (pip install "fedsim[flower]"): the flower policy untested')

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg, Strategy

from conftest import BASE_TOML, scenario, table
from fedsim.errors import FedsimError, ScenarioError
from fedsim.run import resume_run, run_scenario
from test_resume_variants import _assert_identical

NODE_BASE = 1_000_000
FLOWER = BASE_TOML.replace('[policy]\nname = "salf"\ndeadline_s = 0.1\n', """[policy]
name = "flower"
strategy = "flwr.serverapp.strategy:FedAvg"
""")
assert FLOWER != BASE_TOML
NO_MOMENTUM = "training.momentum=0"


def _model(run_dir):
    return torch.load(run_dir / "model.pt")


def test_fedavg_with_everyone_in_time_equals_wait_with_one_local_step(tmp_path):
    """No deadline: every device delivers; Flower's FedAvg (weighted by num-examples, all equal here) of one
    local SGD step each is FedSGD, fedsim's `wait`."""
    flower, wait = tmp_path / "flower", tmp_path / "wait"
    run_scenario(scenario(NO_MOMENTUM, "run.rounds=4", text=FLOWER), flower)
    run_scenario(scenario(NO_MOMENTUM, "run.rounds=4", "policy.name=wait"), wait)
    a, b = table(flower, "rounds"), table(wait, "rounds")
    assert a["completed"] == b["completed"] == [8] * 4            # everyone delivered, every round
    assert a["end_s"] == b["end_s"]                               # the same simulated rounds
    assert a["policy"] == ["flower(FedAvg)"] * 4
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(a["test_accuracy"], b["test_accuracy"], atol=1e-9)
    ma, mb = _model(flower), _model(wait)
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-6)
    assert table(flower, "events") == table(wait, "events")       # same events, energy included


LOG: list[dict] = []          # what the recording strategy saw, round by round (strategies are deep-copied)


class Recording(Strategy):
    """Sends the global model to every node, records the replies in the order they arrive, averages the
    successful ones (unweighted)."""

    def __init__(self, tag: str = ""):
        self.tag = tag
        self.rounds_seen = 0           # state carried from round to round (checkpointed)

    def configure_train(self, server_round, arrays, config, grid):
        nodes = sorted(grid.get_node_ids())
        config["hello"] = "fedsim"
        return [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.rounds_seen += 1
        LOG.append({"tag": self.tag, "round": server_round, "seen": self.rounds_seen,
                    "order": [(m.metadata.src_node_id - NODE_BASE, m.has_error(),
                               m.error.code if m.has_error() else int(m.content["metrics"]["num-examples"]))
                              for m in replies]})
        ok = [m.content["arrays"] for m in replies if not m.has_error()]
        if not ok:
            return None, None
        mean = {k: np.mean([r[k].numpy() for r in ok], axis=0) for k in ok[0].keys()}
        return ArrayRecord({k: _array(v) for k, v in mean.items()}), MetricRecord({"replies": len(ok)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        raise AssertionError("fedsim evaluates centrally: configure_evaluate is never called")

    def aggregate_evaluate(self, server_round, replies):
        raise AssertionError("never called")

    def summary(self):
        pass


def _array(v):
    from flwr.app import Array
    return Array(np.asarray(v))


def test_replies_arrive_in_simulated_finish_order_and_stragglers_are_failures(tmp_path):
    LOG.clear()
    out = tmp_path / "rec"
    run_scenario(scenario(NO_MOMENTUM, "run.rounds=4", "policy.strategy=test_flower:Recording",
                          'policy.strategy_args={ tag = "order" }', "policy.deadline_s=0.1",
                          'fleet.classes[1].speed_flops={ dist = "uniform", low = 1.5e7, high = 2.5e7 }',
                          text=FLOWER), out)
    log = [e for e in LOG if e["tag"] == "order"]
    assert [e["round"] for e in log] == [1, 2, 3, 4] and [e["seen"] for e in log] == [1, 2, 3, 4]
    devices, events = table(out, "devices"), table(out, "events")
    stragglers_seen = delivered_seen = 0
    for entry in log:
        r = entry["round"] - 1
        status = {d: s for rr, d, s in zip(devices["round"], devices["device"], devices["status"]) if rr == r}
        finish = {}
        for rr, t, d, ev in zip(events["round"], events["time_s"], events["device"], events["event"]):
            if rr == r and d >= 0 and ev not in ("cut", "offline", "stopped"):
                finish[d] = max(finish.get(d, 0.0), t)
        complete = sorted((d for d, s in status.items() if s == "complete"), key=lambda d: finish[d])
        missed = sorted(d for d, s in status.items() if s != "complete")
        # the successful replies first, in the order the devices finished; then one failure per straggler
        assert [d for d, err, _ in entry["order"]] == complete + missed
        assert [err for _, err, _ in entry["order"]] == [False] * len(complete) + [True] * len(missed)
        assert all(code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE for _, err, code in entry["order"] if err)
        assert all(n == 8 for _, err, n in entry["order"] if not err)          # num-examples: the batch
        assert len(set(finish[d] for d in complete)) == len(complete)          # a strict order to check
        stragglers_seen += len(missed)
        delivered_seen += len(complete) > 1
    assert stragglers_seen > 0 and delivered_seen > 0                          # both cases exercised
    rounds = table(out, "rounds")
    assert rounds["completed"] == [sum(1 for _, err, _ in e["order"] if not err) for e in log]


class Raising(Recording):
    def aggregate_train(self, server_round, replies):
        if server_round == 2:
            raise ValueError("boom")
        return super().aggregate_train(server_round, replies)


class ReturnsNothing(Recording):
    def aggregate_train(self, server_round, replies):
        return None


class SendsNothing(Recording):
    def configure_train(self, server_round, arrays, config, grid):
        return None


@pytest.mark.parametrize("name, message", [
    ("Raising", "policy.strategy 'test_flower:Raising': round 2: aggregate_train raised ValueError: boom"),
    ("ReturnsNothing", "policy.strategy 'test_flower:ReturnsNothing': round 1: aggregate_train returned "
                       "NoneType, not a tuple"),
    ("SendsNothing", "policy.strategy 'test_flower:SendsNothing': round 1: configure_train returned NoneType"),
])
def test_a_failing_strategy_is_an_error_naming_it_and_the_round(tmp_path, name, message):
    with pytest.raises(FedsimError) as err:
        run_scenario(scenario(NO_MOMENTUM, f"policy.strategy=test_flower:{name}", text=FLOWER), tmp_path / name)
    assert message in str(err.value)
    assert (tmp_path / name / "status.json").exists()


@pytest.mark.parametrize("override, field, words", [
    ("policy.strategy=test_flower:LOG", "policy.strategy", "is not a subclass of flwr.serverapp.strategy.Strategy"),
    ("policy.strategy=no_such_module:FedAvg", "policy.strategy", "cannot import module"),
    ("policy.strategy_args={ fraction_tran = 0.5 }", "policy.strategy_args", "fraction_tran"),
    ("training.momentum=0.5", "training.momentum", "set it to 0"),
    ("fleet.participants=4", "fleet.participants", "chooses the participants"),
])
def test_bad_settings_name_the_field(override, field, words):
    overrides = [NO_MOMENTUM, override] if not override.startswith("training.momentum") else [override]
    with pytest.raises(ScenarioError) as err:
        scenario(*overrides, text=FLOWER)
    assert err.value.field == field and words in str(err.value)


def test_too_few_online_devices_for_the_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(FedsimError, match=r"round 1: 8 devices are online, the strategy waits for 20"):
        run_scenario(scenario(NO_MOMENTUM, "policy.strategy_args={ min_available_nodes = 20 }", text=FLOWER),
                     tmp_path / "few")


def test_fraction_train_samples_reproducibly(tmp_path):
    """FedAvg samples nodes with Python's `random`: seeded per round from the run's seed."""
    args = "policy.strategy_args={ fraction_train = 0.5 }"
    a, b = tmp_path / "a", tmp_path / "b"
    run_scenario(scenario(NO_MOMENTUM, args, text=FLOWER), a)
    run_scenario(scenario(NO_MOMENTUM, args, text=FLOWER), b)
    da = table(a, "devices")
    assert da == table(b, "devices")
    per_round = [sorted(d for r, d in zip(da["round"], da["device"]) if r == k) for k in range(3)]
    assert all(len(p) == 4 for p in per_round) and len({tuple(p) for p in per_round}) > 1


def test_resume_restores_the_strategy_state(tmp_path):
    """FedAdam keeps its moments in the strategy object: a run stopped after a checkpoint and resumed writes
    the same traces and model as an uninterrupted one."""
    overrides = (NO_MOMENTUM, "run.rounds=6", "policy.strategy=flwr.serverapp.strategy:FedAdam",
                 "policy.strategy_args={ eta = 0.05, min_available_nodes = 1, min_train_nodes = 1 }",
                 "policy.deadline_s=0.1")
    scn = scenario(*overrides, text=FLOWER)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_scenario(scn, straight)

    def stop(done, sim_s, acc):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scn, resumed, stop, checkpoint_every=2)
    done = []
    resume_run(resumed, lambda d, sim_s, acc: done.append(d))
    assert done == [3, 4, 5, 6]
    _assert_identical(straight, resumed)


def test_the_checkpoint_holds_the_strategys_moments(tmp_path):
    """What the resume above restores: FedAdam's moments, pickled into the checkpoint's policy state."""
    from fedsim.output.checkpoint import load_checkpoint
    from fedsim.policies.flower_messages import FlowerState

    overrides = (NO_MOMENTUM, "run.rounds=4", "policy.strategy=flwr.serverapp.strategy:FedAdam",
                 "policy.strategy_args={ eta = 0.05, min_available_nodes = 1, min_train_nodes = 1 }")
    scn = scenario(*overrides, text=FLOWER)
    out = tmp_path / "cp"

    def stop(done, sim_s, acc):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scn, out, stop, checkpoint_every=2)
    saved = FlowerState.from_json(__import__("json").loads(load_checkpoint(out)["policy_state"]), "x")
    assert saved.strategy.m_t is not None and saved.strategy.v_t is not None      # the moments are saved
    assert set(saved.strategy.m_t) == {n for n, _ in scn_model_names(scn)}


def scn_model_names(scn):
    from fedsim.sim.build import build_components
    return build_components(scn).model.named_parameters()


def test_an_unpicklable_strategy_cannot_be_checkpointed_and_says_so(tmp_path):
    with pytest.raises(FedsimError, match="cannot be saved in a checkpoint"):
        run_scenario(scenario(NO_MOMENTUM, "run.rounds=4", "policy.strategy=test_flower:Unpicklable", text=FLOWER),
                     tmp_path / "u", checkpoint_every=2)


class Unpicklable(Recording):
    def __init__(self):
        super().__init__()
        self.hook = lambda: None


def test_fedprox_sends_proximal_mu_and_the_client_applies_it(tmp_path):
    """FedProx's `proximal-mu` reaches the simulated client: with local steps the model differs from FedAvg's."""
    a, b = tmp_path / "avg", tmp_path / "prox"
    common = (NO_MOMENTUM, "training.local_steps=3", "run.rounds=2")
    run_scenario(scenario(*common, text=FLOWER), a)
    run_scenario(scenario(*common, "policy.strategy=flwr.serverapp.strategy:FedProx",
                          "policy.strategy_args={ proximal_mu = 5.0 }", text=FLOWER), b)
    ma, mb = _model(a), _model(b)
    assert any(not torch.allclose(ma[k], mb[k]) for k in ma)


def test_proximal_term_matches_its_definition():
    from fedsim.learn.local import LocalTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    trainer = LocalTrainer(model, x, y, lr=0.3)
    batches = [np.arange(5), np.arange(5, 10)]
    mu = 2.0
    got = trainer.train(batches, prox_mu=mu)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    for idx in batches:
        out = torch.func.functional_call(model, w, (x[idx],))
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        loss = loss + mu / 2 * sum(((w[n] - w0[n]) ** 2).sum() for n in w)
        g = torch.autograd.grad(loss, list(w.values()))
        w = {n: (p - 0.3 * gi).detach().requires_grad_(True) for (n, p), gi in zip(w.items(), g)}
    for n in w0:
        torch.testing.assert_close(got.delta[n], w0[n] - w[n].detach())


def test_a_sweep_over_strategies(tmp_path):
    """Sweeps grid over the strategy like any field; another policy in the grid ignores it (one run)."""
    import pyarrow.parquet as pq

    from fedsim.cli import main

    path = tmp_path / "s.toml"
    path.write_text(FLOWER.replace("momentum = 0.5", "momentum = 0.0") + "deadline_s = 0.1\n")
    out = tmp_path / "sweep"
    argv = ["sweep", str(path), "--grid", "policy.name=flower,drop", "--grid",
            "policy.strategy=flwr.serverapp.strategy:FedAvg,flwr.serverapp.strategy:FedAdam",
            "--set", "run.rounds=2", "--jobs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    index = pq.read_table(out / "index.parquet").to_pydict()
    assert index["status"] == ["completed"] * 4
    assert index["policy"] == ["flower(FedAvg)", "flower(FedAdam)", "drop", "drop"]
    assert len(set(index["run_id"])) == 3                     # drop ignores policy.strategy: one run
