r"""The memory an analysis may take, planned before any product.

An analysis holds vectors of the operator's size :math:`P` (:math:`4P` bytes in float32): the
vectors it keeps (Hutch++'s sketch, XTrace's and XDiag's five blocks of :math:`s`, a Lanczos
basis, the quadrature's bases) and one chunk of columns going to the operator with its
products (:func:`max_columns`). Its budget, ``max_bytes`` of the public function, defaults to
a fifth of the machine's memory (:func:`default_max_bytes`), which leaves the model, its
activations and the rest of the process room beside it; the chunk takes at most a
sixteenth of it (:data:`CHUNK_SHARE`), and the algorithm sizes what it keeps to the rest
(:func:`kept_vectors`): fewer sketch vectors, a smaller Lanczos basis, fewer quadrature
probes at a time. Where even the least it needs does not fit, it refuses before any product,
with the estimate (:func:`refuse`).
What the operator itself takes per product (a batch's activations and gradient graph) is its
own: the chunk rule of the core bounds it.

The budget is set for the duration of a public call (:func:`memory_budget`, a context
variable, so threads and nested calls keep their own).
"""

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from torch_secorder._checks import format_bytes

BLOCK_BYTES = 2**30
"""Most memory of one chunk of columns handed to the operator (and of its products)."""

MEMORY_SHARE = 0.2
"""Share of the machine's memory (or of a GPU's) an analysis takes by default: of the total, not
of what is free, so that the plan (and with it the numbers) does not depend on earlier calls."""

CHUNK_SHARE = 16
"""A chunk of columns takes at most this fraction of the budget (with its products, twice).
At a sixteenth, Hutch++ on a ResNet-18 of 1000 classes (11.7M parameters, batch 8, float32)
peaks at 2.5 GiB with 24 GiB of memory, 3.1 GiB at an eighth; a narrower chunk costs passes
over the data, not products (a large network's products run one at a time)."""

_BUDGET: ContextVar[tuple[str, int | None] | None] = ContextVar("budget", default=None)


def default_max_bytes(device: torch.device) -> int:
    """A fifth of the physical memory of the CPU, or of a GPU's memory."""
    if device.type == "cuda":
        return int(MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume 16 GiB
        total = 2**34
    return int(MEMORY_SHARE * total)


@contextlib.contextmanager
def memory_budget(fname: str, max_bytes: int | None) -> Iterator[None]:
    """Run the block (a public analysis ``fname``) under its ``max_bytes``."""
    token = _BUDGET.set((fname, max_bytes))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current(device: torch.device) -> tuple[str, int]:
    """The analysis's name and budget in bytes (its default for ``device`` where unset)."""
    fname, max_bytes = _BUDGET.get() or ("analysis", None)
    return fname, default_max_bytes(device) if max_bytes is None else max_bytes


def _vector_bytes(n: int, dtype: torch.dtype) -> int:
    return n * torch.finfo(dtype).bits // 8


def max_columns(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Columns of size ``n`` in one chunk: :data:`BLOCK_BYTES`, or a sixteenth of the budget."""
    _, max_bytes = current(device)
    return max(1, min(BLOCK_BYTES, max_bytes // CHUNK_SHARE) // _vector_bytes(n, dtype))


def kept_vectors(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Vectors of size ``n`` an algorithm may keep besides a chunk and its products."""
    _, max_bytes = current(device)
    chunk = 2 * max_columns(n, dtype, device) * _vector_bytes(n, dtype)
    return max(0, (max_bytes - chunk) // _vector_bytes(n, dtype))


def check_room(what: str, vectors: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse where ``vectors`` kept vectors, one column and its product do not fit.

    For algorithms whose plan has nothing to shrink but the chunk (:func:`max_columns`);
    the error is :func:`refuse`'s.
    """
    _, max_bytes = current(device)
    if (vectors + 2) * _vector_bytes(n, dtype) > max_bytes:
        raise refuse(what, vectors, n, dtype, device)


def check_diagonal_room(exact: bool, n: int, dtype: torch.dtype, device: torch.device) -> None:
    """:func:`check_room` of ``method="exact"`` (or ``"auto"``): the diagonal's ``n`` entries.

    The least of ``"auto"``'s choices too: every estimator keeps more.
    """
    check_room(f"method={'exact' if exact else 'auto'!r}", 1, n, dtype, device)


def refuse(what: str, vectors: int, n: int, dtype: torch.dtype, device: torch.device) -> ValueError:
    """The error of an analysis whose least plan does not fit its budget."""
    fname, max_bytes = current(device)
    need = (vectors + 2 * max_columns(n, dtype, device)) * _vector_bytes(n, dtype)
    least = (
        f"at least {vectors} vectors of P={n:,} entries besides a chunk of products"
        if vectors
        else f"a chunk of products (vectors of P={n:,} entries)"
    )
    return ValueError(
        f"{fname}: {what} needs {least}, about {format_bytes(need)}, more than max_bytes="
        f"{format_bytes(max_bytes)}; raise max_bytes or analyse fewer parameters (params=, "
        "groups=)."
    )
