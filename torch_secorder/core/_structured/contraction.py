r"""A layer rule's products, and their contraction into the diagonal of the layer's parameters.

With :math:`B^{(u)}` the Hessian of the loss with respect to unit :math:`u` of the layer's
output over its positions, an affine layer :math:`z_{au} = \sum_f W_{uf} X^{(u)}_{af} + b_u`
has exactly

.. math::
    \frac{\partial^2 L}{\partial W_{uf}^2} = \sum_{a,b} X^{(u)}_{af} X^{(u)}_{bf} B^{(u)}_{ab},
    \qquad \frac{\partial^2 L}{\partial b_u^2} = \sum_{a,b} B^{(u)}_{ab},

and a lookup :math:`z_{au} = W_{x_a u}` has :math:`\partial^2 L / \partial W_{vu}^2 =
\sum_{a,b: x_a = x_b = v} B^{(u)}_{ab}`. Along the *independent* axes :math:`B^{(u)}`
vanishes between different indices, so one product with the cotangent 1 at unit :math:`u` and
at a position :math:`c` of the *coupled* axes, at every index of the independent axes, gives
the rows of :math:`B^{(u)}` of all independent indices at once: :math:`U \cdot C` products for
:math:`U` units and :math:`C` coupled positions.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._structured.rules import Layout

CONTRACTION_ELEMENTS = 2**25
"""Most elements of one intermediate of the contraction (chunks of products are split)."""


@dataclass(frozen=True)
class Rule:
    """How a layer's blocks are read: which output axes are independent, and at what cost."""

    independent: list[int]
    coupled: list[int]
    units: int
    count: int  # products


def apply(
    graph: GradientGraph,
    probe_index: int,
    layout: Layout,
    features: Tensor | None,
    rule: Rule,
    chunk_size: int | None,
) -> dict[str, Tensor]:
    """Run the rule's products and contract them; the diagonal of each role's parameter."""
    probe = graph.params[probe_index]
    axes = [a for a in range(probe.dim()) if a != layout.unit]
    order = [*rule.independent, *rule.coupled]
    sizes = [probe.shape[a] for a in order]
    inner = math.prod(sizes[: len(rule.independent)])
    outer = math.prod(sizes[len(rule.independent) :])
    permutation = [*order, layout.unit]
    inverse = [0] + [1 + permutation.index(a) for a in range(probe.dim())]
    weight = bias = values = None
    if layout.lookup:
        tokens = features.permute(order).reshape(inner, outer)  # type: ignore[union-attr]
        values = probe.new_zeros(layout.parameters["weight"].shape)  # (V, U)
    else:
        bias = probe.new_zeros(rule.units)
        if features is not None:
            features = features.permute(*[axes.index(a) for a in order], -2, -1)
            features = features.reshape(inner, outer, *features.shape[-2:])  # (I, C, G, F)
            weight = probe.new_zeros(rule.units, features.shape[3])
            per_group = rule.units // features.shape[2]

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        k = torch.arange(stop - start, device=probe.device)
        products = torch.arange(start, stop, device=probe.device)
        units = probe.new_zeros(stop - start, inner, outer, rule.units)
        units[k, :, products // rule.units, products % rule.units] = 1
        stacked = units.reshape(stop - start, *(probe.shape[a] for a in permutation))
        unit_vectors = stacked.permute(inverse)
        return [unit_vectors if j == probe_index else None for j in range(len(graph.params))]

    chunks = graph.product_chunks(rule.count, cotangents, [probe], chunk_size=chunk_size)
    with torch.no_grad():
        for start, stop, (products,) in chunks:
            rows = products.permute(0, *(1 + a for a in permutation))
            rows = rows.reshape(stop - start, inner, outer, rule.units)
            index = torch.arange(start, stop, device=rows.device)
            positions, units = index // rule.units, index % rule.units
            selected = rows[torch.arange(stop - start, device=rows.device), :, :, units]
            if values is not None:
                _lookup_rows(values, tokens, selected, positions, units)
                continue
            bias.index_add_(0, units, selected.sum(dim=(1, 2)))  # type: ignore[union-attr]
            if weight is None:
                continue
            for part in _parts(stop - start, inner * outer * features.shape[3]):  # type: ignore[union-attr]
                groups = units[part] // per_group
                _affine_rows(weight, features, selected[part], positions[part], units[part], groups)  # type: ignore[arg-type]
    if values is not None:
        if layout.padding_row is not None:
            values[layout.padding_row] = 0  # its gradient is masked: no curvature
        return {"weight": values}
    return shaped(layout, weight, bias)


def shaped(layout: Layout, weight: Tensor | None, bias: Tensor) -> dict[str, Tensor]:
    """The sums ``(U, F)`` and ``(U,)`` shaped like the layout's parameters, by role."""
    sums = {"weight": weight, "bias": bias}
    return {
        role: sums[role].reshape(p.shape)  # type: ignore[union-attr]
        for role, p in layout.parameters.items()
        if sums[role] is not None
    }


def _parts(count: int, per_product: int) -> list[slice]:
    """Split ``count`` products so that one part's intermediates stay bounded."""
    size = max(1, CONTRACTION_ELEMENTS // max(1, per_product))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _affine_rows(
    weight: Tensor,
    features: Tensor,
    rows: Tensor,
    positions: Tensor,
    units: Tensor,
    groups: Tensor,
) -> None:
    r"""Add products' contributions to the weight's diagonal.

    ``rows`` is ``(k, I, C)``: row ``positions[k]`` of the block of ``units[k]``, for every
    independent index; each adds :math:`X_{cf} \sum_{c'} B_{cc'} X_{c'f}` summed over the
    independent indices.
    """
    if features.shape[2] == 1:  # one group: every unit sees the same input
        x = features[:, :, 0, :]  # (I, C, F)
        if x.shape[1] == 1:  # no coupled positions: a matrix product
            contributions = rows[:, :, 0] @ x[:, 0, :].square()
        else:
            paired = torch.bmm(rows.transpose(0, 1), x)  # (I, k, F)
            contributions = (x[:, positions, :] * paired).sum(dim=0)
    else:
        seen = features.index_select(2, groups)  # (I, C, k, F)
        k = torch.arange(len(units), device=rows.device)
        paired = torch.einsum("kic,ickf->kif", rows, seen)
        own = seen[:, positions, k, :]  # (I, k, F)
        contributions = torch.einsum("ikf,kif->kf", own, paired)
    weight.index_add_(0, units, contributions)


def _lookup_rows(
    values: Tensor, tokens: Tensor, rows: Tensor, positions: Tensor, units: Tensor
) -> None:
    """Add products' contributions to a lookup's diagonal: pairs of equal indices."""
    own = tokens[:, positions]  # (I, k): the row each product's position looks up
    same = tokens.unsqueeze(1) == own.unsqueeze(-1)  # (I, k, C)
    sums = torch.einsum("kic,ikc->ki", rows, same.to(rows.dtype))
    k, inner = sums.shape
    values.index_put_(
        (own.T.reshape(-1), units.repeat_interleave(inner)), sums.reshape(-1), accumulate=True
    )
