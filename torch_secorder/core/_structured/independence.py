r"""Checks that positions along an axis are independent: exact zeros, every ordered pair.

Along an axis of length :math:`n`, each index gets a distinct code, a subset of
:math:`\{0, \dots, m-1\}` of size :math:`\lfloor m/2 \rfloor`, with :math:`m` the smallest
such that :math:`\binom{m}{\lfloor m/2 \rfloor} \ge n`; set :math:`S_k` holds the indices
whose code has :math:`k`. No code contains another, so for every ordered pair :math:`a \ne b`
some set holds :math:`b` and not :math:`a`. One product (or backward pass) per set, with a
random cotangent on :math:`S_k`, must leave exact zeros outside :math:`S_k`: then the block
from :math:`S_k` to every other index vanishes, so every block between two different indices
does, in both directions, whether or not the matrix is symmetric (a Jacobian is not). That is
:math:`m \approx \log_2 n + \tfrac12 \log_2 \log_2 n + 1` checks (4 for 4 samples, 5 for 8,
10 for 128, 13 for 1024); one sample needs none. A random combination that is exactly zero
where the block is not would need an exact cancellation, which random cotangents rule out
(their values are drawn from a fixed generator, so the check is repeatable).
"""

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torch_secorder.core._autograd import GradientGraph


def count(length: int) -> int:
    """The number of checks along an axis of ``length`` indices."""
    m = 0
    while math.comb(m, m // 2) < length:
        m += 1
    return m


def membership(length: int, device: torch.device) -> Tensor:
    """``(count(length), length)``: row :math:`k` marks the indices of :math:`S_k`."""
    return _membership(length).to(device)


@functools.lru_cache(maxsize=64)
def _membership(length: int) -> Tensor:
    m = count(length)
    rows = [[False] * length for _ in range(m)]
    for index, code in zip(range(length), itertools.combinations(range(m), m // 2)):
        for k in code:
            rows[k][index] = True
    return torch.tensor(rows, dtype=torch.bool).reshape(m, length)


def inside(tensor: Tensor, axis: int) -> Tensor:
    """Per set along ``axis``, where ``tensor``'s index is in it (broadcast elsewhere)."""
    sets = membership(tensor.shape[axis], tensor.device)
    shape = [1] * tensor.dim()
    shape[axis] = tensor.shape[axis]
    return sets.reshape(len(sets), *shape)


def random_on(inside: Tensor, tensor: Tensor, generator: torch.Generator) -> Tensor:
    """Random values like ``tensor`` for each set, zero outside it."""
    random = torch.randn((len(inside), *tensor.shape), generator=generator, dtype=tensor.dtype)
    return random.to(tensor.device) * inside


def outside_nonzero(inside: Tensor, result: Tensor) -> bool:
    """Whether ``result`` is not exactly zero outside the set."""
    return bool(torch.where(inside, 0, result).ne(0).any())


def hessian_reached(
    graph: GradientGraph, members: Sequence[tuple[int, Tensor, int]], chunk_size: int | None
) -> set[int]:
    """Members ``(probe index, probe, axis)`` whose Hessian blocks couple different indices.

    The members' axes have one length; one product per set, with a cotangent random on
    every member's set: a member is coupled when its product is not exactly zero outside
    the set. The zeros hold the blocks of each member with every member, its own included.
    """
    generator = torch.Generator().manual_seed(0)
    insides = [inside(probe, axis) for _, probe, axis in members]
    randoms = [random_on(s, probe, generator) for s, (_, probe, _) in zip(insides, members)]
    position = {index: k for k, (index, _, _) in enumerate(members)}

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        return [
            randoms[position[j]][start:stop] if j in position else None
            for j in range(len(graph.params))
        ]

    probes = [probe for _, probe, _ in members]
    checks = len(insides[0]) if insides else 0
    coupled: set[int] = set()
    if checks == 0:
        return coupled
    for start, stop, products in graph.product_chunks(
        checks, cotangents, probes, chunk_size=chunk_size
    ):
        for (index, _, _), sets, product in zip(members, insides, products):
            if outside_nonzero(sets[start:stop], product):
                coupled.add(index)
    return coupled
