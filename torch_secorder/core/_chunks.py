"""How many products run in one batched call, and the memory estimate behind that choice.

This module owns the chunk-size rule of :class:`~torch_secorder.core._autograd.GradientGraph`
when a caller does not choose (``chunk_size=None``): the smallest of the number of products,
a default per device type and product size (:func:`device_default`: on the CPU, hundreds of
small products per call, eight of medium ones, 8 to 32 of convolutional ones up to 8 MiB,
and large ones one at a time) and the largest
chunk whose estimated memory fits :data:`CHUNK_MEMORY_BYTES` (:func:`memory_cap`). The
estimate of one product (:func:`product_bytes`) is what the graph of the gradient saved for
backward (:func:`measure`, read off the autograd graph once) plus one cotangent and one
result.
Nothing here is timed, so the same call always makes the same chunks and computes the same
numbers.
"""

import functools
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

CHUNK_MEMORY_BYTES = 2**30
"""Estimated memory one batched chunk of products may use when ``chunk_size=None``."""

DEFAULT_CHUNK_SIZE = {"cpu": 32}
"""Products per batched call by device type when ``chunk_size=None`` (others:
:data:`GPU_CHUNK_SIZE`); on the CPU more while a chunk stays under :data:`CPU_CHUNK_BYTES`,
and fewer for products above :data:`CPU_SMALL_BYTES`."""

CPU_CHUNK_BYTES = 2**24
"""On the CPU a chunk of small products grows past :data:`DEFAULT_CHUNK_SIZE` while its
estimated memory stays under this: such products cost mostly the call itself and keep getting
cheaper in chunks of hundreds."""

CPU_SMALL_BYTES = 2**19
"""On the CPU products above this estimate (512 KiB) run in chunks of
:data:`CPU_MEDIUM_CHUNK`: on one thread, larger chunks of larger products stop paying."""

CPU_MEDIUM_CHUNK = 8
"""Products per call on the CPU for products between :data:`CPU_SMALL_BYTES` and
:data:`CPU_LOOP_BYTES` (:data:`CPU_CONV_LOOP_BYTES` for a graph with a convolution)."""

CPU_LOOP_BYTES = 2**20
"""On the CPU products above this estimate (1 MiB) run one at a time, a loop over the kept
graph, unless the graph convolves (:data:`CPU_CONV_LOOP_BYTES`): measured per vector on one
thread, batching them took up to 1.3 to 2.2 times as long as the loop on tanh MLPs (1 to 14
MiB per product), as ``benchmarks/README.md`` tabulates."""

CPU_CONV_LOOP_BYTES = 2**23
"""On the CPU products of a graph with a convolution run in chunks of about
:data:`CPU_CONV_CHUNK_BYTES` up to this estimate (8 MiB), one at a time above: the double
backward of small convolutions pays mostly per call, and chunks of 8 to 24 took 0.3 to 0.8
times the loop's time per vector on CNNs and a CIFAR ResNet of 1 to 4 MiB per product, as
much as the loop at 8 MiB, and more on a CNN of 65 MiB (``benchmarks/README.md``)."""

CPU_CONV_CHUNK_BYTES = 24 * 2**20
"""On the CPU products of a graph with a convolution above :data:`CPU_SMALL_BYTES` run as
many to a call as fit this estimate (24 MiB), from :data:`CPU_MEDIUM_CHUNK` to
:data:`DEFAULT_CHUNK_SIZE`: measured, the best chunks of such products held 17 to 35 MiB,
and this rule came within 8% of the best chunk on each of five CNNs and a ResNet."""

GPU_CHUNK_SIZE = 1024
"""Most products per batched call on a device type without an entry in
:data:`DEFAULT_CHUNK_SIZE`."""


class Measured(Protocol):
    """A gradient graph as the rule sees it: its parameters, the bytes it saved, its kind."""

    params: list[Tensor]

    @property
    def saved_bytes(self) -> int:
        """Bytes the graph of the gradient saved for backward."""
        ...

    @property
    def convolves(self) -> bool:
        """Whether the graph of the gradient has a convolution."""
        ...


def chunk_size(graph: Measured, count: int, inputs: Sequence[Tensor]) -> int:
    """Products per batched call for ``count`` products when the caller did not choose.

    The smallest of ``count``, the device's default (:func:`device_default`) and
    :func:`memory_cap`: a rule of sizes only, so results never depend on timing. A single
    product does not measure the graph.
    """
    if count <= 1:
        return 1
    default = device_default(inputs[0].device, product_bytes(graph, inputs), graph.convolves)
    return min(count, default, memory_cap(graph, inputs))


def device_default(device: torch.device, per_product: int, convolves: bool = False) -> int:
    """Products per call on ``device`` for products of ``per_product`` bytes, memory aside.

    On the CPU one (a loop) above :data:`CPU_LOOP_BYTES` (:data:`CPU_CONV_LOOP_BYTES` where the
    graph ``convolves``); above :data:`CPU_SMALL_BYTES` :data:`CPU_MEDIUM_CHUNK`, or where the
    graph convolves as many as fit :data:`CPU_CONV_CHUNK_BYTES` (8 to
    :data:`DEFAULT_CHUNK_SIZE`); else :data:`DEFAULT_CHUNK_SIZE` or as many as fit
    :data:`CPU_CHUNK_BYTES` when that is more; elsewhere the device type's entry or
    :data:`GPU_CHUNK_SIZE`.
    """
    default = DEFAULT_CHUNK_SIZE.get(device.type, GPU_CHUNK_SIZE)
    if device.type != "cpu":
        return default
    if per_product > (CPU_CONV_LOOP_BYTES if convolves else CPU_LOOP_BYTES):
        return 1
    if convolves and per_product > CPU_SMALL_BYTES:
        return min(default, max(CPU_MEDIUM_CHUNK, CPU_CONV_CHUNK_BYTES // per_product))
    if per_product > CPU_SMALL_BYTES:
        return CPU_MEDIUM_CHUNK
    return max(default, CPU_CHUNK_BYTES // per_product)


def memory_cap(graph: Measured, inputs: Sequence[Tensor]) -> int:
    """Largest chunk whose estimated memory stays under :data:`CHUNK_MEMORY_BYTES`."""
    return max(1, CHUNK_MEMORY_BYTES // product_bytes(graph, inputs))


def product_bytes(graph: Measured, inputs: Sequence[Tensor]) -> int:
    """Estimated memory of one product in a batched call.

    A batched product holds, per vector, intermediates of the size of what the graph of the
    gradient saved (``graph.saved_bytes``, forward and gradient nodes) and one cotangent
    (like the graph's params) and one result (like ``inputs``). The estimate errs on the
    safe side: a backward pass frees intermediates as it goes (``benchmarks/README.md``
    gives measured peaks against it).
    """
    vector_bytes = sum(t.numel() * t.element_size() for t in (*graph.params, *inputs))
    return max(1, graph.saved_bytes + vector_bytes)


def measure(roots: Sequence[Tensor | None]) -> tuple[int, bool]:
    """The bytes the graph behind ``roots`` saved for backward, and whether it convolves.

    The bytes are those of the distinct storages of the saved tensors; it convolves where a
    convolution is among its nodes. Walks the autograd graph once and reads each node's saved
    tensors (``_saved_*`` fields, ``saved_tensors`` of custom functions). Costs about a tenth
    of a backward pass of a small network; unlike saved-tensor hooks, it adds nothing to the
    products themselves.
    """
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    seen = set(stack)
    storages: dict[int, int] = {}
    convolves = False
    while stack:
        node = stack.pop()
        fields, convolution = _node_kind(type(node))
        convolves = convolves or convolution
        for field in fields:
            try:
                value = getattr(node, field)
            except RuntimeError:  # freed, or not available: nothing to count
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor) and t.layout == torch.strided:
                    storage = t.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        for following, _ in node.next_functions:
            if following is not None and following not in seen:
                seen.add(following)
                stack.append(following)
    return sum(storages.values()), convolves


@functools.cache
def _node_kind(node_type: type) -> tuple[tuple[str, ...], bool]:
    """The fields of a node type holding saved tensors, and whether it is a convolution's.

    A saved tensor (or list of them) ``_saved_x`` comes with its raw ``_raw_saved_x``; the
    other ``_saved_`` fields hold sizes, strides and scalars, not read.
    """
    attributes = set(dir(node_type))
    names = [a for a in sorted(attributes) if a.startswith("_saved_") and "_raw" + a in attributes]
    if "saved_tensors" in attributes:
        names.append("saved_tensors")
    return tuple(names), node_type.__name__.startswith("ConvolutionBackward")
