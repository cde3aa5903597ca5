"""CUDA-graph and TF32 plumbing of the AdvCAM climb (:func:`advcam.attribution.advcam.climb_images`).

The climb's speed option ``cuda_graph`` captures step 0, a middle step and the last forward of one setting
(image size, class count, options, model parameters) as CUDA graphs that share one memory pool, keeps them
per model, and replays them for later images of that setting; ``precision`` switches TF32 on (tf32) or off
(fp32, bf16) around the climb on CUDA.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass
class ClimbBuffers:
    """The tensors a climbing step reads and writes in place (static across replays of a CUDA graph)."""

    x: torch.Tensor
    cls: torch.Tensor
    own: torch.Tensor
    rows: torch.Tensor
    a0: torch.Tensor | None = None
    acc: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a0, acc)``, which step 0 sets."""
        if self.a0 is None or self.acc is None:
            raise RuntimeError("ClimbBuffers: step 0 has not run")
        return self.a0, self.acc


class StepGraphs:
    """CUDA graphs of one climbing setting (step 0, a middle step, the last forward) in one memory pool.

    They are replayed in the order they were captured, never concurrently, which is what pool sharing needs;
    each graph's finite flag is copied out right after its replay."""

    def __init__(self, buf: ClimbBuffers):
        self.buf, self.pool = buf, torch.cuda.graph_pool_handle()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.flags: dict[str, torch.Tensor] = {}

    def capture(self, name: str, fn: Callable[[], torch.Tensor]) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.flags[name] = fn()
        self.graphs[name] = graph

    def replay(self, name: str) -> torch.Tensor:
        self.graphs[name].replay()
        return self.flags[name].clone()


GRAPH_CACHE_SIZE = 8  # captured settings kept per model (image size x class count x scale), least recent dropped
_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, StepGraphs]]" = weakref.WeakKeyDictionary()


def clear_graphs(model: nn.Module | None = None) -> None:
    """Drop the cached CUDA graphs (and their device memory) of ``model``, or of every model."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def cached_graphs(model: nn.Module, key: tuple) -> StepGraphs | None:
    entries = _CACHE.get(model)
    if entries is None or key not in entries:
        return None
    entries.move_to_end(key)
    return entries[key]


def store_graphs(model: nn.Module, key: tuple, graphs: StepGraphs) -> None:
    entries = _CACHE.setdefault(model, OrderedDict())
    entries[key] = graphs
    while len(entries) > GRAPH_CACHE_SIZE:
        entries.popitem(last=False)


@contextlib.contextmanager
def tf32_mode(enabled: bool | None) -> Iterator[None]:
    """TF32 tensor-core convolutions and matmuls on (``precision: tf32``) or off (fp32: true float32; bf16), restored
    after; ``None`` (CPU) leaves the flags alone."""
    if enabled is None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


__all__ = ["ClimbBuffers", "StepGraphs", "GRAPH_CACHE_SIZE", "cached_graphs", "store_graphs",
           "clear_graphs", "tf32_mode"]
