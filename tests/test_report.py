"""`snakemake --report` on a tiny run: every section, every image, the figures' numbers, and a real browser."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from advcam import cli, config
from conftest import REPO, TINY

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ADVCAM_PROGRESS": "0",
       "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(shutil.which("snakemake", path=ENV["PATH"]) is None,
                                reason="snakemake is not installed (pip install -e .[test])")
# TINY, with two climbing steps so that AdvCAM takes seconds, on the pure-PyTorch ops (no waiting for a build
# of the C++ extension, which other tests cover).
OVERRIDES = [*TINY, "cam.advcam.steps=2", "cam.advcam.backend=fallback"]
CATEGORIES = {"1. Results": {"figures/methods.html", "figures/per_class_iou.png"},
              "2. Seeds": {"figures/threshold.png"}, "3. Training": {"figures/training.png"},
              "4. Gallery": {"figures/gallery.png"}}
# Fixed-size figures (advcam.plots, 100 dpi): threshold and per-class 6x4 in; training 4.5 in per panel.
SIZES = {"figures/threshold.png": (600, 400), "figures/per_class_iou.png": (600, 400),
         "figures/training.png": (900, 350)}  # two panels with CRF refinement: classifier, segmenter


def sh(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny pipeline run by Snakemake, then `snakemake --report report.html`."""
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(REPO / "workflow", root / "workflow")
    (root / "params.yaml").write_text(yaml.safe_dump(config.load(None, OVERRIDES).to_dict(), sort_keys=False))
    # The stages run in this process (one torch import instead of six; test_workflow runs them through
    # Snakemake); Snakemake then has only the figures rule left to run.
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for stage in ("prepare", "train-cls", "cams", "refine", "train-seg", "evaluate"):
            assert cli.main([stage, "--params", "params.yaml"]) == 0, stage
    finally:
        os.chdir(cwd)
    dry = sh("snakemake", "-n", cwd=root).stdout
    assert re.findall(r"^rule (\w+):", dry, re.M) == ["figures", "all"], dry
    sh("snakemake", "--cores", "2", "-q", cwd=root)
    sh("snakemake", "--report", "report.html", cwd=root)
    return root


def embedded(root: Path) -> tuple[dict, dict]:
    """The report's `results` and `categories` JavaScript objects."""
    text = (root / "report.html").read_text()
    get = lambda name: json.loads(re.search(rf"var {name} = (\{{.*?\}});\n", text, re.S).group(1))
    return get("results"), get("categories")


def decode(uri: str) -> bytes:
    head, data = uri.split(",", 1)
    assert head.endswith(";base64"), head
    return base64.b64decode(data)


def test_report_has_every_section_with_a_caption(project):
    results, categories = embedded(project)
    assert {c: {p for sub in s.values() for p in sub} for c, s in categories.items()} == CATEGORIES
    assert set(results) == set().union(*CATEGORIES.values())
    for path, entry in results.items():
        assert len(re.sub(r"<[^>]+>", "", entry["caption"]).strip()) > 80, f"{path}: caption missing"
        assert entry["labels"]["figure"], path
    assert "synthetic" in results["figures/gallery.png"]["caption"] or "advcam" in results["figures/gallery.png"]["caption"]


def test_every_image_renders_at_its_size(project):
    results, _ = embedded(project)
    pngs = {p: e for p, e in results.items() if e["mime_type"] == "image/png"}
    assert len(pngs) == 4
    for path, entry in pngs.items():
        data = decode(entry["data_uri"])
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data == (project / path).read_bytes(), path
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        h, w = image.shape[:2]
        if path in SIZES:
            assert (w, h) == SIZES[path], path
        assert image.std() > 5, f"{path} is blank"
    gallery = Image.open(project / "figures/gallery.png")
    rows, cols = 2, 6  # evaluation.gallery_size=2; image, ground truth, CAM, AdvCAM, pseudo label, prediction
    assert abs(gallery.width / gallery.height - cols / rows) < 0.35 * cols / rows, gallery.size


def test_method_table_matches_the_metrics(project):
    results, _ = embedded(project)
    page = decode(results["figures/methods.html"]["data_uri"]).decode()
    seeds = json.loads((project / "metrics/seeds.json").read_text())
    seg = json.loads((project / "metrics/segmentation.json").read_text())
    rows = list(csv.DictReader((project / "figures/methods.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["attribution"] == "advcam"
    assert rows[0]["seed mIoU %"] == f"{100 * seeds['seed_miou']:.1f}"
    assert rows[0]["val mIoU %"] == f"{100 * seg['val_miou']:.1f}"
    assert f"<td>{rows[0]['val mIoU %']}</td>" in page and "<table>" in page
    per_class = list(csv.DictReader((project / "figures/per_class_iou.csv").read_text().splitlines()))
    assert [r["class"] for r in per_class][0] == "background" and len(per_class) == 4  # bg + 3 classes
    assert float(per_class[1]["seeds"]) == pytest.approx(seeds["seed_iou_" + per_class[1]["class"]], abs=1e-6)


def test_gallery_rows_hold_both_cam_and_advcam(project, tiny_cfg):
    from advcam.data import load_info
    from advcam.models import load_classifier
    from advcam.steps import figures

    info = load_info(project / "data/synthetic")
    image_id = info.lists["infer"][0]
    model = load_classifier(project / "models/classifier.pt", map_location="cpu", num_classes=info.num_classes)
    cfg = config.load(None, OVERRIDES)
    row = figures.image_row(info, image_id, cams=project / "cams", pseudo=project / "pseudo", cam_method="advcam",
                            classifier=model.eval(), cfg_cam=cfg.cam)
    assert {"image", "ground truth", "CAM", "AdvCAM", "pseudo label"} <= set(row)
    assert row["CAM"].shape == row["AdvCAM"].shape and not np.allclose(row["CAM"], row["AdvCAM"])


def test_other_runs_add_rows_and_curves(project, tmp_path):
    from advcam.steps import figures

    runs = tmp_path / "runs"
    (runs / "baseline").mkdir(parents=True)
    for name in ("seeds.json", "pseudo.json"):
        shutil.copy(project / "metrics" / name, runs / "baseline" / name)
    shutil.copy(project / "plots/seeds_threshold.csv", runs / "baseline/seeds_threshold.csv")
    cfg = config.load(None, [*OVERRIDES, "evaluation.gallery_size=1"])
    figures.run(cfg, project / "data/synthetic", project / "models/classifier.pt", project / "models/segmenter.pt",
                project / "cams", project / "pseudo", project / "metrics", project / "plots", runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out/methods.csv").read_text().splitlines()))
    assert [r["run"] for r in rows][1:] == ["baseline"] and rows[1]["val mIoU %"] == ""
    assert rows[1]["seed mIoU %"] == rows[0]["seed mIoU %"]


def test_training_curves_are_logged_with_dvclive(project):
    pytest.importorskip("dvclive")
    for name in ("train_cls", "train_seg"):
        steps = [r["step"] for r in csv.DictReader((project / f"plots/{name}.csv").read_text().splitlines())]
        tsv = (project / f"plots/dvclive/{name}/plots/metrics/loss.tsv").read_text().split()
        assert tsv[:2] == ["step", "loss"] and tsv[2::2] == steps, name
        summary = json.loads((project / f"plots/dvclive/{name}/metrics.json").read_text())
        assert summary["step"] == int(steps[-1])


def test_report_is_self_contained(project):
    """Nothing is fetched when the report opens: every script, style, image and frame is inline or a data: URI
    (the report is one file that works offline), the method table's frame included."""
    results, _ = embedded(project)
    pages = {"report.html": (project / "report.html").read_text(),
             "methods.html": decode(results["figures/methods.html"]["data_uri"]).decode()}
    for name, page in pages.items():
        # the markup, with inline script bodies dropped (the embedded libraries hold HTML snippets in strings)
        text = re.sub(r"(<script\b[^>]*>).*?</script>", r"\1</script>", page, flags=re.S | re.I)
        refs = re.findall(r"<(?:script|link|img|iframe|source|embed)\b[^>]*?\s(?:src|href)\s*=\s*[\"']?([^\"'\s>]+)",
                          text, re.I)
        assert [r for r in refs if not r.startswith("data:")] == [], name
        assert not re.search(r"@import\s+url\(\s*[\"']?https?:", text, re.I), name
    assert len(pages["report.html"]) > 100_000  # React, Vega and the figures are embedded, not linked


def test_dvc_plots_show_gives_threshold_per_class_and_loss_curves(project, tmp_path):
    """`dvc plots show` on this repo's dvc.yaml over a finished run: the seed threshold curve, the per-class IoU
    bars and both training loss curves, each with the run's numbers (what `dvc plots diff` compares)."""
    if shutil.which("dvc", path=ENV["PATH"]) is None:
        pytest.skip("dvc is not installed (pip install -e .[test])")
    for name in ("figures", "plots", "metrics", "params.yaml"):
        (shutil.copytree if (project / name).is_dir() else shutil.copy)(project / name, tmp_path / name)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    sh("dvc", "init", "--no-scm", "-q", cwd=tmp_path)
    shown = json.loads(sh("dvc", "plots", "show", "--json", cwd=tmp_path).stdout)
    plots = shown.get("data", shown)

    def values(name: str) -> list[dict]:
        (entry,) = [e for e in plots[name] if e.get("type") == "vega"]
        return entry["content"]["data"]["values"]

    curve = list(csv.DictReader((project / "plots/seeds_threshold.csv").read_text().splitlines()))
    threshold = values("seed mIoU vs background threshold")
    assert [(v["threshold"], v["miou"]) for v in threshold] == [(r["threshold"], r["miou"]) for r in curve]
    classes = [r["class"] for r in csv.DictReader((project / "figures/per_class_iou.csv").read_text().splitlines())]
    for stage in ("seeds", "pseudo labels", "val prediction"):
        bars = values(f"per-class IoU of the {stage.replace('val prediction', 'val predictions')}")
        assert [v["class"] for v in bars] == classes and all(stage in v for v in bars), stage
    for name in ("train_cls", "train_seg"):
        rows = list(csv.DictReader((project / f"plots/{name}.csv").read_text().splitlines()))
        assert [(v["step"], v["loss"]) for v in values(f"plots/{name}.csv")] == [(r["step"], r["loss"]) for r in rows]


def test_zip_report_holds_the_files(project):
    sh("snakemake", "--report", "report.zip", cwd=project)
    names = zipfile.ZipFile(project / "report.zip").namelist()
    assert "report/report.html" in names
    assert {Path(n).name for n in names} >= {"gallery.png", "training.png", "threshold.png", "methods.html"}


# ---- a real browser -----------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# --disable-dev-shm-usage: containers often have a 64 MB /dev/shm, too small for a renderer with the report's
# embedded images.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--virtual-time-budget=15000"]
# Injected into a copy of the report: record errors, then click every category and view every image.
HARNESS_HEAD = """<script>window.__errors=[];
window.addEventListener('error',e=>__errors.push('error: '+e.message));
window.addEventListener('unhandledrejection',e=>__errors.push('rejection: '+e.reason));
(function(){const o=console.error;console.error=function(){__errors.push('console.error: '+
Array.from(arguments).join(' '));o.apply(console,arguments);};})();</script>"""
HARNESS_TAIL = """<script>
const sleep=ms=>new Promise(r=>setTimeout(r,ms));
const links=()=>Array.from(document.querySelectorAll('#app a'));
async function open(cat){
  const back=links().find(x=>x.textContent.trim()==='Results'); if(back){back.click(); await sleep(200);}
  const a=links().find(x=>x.textContent.trim()===cat); if(!a) return false;
  a.click(); await sleep(300); return true;
}
async function check(){
  const out={errors:__errors,shown:{},frames:[]};
  try{
    await sleep(500);
    for(const cat of CATEGORIES){
      if(!await open(cat)){out.errors.push('no menu entry '+cat);continue;}
      out.shown[cat]=[];
      const n=document.querySelectorAll('#app table a').length;
      for(let i=0;i<n;i++){
        await open(cat);
        document.querySelectorAll('#app table a')[i].click(); await sleep(300);
        for(const im of Array.from(document.querySelectorAll('#app img')).filter(m=>m.src.startsWith('data:image/png'))){
          if(!im.complete) await new Promise(r=>{im.onload=r;im.onerror=r;});
          out.shown[cat].push([im.naturalWidth,im.naturalHeight]);
        }
        for(const f of document.querySelectorAll('#app iframe')) out.frames.push(f.src.slice(0,30));
      }
    }
  }catch(e){out.errors.push('harness: '+e);}
  const pre=document.createElement('pre');pre.id='advcam-check';pre.textContent=JSON.stringify(out);
  document.body.appendChild(pre);
}
window.addEventListener('load',()=>check());
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_report_loads_in_chromium_and_shows_the_gallery(project, tmp_path):
    run = lambda page: subprocess.run([CHROMIUM, *CHROME_FLAGS, "--enable-logging=stderr", "--v=0", "--dump-dom",
                                       page.as_uri()], capture_output=True, text=True, timeout=120)
    plain = run(project / "report.html")
    console = [line for line in plain.stderr.splitlines() if ":CONSOLE" in line]
    assert not [c for c in console if re.search(r"Uncaught|Error|Failed", c)], console
    assert "4. Gallery" in plain.stdout
    text = (project / "report.html").read_text()
    head = text.index("<head>") + len("<head>")
    tail = text.rindex("</body>")
    harness = tmp_path / "harness.html"
    script = HARNESS_TAIL.replace("CATEGORIES", json.dumps(sorted(CATEGORIES)))
    harness.write_text(text[:head] + HARNESS_HEAD + text[head:tail] + script + text[tail:])
    dom = run(harness).stdout
    found = re.search(r'<pre id="advcam-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    out = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert out["errors"] == [], out
    gallery = Image.open(project / "figures/gallery.png").size
    assert list(gallery) in out["shown"]["4. Gallery"], out
    assert any(f.startswith("data:text/html") for f in out["frames"]), out  # the method table
    for path, size in SIZES.items():
        cat = next(c for c, paths in CATEGORIES.items() if path in paths)
        assert list(size) in out["shown"][cat], (path, out)


def test_dvclive_mirror_is_rewritten_whole_and_can_be_switched_off(tmp_path, monkeypatch):
    pytest.importorskip("dvclive")
    from advcam.train import live

    curves = tmp_path / "plots" / "train_cls.csv"
    assert live.log_curves(curves, [[1, 1, 0.9, 0.1], [1, 2, 0.8, 0.05], [2, 3, 0.7, 0.01]]) == live.live_dir(curves)
    assert live.log_curves(curves, [[1, 1, 0.9, 0.1]]) is not None  # e.g. a rerun from scratch
    tsv = (tmp_path / "plots/dvclive/train_cls/plots/metrics/loss.tsv").read_text().split()
    assert tsv == ["step", "loss", "1", "0.9"]
    assert sorted(p.name for p in (tmp_path / "plots/dvclive").iterdir()) == ["train_cls"]  # no temporaries left
    monkeypatch.setenv("ADVCAM_DVCLIVE", "0")
    assert live.log_curves(tmp_path / "other.csv", [[1, 1, 0.5, 0.1]]) is None
    assert not (tmp_path / "dvclive").exists()
