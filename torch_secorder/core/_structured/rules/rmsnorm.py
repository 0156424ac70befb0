r"""RMSNorm over the last axis: :math:`z_{a u} = w_u \hat x_{a u}`, a product with the weight.

PyTorch computes ``nn.RMSNorm`` as the normalised input times the weight; the normalised
input is the product node's saved other operand. A fused kernel, or a norm over several
trailing axes, is refused.
"""

import functools

from torch import Tensor, nn

from torch_secorder.core._structured.rules.base import (
    Layout,
    layout,
    leaf_chain,
    node_name,
    own,
    saved,
)


class RMSNormRule:
    """The rule of ``nn.RMSNorm`` (PyTorch 2.4 and later)."""

    types: tuple[type[nn.Module], ...] = tuple(filter(None, [getattr(nn, "RMSNorm", None)]))

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        op, weight = output.grad_fn, own(module, "weight")
        if node_name(op) != "Mul":
            return f"its output comes from {type(op).__name__}, not from a scaling"
        if weight is None or weight.dim() != 1 or output.shape[-1:] != weight.shape:
            return "it normalises over several axes"
        for slot, operand in ((1, "self"), (0, "other")):
            chain = leaf_chain(op, slot, weight)
            normalised = saved(op, operand)
            if chain and isinstance(normalised, Tensor) and normalised.shape == output.shape:
                features = functools.partial(normalised.unsqueeze, -1)  # (*axes, U, 1)
                return layout(output.dim() - 1, features, module, {"weight": chain})
        return "its weight does not scale its normalised input"
