"""The scenario reference: every field a scenario may hold, its type and default, and what it means.

The README's scenario reference is this table (`python -m fedsim.spec.reference` prints it; the README holds
it between the markers `<!-- reference:begin -->` and `<!-- reference:end -->`), and `fedsim policies` reads
the policy fields from it. tests/test_reference.py reads many scenarios with every reader recording the
fields it reads (`Fields.seen`) and fails on any field missing here, so a new field cannot go undocumented.

Paths: `[i]` stands for a list index, `NAME` for a device class name in `network.classes.NAME`, `CLASS` in
`policy.widths.CLASS`. Keys inside a table-valued field (`measured`, `dvfs`, `availability`, a distribution)
are documented in the meaning of that field, each named in backticks.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Entry", "ENTRIES", "markdown", "lookup"]


@dataclass(frozen=True)
class Entry:
    paths: tuple[str, ...]        # one row may document several fields of one table
    kind: str                     # type and default
    meaning: str


def _e(paths: str, kind: str, meaning: str) -> Entry:
    return Entry(tuple(p.strip() for p in paths.split(",")), kind, meaning)


DIST = "distribution"     # a number or { dist = ... } (see the README's paragraph on distributions)

ENTRIES: tuple[Entry, ...] = (
    _e("run.name", "string", "run directory name"),
    _e("run.seed", "int >= 0", "the only seed; every random stream derives from it"),
    _e("run.rounds", "int >= 1", "synchronous rounds (asynchronous policies: an upper bound on server updates)"),
    _e("run.eval_every", "int, 1", "evaluate on the test set every N rounds (and after the last)"),
    _e("run.time_budget_s", 'float > 0, none',
       "simulated seconds: a synchronous run ends with the last round that ends at or before it (the first round that would end after it is simulated, then forgotten: none of its events, rows or update are kept; the last round kept is evaluated if it was not); an asynchronous run stops at it (or at `policy.duration_s`, if sooner). The last `rounds.parquet` row's `ended_by` names the limit that ended the run. Round ends are sums of float durations (30 rounds of 0.1 s end at 3.0000000000000013 s), so a round ending within 1e-9 of the budget, relatively, counts as ending at it"),
    _e("model.name", "`mlp`, `cnn`, a registered name, or `\"package.module:function\"`",
       "`mlp`: the paper's 784-32-16-10 ReLU MLP; `cnn`: conv5x5(6)-pool-conv5x5(6)-pool-fc50-fc10; otherwise a "
       "factory called as `function(input_shape, num_classes)`, named by import path or by the name an installed "
       "package registers in the entry-point group `fedsim.models`"),
    _e("model.granularity", "`module`", "what a \"layer\" is: `module` (a module's weight and bias together) or "
       "`tensor` (each parameter tensor, as the SALF authors' code counts layers)"),
    _e("model.dtype", "`float32`", "or `float64`"),
    _e("data.name", "`mnist`, `synthetic`, a registered name, or `\"package.module:Name\"`",
       "`mnist` reads the standard IDX files (`.gz` or raw) from `data.dir`; `synthetic` is FedProx "
       "synthetic(alpha, beta) made from the seed; otherwise a `fedsim.learn.datasets.DataSource` subclass (the "
       "interface is in its module docstring) named by import path or by the name an installed package registers "
       "in the entry-point group `fedsim.datasets`; it reads its own further `[data]` fields and is partitioned "
       "by `data.partition` unless it partitions itself"),
    _e("data.dir", "path", "mnist only (others name it in a notice); relative paths are tried from the working "
       "directory, then from the scenario file"),
    _e("data.partition", "`iid`", "or `dirichlet` (label skew with `data.dirichlet_alpha`); a data set that "
       "partitions itself (`synthetic`: each device its own samples) names it in a notice"),
    _e("data.dirichlet_alpha", "float > 0, 0.5", "concentration of the Dirichlet label skew (smaller: more skew)"),
    _e("data.samples_per_device", "int", "training samples each device owns"),
    _e("data.synthetic_alpha, data.synthetic_beta", "1.0, 1.0", "synthetic heterogeneity (as in the FedProx "
       "definition, alpha shifts all class scores equally and so does not change labels; beta does)"),
    _e("data.test_samples_per_device", "20", "synthetic only: held-out samples per device forming the test set (a "
       "fleet whose synthetic data exceed 256 MB makes its rows on demand, and its test set at the first evaluation)"),
    _e("training.batch_size", "int", "mini-batch per device per local step"),
    _e("training.lr, training.momentum", "float, 0.0", "server-side SGD with momentum on the aggregated gradient "
       "(and the devices' local learning rate; the base rate of `lr_schedule` when one is set)"),
    _e("training.lr_schedule", "table, none", "the learning rate of round r (server step and local steps; absent: "
       "`lr` every round): `{ kind = \"inverse\", a = 1, b = 1 }` gives `lr * a / (r + b)` (the form SALF's and "
       "ADEL-FL's analyses assume); `{ kind = \"step\", every = N, factor = f }` gives `lr * f^floor(r / N)` "
       "(0 < f <= 1); `{ kind = \"cosine\", min_lr = 0 }` gives `min_lr + (lr - min_lr)(1 + cos(pi r / R))/2` "
       "(R = `run.rounds`, `min_lr` <= `lr`). Synchronous policies only. Each round's rate is in `trace.json` "
       "(`lr_by_round`); ADEL-FL's deadlines follow its shape (see *Deadlines that change over the run*)"),
    _e("training.local_steps", "1", "local SGD steps per round (FedAvg); salf requires 1 (FedSGD, as in the paper)"),
    _e("training.grad_path", "`auto`", "gradient engine: `grouped`, `vmap`, `loop` (see docs/ARCHITECTURE.md)"),
    _e("training.loss", "`cross_entropy`", "or `\"package.module:function\"`: `function(logits, targets)` with "
       "logits `[rows, classes]` and int64 class indices `[rows]` returns the per-row losses `[rows]` (row i from "
       "row i only; a device's loss is the mean of its rows), differentiable and, on the `vmap` path, "
       "vmap-compatible; used for training, local steps and the test loss, and tried on the first training "
       "samples before the run starts (the divergence floor stays ln(classes))"),
    _e("training.on_nonfinite", "`stop`", "NaN/Inf in a device's loss or update: `stop` ends the run (failed), "
       "naming the round (asynchronous: the update index) and the devices; `drop` leaves those devices' updates "
       "out (their `devices.parquet` status is `nonfinite`) and goes on: the run completes with warnings (how "
       "many device-updates were dropped, in which rounds, from which devices), unless no update is ever applied "
       "(then it fails)"),
    _e("training.divergence_factor", "float > 1, 10", "the divergence rule: a run ends failed (a `NumericalError` "
       "naming the rounds) when the mean training loss of the updates applied stays above `divergence_factor` x "
       "max(the first such loss, ln(number of classes)) for 3 rounds in a row (asynchronous: server updates; a "
       "round whose every delivered update was non-finite and dropped counts as above), when its final model's "
       "test loss is above that bound or not finite, or at once when an update makes a weight non-finite"),
    _e("fleet.participants", "`\"all\"`", "or K: devices sampled per round among the online ones"),
    _e("fleet.traces_dir", "path", "folder of measurement files, for `measured` and `flash_bandwidth`"),
    _e("fleet.availability_file", "path", "CSV or Parquet of online intervals `device, start_s, end_s` (a device "
       "absent from it is never online)"),
    _e("fleet.depth_model", "table, none", "the SALF authors' straggler model, which draws depths instead of "
       "times: `{ stragglers = P, depth = \"uniform\" | N }`. Every round each participant is a straggler with "
       "probability `stragglers` (0..1), drawn from its own stream (`depth_model`, keyed by round); a straggler's "
       "backward pass stops after the last `d` layers (at `model.granularity`; the authors count tensors, "
       "`tensor`), `d` uniform on 1..L with `depth` = `uniform` (the authors' draw: never 0, every layer with "
       "probability 1/L) or `d` = N (0..L; 0 delivers nothing; the authors' `--up_to_layer k` is N = L - k); "
       "the others attempt every layer. Time runs as without it: a straggler downloads, computes and uploads its "
       "`d` layers at the timing model's durations, then idles; the deadline still cuts whoever is not done, so a "
       "device delivers the smaller of its drawn depth and what its speed allows (with a deadline nobody "
       "reaches, exactly the depths drawn), and a round ends when every participant has delivered what it "
       "intends, or at the deadline. Each straggler's round starts with a `straggler` event whose `layer` is the "
       "deepest layer it reaches. salf and drop only (drop keeps a straggler that drew every layer); the other "
       "policies refuse it and say why (wait has no stragglers: it is the authors' no-straggler baseline without "
       "it). Unlike the authors' code, which picks the stragglers once per run, each round draws them anew"),
    _e("fleet.classes[i].name, fleet.classes[i].count", "string, int", "device class"),
    _e("fleet.classes[i].speed_flops", DIST, "effective training FLOP/s, drawn once per device"),
    _e("fleet.classes[i].measured", "table", "instead of `speed_flops`: `{ time_table = "
       "\"ondevice_training/XIAOMI/time_table_Lenet.csv\", batch_size = 16, spread = \"none\" | \"ai_benchmark\", "
       "reference_phone = \"Xiaomi Mi 9\", benchmark_file = ... }`: the phone's measured `time_table` for one batch "
       "(`batch_size`) of the benchmark's LeNet gives its FLOP/s; `spread` = `ai_benchmark` makes each device a "
       "phone model from the AI-Benchmark list (`benchmark_file`, by default the one under `fleet.traces_dir`), "
       "scaled by its CPU score relative to `reference_phone`. `fit` = `point` (default) uses that one row; "
       "`affine` fits `time = overhead + slope * batch` to every row by least squares: the speed is the LeNet's "
       "FLOPs of one sample over `slope` and the class's `step_overhead_s` is `overhead` (`batch_size` unused; "
       "figures in docs/ARCHITECTURE.md)"),
    _e("fleet.classes[i].step_overhead_s", "float >= 0, 0", "fixed seconds of every local step besides its FLOPs: "
       "a step costs `slowdown * (step_overhead_s + FLOPs / speed)`, affine in the work (0: linear in the "
       "batch). Charged to the forward phase (`forward_end` comes that much later per step; the per-layer "
       "backward durations are the FLOPs' only); `partial` plans its work with it"),
    _e("fleet.classes[i].slowdown", f"{DIST}, 1", "per-round multiplier on compute durations (background load)"),
    _e("fleet.classes[i].layer_time", 'distribution, 1',
       'multiplier on each layer\'s backward duration, drawn per device, round and layer (ADEL-FL\'s model: `{ dist = "exponential", mean = 1 }`; jitter: a lognormal of median 1). Drawn from its own stream (`layer_time`, keyed by round; asynchronous jobs `job_layer_time`); the default 1 draws nothing. A device plans with its drawn durations, as it does with its slowdown'),
    _e("fleet.classes[i].downlink_bps, fleet.classes[i].uplink_bps", DIST,
       "link rates in bit/s, drawn once per device"),
    _e("fleet.classes[i].flash_bandwidth", "false", "instead: each device is a FLASH user, rates drawn from that "
       "user's measured mean and deviation"),
    _e("fleet.classes[i].latency_s", "0", "one-way latency added to every transfer"),
    _e("fleet.classes[i].availability", "table", "churn: `{ on_s = DIST, off_s = DIST, initial = \"stationary\" | "
       "\"online\" | \"offline\" | P }` (`on_s`, `off_s`: durations online and offline; `initial`: the state at "
       "t = 0, P a probability of being online); a device going offline mid-round is interrupted and loses what "
       "it had not delivered (a phase ending exactly as it leaves counts, as one ending exactly at the deadline "
       "does)"),
    _e("fleet.classes[i].power_compute_w, fleet.classes[i].power_tx_w, fleet.classes[i].power_rx_w, "
       "fleet.classes[i].power_idle_w", "0", "power draw per phase, for energy"),
    _e("fleet.classes[i].dvfs", "table", "`{ kappa, freq_hz, cycles_per_flop = 1 }`: energy `kappa * cycles * "
       "f^2`, i.e. a compute power of `kappa * f^3` and (unless given) a speed of `freq_hz / cycles_per_flop`"),
    _e("network.upload_mode", "`ideal`", "`ideal`: whatever is computed by the deadline counts (the paper); "
       "`after_compute`: the device stops backward early enough to upload what it has before the deadline; "
       "`streaming`: each finished layer is queued on the uplink at once and counts if fully arrived by the "
       "deadline"),
    _e("network.preset", "`star`", "`star`: a private link per device; `shared_ap`: the devices of a class share "
       "one access point; `custom`: `[[network.nodes]]` and `[[network.links]]` (the default when they are given)"),
    _e("network.ap_bandwidth_bps, network.ap_down_bps, network.ap_up_bps", "float", "`shared_ap`: each access "
       "point's capacity, both directions or each (bit/s)"),
    _e("network.ap_latency_s", "0", "`shared_ap`: latency of the access point's link"),
    _e("network.backhaul_bandwidth_bps, network.backhaul_down_bps, network.backhaul_up_bps", "none",
       "`shared_ap`: an optional backhaul between the access points and the server, shared by every class "
       "(bit/s)"),
    _e("network.backhaul_latency_s", "0", "`shared_ap`: latency of the backhaul"),
    _e("network.nodes[i].name, network.nodes[i].kind", "string, `router`", "`custom`: a node; `kind` = `server` "
       "(exactly one), `router` or `ap`"),
    _e("network.links[i].a, network.links[i].b", "string", "`custom`: the two nodes a link joins"),
    _e("network.links[i].bandwidth_bps, network.links[i].down_bps, network.links[i].up_bps", "float",
       "`custom`: the link's capacity, both directions or each (bit/s; down is from `a` to `b`)"),
    _e("network.links[i].latency_s", "0", "`custom`: the link's latency"),
    _e("network.route_by", "`latency`", "shortest path by summed latency, or `hops`"),
    _e("network.classes.NAME.attach", "string", "the node the class's devices attach to (`shared_ap`: its own "
       "access point; `custom`: a node's name)"),
    _e("network.classes.NAME.access", "`fleet`", "the device's own access link: `fleet` (its link rates), "
       "`wireless` (below) or `none`"),
    _e("network.classes.NAME.bandwidth_hz, network.classes.NAME.up_tx_power_w, "
       "network.classes.NAME.down_tx_power_w", "float", "`wireless`: Shannon rate `bandwidth_hz * log2(1 + SNR)` "
       "from the transmit powers (watts)"),
    _e("network.classes.NAME.distance_m", DIST, "`wireless`: the device's distance to its access point, drawn once "
       "per device"),
    _e("network.classes.NAME.path_loss_exponent, network.classes.NAME.reference_distance_m, "
       "network.classes.NAME.reference_gain", "3.0, 1.0, 1e-3", "`wireless`: the power gain "
       "`reference_gain * (distance_m / reference_distance_m) ^ -path_loss_exponent` (-30 dB at 1 m by default)"),
    _e("network.classes.NAME.noise_psd_w_per_hz", "3.98e-21", "`wireless`: noise power spectral density "
       "(-174 dBm/Hz)"),
    _e("network.classes.NAME.fading", "`rayleigh`", "`wireless`: small-scale fading drawn per round, or `none`"),
    _e("policy.name", "see *Policies*", "the straggler policy: a built-in name, a registered name (entry-point "
       "group `fedsim.policies`) or `\"package.module:Class\"`"),
    _e("policy.deadline_s", "float > 0, a list or a table", "seconds from a round's start after which the server "
       "aggregates what arrived: one number for every round, a list (one per round, the last repeated), "
       "`{ schedule = \"linear\" | \"geometric\", start, end }`, or ADEL-FL's optimised schedule `{ optimize = "
       "\"adel\", total_s, min_s }` (see *Deadlines that change over the run*)"),
    _e("policy.deadline_s.total_s, policy.deadline_s.min_s, policy.deadline_s.kappa, policy.deadline_s.samples",
       "float > 0; kappa 3.33, samples 4096", "ADEL-FL's schedule (`optimize = \"adel\"`): `total_s` the sum of the "
       "R deadlines may not exceed, `min_s` each deadline's least value, `kappa` the bound's rho_s / rho_c, "
       "`samples` the Monte Carlo device-rounds behind P_l"),
    _e("policy.aggregation", "`mean`", "salf: `mean` | `unbiased` | `all`; drop: `mean` | `all` (see *Policies*)"),
    _e("policy.batch_scaling", "false", "salf: each participant's batch fits the time it has before the round's "
       "deadline, ADEL-FL's `round(m P_u (T - B_u) / T)` with T the deadline, P_u = T / (its seconds per sample), "
       "B_u its download (and uploads unless `ideal`), m = `batch_fraction`; at least 1, at most the samples it "
       "holds (see *Deadlines that change over the run*)"),
    _e("policy.batch_fraction", "float in (0, 1], 1", "salf with `batch_scaling`: ADEL-FL's m, the share of the time "
       "after the download that the planned batch fills"),
    _e("policy.weighting", "`devices`", "salf: each layer's average weighs every device alike (`devices`) or by its "
       "batch (`samples`, the default with `batch_scaling`); with equal batches both give the same update"),
    _e("policy.widths, policy.widths.CLASS", "`\"auto\"`", "heterofl: `{ CLASS = ratio }` per device class (1 for "
       "classes not named), or `auto`"),
    _e("policy.fraction", "1.3", "overselect: select ceil(fraction x K) devices"),
    _e("policy.k", "none", "overselect: K, the devices kept (default `fleet.participants`, else all online)"),
    _e("policy.duration_s", "float > 0", "asynchronous: the simulated time the run lasts"),
    _e("policy.eval_every_s", "`duration_s`", "asynchronous: evaluate at every multiple of this"),
    _e("policy.staleness_exponent", "0.5", "asynchronous: an update of staleness tau weighs `(1 + tau)^-a`"),
    _e("policy.max_concurrency", "`\"all\"`", "asynchronous: devices training at once (default "
       "`fleet.participants`, else all)"),
    _e("policy.max_staleness", "32", "asynchronous: an update staler than this many versions is discarded"),
    _e("policy.buffer_size", "10", "fedbuff: updates per server step (K)"),
    _e("policy.strategy", "string", "flower: the import path of a Flower message-API strategy class, e.g. "
       "`\"flwr.serverapp.strategy:FedAvg\"` (needs `fedsim[flower]`; docs/FLOWER.md)"),
    _e("policy.strategy_args", "table, {}", "flower: keyword arguments of the strategy's constructor"),
)


def _index() -> dict[str, Entry]:
    return {path: entry for entry in ENTRIES for path in entry.paths}


def lookup(path: str) -> Entry | None:
    """The entry documenting `path` (normalised: `[i]`, `NAME`, `CLASS`), or None."""
    return _index().get(path)


def _cell(paths: tuple[str, ...]) -> str:
    """`a.b.c`, `d` for fields of one table: the first in full, the others by their last key."""
    parent = paths[0].rsplit(".", 1)[0]
    shown = [paths[0]] + [p.rsplit(".", 1)[1] if p.rsplit(".", 1)[0] == parent else p for p in paths[1:]]
    return ", ".join(f"`{p}`" for p in shown)


def markdown() -> str:
    """The reference as a Markdown table (the README's)."""
    rows = ["| field | type, default | meaning |", "|---|---|---|"]
    for entry in ENTRIES:
        rows.append(f"| {_cell(entry.paths)} | {entry.kind} | {entry.meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
