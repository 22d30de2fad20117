"""The scenario reference (fedsim.spec.reference) documents every field the readers read, and the README holds
it exactly as generated."""

from __future__ import annotations

import re

import pytest

from conftest import BASE_TOML, REPO, TRACES_DIR

SHARED_AP = ['network.preset="shared_ap"', "network.ap_down_bps=1e7", "network.ap_up_bps=1e6",
             "network.ap_latency_s=0.01", "network.backhaul_bandwidth_bps=1e8", "network.backhaul_latency_s=0.001"]
WIRELESS = ['network.classes.fast={ access = "wireless", bandwidth_hz = 1e6, up_tx_power_w = 0.3, '
            'down_tx_power_w = 0.3, distance_m = 20, reference_distance_m = 10, reference_gain = 4e-3, '
            'path_loss_exponent = 2, noise_psd_w_per_hz = 1e-10, fading = "none" }']
CUSTOM = ['network.nodes=[{ name = "server", kind = "server" }, { name = "ap", kind = "ap" }, { name = "r" }]',
          'network.links=[{ a = "ap", b = "r", bandwidth_bps = 1e7, latency_s = 0.001 }, '
          '{ a = "r", b = "server", down_bps = 1e7, up_bps = 1e6 }]',
          'network.classes.slow={ attach = "ap" }', 'network.classes.fast={ attach = "ap" }', 'network.route_by="hops"']
VARIANTS = [
    [], ['policy.name="drop"', 'policy.aggregation="all"'], ['policy.name="wait"'], ['policy.name="partial"'],
    ['policy.name="heterofl"'], ['policy.name="heterofl"', "policy.widths={ slow = 0.5 }"],
    ['policy.name="overselect"', "policy.k=2", "policy.fraction=1.5"],
    ['policy.name="fedasync"', "policy.duration_s=1", "policy.max_concurrency=2", "policy.eval_every_s=0.5",
     "policy.staleness_exponent=1", "policy.max_staleness=4"],
    ['policy.name="fedbuff"', "policy.duration_s=1", "policy.buffer_size=2"],
    SHARED_AP, WIRELESS, CUSTOM,
    ['fleet.depth_model={ stragglers = 0.5, depth = 2 }', "fleet.classes[0].step_overhead_s=0.001"],
    ['training.lr_schedule={ kind = "inverse", a = 2, b = 3 }', "policy.batch_scaling=true",
     "policy.batch_fraction=0.5", 'policy.weighting="samples"'],
    ['training.lr_schedule={ kind = "step", every = 2, factor = 0.5 }'],
    ['training.lr_schedule={ kind = "cosine", min_lr = 0.01 }'],
    ['network.upload_mode="streaming"', 'training.loss="cross_entropy"', 'training.on_nonfinite="drop"',
     "training.divergence_factor=5", 'training.grad_path="loop"', "training.local_steps=2", 'policy.name="wait"',
     'model.granularity="tensor"', 'model.dtype="float64"', "run.eval_every=2", "fleet.participants=3"],
    ['data.partition="dirichlet"', "data.dirichlet_alpha=0.3", "data.synthetic_alpha=0.5", "data.synthetic_beta=0.5",
     "data.test_samples_per_device=5"],
    ["fleet.classes[1].dvfs={ kappa = 1e-27, freq_hz = 1e9, cycles_per_flop = 2 }",
     "fleet.classes[0].availability={ on_s = 1, off_s = { dist = \"exponential\", mean = 1 }, initial = 0.5 }",
     "fleet.classes[0].latency_s=0.01", "fleet.classes[0].speed_flops={ dist = \"uniform\", low = 1e6, high = 2e6 }",
     "fleet.classes[1].speed_flops={ dist = \"fixed\", value = 2e7 }"],
]
FLASH = (BASE_TOML.replace("downlink_bps = 1.0e8\nuplink_bps = 1.0e7\n", "flash_bandwidth = true\n", 1),
         [f'fleet.traces_dir="{TRACES_DIR}"'])
DIST_KEYS = {"dist", "value", "low", "high", "median", "sigma", "mean"}


def _documented(path: str) -> bool:
    from fedsim.spec.reference import lookup

    path = re.sub(r"\[\d+\]", "[i]", path)
    path = re.sub(r"^network\.classes\.(\"[^\"]*\"|[^.]+)", "network.classes.NAME", path)
    path = re.sub(r"^policy\.widths\.(\"[^\"]*\"|[^.]+)", "policy.widths.CLASS", path)
    if "." not in path or lookup(path) is not None:        # a section, or a field of the reference
        return True
    from fedsim.spec.reference import ENTRIES

    if any(p.startswith((path + ".", path + "[")) for e in ENTRIES for p in e.paths):   # a table of fields
        return True
    parent, key = path.rsplit(".", 1)
    entry = lookup(parent) if parent.count(".") else None
    while entry is None and parent.count("."):           # a key inside a table-valued field or a distribution
        parent, _ = parent.rsplit(".", 1)
        entry = lookup(parent)
    if entry is None:
        return False
    return (key in DIST_KEYS and ("distribution" in entry.kind or "DIST" in entry.meaning)) or f"`{key}" in entry.meaning \
        or f"{key} =" in entry.meaning or f"{key}," in entry.meaning


def test_every_field_the_readers_read_is_documented():
    from fedsim.spec.fields import Fields
    from fedsim.spec.scenario import load_scenario, parse_scenario

    Fields.seen = set()
    try:
        for text, overrides in [(BASE_TOML, v) for v in VARIANTS] + [FLASH]:
            parse_scenario(text, "s.toml", overrides)
        for path in sorted((REPO / "scenarios").glob("*.toml")):
            load_scenario(path)
        seen = set(Fields.seen)
    finally:
        Fields.seen = None
    assert len(seen) > 120
    missing = sorted(p for p in seen if not _documented(p))
    assert not missing, f"document these in fedsim/spec/reference.py: {missing}"


def test_an_undocumented_field_fails_the_check(monkeypatch):
    """The check is not vacuous: take one entry out and its field is reported."""
    from fedsim.spec import reference

    monkeypatch.setattr(reference, "ENTRIES", tuple(e for e in reference.ENTRIES if "training.loss" not in e.paths))
    assert not _documented("training.loss")
    assert _documented("fleet.classes[3].availability.on_s.mean") and not _documented("fleet.classes[0].colour")


def test_the_readme_holds_the_generated_reference():
    from fedsim.spec.reference import markdown

    text = (REPO / "README.md").read_text(encoding="utf-8")
    inside = re.search(r"<!-- reference:begin[^>]*-->\n(.*?)<!-- reference:end -->", text, re.S)
    assert inside is not None, "README.md lost its reference markers"
    assert inside.group(1) == markdown(), "regenerate: python -m fedsim.spec.reference (between the markers)"
