r"""``Embedding``: an ``embedding`` node looks up rows of the weight, :math:`z_a = W_{x_a}`.

The features are the node's saved indices. Refused: rows renormalised in place
(``max_norm``), gradients rescaled by frequency or sparse (their backward is not the
derivative of the lookup). The row of ``padding_idx`` gets no gradient, so no curvature.
"""

from torch import Tensor, nn

from torch_secorder.core._structured.rules.base import (
    Layout,
    layout,
    leaf_chain,
    node_name,
    own,
    saved,
)


class EmbeddingRule:
    """The rule of ``nn.Embedding``."""

    types = (nn.Embedding,)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        op = output.grad_fn
        if node_name(op) != "Embedding":
            return f"its output comes from {type(op).__name__}, not from a lookup"
        if module.max_norm is not None:  # type: ignore[union-attr]
            return "it renormalises its rows (max_norm)"
        if saved(op, "scale_grad_by_freq") or saved(op, "sparse"):
            return "its gradient is rescaled by frequency or sparse"
        indices = saved(op, "indices")
        if not isinstance(indices, Tensor) or indices.is_floating_point():
            return "its indices are not recorded"
        if indices.shape != output.shape[:-1]:
            return "its output's positions are not its indices'"
        padding = saved(op, "padding_idx")
        rows = module.weight.shape[0]  # type: ignore[union-attr]
        row = padding if isinstance(padding, int) and 0 <= padding < rows else None  # -1: none
        chains = {"weight": leaf_chain(op, 0, own(module, "weight"))}
        return layout(
            output.dim() - 1, lambda: indices, module, chains, lookup=True, padding_row=row
        )
