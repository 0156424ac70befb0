r"""BatchNorm: :math:`z_{n c s} = w_c \hat x_{n c s} + b_c`, one unit per channel.

The normalised input :math:`\hat x` comes from the batch-norm node's saved arguments: the
running statistics in eval mode, the batch's mean and inverse standard deviation (saved by
the node) in train mode, which depend on the input only, so the output stays linear in
:math:`w` and :math:`b`. Channel :math:`c` is group :math:`c`, with one feature; the other
positions (pixels) are taken as coupled.
"""

import torch
from torch import Tensor, nn

from torch_secorder.core._structured.rules.base import (
    Layout,
    layout,
    leaf_chain,
    node_name,
    own,
    saved,
)

_KERNELS = ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm")


class BatchNormRule:
    """The rule of ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (any subclass of them)."""

    types = (nn.modules.batchnorm._BatchNorm,)

    def match(self, module: nn.Module, output: Tensor) -> Layout | str:
        """The layout of ``output`` (see :meth:`.LayerRule.match`), or why not."""
        op = output.grad_fn
        kernel = node_name(op)
        if kernel not in _KERNELS:
            return f"its output comes from {type(op).__name__}, not from a batch norm"
        x, training = saved(op, "input"), saved(op, "training")
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape != output.shape:
            return "its input is not recorded"
        shape = [1, -1] + [1] * (x.dim() - 2)
        if training is False:
            mean, var = saved(op, "running_mean"), saved(op, "running_var")
            eps = saved(op, "eps")
            eps = saved(op, "epsilon") if eps is None else eps
            if not isinstance(mean, Tensor) or not isinstance(var, Tensor) or eps is None:
                return "its running statistics are not recorded"
            scale = torch.rsqrt(var + eps)  # type: ignore[operator]
        elif training is True and kernel == "NativeBatchNorm":
            mean, scale = saved(op, "result1"), saved(op, "result2")  # the batch's, saved
            if not isinstance(mean, Tensor) or not isinstance(scale, Tensor):
                return "its batch statistics are not recorded"
        else:
            return "its batch statistics are not recorded"

        def features() -> Tensor:  # (N, *S, C, 1)
            normalised = (x - mean.reshape(shape)) * scale.reshape(shape)  # type: ignore[union-attr]
            return normalised.movedim(1, -1).unsqueeze(-1)

        chains = {
            "weight": leaf_chain(op, 1, own(module, "weight")),
            "bias": leaf_chain(op, 2, own(module, "bias")),
        }
        return layout(1, features, module, chains, coupled=list(range(2, x.dim())))
