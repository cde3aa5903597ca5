"""The one validated config: defaults, overrides, and errors that name the key and the allowed range."""
from __future__ import annotations

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
])
def test_errors_name_key_and_range(override, words):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    for w in words:
        assert w in str(err.value)


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


def test_readme_params_reference_matches_schema():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- params-reference:start -->\n", "<!-- params-reference:end -->"
    assert start in readme and end in readme
    documented = readme.split(start, 1)[1].split(end, 1)[0]
    assert documented == config.markdown_reference(), "README params reference is stale: run `advcam params --reference`"


# JSON Schema keywords the params schema may use: anything else is a YAML slip (an unquoted ", " inside a
# flow mapping splits a description into stray keys, which jsonschema silently ignores).
KEYWORDS = {"type", "default", "description", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
            "items", "minItems", "maxItems", "uniqueItems", "pattern", "properties", "additionalProperties",
            "required", "minLength", "$schema", "title"}


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
