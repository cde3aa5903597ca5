"""``advcam <stage>``: one thin subcommand per pipeline stage; the work is in ``advcam.steps``.

Every subcommand reads the params (``--params FILE``, or ``--params-json`` from Snakemake) plus
``--set KEY=VALUE`` overrides, validates them, and calls ``advcam.steps.<stage>.run``. Every error prints one
line: errors caused by input exit with status 2, unexpected ones (a bug, a full disk) with status 1, Ctrl-C with
130; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from advcam import config
from advcam.utils.errors import AdvcamError
from advcam.utils.progress import setup_logging

log = logging.getLogger("advcam")

# stage -> (help, [(option, default-from-config or None, help)])
PathDefault = Callable[[config.Config], str]
STAGES: dict[str, tuple[str, list[tuple[str, PathDefault, str]]]] = {
    "prepare": ("Generate (synthetic) or index (voc) the dataset; write lists and image-level labels.", [
        ("out", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
    ]),
    "train-cls": ("Train the classifier (CAM network) on the train list.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("out", lambda c: "models/classifier.pt", "classifier checkpoint to write"),
        ("curves", lambda c: "plots/train_cls.csv", "training curve CSV to write"),
    ]),
    "cams": ("Compute class activation maps for the infer list and evaluate the seeds.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("model", lambda c: "models/classifier.pt", "classifier checkpoint"),
        ("out", lambda c: "cams", "folder of <id>.npz CAM files"),
        ("metrics", lambda c: "metrics/seeds.json", "seed metrics JSON"),
        ("curve", lambda c: "plots/seeds_threshold.csv", "mIoU-vs-threshold CSV"),
    ]),
    "refine": ("Refine CAMs into pseudo labels (dense CRF, or random walk over learned affinities).", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("cams", lambda c: "cams", "folder of <id>.npz CAM files"),
        ("out", lambda c: "pseudo", "folder of <id>.png pseudo labels"),
        ("metrics", lambda c: "metrics/pseudo.json", "pseudo-label metrics JSON"),
    ]),
    "train-seg": ("Train the segmentation network on the pseudo labels.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("pseudo", lambda c: "pseudo", "folder of <id>.png pseudo labels"),
        ("out", lambda c: "models/segmenter.pt", "segmenter checkpoint to write"),
        ("curves", lambda c: "plots/train_seg.csv", "training curve CSV to write"),
    ]),
    "evaluate": ("Evaluate the segmenter on the val list; write metrics, confusion matrix and a gallery.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("model", lambda c: "models/segmenter.pt", "segmenter checkpoint"),
        ("cams", lambda c: "cams", "folder of <id>.npz CAM files (for the gallery)"),
        ("pseudo", lambda c: "pseudo", "folder of pseudo labels (for the gallery)"),
        ("metrics", lambda c: "metrics/segmentation.json", "segmentation metrics JSON"),
        ("plots", lambda c: "plots/evaluation", "folder for the confusion matrix and gallery PNGs"),
    ]),
    "predict": ("Predict masks with the segmenter for the images of predict.list (e.g. VOC's test list, for the "
                "evaluation server); no ground truth needed.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder (its root holds the list and images)"),
        ("model", lambda c: "models/segmenter.pt", "segmenter checkpoint"),
        ("out", lambda c: f"predictions/{(c.get('predict') or {}).get('list') or '<predict.list>'}",
         "folder of <id>.png masks (VOC palette) to write"),
    ]),
    "figures": ("Report figures and tables of a finished run (method table, threshold curves, per-class IoU, "
                "training curves, gallery); used by `snakemake --report`.", [
        ("data", lambda c: f"data/{c.dataset.name}", "prepared dataset folder"),
        ("classifier", lambda c: "models/classifier.pt", "classifier checkpoint (CAM/AdvCAM of the gallery)"),
        ("segmenter", lambda c: "models/segmenter.pt", "segmenter checkpoint (predictions of the gallery)"),
        ("cams", lambda c: "cams", "folder of <id>.npz CAM files"),
        ("pseudo", lambda c: "pseudo", "folder of <id>.png pseudo labels"),
        ("metrics-dir", lambda c: "metrics", "folder with seeds.json, pseudo.json, segmentation.json"),
        ("plots", lambda c: "plots", "folder with seeds_threshold.csv, train_cls.csv, train_seg.csv"),
        ("runs", lambda c: "runs", "optional folder of other runs to compare: runs/<label>/ with their "
                                   "metric JSONs and seeds_threshold.csv"),
        ("out", lambda c: "figures", "folder for the report's PNG, HTML and CSV files"),
    ]),
}


# Outputs that are files and outputs that are folders, by (stage, option): checked before a stage runs, so a
# path of the wrong kind is one line (exit 2) before any work, not an OS error after it.
FILE_OUTPUTS = {("train-cls", "out"), ("train-cls", "curves"), ("cams", "metrics"), ("cams", "curve"),
                ("refine", "metrics"), ("train-seg", "out"), ("train-seg", "curves"), ("evaluate", "metrics"),
                ("compare", "out"), ("visualize", "out"), ("params", "check")}
FOLDER_OUTPUTS = {("prepare", "out"), ("cams", "out"), ("refine", "out"), ("evaluate", "plots"), ("predict", "out"),
                  ("figures", "out")}


def check_output_paths(stage: str, args: argparse.Namespace) -> None:
    """Refuse an output path of the wrong kind: a file output that is an existing folder or ends with a slash
    (which would write a file named like the folder), a folder output that is an existing file."""
    for opt in sorted({o for s, o in FILE_OUTPUTS | FOLDER_OUTPUTS if s == stage}):
        value = getattr(args, opt, None)
        if not value:
            continue
        text, path = str(value), Path(str(value)).expanduser()
        if (stage, opt) in FILE_OUTPUTS:
            if text.endswith(("/", os.sep)) or path.is_dir():
                raise AdvcamError(f"--{opt} {text}: a folder, but --{opt} is a file to write; give a file path "
                                  f"(e.g. {text.rstrip('/' + os.sep)}/{_example_name(stage, opt)})")
            if stage in ("compare", "visualize") and path.suffix.lower() != ".png":
                raise AdvcamError(f"--{opt} {text}: the figure is written as PNG; give a path ending in .png")
        elif path.exists() and not path.is_dir():
            raise AdvcamError(f"--{opt} {text}: an existing file, but --{opt} is a folder to write into; give a "
                              "folder path")


def _example_name(stage: str, opt: str) -> str:
    """A file name to suggest for a file output given as a folder."""
    for name, default, _ in STAGES.get(stage, ("", []))[1]:
        if name == opt:
            return Path(default(_LAYOUT)).name
    return {"compare": "compare.png", "visualize": "image.png", "params": "params.checked"}.get(stage, "out")


# visualize's optional inputs: (option, default, what); a default that does not exist drops its column
VISUALIZE_INPUTS = (("cams", "cams", "folder of <id>.npz CAM files"),
                    ("pseudo", "pseudo", "folder of <id>.png pseudo labels"),
                    ("classifier", "models/classifier.pt", "classifier checkpoint (CAM and AdvCAM)"),
                    ("segmenter", "models/segmenter.pt", "segmenter checkpoint (prediction)"))


def given_inputs_exist(stage: str, args: argparse.Namespace) -> None:
    """Optional inputs a user named (visualize's folders and checkpoints, figures' --runs) must exist: only the
    defaults are skipped quietly when missing."""
    named = [opt for opt, _, _ in VISUALIZE_INPUTS] if stage == "visualize" else ["runs"] if stage == "figures" else []
    for opt in named:
        value = getattr(args, opt, None)
        if value and not Path(value).expanduser().exists():
            raise AdvcamError(f"--{opt} {value}: not found (leave the option out to skip it)")


# Stages that scatter over image shards (--shard I/N) and gather them (--gather DIR...): advcam.steps.shards.
SHARDED = ("cams", "refine")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only for real defaults (not None, [] or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# How the path defaults read in --help: the standard layout, with the params they depend on left symbolic.
_LAYOUT = config.Config({"dataset": {"name": "<dataset.name>"}})
EPILOG = ("Params (--set KEY=VALUE, params.yaml): `advcam params --reference` lists every key with its default, "
          "range and unit. Images are in pixels, thresholds and IoUs are fractions in [0, 1].")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advcam", description="advcam STAGE: one subcommand per pipeline stage (the work is in advcam.steps).", epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=HelpFormatter)
        _common(s)
        return s

    for name, (help_text, paths) in STAGES.items():
        s = add(name, help_text)
        for opt, _default, opt_help in paths:
            s.add_argument(f"--{opt}", default=None, help=f"{opt_help} (default: {_default(_LAYOUT)})")
        if name in SHARDED:
            s.add_argument("--shard", default=None, metavar="I/N",
                           help="compute only shard I of N (1-based) of the images (the infer list plus the seg list's "
                                "others) into --out; no metrics")
            s.add_argument("--gather", nargs="+", default=[], metavar="DIR",
                           help="shard folders (shard 1 first) to gather into --out before scoring")
    s = add("compare", "Gallery of several CAM folders side by side (e.g. CAM vs AdvCAM).")
    s.add_argument("--data", default=None, help="prepared dataset folder (default: data/<dataset.name>)")
    s.add_argument("--cams", nargs="+", required=True, help="CAM folders to compare")
    s.add_argument("--labels", nargs="+", required=True, help="one column title per CAM folder")
    s.add_argument("--out", default="plots/compare.png", help="gallery PNG to write")
    s.add_argument("-n", type=int, default=6, help="number of images (rows)")
    s.add_argument("--ids", nargs="*", default=[], help="image ids to show instead of the first n")
    s = add("params", "Print the resolved params as YAML (or the reference table).")
    s.add_argument("--reference", action="store_true", help="print the params reference (Markdown) instead")
    s.add_argument("--check", metavar="FILE", default=None,
                   help="only check, and when all is well write FILE, always the same text (DVC's first stage, "
                        "check_params, so a bad value stops before any stage removes its outputs): the params as "
                        "advcam and as Snakemake (YAML 1.1) read them, the dataset's folders and lists, and the "
                        "pretrained weight files against their arch (default: print the params)")
    s = add("visualize", "Overlay PNG of one image: image, ground truth, CAM, AdvCAM, the boundary map of IRN's "
            "random walk, pseudo label, prediction (the ones that exist).")
    s.add_argument("image_id", help="image id (file name without extension)")
    s.add_argument("--data", default=None, help="prepared dataset folder (default: data/<dataset.name>)")
    for opt, default, what in VISUALIZE_INPUTS:
        s.add_argument(f"--{opt}", default=None, help=f"{what} (default: {default}, skipped where it does not exist; "
                                                      "a path given here must exist)")
    s.add_argument("--out", default=None, help="PNG to write (default: plots/visualize/<image_id>.png)")
    s = add("info", "Print the resolved params, the device, the C++/CUDA extension's build status and a summary "
            "of the prepared dataset.")
    s.add_argument("--data", default=None, help="prepared dataset folder (default: data/<dataset.name>)")
    return p


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--params", default=None,
                   help="params file (default: params.yaml; where the current folder has none, the schema's "
                        "defaults)")
    s.add_argument("--params-json", default=None, help="params as JSON text (used by the Snakemake rules)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one param, e.g. --set cam.scales=[1.0]")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks and debug logs")


def one_line(exc: BaseException) -> str:
    """The error's own message on one line. An error raised in a DataLoader worker arrives re-raised with the
    worker's traceback in its message ("Caught ... Original Traceback ..."): keep its last line's message."""
    text = str(exc).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        text = last[len(name):] if last.startswith(name) else last
    return " ".join(text.split("\n"))


def _write(text: str) -> None:
    """Print to stdout now, so that a reader that has gone shows up here rather than at exit."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _stdout_is_a_closed_pipe() -> bool:
    """True when stdout is a pipe whose reader has gone (``advcam params | head``)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)  # POLLERR is reported whatever the mask
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout (e.g. captured in tests)
        return False


def params_file(given: str | None) -> str | None:
    """The params file to read: ``--params``, else ``params.yaml``, else None (the schema's defaults, with a note:
    a stage run outside the repository takes every key from ``--set`` or the defaults)."""
    if given is not None:
        return given
    if Path("params.yaml").is_file():
        return "params.yaml"
    log.info("no params.yaml in %s: the schema's defaults (and --set) are used", Path.cwd())
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM: SLURM's scancel or preemption, or torchrun stopping its processes after a Ctrl-C. It takes the
    path of Ctrl-C (temporaries removed, finished work kept, one line) and exits with 143 (128 + SIGTERM)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; the exit status (0, 2 for a refused input, 130 / 143 when interrupted / terminated)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _main(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    setup_logging(debug)
    try:
        if args.params_json and args.params:
            raise AdvcamError("give --params or --params-json, not both (--params-json holds every param)")
        cfg = config.load(None if args.params_json else params_file(args.params), args.overrides, args.params_json)
        check_output_paths(args.stage, args)
        given_inputs_exist(args.stage, args)
        if args.stage == "params" and args.reference:
            _write(config.markdown_reference())
            return 0
        if args.stage == "params" and args.check:
            from advcam.steps import check
            given = None if args.params_json else params_file(args.params)
            check.run(cfg, Path(given) if given else None, Path(args.check))
            return 0
        if args.stage == "params":
            import yaml
            _write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        if args.stage == "visualize":
            from advcam.steps import figures
            data = Path(args.data or f"data/{cfg.dataset.name}")
            inputs = {opt: Path(getattr(args, opt) or default) for opt, default, _ in VISUALIZE_INPUTS}
            figures.visualize(cfg, data, args.image_id, Path(args.out or f"plots/visualize/{args.image_id}.png"),
                              **inputs)
            return 0
        if args.stage == "info":
            from advcam.steps import info
            _write(info.report(cfg, Path(args.data or f"data/{cfg.dataset.name}")))
            return 0
        if args.stage == "compare":
            from advcam.steps import compare
            compare.run(cfg, Path(args.data or f"data/{cfg.dataset.name}"), [Path(c) for c in args.cams],
                        args.labels, Path(args.out), args.n, args.ids)
            return 0
        paths: dict[str, Any] = {opt.replace("-", "_"): Path(getattr(args, opt.replace("-", "_")) or default(cfg))
                 for opt, default, _ in STAGES[args.stage][1]}
        if args.stage in SHARDED:
            from advcam.steps.shards import parse_shard
            paths.update(shard=parse_shard(args.shard) if args.shard else None,
                         gather=[Path(g) for g in args.gather])
        from advcam.train.distributed import refuse_torchrun
        refuse_torchrun(args.stage, cfg.classifier.method)
        step = importlib.import_module(f"advcam.steps.{args.stage.replace('-', '_')}")
        step.run(cfg, **paths)
        return 0
    except AdvcamError as exc:
        if debug:
            raise
        print(f"advcam {args.stage}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if debug:
            raise
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"advcam {args.stage}: {what}; finished work is kept, run again to resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except Exception as exc:  # a bug or the system (disk full, out of memory): still one line, no traceback
        if debug:
            raise
        if isinstance(exc, BrokenPipeError) and _stdout_is_a_closed_pipe():
            # the reader of our output stopped early (`| head`): nothing to report, and the flush at exit must
            # not fail either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, as a shell reports it
        message = one_line(exc)
        print(f"advcam {args.stage}: error: {type(exc).__name__}{': ' + message if message else ''} "
              "(unexpected; --debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
