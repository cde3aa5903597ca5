"""Fused AdvCAM ops: the C++/CUDA extension in ``csrc/`` (JIT-built with ninja, cached) or pure PyTorch.

Two ops cover one climbing step outside the network:

* :func:`masked_l1` - ``loss_i = sum_j |a_ij - a0_ij| * M_ij`` with ``M_ij = 1(a_ij / max_j a_ij > tau)``,
  differentiable w.r.t. ``a`` (the mask is a constant, as in the reference), and, when ``acc`` is given,
  ``acc += a`` in the same pass (the accumulation of the maps of ``x_0 .. x_{T-1}``).
* :func:`ascent_step_` - in place, per class ``i``:
  ``x_i = clamp(x_i + xi * g_i / (max|g_i| + 1e-12), min x_i, max x_i)`` (min/max of ``x_i`` before the update);
  returns ``max|g_i|`` so callers can spot non-finite gradients without another pass.

They are two ops, not one, because the ascent step needs the input gradient, which only exists after the
backward through the network that consumes the L1 term. Both view their inputs as ``(n, -1)``: one segment
per class.

Backend selection (``backend`` argument, or ``ADVCAM_OPS_BACKEND``; default ``auto``):
``extension`` builds/loads the extension and raises :class:`AdvcamError` if that fails; ``fallback`` uses the
eager PyTorch composition; ``auto`` tries the extension and falls back (warning once) when it cannot be built
or was built without CUDA for a CUDA tensor. The build goes to ``$TORCH_EXTENSIONS_DIR/advcam_ops-...``
(default ``~/.cache/advcam/torch_extensions``), outside the repository, in a folder named after the torch
version and a hash of the sources and flags. The sources are copied into that folder and compiled from there,
so every checkout with the same sources (other clones, DVC's temporary copies) reuses one build instead of
rebuilding for its own paths. Builds are serialised by a lock that dies with its process (``flock``), and a
lock file that torch's builder left behind when it was killed is removed, so a killed build never makes the
next run wait forever.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Optional

import torch

from advcam.utils.errors import AdvcamError

BACKENDS = ("auto", "extension", "fallback")
SOURCES = ("advcam_ops.cpp", "advcam_ops_cuda.cu")

_lock = threading.Lock()
_ext: Optional[ModuleType] = None
_ext_error: Optional[str] = None
_warned = False


def source_dir() -> Path:
    """Folder with the C++/CUDA sources: ``<repo>/csrc`` in a checkout, ``advcam/ops/csrc`` when installed."""
    here = Path(__file__).resolve().parent
    for cand in (here.parents[1] / "csrc", here / "csrc"):
        if (cand / SOURCES[0]).is_file():
            return cand
    raise AdvcamError(f"advcam ops: C++ sources not found (looked in {here.parents[1] / 'csrc'} and {here / 'csrc'})")


CFLAGS = ("-O3",)
CUDA_CFLAGS = ("-O3", "--expt-relaxed-constexpr")


def _sources(with_cuda: bool) -> list[Path]:
    src = source_dir()
    return [src / SOURCES[0]] + ([src / SOURCES[1]] if with_cuda else [])


def build_dir(with_cuda: bool) -> Path:
    """Where the compiled extension is cached (created if missing): one folder per torch version, device kind
    and content of the sources and flags."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "advcam", "torch_extensions")
    digest = hashlib.sha1(repr((CFLAGS, CUDA_CFLAGS)).encode())
    for path in _sources(with_cuda):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    tag = f"advcam_ops-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:12]}"
    path = Path(base) / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.advcam-build.lock`` (``flock``: released when the process ends, also by SIGKILL).

    torch's builder marks a build with a ``lock`` file and makes every other process wait, without a limit,
    until it disappears; a builder killed mid-build leaves it behind. Every advcam build takes this lock
    first, so a ``lock`` file found while holding it belongs to no live build and is removed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file only
        yield
        return
    with open(folder / ".advcam-build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                warnings.warn(f"advcam ops: removing {stale}, left by a build that was killed", RuntimeWarning,
                              stacklevel=3)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _copy_sources(with_cuda: bool, folder: Path) -> list[str]:
    """Copy the sources into ``folder/src`` (only files whose content differs, so ninja sees them unchanged)
    and return their paths there."""
    (folder / "src").mkdir(exist_ok=True)
    out = []
    for path in _sources(with_cuda):
        dest = folder / "src" / path.name
        data = path.read_bytes()
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        out.append(str(dest))
    return out


def environment_ninja() -> Path | None:
    """The folder of the ``ninja`` that belongs to this Python environment (the ``ninja`` package, a dependency),
    or None where it is missing."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    return Path(folder) if folder and (Path(folder) / "ninja").is_file() else None


@contextlib.contextmanager
def ninja_first_on_path() -> Iterator[None]:
    """Put this environment's ``ninja`` first on ``PATH`` while torch builds (torch runs whichever ``ninja`` is first
    on ``PATH``). Ninja versions hash their commands differently, so a build checked by another version's ninja
    (a system ``/usr/bin/ninja`` when the venv is not activated) is compiled again (20 s to a minute) although
    nothing changed, and alternating between the two rebuilds it every time."""
    folder = environment_ninja()
    if folder is None:
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(folder), *([before] if before else [])])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first call; about 20 s) or load the cached extension. Raises AdvcamError if it cannot be built."""
    global _ext, _ext_error
    with _lock:
        if _ext is not None:
            return _ext
        if _ext_error is not None:
            raise AdvcamError(_ext_error)
        try:
            from torch.utils.cpp_extension import load
            with_cuda = _want_cuda()
            folder = build_dir(with_cuda)
            flags = list(CFLAGS) + (["-DWITH_CUDA"] if with_cuda else [])
            with build_lock(folder), ninja_first_on_path():
                _ext = load(name=f"advcam_ops_{'cuda' if with_cuda else 'cpu'}",
                            sources=_copy_sources(with_cuda, folder), extra_cflags=flags,
                            extra_cuda_cflags=list(CUDA_CFLAGS), build_directory=str(folder), with_cuda=with_cuda,
                            verbose=verbose)
        except Exception as err:  # compiler missing, headers missing, ...: remember, report once
            _ext_error = f"advcam ops: the C++ extension could not be built ({type(err).__name__}: {err})"
            raise AdvcamError(_ext_error) from err
        return _ext


def resolve_backend(backend: str | None = None, device: torch.device | None = None) -> str:
    """``extension`` or ``fallback`` for ``backend`` in auto|extension|fallback (None: ``ADVCAM_OPS_BACKEND``)."""
    global _warned
    name = backend or os.environ.get("ADVCAM_OPS_BACKEND", "auto")
    if name not in BACKENDS:
        raise AdvcamError(f"cam.advcam.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "fallback":
        return name
    try:
        ext = load_extension()
    except AdvcamError as err:
        if name == "extension":
            raise
        if not _warned:
            warnings.warn(f"{err}; using the pure-PyTorch fallback", RuntimeWarning, stacklevel=2)
            _warned = True
        return "fallback"
    if device is not None and device.type == "cuda" and not ext.has_cuda():
        if name == "extension":
            raise AdvcamError("advcam ops: the extension was built without CUDA (no CUDA_HOME?); "
                              "use backend 'fallback' or 'auto'")
        return "fallback"
    if device is not None and device.type not in ("cpu", "cuda"):
        if name == "extension":
            raise AdvcamError(f"advcam ops: the extension has no kernels for device {device}")
        return "fallback"
    return "extension"


# ----------------------------------------------------------------------------------------- pure PyTorch
def masked_l1_eager(a: torch.Tensor, a0: torch.Tensor, tau: float, acc: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager composition of :func:`masked_l1` (autograd does the backward).

    ``mask`` (bool, shape of ``a``), when given, is OR-ed into the mask and updated in place: the
    cumulative-mask option (a deviation from the reference, which recomputes the mask every step).
    """
    n = a.shape[0]
    ad = a.detach()
    amax = ad.reshape(n, -1).amax(1).view(n, *([1] * (a.dim() - 1)))
    m = ad / amax > tau
    if mask is not None:
        mask |= m
        m = mask.clone()
    loss = ((a - a0).abs() * m.to(a.dtype)).reshape(n, -1).sum(1)
    if acc is not None:
        acc += ad
    return loss


@torch.no_grad()
def ascent_step_eager_(x: torch.Tensor, g: torch.Tensor, xi: float) -> torch.Tensor:
    """Eager composition of :func:`ascent_step_` (updates ``x`` in place, returns ``max|g|`` per class)."""
    n = x.shape[0]
    xf, gf = x.view(n, -1), g.reshape(n, -1)
    gmax = gf.abs().amax(1)
    lo, hi = xf.amin(1, keepdim=True), xf.amax(1, keepdim=True)
    xf.copy_(torch.clamp(xf + xi * (gf / (gmax + 1e-12)[:, None]), lo, hi))
    return gmax


# ----------------------------------------------------------------------------------------- extension
class _MaskedL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, a0: torch.Tensor, tau: float,  # type: ignore[override]
                acc: torch.Tensor | None) -> torch.Tensor:
        a, a0 = a.contiguous(), a0.detach().contiguous()
        loss, amax = load_extension().masked_l1_forward(a, a0, acc, float(tau))
        ctx.save_for_backward(a, a0, amax)
        ctx.tau = float(tau)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        a, a0, amax = ctx.saved_tensors
        ga = load_extension().masked_l1_backward(grad.contiguous(), a, a0, amax, ctx.tau)
        return ga.view_as(a), None, None, None


def masked_l1(a: torch.Tensor, a0: torch.Tensor, tau: float, acc: torch.Tensor | None = None,
              backend: str | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class masked L1 ``(n,)`` of ``a`` (n, ...) against ``a0``; ``acc += a`` when ``acc`` is given.

    ``mask`` selects the cumulative-mask deviation (eager path only; see :func:`masked_l1_eager`).
    """
    if a.shape != a0.shape or a.dim() < 1 or a.numel() == 0:
        raise ValueError(f"masked_l1: expected equal non-empty shapes, got {tuple(a.shape)} and {tuple(a0.shape)}")
    if acc is not None and (acc.shape != a.shape or not acc.is_contiguous()):
        raise ValueError("masked_l1: acc must be a contiguous tensor shaped like a")
    use_ext = (mask is None and a.dtype in (torch.float32, torch.float64)
               and resolve_backend(backend, a.device) == "extension")
    if not use_ext:
        return masked_l1_eager(a, a0, tau, acc, mask)
    return _MaskedL1.apply(a, a0, float(tau), acc)


def ascent_step_(x: torch.Tensor, g: torch.Tensor, xi: float, backend: str | None = None) -> torch.Tensor:
    """In-place normalised ascent step with clamp on ``x`` (n, ...); returns ``max|g|`` per class ``(n,)``."""
    if x.shape != g.shape or x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"ascent_step_: expected equal non-empty shapes, got {tuple(x.shape)} and {tuple(g.shape)}")
    if (x.is_contiguous() and x.dtype in (torch.float32, torch.float64) and g.dtype == x.dtype
            and resolve_backend(backend, x.device) == "extension"):
        with torch.no_grad():
            return load_extension().ascent_step_(x, g, float(xi))
    return ascent_step_eager_(x, g, xi)
