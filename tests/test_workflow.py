"""Snakemake and DVC, for real: a tiny run of the whole workflow, a DVC experiment, and drift checks."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advcam import config
from conftest import REPO, TINY

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ADVCAM_PROGRESS": "0",
       "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(shutil.which("snakemake", path=ENV["PATH"]) is None,
                                reason="snakemake is not installed (pip install -e .[test])")


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def make_project(root: Path, overrides: list[str]) -> Path:
    """A git + DVC project holding this repo's workflow, dvc.yaml and tiny params."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    params = config.load(None, overrides).to_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "t@example.com", cwd=root)
    sh("git", "config", "user.name", "t", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "init", cwd=root)
    return root


# --- drift between the Snakemake DAG and dvc.yaml ---------------------------------------------------------------
def snakemake_jobs(cwd: Path) -> dict[str, dict]:
    """Parse `snakemake -n -p --forceall`: per rule its inputs, outputs and the param sections it passes (the
    union over the rule's jobs)."""
    out = sh("snakemake", "-n", "-p", "--forceall", cwd=cwd).stdout
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=\[.*\]\nrule )", out):
        m = re.search(r"^rule (\w+):$", block, re.M)
        if not m:
            continue
        field = lambda k: [s.strip() for s in re.search(rf"^\s+{k}: (.*)$", block, re.M).group(1).split(",")] \
            if re.search(rf"^\s+{k}: ", block, re.M) else []
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        params = []
        if shell and "--params-json" in shell.group(1):
            params = sorted(json.loads(re.search(r"--params-json '(\{.*?\})'", shell.group(1)).group(1)))
        job = jobs.setdefault(m.group(1), {"input": [], "output": [], "params": []})
        for key, values in (("input", field("input")), ("output", field("output")), ("params", params)):
            job[key] += [v for v in values if v not in job[key]]  # a scatter rule has one job per shard
    return jobs


def dvc_stages(root: Path) -> dict[str, dict]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    text = (root / "dvc.yaml").read_text().replace("${dataset.name}", params["dataset"]["name"])
    stages = yaml.safe_load(text)["stages"]
    out = {}
    for name, st in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics", "plots") for o in st.get(key, [])]
        plist = st["params"]
        out[name] = {"cmd": st["cmd"], "deps": st.get("deps", []), "outs": outs,
                     "params": plist if any(isinstance(p, dict) for p in plist) else sorted(plist)}
    return out


# Scatter rules run inside their gather rule's DVC stage (their outputs are temporary shard folders).
SCATTER = {"cams": ["cams_shard"], "refine": ["refine_shard"]}


# DVC's first stage validates every param; prepare depends on its output (it has no Snakemake rule).
CHECK = "check_params"
CHECKED = "logs/params.checked"


def test_dvc_stages_match_snakemake_dag():
    jobs = snakemake_jobs(REPO)
    stages = dvc_stages(REPO)
    check = stages.pop(CHECK)
    assert check == {"cmd": f"advcam params --check {CHECKED}", "deps": [], "outs": [CHECKED],
                     "params": [{"params.yaml": None}]}, check
    assert stages["prepare"]["deps"] == [CHECKED]
    stages["prepare"]["deps"] = []
    rules = [r for r in jobs if r != "all"]
    scattered = [r for group in SCATTER.values() for r in group]
    assert sorted(stages) == sorted(r for r in rules if r not in scattered), \
        "every rule (but 'all' and the scatter rules) has exactly one DVC stage"
    for rule in stages:
        job, st = jobs[rule], stages[rule]
        group = SCATTER.get(rule, []) + [rule]
        assert st["cmd"] == (f"snakemake --cores all --rerun-incomplete --nolock --allowed-rules {' '.join(group)} -- "
                             f"{' '.join(job['output'])}"), rule
        inner = {o for r in group for o in jobs[r]["output"]}
        inputs = {i for r in group for i in jobs[r]["input"]} - inner
        assert sorted(st["deps"]) == sorted(inputs), f"{rule}: DVC deps != Snakemake inputs"
        assert sorted(st["outs"]) == sorted(job["output"]), f"{rule}: DVC outs != Snakemake outputs"
        params = sorted({p for r in group for p in jobs[r]["params"]})
        assert st["params"] == params, f"{rule}: DVC params != the sections the rule passes to advcam"


def _rule_params(cwd: Path, rule: str, *config_args: str) -> dict:
    out = sh("snakemake", "-n", "-p", "--forceall", *config_args, cwd=cwd).stdout
    for block in re.split(r"\n(?=\[.*\]\nrule )", out):
        if re.search(rf"^rule {rule}:$", block, re.M):
            return json.loads(re.search(r"--params-json '(\{.*?\})'", block).group(1))
    raise AssertionError(f"no job of rule {rule}")


def test_params_of_unused_methods_rerun_nothing():
    """A rule's params leave out the sub-sections of methods it does not use, so Snakemake reruns nothing when
    one of them changes (classifier.seam.lr while classifier.method is cam)."""
    cls = _rule_params(REPO, "train_cls")["classifier"]
    assert "seam" not in cls and "eader" not in cls and "trained" not in cls  # unset: as before the key existed
    assert _rule_params(REPO, "train_cls", "--config", "classifier={seam: {lr: 0.5}}")["classifier"] == cls
    seam = _rule_params(REPO, "train_cls", "--config", "classifier={method: seam}")["classifier"]
    assert "seam" in seam and "eader" not in seam
    assert "randomwalk" not in _rule_params(REPO, "refine")["refine"]
    assert "advcam" in _rule_params(REPO, "figures", "--config", "cam={method: cam}")["cam"]  # the report draws both


def test_snakemake_lint_is_clean():
    r = sh("snakemake", "--lint", cwd=REPO, check=False)
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_snakemake_config_override_reaches_rules():
    r = sh("snakemake", "-n", "-p", "--forceall", "--config", "cam={method: cam, scales: [1.0]}", cwd=REPO)
    assert '"scales": [1.0]' in r.stdout
    bad = sh("snakemake", "-n", "--config", "cam={bogus: 1}", cwd=REPO, check=False)
    assert bad.returncode != 0 and "cam.bogus" in bad.stdout + bad.stderr


def restore(root: Path, *names: str) -> None:
    """Write the committed bytes back. Not `git checkout`: a file that `dvc exp run` rewrote to the same size within
    the second of the commit keeps a stat that git's index takes as unchanged, so checkout leaves it as it is."""
    for name in names:
        (root / name).write_bytes(subprocess.run(["git", "show", f"HEAD:{name}"], cwd=root, check=True,
                                                 capture_output=True).stdout)


# --- real runs ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    """`dvc repro` of the tiny pipeline: every DVC stage runs its Snakemake rule, which runs `advcam`."""
    root = make_project(tmp_path_factory.mktemp("dvcproj"), TINY)
    sh("dvc", "repro", cwd=root)
    return root


def test_repro_writes_every_output_and_metric(dvc_project):
    root = dvc_project
    seeds = json.loads((root / "metrics/seeds.json").read_text())
    pseudo = json.loads((root / "metrics/pseudo.json").read_text())
    seg = json.loads((root / "metrics/segmentation.json").read_text())
    assert 0.0 <= seeds["seed_miou"] <= 1.0 and "seed_best_threshold" in seeds
    assert 0.0 <= pseudo["pseudo_miou"] <= 1.0
    assert 0.0 <= seg["val_miou"] <= 1.0
    ids = (root / "data/synthetic/lists/infer.txt").read_text().split()
    assert sorted(p.stem for p in (root / "cams").glob("*.npz")) == sorted(ids)
    assert sorted(p.stem for p in (root / "pseudo").glob("*.png")) == sorted(ids)
    assert (root / "plots/evaluation/gallery.png").stat().st_size > 0


def test_snakemake_has_nothing_to_do_after_run(dvc_project):
    r = sh("snakemake", "-n", cwd=dvc_project)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout


def test_dvc_status_clean_after_repro(dvc_project):
    r = sh("dvc", "status", cwd=dvc_project)
    assert "up to date" in r.stdout, r.stdout


def test_cam_param_experiment_reruns_cams_not_classifier(dvc_project):
    root = dvc_project
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "baseline", cwd=root)
    model = root / "models/classifier.pt"
    before = model.read_bytes()
    r = sh("dvc", "exp", "run", "-S", "cam.scales=[1.0]", cwd=root)
    log = r.stdout + r.stderr
    assert "Stage 'train_cls' didn't change, skipping" in log, log
    assert "Running stage 'cams'" in log, log
    assert "Running stage 'train_seg'" in log or "Stage 'train_seg' didn't change" in log
    assert model.read_bytes() == before
    diff = sh("dvc", "metrics", "diff", "--json", cwd=root).stdout
    changed = json.loads(diff)
    keys = {k for f in changed.values() for k in f}
    assert {"seed_miou", "pseudo_miou", "val_miou"} & keys, diff
    # the experiment beside its baseline: its param and the metrics of both rows
    table = sh("dvc", "exp", "show", "--csv", "--no-pager", cwd=root).stdout
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r.get("cam.scales")]
    assert len({r["cam.scales"] for r in rows}) >= 2 and "[1.0]" in {r["cam.scales"] for r in rows}, table
    assert all(0 <= float(r["seed_miou"]) <= 1 for r in rows), table  # metrics are in git: every row has them
    # the threshold curve across the two revisions: one HTML page holding both revisions' data
    out = root / "plots-diff"
    sh("dvc", "plots", "diff", "HEAD", "-o", str(out), cwd=root)
    page = (out / "index.html").read_text()
    assert "seed mIoU vs background threshold" in page and "HEAD" in page and "workspace" in page


def test_bad_value_experiment_stops_before_any_stage_removes_outputs(dvc_project):
    """DVC removes a stage's outputs before it runs it: a bad value must be refused by check_params, before the
    stage that reads it (here train_seg) loses its finished checkpoint."""
    root = dvc_project
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "before a bad experiment", "--allow-empty", cwd=root)
    kept = ["models/segmenter.pt", "metrics/segmentation.json", "metrics/pseudo.json", "plots/train_seg.csv"]
    before = {f: (root / f).read_bytes() for f in kept}
    try:
        r = sh("dvc", "exp", "run", "-S", "segmentation.epochs=0", cwd=root, check=False)
        assert r.returncode != 0
        assert "segmentation.epochs" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "Running stage 'train_seg'" not in r.stdout + r.stderr
        assert {f: (root / f).read_bytes() for f in kept if (root / f).is_file()} == before
    finally:
        restore(root, "params.yaml")


def test_changing_workers_reruns_nothing(dvc_project):
    """DataLoader workers cannot change a result, so neither Snakemake nor DVC reruns a stage for them; a param
    that does change results (the contrast) is planned."""
    root = dvc_project
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "before workers", "--allow-empty", cwd=root)
    plan = sh("snakemake", "-n", "--config", "workers=2", cwd=root)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    shell = sh("snakemake", "-n", "-p", "--forceall", "--config", "workers=2", cwd=root).stdout
    assert shell.count("--set workers=2") == 3, shell  # train_cls, refine (the affinity net), train_seg
    contrast = sh("snakemake", "-n", "--config", "segmentation={epochs: 2}", cwd=root)
    assert "train_seg" in contrast.stdout and "Nothing to be done" not in contrast.stdout, contrast.stdout
    params = root / "params.yaml"
    text = params.read_text()
    try:
        params.write_text(text.replace("\nworkers: 0\n", "\nworkers: 2\n"))
        assert params.read_text() != text
        r = sh("dvc", "repro", cwd=root)
        log = r.stdout + r.stderr
        assert "Running stage 'check_params'" in log, log
        ran = re.findall(r"Running stage '(\w+)'", log)
        assert ran == ["check_params"], log
    finally:
        restore(root, "params.yaml", "dvc.lock")


def test_predict_list_adds_its_masks_to_the_default_target(dvc_project):
    """With predict.list set, `snakemake` also predicts that list's images (rule predict, one job: no other rule
    depends on the section) into predictions/<list>/; then there is nothing left to do."""
    root = dvc_project
    sh("snakemake", "--cores", "1", "--config", "predict={list: val}", cwd=root)
    ids = (root / "data/synthetic/lists/val.txt").read_text().split()
    assert sorted(p.stem for p in (root / "predictions/val").glob("*.png")) == sorted(ids)
    assert (root / "logs/predict_val.log").is_file()
    r = sh("snakemake", "-n", "--config", "predict={list: val}", cwd=root)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout
    assert "predictions/" in sh("git", "check-ignore", "predictions/val", cwd=root).stdout


def test_a_forced_rerun_computes_its_stage_again(dvc_project):
    """`--forcerun` asks for a stage to be computed again: the work folder and training memo that a rerun would take
    its results from are removed first, for the forced rules only (not in a dry run). Every CAM is computed again,
    to the same bytes; the classifier's memo, of a rule not forced, stays; forcing train_cls trains it again."""
    root = dvc_project
    work, memo = root / ".advcam-work" / "cams", root / "models" / "classifier.pt.done.pt"
    before = {p.name: p.read_bytes() for p in (root / "cams").glob("*.npz")}
    assert before and list(work.rglob("*.npz")) and memo.is_file()
    forced = ("--forcerun", "cams_shard", "cams", "--", "cams")
    sh("snakemake", "-n", *forced, cwd=root)
    assert list(work.rglob("*.npz"))
    r = sh("snakemake", "--cores", "2", *forced, cwd=root)
    log = r.stdout + r.stderr
    assert "forced rerun of cams, cams_shard: removed .advcam-work/cams, to compute it again" in log, log
    shards = re.findall(r"cams: (\d+) of (\d+) images to compute \((\d+) done already\)", log)
    assert sum(int(n) for n, _, _ in shards) == len(before) and {d for _, _, d in shards} == {"0"}, log
    assert {p.name: p.read_bytes() for p in (root / "cams").glob("*.npz")} == before
    assert memo.is_file()
    r = sh("snakemake", "--cores", "2", "--forcerun", "train_cls", "--", "models/classifier.pt", cwd=root)
    log = r.stdout + r.stderr
    assert all(f"forced rerun of train_cls: removed models/classifier.pt.done.{x}" in log for x in ("pt", "json")), log
    assert "holds a finished training" not in log and memo.is_file(), log  # trained, and remembered again


def test_a_missing_outside_file_is_named_before_any_job(tmp_path):
    """Snakemake passes over a finished job whose input file is missing, even when its params changed: a mistyped
    path would leave the earlier results in place without a word. The workflow refuses it when it starts, naming
    the key and the path (exit 1, no job)."""
    (tmp_path / "VOC" / "ImageSets" / "Segmentation").mkdir(parents=True)
    missing = tmp_path / "nope.pth"
    cases = [(f"classifier={{trained: {missing}}}", "classifier.trained"),
             (f"segmentation={{pretrained: {missing}}}", "segmentation.pretrained"),
             (f"refine={{method: randomwalk, randomwalk: {{design: psa, psa: {{trained: {missing}}}}}}}",
              "refine.randomwalk.psa.trained"),
             (f"refine={{method: randomwalk, randomwalk: {{arch: resnet50, pretrained: {missing}}}}}",
              "refine.randomwalk.pretrained"),
             (f"refine={{method: randomwalk, randomwalk: {{trained: {missing}}}}}", "refine.randomwalk.trained"),
             (f"dataset={{kind: voc, root: {tmp_path / 'VOC'}}}", "dataset list 'train'")]
    for override, key in cases:
        r = sh("snakemake", "-n", "--config", override, cwd=REPO, check=False)
        out = r.stdout + r.stderr  # Snakemake prints its errors on stdout
        assert r.returncode == 1 and f"{key}: file not found: " in out and "Job stats" not in out, (override, out)
    # an earlier run's network in rule refine's own output folder, which Snakemake deletes before the rule runs
    r = sh("snakemake", "-n", "--config", "refine={method: randomwalk, randomwalk: {trained: pseudo/.affinity.pt}}",
           cwd=REPO, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "refine.randomwalk.trained: pseudo/.affinity.pt lies in pseudo/, the refine stage's " \
        "output folder, which Snakemake and DVC delete before they run the stage: copy it out first" in out, out


def test_files_outside_the_repository_are_rule_inputs(tmp_path):
    """A VOC dataset's list files and labels file are prepare's inputs, a set `pretrained` file the trainings'
    (the affinity network's with the random walk; a set `refine.randomwalk.trained` file, or with design psa its
    `psa.trained` file, instead) and a set
    `classifier.trained` file train_cls's, so a newer one reruns the stage; unset, they are not inputs."""
    lists = tmp_path / "VOC" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for name in ("train_aug", "train", "val", "test"):
        (lists / f"{name}.txt").write_text("a\n")
    weights, trained = tmp_path / "w.pth", tmp_path / "res50_cam.pth"
    weights.write_bytes(b"")
    trained.write_bytes(b"")
    (tmp_path / "VOC" / "labels.txt").write_text("a cat\n")
    out = sh("snakemake", "-n", "--forceall", "--config",
             f"dataset={{kind: voc, root: {tmp_path / 'VOC'}, labels_file: labels.txt}}",
             f"classifier={{pretrained: {weights}, trained: {trained}}}", f"segmentation={{pretrained: {weights}}}",
             "refine={method: randomwalk}", "predict={list: test}", cwd=REPO).stdout
    jobs = {}
    for block in re.split(r"\n(?=\[.*\]\nrule )", out):
        m = re.search(r"^rule (\w+):$", block, re.M)
        if m:
            inputs = re.search(r"^\s+input: (.*)$", block, re.M)
            jobs[m.group(1)] = {s.strip() for s in inputs.group(1).split(",")} if inputs else set()
    assert jobs["prepare"] == {*(str(lists / f"{n}.txt") for n in ("train_aug", "train", "val")),
                               str(tmp_path / "VOC" / "labels.txt")}, jobs["prepare"]
    for rule in ("train_cls", "train_seg", "refine"):
        assert str(weights) in jobs[rule], (rule, jobs[rule])
    assert str(lists / "test.txt") in jobs["predict"], jobs["predict"]  # predict.list's list file
    assert str(trained) in jobs["train_cls"] and str(trained) not in jobs["refine"]  # classifier.trained
    walk = tmp_path / "resnet50.pth"  # refine.randomwalk.pretrained, for its own arch, replaces classifier.pretrained
    walk.write_bytes(b"")
    out = sh("snakemake", "-n", "--forceall", "--config", f"classifier={{arch: resnet38, pretrained: {weights}}}",
             f"refine={{method: randomwalk, randomwalk: {{arch: resnet50, pretrained: {walk}}}}}", cwd=REPO).stdout
    refine = re.search(r"^rule refine:$.*?^\s+input: (.*)$", out, re.M | re.S)
    assert refine and str(walk) in refine.group(1) and str(weights) not in refine.group(1), out
    aff = tmp_path / "resnet38_aff.pth"  # design psa: PSA's trained AffinityNet, and no other affinity weights
    aff.write_bytes(b"")
    out = sh("snakemake", "-n", "--forceall", "--config", f"classifier={{arch: resnet38, pretrained: {weights}}}",
             f"refine={{method: randomwalk, randomwalk: {{design: psa, pretrained: {walk}, psa: {{trained: {aff}}}}}}}",
             cwd=REPO).stdout
    refine = re.search(r"^rule refine:$.*?^\s+input: (.*)$", out, re.M | re.S)
    assert refine and str(aff) in refine.group(1) and str(walk) not in refine.group(1), out
    out = sh("snakemake", "-n", "--forceall", "--config", f"classifier={{arch: resnet38, pretrained: {weights}}}",
             "refine={method: randomwalk, randomwalk: {design: psa}}", cwd=REPO).stdout  # trained from these
    refine = re.search(r"^rule refine:$.*?^\s+input: (.*)$", out, re.M | re.S)
    assert refine and str(weights) in refine.group(1), out
    irn = tmp_path / "res50_irn.pth"  # refine.randomwalk.trained: IRN's boundary network, and no other weights
    irn.write_bytes(b"")
    out = sh("snakemake", "-n", "--forceall", "--config", f"classifier={{pretrained: {weights}}}",
             f"refine={{method: randomwalk, randomwalk: {{trained: {irn}}}}}", cwd=REPO).stdout
    refine = re.search(r"^rule refine:$.*?^\s+input: (.*)$", out, re.M | re.S)
    assert refine and str(irn) in refine.group(1) and str(weights) not in refine.group(1), out
    plain = snakemake_jobs(REPO)
    assert plain["prepare"]["input"] == [] and str(weights) not in plain["train_cls"]["input"]
