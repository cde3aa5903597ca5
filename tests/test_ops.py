"""Fused AdvCAM ops: the C++ (and, on a GPU, CUDA) extension agrees with the pure-PyTorch fallback.

The extension builds once into the persistent cache (``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/advcam/torch_extensions``), so only the first run pays for the compile. On a GPU machine with a
CUDA build of torch the same tests run on ``cuda`` (``pytest tests/test_ops.py``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from advcam.ops import fused
from advcam.ops import ascent_step_, masked_l1, resolve_backend
from advcam.utils.errors import AdvcamError

SHAPES = [(3, 7, 9), (1, 1, 1), (2, 13, 1), (2, 65, 129)]  # odd sizes, a single pixel, > one parallel grain
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler (c++ / g++) to build the fused extension; advcam falls back to the pure-PyTorch "
                    "ops, tested elsewhere (Debian: apt-get install g++)")
    return fused.load_extension()


def maps(shape, dtype, device, seed=0):
    """Non-negative maps as AdvCAM has them, with |a - a0| and a / max - tau kept away from the kinks."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64) + 0.05
    a = torch.where((a / a.flatten(1).amax(1).view(-1, *[1] * (a.dim() - 1)) - 0.5).abs() < 0.01, a + 0.03, a)
    d = torch.rand(shape, generator=g, dtype=torch.float64) * 0.2 + 0.01
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return a.to(device, dtype), (a + sign * d).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_l1_extension_matches_fallback(ext, shape, dtype, device):
    a, a0 = maps(shape, dtype, device)
    results = {}
    for backend in ("extension", "fallback"):
        x = a.clone().requires_grad_(True)
        acc = torch.full(shape, 0.25, dtype=dtype, device=device)
        loss = masked_l1(x, a0, 0.5, acc=acc, backend=backend)
        weights = torch.arange(1, shape[0] + 1, dtype=dtype, device=device)
        (grad,) = torch.autograd.grad((loss * weights).sum(), x)
        results[backend] = (loss.detach(), acc, grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(results["extension"], results["fallback"]):
        torch.testing.assert_close(got, want, **tol)
    assert results["extension"][0].shape == (shape[0],)
    assert torch.equal(results["extension"][1], a + 0.25)  # acc += a, exactly
    assert (results["extension"][2] != 0).any()  # the mask keeps at least each class's peak


@pytest.mark.parametrize("backend", ["extension", "fallback"])
@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 1, 1), (3, 1, 6)])
def test_masked_l1_gradcheck(ext, backend, shape):
    a, a0 = maps(shape, torch.float64, "cpu", seed=3)
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: masked_l1(t, a0, 0.5, backend=backend), (a,), eps=1e-6, atol=1e-8)


def test_mask_is_relative_to_the_current_max(ext):
    a = torch.tensor([[1.0, 0.6, 0.4, 0.0]], dtype=torch.float64)
    a0 = torch.zeros_like(a)
    for backend in ("extension", "fallback"):
        # M = a / max a > 0.5 -> the first two entries: |1 - 0| + |0.6 - 0|
        assert masked_l1(a, a0, 0.5, backend=backend).item() == pytest.approx(1.6)
        assert masked_l1(torch.zeros_like(a), a0, 0.5, backend=backend).item() == 0.0  # 0/0 is not > tau
        # strictly above tau: a / max a == tau is outside the mask, tau 1 masks nothing, tau 0 not the zeros
        tie = torch.tensor([[1.0, 0.5, 0.4, 0.0]], dtype=torch.float64)
        assert masked_l1(tie, a0, 0.5, backend=backend).item() == pytest.approx(1.0)
        assert masked_l1(tie, a0, 1.0, backend=backend).item() == 0.0
        zeros_differ = torch.tensor([[0.0, 0.3]], dtype=torch.float64)
        assert masked_l1(torch.tensor([[1.0, 0.0]], dtype=torch.float64), zeros_differ, 0.0,
                         backend=backend).item() == pytest.approx(1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (3, 6, 1, 9), (2, 3, 61, 67)])
def test_ascent_step_extension_matches_fallback(ext, shape, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    grad = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device, dtype)
    out = {}
    for backend in ("extension", "fallback"):
        y = x.clone()
        gmax = ascent_step_(y, grad, 0.5, backend=backend)
        out[backend] = (y, gmax)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(out["extension"], out["fallback"]):
        torch.testing.assert_close(got, want, **tol)
    y, gmax = out["extension"]
    flat_x, flat_y = x.reshape(shape[0], -1), y.reshape(shape[0], -1)
    torch.testing.assert_close(gmax, grad.reshape(shape[0], -1).abs().amax(1))
    assert (flat_y >= flat_x.amin(1, keepdim=True)).all() and (flat_y <= flat_x.amax(1, keepdim=True)).all()
    if x.numel() > shape[0]:
        assert not torch.equal(x, y)


def test_ascent_step_reports_non_finite_gradients(ext):
    for backend in ("extension", "fallback"):
        x = torch.zeros(2, 4)
        g = torch.tensor([[1.0, float("nan"), 0.0, 0.0], [1.0, -2.0, 0.0, 0.0]])
        gmax = ascent_step_(x, g, 0.1, backend=backend)
        assert not torch.isfinite(gmax[0]) and gmax[1].item() == 2.0


def test_backend_switch(monkeypatch):
    assert resolve_backend("fallback") == "fallback"
    with pytest.raises(AdvcamError, match="backend"):
        resolve_backend("cuda-please")
    monkeypatch.setattr(fused, "_ext", None)
    monkeypatch.setattr(fused, "_ext_error", "advcam ops: the C++ extension could not be built (simulated)")
    monkeypatch.setattr(fused, "_warned", False)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert resolve_backend("auto") == "fallback"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert resolve_backend("auto") == "fallback"
        a = torch.rand(2, 3, 3)
        assert masked_l1(a, a.flip(0), 0.5).shape == (2,)  # auto -> fallback, still works
    with pytest.raises(AdvcamError, match="simulated"):
        resolve_backend("extension")
    monkeypatch.setenv("ADVCAM_OPS_BACKEND", "fallback")
    assert resolve_backend(None) == "fallback"


def test_sources_found_and_cache_outside_repo(monkeypatch, tmp_path):
    src = fused.source_dir()
    assert (src / "advcam_ops.cpp").is_file() and (src / "advcam_ops_cuda.cu").is_file()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert fused.build_dir(False).parent == tmp_path


def _load_in_subprocess(src: str, timeout: float, stale_lock: bool = False) -> subprocess.CompletedProcess:
    """Load the extension in a fresh process whose sources live in ``src`` (another checkout); with
    ``stale_lock``, that process first writes the ``lock`` file a SIGKILLed build leaves, just before it loads
    (not earlier: any other process that loads the extension, such as another test worker's, would remove it)."""
    code = ("import sys, pathlib; from advcam.ops import fused; "
            f"fused.source_dir = lambda: pathlib.Path({src!r}); "
            + ("(fused.build_dir(fused._want_cuda()) / 'lock').write_text(''); " if stale_lock else "")
            + "ext = fused.load_extension(); print('loaded', ext.__file__)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def test_a_killed_build_does_not_block_the_next_one(ext, tmp_path):
    """torch's builder waits, without a limit, for the ``lock`` file of a build; one killed mid-build leaves it.
    advcam removes it under its own flock (which no dead process holds), so the next load finishes."""
    folder = fused.build_dir(fused._want_cuda())
    src = tmp_path / "csrc"
    shutil.copytree(fused.source_dir(), src)
    try:
        done = _load_in_subprocess(str(src), timeout=240, stale_lock=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_extension waited on the stale {folder / 'lock'}")
    finally:
        (folder / "lock").unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert "removing" in done.stderr and str(folder / "lock") in done.stderr
    assert not (folder / "lock").exists()


@pytest.mark.skipif(fused.environment_ninja() is None, reason="the ninja package is not installed (pip install ninja)")
def test_the_environments_ninja_builds_whatever_ninja_is_first_on_path(ext, tmp_path):
    """Ninja versions hash their build commands differently: a build checked by another version's ninja (a system
    one first on PATH when the venv is not activated) is compiled again, and alternating rebuilds it every time.
    The load uses this environment's ninja whatever PATH says: here a fake ninja first on PATH is never run."""
    fake = tmp_path / "bin" / "ninja"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'fake-ninja-ran'}\nexit 1\n")
    fake.chmod(0o755)
    code = "from advcam.ops import fused; fused.load_extension(); print('loaded')"
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not (tmp_path / "fake-ninja-ran").exists()


def test_another_checkout_reuses_the_build(ext, tmp_path):
    """The same sources under another path (a second clone, a DVC temporary copy) load the cached build: the
    library is not compiled again."""
    folder = fused.build_dir(False)
    libs = sorted(folder.glob("advcam_ops_*.so"))
    assert libs, f"no built library in {folder}"
    before = {p: p.stat().st_mtime_ns for p in libs}
    for name in ("clone-a", "clone-b"):
        src = tmp_path / name / "csrc"
        shutil.copytree(fused.source_dir(), src)
        done = _load_in_subprocess(str(src), timeout=240)
        assert done.returncode == 0, done.stderr
    assert {p: p.stat().st_mtime_ns for p in libs} == before
    assert fused.build_dir(False) == folder  # named after the content, not the path


def test_changed_sources_build_elsewhere(monkeypatch, tmp_path):
    """Edited sources get a folder of their own (the hash of their content), so no build of other sources is
    taken for theirs."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    first = fused.build_dir(False)
    src = tmp_path / "csrc"
    shutil.copytree(fused.source_dir(), src)
    (src / "advcam_ops.cpp").write_text((src / "advcam_ops.cpp").read_text() + "\n// edited\n")
    monkeypatch.setattr(fused, "source_dir", lambda: src)
    assert fused.build_dir(False) != first
    assert fused.build_dir(False).parent == first.parent
