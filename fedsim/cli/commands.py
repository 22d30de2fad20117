"""The commands that run things: `run`, `validate`, `sweep`, `policies`."""

from __future__ import annotations

import sys
from pathlib import Path

from fedsim.cli.progress import Progress
from fedsim.errors import FedsimError

__all__ = ["cmd_policies", "cmd_run", "cmd_sweep", "cmd_validate"]


def _deadline(deadline) -> str:
    """`deadline 0.1 s` for a number; a schedule names itself (`deadline adel (total 6 s, min 0.02 s)`)."""
    if isinstance(deadline, (int, float)):
        return f"deadline {deadline:g} s"
    text = str(deadline)
    return f"deadline {text} s" if text.startswith("[") else f"deadline {text}"     # a list: its values in s


def cmd_validate(args) -> int:
    from fedsim.spec.scenario import load_scenario

    scn = load_scenario(args.scenario, args.overrides)
    if args.no_model:       # the fleet and its measurement files only: no data, no model, no torch
        from fedsim.world.fleet import scenario_fleet

        scenario_fleet(scn)
        comp = None
    else:
        from fedsim.sim.build import build_components

        comp = build_components(scn)      # every check a run makes before it writes: data, model, fleet files
    fleet = scn.fleet
    print(f"{scn.source}: ok")
    budget = "" if scn.run.time_budget_s is None else f", time budget {scn.run.time_budget_s:g} s"
    print(f"  run       {scn.run.name}: {scn.run.rounds} rounds{budget}, seed {scn.run.seed}, "
          f"eval every {scn.run.eval_every}")
    t = scn.training
    rate = f"lr {t.lr:g}" + ("" if t.lr_schedule is None else f", {t.lr_schedule.describe()}")
    print(f"  training  batch {t.batch_size}, {t.local_steps} local step{'s' * (t.local_steps != 1)}, {rate}")
    print(f"  model     {scn.model.name} ({scn.model.granularity} layers, {scn.model.dtype})"
          + (": not built (--no-model)" if comp is None else ""))
    print(f"  data      {scn.data.name}, {scn.data.partition}, {scn.data.samples_per_device} samples/device"
          + (": not loaded (--no-model)" if comp is None else ""))
    print(f"  fleet     {fleet.n_devices} devices in {len(fleet.classes)} classes, participants "
          f"{'all' if fleet.participants is None else fleet.participants}")
    deadline = getattr(scn.policy, "deadline_s", None)    # a number, or a schedule (printed as such)
    print(f"  policy    {scn.policy.describe()}, "
          f"{'no fixed deadline' if deadline is None else _deadline(deadline)}, upload {scn.network.upload_mode.value}")
    if comp is not None:
        from fedsim.sim.preview import preview

        planned = preview(scn, comp)
        for line in [] if planned is None else planned.lines():
            print(line)
    for notice in scn.notices:
        print(f"  notice    {notice}")
    return 0


def cmd_run(args) -> int:
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise FedsimError(f"--checkpoint-every: must be a positive integer, got {args.checkpoint_every}")
    if args.threads < 1:
        raise FedsimError(f"--threads: must be a positive integer, got {args.threads}")
    if args.resume is not None:
        if args.scenario is not None or args.overrides or args.force:
            raise FedsimError("--resume takes the scenario from the run directory; give no FILE, --set or --force")
        if not args.resume.is_dir():
            raise FedsimError(f"--resume {args.resume}: no such run directory")
        progress = Progress(args.resume.name or "resume", args.quiet)
        progress.phase("loading the run, its data and its model")
        _threads(args.threads)
        from fedsim.run import resume_run, resume_scenario

        scn = resume_scenario(args.resume)
        with progress.rounds(*_total(scn)) as update:
            summary = resume_run(args.resume, update, args.checkpoint_every, gradients=_gradients(args.cluster))
    else:
        if args.scenario is None:
            raise FedsimError("run: give a scenario FILE (or --resume RUN_DIR)")
        progress = Progress(args.scenario.stem, args.quiet)
        progress.phase("reading the scenario")
        _threads(args.threads)
        from fedsim.run import run_scenario
        from fedsim.sim.build import build_components
        from fedsim.spec.scenario import load_scenario

        scn = load_scenario(args.scenario, args.overrides)
        progress.name = scn.run.name
        for notice in scn.notices:
            progress.notice(notice)
        progress.phase("loading data, building the model and the fleet")
        components = build_components(scn)          # loads data and builds the model: errors before any output
        out = args.out if args.out is not None else Path("runs") / scn.run.name
        with progress.rounds(*_total(scn)) as update:
            summary = run_scenario(scn, out, update, components, args.checkpoint_every,
                                   base_dir=args.scenario.resolve().parent, gradients=_gradients(args.cluster),
                                   force=args.force)
    acc = "n/a" if summary.test_accuracy is None else f"{summary.test_accuracy:.4f}"
    print(f"{summary.run_dir}: {summary.rounds} rounds, simulated {summary.sim_time_s:.3f} s, "
          f"test accuracy {acc}")
    return 0


def _threads(n: int) -> None:
    """torch's intra-op threads for this process (before anything is computed)."""
    import torch

    torch.set_num_threads(n)


def _total(scn) -> tuple[float, str, float | None]:
    """What the progress counts: rounds, or, for asynchronous policies, simulated seconds of the budget."""
    budget_s = getattr(scn.policy, "duration_s", None)
    if budget_s is not None:
        return budget_s, "sim s", budget_s
    return scn.run.rounds, "round", None


def cmd_policies(args) -> int:
    """Every built-in policy with its fields (default, meaning) and the first line of its docstring."""
    from fedsim.cli.policies import describe_policies

    print(describe_policies())
    return 0


def _gradients(cluster):
    """`--cluster`: the run's gradients on a Dask cluster (fedsim.cluster.shards); None: in this process."""
    if cluster is None:
        return None
    from fedsim.cluster.shards import cluster_gradients

    return cluster_gradients(cluster)


def cmd_sweep(args) -> int:
    from fedsim.sweep import INDEX_FILE, run_sweep

    remote = None
    if args.cluster is not None:
        from fedsim.cluster.sweep import ClusterSweep

        remote = ClusterSweep(args.cluster)
    result = run_sweep(args.scenario, args.grid, args.seeds, args.overrides, args.out, args.jobs,
                       args.target_accuracy, progress=not args.quiet, remote=remote)
    shared = result.points - result.total
    also = f" ({result.points} grid points x seeds; {shared} differ only in ignored fields)" if shared else ""
    print(f"{result.out}: {result.total} runs{also}: {result.skipped} already done, {result.completed} completed "
          f"now, {result.failed} failed; index {result.out / INDEX_FILE}")
    return 0 if result.failed == 0 else 1
