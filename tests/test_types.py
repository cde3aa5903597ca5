"""Static types: mypy checks the package and the benchmarks.

Most GPU-only branches (CUDA graphs, TF32, multi-GPU) never run on CI. A misspelt attribute there (one once
turned ``torch.backends.cudnn.allow_tf32`` into ``allowtf32_mode``) fails only on a GPU, so the whole code is
type-checked here instead."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Every function of the package is annotated; the benchmark scripts' bodies are checked too.
CONFIG = """\
[mypy]
ignore_missing_imports = True
check_untyped_defs = True

[mypy-advcam.*]
disallow_untyped_defs = True
disallow_incomplete_defs = True
"""


def test_mypy_finds_no_errors(tmp_path):
    (tmp_path / "mypy.ini").write_text(CONFIG)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir",
           str(tmp_path / "cache"), "advcam", "benchmarks"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_reports_a_wrong_torch_attribute(tmp_path):
    """The check above can fail: the known accident, in a file of its own, is an error."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\nsaved = torch.backends.cudnn.allowtf32_mode\n")
    run = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--cache-dir",
                          str(tmp_path / "cache"), str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and 'has no attribute "allowtf32_mode"' in run.stdout, run.stdout + run.stderr
