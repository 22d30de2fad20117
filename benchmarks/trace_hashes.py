"""Content hashes of short runs of every shipped scenario under every policy.

Before a restructuring or a speed-up, record them; after it, compare: same scenario and seed must give
the same trace (the three tables' contents) and the same model, byte for byte.

    python -m benchmarks.trace_hashes --write hashes.json      # record
    python -m benchmarks.trace_hashes --check hashes.json      # compare (exit 1 on any difference)
    python -m benchmarks.trace_hashes --write hashes.json --only NAME   # (re)record the scenarios NAME matches

Each run is short (`--rounds`, default 3; asynchronous policies: `--async-s` simulated seconds). The MNIST
scenarios read `--mnist` (default ../shared/datasets/mnist) and phones.toml reads `--traces`; a scenario
whose data is absent is skipped and said so. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, overrides): every policy, with the fields it needs on a scenario written for SALF
POLICIES: list[tuple[str, list[str]]] = [
    ("salf", ["policy.name=salf"]),
    ("salf-unbiased", ["policy.name=salf", 'policy.aggregation="unbiased"']),
    ("salf-all", ["policy.name=salf", 'policy.aggregation="all"']),
    ("drop", ["policy.name=drop"]),
    ("wait", ["policy.name=wait"]),
    ("partial", ["policy.name=partial"]),
    ("heterofl", ["policy.name=heterofl", 'policy.widths="auto"']),
    ("overselect", ["policy.name=overselect"]),
    ("fedasync", ["policy.name=fedasync", "policy.eval_every_s=0.5"]),
    ("fedbuff", ["policy.name=fedbuff", "policy.eval_every_s=0.5", "policy.buffer_size=3"]),
]
TABLES = ("events", "devices", "rounds")


def table_digest(path: Path) -> str:
    """sha256 of a Parquet table's contents (its data, not its file bytes or metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    table = table.replace_schema_metadata(None)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def model_digest(path: Path) -> str:
    import torch

    state = torch.load(path, weights_only=True)
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_one(scenario: Path, overrides: list[str], out: Path) -> dict[str, str]:
    from fedsim.run import run_scenario
    from fedsim.spec.scenario import load_scenario

    run_scenario(load_scenario(scenario, overrides), out, base_dir=scenario.resolve().parent)
    digests = {name: table_digest(out / f"{name}.parquet") for name in TABLES}
    digests["model"] = model_digest(out / "model.pt")
    return digests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the hashes to this JSON file")
    parser.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--async-s", type=float, default=1.0, help="simulated seconds of asynchronous runs")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces")
    parser.add_argument("--only", default=None, help="run only scenarios whose file name contains this")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    results: dict[str, dict[str, str]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in sorted((REPO / "scenarios").glob("*.toml")):
            if args.only and args.only not in scenario.name:
                continue
            base = [f"run.rounds={args.rounds}", f"run.eval_every={args.rounds}"]
            text = scenario.read_text()
            if 'name = "mnist"' in text:
                if not args.mnist.is_dir():
                    skipped.append(f"{scenario.name} (no MNIST at {args.mnist})")
                    continue
                base.append(f'data.dir="{args.mnist}"')
            if "traces_dir" in text:
                if not args.traces.is_dir():
                    skipped.append(f"{scenario.name} (no traces at {args.traces})")
                    continue
                base.append(f'fleet.traces_dir="{args.traces}"')
            for label, policy in POLICIES:
                extra = [f"policy.duration_s={args.async_s}"] if label in ("fedasync", "fedbuff") else []
                key = f"{scenario.stem}/{label}"
                out = Path(tmp) / key.replace("/", "_")
                try:
                    results[key] = run_one(scenario, base + policy + extra, out)
                except Exception as exc:          # recorded too: a run that fails must keep failing the same way
                    message = str(exc).replace(str(scenario), scenario.name)    # the same from any checkout
                    results[key] = {"error": f"{type(exc).__name__}: {message.splitlines()[0][:200]}"}
                print(f"{key:32s} " + " ".join(f"{k}={v}" for k, v in results[key].items()), flush=True)
    for note in skipped:
        print(f"skipped: {note}")
    differences = []
    if args.check is not None:
        expected = json.loads(args.check.read_text())["runs"]
        for key in sorted(set(expected) | set(results)):
            if key not in results:
                continue
            if expected.get(key) != results[key]:
                differences.append(key)
                print(f"DIFFERS: {key}: expected {expected.get(key)}, got {results[key]}")
    if args.write is not None:
        runs = dict(results)
        if args.only and args.write.is_file():     # record some scenarios: keep the others' hashes
            runs = {**json.loads(args.write.read_text())["runs"], **results}
        args.write.write_text(json.dumps({"rounds": args.rounds, "async_s": args.async_s, "runs": runs},
                                         indent=2, sort_keys=True) + "\n")
    print(json.dumps({"runs": len(results), "skipped": len(skipped), "differences": differences}))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
