"""`snakemake --report` on a tiny run: every section, every image, the figures' numbers, and a real browser."""
from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
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
needs_dvc = pytest.mark.skipif(shutil.which("dvc", path=ENV["PATH"]) is None,
                               reason="dvc is not installed (pip install -e .[test])")


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
    pseudo = json.loads((project / "metrics/pseudo.json").read_text())
    assert rows[0]["pseudo mIoU % (unsure = bg)"] == f"{100 * pseudo['pseudo_miou_unsure_as_background']:.1f}"
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
    assert rows[1]["classifier"] == rows[1]["attribution"] == ""  # no params.yaml copied: unknown methods
    (runs / "baseline" / "params.yaml").write_text("classifier: {method: seam}\ncam: {method: cam}\n")
    figures.run(cfg, project / "data/synthetic", project / "models/classifier.pt", project / "models/segmenter.pt",
                project / "cams", project / "pseudo", project / "metrics", project / "plots", runs, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out/methods.csv").read_text().splitlines()))
    assert (rows[1]["classifier"], rows[1]["attribution"], rows[1]["refinement"]) == ("seam", "cam", "crf")


def test_figures_of_a_run_on_a_classifier_trained_elsewhere(tmp_path):
    """With classifier.trained nothing is trained, and train_cls writes a curve with a header alone: the training
    figure is still made, the classifier's panel saying so, and the methods table names the file."""
    from PIL import Image

    from advcam.plots import plot_training_curves
    from advcam.steps import figures

    (tmp_path / "train_cls.csv").write_text("epoch,step,loss,lr\n")  # what train_cls writes for classifier.trained
    empty = figures.read_csv_columns(tmp_path / "train_cls.csv")
    assert empty == {"epoch": [], "step": [], "loss": [], "lr": []}
    plot_training_curves({"classifier": empty, "segmenter": {"step": [1.0, 2.0], "loss": [2.0, 1.0], "lr": [.1, .1]}},
                         tmp_path / "training.png")
    assert Image.open(tmp_path / "training.png").size == SIZES["figures/training.png"]
    cfg = config.load(None, [*OVERRIDES, f"classifier.trained={tmp_path / 'cls.pth'}"])
    assert figures.methods_of(cfg) == {"classifier": "cam (taken: cls.pth)", "cam": "advcam", "refine": "crf"}
    assert figures.methods_of(config.load(None, OVERRIDES))["classifier"] == "cam"
    psa = ["refine.method=randomwalk", "refine.randomwalk.design=psa", "refine.randomwalk.psa.trained=/w/aff.pth"]
    assert figures.methods_of(config.load(None, [*OVERRIDES, *psa]))["refine"] == "randomwalk (psa, taken: aff.pth)"
    assert figures.methods_of(config.load(None, [*OVERRIDES, psa[0]]))["refine"] == "randomwalk (irn)"
    affinitynet = [psa[0], "refine.randomwalk.design=affinitynet"]
    assert figures.methods_of(config.load(None, [*OVERRIDES, *affinitynet]))["refine"] == "randomwalk (affinitynet)"


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


@needs_dvc
def test_dvc_plots_show_gives_threshold_per_class_loss_and_lr_curves(project, tmp_path):
    """`dvc plots show` on this repo's dvc.yaml over a finished run: the seed threshold curve, the per-class IoU
    bars, both training loss curves and their learning rates, each with the run's numbers (what `dvc plots diff` compares)."""
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
        lr = [(v["step"], v["lr"]) for v in values("learning rate") if v["filename"] == f"{name}.csv"]
        assert lr == [(r["step"], r["lr"]) for r in rows], name


def test_zip_report_holds_the_files(project):
    sh("snakemake", "--report", "report.zip", cwd=project)
    names = zipfile.ZipFile(project / "report.zip").namelist()
    assert "report/report.html" in names
    assert {Path(n).name for n in names} >= {"gallery.png", "training.png", "threshold.png", "methods.html"}


# ---- a real browser -----------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
VIEWPORT = (1920, 1080)  # room for the 1059 px gallery beside the sidebar, whatever the fonts
# Headless, without the sandbox (containers run as root) or a GPU. --disable-dev-shm-usage: containers often have
# a 64 MB /dev/shm, too small for a renderer with the report's embedded images. No network: every host name
# resolves to nothing (loopback excepted) and Chromium's own background traffic is off, so the page sees what it
# would see offline.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
                "--remote-debugging-pipe", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"]
LOCAL_URL = ("file:", "data:", "blob:", "about:")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: NUL-terminated JSON
    on fds 3 and 4, so no port and no websocket library). It records what DevTools' console shows, with levels
    (console calls, uncaught exceptions, the browser's own errors such as failed loads) and every request a page
    makes. All waits share one deadline; close() kills the browser's process group."""

    def __init__(self, workdir: Path, timeout: float = 90.0):
        ends = os.pipe() + os.pipe()  # (we -> chromium) read, write; (chromium -> we) read, write
        # fds >= 10, so that `3<&A 4>&B` cannot overwrite one end with the other (bash: dash takes one digit only)
        self._in, self._out, self._read, self._write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in ends)
        for fd in ends:
            os.close(fd)
        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{self._in} 4>&{self._write}', CHROMIUM, *CHROME_FLAGS,
                 f"--user-data-dir={workdir / 'profile'}", "about:blank"],
                pass_fds=(self._in, self._write), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        os.close(self._in)
        os.close(self._write)
        self.deadline = time.monotonic() + timeout
        self.events: list[dict] = []
        self._buffer, self._id, self.session = b"", 0, None
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)

    def close(self) -> None:
        for fd in (self._out, self._read):
            os.close(fd)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def _post(self, method: str, session: str | None, params: dict) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._id

    def _next(self) -> dict:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not self._poll.poll(left * 1000):  # poll: select() refuses fds >= 1024
                raise AssertionError(f"chromium: no answer in time\n{self.log.read_text(errors='replace')[-3000:]}")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium exited ({self.proc.poll()})\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        if "method" in message:
            self.events.append(message)
            if message["method"] == "Target.attachedToTarget":  # a frame or worker in its own process
                child = message["params"]["sessionId"]
                for method, params in (("Runtime.enable", {}), ("Log.enable", {}), ("Network.enable", {}),
                                       ("Target.setAutoAttach", {"autoAttach": True, "flatten": True,
                                                                 "waitForDebuggerOnStart": True}),
                                       ("Runtime.runIfWaitingForDebugger", {})):
                    self._post(method, child, params)
        return message

    def send(self, method: str, **params) -> dict:
        session = params.pop("session", self.session)
        wanted = self._post(method, session, params)
        while True:
            message = self._next()
            if message.get("id") == wanted:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, event: str) -> dict:
        seen = len(self.events)
        while True:
            for message in self.events[seen:]:
                if message["method"] == event:
                    return message["params"]
            seen = len(self.events)
            self._next()

    def open(self, url: str, width: int, height: int) -> None:
        target = self.send("Target.createTarget", url="about:blank", session=None)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, session=None)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=True, flatten=True)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def screenshot(self) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])))

    def console(self, *levels: str) -> list[str]:
        """Console entries at these levels, as DevTools' console would list them."""
        out = []
        for event in self.events:
            method, p = event["method"], event["params"]
            if method == "Runtime.consoleAPICalled" and ("error" if p["type"] == "assert" else p["type"]) in levels:
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description", "")))
                                                              for a in p["args"]))
            elif method == "Runtime.exceptionThrown" and "error" in levels:
                details = p["exceptionDetails"]
                out.append("uncaught: " + details.get("exception", {}).get("description", details["text"]))
            elif method == "Log.entryAdded" and p["entry"]["level"] in levels:
                out.append(f"{p['entry']['source']} {p['entry']['level']}: {p['entry']['text']} "
                           f"{p['entry'].get('url', '')}".rstrip())
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]


@pytest.fixture
def browser(tmp_path):
    tools = DevTools(tmp_path)
    yield tools
    tools.close()


# Run in the report as it is (nothing injected): open every category and, for every entry in it, its figure (eye
# icon) and its details (info icon), as a reader would. For each entry: the images and frames on screen (file name
# from the data: URI, size in the file, size and place on screen) and the details' text. Ends on the first entry of
# the last category, shown. `expected` maps each category to its entries' titles and file names. The app renders
# in tasks of its own after a click, later on a loaded machine: each click waits until the page shows what the
# click asked for (at most 20 s, else it fails naming the click), then until the page has been unchanged for 60 ms.
VISIT = """(async (expected) => {
  const categories = Object.keys(expected).sort();
  const until = (ready, what) => new Promise((resolve, reject) => {
    const start = performance.now();
    const page = () => document.querySelector('#app').innerText.slice(0, 300);
    const poll = () => ready() ? resolve() : performance.now() - start > 20000
      ? reject(new Error(`after ${what}, 20 s without: ${ready}\n${page()}`)) : setTimeout(poll, 20);
    poll();
  });
  const settle = () => new Promise(resolve => {
    let quiet, limit;
    const done = () => {
      observer.disconnect(); clearTimeout(quiet); clearTimeout(limit);
      requestAnimationFrame(() => requestAnimationFrame(resolve));
    };
    const observer = new MutationObserver(() => { clearTimeout(quiet); quiet = setTimeout(done, 60); });
    observer.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
    quiet = setTimeout(done, 60); limit = setTimeout(done, 5000);
  });
  const links = () => Array.from(document.querySelectorAll('#app a'));
  const link = text => links().find(x => x.textContent.trim() === text);
  const rows = () => Array.from(document.querySelectorAll('#app table tbody tr'));
  const file = src => (src.match(/;filename=([^;,]+)/) || [, src.slice(0, 40)])[1];
  const shown = () => Array.from(document.querySelectorAll('#app img, #app iframe')).map(x => file(x.src));
  async function open(cat) {
    const back = link('Results');
    if (back) { back.click(); await until(() => !link('Results') && link(cat), 'clicking Results'); }
    const a = link(cat); if (!a) return false;
    a.click();
    const here = () => document.querySelector('#app li.grow a')?.textContent.trim() === cat;
    const titles = Object.keys(expected[cat]).sort().join('|');
    await until(() => here() && rows().map(r => r.cells[0].textContent.trim()).sort().join('|') === titles,
                `opening ${cat}`);
    await settle(); return true;
  }
  async function click(cat, row, icon) {
    await open(cat);
    const tr = rows()[row], title = tr.cells[0].textContent.trim();
    tr.querySelector(`a[iconname="${icon}"]`).click();
    // the figure in the main panel; its details (they name its file) in place of the list
    const details = () => !document.querySelector('#app a[iconname="information-circle"]')
                          && document.querySelector('#app nav').innerText.includes(expected[cat][title]);
    await until(icon === 'eye' ? () => shown().includes(expected[cat][title]) : details,
                `the ${icon} icon of ${cat}: ${title}`);
    await settle();
  }
  async function screen() {
    const images = [];
    for (const im of document.querySelectorAll('#app img')) {
      if (!im.src.startsWith('data:image/png')) continue;
      if (!im.complete) await new Promise(r => { im.onload = r; im.onerror = r; });
      await im.decode().catch(() => {});
      const r = im.getBoundingClientRect(), style = getComputedStyle(im);
      images.push({file: file(im.src), natural: [im.naturalWidth, im.naturalHeight], box: [r.x, r.y, r.width, r.height],
                   visible: style.visibility === 'visible' && style.display !== 'none' && +style.opacity > 0});
    }
    const frames = Array.from(document.querySelectorAll('#app iframe')).map(f => {
      const r = f.getBoundingClientRect(); return {file: file(f.src), box: [r.x, r.y, r.width, r.height]}; });
    return {images, frames};
  }
  const out = {missing: [], entries: {}};
  for (const cat of categories) {
    if (!await open(cat)) { out.missing.push(cat); continue; }
    const titles = rows().map(r => r.textContent.trim());
    out.entries[cat] = [];
    for (let i = 0; i < titles.length; i++) {
      await click(cat, i, 'eye');
      const seen = await screen();
      await click(cat, i, 'information-circle');
      out.entries[cat].push({title: titles[i], ...seen, details: document.querySelector('#app').innerText});
    }
  }
  await click(categories[categories.length - 1], 0, 'eye');
  out.last = await screen();
  out.viewport = [innerWidth, innerHeight];
  return out;
})"""


@needs_chromium
def test_the_browser_check_sees_console_errors_and_outside_requests(browser, tmp_path):
    """The checker below is not blind: a page with each kind of problem shows each one."""
    page = tmp_path / "bad.html"
    page.write_text("<html><head><script>console.warn('just a warning'); console.error('an error');</script></head>"
                    "<body><img src='missing.png'><img src='http://example.com/x.png'>"
                    "<script>setTimeout(() => { throw new TypeError('boom') }, 0)</script></body></html>")
    browser.open(page.as_uri(), 800, 600)
    browser.evaluate("new Promise(r => setTimeout(r, 300))")
    errors = "\n".join(browser.console("error"))
    assert "console.error: an error" in errors and "TypeError: boom" in errors, errors
    assert "missing.png" in errors and "example.com" in errors, errors  # failed loads, as DevTools lists them
    assert browser.console("warning") == ["console.warning: just a warning"]
    assert [u for u in browser.requests() if not u.startswith(LOCAL_URL)] == ["http://example.com/x.png"]


def expected_entries(project: Path) -> dict[str, dict[str, str]]:
    """Per category of the report, its entries' titles and their file names."""
    results, _ = embedded(project)
    return {cat: {results[p]["labels"]["figure"]: Path(p).name for p in paths} for cat, paths in CATEGORIES.items()}


def visit(browser: DevTools, project: Path, click_delay_ms: int = 0) -> dict:
    """The report opened in the browser and VISIT's record of it; with a delay, every click reaches the page that
    much later (as on a loaded machine, where the app's answer comes after VISIT's 60 ms quiet period)."""
    expected = expected_entries(project)
    browser.open((project / "report.html").as_uri(), *VIEWPORT)
    if click_delay_ms:
        browser.evaluate("(() => { const click = HTMLElement.prototype.click; HTMLElement.prototype.click = "
                         f"function () {{ setTimeout(() => click.call(this), {click_delay_ms}); }}; }})()")
    return browser.evaluate(f"{VISIT}({json.dumps(expected)})")


@needs_chromium
def test_the_visit_waits_for_a_page_that_answers_late(project, browser):
    """Each click delivered 150 ms late: the visit still records every entry's own figure and details and ends on the
    gallery. (It once read the page 60 ms after a click and failed on CI's loaded machine: no row 0 yet.)"""
    out = visit(browser, project, click_delay_ms=150)
    assert out["missing"] == [] and sorted(out["entries"]) == sorted(CATEGORIES), out
    for cat, titles in expected_entries(project).items():
        assert sorted(e["title"] for e in out["entries"][cat]) == sorted(titles), out["entries"][cat]
        for entry in out["entries"][cat]:
            assert [x["file"] for x in entry["images"] + entry["frames"]] == [titles[entry["title"]]], entry
            assert titles[entry["title"]] in entry["details"], entry["details"][:300]
    assert [x["file"] for x in out["last"]["images"]] == ["gallery.png"], out["last"]


@needs_chromium
def test_report_loads_in_chromium_and_shows_the_gallery(project, browser, tmp_path):
    """The report as a reader sees it in Chromium: no console errors while it loads and while every category and
    figure is opened, nothing requested from outside the file, and every figure drawn whole at its own size (the
    gallery checked pixel by pixel on a screenshot)."""
    out = visit(browser, project)
    errors = browser.console("error")
    assert errors == [], errors
    assert [u for u in browser.requests() if not u.startswith(LOCAL_URL)] == []
    assert out["missing"] == [] and out["viewport"] == list(VIEWPORT), out
    results, _ = embedded(project)
    sizes = {**SIZES, "figures/gallery.png": Image.open(project / "figures/gallery.png").size}
    for cat, paths in CATEGORIES.items():
        entries = out["entries"][cat]
        assert sorted(e["title"] for e in entries) == sorted(results[p]["labels"]["figure"] for p in paths), entries
        for path in paths:
            (entry,) = [e for e in entries if e["title"] == results[path]["labels"]["figure"]]
            caption = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", results[path]["caption"])).strip()
            assert caption[:60] in re.sub(r"\s+", " ", entry["details"]), (path, entry["details"][:500])
            if path.endswith(".html"):  # the method table, in a frame
                assert [f["file"] for f in entry["frames"]] == [Path(path).name], entry
                assert min(entry["frames"][0]["box"][2:]) > 100, entry
                continue
            # the figure alone, whole, at its own size pixel for pixel, visible without scrolling
            (image,) = entry["images"]
            (x, y, w, h), size = image["box"], list(sizes[path])
            assert image["file"] == Path(path).name and image["visible"], (path, image)
            assert image["natural"] == size and abs(w - size[0]) < 1 and abs(h - size[1]) < 1, (path, image)
            assert 0 <= x and x + w <= VIEWPORT[0] and 0 <= y and y + h <= VIEWPORT[1], (path, image)
    # What a reader sees last is the gallery: the screen shows the file's pixels.
    shot = browser.screenshot().convert("RGB")
    shot.save(tmp_path / "report.png")
    (image,) = out["last"]["images"]
    assert image["file"] == "gallery.png", out["last"]
    x, y, w, h = (round(v) for v in image["box"])
    shown = np.asarray(shot.crop((x, y, x + w, y + h)), dtype=float)
    expected = np.asarray(Image.open(project / "figures/gallery.png").convert("RGB"), dtype=float)
    assert shown.shape == expected.shape and np.abs(shown - expected).mean() < 2, np.abs(shown - expected).mean()


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


def test_dvclive_mirror_leaves_the_repository_alone(tmp_path, monkeypatch):
    """dvclive's Live opens the enclosing DVC repository and never closes it, and inside a git repository without
    DVC it runs `dvc init` there; the mirror, written once per epoch, does neither: no file descriptors pile up
    and the user's git repository gets no .dvc folder nor staged files."""
    pytest.importorskip("dvclive")
    from advcam.train import live

    sh("git", "init", "-q", cwd=tmp_path)
    sh("git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x",
       cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    curves = tmp_path / "plots" / "train_seg.csv"
    live.log_curves(curves, [[1, 1, 0.9, 0.1]])
    before = len(os.listdir("/proc/self/fd"))
    for epoch in range(1, 21):
        live.log_curves(curves, [[e, e, 1.0 / e, 0.1] for e in range(1, epoch + 1)])
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    assert (live.live_dir(curves) / "plots/metrics/loss.tsv").read_text().split()[-2:] == ["20", "0.05"]
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / ".dvcignore").exists()
    assert sh("git", "status", "--porcelain", cwd=tmp_path).stdout.split() == ["??", "plots/"]
    # the whole curve is written again every epoch: its summary once per write, not once per row (that grew with
    # the square of the training length: 32 s an epoch at 3,600 steps)
    from dvclive import Live

    summaries = []
    real = Live.make_summary
    monkeypatch.setattr(Live, "make_summary", lambda self, *a, **k: (summaries.append(1), real(self, *a, **k))[1])
    live.log_curves(curves, [[e, e, 1.0 / e, 0.1] for e in range(1, 201)])
    assert 1 <= len(summaries) <= 2


def test_dvclive_mirror_logs_only_the_new_rows_and_ends_as_a_whole_rewrite(tmp_path, monkeypatch):
    """Each epoch's mirror logs that epoch's rows only, after the rows the folder holds (logging the whole curve
    again cost time growing with the square of the training length: 9 s an epoch at 9,240 steps), and ends with
    the files of a folder written from the whole curve at once. A curve that does not continue the folder's (a
    rerun, a resume from an earlier epoch, other values) is written whole."""
    pytest.importorskip("dvclive")
    from advcam.train import live

    def files(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}

    logged: list[int] = []
    cls = live._files_only_live()
    real = cls.log_metric
    monkeypatch.setattr(cls, "log_metric", lambda self, *a, **k: (logged.append(1), real(self, *a, **k))[1])
    curve = [[1 + s // 10, s, 1.0 / (s + 1), 0.1 * (1 - s / 50)] for s in range(50)]
    epochs = tmp_path / "epochs" / "train_seg.csv"
    for end in range(10, 51, 10):
        logged.clear()
        live.log_curves(epochs, curve[:end])
        assert len(logged) == 3 * (end if end == 10 else 10)  # loss, lr, epoch of the new rows
    whole = tmp_path / "whole" / "train_seg.csv"
    live.log_curves(whole, curve)
    assert files(live.live_dir(epochs)) == files(live.live_dir(whole))
    assert sorted(p.name for p in (tmp_path / "epochs" / "dvclive").iterdir()) == ["train_seg"]  # no temporaries
    # a resume from epoch 3 whose next epoch came out otherwise, and a rerun from scratch: written whole
    for rows in (curve[:30] + [[4, s, 2.0, 0.01] for s in range(30, 40)], curve[:10]):
        logged.clear()
        live.log_curves(epochs, rows)
        assert len(logged) == 3 * len(rows)
        live.log_curves(whole, rows)
        assert files(live.live_dir(epochs)) == files(live.live_dir(whole))
    assert (live.live_dir(epochs) / "plots/metrics/loss.tsv").read_text().split()[-2:] == ["9", "0.1"]


@needs_dvc
def test_readme_baseline_commit_after_a_snakemake_run(project, tmp_path):
    """`make run` runs Snakemake, not DVC: the README's one line records its outputs as the baseline of the
    experiments (every DVC stage up to date, Snakemake too, the metrics in git), without running anything again."""
    line = next(l for l in (REPO / "README.md").read_text().splitlines() if l.startswith("dvc repro check_params"))
    root = tmp_path / "repo"
    shutil.copytree(project, root, symlinks=True)
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "t@example.com", cwd=root)
    sh("git", "config", "user.name", "t", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    before = {f: (root / f).read_bytes() for f in ("models/classifier.pt", "models/segmenter.pt",
                                                    "metrics/pseudo.json")}
    sh("bash", "-c", line, cwd=root)
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=root).stdout
    # `dvc commit` copies the outputs back from its cache (new mtimes, in its own order); Snakemake agrees too
    dry = sh("snakemake", "-n", cwd=root).stdout
    assert "Nothing to be done" in dry, dry
    assert {f: (root / f).read_bytes() for f in before} == before  # nothing trained or computed again
    tracked = sh("git", "ls-files", cwd=root).stdout.split()
    assert {"dvc.lock", "metrics/seeds.json", "metrics/segmentation.json", "figures/methods.csv"} <= set(tracked)
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=root).stdout)
    assert "seed_miou" in json.dumps(shown)
