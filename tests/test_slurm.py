"""The SLURM profile: a dry run checks every job's resources (through the SLURM executor plugin where it is
installed, else with the profile's resources on the local executor); where Debian's `slurm-wlm` is installed and
the tests run as root, a single-node cluster on loopback (slurmctld + slurmd bound to 127.0.0.1) runs the sharded
cams and refine stages as six sbatch jobs through the SLURM executor plugin (otherwise that test is skipped, with
the reason)."""
from __future__ import annotations

import glob
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
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
GPU_RULES = {"train_cls", "cams_shard", "train_seg", "evaluate", "predict"}
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
    jobs = job_resources(profile_dir, "workflow={shards: 3}", "predict={list: val}")
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
# slurmctld + slurmd (Debian: `apt-get install slurm-wlm`) as root, configured with 127.0.0.1 only and bound to it
# (CommunicationParameters=NoCtldInAddrAny,NoInAddrAny binds to the address the host name resolves to: where this
# machine's name does not resolve to loopback, the daemons run in their own UTS namespace named `localhost`).
# Authentication: auth/none where this Slurm still ships it (22.05 does), else a private munged.
SLURM_CONF = """ClusterName=advcamtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
{auth}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
SLURM_PLUGIN_DIRS = ("/usr/lib/*/slurm-wlm", "/usr/lib/slurm-wlm", "/usr/lib*/slurm", "/usr/local/lib*/slurm")
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "srun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_slurm_plugin(name: str) -> bool:
    return any(glob.glob(f"{d}/{name}.so") for d in SLURM_PLUGIN_DIRS)


def ipv4_addresses(name: str) -> set[str]:
    try:
        return {a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return set()


def is_loopback(name: str) -> bool:
    addresses = ipv4_addresses(name)
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def tcp_listeners(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses that listen on `port` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # LISTEN
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                found.add(str(ipaddress.ip_address(raw)))
    return found


def node_hardware(prefix: list[str]) -> tuple[int, int]:
    """(CPUs, RealMemory MB) for the node line: what `slurmd -C` finds (a node configured with more drains),
    memory at most 8 GB and half of it (the test's jobs ask for 500 MB each)."""
    r = subprocess.run([*prefix, "slurmd", "-C"], capture_output=True, text=True, timeout=30)
    found = dict(re.findall(r"(CPUs|RealMemory)=(\d+)", r.stdout))
    cpus = int(found.get("CPUs", os.cpu_count() or 1))
    total = int(found.get("RealMemory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20))
    return cpus, max(1000, min(8000, total // 2))


def stop_daemon(pid_file: Path, grace: float = 10.0) -> None:
    """SIGTERM the daemon named in `pid_file`, SIGKILL it after `grace` seconds."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return

    def alive() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not alive():
            return
        try:
            os.kill(pid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def log_tail(path: Path, n: int = 400) -> str:
    return path.read_text(errors="replace")[-n:].strip() if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd on 127.0.0.1, torn down afterwards (jobs cancelled, daemons stopped, even when the test
    fails); skips, with the reason, where they cannot be started here."""
    missing = [b for b in SLURM_COMMANDS if shutil.which(b) is None]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; Debian: apt-get install slurm-wlm)")
    if os.geteuid() != 0:
        pytest.skip(f"starting slurmd needs root (running as uid {os.geteuid()})")
    full = socket.gethostname()
    host = full.split(".")[0]  # the node name slurmd assumes
    prefix: list[str] = []  # runs a daemon so that its host name resolves to loopback
    if not (is_loopback(full) and is_loopback(host)):
        r = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True, timeout=10) \
            if shutil.which("unshare") else None
        if r is None or r.returncode != 0 or not is_loopback("localhost"):
            why = "unshare not found" if r is None else (r.stderr.strip() or "localhost is not loopback")
            pytest.skip(f"host name {full!r} resolves to {sorted(ipv4_addresses(full))}, not loopback, and a "
                        f"UTS namespace named localhost is not available ({why})")
        host, prefix = "localhost", ["unshare", "--uts", "sh", "-c", 'hostname localhost && exec "$@"', "sh"]
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    # The job-step plugin drops SLURM_* variables before its inner `srun`, so SLURM_CONF would not reach it
    # (real clusters use /etc/slurm/slurm.conf): an `srun` wrapper first on PATH brings it back.
    (d / "bin").mkdir()
    wrapper = d / "bin/srun"
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which("srun")} "$@"\n')
    wrapper.chmod(0o755)
    env = {**ENV, "SLURM_CONF": str(conf), "PATH": f"{d / 'bin'}{os.pathsep}{ENV['PATH']}"}
    ports = free_port(), free_port()
    pid_files = []
    try:
        if has_slurm_plugin("auth_none"):
            auth = "AuthType=auth/none\nCredType=cred/none"
        elif has_slurm_plugin("auth_munge") and shutil.which("munged") and shutil.which("mungekey"):
            sock = d / "munge/munge.socket"
            sock.parent.mkdir(mode=0o755)
            subprocess.run(["mungekey", "-c", "-b", "1024", "-k", str(d / "munge/munge.key")], check=True,
                           capture_output=True, timeout=30)
            pid_files.append(d / "munge/munged.pid")
            r = subprocess.run(["munged", "--force", f"--socket={sock}", f"--key-file={d}/munge/munge.key",
                                f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                                f"--seed-file={d}/munge/munged.seed"], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"this Slurm has no auth/none and munged did not start: {r.stderr.strip()[-300:]}")
            auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}"
        else:
            pytest.skip("this Slurm has neither auth/none nor auth/munge with munged (Debian: apt-get install munge)")
        cpus, mem = node_hardware(prefix)
        conf.write_text(SLURM_CONF.format(host=host, ctld_port=ports[0], d_port=ports[1], auth=auth, d=d,
                                          cpus=cpus, mem=mem))
        for name, args in (("slurmctld", ["-i"]), ("slurmd", [])):
            pid_files.append(d / f"{name}.pid")
            r = subprocess.run([*prefix, name, "-f", str(conf), *args], env=env, capture_output=True, text=True,
                               timeout=30)
            if r.returncode != 0:
                pytest.skip(f"{name} did not start: {(r.stderr or r.stdout).strip()[-300:]} "
                            f"(log: {log_tail(d / f'{name}.log')})")
        state, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10)
            state = r.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            time.sleep(0.5)
        else:
            pytest.skip(f"the loopback SLURM node did not come up within 30 s (sinfo: {state or r.stderr.strip()!r}"
                        f"; slurmctld: {log_tail(d / 'slurmctld.log', 200)}; slurmd: {log_tail(d / 'slurmd.log', 200)})")
        for port in ports:
            assert tcp_listeners(port) and all(ipaddress.ip_address(a).is_loopback for a in tcp_listeners(port)), \
                f"port {port} listens on {tcp_listeners(port)}: not loopback only"
        yield env
    finally:
        if (d / "slurmctld.pid").is_file():  # cancel what a failed test left running, for at most ~25 s
            try:
                subprocess.run(["scancel", "--partition", "debug"], env=env, capture_output=True, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and subprocess.run(
                        ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=5).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for pid_file in reversed(pid_files):
            stop_daemon(pid_file)


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
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    for res in profile["set-resources"].values():  # this node has no GPU and little memory
        res.update(gpu=0, mem_mb=500, cpus_per_task=1, runtime=10)
    profile["default-resources"].update(mem_mb=500, runtime=10)
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof/config.yaml").write_text(yaml.safe_dump(profile))
    r = subprocess.run(["snakemake", "--profile", "prof", "--slurm-status-command", "squeue",
                        "--slurm-init-seconds-before-status-checks", "1", "--", "pseudo", "metrics/pseudo.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
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
