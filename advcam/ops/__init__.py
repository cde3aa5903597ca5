"""advcam.ops: fused AdvCAM kernels (C++/CUDA in ``csrc/``) with a pure-PyTorch fallback.

See :mod:`advcam.ops.fused` for the maths, the backend switch (auto|extension|fallback) and the build cache.
"""
from advcam.ops.fused import (BACKENDS, ascent_step_, ascent_step_eager_, load_extension, masked_l1,
                              masked_l1_eager, resolve_backend, source_dir)

__all__ = ["BACKENDS", "ascent_step_", "ascent_step_eager_", "load_extension", "masked_l1", "masked_l1_eager",
           "resolve_backend", "source_dir"]
