r"""Random probe vectors drawn from a :class:`torch.Generator`, never from the global RNG.

Probes are drawn on the generator's device and moved to the operator's device, so a CPU
generator gives the same probes on every device. ``generator=None`` in the public functions
means a private generator seeded with :data:`DEFAULT_SEED`: results are reproducible by
default, and a passed generator gives independent runs.
"""

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_SEED",
    "gaussian",
    "make_generator",
    "rademacher",
    "rademacher_columns",
    "spawn",
]

DEFAULT_SEED = 0
"""Seed of the private generator used when ``generator=None``."""

_DRAW_DTYPES = (torch.float32, torch.float64)

_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) * 2.0 - 1
"""Row ``b``: the signs :math:`2 \\cdot \\text{bit} - 1` of the eight bits of the byte ``b``."""

_SHORT = 2**16
"""Signs :func:`rademacher` looks up at once (more: a row at a time, into the result)."""


def make_generator(generator: torch.Generator | None) -> torch.Generator:
    """Return ``generator``, or a fresh CPU generator seeded with :data:`DEFAULT_SEED`."""
    if generator is None:
        return torch.Generator().manual_seed(DEFAULT_SEED)
    return generator


def spawn(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """Derive ``count`` independent generators (on ``generator``'s device) from ``generator``.

    Their seeds are drawn from ``generator`` in order, so the ``i``-th derived generator does
    not depend on how many numbers the others draw.
    """
    seeds = torch.randint(2**62, (count,), generator=generator, device=generator.device)
    return [torch.Generator(generator.device).manual_seed(int(s)) for s in seeds.tolist()]


def rademacher(
    generator: torch.Generator,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    out: Tensor | None = None,
) -> Tensor:
    r"""Independent signs :math:`\pm 1` with equal probability.

    Each row (the last dimension, of size :math:`n`) takes :math:`\lceil n/8 \rceil` random
    bytes, each byte giving eight signs through a table of the 256 sign patterns: an eighth
    of the draws and no temporary of the result's size (drawing one integer per sign and
    converting it took six times as long as the table lookup).

    Args:
        generator: Source of randomness.
        shape: Shape of the result.
        dtype: Floating dtype of the result.
        device: Device of the result.
        out: Tensor of ``shape``, ``dtype`` and ``device`` to write into, its rows
            contiguous; ``None`` for a new one.

    Returns:
        A tensor of ``shape`` with entries :math:`\pm 1` (``out``, where given).
    """
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    n = shape[-1] if shape else 1
    rows = out.view(-1, n)
    whole, rest = divmod(n, 8)
    codes = torch.randint(
        0,
        256,
        (len(rows), whole + (rest > 0)),
        generator=generator,
        device=generator.device,
        dtype=torch.uint8,
    ).to(device)
    signs = _SIGNS.to(device=device, dtype=dtype)
    if rows.numel() <= _SHORT:
        rows.copy_(signs[codes.long()].view(len(rows), -1)[:, :n])
        return out
    for row, code in zip(rows, codes):
        index = code.to(torch.int32)
        torch.index_select(signs, 0, index[:whole], out=row[: 8 * whole].view(whole, 8))
        if rest:
            row[8 * whole :] = signs[index[whole], :rest]
    return out


def gaussian(
    generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    r"""Independent standard normal entries.

    Args:
        generator: Source of randomness.
        shape: Shape of the result.
        dtype: Floating dtype of the result (drawn in float32 and cast for lower precisions).
        device: Device of the result.

    Returns:
        A tensor of ``shape`` with :math:`\mathcal N(0, 1)` entries.
    """
    draw = dtype if dtype in _DRAW_DTYPES else torch.float32
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=draw)
    return sample.to(device=device, dtype=dtype)


def rademacher_columns(
    generator: torch.Generator, n: int, k: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``k`` Rademacher probes of dimension ``n`` as the columns of an ``(n, k)`` matrix.

    The probes are drawn one after another, so drawing ``k`` at once or in chunks of any size
    gives the same probes.
    """
    return rademacher(generator, (k, n), dtype, device).T
