r"""``Linear``: :math:`z = x W^\top + b`, an ``addmm`` or ``mm`` of the flattened input.

PyTorch records ``F.linear`` as ``addmm(b, x, W^T)`` (then a view back to the input's leading
axes), or, for an input it cannot flatten in place, ``mm(x, W^T)`` then a view and an ``add``
of the bias; without a bias, ``mm`` and a view. The input is the matrix product's saved
operand; one group, :math:`F` input features.
"""

import math
from collections.abc import Callable

from torch import Tensor, nn

from torch_secorder.core._structured.rules.base import (
    Layout,
    child,
    layout,
    leaf_chain,
    node_name,
    own,
    saved,
)

_VIEWS = ("View", "UnsafeView", "Squeeze", "Reshape", "ReshapeAlias")


class LinearRule:
    """The rule of ``nn.Linear``."""

    types = (nn.Linear,)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        weight, bias = own(module, "weight"), own(module, "bias")
        path = [output.grad_fn]  # from the output down to the matrix product
        chains = {}
        if node_name(path[-1]) == "Add":  # the bias added after mm
            if saved(path[-1], "alpha") != 1:
                return "its output adds the bias with a scale"
            chains["bias"] = leaf_chain(path[-1], 1, bias)
            path.append(child(path[-1], 0))
        if node_name(path[-1]) in _VIEWS:
            path.append(child(path[-1], 0))
        op = path[-1]
        name = node_name(op)
        if name == "Addmm":
            if saved(op, "alpha") != 1 or saved(op, "beta") != 1 or "bias" in chains:
                return "its output is a scaled matrix product"
            slot, x = 2, saved(op, "mat1")
        elif name == "Mm":
            slot, x = 1, saved(op, "self")
        else:
            return f"its output comes from {type(op).__name__}, not from a linear map"
        above = path[-2::-1]  # the nodes from the product up to the output
        chains["weight"] = leaf_chain(op, slot, weight, via=["T"], above=above)
        if name == "Addmm":
            chains["bias"] = leaf_chain(op, 0, bias, above=above)
        units = output.shape[-1] if output.dim() else 0
        for p in (weight, bias):
            if p is not None and p.shape[0] != units:
                return "its output's last axis is not its units"
        features: Callable[[], Tensor] | None = None
        if chains.get("weight"):
            if not isinstance(x, Tensor) or x.dim() != 2:
                return "its input is not recorded"
            lead = output.shape[:-1]
            if x.shape[0] != math.prod(lead):
                return "its output's positions are not its input's"
            features = lambda: x.reshape(*lead, 1, x.shape[1])  # noqa: E731
        return layout(output.dim() - 1, features, module, chains)
