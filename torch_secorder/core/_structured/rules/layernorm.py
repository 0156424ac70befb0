r"""LayerNorm over the last axis: :math:`z_{a u} = w_u \hat x_{a u} + b_u`.

The normalised input comes from the layer-norm node's saved input, mean and reciprocal
standard deviation; each unit is a group with one feature. A norm over several trailing axes
is refused.
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


class LayerNormRule:
    """The rule of ``nn.LayerNorm``."""

    types = (nn.LayerNorm,)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        op = output.grad_fn
        if node_name(op) != "NativeLayerNorm":
            return f"its output comes from {type(op).__name__}, not from a layer norm"
        shape = saved(op, "normalized_shape")
        if shape is None or len(shape) != 1:  # type: ignore[arg-type]
            return "it normalises over several axes"
        x, mean, rstd = saved(op, "input"), saved(op, "result1"), saved(op, "result2")
        if not all(isinstance(t, Tensor) for t in (x, mean, rstd)) or x.shape != output.shape:  # type: ignore[union-attr]
            return "its input is not recorded"
        features = lambda: ((x - mean) * rstd).unsqueeze(-1)  # type: ignore[operator]  # noqa: E731
        chains = {
            "weight": leaf_chain(op, 1, own(module, "weight")),
            "bias": leaf_chain(op, 2, own(module, "bias")),
        }
        return layout(output.dim() - 1, features, module, chains)
