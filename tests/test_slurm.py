"""The SLURM profile: a dry run checks every job's resources (through the SLURM executor plugin where it is
installed, else with the profile's resources on the local executor); where `slurmctld`/`slurmd` are installed
(Debian: `apt-get install slurm-wlm`), a single-node cluster on loopback runs the sharded cams and refine stages
through the SLURM executor plugin (otherwise that test is skipped, with the reason)."""
from __future__ import annotations

import getpass
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from advcam import config
from conftest import REPO, TINY

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "ADVCAM_PROGRESS": "0",
       "OMP_NUM_THREADS": "1"}
PROFILE = REPO / "workflow/profiles/slurm"
GPU_RULES = {"train_cls", "cams_shard", "train_seg", "evaluate"}
CPU_RULES = {"prepare", "cams", "refine_shard", "refine"}
HAS_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
pytestmark = pytest.mark.skipif(shutil.which("snakemake", path=ENV["PATH"]) is None,
                                reason="snakemake is not installed")
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN, reason="snakemake-executor-plugin-slurm is not installed "
                                  "(pip install -e .[workflow])")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    """The SLURM profile; without the executor plugin, a copy of it minus `executor: slurm`, so that the dry run
    still resolves the profile's default- and set-resources for every job (on the local executor)."""
    if HAS_PLUGIN:
        return PROFILE
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile.pop("executor") == "slurm"
    d = tmp_path_factory.mktemp("profile")
    (d / "config.yaml").write_text(yaml.safe_dump(profile))
    return d


def job_resources(profile: Path, *config_args: str) -> dict[str, list[dict[str, str]]]:
    """`snakemake -n --profile slurm --forceall`: rule -> the resources of each of its jobs."""
    r = subprocess.run(["snakemake", "-n", "--forceall", "--profile", str(profile), "--config", *config_args],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    for rule, res in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", r.stdout, re.M):
        jobs.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in res.split(", ")))
    return jobs


def test_profile_dry_run_gives_gpus_to_training_and_climbing_only(profile_dir):
    jobs = job_resources(profile_dir, "workflow={shards: 3}")
    assert len(jobs["cams_shard"]) == 3 and len(jobs["refine_shard"]) == 3
    for rule, runs in jobs.items():
        if rule == "all":
            continue
        for res in runs:
            assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0 and int(res["cpus_per_task"]) >= 1, rule
            assert int(res.get("gpu", 0)) == (1 if rule in GPU_RULES else 0), f"{rule}: {res}"
    assert CPU_RULES | GPU_RULES <= set(jobs)
    assert int(jobs["train_cls"][0]["mem_mb"]) >= 16000 and int(jobs["train_cls"][0]["runtime"]) >= 360


def test_randomwalk_refine_asks_for_a_gpu(profile_dir):
    jobs = job_resources(profile_dir, "workflow={shards: 2}", "refine={method: randomwalk}")
    assert int(jobs["refine"][0]["gpu"]) == 1
    assert all(int(j.get("gpu", 0)) == 0 for j in jobs["refine_shard"])


# --- a real single-node cluster on loopback -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """ClusterName=advcamtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def node_memory_mb() -> int:
    """RealMemory for the loopback node: at most 8 GB and at most half of this machine's memory (slurmd drains a
    node whose configured memory exceeds what it finds); the test's jobs ask for 500 MB each."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return max(1000, min(8000, total // 2))


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd on 127.0.0.1 (auth/none), torn down afterwards; skips with the reason otherwise."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; Debian: apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], ctld_port=free_port(),
                                      d_port=free_port(), user=getpass.getuser(), d=d, cpus=os.cpu_count() or 2,
                                      mem=node_memory_mb()))
    # The job-step plugin drops SLURM_* variables before its inner `srun`, so SLURM_CONF would not reach it
    # (real clusters use /etc/slurm/slurm.conf): an `srun` wrapper first on PATH brings it back.
    (d / "bin").mkdir()
    wrapper = d / "bin/srun"
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    wrapper.chmod(0o755)
    env = {**ENV, "SLURM_CONF": str(conf), "PATH": f"{d / 'bin'}{os.pathsep}{ENV['PATH']}"}
    started = []
    try:
        for cmd in (["slurmctld", "-f", str(conf), "-i"], ["slurmd", "-f", str(conf)]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"{cmd[0]} did not start: {(r.stderr or r.stdout).strip()[-300:]}")
            started.append(cmd[0])
        for _ in range(60):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if state.strip() in ("idle", "mixed", "allocated"):
                break
            time.sleep(0.5)
        else:
            pytest.skip(f"the loopback SLURM node did not come up (sinfo: {state.strip()!r}); see {d}")
        yield env
    finally:
        for name in reversed(started):
            pid = d / f"{name}.pid"
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text().strip()), 15)
                except (OSError, ValueError):
                    pass


@needs_plugin
def test_sharded_cams_and_refine_run_as_slurm_jobs(slurm_cluster, tmp_path):
    """The 2 cams shards (climbing) and their gather, the 2 refine shards (dense CRF) and their gather: each one
    sbatch job on the loopback cluster (the data and the classifier are made locally first, to keep the test
    short)."""
    env = slurm_cluster
    shutil.copytree(REPO / "workflow", tmp_path / "workflow", ignore=shutil.ignore_patterns("profiles"))
    params = config.load(None, [*TINY, "cam.method=cam", "workflow.shards=2"]).to_dict()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run(["snakemake", "--cores", "2", "--", "models/classifier.pt"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for res in profile["set-resources"].values():  # this node has no GPU and little memory
        res.update(gpu=0, mem_mb=500, cpus_per_task=1, runtime=10)
    profile["default-resources"].update(mem_mb=500, runtime=10)
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof/config.yaml").write_text(yaml.safe_dump(profile))
    r = subprocess.run(["snakemake", "--profile", "prof", "--slurm-status-command", "squeue",
                        "--slurm-init-seconds-before-status-checks", "1", "--", "pseudo", "metrics/pseudo.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert len(re.findall(r"Job \d+ has been submitted with SLURM jobid \d+", log)) == 6, log[-4000:]
    for rule, count in (("cams_shard", 2), ("cams", 1), ("refine_shard", 2), ("refine", 1)):
        assert len(re.findall(rf"^rule {rule}:$", log, re.M)) == count, (rule, log[-4000:])
    ids = (tmp_path / "data/synthetic/lists/infer.txt").read_text().split()
    assert sorted(p.stem for p in (tmp_path / "cams").glob("*.npz")) == sorted(ids)
    assert sorted(p.stem for p in (tmp_path / "pseudo").glob("*.png")) == sorted(ids)
    assert (tmp_path / "metrics/seeds.json").is_file() and (tmp_path / "metrics/pseudo.json").is_file()
    assert not (tmp_path / "shards/cams/1-of-2").exists() and not (tmp_path / "shards/refine/1-of-2").exists()
