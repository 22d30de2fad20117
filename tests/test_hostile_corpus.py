"""A corpus of bad inputs, each run through `fedsim run` in-process (a few as subprocesses, end to end).

Every case must end the same way: exit code 2, exactly one line on stderr starting with `fedsim: error:` and
naming the field or the file at fault, no traceback, and no run directory (nothing at all is written next to
the scenario). The tables are (--set overrides | scenario text | side file, words the message must contain).
"""

from __future__ import annotations

import gzip
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BASE_TOML, REPO
from fedsim.cli import main

FACTORY_MODULE = "fedsim_hostile_factories"

FACTORIES = '''
import sys
import torch
from torch import nn


class Boom(BaseException):
    pass


class _Net(nn.Module):
    def __init__(self, out=10, detach=False, as_tuple=False, as_int=False, exit_code=None, only_one=False,
                 unused=False):
        super().__init__()
        self.fc = nn.Linear(60, out)
        self.unused = nn.Linear(3, 3) if unused else None
        self.detach, self.as_tuple, self.as_int = detach, as_tuple, as_int
        self.exit_code, self.only_one = exit_code, only_one

    def forward(self, x):
        if self.exit_code is not None:
            sys.exit(self.exit_code)
        if self.only_one and x.shape[0] > 1:
            raise ValueError("only one sample at a time")
        y = self.fc(x)
        if self.detach:
            y = y.detach()
        if self.as_int:
            y = y.long()
        return (y,) if self.as_tuple else y


class _NoParams(nn.Module):
    def forward(self, x):
        return x[:, :10]


def exits0(shape, n): sys.exit(0)
def exits3(shape, n): sys.exit(3)
def exits_text(shape, n): sys.exit("bye")
def raises(shape, n): raise RuntimeError("boom")
def base_exc(shape, n): raise Boom("not an Exception")
def returns_int(shape, n): return 3
def wrong_in(shape, n): return nn.Linear(5, n)
def wrong_out(shape, n): return nn.Linear(shape[0], 7)
def wide_out(shape, n): return nn.Sequential(nn.Linear(shape[0], n), nn.Unflatten(1, (2, 5)))
def tuple_out(shape, n): return _Net(as_tuple=True)
def int_out(shape, n): return _Net(as_int=True)
def no_params(shape, n): return _NoParams()
def unused_layer(shape, n): return _Net(unused=True)
def detached(shape, n): return _Net(detach=True)
def batch_of_one(shape, n): return _Net(only_one=True)
def forward_exits(shape, n): return _Net(exit_code=5)
def batchnorm(shape, n): return nn.Sequential(nn.Linear(shape[0], 8), nn.BatchNorm1d(8), nn.Linear(8, n))
not_callable = 42
'''

M = FACTORY_MODULE


# -- side files ------------------------------------------------------------------------------------------------

def _idx(dims: tuple[int, ...], fill: int = 0, magic: bytes = b"\0\0\x08") -> bytes:
    body = bytes([fill]) * math.prod(dims)
    return magic + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body


def _mnist(root: Path, name: str, **replace: bytes) -> None:
    """A tiny MNIST directory (5 training, 2 test images) with some files replaced."""
    files = {"train-images-idx3-ubyte": _idx((5, 28, 28)), "train-labels-idx1-ubyte": _idx((5,), 3),
             "t10k-images-idx3-ubyte": _idx((2, 28, 28)), "t10k-labels-idx1-ubyte": _idx((2,), 1)}
    files.update(replace)
    d = root / name
    d.mkdir()
    for fname, data in files.items():
        if data is not None:
            (d / fname).write_bytes(data)


TIME_TABLE = "batchsize,expr_train\n16,40.0\n32,75.0\n"
FLASH = '{"u1": {"down_u": 5000, "down_sigma": 100, "up_u": 1000, "up_sigma": 50}}'
BENCH = '[{"Model": "Xiaomi Mi 9", "CPU": "SM8150", "Year": "2019", "CPU_F_AI_Score": "100"}]'


def _traces(root: Path, name: str, table: bytes | str = TIME_TABLE, flash: str | None = FLASH,
            bench: str = BENCH) -> None:
    d = root / name
    (d / "ondevice_training" / "X").mkdir(parents=True)
    (d / "flash").mkdir()
    tt = d / "ondevice_training" / "X" / "time_table_Lenet.csv"
    tt.write_bytes(table.encode() if isinstance(table, str) else table)
    if flash is not None:
        (d / "flash" / "speed_distri.json").write_text(flash)
    (d / "flash" / "raw_ai_benchmark_list.json").write_text(bench)


def _parquet(path: Path, **columns) -> bytes:
    pq.write_table(pa.table(columns), path)
    return path.read_bytes()


HEADER = "device,start_s,end_s\n"
AVAIL_CSV = [
    # (file name, content, words of the message)
    ("no_end.csv", "device,start_s\n0,1\n", ["missing column(s) end_s"]),
    ("no_device.csv", "id,start_s,end_s\n0,1,2\n", ["missing column(s) device"]),
    ("neg_start.csv", HEADER + "0,-1,2\n", ["row 1 (line 2)", "start_s", ">= 0", "-1.0"]),
    ("neg_both.csv", HEADER + "0,0,1\n1,-5,-2\n", ["row 2 (line 3)", "start_s", "-5.0"]),
    ("end_before.csv", HEADER + "0,5,4\n", ["start_s 5.0 must be before end_s 4.0"]),
    ("end_equal.csv", HEADER + "0,3,3\n", ["start_s 3.0 must be before end_s 3.0"]),
    ("latin1_header.csv", b"d\xe9vice,start_s,end_s\n0,1,2\n", ["not UTF-8", "0xe9", "line 1"]),
    ("latin1_body.csv", b"device,start_s,end_s,note\n0,1,2,caf\xe9\n", ["not UTF-8", "line 2"]),
    ("utf16.csv", HEADER.encode("utf-16"), ["not UTF-8"]),
    ("empty.csv", b"", ["empty file"]),
    ("header_only.csv", HEADER, ["no intervals"]),
    ("ragged.csv", HEADER + "0,1,2\n1,2\n", ["cannot read the availability file"]),
    ("text_time.csv", HEADER + "0,1,2\n1,soon,3\n", ["row 2 (line 3)", "start_s: not a number", "'soon'"]),
    ("missing_value.csv", HEADER + "0,1,2\n1,,3\n", ["row 2 (line 3)", "start_s: missing value"]),
    ("unknown_device.csv", HEADER + "0,1,2\n8,1,2\n", ["row 2 (line 3)", "id 8 out of range", "8 devices"]),
    ("huge_device.csv", HEADER + "99999999999999999999,1,2\n", ["out of range"]),
    ("negative_device.csv", HEADER + "-1,1,2\n", ["id -1 out of range"]),
    ("fraction_device.csv", HEADER + "0.5,1,2\n", ["not an integer id, got 0.5"]),
    ("bool_device.csv", HEADER + "true,1,2\n", ["device: not a number, got True"]),
    ("nan_time.csv", HEADER + "0,nan,2\n", ["start_s: must be a finite number"]),
    ("inf_time.csv", HEADER + "0,1,inf\n", ["end_s: must be a finite number, got inf"]),
    ("overlap.csv", HEADER + "0,1,5\n0,4,9\n", ["row 2 (line 3)", "starts before the end of its previous"]),
    ("unsorted.csv", HEADER + "0,5,9\n0,1,2\n", ["row 2 (line 3)", "starts before the end of its previous"]),
    ("duplicate_column.csv", "device,device,start_s,end_s\n0,0,1,2\n", ["column device appears 2 times"]),
    ("nul.csv", HEADER + "0,1,2\x00\n", ["end_s: not a number", "\\x00"]),
    ("date_time.csv", HEADER + "0,2024-01-01,2\n", ["start_s: not a number"]),
]
def _damaged_names() -> bytes:
    """A Parquet file whose column names are not UTF-8."""
    import io

    buf = io.BytesIO()
    pq.write_table(pa.table({"device": [0], "start_s": [1.0], "end_s": [2.0]}), buf)
    return buf.getvalue().replace(b"start_s", b"st\xffrt_s")


AVAIL_PARQUET = [
    ("damaged_names.parquet", _damaged_names(), ["cannot read the availability file"]),
    ("garbage.parquet", b"PAR1 this is not parquet PAR1", ["cannot read the availability file"]),
    ("zero.parquet", b"", ["empty file"]),
    ("csv_inside.parquet", HEADER + "0,1,2\n", ["cannot read the availability file"]),
    ("no_end.parquet", dict(device=[0], start_s=[1.0]), ["missing column(s) end_s"]),
    ("text.parquet", dict(device=[0], start_s=["abc"], end_s=[2.0]), ["row 1: start_s: not a number, got 'abc'"]),
    ("negative.parquet", dict(device=[0, 1], start_s=[1.0, -3.0], end_s=[2.0, 4.0]), ["row 2: start_s", ">= 0"]),
    ("unknown_device.parquet", dict(device=[0, 99], start_s=[1.0, 1.0], end_s=[2.0, 2.0]), ["row 2", "id 99"]),
    ("backwards.parquet", dict(device=[0], start_s=[5.0], end_s=[4.0]), ["row 1: start_s 5.0 must be before"]),
    ("null.parquet", dict(device=[0, None], start_s=[1.0, 1.0], end_s=[2.0, 2.0]), ["row 2: device: missing value"]),
]


@pytest.fixture(scope="module")
def side(tmp_path_factory) -> Path:
    """Every side file of the corpus, once: availability files, MNIST and traces directories, factories."""
    root = tmp_path_factory.mktemp("side")
    for name, content, _ in AVAIL_CSV + AVAIL_PARQUET:
        path = root / name
        if isinstance(content, dict):
            _parquet(path, **content)
        else:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
    (root / "intervals.txt").write_text(HEADER + "0,1,2\n")
    (root / "ok.csv").write_text(HEADER + "0,0,100\n")
    (root / "dir.csv").mkdir()

    _mnist(root, "mnist_empty", **{n: None for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")})
    _mnist(root, "mnist_tiny")
    _mnist(root, "mnist_magic", **{"train-images-idx3-ubyte": _idx((5, 28, 28), magic=b"\0\0\x0d")})
    _mnist(root, "mnist_truncated", **{"train-images-idx3-ubyte": _idx((5, 28, 28))[:-100]})
    _mnist(root, "mnist_labels", **{"train-labels-idx1-ubyte": _idx((5,), 12)})
    _mnist(root, "mnist_count", **{"train-labels-idx1-ubyte": _idx((4,), 1)})
    _mnist(root, "mnist_shape", **{"train-images-idx3-ubyte": _idx((5, 20, 20))})
    _mnist(root, "mnist_emptyfile", **{"t10k-labels-idx1-ubyte": b""})
    _mnist(root, "mnist_gzip", **{"train-images-idx3-ubyte": gzip.compress(_idx((5, 28, 28)))[:-30]})
    _mnist(root, "mnist_dir_file", **{"train-images-idx3-ubyte": None})
    (root / "mnist_dir_file" / "train-images-idx3-ubyte").mkdir()
    (root / "not_a_dir").write_text("x")

    _traces(root, "traces_nul", table="batchsize,expr_train\n16,4\x000\n")
    _traces(root, "traces_latin1", table=b"batchsize,expr_train\n16,40\n# caf\xe9\n")
    _traces(root, "traces_columns", table="batch,time\n16,40\n")
    _traces(root, "traces_negative", table="batchsize,expr_train\n16,-4\n")
    _traces(root, "traces_ok")
    _traces(root, "traces_bench_json", bench="[{")
    _traces(root, "traces_bench_deep", bench="[" * 100_000 + "]" * 100_000)
    _traces(root, "traces_flash_json", flash="{not json")
    _traces(root, "traces_flash_negative",
            flash='{"u1": {"down_u": -5, "down_sigma": 1, "up_u": 1, "up_sigma": 1}}')
    _traces(root, "traces_flash_missing", flash=None)

    (root / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORIES))
    (root / "fedsim_hostile_exit_import.py").write_text("import sys\nsys.exit(4)\n")
    (root / "fedsim_hostile_broken_import.py").write_text("raise ValueError('broken at import')\n")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in (FACTORY_MODULE, "fedsim_hostile_exit_import", "fedsim_hostile_broken_import"):
        sys.modules.pop(name, None)


# -- the cases -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    sets: tuple[str, ...] = ()          # --set overrides; "{D}" is the side-file directory
    expect: tuple[str, ...] = ()        # words of the message; "{D}" as above
    text: object = None                 # the scenario (str or bytes) or a function of BASE_TOML; None: BASE_TOML
    args: tuple[str, ...] = ()          # more command-line arguments
    names_scenario: bool = True         # the message starts with the scenario's path


def _id(text: str) -> str:
    text = ascii(text)[1:-1]
    return text if len(text) <= 70 else f"{text[:50]}...({len(text)} chars)"


def S(override: str, *expect: str) -> Case:
    """One --set override; the message names `expect` (the field path, by default the override's key)."""
    key = override.partition("=")[0]
    return Case(_id(override), (override,), expect or (key,))


def T(case_id: str, edit, *expect: str) -> Case:
    return Case(case_id, (), expect, text=edit)


def classes(n: int) -> str:
    head = BASE_TOML.split("[[fleet.classes]]")[0]
    policy = "[policy]" + BASE_TOML.split("[policy]")[1]
    items = ",".join("{}" for _ in range(n))
    return f"{head}[fleet]\nclasses = [{items}]\n\n{policy}"


RUN = [
    S("run.name=3"), S('run.name=""'), S('run.name="a/b"', "run.name", "'a/b'"), S('run.name=".."'),
    S('run.name=".hidden"'), S('run.name="a\\\\b"'), S('run.name="a\\u0000b"', "run.name", "NUL", "\\x00"),
    S('run.name="a\\nb"', "run.name", "control"), S('run.name="tab\\there"', "run.name", "control"),
    S('run.name="a\\u2028b"', "run.name"), S('run.name="' + "x" * 300 + '"', "run.name", "200 bytes", "300 bytes"),
    S('run.name="' + "\u00e9" * 101 + '"', "run.name", "202 bytes"),
    S("run.seed=-1", "run.seed", "-1"), S('run.seed="3"'), S("run.seed=1.5"),
    S("run.seed=9223372036854775808", "run.seed", "at most"), S("run.seed=" + "9" * 5000, "--set", "too long"),
    S("run.seed=0x" + "f" * 5000, "run.seed", "digits"), S("run.rounds=0"), S("run.rounds=-5"),
    S("run.rounds=1e12", "run.rounds", "at most"), S("run.rounds=true"), S("run.rounds=[1]"), S("run.eval_every=0"),
    S('run.eval_every="1"'), S("run.extra=1", "run.extra", "unknown field"), S("run=3", "run", "must be a table"),
]
MODEL = [
    S('model.name="resnet"', "model.name", "'resnet'"), S("model.name=3"), S('model.name=""'),
    S('model.name="a:b:c"', "model.name", "package.module:function"), S('model.name=":f"'),
    S('model.granularity="layer"', "model.granularity", "'layer'"), S('model.dtype="float16"'),
    S("model.width=0.5", "model.width", "unknown field"), S("model={}", "model.name", "missing"),
]
DATA = [
    S('data.name="cifar"'), S("data.name=1"), S('data.partition="noniid"'), S("data.dirichlet_alpha=0"),
    S("data.dirichlet_alpha=-1"), S('data.dirichlet_alpha="a"'), S("data.samples_per_device=0"),
    S("data.samples_per_device=20000000", "data.samples_per_device", "at most"),
    S("data.samples_per_device=2.5"), S("data.synthetic_alpha=-1"), S("data.synthetic_alpha=1e7"),
    S("data.synthetic_beta=1e300", "data.synthetic_beta", "1e+300"), S("data.synthetic_beta=nan"),
    S("data.synthetic_beta=-inf"), S("data.test_samples_per_device=0"), S("data.test_samples_per_device=2000000"),
    S("data.extra=1"), S('data.name="mnist"', "data.dir", "missing"),
    Case("absurd size", ("data.samples_per_device=5000000", "fleet.classes[0].count=1000000"),
         ("data.samples_per_device", "GiB")),
]
TRAINING = [
    S("training.batch_size=0"), S("training.batch_size=100000"), S("training.batch_size=2.5"), S("training.lr=0"),
    S("training.lr=-0.1"), S("training.lr=nan", "training.lr", "finite"), S("training.lr=inf"),
    S('training.lr="fast"'), S("training.lr=0x" + "f" * 5000, "training.lr", "digits"), S("training.momentum=1.5"),
    S("training.momentum=-0.1"), S("training.local_steps=0"), S("training.local_steps=10001"),
    S('training.grad_path="fast"'), S('training.on_nonfinite="ignore"'), S("training.extra=1"),
    S("training.local_steps=2", "policy.name", "local step"),
]
C1 = "fleet.classes[1]"
FLEET = [
    S("fleet.participants=0"), S("fleet.participants=100", "fleet.participants", "8"),
    S('fleet.participants="some"'), S("fleet.participants=-1"), S("fleet.classes=[]"), S("fleet.classes=3"),
    S('fleet.classes[0]="x"', "fleet.classes[0]", "must be a table"), S(f"{C1}.count=0"),
    S(f"{C1}.count=-3", f"{C1}.count", "-3"), S(f"{C1}.count=1000000000"), S(f'{C1}.count="4"'),
    S(f"{C1}.speed_flops=0"), S(f"{C1}.speed_flops=-1"), S(f'{C1}.speed_flops="fast"'), S(f"{C1}.slowdown=0"),
    S(f"{C1}.downlink_bps=-1"), S(f"{C1}.uplink_bps=0"), S(f"{C1}.latency_s=-1"), S(f"{C1}.power_tx_w=-1"),
    S("fleet.classes[0].power_compute_w=nan"), S(f"{C1}.power_idle_w=true"), S(f"{C1}.flash_bandwidth=1"),
    S(f"{C1}.flash_bandwidth=true", f"{C1}.flash_bandwidth", "traces_dir"),
    S(f'{C1}.name="slow"', f"{C1}.name", "duplicate", "fleet.classes[0].name"), S(f"{C1}.name=5"),
    S(f"{C1}.colour=1", f"{C1}.colour", "unknown field"), S(f"{C1}={{}}", f"{C1}.speed_flops", "missing"),
    S(f"{C1}.availability={{on_s=1}}", f"{C1}.availability.off_s"),
    S(f"{C1}.availability={{on_s=1, off_s=0}}", f"{C1}.availability.off_s"),
    S(f"{C1}.availability={{on_s=1, off_s=2, initial=1.5}}", f"{C1}.availability.initial"),
    S(f'{C1}.availability={{on_s=1, off_s=2, initial="maybe"}}', f"{C1}.availability.initial", "'maybe'"),
    S(f"{C1}.availability=3", f"{C1}.availability", "must be a table"),
    S(f"{C1}.dvfs={{kappa=0, freq_hz=1e9}}", f"{C1}.dvfs.kappa"),
    S(f"{C1}.dvfs={{kappa=1e-28}}", f"{C1}.dvfs.freq_hz", "missing"),
    S("fleet.classes[0].dvfs={kappa=1e-28, freq_hz=1e9}", "fleet.classes[0].power_compute_w"),
    S(f'{C1}.measured={{time_table="x.csv"}}', f"{C1}.measured.time_table", "traces_dir"),
    S('fleet.traces_dir="/nonexistent/traces"', "fleet.traces_dir", "/nonexistent/traces"),
    S('fleet.availability_file="/nonexistent/a.csv"', "fleet.availability_file", "does not exist"),
    S('fleet.availability_file="{D}/intervals.txt"', "fleet.availability_file", ".csv or .parquet"),
    S('fleet.availability_file="{D}/dir.csv"', "fleet.availability_file", "does not exist"),
    Case("availability twice", ('fleet.availability_file="{D}/ok.csv"', f"{C1}.availability={{on_s=1, off_s=2}}"),
         ("fleet.availability_file", "not both")),
    S("fleet.extra=1"),
]
DISTRIBUTIONS = [
    S(f'{C1}.speed_flops={{dist="gamma", value=1}}', f"{C1}.speed_flops.dist", "'gamma'"),
    S(f"{C1}.speed_flops={{value=1}}", f"{C1}.speed_flops.dist", "missing"),
    S(f'{C1}.speed_flops={{dist="uniform", low=2, high=1}}', f"{C1}.speed_flops.high"),
    S(f'{C1}.speed_flops={{dist="uniform", low=1}}', f"{C1}.speed_flops.high", "missing"),
    S(f'{C1}.speed_flops={{dist="uniform", low=nan, high=1}}', f"{C1}.speed_flops.low", "finite"),
    S(f'{C1}.speed_flops={{dist="lognormal", median=1e6, sigma=11}}', f"{C1}.speed_flops.sigma"),
    S(f'{C1}.speed_flops={{dist="lognormal", median=0, sigma=1}}', f"{C1}.speed_flops.median"),
    S(f'{C1}.speed_flops={{dist="exponential", mean=-1}}', f"{C1}.speed_flops.mean"),
    S(f'{C1}.speed_flops={{dist="exponential", mean="x"}}', f"{C1}.speed_flops.mean"),
    S(f'{C1}.speed_flops={{dist="fixed", value=0}}', f"{C1}.speed_flops.value"),
    S(f'{C1}.speed_flops={{dist="fixed", value=1, extra=2}}', f"{C1}.speed_flops.extra", "unknown field"),
    S(f"{C1}.speed_flops={{dist=3}}", f"{C1}.speed_flops.dist"),
    S(f"{C1}.speed_flops=[1, 2]", f"{C1}.speed_flops", "[1, 2]"),
    S(f'{C1}.speed_flops="1e6"', f"{C1}.speed_flops", "'1e6'"), S(f"{C1}.speed_flops=true"),
    S(f"{C1}.speed_flops=nan", f"{C1}.speed_flops", "finite"),
    S('fleet.classes[0].slowdown={dist="uniform", low=0, high=1}', "fleet.classes[0].slowdown.low"),
    S(f'{C1}.availability={{on_s={{dist="exponential"}}, off_s=2}}', f"{C1}.availability.on_s.mean"),
]
NC = "network.classes"
WIRELESS = (f'{NC}.slow.access="wireless"', f"{NC}.slow.bandwidth_hz=1e6", f"{NC}.slow.up_tx_power_w=0.1",
            f"{NC}.slow.down_tx_power_w=1", f"{NC}.slow.distance_m=100")
CUSTOM = ('network.nodes=[{name="s", kind="server"}, {name="r"}]',)
NETWORK = [
    S('network.upload_mode="fast"'), S('network.preset="ring"'), S('network.route_by="bandwidth"'),
    S('network.preset="shared_ap"', "network.ap_bandwidth_bps", "missing"),
    Case("shared_ap twice", ('network.preset="shared_ap"', "network.ap_bandwidth_bps=1e8", "network.ap_down_bps=1e8"),
         ("network.ap_bandwidth_bps", "not both")),
    S("network.ap_bandwidth_bps=1e8", "network.ap_bandwidth_bps", "unknown field"),
    S(f'{NC}.nope.access="wireless"', f"{NC}.nope", "unknown field"), S(f'{NC}.slow.access="5g"'),
    S(f'{NC}.slow.attach="server"', f"{NC}.slow.attach", "custom"),
    S(f'{NC}.slow.access="wireless"', f"{NC}.slow.bandwidth_hz", "missing"),
    Case("wireless path loss", WIRELESS + (f"{NC}.slow.path_loss_exponent=11",), (f"{NC}.slow.path_loss_exponent",)),
    Case("wireless distance", WIRELESS[:-1] + (f"{NC}.slow.distance_m=0",), (f"{NC}.slow.distance_m",)),
    Case("wireless fading", WIRELESS + (f'{NC}.slow.fading="rician"',), (f"{NC}.slow.fading", "'rician'")),
    S('network.nodes=[{name="r"}]', "network.nodes", "exactly one", "server"),
    S('network.nodes=[{name="s", kind="server"}, {name="s"}]', "network.nodes[1].name", "duplicate"),
    S('network.nodes=[{name="s", kind="server"}, {name="t", kind="server"}]', "network.nodes", "got 2"),
    S('network.nodes=[{name="s", kind="satellite"}]', "network.nodes[0].kind", "'satellite'"),
    S("network.nodes=[]", "network.nodes", "non-empty list"), S("network.links=3", "network.nodes", "missing"),
    Case("links not a list", CUSTOM + ("network.links=3",), ("network.links", "non-empty list")),
    Case("link to unknown node", CUSTOM + ('network.links=[{a="r", b="x", bandwidth_bps=1e8}]',),
         ("network.links[0].b", "unknown node 'x'")),
    Case("self link", CUSTOM + ('network.links=[{a="r", b="r", bandwidth_bps=1e8}]',), ("network.links[0].b", "twice")),
    Case("duplicate link", CUSTOM + ('network.links=[{a="r", b="s", bandwidth_bps=1}, {a="s", b="r", bandwidth_bps=1}]',),
         ("network.links[1].b", "duplicate link")),
    Case("link without bandwidth", CUSTOM + ('network.links=[{a="r", b="s"}]',),
         ("network.links[0].bandwidth_bps", "missing")),
    Case("link latency", CUSTOM + ('network.links=[{a="r", b="s", bandwidth_bps=1e8, latency_s=-1}]',),
         ("network.links[0].latency_s",)),
    Case("link both rates", CUSTOM + ('network.links=[{a="r", b="s", bandwidth_bps=1, down_bps=1, up_bps=1}]',),
         ("network.links[0].bandwidth_bps", "not both")),
    Case("attach unknown", CUSTOM + (f'{NC}.slow.attach="x"',), (f"{NC}.slow.attach", "not a node")),
    Case("attach unreachable", CUSTOM + (f'{NC}.slow.attach="r"',), (f"{NC}.slow.attach", "no route")),
    S("network=3", "network", "must be a table"), S(f"{NC}=3", NC, "must be a table"), S("network.extra=1"),
]
POLICY = [
    S('policy.name="salsa"', "policy.name", "'salsa'"), S("policy.name=3"), S("policy.deadline_s=-1"),
    S("policy.deadline_s=0"), S('policy.deadline_s="soon"'), S('policy.aggregation="median"'),
    Case("drop unbiased", ('policy.name="drop"', 'policy.aggregation="unbiased"'), ("policy.aggregation",)),
    S('policy.name="fedasync"', "policy.duration_s", "missing"),
    Case("heterofl factory", ('policy.name="heterofl"', f'model.name="{M}:wrong_in"'), ("policy.name", "mlp, cnn")),
    Case("heterofl widths", ('policy.name="heterofl"', "policy.widths={nope=0.5}"), ("policy.widths.nope",)),
    Case("overselect fraction", ('policy.name="overselect"', "policy.fraction=0.5"), ("policy.fraction",)),
    Case("fedbuff buffer", ('policy.name="fedbuff"', "policy.duration_s=10", "policy.buffer_size=0"),
         ("policy.buffer_size",)),
    Case("fedasync staleness", ('policy.name="fedasync"', "policy.duration_s=10", "policy.staleness_exponent=-1"),
         ("policy.staleness_exponent",)),
    S("policy.extra=1", "policy.extra", "unknown field"), S("policy=1", "policy", "must be a table"),
    S("extra.x=1", "extra", "unknown field"),
]
SET_SYNTAX = [
    S("policy.deadline_s", "--set needs key=value"), S("=1", "--set needs key=value"),
    S("a..b=1", "--set", "malformed key"), S("fleet.classes[9].count=1", "fleet.classes[9].count", "no list item"),
    S("fleet.classes[x].count=1", "--set", "malformed key"), S("run.name[0]=x", "run.name[0]", "no list item"),
    S("run.name.x=1", "run.name.x", "not a table"), S("fleet.classes[0][1]=2", "no list item [1]"),
    S("junk\nx=1", "--set", "\\n"), S("fleet.classes[" + "9" * 5000 + "].count=1", "--set", "too long"),
    S("junk.x=" + "[" * 3000 + "]" * 3000, "--set", "nested deeper"),
    S("junk.x=" + "[" * 40 + "]" * 40, "junk.x[0]", "nested deeper"),
]
TEXTS = [
    T("malformed TOML", lambda t: t.replace("[run]", "[run"), "malformed TOML"),
    T("empty file", "", "run", "missing"),
    T("no policy", lambda t: t.split("[policy]")[0], "policy", "missing"),
    T("unknown section", lambda t: t + "\n[extra]\na = 1\n", "extra", "unknown field"),
    T("run not a table", lambda t: "run = 3\n" + t.replace("[run]", "[old_run]"), "run", "must be a table"),
    T("duplicate key", lambda t: t.replace("seed = 3", "seed = 3\nseed = 4"), "malformed TOML", "line 5"),
    T("byte order mark", lambda t: "\ufeff" + t, "malformed TOML"),
    T("NUL in a comment", lambda t: t + "\n# a\x00b\n", "malformed TOML", "\\x00"),
    T("not UTF-8", lambda t: t.encode() + b"\n# caf\xe9\n", "not UTF-8", "0xe9",
      f"line {BASE_TOML.count(chr(10)) + 2}, column 6"),
    T("UTF-16", lambda t: t.encode("utf-16"), "not UTF-8", "0xff", "line 1"),
    T("deep lists", lambda t: t + "\n[junk]\na = " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than 32"),
    T("deep inline tables", lambda t: t + "\n[junk]\na = " + "{b = " * 300 + "1" + "}" * 300 + "\n", "nested deeper"),
    T("deep list within limits of the parser", lambda t: t + "\n[junk]\na = " + "[" * 40 + "]" * 40 + "\n",
      "junk.a", "nested deeper"),
    T("deep dotted key", lambda t: t + "\n[junk]\na" + ".a" * 3000 + " = 1\n", "junk.a", "nested deeper"),
    T("too many classes", lambda t: classes(10_001), "fleet.classes", "at most 10000", "10001"),
    T("too large", lambda t: t + "#" * (4 * 2**20), "larger than 4 MiB"),
    T("5000-digit integer", lambda t: t.replace("seed = 3", "seed = " + "9" * 5000), "malformed TOML", "too long"),
    T("huge integer in a list", lambda t: t.replace("seed = 3", "seed = [0x" + "f" * 5000 + "]"), "run.seed", "digits"),
    T("key with a newline", lambda t: t.replace("[training]", '[training]\n"lr\\nx" = 1'),
      'training."lr\\nx"', "unknown field"),
    T("key with a line separator", lambda t: t.replace("[training]", '[training]\n"lr\\u2028" = 1'),
      'training."lr\\u2028"'),
    T("duplicate class names", lambda t: t.replace('name = "fast"', 'name = "slow"'), "fleet.classes[1].name",
      "duplicate class name 'slow'"),
]
AVAILABILITY = [Case(f"availability {name}", (f'fleet.availability_file="{{D}}/{name}"',),
                     ("fleet.availability_file", f"{{D}}/{name}", *words))
                for name, _, words in AVAIL_CSV + AVAIL_PARQUET]
FACTORY = [
    Case("factory: no module", ('model.name="fedsim_no_such_module_xyz:f"',), ("model.name", "cannot import")),
    Case("factory: import raises", ('model.name="fedsim_hostile_broken_import:f"',), ("model.name", "ValueError")),
    Case("factory: exit at import", ('model.name="fedsim_hostile_exit_import:f"',), ("model.name", "sys.exit(4)")),
    *(Case(f"factory: {fn}", (f'model.name="{M}:{fn}"',), ("model.name", f"'{M}:{fn}'", *words)) for fn, words in [
        ("missing", ["has no attribute 'missing'"]), ("not_callable", ["not callable"]),
        ("raises", ["raised RuntimeError: boom"]), ("exits0", ["the factory", "called sys.exit(0)"]),
        ("exits3", ["sys.exit(3)"]), ("exits_text", ["sys.exit('bye')"]), ("base_exc", ["raised Boom"]),
        ("returns_int", ["must return a torch.nn.Module, got int"]),
        ("wrong_in", ["does not take the inputs", "[1, 60]", "mat1 and mat2"]),
        ("wrong_out", ["returns shape [1, 7]", "expected [1, 10]"]), ("wide_out", ["returns shape [1, 2, 5]"]),
        ("tuple_out", ["one tensor", "tuple"]), ("int_out", ["floating-point"]), ("no_params", ["no parameters"]),
        ("unused_layer", ["unused", "never called"]), ("detached", ["does not depend on any trainable"]),
        ("batch_of_one", ["batch of shape [4, 60]", "only one sample"]), ("forward_exits", ["sys.exit(5)"]),
    ]),
    Case("factory: batchnorm grouped", (f'model.name="{M}:batchnorm"', 'training.grad_path="grouped"'),
         ("training.grad_path", "grouped")),
    S('model.name="cnn"', "model.name", "cnn needs image input"),
]
MNIST = [Case(f"mnist {name}", ('data.name="mnist"', f'data.dir="{{D}}/{name}"'), ("data.dir", *words))
         for name, words in [
             ("missing", ["does not exist", "{D}/missing"]), ("not_a_dir", ["does not exist"]),
             ("mnist_empty", ["missing MNIST file(s)"]), ("mnist_magic", ["bad magic number", "float32"]),
             ("mnist_truncated", ["train-images-idx3-ubyte", "truncated"]),
             ("mnist_labels", ["label 12 out of range"]), ("mnist_count", ["4 labels but"]),
             ("mnist_shape", ["expected images of shape (n, 28, 28)"]), ("mnist_emptyfile", ["empty file"]),
             ("mnist_gzip", ["corrupt gzip"]), ("mnist_dir_file", ["train-images-idx3-ubyte"]),
         ]] + [
    Case("mnist too few samples", ('data.name="mnist"', 'data.dir="{D}/mnist_tiny"'),
         ("data.samples_per_device", "5 training samples", "got 40")),
]
def measured(traces: str, field: str, *words: str, **table: str) -> Case:
    """A class calibrated from a time table under fleet.traces_dir = {D}/traces."""
    table = {"time_table": '"ondevice_training/X/time_table_Lenet.csv"', **table}
    spec = ", ".join(f"{k}={v}" for k, v in table.items())
    return Case(_id(f"measured {traces} {spec}"), (f'fleet.traces_dir="{{D}}/{traces}"',
                f'{C1}={{name="m", count=2, measured={{{spec}}}, downlink_bps=1e8, uplink_bps=1e7}}'),
                (f"{C1}.measured.{field}", *words))


FLASHED = f'{C1}={{name="f", count=2, speed_flops=1e7, flash_bandwidth=true}}'


TRACES = [
    measured("traces_nul", "time_table", "expr_train: not a number", "\\x00"),
    measured("traces_latin1", "time_table", "cannot read the time table"),
    measured("traces_columns", "time_table", "missing column(s) batchsize"),
    measured("traces_negative", "time_table", "expr_train"),
    measured("traces_ok", "batch_size", "no row for batchsize 8", batch_size="8"),
    measured("traces_ok", "time_table", "no such file", time_table='"none.csv"'),
    measured("traces_bench_json", "benchmark_file", "malformed JSON", spread='"ai_benchmark"'),
    measured("traces_bench_deep", "benchmark_file", "nested too deeply", spread='"ai_benchmark"'),
    measured("traces_ok", "reference_phone", "'Pixel'", spread='"ai_benchmark"', reference_phone='"Pixel"'),
    *(Case(f"flash {d}", (f'fleet.traces_dir="{{D}}/{d}"', FLASHED), ("fleet.traces_dir", "speed_distri.json", w))
      for d, w in [("traces_flash_json", "malformed JSON"), ("traces_flash_negative", "down_u"),
                   ("traces_flash_missing", "cannot read")]),
]
CLI = [
    Case("--checkpoint-every 0", args=("--checkpoint-every", "0"), expect=("--checkpoint-every", "got 0"),
         names_scenario=False),
    Case("--checkpoint-every -2", args=("--checkpoint-every", "-2"), expect=("--checkpoint-every", "-2"),
         names_scenario=False),
    Case("--checkpoint-every with fedasync", ('policy.name="fedasync"', "policy.duration_s=1"),
         ("policy.name", "checkpoints"), args=("--checkpoint-every", "1")),
]
CASES = RUN + MODEL + DATA + TRAINING + FLEET + DISTRIBUTIONS + NETWORK + POLICY + SET_SYNTAX + TEXTS + \
    AVAILABILITY + FACTORY + MNIST + TRACES + CLI


def _scenario_text(case: Case) -> str | bytes:
    if case.text is None:
        return BASE_TOML
    return case.text(BASE_TOML) if callable(case.text) else case.text


def _check(code: int, err: str, words, work: Path, scenario: Path, names_scenario: bool = True) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert code == 2, (code, line)
    assert line.startswith(f"fedsim: error: {scenario}: " if names_scenario else "fedsim: error: "), line
    for w in words:
        assert w in line, (w, line)
    left = sorted(p.name for p in work.iterdir())
    assert left == [scenario.name], left       # no run directory, nothing else either


def test_corpus_size():
    assert len(CASES) >= 125
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line(case, side, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)        # the default run directory runs/<run.name> would land here
    scenario = tmp_path / "s.toml"
    text = _scenario_text(case)
    scenario.write_bytes(text.encode() if isinstance(text, str) else text)
    argv = ["run", str(scenario), "--quiet", *case.args]
    if not any(s.startswith("run.name") for s in case.sets):
        argv += ["--out", str(tmp_path / "out")]
    for s in case.sets:
        argv += ["--set", s.replace("{D}", str(side))]
    code = main(argv)
    words = [w.replace("{D}", str(side)) for w in case.expect]
    _check(code, capsys.readouterr().err, words, tmp_path, scenario, case.names_scenario)


def test_bad_scenario_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path, words in [(tmp_path / "none.toml", ["no such scenario file"]),
                        (tmp_path / "d.toml", ["is a directory"]),
                        (tmp_path / "a\nb.toml", ["a\\nb.toml", "no such scenario file"])]:
        if path.name == "d.toml":
            path.mkdir()
        code = main(["run", str(path), "--quiet", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith("fedsim: error: ") and all(w in err for w in words), err
        assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()
        if path.name == "d.toml":
            path.rmdir()


def test_run_without_a_file_and_resume_misuse(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    for argv, word in [(["run", "--quiet"], "FILE"),
                       (["run", str(scenario), "--resume", str(tmp_path / "r"), "--quiet"], "--resume"),
                       (["run", "--resume", str(tmp_path / "nowhere"), "--quiet"], str(tmp_path / "nowhere"))]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("fedsim: error: ") and word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_checkpoint_every_not_a_number(tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    try:
        code = main(["run", str(scenario), "--quiet", "--out", str(tmp_path / "out"), "--checkpoint-every", "abc"])
    except SystemExit as exc:
        code = exc.code
    _check(code, capsys.readouterr().err, ["--checkpoint-every", "'abc'"], tmp_path, scenario, names_scenario=False)


def test_validate_reads_the_availability_file(side, tmp_path, capsys):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    code = main(["validate", str(scenario), "--set", f'fleet.availability_file="{side}/end_before.csv"'])
    err = capsys.readouterr().err
    assert code == 2 and "fleet.availability_file" in err and "must be before end_s" in err


# End to end: a separate interpreter, so nothing of pytest's capture hides a traceback or an exit status.
SUBPROCESS = [
    (('model.name="{M}:exits0"',), "called sys.exit(0)"),
    (('fleet.availability_file="{D}/latin1_header.csv"',), "not UTF-8"),
    (('run.name="a\\u0000b"', 'model.name="{M}:wrong_out"'), "NUL"),
]


def test_end_to_end_in_subprocesses(side, tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(BASE_TOML)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(side)])}
    procs = [(subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", str(scenario), "--quiet",
                                *(a for s in sets for a in ("--set", s.replace("{M}", M).replace("{D}", str(side))))],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), word)
             for sets, word in SUBPROCESS]
    for proc, word in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (proc.returncode, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("fedsim: error: "), err
        assert word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]      # no runs/ directory
