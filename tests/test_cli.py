"""The CLI: one-line errors with exit 2, params printing, help for every subcommand."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
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


# ---- help texts, `advcam info`, `advcam visualize` ---------------------------------------------------------------
@pytest.mark.parametrize("stage", ["compare", "visualize", "info", "figures"])
def test_help_for_helper_subcommands(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--help"])
    assert exc.value.code == 0
    assert "--params" in capsys.readouterr().out


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cams", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: cams)" in out and "(default: data/<dataset.name>)" in out
    assert "(default: None)" not in out and "advcam params --reference" in out


def _subparsers():
    import argparse

    actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return actions[0].choices


# Options with no default by design: inputs given only when wanted, or required ones.
NO_DEFAULT = {"params_json", "overrides", "shard", "gather", "ids"}


@pytest.mark.parametrize("stage", sorted(_subparsers()))
def test_help_states_every_default(stage, capsys):
    """Every option that has a default shows it in --help with its real value (never "None"); the path options
    whose default depends on the params show the layout (e.g. data/<dataset.name>)."""
    parser = _subparsers()[stage]
    formatter = cli.HelpFormatter(prog=f"advcam {stage}")
    for action in parser._actions:
        if (not action.option_strings or action.nargs == 0 or action.required or action.dest in NO_DEFAULT
                or action.help is None):
            continue  # positionals, flags (--help, --debug, --reference), required and default-less options
        text = formatter._expand_help(action)
        assert "(default: " in text and "(default: None)" not in text, f"{stage} {action.option_strings[0]}: {text}"
        if action.default is not None:
            assert f"(default: {action.default})" in text, text
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: [])" not in out
    if stage in cli.STAGES:  # the params' units are in the epilog of every pipeline stage
        assert "pixels" in out and "fractions in [0, 1]" in out and "advcam params --reference" in out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import TINY

    folder = tmp_path_factory.mktemp("cli") / "data"
    assert cli.main(["prepare", *sum((["--set", o] for o in TINY), []), "--out", str(folder)]) == 0
    return folder


def test_info_prints_device_extension_dataset_and_params(prepared, capsys):
    assert cli.main(["info", "--set", "device=cpu", "--data", str(prepared)]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out
    assert re.search(r"^extension: (loaded|built|not built yet|unavailable)", out, re.M), out
    assert "classes (3)" in out and re.search(r"^list val: 6 images$", out, re.M), out
    assert "# params (resolved)" in out and "cam:" in out


def test_info_without_a_dataset_says_so(tmp_path, capsys):
    assert cli.main(["info", "--data", str(tmp_path / "nowhere")]) == 0
    assert "not prepared yet" in capsys.readouterr().out


def test_visualize_draws_what_exists(prepared, tmp_path):
    from PIL import Image

    from advcam.attribution.cam import save_cam
    from advcam.data import load_info
    from advcam.steps import figures
    from advcam import config

    info = load_info(prepared)
    image_id = info.lists["infer"][0]
    h, w = info.read_image(image_id).shape[:2]
    keys = np.asarray(sorted(info.labels[image_id]), np.int64)
    rng = np.random.default_rng(0)
    save_cam(tmp_path / "cams" / f"{image_id}.npz", {
        "keys": keys, "high_res": rng.random((len(keys), h, w), dtype=np.float32),
        "cam": rng.random((len(keys), (h + 3) // 4, (w + 3) // 4), dtype=np.float32)})
    out = tmp_path / "v.png"
    cfg = config.load(None, ["device=cpu"])
    columns = figures.visualize(cfg, prepared, image_id, out, cams=tmp_path / "cams", pseudo=tmp_path / "none",
                                classifier=tmp_path / "none.pt", segmenter=tmp_path / "none.pt")
    assert columns == ["image", "ground truth", "AdvCAM"]  # no pseudo label, no models
    with Image.open(out) as im:
        assert im.width > 2.5 * im.height > 0  # one row of three panels
    r = run_cli("visualize", image_id, "--set", "device=cpu", "--data", str(prepared), "--cams",
                str(tmp_path / "cams"), "--pseudo", str(tmp_path / "none"), "--classifier", str(tmp_path / "none.pt"),
                "--segmenter", str(tmp_path / "none.pt"), "--out", str(tmp_path / "cli.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.png").stat().st_size > 0


def test_visualize_unknown_image_is_one_line(prepared, tmp_path):
    r = run_cli("visualize", "no_such_image", "--data", str(prepared), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "no_such_image" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()
