# Helpers shared by the rules: config validation (one schema, shared with the CLI) and the per-rule params.
import json
import os
import shutil
import sys

from snakemake.exceptions import WorkflowError

from advcam import config as advcam_config


# Validate once, fill the schema's defaults, and keep the result as the workflow's config.
_validated = advcam_config.validate(config, "params.yaml (with --config overrides)", coerce_strings=True)
config.clear()
config.update(_validated)

DATA = f"data/{config['dataset']['name']}"
# Sections every stage depends on, then each stage's own sections (DVC's params: use the same lists).
COMMON = ["seed", "device"]
# DataLoader worker processes (`workers`) cannot change a result (each item's randomness comes from (seed, epoch,
# index)), so the training rules take them as a resource, which, unlike params, never triggers a rerun; DVC's
# stages do not list `workers` either. Changing it reruns nothing.
LOADER_WORKERS = int(config["workers"])


def params_json(*sections, inactive=False):
    """The params a rule depends on, as JSON for `advcam --params-json`.

    Only the listed sections are passed, so Snakemake's params trigger re-runs a rule exactly when one of
    its own params changes (a CAM param does not retrain the classifier); the sub-sections of methods a
    section does not use are left out too (classifier.seam while classifier.method is cam), unless
    `inactive` (the report draws the attribution method not configured as well).
    """
    pick = (lambda k: advcam_config.without_unset(k, config[k])) if inactive else (
        lambda k: advcam_config.active(k, config[k]))
    return json.dumps({k: pick(k) for k in COMMON + list(sections)}, sort_keys=True)



def present(path, key):
    """`[path]`, a file outside the repository that a rule reads as its input, once it exists; else an error naming
    `key`. Snakemake passes over a finished job whose input file is missing (even with changed params), so a mistyped
    path would otherwise leave the earlier results in place without a word."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise WorkflowError(f"{key}: file not found: {path}")
    return [path]


def outside_files(section, keys=("pretrained", "trained")):
    """Files outside the repository that a stage reads, as its inputs, so that a newer one reruns it and what
    follows: the set `pretrained` weight file of `classifier` / `segmentation`, the set `classifier.trained`
    (`keys` picks among them), the list files and `labels_file` of a VOC-layout `dataset`. (DVC's stages cannot
    list them; `advcam params --check` checks that they exist.) Each must exist (`present`)."""
    cfg = config[section]
    if section == "dataset":
        if cfg["kind"] != "voc":
            return []
        names = {cfg["train_list"], cfg["infer_list"], cfg.get("seg_list") or cfg["infer_list"], cfg["val_list"]}
        root = os.path.expanduser(cfg["root"])
        labels = cfg.get("labels_file")
        labels = present(os.path.join(root, os.path.expanduser(labels)), "dataset.labels_file") if labels else []
        return [f for n in sorted(names) for f in present(outside_list(n)[0], f"dataset list {n!r}")] + labels
    return [f for k in keys if cfg.get(k) for f in present(cfg[k], f"{section}.{k}")]


def affinity_weights():
    """The affinity network's weight file (refine.method randomwalk), as an input, as the refine stage picks it:
    with design psa `refine.randomwalk.psa.trained`, else the ResNet-38 weights its AffinityNet trains from; else
    `refine.randomwalk.trained`, else `refine.randomwalk.pretrained`, else `classifier.pretrained` while the archs
    agree. It must exist (`present`)."""
    if config["refine"]["method"] != "randomwalk":
        return []
    # these import torch: only where the random walk runs
    from advcam.refine.affinity import affinity_source
    from advcam.refine.psa import pretrained_source, trained_file
    from advcam.refine.trained import check_outside
    from advcam.utils.errors import AdvcamError

    walk = config["refine"]["randomwalk"]
    if walk["design"] == "psa":  # PSA's trained AffinityNet, else the ResNet-38 weights it trains from
        if trained_file(walk):
            return present(trained_file(walk), "refine.randomwalk.psa.trained")
        path = pretrained_source(config["classifier"], walk)
        return present(path, "refine.randomwalk.pretrained") if path else []

    if walk.get("trained"):  # a network trained elsewhere (designs irn, affinitynet), no other weights
        try:
            check_outside(walk["trained"], "pseudo")  # the refine output, deleted before refine runs
        except AdvcamError as exc:
            raise WorkflowError(str(exc)) from None
        return present(walk["trained"], "refine.randomwalk.trained")
    try:
        _, path = affinity_source(config["classifier"], config["refine"]["randomwalk"])
    except AdvcamError:  # an arch without affinity network: check_params and the refine stage say so
        return []
    return present(path, "refine.randomwalk.pretrained") if path else []


def outside_list(name):
    """The list file `name` of a VOC-layout dataset (outside the repository), as an input; none for the synthetic
    dataset, whose lists are inside the prepared folder."""
    if config["dataset"]["kind"] != "voc":
        return []
    return [os.path.join(os.path.expanduser(config["dataset"]["root"]), "ImageSets", "Segmentation", f"{name}.txt")]


# The predictions of predict.list's images (rule predict), part of the default target while it is set.
PREDICTIONS = [f"predictions/{config['predict']['list']}"] if config["predict"].get("list") else []

SHARDS = int(config["workflow"]["shards"])

# Resumable per-image work of cams and refine (ADVCAM_WORK_DIR, advcam/steps/shards.py): Snakemake deletes a job's
# outputs before it runs it, so the stages compute into this undeclared folder, keyed by their params record, and
# hard-link the files into their declared outputs; a rerun of a killed job keeps the finished images. It ignores
# itself in git (its own .gitignore) and lies outside every DVC output. docs/reliability.md.
WORK = ".advcam-work"

# What a job of each of these rules takes instead of computing, when its record matches: its stage's work folder
# (above) and a finished training's memo (models/<name>.pt.done.pt / .done.json, advcam/train/memo.py). A forced job
# (--forceall, --forcerun RULE, --force TARGET) asks for its stage to be computed again: these go first
# (drop_forced_caches).
FORCED_CACHES = {
    "cams_shard": [f"{WORK}/cams"],
    "cams": [f"{WORK}/cams"],
    "refine_shard": [f"{WORK}/refine-crf"],
    "refine": [f"{WORK}/refine"],
    "train_cls": ["models/classifier.pt.done.pt", "models/classifier.pt.done.json"],
    "train_seg": ["models/segmenter.pt.done.pt", "models/segmenter.pt.done.json"],
}


def drop_forced_caches(dag, settings):
    """Remove the work folders and training memos (FORCED_CACHES) of the rules whose jobs the user forced (`settings`:
    Snakemake's DAG settings: --forceall, --forcerun rules or files, --force targets), so that their stages are
    computed again. Jobs that Snakemake reruns for any other reason (incomplete output with --rerun-incomplete, changed
    params or input) still take them. Run once, before the first job (the Snakefile's onstart: never in a dry run, nor
    in the jobs Snakemake spawns)."""
    named = {str(x) for x in settings.forcerun or ()}
    if settings.forcetargets:
        named |= {job.rule.name for job in dag.targetjobs}
    forced = sorted({job.rule.name for job in dag.needrun_jobs()
                     if settings.forceall or job.rule.name in named or not named.isdisjoint(map(str, job.output))})
    for path in sorted({p for name in forced for p in FORCED_CACHES.get(name, [])}):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        print(f"forced rerun of {', '.join(forced)}: removed {path}, to compute it again", file=sys.stderr)


def shard_folders(stage):
    """The scatter outputs that a gather job reads (shards/<stage>/<I>-of-<N>, I = 1..N; workflow.shards)."""
    return [f"shards/{stage}/{i}-of-{SHARDS}" for i in range(1, SHARDS + 1)]
