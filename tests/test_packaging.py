"""constraints.txt (the versions `make install` applies, renewed by `make lock`) against setup.py's ranges, and the
Makefile's oldest Python and torch against setup.py's."""
import importlib.metadata
import re
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def lock_exclude() -> re.Pattern:
    """The Makefile's LOCK_EXCLUDE (what `make lock` leaves out: torch, the packages only torch needs, pip's)."""
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("LOCK_EXCLUDE :=")]
    return re.compile(line.split(":=", 1)[1].strip(), re.I)


def read_constraints(path: Path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


def test_every_constraint_is_one_exact_version_for_one_python():
    pins = read_constraints(ROOT / "constraints.txt")
    assert pins
    names = [canonicalize_name(p.name) for p in pins]
    assert len(names) == len(set(names)), "a package is pinned twice"
    for pin in pins:
        (spec,) = pin.specifier  # one specifier, an exact version
        assert spec.operator == "==" and "*" not in spec.version, str(pin)
        assert pin.marker is not None and str(pin.marker).startswith("python_version == "), str(pin)
        assert not lock_exclude().search(f"{pin.name}=="), f"{pin.name}: make lock leaves it to torch / pip"


def test_make_lock_leaves_out_torch_and_its_own_dependencies():
    excluded = lock_exclude()
    for name in ("torch", "sympy", "mpmath", "triton", "nvidia-cublas-cu12", "nvidia-nccl-cu12",
                 "nvidia-nvjitlink-cu12", "pip"):
        assert excluded.search(f"{name}=="), name
    for name in ("numpy", "torchmetrics", "nvidia-ml-py", "snakemake"):
        assert not excluded.search(f"{name}=="), name


def test_constraints_pin_every_requirement_within_setup_ranges():
    """Every direct requirement of advcam[test] but torch is pinned, inside the range setup.py allows."""
    pins = {canonicalize_name(p.name): next(iter(p.specifier)).version
            for p in read_constraints(ROOT / "constraints.txt")}
    required = [Requirement(r) for r in importlib.metadata.requires("advcam") or []]
    assert required
    for req in required:
        if canonicalize_name(req.name) == "torch":
            continue
        assert canonicalize_name(req.name) in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), \
            f"constraints.txt pins {req.name}=={pins[canonicalize_name(req.name)]}, outside setup.py's {req}"


def test_constraints_apply_to_the_python_they_were_resolved_for():
    """The marker names one Python; the pins apply there and nowhere else (other Pythons resolve the ranges)."""
    pins = read_constraints(ROOT / "constraints.txt")
    markers = {str(p.marker) for p in pins}
    assert len(markers) == 1
    marker = pins[0].marker
    assert marker is not None
    version = str(marker).split('"')[1]
    env = default_environment()
    assert marker.evaluate({**env, "python_version": version})
    other = "3.10" if version != "3.10" else "3.12"
    assert not marker.evaluate({**env, "python_version": other})


def makefile_value(name: str) -> str:
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith(f"{name} :=")]
    return line.split(":=", 1)[1].strip()


def test_the_makefile_and_setup_agree_on_the_oldest_python_and_torch():
    """`make` refuses a Python older than setup.py's Requires-Python before it creates .venv, and replaces a torch
    older than setup.py's lower bound (TORCH_MIN) instead of leaving pip to break it with NumPy 2."""
    meta = importlib.metadata.metadata("advcam")
    assert meta["Requires-Python"] == f">={makefile_value('PYTHON_MIN')}"
    (torch_req,) = [Requirement(r) for r in importlib.metadata.requires("advcam") or []
                    if canonicalize_name(Requirement(r).name) == "torch"]
    assert str(torch_req.specifier) == f">={makefile_value('TORCH_MIN')}"
