"""The CLI: one-line errors (exit 2 for bad input, 1 for anything else), params printing, help for every subcommand."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from advcam import cli, config
from conftest import REPO


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "advcam.cli", *args], capture_output=True, text=True, cwd=cwd)


def refused_in_process(capsys, *args) -> str:
    """``advcam ARGS`` run in this process (no interpreter start): it must exit 2 with one error line; the line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"advcam {args[0]}: error: "), err
    return err[0]


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
    # what the subcommand does, and the params' units in the epilog of every subcommand
    assert parser.description and " ".join(parser.description.split()) in out, out[:300]
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


def test_visualize_draws_what_exists(prepared, tmp_path, capsys, monkeypatch):
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
    # in a folder without pseudo/ and models/: those columns are skipped
    r = run_cli("visualize", image_id, "--set", "device=cpu", "--data", str(prepared.resolve()), "--cams",
                str(tmp_path / "cams"), "--out", str(tmp_path / "cli.png"), "--params", str(REPO / "params.yaml"),
                "--debug", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "findfont" not in r.stderr and "STREAM" not in r.stderr  # --debug shows advcam's lines, not matplotlib's
    assert (tmp_path / "cli.png").stat().st_size > 0
    # a path the user names must exist (it used to drop its column silently)
    monkeypatch.chdir(tmp_path)
    line = refused_in_process(capsys, "visualize", image_id, "--set", "device=cpu", "--data", prepared.resolve(),
                              "--segmenter", tmp_path / "typo.pt", "--out", tmp_path / "typo.png")
    assert f"--segmenter {tmp_path / 'typo.pt'}: not found" in line
    assert not (tmp_path / "typo.png").exists()
    line = refused_in_process(capsys, "figures", "--runs", tmp_path / "nothere")
    assert "--runs" in line and "not found" in line


def _random_cams(folder, info, ids, seed):
    from advcam.attribution.cam import save_cam

    rng = np.random.default_rng(seed)
    for image_id in ids:
        h, w = info.read_image(image_id).shape[:2]
        keys = np.asarray(sorted(info.labels[image_id]), np.int64)
        save_cam(folder / f"{image_id}.npz", {
            "keys": keys, "high_res": rng.random((len(keys), h, w), dtype=np.float32),
            "cam": rng.random((len(keys), (h + 3) // 4, (w + 3) // 4), dtype=np.float32)})


def test_compare_draws_the_images_every_folder_has(prepared, tmp_path, capsys):
    from PIL import Image

    from advcam.data import load_info

    info = load_info(prepared)
    ids = info.lists["infer"]
    _random_cams(tmp_path / "a", info, ids[:3], 0)
    _random_cams(tmp_path / "b", info, ids[1:4], 1)  # ids[1] and ids[2] are in both
    out = tmp_path / "cmp.png"
    args = ["compare", "--set", "device=cpu", "--data", str(prepared), "--cams", str(tmp_path / "a"),
            str(tmp_path / "b"), "--labels", "CAM", "AdvCAM", "--out", str(out)]
    assert cli.main(args) == 0
    with Image.open(out) as im:
        assert im.width > 3 * im.height / 2 > 0  # two rows of four panels: image, ground truth, CAM, AdvCAM
    refused = lambda *a: refused_in_process(capsys, *a)  # noqa: E731
    assert "compare: image 'no_such_image' is in none of the lists" in refused(*args[:-1], tmp_path / "bad.png",
                                                                               "--ids", "no_such_image")
    assert not (tmp_path / "bad.png").exists()
    assert "2 CAM folders but 1 labels" in refused(*args[:8], "--labels", "CAM", "--out", tmp_path / "x.png")
    assert "missing" in refused(*args[:7], tmp_path / "missing", "--labels", "CAM", "X", "--out", tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    assert "no image of the infer list" in refused(*args[:7], tmp_path / "empty", "--labels", "CAM", "X", "--out",
                                                   tmp_path / "x.png")
    assert "-n must be at least 1, got -3" in refused(*args[:-1], tmp_path / "n0.png", "-n", "-3")
    assert not (tmp_path / "n0.png").exists() and not (tmp_path / "x.png").exists()


def test_visualize_unknown_image_is_one_line(prepared, tmp_path):
    """Checked before any model is loaded: the same message in a folder without models and in one whose default
    checkpoint does not fit the dataset (as in the repository after `make run`, when the tests use a fixture)."""
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    (other / "models").mkdir(parents=True)
    (other / "models" / "classifier.pt").write_bytes(b"not the dataset's classifier")
    for cwd in (empty, other):
        r = run_cli("visualize", "no_such_image", "--data", str(prepared.resolve()), "--out", str(tmp_path / "x.png"),
                    "--params", str(REPO / "params.yaml"), cwd=cwd)
        assert r.returncode == 2 and "no_such_image" in r.stderr and "none of the lists" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


# ---- errors that are not the input's fault: still one line, exit 1; --debug shows the traceback --------------------
UNEXPECTED = [
    (OSError(errno.ENOSPC, "No space left on device", "cams/img_1.npz"),
     "OSError: [Errno 28] No space left on device: 'cams/img_1.npz'"),
    (ValueError("operands could not be broadcast\ntogether with shapes (3,) (4,)"),
     "ValueError: operands could not be broadcast together with shapes (3,) (4,)"),
    (KeyError("img_7"), "KeyError: 'img_7'"),
    (RuntimeError(), "RuntimeError"),
]


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[advcam ")]  # minus log lines


@pytest.mark.parametrize("exc, shown", UNEXPECTED, ids=[type(e).__name__ for e, _ in UNEXPECTED])
def test_unexpected_error_in_a_stage_is_one_line_exit_1(exc, shown, monkeypatch, tmp_path, capsys):
    from advcam.steps import prepare

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(prepare, "run", boom)
    assert cli.main(["prepare", "--params-json", "{}", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert _error_lines(err) == [f"advcam prepare: error: {shown} (unexpected; --debug shows the traceback)"], err
    assert "Traceback" not in err
    with pytest.raises(type(exc)):  # --debug: the exception itself, hence Python's traceback
        cli.main(["prepare", "--params-json", "{}", "--out", str(tmp_path / "d"), "--debug"])


def test_unexpected_error_in_a_helper_is_one_line_exit_1(monkeypatch, capsys):
    from advcam.steps import info

    monkeypatch.setattr(info, "report", lambda *a: [][1])
    assert cli.main(["info", "--params-json", "{}"]) == 1
    assert _error_lines(capsys.readouterr().err) == [
        "advcam info: error: IndexError: list index out of range (unexpected; --debug shows the traceback)"]


# `advcam <argv>` as a real process, with advcam.steps.prepare.run replaced by one that raises OSError.
FAILING = """import errno, sys
from advcam.steps import prepare
def run(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", "data/synthetic/labels.json")
prepare.run = run
from advcam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_unexpected_error_in_a_real_process(tmp_path):
    """What a user sees: one line and exit 1; with --debug, the traceback down to the failing call."""
    argv = [sys.executable, "-c", FAILING, "prepare", "--params-json", "{}", "--out", str(tmp_path / "d")]
    plain = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "ADVCAM_PROGRESS": "0"})
    assert plain.returncode == 1, plain.stderr
    assert _error_lines(plain.stderr) == [
        "advcam prepare: error: PermissionError: [Errno 13] Permission denied: 'data/synthetic/labels.json' "
        "(unexpected; --debug shows the traceback)"], plain.stderr
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert "in main" in debug.stderr and 'File "<string>", line 4, in run' in debug.stderr, debug.stderr


def test_output_cut_short_by_its_reader_is_quiet():
    """`advcam params --reference | head -1`: the reader leaves early; no error, no traceback, exit 141 (SIGPIPE)."""
    read, write = os.pipe()
    os.close(read)  # no reader at all: the first write fails
    try:
        r = subprocess.run([sys.executable, "-m", "advcam.cli", "params", "--params", str(REPO / "params.yaml"),
                            "--reference"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr


def test_without_params_yaml_the_defaults_are_used(tmp_path):
    """Run outside the repository, a stage takes every key from --set or the schema's defaults (with a note); a
    --params file that does not exist is still an error naming it."""
    r = run_cli("params", "--set", "seed=3", cwd=tmp_path)
    assert r.returncode == 0 and "seed: 3" in r.stdout and "no params.yaml" in r.stderr, r.stderr
    assert yaml.safe_load(r.stdout) == {**config.defaults(), "seed": 3}
    r = run_cli("params", "--params", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "params file not found: missing.yaml" in r.stderr


def test_params_and_params_json_together_are_refused(capsys):
    assert cli.main(["params", "--params", "params.yaml", "--params-json", "{}"]) == 2
    assert "give --params or --params-json, not both" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--images", "0"], ["--classes-per-image", "-1"], ["--classes-per-image", "nan"],
                                  ["--startup", "-5"], ["--gpus", "0"]])
def test_cost_model_refuses_values_that_make_no_time(args, capsys):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cost_model
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as stop:
        cost_model.main(args)
    assert stop.value.code == 2 and args[0] in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["params", "--check", "{dir}"], "--check {dir}: a folder, but --check is a file to write"),
    (["compare", "--cams", "cams", "--labels", "A", "--out", "{tmp}/nodir/"], "--out {tmp}/nodir/: a folder"),
    (["visualize", "img_00006", "--out", "{dir}"], "--out {dir}: a folder, but --out is a file to write"),
    (["train-cls", "--curves", "{tmp}/c/"], "(e.g. {tmp}/c/train_cls.csv)"),
    (["figures", "--out", "{file}"], "--out {file}: an existing file, but --out is a folder to write into"),
    (["cams", "--out", "{file}"], "--out {file}: an existing file"),
    (["compare", "--cams", "cams", "--labels", "A", "--out", "{tmp}/x.jpg"], "written as PNG; give a path ending"),
])
def test_an_output_path_of_the_wrong_kind_is_refused_before_any_work(argv, words, tmp_path, capsys):
    """A file output given as a folder (existing, or ending with a slash: it used to write a file named like the
    folder) or a folder output given as an existing file: one line, exit 2, before the stage reads anything."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    fill = {"dir": str(tmp_path / "dir"), "file": str(tmp_path / "file"), "tmp": str(tmp_path)}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words.format(**fill) in err and len(_error_lines(err)) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "dir").iterdir())
    from advcam.utils.errors import AdvcamError
    from advcam.utils.io import write_text

    with pytest.raises(AdvcamError, match="is a folder, but a file is to be written there"):
        write_text(tmp_path / "dir", "x")  # the library's writers refuse it too (it was an IsADirectoryError)
