"""Flat vectors and vectors like params: the conversions between the two layouts.

This leaf module (it needs nothing but torch) owns the layout rule of
:mod:`torch_secorder.core.params`, without its checks: a flat vector holds the parameters in
order, each flattened row-major, and :func:`split` cuts it (or a ``(k, P)`` stack of them) into
views shaped like the parameters, :func:`join` concatenates tensors like params back. The
public :func:`~torch_secorder.flatten` and :func:`~torch_secorder.unflatten` check their
arguments and call these; so do the argument checks, which must not import the core.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def split(vector: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Views of a flat ``(P,)`` vector, or of a ``(k, P)`` stack, shaped like ``params``.

    The caller has checked that the last dimension of ``vector`` is the params' total size.
    """
    lead = tuple(vector.shape[:-1])
    parts = vector.split([p.numel() for p in params], dim=-1)
    return [part.reshape((*lead, *p.shape)) for part, p in zip(parts, params)]


def join(tensors: Sequence[Tensor], *, batched: bool = False) -> Tensor:
    """Concatenate tensors like params into a flat ``(P,)`` vector, or ``(k, P)`` when batched.

    With ``batched`` every tensor has the same leading dimension ``k`` (checked by the caller).
    """
    if not batched:
        return torch.cat([t.reshape(-1) for t in tensors])
    k = tensors[0].shape[0]
    return torch.cat([t.reshape(k, math.prod(t.shape[1:])) for t in tensors], dim=1)
