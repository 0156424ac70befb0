"""What a case is: the vocabulary of its tags, and :class:`FuzzCase`."""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ACTIVATIONS = _words(
    "ReLU LeakyReLU PReLU ReLU6 RReLU ELU SELU CELU GELU SiLU Mish Softplus Softsign Tanh "
    "Sigmoid Hardtanh Hardswish Hardsigmoid Hardshrink Softshrink Tanhshrink LogSigmoid "
    "Threshold GLU Softmax LogSoftmax Softmin"
)

PIECEWISE_LINEAR = _words("ReLU ReLU LeakyReLU PReLU ReLU6 RReLU Hardtanh Hardshrink Threshold")

TENSOR_OPS = _words(
    "gather index_select masked_fill where clamp(scalar) clamp(tensor) maximum "
    "minimum amax amin cumsum sort topk flip roll"
)
"""The element-wise and indexing operations a case may draw (``cdist`` aside)."""


VOCABULARY = ACTIVATIONS + _words(
    # layers
    "Linear Bilinear Conv1d Conv2d ConvTranspose1d ConvTranspose2d grouped-conv dilated-conv "
    "strided-conv Embedding Embedding(padding_idx) RNN GRU LSTM MultiheadAttention "
    "attention(softmax) attention(linear) TransformerEncoderLayer "
    # normalization
    "BatchNorm1d(train) BatchNorm1d(eval) BatchNorm2d(train) BatchNorm2d(eval) LayerNorm "
    "GroupNorm InstanceNorm RMSNorm LocalResponseNorm "
    # pooling, resampling, padding
    "MaxPool AvgPool AdaptiveAvgPool AdaptiveMaxPool LPPool Upsample(nearest) "
    "Upsample(linear) PixelShuffle PixelUnshuffle pad(constant) pad(reflect) pad(replicate) "
    "pad(circular) conv-padding(reflect) conv-padding(replicate) conv-padding(circular) "
    # tensor operations
    "gather index_select masked_fill where clamp(scalar) clamp(tensor) maximum minimum amax "
    "amin cumsum sort topk flip roll cdist "
    # structure
    "residual in-place module-twice tied-transpose tied-shared weight_norm parametrize "
    "Dropout(train) two-inputs frozen-parameter "
    # samples and tokens that read each other
    "x-mean(0) x-x[:1] roll(batch) cumsum(batch) permute(batch) token-0-added roll(tokens) "
    "cumsum(tokens) x-mean(tokens) unbatched sequence-first "
    # outputs read elsewhere
    "hook(store) hook(scale) pre-hook(scale) global-hook(store) global-hook(scale) "
    "cache(self) cache(wrapper) "
    # layers that change the function slightly
    "ExpLinear ExpConv SiluBatchNorm1d "
    # losses and heads
    "loss:mse-mean loss:mse-sum loss:cross-entropy loss:nll loss:huber loss:bce loss:cubic "
    "loss:log-cosh loss:covariance loss:info-nce activation-penalty weight-decay "
    "two-heads byol"
)
"""Every operation, module, hook, head and loss a case may contain (its tags)."""


@dataclass
class FuzzCase:
    """One random model with its loss, data and parameter selection.

    Attributes:
        seed: The seed it was built from.
        model: The float64 model, each module in its drawn train/eval mode.
        loss_fn: ``loss_fn(model(*inputs), targets)`` is the scalar loss.
        inputs: One batch's inputs (a tensor, or a tuple for a two-input model).
        targets: One batch's targets.
        params: The ``params=`` selection: ``None``, a name, a glob pattern, or a list.
        batches: A data set of ``(inputs, targets)`` batches; the last may hold one sample.
        description: The model, loss, hooks, batch size and selection, in one line.
        tags: The entries of :data:`VOCABULARY` the case contains.
        dense_oracle: Whether ``torch.func``'s Hessian can be trusted for this model (no
            normalization whose input and weight both depend on the parameters, beyond those
            ``tests/reference.py`` replaces).
        global_hooks: Module hooks registered for every module while :meth:`active`.
    """

    seed: int
    model: nn.Module
    loss_fn: Callable[[Any, Tensor], Tensor]
    inputs: Tensor | tuple[Tensor, ...]
    targets: Tensor
    params: str | list[str] | None
    batches: list[tuple[Any, Tensor]]
    description: str
    tags: set[str]
    dense_oracle: bool
    global_hooks: list[Callable[..., Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Register the case's global forward hooks for the block; always remove them."""
        handles = []
        try:
            for hook in self.global_hooks:
                handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()
