r"""``Conv1d/2d/3d``: a ``convolution`` node, its input patches as the features.

Padding modes other than zeros pad the input before the node, so the node's saved input is
already padded; the node's own (zero) padding, stride, dilation and groups are read off it. An
unbatched input adds a squeeze after the node. Unit :math:`u` of group :math:`g` sees the
:math:`C/G \cdot \prod k` entries of its group's patch; a convolution's pixels are taken as
coupled (they meet in later layers).
"""

import torch.nn.functional as F
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


class ConvolutionRule:
    """The rule of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``."""

    types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        weight, bias = own(module, "weight"), own(module, "bias")
        op, above = output.grad_fn, []
        if node_name(op).startswith("Squeeze"):
            if not _unbatched(op):
                return "its output is squeezed after the convolution (not as an unbatched input's)"
            above, op = [op], child(op, 0)
        if node_name(op) != "Convolution":
            return f"its output comes from {type(op).__name__}, not from a convolution"
        if saved(op, "transposed") is not False:
            return "its output comes from a transposed convolution"
        batched = not above
        chains = {
            "weight": leaf_chain(op, 1, weight, above=above),
            "bias": leaf_chain(op, 2, bias, above=above),
        }
        features = None
        if chains["weight"]:
            x = saved(op, "input")
            if not isinstance(x, Tensor):
                return "its input is not recorded"

            def features() -> Tensor:
                patches = _patches(x, weight.shape[2:], op)  # type: ignore[union-attr]
                return patches if batched else patches[0]

        unit = 1 if batched else 0
        coupled = list(range(unit + 1, output.dim()))
        return layout(unit, features, module, chains, coupled=coupled)


def _patches(x: Tensor, kernel: tuple[int, ...], node: object) -> Tensor:
    """The input patches of a convolution ``(N, *S, G, F)``, from the node's arguments."""
    d = len(kernel)
    stride, padding = saved(node, "stride"), saved(node, "padding")
    dilation, groups = saved(node, "dilation"), saved(node, "groups")
    flat = [int(v) for p in reversed(padding) for v in (p, p)]  # type: ignore[call-overload]
    if any(flat):
        x = F.pad(x, flat)
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])  # type: ignore[index]
    x = x[(Ellipsis, *(slice(None, None, dilation[i]) for i in range(d)))]  # type: ignore[index]
    n, c = x.shape[:2]
    spatial = x.shape[2 : 2 + d]
    x = x.reshape(n, groups, c // groups, *spatial, *kernel)  # type: ignore[call-overload, operator]
    kernel_axes = list(range(3 + d, 3 + 2 * d))
    x = x.permute(0, 1, 2, *kernel_axes, *range(3, 3 + d))
    x = x.reshape(n, groups, -1, *spatial)  # type: ignore[call-overload]  # (N, G, F, *S)
    return x.permute(0, *range(3, 3 + d), 1, 2)  # (N, *S, G, F)


def _unbatched(squeeze: object) -> bool:
    """Whether a squeeze node is an unbatched input's: dimension 0 of size 1 taken out."""
    sizes, dim = saved(squeeze, "self_sym_sizes"), saved(squeeze, "dim")
    if not (isinstance(sizes, tuple) and sizes and isinstance(dim, int)):
        return False  # (every dimension of size 1 squeezed, or several)
    return dim % len(sizes) == 0 and sizes[0] == 1
