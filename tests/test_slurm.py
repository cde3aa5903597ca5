"""The SLURM profile: a dry run checks every job's resources; where `slurmctld`/`slurmd` are installed (Debian:
`apt-get install slurm-wlm`), a single-node cluster on loopback runs the sharded cams stage through the SLURM
executor plugin (otherwise that test is skipped, with the reason)."""
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
pytestmark = [
    pytest.mark.skipif(shutil.which("snakemake", path=ENV["PATH"]) is None, reason="snakemake is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                       reason="snakemake-executor-plugin-slurm is not installed (pip install -e .[workflow])"),
]


def job_resources(*config_args: str) -> dict[str, list[dict[str, str]]]:
    """`snakemake -n --profile slurm --forceall`: rule -> the resources of each of its jobs."""
    r = subprocess.run(["snakemake", "-n", "--forceall", "--profile", str(PROFILE), "--config", *config_args],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    for rule, res in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", r.stdout, re.M):
        jobs.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in res.split(", ")))
    return jobs


def test_profile_dry_run_gives_gpus_to_training_and_climbing_only():
    jobs = job_resources("workflow={shards: 3}")
    assert len(jobs["cams_shard"]) == 3 and len(jobs["refine_shard"]) == 3
    for rule, runs in jobs.items():
        if rule == "all":
            continue
        for res in runs:
            assert int(res["runtime"]) > 0 and int(res["mem_mb"]) > 0 and int(res["cpus_per_task"]) >= 1, rule
            assert int(res.get("gpu", 0)) == (1 if rule in GPU_RULES else 0), f"{rule}: {res}"
    assert CPU_RULES | GPU_RULES <= set(jobs)
    assert int(jobs["train_cls"][0]["mem_mb"]) >= 16000 and int(jobs["train_cls"][0]["runtime"]) >= 360


def test_randomwalk_refine_asks_for_a_gpu():
    jobs = job_resources("workflow={shards: 2}", "refine={method: randomwalk}")
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
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


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
                                      d_port=free_port(), user=getpass.getuser(), d=d, cpus=os.cpu_count() or 2))
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


def test_sharded_cams_run_as_slurm_jobs(slurm_cluster, tmp_path):
    """The 2 cams shards and their gather, each one sbatch job on the loopback cluster (the data and the
    classifier are made locally first, to keep the test short)."""
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
                        "--slurm-init-seconds-before-status-checks", "1", "--", "cams"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert len(re.findall(r"Job \d+ has been submitted with SLURM jobid \d+", log)) == 3, log[-4000:]
    ids = (tmp_path / "data/synthetic/lists/infer.txt").read_text().split()
    assert sorted(p.stem for p in (tmp_path / "cams").glob("*.npz")) == sorted(ids)
    assert (tmp_path / "metrics/seeds.json").is_file() and not (tmp_path / "shards/cams/1-of-2").exists()
