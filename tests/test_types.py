"""Static types: mypy checks the package and the benchmarks.

Most GPU-only branches (CUDA graphs, TF32, multi-GPU) never run on CI. A misspelt attribute there (one once
turned ``torch.backends.cudnn.allow_tf32`` into ``allowtf32_mode``) fails only on a GPU, so the whole code is
type-checked here instead."""
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

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


@pytest.fixture(scope="module")
def mypy(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """mypy with the config above and one cache for the module: the second run reads torch's analysis from the
    first one's cache instead of doing it again (half a minute)."""
    d = tmp_path_factory.mktemp("mypy")
    (d / "mypy.ini").write_text(CONFIG)

    def run(*targets: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(d / "mypy.ini"), "--cache-dir", str(d / "cache"),
               *targets]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    return run


def test_mypy_finds_no_errors(mypy):
    run = mypy("advcam", "benchmarks")
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_reports_a_wrong_torch_attribute(mypy, tmp_path):
    """The check above can fail: the known accident, in a file of its own, is an error."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\nsaved = torch.backends.cudnn.allowtf32_mode\n")
    run = mypy(str(bad))
    assert run.returncode == 1 and 'has no attribute "allowtf32_mode"' in run.stdout, run.stdout + run.stderr
