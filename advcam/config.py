"""One validated configuration: params.yaml -> schema (with defaults) -> attribute access.

The schema (``advcam/schemas/params.schema.yaml``) is the single source of truth for keys, types, ranges
and defaults. Snakemake validates its ``config`` with :func:`validate`; the CLI loads files with :func:`load`.
"""
from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from advcam.utils.errors import AdvcamError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "params.schema.yaml"


class _Loader(yaml.SafeLoader):
    """YAML 1.2's numbers: PyYAML (YAML 1.1) reads ``1e-6`` (no dot) as a string and VOC's ``2007_000032`` as the
    integer 2007000032. Here an integer is ``[-+]?(0|[1-9][0-9]*)``, a float has a dot or an exponent (``1e-6``,
    ``.5``, ``2.``) or is ``.inf``/``.nan``; anything else (``007``, ``1_000``, ``0x1F``) is a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _is_integer(checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(checker: Any, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# JSON Schema counts 2.0 as an integer and NaN / infinity as numbers; a stage would then fail deep inside (range(2.0))
# or silently (a NaN learning rate), so integers must be written as integers and numbers must be finite.
_Validator = validators.extend(Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": _is_integer, "number": _is_number}))


def _yaml(text: Any) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(AdvcamError):
    """A params file or override that does not match the schema."""


@lru_cache(maxsize=1)
def schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def schema_property(key: str) -> dict:
    """The schema of one dotted key (``cam.advcam.xi``): its type, bounds and default (read-only)."""
    node = schema()
    for part in key.split("."):
        node = node["properties"][part]
    return node


class Config(Mapping):
    """Read-only view of a validated params dict: ``cfg.cam.scales`` or ``cfg["cam"]["scales"]``."""

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)

    def __getattr__(self, key: str) -> Any:
        try:
            value = self._data[key]
        except KeyError:
            raise AttributeError(key) from None
        return Config(value) if isinstance(value, Mapping) else value

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        return Config(value) if isinstance(value, Mapping) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"Config({self._data!r})"


def _fill_defaults(node: dict, sch: Mapping) -> None:
    for key, sub in sch.get("properties", {}).items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        if isinstance(node.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(node[key], sub)


def _where(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _describe(err: ValidationError, source: str, origins: Mapping[str, str] | None = None) -> str:
    where = _where(err.absolute_path)
    sch = err.schema if isinstance(err.schema, Mapping) else {}
    extra = (sorted(set(err.instance) - set(sch.get("properties", {})))
             if err.validator == "additionalProperties" else [])
    full = [f"{where + '.' if where != '<top level>' else ''}{k}" for k in extra] or [where]
    for key, origin in (origins or {}).items():  # a value given by an override names the override
        if any(f == key or f.startswith(key + ".") or f.startswith(key + "[") for f in full):
            source = origin
    if err.validator == "additionalProperties":
        allowed = ", ".join(sorted(sch.get("properties", {})))
        return f"{source}: unknown key {', '.join(full)} (allowed here: {allowed})"
    bounds = [f"{k} {sch[k]}" for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "enum",
                                         "minItems", "type") if k in sch]
    if err.validator == "uniqueItems":
        seen: set = set()
        twice = [v for v in err.instance if repr(v) in seen or seen.add(repr(v))]  # type: ignore[func-returns-value]
        bounds = [f"each item once; {', '.join(repr(v) for v in twice[:3])} repeated"]
    allowed = f" (allowed: {', '.join(bounds)})" if bounds else ""
    hint = ""
    if err.validator == "type" and "string" in str(sch.get("type")) and isinstance(err.instance, (int, float)) \
            and not isinstance(err.instance, bool):
        hint = ("; quote it: YAML 1.1 readers (PyYAML, so Snakemake's configfile) read 2007_000032 as the number "
                "2007000032")
    if err.validator == "type" and isinstance(err.instance, float) and not math.isfinite(err.instance):
        hint = "; numbers must be finite"
    elif err.validator == "type" and isinstance(err.instance, float) and "integer" in str(sch.get("type")):
        hint = f"; write it as an integer ({int(err.instance)})" if err.instance.is_integer() else ""
    return f"{source}: {where}: {err.message}{allowed}{hint}"


def _coerce_strings(node: Any, sch: Mapping) -> Any:
    """Parse string leaves as YAML where the schema wants another type (Snakemake's --config gives strings)."""
    types = sch.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(node, str) and types and "string" not in types:
        try:
            return _yaml(node)
        except yaml.YAMLError:
            return node
    if isinstance(node, str) and "null" in types and node in ("null", "~", "None"):
        return None
    if isinstance(node, dict):
        props = sch.get("properties", {})
        return {k: _coerce_strings(v, props.get(k, {})) for k, v in node.items()}
    if isinstance(node, list) and isinstance(sch.get("items"), Mapping):
        return [_coerce_strings(v, sch["items"]) for v in node]
    return node


def validate(data: Mapping[str, Any], source: str = "params", coerce_strings: bool = False,
             origins: Mapping[str, str] | None = None) -> dict:
    """Validate ``data`` against the schema, fill defaults, and return a new plain dict.

    ``coerce_strings`` parses string values as YAML where the schema expects a number, boolean or list
    (for Snakemake's ``--config``, which passes nested values as strings). Raises :class:`ConfigError`
    naming every offending key with its allowed range, and where it came from: ``source``, or the entry of
    ``origins`` (dotted key -> description, e.g. an override) that set it.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    out = json.loads(json.dumps(data))  # plain types only, no YAML tags or aliases shared
    sch = schema()
    if coerce_strings:
        out = _coerce_strings(out, sch)
    _fill_defaults(out, sch)
    errors = sorted(_Validator(sch).iter_errors(out), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("; ".join(_describe(e, source, origins) for e in errors))
    _check_relations(out, source, origins or {})
    return out


def _check_relations(cfg: dict, source: str, origins: Mapping[str, str]) -> None:
    def from_(*keys: str) -> str:
        """Where the values of ``keys`` came from: the overrides that set any of them, else ``source``."""
        said = [origins[k] for k in keys if k in origins]
        return ", ".join(said) if said else source

    ds = cfg["dataset"]
    if ds["kind"] == "voc" and not ds["root"]:
        raise ConfigError(f"{from_('dataset.kind', 'dataset.root')}: dataset.root is required when dataset.kind "
                          "is voc")
    names = [str(c) for c in ds.get("classes") or []]
    bg = [c for c in names if c.strip().strip("_").lower() == "background"]
    if bg:
        raise ConfigError(f"{from_('dataset.classes')}: dataset.classes lists {bg[0]!r}; background is label 0 of "
                          f"every mask and is not listed: give the foreground classes only, in label order 1..C "
                          f"(got {names})")
    syn = cfg["synthetic"]
    if ds["kind"] == "synthetic" and syn["num_train"] > syn["num_train_aug"]:
        raise ConfigError(f"{from_('synthetic.num_train', 'synthetic.num_train_aug')}: synthetic.num_train "
                          f"({syn['num_train']}) must not exceed synthetic.num_train_aug ({syn['num_train_aug']})")
    ref = cfg["refine"]
    if ref["bg_threshold"] > ref["fg_threshold"]:
        raise ConfigError(f"{from_('refine.bg_threshold', 'refine.fg_threshold')}: refine.bg_threshold "
                          f"({ref['bg_threshold']}) must not exceed refine.fg_threshold ({ref['fg_threshold']})")
    if ref["method"] == "randomwalk" and ref["randomwalk"]["design"] == "psa" and ref["randomwalk"].get("trained"):
        raise ConfigError(f"{from_('refine.randomwalk.trained', 'refine.randomwalk.design')}: design psa takes its "
                          "trained AffinityNet as refine.randomwalk.psa.trained (this key is irn's and affinitynet's)")
    if ref["method"] == "randomwalk":
        _check_walk_crop(ref["randomwalk"], from_)


def _check_walk_crop(rw: Mapping[str, Any], from_: Callable[..., str]) -> None:
    """The random walk's network trains on pairs whose first pixel lies in ``grid[:-(r-1), (r-1):-(r-1)]`` of a crop's
    label grid (IRN's and PSA's source region): refuse a crop too small to hold one, which would train nothing."""
    if rw["psa"]["trained"] if rw["design"] == "psa" else rw.get("trained"):
        return  # taken, not trained
    design = rw["design"]
    if design == "psa":  # PSA's crops are multiples of 8
        crop_key, crop, stride, radius_key = "psa.crop_size", rw["psa"]["crop_size"], 8, "radius"
    else:
        crop_key, crop, stride = "crop_size", rw["crop_size"], 4
        radius_key = "train_radius" if design == "irn" else "radius"
    radius, grid = rw[radius_key], -(-crop // stride)
    if grid < 2 * radius - 1:
        least = stride * (2 * radius - 2) + 1 if stride == 4 else stride * (2 * radius - 1)
        keys = (f"refine.randomwalk.{crop_key}", f"refine.randomwalk.{radius_key}", "refine.randomwalk.design")
        raise ConfigError(f"{from_(*keys)}: refine.randomwalk.{crop_key} {crop} gives a {grid} x {grid} label grid "
                          f"(stride {stride}), which holds no training pair within refine.randomwalk.{radius_key} "
                          f"{radius} (design {design}: a pair's first pixel lies at least {radius - 1} cells from the "
                          f"left, right and bottom edges); use a {crop_key} of at least {least}, or a smaller "
                          f"{radius_key}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. cam.method=cam")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = _parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return out


def read_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        with open(path) as f:
            data = _yaml(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return {} if data is None else data


def load(path: str | Path | None = "params.yaml", overrides: Iterable[str] = (),
         json_text: str | None = None) -> Config:
    """Load params (file, or JSON text from Snakemake), apply ``KEY=VALUE`` overrides, validate."""
    if json_text is not None:
        try:
            data, source = json.loads(json_text), "params (json)"
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params-json is not valid JSON: {exc}") from None
    elif path is None:
        data, source = {}, "defaults"
    else:
        data, source = read_params(path), str(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    overrides = list(overrides)
    origins = {".".join(_parse_override(text)[0]): f"override {text!r}" for text in overrides}
    return Config(validate(apply_overrides(data, overrides), source, origins=origins))


# Sub-sections read only while a key of their section has one value (refine.crf is not here: the random walk learns
# its affinities from CRF labels): sub-section (dotted inside the section) -> (key, value).
USED_WHEN: dict[str, dict[str, tuple[str, str]]] = {
    "classifier": {"seam": ("method", "seam"), "eader": ("method", "eader")},
    "cam": {"advcam": ("method", "advcam")},
    "refine": {"randomwalk": ("method", "randomwalk"), "randomwalk.psa": ("randomwalk.design", "psa")}}


# Keys added to a section after results were recorded, with the value that means what the earlier runs did: at that
# value they are left out of what a stage depends on, so the records of earlier runs (Snakemake's params, the
# trainings' fingerprints) still match and nothing reruns. A dotted key is one inside a sub-section; SCHEMA_DEFAULT
# stands for the key's default in the schema (a whole added sub-section at its defaults).
SCHEMA_DEFAULT = "<schema default>"
UNSET_MEANS_ABSENT: dict[str, dict[str, Any]] = {
    "classifier": {"trained": None, "dropout": None}, "dataset": {"labels_file": None},
    "refine": {"randomwalk.arch": None, "randomwalk.pretrained": None, "randomwalk.trained": None,
               "randomwalk.psa": SCHEMA_DEFAULT}}


def _parent(values: dict, dotted: str) -> tuple[Any, str]:
    """(the mapping holding the dotted key, its last name); the mapping is None where a parent is missing."""
    *parents, key = dotted.split(".")
    inner: Any = values
    for name in parents:
        inner = inner.get(name) if isinstance(inner, dict) else None
    return (inner if isinstance(inner, dict) else None), key


def active(section: str, values: Any) -> Any:
    """``values`` of the params section ``section`` without the sub-sections it does not use (e.g.
    ``classifier.seam`` when ``classifier.method`` is cam: :data:`USED_WHEN`) and without the
    :data:`UNSET_MEANS_ABSENT` keys at their absent value; a top-level scalar (``seed``) as it is. What a stage's
    results depend on: Snakemake's rule params and the stages' fingerprints use it, so a change there reruns and
    retrains nothing."""
    if not isinstance(values, Mapping):
        return copy.deepcopy(values)
    out = copy.deepcopy(dict(values))
    for sub, (key, value) in USED_WHEN.get(section, {}).items():  # a sub-section before the ones inside it
        inner, name = _parent(out, sub)
        holder, selector = _parent(out, key)
        if inner is not None and (holder is None or holder.get(selector) != value):
            inner.pop(name, None)
    return without_unset(section, out)


def without_unset(section: str, values: Any) -> Any:
    """``values`` of the params section ``section`` without the :data:`UNSET_MEANS_ABSENT` keys at their absent
    value."""
    if not isinstance(values, Mapping):
        return copy.deepcopy(values)
    out = copy.deepcopy(dict(values))
    for dotted, absent in UNSET_MEANS_ABSENT.get(section, {}).items():
        inner, key = _parent(out, dotted)
        if absent == SCHEMA_DEFAULT:
            absent = _parent(_defaults_copy()[section], dotted)[0][key]
        if inner is not None and key in inner and inner[key] == absent:
            inner.pop(key)
    return out


@lru_cache(maxsize=1)
def _defaults_copy() -> dict:
    return defaults()


def defaults() -> dict:
    """The full default params (what ``params.yaml`` ships)."""
    return validate({}, "defaults")


def markdown_reference() -> str:
    """The params reference table (README section), generated from the schema."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]

    def walk(sch: Mapping, prefix: str) -> None:
        for key, sub in sch.get("properties", {}).items():
            name = f"{prefix}{key}"
            if sub.get("type") == "object":
                rows.append(f"| **{name}** | section | | | {' '.join(str(sub.get('description', '')).split())} |")
                walk(sub, name + ".")
                continue
            types = sub.get("type", "")
            types = "/".join(types) if isinstance(types, list) else types
            if types == "array":
                types = f"list of {sub.get('items', {}).get('type', 'any')}"
            allowed = ", ".join(f"{k} {sub[k]}" for k in ("minimum", "exclusiveMinimum", "maximum",
                                                          "exclusiveMaximum", "multipleOf", "minItems") if k in sub)
            if "enum" in sub:
                allowed = " \\| ".join("null" if v is None else str(v) for v in sub["enum"])
            default = json.dumps(sub.get("default"))
            if len(default) > 40:
                default = default[:37] + "..."
            desc = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
            rows.append(f"| `{name}` | {types} | `{default}` | {allowed} | {desc} |")

    walk(schema(), "")
    return "\n".join(rows) + "\n"
