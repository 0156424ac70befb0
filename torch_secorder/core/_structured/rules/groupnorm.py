r"""GroupNorm: :math:`z_{n c s} = w_c \hat x_{n c s} + b_c`, statistics per sample and group.

The normalised input comes from the group-norm node's saved input, means and reciprocal
standard deviations (one per sample and group); each channel is a group of units with one
feature, and the pixels are taken as coupled.
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


class GroupNormRule:
    """The rule of ``nn.GroupNorm``."""

    types = (nn.GroupNorm,)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        op = output.grad_fn
        if node_name(op) != "NativeGroupNorm":
            return f"its output comes from {type(op).__name__}, not from a group norm"
        x, mean, rstd = saved(op, "input"), saved(op, "result1"), saved(op, "result2")
        if not all(isinstance(t, Tensor) for t in (x, mean, rstd)) or x.shape != output.shape:  # type: ignore[union-attr]
            return "its input is not recorded"

        def features() -> Tensor:  # (N, *S, C, 1)
            n, groups = mean.shape[0], mean.numel() // max(1, mean.shape[0])  # type: ignore[union-attr]
            grouped = x.reshape(n, groups, -1)  # type: ignore[union-attr]
            normalised = (grouped - mean.reshape(n, groups, 1)) * rstd.reshape(n, groups, 1)  # type: ignore[union-attr]
            return normalised.reshape(x.shape).movedim(1, -1).unsqueeze(-1)  # type: ignore[union-attr]

        chains = {
            "weight": leaf_chain(op, 1, own(module, "weight")),
            "bias": leaf_chain(op, 2, own(module, "bias")),
        }
        return layout(1, features, module, chains, coupled=list(range(2, output.dim())))
