"""advcam: weakly-supervised semantic segmentation pipeline (CAM, AdvCAM, SEAM, EADER)."""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    """Ship the fused-op sources (top-level csrc/) inside the package as advcam/ops/csrc/ (JIT-built on use)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "advcam" / "ops" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in Path(__file__).parent.joinpath("csrc").glob("*.c*"):
            shutil.copy(src, target / src.name)

setup(
    name="advcam",
    version="0.1.0",
    description="Reproducible weakly-supervised semantic segmentation: CAM, AdvCAM, SEAM, EADER",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # Snakemake 9 needs 3.11 (on 3.10 `make` found no Snakemake >= 9)
    packages=find_packages(include=["advcam", "advcam.*"]),
    package_data={"advcam": ["schemas/*.yaml"]},
    cmdclass={"build_py": BuildPyWithCsrc},
    # A range, not a pin: a CUDA build of torch that a user already has satisfies it. The Makefile
    # installs the CPU wheel first on machines without torch, so pip never reaches for CUDA wheels. 2.3 is the
    # oldest that works with NumPy 2 (2.1.2 failed with "Numpy is not available"; the suite passed on 2.3.1).
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "pyyaml>=6",
        "jsonschema>=4.18",
        "pillow>=9.1",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "ninja>=1.11",
        "pydensecrf2>=1.1",
    ],
    extras_require={
        # dvclive: training curves for `dvc plots` (advcam.train.live; optional, a no-op when missing)
        # snakemake-executor-plugin-slurm: workflow/profiles/slurm (docs/cluster.md)
        "workflow": ["snakemake>=9,<10", "dvc>=3.50,<4", "dvclive>=3.40,<4", "snakemake-executor-plugin-slurm>=2,<3"],
        "test": ["pytest>=8", "pytest-xdist>=3.8,<4", "mypy>=2.4,<2.5", "snakemake>=9,<10", "dvc>=3.50,<4",
                 "dvclive>=3.40,<4", "snakemake-executor-plugin-slurm>=2,<3"],
    },
    entry_points={"console_scripts": ["advcam=advcam.cli:main"]},
)
