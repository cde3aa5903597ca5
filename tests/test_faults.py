"""Fault injection: every long stage killed (SIGKILL) at a random point and run again ends with the files of an
uninterrupted run, keeps the work it had finished, and a SIGINT stops a stage cleanly.

Each stage runs as a real ``advcam <stage>`` process (``advcam.cli.main`` under a small wrapper). The wrapper
wraps ``os.replace``, the rename every atomic write ends with, and pauses the process just *after* the k-th
output of the stage was renamed into place, or just *before* it (the temporary file is then complete but not
renamed: what a kill in the middle of a write leaves). The test then sends SIGKILL, so the kill point is
exact and meaningful. ``k`` and before/after are drawn at random for each run; a failure names them and the
seed (``ADVCAM_FAULT_SEED=<seed>`` replays it). References are uninterrupted runs of the same stages (in this
process) with the same params and seed; the same inputs feed both, so every output must be byte-identical
(training: same checkpoint tensors and curve CSV).

The workflow tests run ``snakemake`` itself on a tiny project, with that wrapper as the ``advcam`` on its PATH,
SIGKILL Snakemake's whole process group at the pause (Snakemake, the shell, ``tee`` and ``advcam`` die at once),
and run ``snakemake`` again: Snakemake deletes the killed job's outputs, but the per-image work lives in the work
folder (``.advcam-work/``, :mod:`advcam.steps.shards`) and must not be redone.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import yaml

from advcam import cli, config
from advcam.utils.checkpoint import load_checkpoint
from advcam.utils.io import TMP_PREFIX
from conftest import REPO, TINY

SEED = int(os.environ.get("ADVCAM_FAULT_SEED", random.SystemRandom().randrange(10**6)))
EPOCHS = 3
OVERRIDES = [*TINY, "synthetic.num_train_aug=16", "synthetic.num_train=6", "synthetic.num_val=2",
             f"classifier.epochs={EPOCHS}", f"segmentation.epochs={EPOCHS}", "segmentation.batch_size=4",
             "cam.method=advcam", "cam.advcam.steps=2"]
# How long a test waits for a child to reach the point it interrupts: a guard against a hang, not a time limit
# (each wait ends as soon as the point is reached or the child exits). Three jobs on 2 cores once took over 240 s.
HANG_GUARD_S = 900
ENV = {**os.environ, "ADVCAM_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# Runs ``advcam.cli.main(argv)``, pausing at the FAULT_COUNT-th rename onto a name matching FAULT_PATTERN
# (FAULT_WHEN = before | after the rename, or during: at the next training step after it); it then creates
# FAULT_READY and sleeps until it is killed (or interrupted). Without FAULT_PATTERN it is plain ``advcam``.
WRAPPER = r"""
import fnmatch, os, sys, time
if os.environ.get("FAULT_PATTERN"):
    pattern, count, when, ready = (os.environ["FAULT_PATTERN"], int(os.environ["FAULT_COUNT"]),
                                   os.environ["FAULT_WHEN"], os.environ["FAULT_READY"])
    real_replace, seen, armed = os.replace, [0], [False]
    def pause():
        open(ready, "w").close()
        time.sleep(300)
    def replace(src, dst, *args, **kwargs):
        hit = fnmatch.fnmatch(os.path.basename(os.fspath(dst)), pattern)
        if hit and when == "before" and seen[0] + 1 == count:
            pause()
        real_replace(src, dst, *args, **kwargs)
        if hit:
            seen[0] += 1
            if when == "after" and seen[0] == count:
                pause()
            armed[0] = when == "during" and seen[0] >= count
    os.replace = replace
    if when == "during":
        from advcam.train import loop
        real_lr = loop.set_poly_lr
        def set_poly_lr(*args, **kwargs):
            if armed[0]:
                pause()
            return real_lr(*args, **kwargs)
        loop.set_poly_lr = set_poly_lr
from advcam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stage_args(stage: str, js: str, **paths: Path) -> list[str]:
    return [stage, "--params-json", js, *[a for k, v in paths.items() for a in (f"--{k}", str(v))]]


def run_inprocess(args: list[str]) -> None:
    assert cli.main(args) == 0, args


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "advcam.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


def fault_env(pattern: str, count: int, when: str, work: Path) -> tuple[dict, Path]:
    ready = work / f"ready-{pattern.strip('*.')}-{count}-{when}"
    return {**ENV, "FAULT_PATTERN": pattern, "FAULT_COUNT": str(count), "FAULT_WHEN": when,
            "FAULT_READY": str(ready)}, ready


def interruptible() -> None:
    """Child setup: SIGINT back to its default action. A shell without job control starts background jobs with
    SIGINT ignored, and the children of such a test run would inherit that (Python then installs no
    KeyboardInterrupt handler); a user's Ctrl-C in a terminal always arrives with the default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_at(cmd: list[str], env: dict, ready: Path, log_path: Path, sig: int, what: str, cwd: Path | None = None,
            group: bool = False) -> int:
    """Start ``cmd``, wait until the wrapper pauses at the fault point (``ready`` exists), send ``sig`` (to the
    whole process group with ``group``); return the exit status."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=cwd, start_new_session=group,
                                preexec_fn=interruptible)
        deadline = time.monotonic() + HANG_GUARD_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL) if group and proc.poll() is None else proc.kill()
                proc.wait()
                pytest.fail(f"never reached the fault point ({what}); exit {proc.returncode}:\n"
                            + log_path.read_text()[-3000:])
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        return proc.wait(timeout=60)


def kill_at(args: list[str], pattern: str, count: int, when: str, work: Path) -> None:
    """Start ``advcam <args>``, let it run to the kill point, SIGKILL it."""
    env, ready = fault_env(pattern, count, when, work)
    code = stop_at([sys.executable, "-c", WRAPPER, *args], env, ready, work / "killed.log", signal.SIGKILL,
                   f"{when} #{count} {pattern}")
    assert code == -signal.SIGKILL


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(TMP_PREFIX + "*")) if folder.is_dir() else []


def stamps(folder: Path, suffix: str) -> dict[str, tuple[int, int]]:
    """inode and mtime of every finished output: unchanged if the work was not redone."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob(f"*{suffix}"))
            if not p.name.startswith(TMP_PREFIX)}


def same_bytes(a: Path, b: Path, suffix: str) -> None:
    names = sorted(stamps(a, suffix))
    assert names == sorted(stamps(b, suffix)) and names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def same_checkpoint(a: Path, b: Path) -> None:
    (ha, sa), (hb, sb) = load_checkpoint(a), load_checkpoint(b)
    assert ha == hb
    assert sa["model"].keys() == sb["model"].keys()
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A prepared tiny dataset and the uninterrupted run of every stage on it."""
    from advcam.steps import prepare

    root = tmp_path_factory.mktemp("faults")
    cfg = config.load(None, OVERRIDES)
    js = json.dumps(cfg.to_dict())
    data = root / "data"
    prepare.run(cfg, data)
    r = root / "ref"
    run_inprocess(stage_args("train-cls", js, data=data, out=r / "classifier.pt", curves=r / "cls.csv"))
    run_inprocess(stage_args("cams", js, data=data, model=r / "classifier.pt", out=r / "cams",
                             metrics=r / "seeds.json", curve=r / "seeds.csv"))
    run_inprocess(stage_args("refine", js, data=data, cams=r / "cams", out=r / "pseudo", metrics=r / "pseudo.json"))
    run_inprocess(stage_args("train-seg", js, data=data, pseudo=r / "pseudo", out=r / "segmenter.pt",
                             curves=r / "seg.csv"))
    n = len((data / "lists" / "infer.txt").read_text().split())
    return {"root": root, "js": js, "data": data, "ref": r, "n": n}


def pick(stage: str, n: int) -> tuple[int, str, str]:
    """A random kill point: k in 1..n (before: 2..n, so something is finished), before or after the rename."""
    rng = random.Random(f"{SEED}-{stage}")
    when = rng.choice(["before", "after"])
    k = rng.randint(2 if when == "before" else 1, n)
    return k, when, f"[kill {when} output #{k} of {stage}; replay with ADVCAM_FAULT_SEED={SEED}]"


@pytest.mark.parametrize("stage, suffix", [("cams", ".npz"), ("refine", ".png")])
def test_per_image_stage_killed_and_rerun_equals_straight_run(ref, tmp_path, stage, suffix):
    r, n = ref["ref"], ref["n"]
    k, when, where = pick(stage, n - 1)  # leave at least one image to do
    out = tmp_path / stage
    if stage == "cams":
        args = stage_args("cams", ref["js"], data=ref["data"], model=r / "classifier.pt", out=out,
                          metrics=tmp_path / "seeds.json", curve=tmp_path / "seeds.csv")
        metric_files = [("seeds.json", "seeds.json"), ("seeds.csv", "seeds.csv")]
    else:
        args = stage_args("refine", ref["js"], data=ref["data"], cams=r / "cams", out=out,
                          metrics=tmp_path / "pseudo.json")
        metric_files = [("pseudo.json", "pseudo.json")]
    kill_at(args, f"*{suffix}", k, when, tmp_path)
    done = k if when == "after" else k - 1
    finished = stamps(out, suffix)
    assert len(finished) == done, where
    assert bool(temps(out)) == (when == "before"), where  # a kill mid-write leaves only a temporary file
    assert not (tmp_path / metric_files[0][0]).exists(), where

    again = run_cli(args)
    assert again.returncode == 0, f"{where}\n{again.stderr[-3000:]}"
    if stage == "cams":
        assert f"cams: {n - done} of {n} images to compute ({done} done already)" in again.stderr, where
    else:
        kept = f", {done} kept from an earlier run" if done else ""
        assert f"refine: {n} pseudo labels: {n - done} computed{kept}\n" in again.stderr, where
    after = stamps(out, suffix)
    assert {name: after[name] for name in finished} == finished, f"finished work was redone {where}"
    same_bytes(out, r / stage.replace("refine", "pseudo"), suffix)
    for mine, theirs in metric_files:
        assert (tmp_path / mine).read_bytes() == (r / theirs).read_bytes(), f"{mine} {where}"
    assert temps(out) == [], where


@pytest.mark.parametrize("stage", ["train-cls", "train-seg"])
def test_training_killed_and_rerun_equals_straight_run(ref, tmp_path, stage):
    r = ref["ref"]
    k, when, where = pick(stage, EPOCHS)
    out = tmp_path / "model.pt"
    inputs = ({"data": ref["data"]} if stage == "train-cls" else {"data": ref["data"], "pseudo": r / "pseudo"})
    args = stage_args(stage, ref["js"], **inputs, out=out, curves=tmp_path / "curves.csv")
    kill_at(args, "model.pt.resume.pt", k, when, tmp_path)
    done = k if when == "after" else k - 1
    resume = tmp_path / "model.pt.resume.pt"
    assert resume.is_file() and not out.exists(), where
    assert load_checkpoint(resume)[1]["epoch"] == done, where

    again = run_cli(args)
    assert again.returncode == 0, f"{where}\n{again.stderr[-3000:]}"
    assert f"after epoch {done}" in again.stderr, f"did not resume {where}\n{again.stderr[-2000:]}"
    trained = [int(e) for e in re.findall(rf"epoch (\d+)/{EPOCHS}: mean loss", again.stderr)]
    assert trained == list(range(done + 1, EPOCHS + 1)), f"finished epochs were redone {where}"
    name = "classifier" if stage == "train-cls" else "segmenter"
    same_checkpoint(out, r / f"{name}.pt")
    curves = "cls.csv" if stage == "train-cls" else "seg.csv"
    assert (tmp_path / "curves.csv").read_bytes() == (r / curves).read_bytes(), where
    assert not resume.exists(), where


def test_random_walk_training_killed_and_rerun_equals_straight_run(ref, tmp_path):
    """The random walk's network (IRN's boundary network) resumes as the other trainings do: killed at an epoch's
    resume file, the rerun trains only the epochs left and ends with the straight run's network and labels."""
    walk = [*OVERRIDES, "refine.method=randomwalk", f"refine.randomwalk.epochs={EPOCHS}",
            "refine.randomwalk.batch_size=2", "refine.randomwalk.crop_size=36", "refine.randomwalk.train_radius=3",
            "refine.randomwalk.exp_times=3"]
    js = json.dumps(config.load(None, walk).to_dict())
    cams = ref["ref"] / "cams"
    straight = tmp_path / "straight"
    run_inprocess(stage_args("refine", js, data=ref["data"], cams=cams, out=straight, metrics=tmp_path / "s.json"))
    k, when, where = pick("refine-walk", EPOCHS)
    out = tmp_path / "pseudo"
    args = stage_args("refine", js, data=ref["data"], cams=cams, out=out, metrics=tmp_path / "m.json")
    kill_at(args, ".affinity.pt.resume.pt", k, when, tmp_path)
    done = k if when == "after" else k - 1
    resume = out / ".affinity.pt.resume.pt"
    assert load_checkpoint(resume)[1]["epoch"] == done and not (out / ".affinity.pt").exists(), where
    crf = stamps(out / ".crf", ".png")
    again = run_cli(args)
    assert again.returncode == 0, f"{where}\n{again.stderr[-3000:]}"
    trained = [int(e) for e in re.findall(rf"boundary epoch (\d+)/{EPOCHS}: mean loss", again.stderr)]
    assert trained == list(range(done + 1, EPOCHS + 1)), f"finished epochs were redone {where}"
    assert crf and stamps(out / ".crf", ".png") == crf, f"CRF labels redone {where}"
    same_checkpoint(out / ".affinity.pt", straight / ".affinity.pt")
    labels = sorted(p.name for p in straight.glob("*.png"))
    assert labels and labels == sorted(p.name for p in out.glob("*.png"))
    assert all((out / n).read_bytes() == (straight / n).read_bytes() for n in labels), where
    assert (tmp_path / "m.json").read_bytes() == (tmp_path / "s.json").read_bytes() and not resume.exists(), where


def test_training_removes_temporaries_of_a_killed_run(ref, tmp_path):
    out = tmp_path / "models" / "classifier.pt"
    out.parent.mkdir()
    left = [out.parent / f"{TMP_PREFIX}classifier.pt.resume.pt.k1ll3d.pt", out.parent / f"{TMP_PREFIX}classifier.pt.x.pt"]
    for p in left:
        p.write_bytes(b"half a checkpoint")
    other = out.parent / f"{TMP_PREFIX}segmenter.pt.busy.pt"  # another writer's temporary: must stay
    other.write_bytes(b"x")
    cfg_js = json.dumps(config.load(None, [*OVERRIDES, "classifier.epochs=1"]).to_dict())
    run_inprocess(stage_args("train-cls", cfg_js, data=ref["data"], out=out, curves=tmp_path / "c.csv"))
    assert other.exists()
    assert temps(out.parent) == [other.name]


def test_resume_file_is_not_used_on_another_dataset(tmp_path, caplog, monkeypatch):
    from advcam.steps import prepare, train_cls
    from advcam.train import loop

    base = [*OVERRIDES, "classifier.epochs=2", "synthetic.num_train_aug=8"]
    data, out = tmp_path / "data", tmp_path / "classifier.pt"
    prepare.run(config.load(None, base), data)
    real = loop.write_curves
    calls = []

    def crash(*a, **k):  # the resume file of epoch 1 is written just before: crash there, like a kill
        calls.append(1)
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_curves", crash)
    with pytest.raises(KeyboardInterrupt):
        train_cls.run(config.load(None, base), data, out, tmp_path / "c.csv")
    monkeypatch.setattr(loop, "write_curves", real)
    assert loop.resume_path_for(out).is_file()
    prepare.run(config.load(None, [*base, "synthetic.image_size=40"]), data)  # other images, same ids
    with caplog.at_level(logging.INFO, logger="advcam"):
        train_cls.run(config.load(None, base), data, out, tmp_path / "c.csv")
    assert "resuming" not in caplog.text


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_sigint_stops_cleanly_and_keeps_finished_work(ref, tmp_path, sig, code, said):
    """Ctrl-C (and SIGTERM: scancel, preemption, torchrun) in the middle of the climbing loop: exit 130 (143), one
    clean line, finished CAM files kept."""
    r = ref["ref"]
    # 150 climbing steps: seconds per image, room for the signal to arrive before the last one
    slow = json.dumps(config.load(None, [*OVERRIDES, "cam.advcam.steps=150"]).to_dict())
    out = tmp_path / "cams"
    proc = subprocess.Popen([sys.executable, "-m", "advcam.cli", *stage_args(
        "cams", slow, data=ref["data"], model=r / "classifier.pt", out=out, metrics=tmp_path / "s.json",
        curve=tmp_path / "s.csv")], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible)
    deadline = time.monotonic() + HANG_GUARD_S
    finished = lambda: [p for p in out.glob("*.npz") if not p.name.startswith(TMP_PREFIX)]  # noqa: E731
    while not finished() and proc.poll() is None and time.monotonic() < deadline:  # a whole file, not a temporary
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"advcam cams: {said}; finished work is kept, run again to resume" in err
    assert 1 <= len(finished()) < ref["n"] and temps(out) == []
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("stage", ["cams", "refine"])
def test_second_run_into_the_same_folder_is_refused(ref, tmp_path, stage):
    """Two runs writing into one output folder: the second is refused (exit 2, one line naming the folder) and
    leaves the first one's files alone; it used to remove the first one's temporary file as stale."""
    r, out = ref["ref"], tmp_path / stage
    inputs = {"model": r / "classifier.pt"} if stage == "cams" else {"cams": r / "cams"}
    extra = {"curve": tmp_path / "seeds.csv"} if stage == "cams" else {}
    args = stage_args(stage, ref["js"], data=ref["data"], **inputs, out=out, metrics=tmp_path / "m.json", **extra)
    env, ready = fault_env("*.npz" if stage == "cams" else "*.png", 2, "before", tmp_path)
    with open(tmp_path / "first.log", "w") as log:  # the first run pauses with its 2nd output still a temporary
        first = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=env, stdout=log, stderr=log,
                                 preexec_fn=interruptible)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ready.exists(), (tmp_path / "first.log").read_text()[-3000:]
            busy = temps(out)
            assert len(busy) == 1
            second = run_cli(args)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"advcam {stage}: error: {stage}: another process is writing into {out} now" in second.stderr
            assert temps(out) == busy and not (tmp_path / "m.json").exists()
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=60)
    assert first.returncode == 130 and temps(out) == []
    assert run_cli(args).returncode == 0  # the folder is free again once the first run has ended


def test_same_seed_same_bytes_in_another_process(ref, tmp_path):
    """Determinism on CPU: train-cls + cams in a fresh process give the reference's bytes."""
    r, js = ref["ref"], ref["js"]
    code = ("import sys\nfrom advcam.cli import main\nfor a in sys.argv[1:]:\n"
            "    import json\n    rc = main(json.loads(a))\n    assert rc == 0, rc\n")
    a1 = stage_args("train-cls", js, data=ref["data"], out=tmp_path / "classifier.pt", curves=tmp_path / "cls.csv")
    a2 = stage_args("cams", js, data=ref["data"], model=tmp_path / "classifier.pt", out=tmp_path / "cams",
                    metrics=tmp_path / "seeds.json", curve=tmp_path / "seeds.csv")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(a1), json.dumps(a2)], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    same_checkpoint(tmp_path / "classifier.pt", r / "classifier.pt")
    assert (tmp_path / "classifier.pt").read_bytes() == (r / "classifier.pt").read_bytes()
    same_bytes(tmp_path / "cams", r / "cams", ".npz")
    for name in ("cls.csv", "seeds.json", "seeds.csv"):
        assert (tmp_path / name).read_bytes() == (r / name).read_bytes(), name


def test_loader_workers_do_not_change_the_trainings(ref, tmp_path):
    """`workers` is not a rule param (changing it reruns nothing), because it cannot change a result: train-cls
    and train-seg with 2 DataLoader worker processes give the reference's bytes (trained with none)."""
    r, js = ref["ref"], ref["js"]
    assert json.loads(js)["workers"] == 0
    code = ("import sys, json\nfrom advcam.cli import main\nfor a in sys.argv[1:]:\n"
            "    rc = main(json.loads(a))\n    assert rc == 0, rc\n")
    a1 = stage_args("train-cls", js, data=ref["data"], out=tmp_path / "classifier.pt", curves=tmp_path / "cls.csv")
    a2 = stage_args("train-seg", js, data=ref["data"], pseudo=r / "pseudo", out=tmp_path / "segmenter.pt",
                    curves=tmp_path / "seg.csv")
    run = subprocess.run([sys.executable, "-c", code, *(json.dumps([*a, "--set", "workers=2"]) for a in (a1, a2))],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, ref_name in (("classifier.pt", "classifier.pt"), ("cls.csv", "cls.csv"),
                           ("segmenter.pt", "segmenter.pt"), ("seg.csv", "seg.csv")):
        assert (tmp_path / name).read_bytes() == (r / ref_name).read_bytes(), name


def test_sigint_stops_training_cleanly_and_it_resumes(ref, tmp_path):
    """Ctrl-C in the middle of an epoch of train-cls (k finished epochs, k random): exit 130, one clean line, no
    traceback; the resume file of epoch k is kept and the rerun ends with the uninterrupted run's weights."""
    r = ref["ref"]
    k = random.Random(f"{SEED}-sigint").randint(1, EPOCHS - 1)
    where = f"[SIGINT in epoch {k + 1} of train-cls; replay with ADVCAM_FAULT_SEED={SEED}]"
    out = tmp_path / "model.pt"
    args = stage_args("train-cls", ref["js"], data=ref["data"], out=out, curves=tmp_path / "curves.csv")
    env, ready = fault_env("model.pt.resume.pt", k, "during", tmp_path)
    code = stop_at([sys.executable, "-c", WRAPPER, *args], env, ready, tmp_path / "int.log", signal.SIGINT, where)
    err = (tmp_path / "int.log").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[advcam ")]
    assert code == 130, f"{where}\n{err[-2000:]}"
    assert "Traceback" not in err and lines == [
        "advcam train-cls: interrupted; finished work is kept, run again to resume"], f"{where}\n{err[-2000:]}"
    resume = tmp_path / "model.pt.resume.pt"
    assert load_checkpoint(resume)[1]["epoch"] == k and not out.exists() and temps(tmp_path) == [], where

    again = run_cli(args)
    assert again.returncode == 0, f"{where}\n{again.stderr[-3000:]}"
    assert f"after epoch {k}" in again.stderr, where
    trained = [int(e) for e in re.findall(rf"epoch (\d+)/{EPOCHS}: mean loss", again.stderr)]
    assert trained == list(range(k + 1, EPOCHS + 1)), where
    same_checkpoint(out, r / "classifier.pt")
    assert (tmp_path / "curves.csv").read_bytes() == (r / "cls.csv").read_bytes(), where
    assert not resume.exists()


@pytest.mark.parametrize("stage", ["train-cls", "train-seg"])
def test_full_disk_stops_training_before_the_first_epoch(ref, tmp_path, stage, monkeypatch, capsys):
    """The checkpoints' space is checked before epoch 1 (not at the first checkpoint, an epoch later)."""
    from collections import namedtuple

    import advcam.utils.io as io
    from advcam.train import loop

    steps = []
    real_lr = loop.set_poly_lr
    monkeypatch.setattr(loop, "set_poly_lr", lambda *a, **k: steps.append(1) or real_lr(*a, **k))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    inputs = {"data": ref["data"]} if stage == "train-cls" else {"data": ref["data"], "pseudo": ref["ref"] / "pseudo"}
    out = tmp_path / "model.pt"
    assert cli.main(stage_args(stage, ref["js"], **inputs, out=out, curves=tmp_path / "c.csv")) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith(f"advcam {stage}: error:")]
    assert line and "not enough free disk space" in line[0] and "model.pt" in line[0], err
    assert "only 1.0 MiB free" in line[0] and "needs about" in line[0], line
    assert steps == [], "a training step ran before the disk check"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the workflow: Snakemake killed while cams / refine run, then run again ------------------------------------------
WF_OVERRIDES = [*TINY, "cam.advcam.steps=2", "cam.advcam.backend=fallback", "workflow.shards=2"]
WF_TARGETS = {"cams": ["cams", "metrics/seeds.json", "plots/seeds_threshold.csv"],
              "refine": ["pseudo", "metrics/pseudo.json"]}
WF_WORK = {"cams": (".advcam-work/cams", ".npz"), "refine": (".advcam-work/refine-crf", ".png")}
WF_ENV = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(root: Path, *args: str, env: dict | None = None) -> str:
    r = subprocess.run(["snakemake", "--cores", "1", *args], cwd=root, env=env or WF_ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def tree(root: Path, targets: list[str]) -> dict[str, bytes]:
    """Bytes of every file of the targets (Snakemake's own .snakemake_timestamp left out)."""
    files = {}
    for t in targets:
        for p in ([root / t] if (root / t).is_file() else sorted((root / t).rglob("*"))):
            if p.is_file() and p.name != ".snakemake_timestamp":
                files[str(p.relative_to(root))] = p.read_bytes()
    return files


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny Snakemake project run once to the pseudo labels (the reference), with a faulting ``advcam``."""
    if shutil.which("snakemake", path=WF_ENV["PATH"]) is None:
        pytest.skip("snakemake is not installed (pip install -e .[test])")
    root = tmp_path_factory.mktemp("wfproj")
    shutil.copytree(REPO / "workflow", root / "workflow")
    (root / "params.yaml").write_text(yaml.safe_dump(config.load(None, WF_OVERRIDES).to_dict(), sort_keys=False))
    snakemake(root, "--", *WF_TARGETS["refine"])
    fake = root.parent / f"{root.name}-bin"
    fake.mkdir()
    (fake / "advcam").write_text(f"#!{sys.executable}\n{WRAPPER}")
    (fake / "advcam").chmod(0o755)
    ref = {stage: tree(root, targets) for stage, targets in WF_TARGETS.items()}
    n = len((root / "data/synthetic/lists/infer.txt").read_text().split())
    return {"root": root, "ref": ref, "n": n, "fake_path": f"{fake}{os.pathsep}{WF_ENV['PATH']}"}


@pytest.mark.parametrize("stage", ["cams", "refine"])
def test_workflow_killed_midway_resumes_without_redoing_images(project, tmp_path, stage):
    """SIGKILL of Snakemake's process group while a cams_shard / refine_shard job is at its k-th image file (k random,
    before or after the rename); `snakemake --rerun-incomplete --nolock` (what dvc.yaml runs) then ends with the
    bytes of the uninterrupted run, and the image files finished before the kill are the same files (inode, mtime)."""
    root, targets, n = project["root"], WF_TARGETS[stage], project["n"]
    work_dir, suffix = WF_WORK[stage]
    for t in targets:  # start the stage afresh: no outputs, no work (the reference run kept its work folder)
        shutil.rmtree(root / t) if (root / t).is_dir() else (root / t).unlink()
    shutil.rmtree(root / work_dir)
    rng = random.Random(f"{SEED}-workflow-{stage}")
    when = rng.choice(["before", "after"])
    k = rng.randint(2 if when == "before" else 1, n // 2 - 1)  # two shards of n // 2 or more images: one is midway
    where = f"[kill snakemake {when} {stage} file #{k}; replay with ADVCAM_FAULT_SEED={SEED}]"
    env, ready = fault_env(f"*{suffix}", k, when, tmp_path)
    env["PATH"] = project["fake_path"]
    code = stop_at(["snakemake", "--cores", "1", "--nolock", "--", *targets], env, ready, tmp_path / "snakemake.log",
                   signal.SIGKILL, where, cwd=root, group=True)
    assert code == -signal.SIGKILL, where
    (work,) = list((root / work_dir).iterdir())  # one folder: this record's
    finished = stamps(work, suffix)
    assert len(finished) >= (k if when == "after" else k - 1) and len(finished) < n, where
    assert bool(temps(work)) == (when == "before"), where

    log = snakemake(root, "--rerun-incomplete", "--nolock", "--", *targets)
    assert f"rule {stage}_shard:" in log, where
    # the final outputs are hard links to the work files: a file finished before the kill is the very same file
    final = stamps(root / targets[0], suffix)
    assert len(final) == n and {name: final[name] for name in finished} == finished, \
        f"finished per-image work was redone {where}"
    assert [p.name for p in (root / work_dir).iterdir()] == [work.name], "one work folder, this record's, is kept"
    got = tree(root, targets)
    assert sorted(got) == sorted(project["ref"][stage]), where
    assert [f for f in got if got[f] != project["ref"][stage][f]] == [], f"outputs differ {where}"
    assert "Nothing to be done" in snakemake(root, "-n", "--", *targets), where
