"""The command line's progress (fedsim.cli.progress), --version, --threads and `fedsim policies`."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from conftest import BASE_TOML, REPO


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_is_lines_without_carriage_returns(monkeypatch):
    from fedsim.cli import progress as mod

    out = io.StringIO()
    p = mod.Progress("qs", stream=out)
    p.phase("loading data")                    # not a terminal: phases are not shown
    p.notice("wait ignores policy.deadline_s")
    monkeypatch.setattr(mod, "PLAIN_EVERY_S", 0.0)
    with p.rounds(3) as update:
        for r in (1, 2, 3):
            update(r, 0.5 * r, None if r < 3 else 0.75)
    assert out.getvalue() == ("fedsim: notice: wait ignores policy.deadline_s\n"
                              "qs: round 1/3, sim 0.5s\nqs: round 2/3, sim 1.0s\nqs: round 3/3, sim 1.5s acc 0.750\n")


def test_plain_progress_is_throttled_but_ends_with_the_last_state(monkeypatch):
    from fedsim.cli import progress as mod

    out = io.StringIO()
    monkeypatch.setattr(mod, "PLAIN_EVERY_S", 3600.0)
    with mod.Progress("async", stream=out).rounds(2.0, "sim s", budget_s=2.0) as update:
        for k in range(1, 50):
            update(k, 0.04 * k, None)
    assert out.getvalue() == "async: 2.0/2 sim s, sim 2.0s\n"          # 49 x 0.04 = 1.96, shown to 0.1


def test_terminal_progress_overwrites_one_status_line():
    from fedsim.cli.progress import Progress

    out = Tty()
    p = Progress("qs", stream=out)
    p.phase("reading the scenario")
    p.phase("loading data")
    assert out.getvalue() == "\r\033[Kqs: reading the scenario...\r\033[Kqs: loading data..."
    with p.rounds(2) as update:
        update(1, 0.1, None)
        update(2, 0.2, 0.5)
    text = out.getvalue()
    assert "2/2" in text and "acc 0.500" in text and "\n" in text      # the status line cleared, then the bar


def test_quiet_is_silent():
    from fedsim.cli.progress import Progress

    out = Tty()
    p = Progress("qs", quiet=True, stream=out)
    p.phase("x")
    p.notice("y")
    with p.rounds(2) as update:
        assert update is None
    assert out.getvalue() == ""


def test_version_policies_and_threads(tmp_path, capsys):
    import torch

    from fedsim import __version__
    from fedsim.cli import main
    from fedsim.spec.policy import POLICY_PATHS, policy_class

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"fedsim {__version__}\n"
    assert main(["policies"]) == 0
    text = capsys.readouterr().out
    for name in POLICY_PATHS:
        block = re.search(rf"^{name} \((sync|async)\): .+?(?=^\S|\Z)", text, re.M | re.S).group(0)
        for field in policy_class(name).reads:
            assert re.search(rf"^  {field} +\S", block, re.M), (name, field)
    assert re.search(r"^  deadline_s +required +seconds from a round's start", text, re.M)
    assert re.search(r"^  buffer_size +10 ", text, re.M)
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    before = torch.get_num_threads()
    try:
        assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["run", str(path), "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--threads: must be a positive integer, got 0")


def test_help_version_policies_and_validate_without_model_import_no_torch(tmp_path):
    """The commands that need no model import no torch: --help and --version of every command, `policies`,
    and `validate --no-model` of the shipped scenarios that read their data set's fields only (MNIST's folder
    must exist; its files are not read)."""
    scenarios = [str(REPO / "scenarios" / f"{name}.toml") for name in ("quickstart", "paper_mnist_mlp", "paper_mnist_cnn")]
    code = ("import sys\nfrom fedsim.cli import main\n"
            "codes = []\n"
            "for argv in (['--version'], ['--help'], ['run', '--help'], ['validate', '--help'], ['sweep', '--help'],\n"
            "             ['policies'], *(['validate', s, '--no-model', '--set', f'data.dir=\"{sys.argv[1]}\"']\n"
            "                             for s in sys.argv[2:])):\n"
            "    try:\n        codes.append(main(argv))\n    except SystemExit as exc:\n        codes.append(exc.code)\n"
            "print(codes, sorted(m for m in ('torch', 'sympy', 'networkx') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), *scenarios], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.stdout.strip().splitlines()[-1] == "[0, 0, 0, 0, 0, 0, 0, 0, 0] []", res.stdout[-2000:] + res.stderr


def test_resume_of_a_missing_directory_is_one_line(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"fedsim: error: --resume {tmp_path / 'nowhere'}: no such run directory\n"
