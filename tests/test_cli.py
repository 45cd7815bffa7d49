"""The ``patchflannel`` command: subcommands, shared exit codes, options from config dataclasses."""
import dataclasses
import subprocess
import sys

from patchflannel.cli import COMMANDS, main
from patchflannel.learners.train import LearnerTrainConfig

from .conftest import REPO


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_exit_codes_are_shared(capsys, tmp_path):
    assert main([]) == 2  # no subcommand: a usage error
    assert main(["no-such-command"]) == 2
    assert main(["predict"]) == 2  # argparse: the input is missing
    assert main(["bundle", "verify", str(REPO / "weights" / "ensemble-lite")]) == 0
    assert main(["predict", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a failed start leaves nothing behind
    assert main(["train", "--packs", "x.h5", "--out", str(tmp_path / "t"), "--balance", "samplr"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_and_module_run_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "patchflannel", "bundle", "verify",
                           str(REPO / "weights" / "segmenter-fcdensenet-lite")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr


def test_training_options_come_from_the_config(capsys):
    try:
        main(["train", "--help"])
    finally:
        out = capsys.readouterr().out
    scalar = [f.name for f in dataclasses.fields(LearnerTrainConfig)
              if f.name not in ("split_fractions", "normalization", "split_file")]
    assert all("--" + name.replace("_", "-") in out for name in scalar), out
    assert "--split" in out and "--no-amp" in out
