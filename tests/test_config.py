"""The one validated config: defaults, overrides, and errors that name the key and the allowed range."""
from __future__ import annotations

import re

import jsonschema
import yaml
import pytest

from advcam import config
from advcam.config import ConfigError
from conftest import REPO


def test_params_yaml_equals_schema_defaults():
    with open(REPO / "params.yaml") as f:
        shipped = yaml.safe_load(f)
    assert shipped == config.defaults()


def test_overrides_and_attribute_access():
    cfg = config.load(None, ["cam.scales=[1.0, 2.0]", "classifier.epochs=3"])
    assert cfg.cam.scales == [1.0, 2.0]
    assert cfg["classifier"]["epochs"] == 3
    assert cfg.refine.crf.gt_prob == 0.7  # default filled in nested sections


@pytest.mark.parametrize("override, words", [
    ("classifier.epochs=abc", ["classifier.epochs", "integer"]),
    ("classifier.epochs=0", ["classifier.epochs", "minimum 1"]),
    ("cam.scales=[1.0, -1]", ["cam.scales[1]", "exclusiveMinimum 0"]),
    ("cam.method=magic", ["cam.method", "enum"]),
    ("cam.bogus=1", ["unknown key cam.bogus", "allowed here"]),
    ("bogus=1", ["unknown key bogus"]),
    ("dataset.kind=voc", ["dataset.root", "required"]),
    ("refine.bg_threshold=0.5", ["refine.bg_threshold", "fg_threshold"]),
    ("synthetic.num_train=1000", ["synthetic.num_train (1000) must not exceed synthetic.num_train_aug (480)"]),
    ("classifier.epochs=true", ["classifier.epochs", "True is not of type 'integer'"]),  # a boolean is no integer
    # JSON Schema alone takes 2.0 as an integer and NaN / infinity as numbers; the stages then fail deep inside
    ("classifier.epochs=2.0", ["classifier.epochs", "not of type 'integer'", "write it as an integer (2)"]),
    ("seed=7.0", ["seed", "not of type 'integer'"]),
    ("classifier.lr=.nan", ["classifier.lr", "numbers must be finite"]),
    ("cam.advcam.xi=.inf", ["cam.advcam.xi", "numbers must be finite"]),
    ("cam.scales=[1.0, -.inf]", ["cam.scales[1]", "numbers must be finite"]),
    ("segmentation.gt_ids=[a, b, a]", ["segmentation.gt_ids", "each item once; 'a' repeated"]),
])
def test_errors_name_key_and_range(override, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("design, crop, radius, least", [("irn", "crop_size", "train_radius=10", 73),
                                                         ("affinitynet", "crop_size", "radius=5", 33),
                                                         ("psa", "psa.crop_size", "radius=5", 72)])
def test_a_walk_crop_without_training_pairs_is_refused(design, crop, radius, least):
    """The random walk's network trains on pairs whose first pixel lies in the source region of a crop's label grid
    (IRN's, PSA's): a crop too small for any is refused, naming the smallest that works; that one loads. Unused
    while refine.method is crf, or with PSA's trained file."""
    walk = ["refine.method=randomwalk", f"refine.randomwalk.design={design}", f"refine.randomwalk.{radius}"]
    smaller = 8 * (least // 8 - 1) if design == "psa" else least - 1
    with pytest.raises(ConfigError, match=rf"refine.randomwalk.{crop} {smaller} gives .* at least {least}, or a "):
        config.load(None, [*walk, f"refine.randomwalk.{crop}={smaller}"])
    assert config.load(None, [*walk, f"refine.randomwalk.{crop}={least}"]).refine.method == "randomwalk"
    assert config.load(None, [*walk[1:], f"refine.randomwalk.{crop}={smaller}"]).refine.method == "crf"
    if design == "psa":
        config.load(None, [*walk, f"refine.randomwalk.{crop}={smaller}", "refine.randomwalk.psa.trained=/w/aff.pth"])


def test_override_values_may_hold_equals_signs_and_leading_zeros_stay_strings():
    """Only an override's first '=' splits key from value; a number with a leading zero is a string (YAML 1.2),
    not YAML 1.1's octal (007 would be the integer 7)."""
    assert config.load(None, ["dataset.root=/data/a=b"]).dataset.root == "/data/a=b"
    assert config.load(None, ["segmentation.gt_ids=[007, 2007_000032]"]).segmentation.gt_ids == ["007", "2007_000032"]


def test_equal_thresholds_and_snakemakes_null_strings_are_accepted():
    """refine.bg_threshold may equal fg_threshold (no unsure band); Snakemake passes null as the string 'null' or
    '~', read as null where the schema allows it."""
    cfg = config.load(None, ["refine.bg_threshold=0.3", "refine.fg_threshold=0.3"])
    assert cfg.refine.bg_threshold == cfg.refine.fg_threshold == 0.3
    got = config.validate({"dataset": {"seg_list": "null"}, "classifier": {"pretrained": "~"}}, coerce_strings=True)
    assert got["dataset"]["seg_list"] is None and got["classifier"]["pretrained"] is None


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cam: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.load(None, ["cam.method"])


def test_floats_without_a_dot_are_numbers_everywhere(tmp_path):
    """PyYAML reads 1e-6 as a string (YAML 1.1); params files, overrides and Snakemake's strings give floats."""
    params = tmp_path / "p.yaml"
    params.write_text("segmentation:\n  lr: 1e-6\n  weight_decay: 5E-4\nclassifier:\n  lr: 2.5e-4\n")
    cfg = config.load(params, ["refine.randomwalk.lr=1e-2", "cam.advcam.xi=8e-2"])
    assert cfg.segmentation.lr == 1e-6 and cfg.segmentation.weight_decay == 5e-4 and cfg.classifier.lr == 2.5e-4
    assert cfg.refine.randomwalk.lr == 1e-2 and cfg.cam.advcam.xi == 0.08
    assert config.validate({"segmentation": {"lr": "1e-6"}}, coerce_strings=True)["segmentation"]["lr"] == 1e-6
    assert config.load(None, ["dataset.name=voc1e5"]).dataset.name == "voc1e5"  # strings stay strings
    assert config.load(None, ["segmentation.gt_ids=[2007_000032]"]).segmentation.gt_ids == ["2007_000032"]
    with pytest.raises(ConfigError, match="quote it"):  # what Snakemake's YAML 1.1 configfile reader passes on
        config.validate({"segmentation": {"gt_ids": [2007000032]}}, "params.yaml", coerce_strings=True)


def test_a_bad_override_is_named_not_the_params_file(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("cam:\n  method: cam\n")
    with pytest.raises(ConfigError, match=r"^override 'segmentation.lr=abc': segmentation.lr: 'abc' is not of type"):
        config.load(params, ["segmentation.lr=abc"])
    with pytest.raises(ConfigError, match=r"^override 'cam.bogus=1': unknown key cam.bogus"):
        config.load(params, ["cam.bogus=1"])
    params.write_text("cam:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key cam.bogus"):
        config.load(params, ["segmentation.lr=0.1"])
    # relations between keys name the override that set either side, else the file
    with pytest.raises(ConfigError, match=r"^override 'refine.bg_threshold=0.5': refine.bg_threshold \(0.5\)"):
        config.load(None, ["refine.bg_threshold=0.5"])
    params.write_text("refine:\n  fg_threshold: 0.1\n")
    with pytest.raises(ConfigError, match=r"p.yaml: refine.bg_threshold \(0.15\) must not exceed"):
        config.load(params, ["seed=1"])
    with pytest.raises(ConfigError, match=r"^override 'dataset.kind=voc': dataset.root is required"):
        config.load(params, ["dataset.kind=voc"])


def test_readme_params_reference_matches_schema():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- params-reference:start -->\n", "<!-- params-reference:end -->"
    assert start in readme and end in readme
    documented = readme.split(start, 1)[1].split(end, 1)[0]
    assert documented == config.markdown_reference(), "README params reference is stale: run `advcam params --reference`"


def test_readme_params_examples_validate():
    """Every ```yaml block of the README is a params file that the schema accepts (a renamed key or a typo in
    the documented VOC params would fail a user's run)."""
    import yaml

    blocks = (REPO / "README.md").read_text().split("```yaml\n")[1:]
    assert blocks
    for block in blocks:
        data = yaml.safe_load(block.split("```", 1)[0])
        config.validate(data, "README example")


def test_documented_overrides_name_real_params():
    """Every ``-S key=value`` (``dvc exp run``) in the README and docs names a params key; a literal value is one the
    schema accepts for it (a renamed key or a typo in a documented command would fail a user's run)."""
    found = 0
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for key, value in re.findall(r"-S '?([a-z_][a-z0-9_.]*)=([^\s`';)]*)", path.read_text()):
            found += 1
            try:
                config.schema_property(key)
            except KeyError:
                raise AssertionError(f"{path.name}: -S {key}=...: no such params key") from None
            if value and not value.startswith(("$", "...")):  # the value alone (other keys may depend on it)
                jsonschema.validate(yaml.safe_load(value), config.schema_property(key))
    assert found > 30


# JSON Schema keywords the params schema may use: anything else is a YAML slip (an unquoted ", " inside a
# flow mapping splits a description into stray keys, which jsonschema silently ignores).
KEYWORDS = {"type", "default", "description", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
            "multipleOf", "items", "minItems", "maxItems", "uniqueItems", "pattern", "properties",
            "additionalProperties", "required", "minLength", "$schema", "title"}


def _unknown_keywords(node: dict, where: str) -> list[str]:
    bad = [f"{where}: {k!r}" for k in node if k not in KEYWORDS and not where.endswith("properties")]
    for key, child in node.items():
        if isinstance(child, dict):
            bad += _unknown_keywords(child, f"{where}.{key}")
    return bad


def test_schema_uses_only_json_schema_keywords_and_every_key_has_a_description():
    sch = config.schema()
    assert _unknown_keywords(sch, "schema") == []
    missing = []

    def described(node: dict, where: str) -> None:
        for key, prop in node.get("properties", {}).items():
            if not isinstance(prop.get("description"), str) or not prop["description"].strip():
                missing.append(f"{where}.{key}")
            described(prop, f"{where}.{key}")

    described(sch, "params")
    assert missing == []


def test_active_drops_only_the_sub_sections_of_unused_methods():
    d = config.defaults()
    cls = config.active("classifier", d["classifier"])
    assert "seam" not in cls and "eader" not in cls and cls["epochs"] == d["classifier"]["epochs"]
    seam = config.active("classifier", {**d["classifier"], "method": "seam"})
    assert "seam" in seam and "eader" not in seam
    assert "advcam" in config.active("cam", d["cam"])  # the default method is advcam
    assert "advcam" not in config.active("cam", {**d["cam"], "method": "cam"})
    refine = config.active("refine", d["refine"])
    assert "randomwalk" not in refine and "crf" in refine  # CRF params stay: the random walk uses CRF labels too
    walk = config.active("refine", {**d["refine"], "method": "randomwalk"})
    assert "randomwalk" in walk and "crf" in walk
    assert config.active("segmentation", d["segmentation"]) == d["segmentation"]
    assert "seam" in d["classifier"]  # the input is not changed


def test_active_leaves_out_a_later_key_while_it_is_unset():
    """classifier.trained (and dataset.labels_file) came after runs were recorded: unset, it is not part of what train_cls depends on, so
    those runs' records (Snakemake's params, the training's fingerprint) still match; set, it is."""
    d = config.defaults()
    assert d["classifier"]["trained"] is None and "trained" not in config.active("classifier", d["classifier"])
    assert d["classifier"]["dropout"] is None and "dropout" not in config.active("classifier", d["classifier"])
    before = {k: v for k, v in d["classifier"].items() if k not in ("trained", "dropout", "seam", "eader")}
    assert config.active("classifier", d["classifier"]) == before
    assert config.active("classifier", {**d["classifier"], "trained": "res50_cam.pth"})["trained"] == "res50_cam.pth"
    assert config.active("classifier", {**d["classifier"], "dropout": 0.0})["dropout"] == 0.0  # set, even to 0
    assert "labels_file" not in config.active("dataset", d["dataset"])  # dataset.labels_file came later too
    assert config.active("dataset", {**d["dataset"], "labels_file": "l.txt"})["labels_file"] == "l.txt"
    walk = {**d["refine"], "method": "randomwalk"}  # refine.randomwalk.arch / pretrained / trained came later, inside
    later = {"arch", "pretrained", "trained", "psa"}  # a section; psa is design psa's
    assert not later & set(config.active("refine", walk)["randomwalk"])
    assert set(config.active("refine", walk)["randomwalk"]) == set(d["refine"]["randomwalk"]) - later
    # design and train_radius are there: design irn changed meaning on 2026-12-03 (IRN's boundaries, where it was an
    # embedding's affinities), so the random walks of earlier runs are made again
    assert {"design", "train_radius"} <= set(config.active("refine", walk)["randomwalk"])
    walk["randomwalk"] = {**walk["randomwalk"], "arch": "resnet50"}
    assert config.active("refine", walk)["randomwalk"]["arch"] == "resnet50"
    assert config.active("refine", {**walk, "randomwalk": {**walk["randomwalk"], "trained": "res50_irn.pth"}}
                         )["randomwalk"]["trained"] == "res50_irn.pth"
    assert walk["randomwalk"]["pretrained"] is None  # the caller's values are not touched
    assert "psa" not in config.without_unset("refine", walk)["randomwalk"]  # the report's params: at its defaults
    walk["randomwalk"] = {**walk["randomwalk"], "design": "psa"}
    psa = config.active("refine", walk)["randomwalk"]
    assert psa["design"] == "psa" and "psa" not in psa  # the added section at its defaults: absent
    walk["randomwalk"]["psa"] = {**walk["randomwalk"]["psa"], "alpha": 6}
    assert config.active("refine", walk)["randomwalk"]["psa"]["alpha"] == 6
    assert "psa" in walk["randomwalk"] and "psa" not in config.active("refine", {**walk, "method": "crf"})
    irn = {**walk, "randomwalk": {**walk["randomwalk"], "design": "irn"}}  # psa's values are not irn's params
    assert "psa" not in config.active("refine", irn)["randomwalk"]
