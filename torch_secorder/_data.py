"""Batches of data: what a batch is, moving its tensors, passing over data without a trace.

This leaf module (it needs nothing but torch) owns the layout of data that the operator over
a data set, its argument checks and the command line share: a batch is a pair
``(inputs, targets)`` whose targets are a tensor (:func:`is_batch`); its tensors, however
nested, move to a device and optionally a floating dtype with :func:`to_device`; and a pass
over data runs under :func:`rng_kept`, so that making a DataLoader's iterator (which draws its
workers' base seed) leaves the global RNG as it was.
"""

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def is_batch(data: object) -> bool:
    """Whether ``data`` is one batch: a pair ``(inputs, targets)`` whose targets are a tensor."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move the tensors of a (nested) batch to ``device``, floating ones also to ``dtype``.

    Tuples, named tuples, lists and mappings keep their type; other objects pass unchanged,
    and so does a tensor already on ``device`` (and of ``dtype``).
    """
    if isinstance(obj, Tensor):
        cast = dtype if dtype is not None and obj.is_floating_point() else obj.dtype
        if obj.device == device and obj.dtype == cast:
            return obj
        return obj.to(device=device, dtype=cast, non_blocking=True)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device, dtype) for key, value in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_device(value, device, dtype) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(value, device, dtype) for value in obj)
    return obj


def rng_kept() -> contextlib.AbstractContextManager[None]:
    """Keep iterating data from advancing the global RNG.

    A DataLoader draws the base seed of its workers from the global RNG whenever an iterator
    is made; the library's passes over data restore the RNG state after, so that they leave
    no trace and every pass draws the same seeds.
    """
    return torch.random.fork_rng(devices=[])
