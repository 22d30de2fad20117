"""A whole simulated run vs a replica of the SALF authors' code: the paper's MNIST MLP setting.

    python -m benchmarks.end_to_end [--quick] [--rounds R] [--no-profile]

fedsim: `scenarios/paper_mnist_mlp.toml` (30 devices, batch 16, 90% stragglers, evaluation on the 10,000
test images every round) through `load_scenario` + `run_scenario` into a temporary directory: data
loading, the SimPy rounds, gradients, evaluation, and the Parquet trace all included.

Reference: the structure of the authors' public code on the same setting, written here (torchvision is
not installed: MNIST is served from its uint8 IDX arrays through a PIL image and a per-sample ToTensor +
Normalize, as torchvision does): 30 users, each
with its own model copy, optimizer and a `DataLoader` over its 2,000 samples (shuffled, batch 16);
every round the global weights are loaded into every user's model, each user takes one step (a fresh
DataLoader iterator, forward, full backward, optimizer step), stragglers keep only the last `depth`
tensors of their update (the rest reset from a deep copy of the global model), the server averages the
users' state dicts, and evaluates on the 10,000 test images through a DataLoader of batch 1000.

Both time the whole run, data loading included. A cProfile of the fedsim run (a second run) shows
where fedsim's own time goes.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib
import math
import pstats
import tempfile
import time
from collections import OrderedDict
from itertools import islice
from pathlib import Path
from statistics import mean

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import MNIST_DIR, REPO, emit, machine, print_table, write_random_mnist

SCENARIO = REPO / "scenarios" / "paper_mnist_mlp.toml"
USERS, SAMPLES_PER_USER, BATCH, LR, MOMENTUM, STRAGGLERS = 30, 2000, 16, 0.1, 0.5, 0.9
_MEAN, _STD = 0.1307, 0.3081


# -- the replica of the authors' code structure ---------------------------------------------------------
class PerSampleMNIST(torch.utils.data.Dataset):
    """MNIST served one sample at a time the way torchvision's MNIST + ToTensor + Normalize serve it.

    Each access wraps the uint8 image in a PIL image (as torchvision's MNIST does), converts it to a
    float tensor in [0, 1] (ToTensor: array copy, HWC view, CHW permute, /255) and normalises it.
    Without Pillow the PIL step is skipped (slightly cheaper).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
        self.mean, self.std = torch.tensor([_MEAN]).view(-1, 1, 1), torch.tensor([_STD]).view(-1, 1, 1)
        try:
            from PIL import Image
            self.to_pil = Image.fromarray
        except ImportError:
            self.to_pil = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img, target = self.images[i], int(self.labels[i])
        arr = img.numpy()
        if self.to_pil is not None:
            arr = np.array(self.to_pil(arr), np.uint8, copy=True)
        t = torch.from_numpy(arr).view(arr.shape[0], arr.shape[1], 1).permute(2, 0, 1).contiguous()
        t = t.to(torch.float32).div(255)
        return t.sub_(self.mean).div_(self.std), target


def _raw_mnist(directory: Path):
    from fedsim.learn.data import read_idx

    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [next(p for p in (directory / n, directory / f"{n}.gz") if p.is_file()) for n in names]
    return [read_idx(p) for p in paths]


def _train_one_step(loader, model, opt):
    model.train()
    losses = []
    for data, label in loader:             # a fresh iterator: reshuffles the user's samples every round
        loss = F.cross_entropy(model(data), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        break
    return mean(losses)


def _fedavg(users, global_model):
    state = global_model.state_dict()
    for key in state:
        total = torch.zeros_like(state[key])
        for user in users:
            if key in user["model"].state_dict():
                total += user["model"].state_dict()[key]
        state[key] = (total / len(users)).to(state[key].dtype)
    global_model.load_state_dict(state)


def _test(loader, model):
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for data, label in loader:
            out = model(data)
            loss += F.cross_entropy(out, label, reduction="sum").item()
            correct += out.argmax(1).eq(label).sum().item()
    return correct / len(loader.dataset)


def run_replica(rounds: int, data_dir: Path, seed: int = 0) -> tuple[float, float]:
    """Seconds of the whole replica run (data loading included) and its final accuracy."""
    from fedsim.learn.models import build_model

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_te, y_te = _raw_mnist(data_dir)
    train, test = PerSampleMNIST(x_tr, y_tr), PerSampleMNIST(x_te, y_te)
    gen = torch.Generator().manual_seed(seed)
    global_model = build_model("mlp", (1, 28, 28), 10, generator=gen)
    order = torch.randperm(len(train), generator=gen)
    users = []
    for u in range(USERS):
        subset = torch.utils.data.Subset(train, order[u * SAMPLES_PER_USER:(u + 1) * SAMPLES_PER_USER])
        model = copy.deepcopy(global_model)
        users.append({"data": torch.utils.data.DataLoader(subset, batch_size=BATCH, shuffle=True, generator=gen),
                      "model": model, "opt": torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)})
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000, shuffle=False)
    n_tensors = len(global_model.state_dict())
    stragglers = set(rng.choice(USERS, int(round(STRAGGLERS * USERS)), replace=False).tolist())
    accuracy = math.nan
    for _ in range(rounds):
        for user in users:
            user["model"].load_state_dict(global_model.state_dict())
        for u, user in enumerate(users):
            _train_one_step(user["data"], user["model"], user["opt"])
            if u in stragglers:
                depth = int(rng.integers(0, n_tensors))          # tensors delivered, last first
                new_state = copy.deepcopy(global_model).state_dict()
                new_state.update(OrderedDict(islice(reversed(user["model"].state_dict().items()), depth)))
                user["model"].load_state_dict(new_state)
        _fedavg(users, global_model)
        accuracy = _test(test_loader, global_model)
    return time.perf_counter() - start, accuracy


# -- fedsim ---------------------------------------------------------------------------------------------
def run_fedsim(rounds: int, data_dir: Path, profiler: cProfile.Profile | None = None) -> tuple[float, object]:
    """Seconds of load_scenario + run_scenario (data loading included), and the run's summary."""
    from fedsim.run import run_scenario
    from fedsim.spec.scenario import load_scenario

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            scn = load_scenario(SCENARIO, [f"run.rounds={rounds}", "run.eval_every=1", f'data.dir="{data_dir}"'])
            summary = run_scenario(scn, Path(tmp) / "run")
        finally:
            if profiler is not None:
                profiler.disable()
        return time.perf_counter() - start, summary


# (label, file suffix, function name): cumulative time of each in the profile (the largest match); "*": the
# own time of every function of the file
_PARTS = [
    ("build: MNIST load, model, profile, fleet", "fedsim/sim/build.py", "build_components"),
    ("gradients (GradientEngine.layer_sums)", "fedsim/learn/grads.py", "layer_sums"),
    ("evaluation on 10,000 test images", "fedsim/sim/server.py", "evaluate"),
    ("server optimizer step", "fedsim/sim/server.py", "_apply"),
    ("device rows (Server._write_devices)", "fedsim/sim/server.py", "_write_devices"),
    ("round setup (batches, plan)", "fedsim/sim/server.py", "setup_round"),
    ("Parquet writes (TableWriter.flush)", "fedsim/output/trace.py", "flush"),
    ("event rows (TraceWriter.event)", "fedsim/output/trace.py", "event"),
    ("device rounds (own time of fedsim/sim/device_round.py)", "fedsim/sim/device_round.py", "*"),
]


def profile_breakdown(profiler: cProfile.Profile) -> list[tuple[str, float]]:
    stats = pstats.Stats(profiler).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    total = max((ct for (_, _, func), (_, _, _, ct, _) in stats.items() if func == "run_scenario"), default=0.0)
    parts = []
    for label, suffix, func in _PARTS:
        found = [(tt, ct) for (file, _, name), (_, _, tt, ct, _) in stats.items()
                 if func in ("*", name) and file.replace("\\", "/").endswith(suffix)]
        if found and func == "*":
            parts.append((label, sum(tt for tt, _ in found)))
        elif found:
            parts.append((label, max(ct for _, ct in found)))
    parts.append(("whole run_scenario", total))
    return parts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 100, no profiled run")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: the faster here)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled second fedsim run")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 100)
    torch.set_num_threads(args.threads)
    print(f"benchmarks.end_to_end: paper MNIST MLP, {USERS} devices, {rounds} rounds, evaluation every round, "
          f"{args.threads} torch thread(s)")
    print(f"machine: {machine()}")

    importlib.import_module("fedsim.run")      # imports are not part of either run's time

    with tempfile.TemporaryDirectory() as tmp:
        if MNIST_DIR.is_dir():
            data_dir, source = MNIST_DIR, f"MNIST from {MNIST_DIR}"
        else:
            data_dir = write_random_mnist(Path(tmp) / "mnist")
            source = f"RANDOM data of MNIST's shapes ({MNIST_DIR} not found)"
        print(f"data: {source}")
        fedsim_s, summary = run_fedsim(rounds, data_dir)
        replica_s, replica_acc = run_replica(rounds, data_dir)
        profiler = None
        if not (args.no_profile or args.quick):
            profiler = cProfile.Profile()
            profiled_s, _ = run_fedsim(rounds, data_dir, profiler)
    rows = [["fedsim (load_scenario + run_scenario)", fedsim_s, fedsim_s / rounds * 1e3, summary.test_accuracy],
            ["replica of the authors' code", replica_s, replica_s / rounds * 1e3, replica_acc]]
    print_table("wall time of the whole run", ["", "seconds", "ms/round", "final accuracy"], rows)
    result = {"benchmark": "end_to_end", "quick": args.quick, "data": "mnist" if data_dir == MNIST_DIR else "random",
              "rounds": rounds, "threads": args.threads,
              "fedsim_s": round(fedsim_s, 3), "replica_s": round(replica_s, 3),
              "e2e_speedup": round(replica_s / fedsim_s, 2), "fedsim_accuracy": summary.test_accuracy,
              "replica_accuracy": replica_acc, "fedsim_rounds": summary.rounds,
              "fedsim_sim_time_s": summary.sim_time_s}
    if profiler is not None:
        parts = profile_breakdown(profiler)
        print_table(f"where fedsim's time goes (cProfile, cumulative; the profiled run took {profiled_s:.2f} s, "
                    "profiling inflates Python-heavy parts)", ["part", "seconds", "share of run"],
                    [[label, sec, sec / parts[-1][1] if parts[-1][1] else 0.0] for label, sec in parts])
        result["fedsim_profile_s"] = {label: round(sec, 3) for label, sec in parts}
    emit(result)
    return result


if __name__ == "__main__":
    main()
