"""Sharded cams / refine: real Snakemake runs with workflow.shards = 1, 2, 3 give byte-identical files and
metrics; the splitting, gathering and multi-device helpers on their own."""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advcam import config
from advcam.steps import shards
from advcam.utils.errors import AdvcamError
from conftest import REPO, TINY

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ADVCAM_PROGRESS": "0",
       "OMP_NUM_THREADS": "1"}
# 10 infer images: 3 shards do not divide them. Few climbing steps keep the runs short.
OVERRIDES = [*TINY, "cam.advcam.steps=3", "cam.advcam.backend=fallback"]
OUTPUTS = ["cams", "pseudo", "metrics/seeds.json", "metrics/pseudo.json", "plots/seeds_threshold.csv"]
TARGETS = ["pseudo", "metrics/pseudo.json"]


# --- helpers, no workflow ------------------------------------------------------------------------------------------
def test_parse_shard_accepts_both_spellings_and_rejects_bad_ones():
    assert shards.parse_shard("2/3") == (2, 3) and shards.parse_shard("3-of-3") == (3, 3)
    for bad in ("0/3", "4/3", "1/0", "a/b", "2"):
        with pytest.raises(AdvcamError, match="shard"):
            shards.parse_shard(bad)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_shards_are_disjoint_cover_the_list_and_balanced(count):
    ids = [f"im{i:02d}" for i in range(10)]
    parts = shards.split(ids, count)
    assert len(parts) == count
    assert sorted(i for p in parts for i in p) == ids
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _fingerprinted(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / ".advcam-params.json").write_text(__import__("json").dumps(record))
    return folder


def test_gather_names_the_missing_image_and_refuses_foreign_shards(tmp_path):
    ids = ["a", "b", "c"]
    record = {"cam": 1}
    one = _fingerprinted(tmp_path / "1-of-2", record)
    two = _fingerprinted(tmp_path / "2-of-2", record)
    (one / "a.npz").write_bytes(b"A")  # shard 1 holds a and c, shard 2 holds b
    (two / "b.npz").write_bytes(b"B")
    out = tmp_path / "out"
    out.mkdir()
    valid = lambda p, i: p.is_file()  # noqa: E731
    with pytest.raises(AdvcamError, match=r"image c: .*1-of-2/c\.npz"):
        shards.gather([one, two], ids, ".npz", out, valid, record, "cams")
    assert not list(out.iterdir())  # a's file was not linked before c was found missing
    (one / "c.npz").write_bytes(b"C")
    foreign = _fingerprinted(tmp_path / "other", {"cam": 2})
    with pytest.raises(AdvcamError, match="other params"):
        shards.gather([one, foreign], ids, ".npz", out, valid, record, "cams")
    assert not list(out.iterdir())  # nor shard 1's files before the second folder was refused
    assert shards.gather([one, two], ids, ".npz", out, valid, record, "cams") == 3
    assert [(out / f"{i}.npz").read_bytes() for i in ids] == [b"A", b"B", b"C"]
    assert not list(out.glob(".tmp-*"))
    with pytest.raises(AdvcamError, match="other params"):
        shards.gather([one, two], ids, ".npz", out, valid, {"cam": 2}, "cams")


def test_invalidate_if_changed_records_the_new_params(tmp_path):
    """Files of other params are removed and the new record written, so a resumed run with the new params keeps
    the files it computed."""
    from advcam.utils.io import read_json

    done = tmp_path / "a.npz"
    done.write_bytes(b"v1")
    shards.invalidate_if_changed(tmp_path, {"v": 1}, ["a"], ".npz")
    assert done.exists()
    shards.invalidate_if_changed(tmp_path, {"v": 2}, ["a"], ".npz")
    assert not done.exists() and read_json(tmp_path / shards.FINGERPRINT) == {"v": 2}
    done.write_bytes(b"v2")
    shards.invalidate_if_changed(tmp_path, {"v": 2}, ["a"], ".npz")
    assert done.read_bytes() == b"v2"


# --- real Snakemake runs --------------------------------------------------------------------------------------------
no_snakemake = pytest.mark.skipif(shutil.which("snakemake", path=ENV["PATH"]) is None,
                                  reason="snakemake is not installed (pip install -e .[test])")


def snakemake(root: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["snakemake", "--cores", "2", *args], cwd=root, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """One project; classifier trained once; cams + refine run with 1, 2 and 3 shards, outputs kept per N."""
    root = tmp_path_factory.mktemp("shards")
    shutil.copytree(REPO / "workflow", root / "workflow")
    (root / "params.yaml").write_text(yaml.safe_dump(config.load(None, OVERRIDES).to_dict(), sort_keys=False))
    kept: dict[int, Path] = {}
    for n in (1, 2, 3):
        for out in OUTPUTS:
            path = root / out
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        shutil.rmtree(root / ".advcam-work", ignore_errors=True)  # each N computes every image itself
        r = snakemake(root, "--config", f"workflow={{shards: {n}}}", "--", *TARGETS)
        log = r.stdout + r.stderr
        assert log.count("rule cams_shard:") == n and log.count("rule refine_shard:") == n, log[-3000:]
        assert "rule train_cls:" not in log or n == 1, "the classifier is trained once"
        assert not (root / "shards" / "cams").exists() or not any((root / "shards" / "cams").iterdir()), \
            "shard folders are temporary"
        kept[n] = root / f"run{n}"
        for out in OUTPUTS:
            dest = kept[n] / out
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (root / out).is_dir() else shutil.copy)(root / out, dest)
    kept[0] = root
    return kept


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths of files that differ (or exist on one side only), comparing bytes."""
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*")
                                                                       if p.is_file()}
    return sorted(str(n) for n in names if not ((a / n).is_file() and (b / n).is_file()
                                                and filecmp.cmp(a / n, b / n, shallow=False)))


@no_snakemake
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_outputs_are_byte_identical_to_one_shard(runs, n):
    one, many = runs[1], runs[n]
    ids = (runs[0] / "data/synthetic/lists/infer.txt").read_text().split()
    assert len(ids) % 3 != 0
    assert sorted(p.stem for p in (one / "cams").glob("*.npz")) == sorted(ids)
    assert sorted(p.stem for p in (one / "pseudo").glob("*.png")) == sorted(ids)
    for out in OUTPUTS:
        a, b = one / out, many / out
        diff = _same_tree(a, b) if a.is_dir() else ([] if filecmp.cmp(a, b, shallow=False) else [out])
        assert diff == [], f"{n} shards: {out} differs from 1 shard: {diff[:5]}"


@no_snakemake
def test_workflow_is_up_to_date_after_sharded_run(runs):
    r = snakemake(runs[0], "-n", "--config", "workflow={shards: 3}", "--", *TARGETS)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout


@no_snakemake
def test_work_folder_is_ignored_by_git_and_keeps_only_this_records_files(runs):
    """After the run, the per-image work (.advcam-work/<stage>/<key>/, ADVCAM_WORK_DIR) holds one folder per stage: this
    run's record, whose files are the outputs' own (hard links, no extra space); its root tells git to ignore it."""
    work = runs[0] / ".advcam-work"
    assert (work / ".gitignore").read_text().splitlines()[-1] == "*"
    assert sorted(p.name for p in work.iterdir()) == [".gitignore", "cams", "refine-crf"]
    for stage, suffix, out in (("cams", ".npz", "cams"), ("refine-crf", ".png", "pseudo")):
        folders = list((work / stage).iterdir())
        assert len(folders) == 1, folders
        files = sorted(folders[0].glob(f"*{suffix}"))
        assert len(files) == 10 and all((runs[0] / out / f.name).stat().st_ino == f.stat().st_ino for f in files)


@no_snakemake
def test_a_job_run_again_with_the_same_record_reuses_its_work_folder(runs, tmp_path, monkeypatch, caplog):
    """Snakemake and DVC delete a job's outputs before they run it again (an upstream file or an unrelated param
    changed): the cams stage then takes the files of its work folder, and computes only what is new or changed."""
    import logging

    from advcam.steps import cams

    root = runs[0]
    cfg, data = config.load(None, OVERRIDES), root / "data/synthetic"
    model = tmp_path / "classifier.pt"
    shutil.copy(root / "models/classifier.pt", model)
    monkeypatch.setenv(shards.WORK_ENV, str(tmp_path / "work"))
    paths = dict(out=tmp_path / "cams", metrics=tmp_path / "seeds.json", curve=tmp_path / "seeds.csv")
    cams.run(cfg, data, model, **paths)
    first = paths["metrics"].read_bytes()
    shutil.rmtree(paths["out"])
    paths["metrics"].unlink()
    caplog.clear()
    os.utime(model, ns=(1, 1))  # the classifier trained again to the same bytes: only its time stamp differs
    with caplog.at_level(logging.INFO, logger="advcam"):
        cams.run(cfg, data, model, **paths)
    assert "cams: 0 of 10 images to compute" in caplog.text and paths["metrics"].read_bytes() == first
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="advcam"):  # other params: another record, computed again
        cams.run(config.load(None, [*OVERRIDES, "cam.advcam.steps=2"]), data, model, **paths)
    assert "cams: 10 of 10 images to compute" in caplog.text
    assert len(list((tmp_path / "work/cams").iterdir())) == 1  # the first record's folder is gone


@no_snakemake
def test_randomwalk_through_work_folders_equals_a_plain_run(runs, tmp_path, monkeypatch):
    """refine.method randomwalk as the workflow runs it (two CRF shards and the gather, with ADVCAM_WORK_DIR): the
    same files as one plain run without a work folder, and one work folder per stage is kept at the end."""
    from advcam.steps import refine

    root = runs[0]
    cfg = config.load(None, [*OVERRIDES, "refine.method=randomwalk", "refine.randomwalk.epochs=1",
                             "refine.randomwalk.batch_size=4", "refine.randomwalk.crop_size=32",
                             "refine.randomwalk.train_radius=3"])
    data, cams = root / "data/synthetic", runs[1] / "cams"
    refine.run(cfg, data, cams, tmp_path / "plain", tmp_path / "plain.json")
    monkeypatch.setenv(shards.WORK_ENV, str(tmp_path / "work"))
    for k in (1, 2):
        refine.run(cfg, data, cams, tmp_path / f"shard{k}", tmp_path / "unused.json", shard=(k, 2))
    assert len(list((tmp_path / "work/refine-crf").iterdir())) == 1  # both shards in one folder (one record)
    refine.run(cfg, data, cams, tmp_path / "pseudo", tmp_path / "pseudo.json",
               gather=[tmp_path / "shard1", tmp_path / "shard2"])
    assert _same_tree(tmp_path / "plain", tmp_path / "pseudo") == []
    assert (tmp_path / "plain" / ".affinity.pt").is_file() and (tmp_path / "pseudo" / ".crf").is_dir()
    assert filecmp.cmp(tmp_path / "plain.json", tmp_path / "pseudo.json", shallow=False)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [".gitignore", "refine", "refine-crf"]
    assert [len(list((tmp_path / "work" / s).iterdir())) for s in ("refine", "refine-crf")] == [1, 1]


@no_snakemake
def test_devices_split_gives_the_same_cam_files(runs, tmp_path):
    """Multi-GPU generation's splitting, run on two CPU 'devices' (two processes)."""
    import torch

    from advcam.data import load_info
    from advcam.steps import cams

    root = runs[0]
    cfg = config.load(None, OVERRIDES)
    info = load_info(root / "data/synthetic")
    ids = info.lists["infer"][:3]
    torch.set_num_threads(1)
    cams.compute_on_devices(cfg, info, ids, root / "models/classifier.pt", tmp_path, ["cpu", "cpu"])
    for image_id in ids:
        assert filecmp.cmp(tmp_path / f"{image_id}.npz", runs[1] / "cams" / f"{image_id}.npz", shallow=False)
    with pytest.raises(AdvcamError, match="device process failed"):
        cams.compute_on_devices(cfg, info, ids, root / "missing.pt", tmp_path / "x", ["cpu", "cpu"])


@no_snakemake
def test_a_new_seg_list_neither_retrains_nor_recomputes_finished_cams(runs, tmp_path):
    """`--config dataset={seg_list: train_aug}` prepares the dataset again, so Snakemake runs every later job again
    (after deleting its outputs): the classifier comes back from its remembered training, byte for byte, and
    the cams and CRF jobs compute only the seg list's new images."""
    root = tmp_path / "proj"
    shutil.copytree(runs[0], root, symlinks=True, ignore=shutil.ignore_patterns("run1", "run2", "run3"))
    before = (root / "models/classifier.pt").read_bytes()
    r = snakemake(root, "--config", "workflow={shards: 3}", "dataset={seg_list: train_aug}", "--", *TARGETS)
    log = r.stdout + r.stderr
    assert "rule train_cls:" in log and "its weights are taken" in log, log[-3000:]
    assert (root / "models/classifier.pt").read_bytes() == before
    infer = (root / "data/synthetic/lists/infer.txt").read_text().split()
    seg = (root / "data/synthetic/lists/seg.txt").read_text().split()
    new = len(set(seg) - set(infer))
    assert new > 0 and len(list((root / "cams").glob("*.npz"))) == len(set(seg) | set(infer))
    counts = [int(m) for m in __import__("re").findall(r"cams: (\d+) of \d+ images to compute", log)]
    assert len(counts) == 3 and sum(counts) == new, counts
