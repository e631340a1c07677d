"""Cost measurements of a model: forward FLOPs per image, tensor bytes, and the peak memory of a step.

* **FLOPs** are counted with `torch.utils.flop_counter.FlopCounterMode` on one image: 2 per multiply-add of
  convolutions, matmuls and attention (CPU SDPA added, which the stock registry lacks); norms and elementwise
  ops are not counted.
* **Peak memory** is the high-water mark of tensor bytes held by torch's CPU allocator, read from
  ``torch.profiler`` allocation events (``profile_memory=True``, a private torch API: ``None`` when absent).
  Allocator caching and the Python heap are not included (it is not RSS).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["count_flops", "tensor_bytes", "peak_memory_bytes"]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: torch.nn.Module, sample_shape: Sequence[int], timestep: int = 500) -> int:
    """Forward FLOPs per sample (2 per multiply-add of conv / matmul / attention) with `FlopCounterMode`.

    Args:
        model: a diffusers-style UNet ``model(sample, timestep)``.
        sample_shape: ``(B, C, H, W)`` of the probe input (the result is divided by ``B``).
        timestep: timestep of the probe (FLOPs do not depend on it).

    Returns:
        FLOPs per sample (int).
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    # The stock registry covers the CUDA SDPA kernels only; on CPU SDPA dispatches to this op.
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    param = next(model.parameters())
    batch = int(sample_shape[0])
    x = torch.zeros(tuple(sample_shape), dtype=param.dtype, device=param.device)
    t = torch.full((batch,), int(timestep), dtype=torch.long, device=param.device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(x, t)
    return int(counter.get_total_flops()) // batch


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensor storages among ``tensors`` (an iterable; nested dicts/lists are walked)."""
    seen, total = set(), 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), obj.device)
            if key not in seen and storage.nbytes() > 0:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for item in tensors:
        visit(item)
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints start/stop lines from C++ that Python cannot intercept)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak CPU tensor bytes that ``fn()`` allocates on top of what is live when it starts.

    Reads the allocation events of ``torch.profiler`` (``profile_memory=True``): each carries the allocator's
    running total, so the high-water mark minus the total before the first event is the peak extra memory
    (activations, gradients, temporaries). Returns None if this torch build does not expose the events.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (AttributeError, ImportError):  # private API: degrade to "not measured" rather than guess
        return None
    events = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort(key=lambda e: e[0])
    baseline = events[0][2] - events[0][1]  # the running total just before the first allocation
    return max(0, max(e[2] for e in events) - baseline)
