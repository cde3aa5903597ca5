"""The CLI: one-line errors with exit 2, params printing, help for every subcommand."""
from __future__ import annotations

import subprocess
import sys

import pytest

from advcam import cli
from conftest import REPO


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "advcam.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_params_prints_resolved_config(capsys):
    assert cli.main(["params", "--params", str(REPO / "params.yaml"), "--set", "cam.flip=false"]) == 0
    out = capsys.readouterr().out
    assert "flip: false" in out


def test_unknown_key_is_one_line_exit_2(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("cam:\n  bogus: 1\n")
    r = run_cli("params", "--params", str(p))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "cam.bogus" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("cam:\n  bogus: 1\n")
    r = run_cli("params", "--params", str(p), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("stage", list(cli.STAGES) + ["params"])
def test_help_for_every_subcommand(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--help"])
    assert exc.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_missing_dataset_folder_is_named(tmp_path):
    r = run_cli("train-cls", "--params-json", "{}", "--data", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "m.pt"), "--curves", str(tmp_path / "c.csv"))
    assert r.returncode == 2
    assert "nowhere" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.pt").exists()
