"""The small modules of the fuzzed models: wrappers, tied weights, attention, caching layers,
layers that change the function slightly, parametrizations, and :class:`FuzzNet`."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RMSNORM = getattr(nn, "RMSNorm", None)
"""``nn.RMSNorm`` where torch has it, else ``None``."""


class Fn(nn.Module):
    """A function of one tensor as a module, with its description."""

    def __init__(self, text: str, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.text = text
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.text


class Residual(nn.Module):
    """``x + inner(x)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class Twice(nn.Module):
    """One layer called twice: ``layer(act(layer(x)))``."""

    def __init__(self, layer: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.act(self.layer(x)))


class TiedTranspose(nn.Module):
    """An encoder and a decoder whose weight is the encoder's, transposed."""

    def __init__(self, width: int, hidden: int, act: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Linear(width, hidden)
        self.act = act
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act(self.encoder(x)), self.encoder.weight.t(), self.bias)


class TiedShared(nn.Module):
    """Two ``Linear`` layers holding one weight parameter."""

    def __init__(self, width: int, act: nn.Module) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.second.weight = self.first.weight
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.act(self.first(x)))


class SelfBilinear(nn.Module):
    """``nn.Bilinear`` reading its input twice."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(width, width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bilinear(x, x)


class Attention(nn.Module):
    """Hand-written self-attention over axis 1, with or without softmax, optionally causal."""

    def __init__(self, width: int, softmax: bool, causal: bool) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.softmax = softmax
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1])
        if self.causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, -math.inf if self.softmax else 0.0)
        weights = scores.softmax(-1) if self.softmax else scores / x.shape[-2]
        return weights @ self.v(x)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` as self-attention, optionally causal."""

    def __init__(self, attention: nn.MultiheadAttention, causal: bool) -> None:
        super().__init__()
        self.attention = attention
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        mask = None
        if self.causal:
            length = x.shape[1] if self.attention.batch_first else x.shape[0]
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        return self.attention(x, x, x, attn_mask=mask, need_weights=False)[0]


class Recurrent(nn.Module):
    """A recurrent layer's output sequence (its final states dropped)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


class CachingLinear(nn.Linear):
    """A ``Linear`` layer that keeps its last output in ``self.cache``."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        self.cache = out
        return out


class Cache(nn.Module):
    """Keeps its inner module's last output in ``self.cache``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        self.cache = self.inner(x)
        return self.cache


class ExpLinear(nn.Linear):
    """A ``Linear`` layer applying ``expm1`` to its weight (nearly linear for small weights)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, torch.expm1(self.weight), self.bias)


class ExpConv1d(nn.Conv1d):
    """A ``Conv1d`` layer applying ``expm1`` to its weight."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, torch.expm1(self.weight), self.bias)


class ExpConv2d(nn.Conv2d):
    """A ``Conv2d`` layer applying ``expm1`` to its weight."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, torch.expm1(self.weight), self.bias)


class SiluBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` followed by SiLU (nearly linear on tiny values)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


class Symmetric(nn.Module):
    """Parametrization of a square weight as a symmetric matrix."""

    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).transpose(0, 1)


class TanhWeight(nn.Module):
    """Parametrization of a weight through ``tanh``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class Concat(nn.Module):
    """The stem of a two-input model: its inputs joined along the last axis, then a layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.layer(torch.cat([x, z], dim=-1))


class FuzzNet(nn.Module):
    """``head(body(stem(*inputs)))``; with a second head, a tuple of both outputs.

    ``heads="two"`` returns a second head that the loss does not read; ``heads="byol"``
    returns a detached second head as the loss's target.
    """

    def __init__(
        self, stem: nn.Module, body: list[nn.Module], head: nn.Module, second: nn.Module | None
    ) -> None:
        super().__init__()
        self.stem = stem
        self.body = nn.Sequential(*body)
        self.head = head
        self.second = second
        self.detach_second = False

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = self.body(self.stem(*inputs))
        out = self.head(h)
        if self.second is None:
            return out
        other = self.second(h)
        return out, other.detach() if self.detach_second else other
