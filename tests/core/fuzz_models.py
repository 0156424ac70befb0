"""Random small models, losses, data and parameter selections for differential tests.

:func:`build_case` turns a seed into a :class:`FuzzCase`: a float64 model composed from the
operations and modules of :data:`VOCABULARY`, a loss, one batch, a small data set whose last
batch may hold one sample, a parameter selection for ``params=``, and a one-line description.
The families of architectures are MLP-like models on vectors (one or two inputs), CNN-like
models on tiny 1-d and 2-d images, token models with embeddings (batched, and unbatched
sequences), recurrent models, and sequence-first models whose axis 0 is time. The losses are
per-sample, batch-coupling (covariance of the outputs, InfoNCE over the batch), and may read
activations stored by hooks or add weight decay over every parameter of the model. A few
operations have no second derivative in PyTorch (``cdist``): both paths must then raise.

Everything comes from the seed: choices from ``random.Random(seed)``, tensors (data, masks,
indices, running statistics) from a ``torch.Generator`` seeded with it, and module
initializers, which draw from torch's global RNG, run under a forked global RNG seeded with
it. Building a case never advances the global RNG, and a seed always gives the same case.

A case registers its global module hooks only inside :meth:`FuzzCase.active`.
"""

import contextlib
import copy
import fnmatch
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

F64 = torch.float64

MAX_PARAMETERS = 400
"""Most parameters of a model (larger draws are drawn again), so one model takes milliseconds."""


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ACTIVATIONS = _words(
    "ReLU LeakyReLU PReLU ReLU6 RReLU ELU SELU CELU GELU SiLU Mish Softplus Softsign Tanh "
    "Sigmoid Hardtanh Hardswish Hardsigmoid Hardshrink Softshrink Tanhshrink LogSigmoid "
    "Threshold GLU Softmax LogSoftmax Softmin"
)

PIECEWISE_LINEAR = _words("ReLU ReLU LeakyReLU PReLU ReLU6 RReLU Hardtanh Hardshrink Threshold")

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


# ----------------------------------------------------------------------------- modules


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


# ----------------------------------------------------------------------------- the case


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


def build_case(seed: int) -> FuzzCase:
    """The case of ``seed``: a random model, loss, data and selection (see the module)."""
    draw = _Draw(seed)
    for _ in range(20):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            builder = _Builder(draw)
            case = builder.build(seed)
        if sum(p.numel() for p in case.model.parameters()) <= MAX_PARAMETERS:
            return case
    raise AssertionError(f"seed {seed}: no model of at most {MAX_PARAMETERS} parameters drawn")


class _Draw:
    """Every random choice of a case: Python's RNG for choices, a torch generator for data."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def int(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def choice(self, options: Any) -> Any:
        return self.rng.choice(list(options))

    def weighted(self, options: dict[Any, float]) -> Any:
        return self.rng.choices(list(options), weights=list(options.values()))[0]

    def randn(self, *shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(shape, generator=self.gen, dtype=F64) * scale

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.gen, dtype=F64)

    def randint(self, high: int, *shape: int) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen)

    def permutations(self, most: int = 16) -> dict[int, Tensor]:
        return {n: torch.randperm(n, generator=self.gen) for n in range(1, most + 1)}


Shape = tuple[Any, ...]
"""The shape of a hidden tensor past axis 0 (``None`` for the batch axis of a sequence-first
layout, whose size varies between batches)."""

Made = tuple[nn.Module, Shape] | None
"""What an operation builder returns: the module and its output shape, or ``None`` when the
operation does not apply to the shape."""


class _Builder:
    """Draws one case; the operation builders share its draw, tags and description."""

    def __init__(self, draw: _Draw) -> None:
        self.draw = draw
        self.parts: list[str] = []
        self.tags: set[str] = set()
        self.tap: dict[str, Tensor] = {}
        self.penalties: list[tuple[str, float, Callable[[], Tensor]]] = []
        self.global_hooks: list[Callable[..., Any]] = []
        self.train: list[nn.Module] = []
        self.small: list[Callable[[], None]] = []  # re-scalings after initialization
        self.fresh = False  # the last module was a Linear or convolution (in-place is safe)
        self.dense_oracle = True
        self.dropout = False  # a dropout layer in train mode
        self.sequential = False  # a recurrent layer or an nn.MultiheadAttention
        self.family = ""

    # ------------------------------------------------------------------------- assembly

    def build(self, seed: int) -> FuzzCase:
        d = self.draw
        self.family = d.weighted(
            {"mlp": 6, "cnn2d": 4, "cnn1d": 2, "tokens": 3, "unbatched": 1.5, "rnn": 2, "seq": 1.5}
        )
        stem, shape, make_inputs = getattr(self, f"_stem_{self.family}")()
        body: list[nn.Module] = []
        for _ in range(d.int(1, 7)):
            made = self._operation(shape)
            if made is not None:
                module, shape = made
                body.append(module)
        head, rows, classes = self._head(shape)
        heads = d.weighted({"one": 8, "two": 1, "byol": 1})
        second = None
        if heads != "one":
            second = copy.deepcopy(head)  # the same layers, drawn afresh
            for module in second.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
            self.tags.add("two-heads" if heads == "two" else "byol")
        model = FuzzNet(stem, body, head, second)
        model.detach_second = heads == "byol"
        model.to(F64)
        self._initialize(model)
        model.eval()
        for module in self.train:
            module.train()
        loss_fn, make_targets, loss_text = self._loss(model, classes, heads)
        if d.coin(0.1) and len(list(model.parameters())) > 1:  # one stays trainable
            frozen = d.choice(name for name, _ in model.named_parameters())
            model.get_parameter(frozen).requires_grad_(False)
            self.parts.append(f"frozen {frozen}")
            self.tags.add("frozen-parameter")
        n = d.weighted({1: 2, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1})
        inputs = make_inputs(n)
        targets = make_targets(rows(n))
        sizes = [d.int(1, 5) for _ in range(d.int(1, 3))] + ([1] if d.coin(0.5) else [])
        batches = []
        for size in sizes:
            x = make_inputs(size)
            batches.append((x, make_targets(rows(size))))
        selection = self._selection(model)
        # under torch.func, recurrent layers and MultiheadAttention change the masks of a
        # train-mode dropout (already the gradient differs from plain autograd's, torch 2.13)
        dense_oracle = self.dense_oracle and not (self.dropout and self.sequential)
        head_text = {"one": "", "two": ", unused second head", "byol": ", detached BYOL target"}
        description = (
            f"seed {seed}: {self.family}, batch {n} | {self._stem_text} > "
            f"{' > '.join(self.parts) or '(no body)'} > head {self._head_text}"
            f"{head_text[heads]} | loss {loss_text} | params={selection!r}"
        )
        return FuzzCase(
            seed=seed,
            model=model,
            loss_fn=loss_fn,
            inputs=inputs,
            targets=targets,
            params=selection,
            batches=batches,
            description=description,
            tags=self.tags,
            dense_oracle=dense_oracle,
            global_hooks=self.global_hooks,
        )

    def _initialize(self, model: nn.Module) -> None:
        """Random affine parameters and running statistics of norms; small layers made small."""
        d = self.draw
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    if module.affine:
                        module.weight.copy_(1 + d.randn(*module.weight.shape, scale=0.3))
                        module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
                    if module.running_mean is not None:
                        module.running_mean.copy_(d.randn(*module.running_mean.shape, scale=0.3))
                        module.running_var.copy_(0.5 + d.rand(*module.running_var.shape))
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, _RMSNORM)):
                    if getattr(module, "weight", None) is not None:
                        module.weight.copy_(1 + d.randn(*module.weight.shape, scale=0.3))
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
                elif isinstance(module, TiedTranspose):
                    module.bias.copy_(d.randn(*module.bias.shape, scale=0.3))
            for rescale in self.small:
                rescale()

    def _selection(self, model: nn.Module) -> str | list[str] | None:
        d = self.draw
        names = [name for name, _ in model.named_parameters()]
        kind = d.weighted({"all": 5, "name": 1.5, "glob": 1.5, "list": 3})
        if kind == "name":
            return d.choice(names)
        if kind == "glob":
            prefixes = sorted({name.rsplit(".", 1)[0] + ".*" for name in names})
            patterns = ["*.weight", "*.bias", "*weight*", *prefixes]
            return d.choice(p for p in patterns if fnmatch.filter(names, p))
        if kind == "list":
            chosen = d.rng.sample(names, d.int(1, min(4, len(names))))
            if d.coin(0.3):
                chosen.append(
                    d.choice(
                        p for p in ("*.weight", "*.bias", "*weight*") if fnmatch.filter(names, p)
                    )
                )
            return chosen
        return None

    # ------------------------------------------------------------------------- stems

    def _stem_mlp(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        width, hidden = d.int(2, 6), d.int(3, 8)
        if d.coin(0.15):
            other = d.int(1, 3)
            stem = Concat(nn.Linear(width + other, hidden))
            self._stem_text = f"cat(x{width}, z{other}) > Linear({width + other},{hidden})"
            self.tags.add("two-inputs")
            return stem, (hidden,), lambda n: (d.randn(n, width), d.randn(n, other))
        self._stem_text = f"Linear({width},{hidden})"
        self.fresh = True
        return nn.Linear(width, hidden), (hidden,), lambda n: d.randn(n, width)

    def _stem_cnn2d(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        channels, height, width = d.int(1, 2), d.int(3, 5), d.int(3, 5)
        self._stem_text = f"image {channels}x{height}x{width}"
        made = None
        while made is None:
            made = self._conv((channels, height, width))
        self._stem_text += f" > {self.parts.pop()}"
        module, shape = made
        return module, shape, lambda n: d.randn(n, channels, height, width)

    def _stem_cnn1d(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        channels, length = d.int(1, 3), d.int(4, 7)
        self._stem_text = f"signal {channels}x{length}"
        made = None
        while made is None:
            made = self._conv((channels, length))
        self._stem_text += f" > {self.parts.pop()}"
        module, shape = made
        return module, shape, lambda n: d.randn(n, channels, length)

    def _embedding(self, vocabulary: int, width: int) -> nn.Embedding:
        padding = self.draw.choice(range(vocabulary)) if self.draw.coin(0.3) else None
        self.tags.add("Embedding" if padding is None else "Embedding(padding_idx)")
        self._stem_text = f"Embedding({vocabulary},{width}{f',pad={padding}' if padding else ''})"
        self.fresh = False
        return nn.Embedding(vocabulary, width, padding_idx=padding)

    def _stem_tokens(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        vocabulary, length, width = d.int(4, 7), d.int(2, 4), d.int(3, 6)
        self.vocabulary = vocabulary
        self.embedding = self._embedding(vocabulary, width)
        self._stem_text = f"tokens {length} > {self._stem_text}"
        return self.embedding, (length, width), lambda n: d.randint(vocabulary, n, length)

    def _stem_unbatched(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        vocabulary, width = d.int(4, 7), d.int(3, 5)
        self.vocabulary = vocabulary
        self.embedding = self._embedding(vocabulary, width)
        self._stem_text = f"one unbatched sequence > {self._stem_text}"
        self.tags.add("unbatched")
        if d.coin(0.6):  # the classic: every position reads position 0
            self.parts.append("x + x[:1]")
            self.tags.add("token-0-added")
            stem = nn.Sequential(self.embedding, Fn("x + x[:1]", lambda x: x + x[:1]))
            return stem, (width,), lambda n: d.randint(vocabulary, n)
        return self.embedding, (width,), lambda n: d.randint(vocabulary, n)

    def _recurrent(self, width: int, batch_first: bool) -> tuple[nn.Module, int]:
        d = self.draw
        kind = d.choice(["RNN", "GRU", "LSTM"])
        hidden, layers, both = d.int(2, 3), d.weighted({1: 3, 2: 1}), d.coin(0.3)
        rnn = getattr(nn, kind)(
            width, hidden, num_layers=layers, bidirectional=both, batch_first=batch_first
        )
        self.tags.add(kind)
        self.sequential = True
        text = f"{kind}({width},{hidden}{',2 layers' if layers > 1 else ''}{',bi' if both else ''})"
        self.parts.append(text)
        return Recurrent(rnn), hidden * (2 if both else 1)

    def _stem_rnn(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        length, width = d.int(2, 4), d.int(1, 3)
        stem, hidden = self._recurrent(width, batch_first=True)
        self._stem_text = f"sequence {length}x{width} > {self.parts.pop()}"
        return stem, (length, hidden), lambda n: d.randn(n, length, width)

    def _stem_seq(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        length, width = d.int(2, 4), d.int(1, 3)
        self.length = length
        self.tags.add("sequence-first")
        if d.coin(0.5):
            stem, hidden = self._recurrent(width, batch_first=False)
            text = self.parts.pop()
        else:
            hidden = d.int(2, 4)
            stem, text = nn.Linear(width, hidden), f"Linear({width},{hidden})"
            self.fresh = True
        self._stem_text = f"sequence-first {length}xNx{width} > {text}"
        return stem, (None, hidden), lambda n: d.randn(length, n, width)

    # ------------------------------------------------------------------------- heads

    def _head(self, shape: Shape) -> tuple[nn.Module, Callable[[int], int], int]:
        """The output layer, the number of output rows for ``n`` samples, and the classes."""
        d = self.draw
        k = d.int(2, 4)
        width = shape[-1]
        family = self.family
        text = f"Linear({width},{k})"
        if family in ("cnn1d", "cnn2d"):
            channels, spatial = shape[0], math.prod(shape[1:])
            if channels * spatial <= 32 and d.coin(0.6):
                head = nn.Sequential(nn.Flatten(), nn.Linear(channels * spatial, k))
                text = f"flatten > Linear({channels * spatial},{k})"
            else:
                pool = nn.AdaptiveAvgPool2d(1) if len(shape) == 3 else nn.AdaptiveAvgPool1d(1)
                head = nn.Sequential(pool, nn.Flatten(), nn.Linear(channels, k))
                text = f"global average > Linear({channels},{k})"
            rows = lambda n: n  # noqa: E731
        elif family in ("tokens", "rnn"):
            length = shape[0]
            pick = d.choice(["mean", "last", "all"] + (["tied"] if family == "tokens" else []))
            if pick == "tied" and width == self.embedding.embedding_dim:
                k = self.vocabulary
                head = Fn("x @ embedding.weight.T", lambda x: x @ self.embedding.weight.t())
                text = "tied to the embedding"
                self.tags.add("tied-transpose")
                rows = lambda n: n * length  # noqa: E731
            elif pick == "all" or pick == "tied":
                head, rows = nn.Linear(width, k), lambda n: n * length
                text = f"Linear({width},{k}) per token"
            else:
                reduce = (lambda x: x.mean(1)) if pick == "mean" else (lambda x: x[:, -1])
                head = nn.Sequential(Fn(pick, reduce), nn.Linear(width, k))
                text = f"{pick} token > Linear({width},{k})"
                rows = lambda n: n  # noqa: E731
        elif family == "seq":
            length = self.length
            if d.coin(0.5):
                head = nn.Sequential(Fn("x[-1]", lambda x: x[-1]), nn.Linear(width, k))
                text = f"last step > Linear({width},{k})"
                rows = lambda n: n  # noqa: E731
            else:
                head, rows = nn.Linear(width, k), lambda n: n * length
                text = f"Linear({width},{k}) per step"
        else:
            head, rows = nn.Linear(width, k), lambda n: n
        self._head_text = text
        return head, rows, k

    # ------------------------------------------------------------------------- losses

    def _loss(
        self, model: nn.Module, classes: int, heads: str
    ) -> tuple[Callable[[Any, Tensor], Tensor], Callable[[int], Tensor], str]:
        d = self.draw
        regression = {"mse-mean": 3, "mse-sum": 1, "huber": 1, "cubic": 1, "log-cosh": 1}
        kinds = {
            **regression,
            "cross-entropy": 3,
            "nll": 1,
            "bce": 1,
            "covariance": 1,
            "info-nce": 1,
        }
        kind = d.weighted(regression if heads == "byol" else kinds)
        self.tags.add(f"loss:{kind}")
        delta, smoothing = d.uniform(0.3, 1.5), d.choice([0.0, 0.0, 0.1])
        base = _base_loss(kind, delta, smoothing)
        decay = d.choice([1e-2, 1e-1]) if d.coin(0.7 if heads != "one" else 0.15) else 0.0
        penalties = list(self.penalties)
        byol = heads == "byol"
        text = kind + (f"(delta={delta:.2f})" if kind == "huber" else "")
        text += f"(smoothing={smoothing})" if kind == "cross-entropy" and smoothing else ""
        text += " against the detached second head" if byol else ""
        for name, coef, _ in penalties:
            text += f" + {coef}*mean({name}^2)"
            self.tags.add("activation-penalty")
        if decay:
            text += f" + {decay}*sum(p^2 for all parameters)"
            self.tags.add("weight-decay")

        def loss_fn(output: Any, targets: Tensor) -> Tensor:
            main = output[0] if isinstance(output, tuple) else output
            y = main.reshape(-1, main.shape[-1])
            if byol:
                targets = output[1].reshape(y.shape)
            value = base(y, targets)
            for _, coef, read in penalties:
                value = value + coef * read().pow(2).mean()
            if decay:
                value = value + decay * sum(p.pow(2).sum() for p in model.parameters())
            return value

        def make_targets(rows: int) -> Tensor:
            if kind in ("cross-entropy", "nll"):
                return d.randint(classes, rows)
            if kind == "bce":
                return d.rand(rows, classes)
            return d.randn(rows, classes)

        return loss_fn, make_targets, text

    # ------------------------------------------------------------------------- operations

    def _operation(self, shape: Shape) -> Made:
        """One random operation applicable to ``shape`` (``None`` when the draw does not fit).

        Most are the plain operations of ordinary networks (layers, activations, norms,
        pooling), on which the structured rules apply; the rest may be anything.
        """
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        tokens = len(shape) == 2 and not image and shape[0] is not None
        if d.coin(0.45):
            plain: dict[Callable[[Shape], Made], float] = {
                self._linear_op: 0.5 if image else 3,
                self._piecewise_linear: 3,
                self._activation: 1.5,
                self._norm: 1,
                self._dropout: 0.4,
            }
            if image:
                plain.update({self._conv: 4, self._pool: 2})
            return d.weighted(plain)(shape)
        table: dict[Callable[[Shape], Made], float] = {
            self._activation: 3,
            self._linear_op: 2,
            self._norm: 2,
            self._batch_coupling: 1.5,
            self._tensor_op: 4,
            self._structure: 2,
            self._hooked: 1.5,
            self._dropout: 0.5,
            self._subclass: 0.7,
        }
        if image:
            table.update({self._conv: 3, self._pool: 2, self._resample: 5, self._linear_op: 0.5})
            table.update({self._tensor_op: 1.5, self._hooked: 1, self._subclass: 0.7})
        if tokens or self.family == "seq":
            table.update({self._attention: 3, self._token_op: 3})
        if tokens:
            table[self._rnn_op] = 0.5
        return d.weighted(table)(shape)

    def _piecewise_linear(self, shape: Shape) -> Made:
        """An activation that is piecewise linear."""
        name = self.draw.choice(PIECEWISE_LINEAR)
        return self._activation(shape, name)

    def _add(self, module: nn.Module, shape: Shape, text: str, *tags: str) -> Made:
        self.parts.append(text)
        self.tags.update(tags)
        self.fresh = False
        return module, shape

    def _linear_op(self, shape: Shape) -> Made:
        d = self.draw
        width, out, bias = shape[-1], d.int(3, 8), d.coin(0.8)
        made = self._add(
            nn.Linear(width, out, bias=bias),
            (*shape[:-1], out),
            f"Linear({width},{out}{'' if bias else ',nobias'})",
            "Linear",
        )
        self.fresh = True
        return made

    def _activation(self, shape: Shape, name: str | None = None) -> Made:
        d = self.draw
        name = name or d.choice(ACTIVATIONS)
        image = self.family in ("cnn1d", "cnn2d")
        axis, index = (1, 0) if image else (-1, len(shape) - 1)
        size = shape[index]
        inplace = self.fresh and d.coin(0.4)
        text = name
        if name in ("Softmax", "LogSoftmax", "Softmin"):
            module = getattr(nn, name)(dim=axis)
        elif name == "GLU":
            if size % 2:
                return None
            module = nn.GLU(dim=axis)
            shape = (*shape[:index], size // 2, *shape[index + 1 :])
        elif name == "LeakyReLU":
            slope = d.uniform(0.01, 0.3)
            module, text = nn.LeakyReLU(slope, inplace=inplace), f"LeakyReLU({slope:.2f})"
        elif name == "PReLU":
            count = size if image and d.coin(0.5) else 1
            module, text = nn.PReLU(count), f"PReLU({count})"
        elif name == "RReLU":
            module, text = nn.RReLU(0.1, 0.3, inplace=inplace), "RReLU(eval)"
        elif name in ("ELU", "CELU"):
            alpha = d.uniform(0.5, 1.5)
            module, text = getattr(nn, name)(alpha, inplace=inplace), f"{name}({alpha:.2f})"
        elif name == "GELU":
            approximate = d.choice(["none", "tanh"])
            module, text = nn.GELU(approximate), f"GELU({approximate})"
        elif name == "Softplus":
            beta, threshold = d.uniform(0.5, 3), d.uniform(1, 20)
            module, text = nn.Softplus(beta, threshold), f"Softplus({beta:.2f},{threshold:.1f})"
        elif name == "Hardtanh":
            low, high = d.uniform(-2, -0.2), d.uniform(0.2, 2)
            module = nn.Hardtanh(low, high, inplace=inplace)
            text = f"Hardtanh({low:.2f},{high:.2f})"
        elif name in ("Hardshrink", "Softshrink"):
            lambd = d.uniform(0.05, 0.5)
            module, text = getattr(nn, name)(lambd), f"{name}({lambd:.2f})"
        elif name == "Threshold":
            threshold, value = d.uniform(-0.5, 0.5), d.uniform(-1, 1)
            module = nn.Threshold(threshold, value, inplace=inplace)
            text = f"Threshold({threshold:.2f},{value:.2f})"
        elif name in ("ReLU", "ReLU6", "SELU", "SiLU", "Mish", "Hardswish", "Hardsigmoid"):
            # torch.func cannot differentiate hardsigmoid twice (the library routes it)
            self.dense_oracle = self.dense_oracle and name != "Hardsigmoid"
            module = getattr(nn, name)(inplace=inplace)
        else:
            module = getattr(nn, name)()
        if getattr(module, "inplace", False):
            text += "(in-place)"
            self.tags.add("in-place")
        return self._add(module, shape, text, name)

    def _norm(self, shape: Shape) -> Made:
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        vector = len(shape) == 1
        kinds = ["LayerNorm", "RMSNorm"]
        if vector or image:
            kinds += ["BatchNorm", "BatchNorm", "BatchNorm", "GroupNorm"]
        if image:
            kinds += ["InstanceNorm", "LocalResponseNorm"]
        kind = d.choice(kinds)
        channels = shape[0] if image else shape[-1]
        if kind == "BatchNorm":
            dims = 2 if len(shape) == 3 else 1
            affine, train = d.coin(0.85), d.coin(0.5)
            module = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, affine=affine)
            mode = "train" if train else "eval"
            if train:
                self.train.append(module)
            text = f"BatchNorm{dims}d({channels},{mode}{'' if affine else ',no affine'})"
            return self._add(module, shape, text, f"BatchNorm{dims}d({mode})")
        if kind == "GroupNorm":
            groups = d.choice([g for g in range(1, channels + 1) if channels % g == 0])
            affine = d.coin(0.8)
            self.dense_oracle = self.dense_oracle and not affine
            text = f"GroupNorm({groups},{channels}{'' if affine else ',no affine'})"
            return self._add(nn.GroupNorm(groups, channels, affine=affine), shape, text, kind)
        if kind == "InstanceNorm":
            if math.prod(shape[1:]) < 2:
                return None
            affine, track, train = d.coin(0.5), d.coin(0.5), d.coin(0.5)
            cls = nn.InstanceNorm2d if len(shape) == 3 else nn.InstanceNorm1d
            module = cls(channels, affine=affine, track_running_stats=track)
            if train:
                self.train.append(module)
            self.dense_oracle = self.dense_oracle and not affine
            text = f"{cls.__name__}({channels}{',affine' if affine else ''}"
            text += f"{',running stats' if track else ''},{'train' if train else 'eval'})"
            return self._add(module, shape, text, kind)
        if kind == "LocalResponseNorm":
            size = d.int(2, 3)
            return self._add(nn.LocalResponseNorm(size), shape, f"LocalResponseNorm({size})", kind)
        normalized = list(shape) if image else [shape[-1]]
        if math.prod(normalized) > 40:
            normalized = [shape[-1]]
        affine = d.coin(0.8)
        if kind == "RMSNorm" and _RMSNORM is not None:
            module = _RMSNORM(normalized, elementwise_affine=affine)
            self.dense_oracle = self.dense_oracle and not affine
        else:
            kind = "LayerNorm"
            module = nn.LayerNorm(normalized, elementwise_affine=affine, bias=d.coin(0.8))
        text = f"{kind}({normalized}{'' if affine else ',no affine'})"
        return self._add(module, shape, text, kind)

    def _dropout(self, shape: Shape) -> Made:
        d = self.draw
        p = d.choice([0.2, 0.5])
        if self.family == "cnn2d" and d.coin(0.5):
            module, text = nn.Dropout2d(p), f"Dropout2d({p},train)"
        elif self.family == "cnn1d" and d.coin(0.5):
            module, text = nn.Dropout1d(p), f"Dropout1d({p},train)"
        else:
            module, text = nn.Dropout(p), f"Dropout({p},train)"
        self.train.append(module)
        self.dropout = True
        return self._add(module, shape, text, "Dropout(train)")

    def _batch_coupling(self, shape: Shape) -> Made:
        """An operation along axis 0 (the samples; positions or time where those are axis 0)."""
        d = self.draw
        kind = d.choice(["x-mean(0)", "x-x[:1]", "roll(batch)", "cumsum(batch)", "permute(batch)"])
        if kind == "x-mean(0)":
            fn, text = (lambda x: x - x.mean(0, keepdim=True)), "x - x.mean(0)"
        elif kind == "x-x[:1]":
            fn, text = (lambda x: x - x[:1]), "x - x[:1]"
        elif kind == "roll(batch)":
            fn, text = (lambda x: x + 0.5 * torch.roll(x, 1, 0)), "x + roll(x, 1, axis 0)/2"
        elif kind == "cumsum(batch)":
            fn, text = (lambda x: x.cumsum(0)), "cumsum(axis 0)"
        else:
            perms = d.permutations()
            fn, text = (lambda x: x + x[perms[x.shape[0]]]), "x + x[fixed permutation]"
        return self._add(Fn(text, fn), shape, text, kind)

    def _tensor_op(self, shape: Shape) -> Made:
        d = self.draw
        image = self.family in ("cnn1d", "cnn2d")
        width = shape[-1]
        kind = d.choice(
            _words(
                "gather index_select masked_fill where clamp(scalar) clamp(tensor) maximum "
                "minimum amax amin cumsum sort topk flip roll"
            )
        )
        if len(shape) == 1 and d.coin(0.08):
            kind = "cdist"  # without a second derivative: both paths must raise
        constant = d.randn(width, scale=0.5)
        mask = d.rand(width) < 0.4
        if kind in ("gather", "index_select"):
            out = d.int(1, width + 2)
            index = d.randint(width, out)
            if kind == "gather":
                fn = lambda x: x.gather(-1, index.expand(*x.shape[:-1], out))  # noqa: E731
            else:
                fn = lambda x: x.index_select(-1, index)  # noqa: E731
            return self._add(Fn(f"{kind}({index.tolist()})", fn), (*shape[:-1], out), kind, kind)
        if kind == "topk":
            k = d.int(1, width)
            fn, shape = (lambda x: x.topk(k, -1).values), (*shape[:-1], k)
            return self._add(Fn(f"topk({k})", fn), shape, f"topk({k}).values", kind)
        if kind == "cdist":
            centres = d.randn(d.int(2, 3), width)
            fn = lambda x: torch.cdist(x, centres)  # noqa: E731
            return self._add(Fn("cdist", fn), (centres.shape[0],), "cdist(x, centres)", kind)
        value, low, high = d.uniform(-1, 1), d.uniform(-1.5, 0), d.uniform(0, 1.5)
        texts: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
            "masked_fill": (lambda x: x.masked_fill(mask, value), f"masked_fill({value:.2f})"),
            "where": (lambda x: torch.where(mask, x, torch.tanh(x)), "where(mask, x, tanh(x))"),
            "clamp(scalar)": (lambda x: x.clamp(low, high), f"clamp({low:.2f},{high:.2f})"),
            "clamp(tensor)": (
                lambda x: x.clamp(constant - 0.5, constant + 0.5),
                "clamp(tensor bounds)",
            ),
            "maximum": (lambda x: torch.maximum(x, constant), "maximum(x, c)"),
            "minimum": (lambda x: torch.minimum(x, 0.5 * x.flip(-1)), "minimum(x, flip(x)/2)"),
            "amax": (lambda x: x - x.amax(-1, keepdim=True), "x - amax(x, -1)"),
            "amin": (lambda x: x * x.amin(-1, keepdim=True), "x * amin(x, -1)"),
            "cumsum": (lambda x: x.cumsum(-1), "cumsum(-1)"),
            "sort": (lambda x: x.sort(-1).values, "sort(-1).values"),
            "flip": (lambda x: x.flip(-1), "flip(-1)"),
            "roll": (lambda x: torch.roll(x, 1, -1), "roll(1, -1)"),
        }
        if image and kind in ("amax", "amin") and d.coin(0.5):
            dims = tuple(range(2, len(shape) + 1))
            texts["amax"] = (lambda x: x - x.amax(dims, keepdim=True), "x - amax(spatial)")
        fn, text = texts[kind]
        return self._add(Fn(text, fn), shape, text, kind)

    def _structure(self, shape: Shape) -> Made:
        d = self.draw
        width = shape[-1]
        image = self.family in ("cnn1d", "cnn2d")
        kind = d.choice(
            ["residual", "module-twice", "tied-transpose", "tied-shared", "weight_norm"]
            + ["parametrize", "Bilinear"]
        )
        act_name = d.choice(["Tanh", "ReLU", "GELU", "Softplus", "SiLU", "Sigmoid"])
        act = getattr(nn, act_name)()
        if kind == "residual":
            if image and d.coin(0.7):
                channels = shape[0]
                mode = d.choice(["zeros", "reflect", "replicate", "circular"])
                cls = nn.Conv2d if len(shape) == 3 else nn.Conv1d
                conv = cls(channels, channels, 3, padding=1, padding_mode=mode)
                inner, text = nn.Sequential(conv, act), f"x + {act_name}(Conv3x3(pad {mode}))"
                if mode != "zeros" and min(shape[1:]) < 2:
                    return None
            elif d.coin(0.3):
                inner, text = act, f"x + {act_name}(x)"
            else:
                inner, text = nn.Sequential(nn.Linear(width, width), act), f"x + {act_name}(Linear)"
            return self._add(Residual(inner), shape, text, "residual")
        if kind == "module-twice":
            text = f"Linear({width},{width}) called twice around {act_name}"
            return self._add(Twice(nn.Linear(width, width), act), shape, text, kind)
        if kind == "tied-transpose":
            hidden = d.int(2, 5)
            text = f"Linear({width},{hidden}) > {act_name} > its weight transposed"
            return self._add(TiedTranspose(width, hidden, act), shape, text, kind)
        if kind == "tied-shared":
            text = f"two Linear({width},{width}) sharing one weight, {act_name} between"
            return self._add(TiedShared(width, act), shape, text, kind)
        if kind == "Bilinear":
            out = d.int(2, 4)
            return self._add(
                SelfBilinear(width, out), (*shape[:-1], out), f"Bilinear(x, x)->{out}", kind
            )
        out = width if kind == "parametrize" and d.coin(0.5) else d.int(2, 6)
        linear = nn.Linear(width, out)
        if kind == "weight_norm":
            return self._add(
                weight_norm(linear), (*shape[:-1], out), f"weight_norm(Linear({width},{out}))", kind
            )
        rule = Symmetric() if out == width else TanhWeight()
        parametrize.register_parametrization(linear, "weight", rule)
        text = f"Linear({width},{out}) with {type(rule).__name__} weight"
        return self._add(linear, (*shape[:-1], out), text, kind)

    def _hooked(self, shape: Shape) -> Made:
        """A layer with a hook: storing its output for the loss, or changing it."""
        d = self.draw
        width = shape[-1]
        kind = d.weighted(
            {
                "hook(store)": 3,
                "hook(scale)": 1,
                "pre-hook(scale)": 1,
                "global-hook(store)": 2,
                "global-hook(scale)": 1,
                "cache(self)": 2,
                "cache(wrapper)": 1,
            }
        )
        key = f"act{len(self.penalties)}"
        if self.family in ("cnn1d", "cnn2d") and kind != "cache(self)" and d.coin(0.7):
            out = d.int(1, 4)
            cls = nn.Conv2d if len(shape) == 3 else nn.Conv1d
            layer: nn.Module = cls(shape[0], out, 1)
            name, shape = f"{cls.__name__}({shape[0]},{out},k1)", (out, *shape[1:])
        else:
            out = d.int(2, 6)
            layer = (CachingLinear if kind == "cache(self)" else nn.Linear)(width, out)
            name, shape = f"Linear({width},{out})", (*shape[:-1], out)
        module = layer
        scale, coef = d.uniform(0.5, 2), d.choice([0.1, 0.5])
        tap = self.tap
        if kind == "hook(store)":
            layer.register_forward_hook(lambda m, args, output: tap.__setitem__(key, output))
            self.penalties.append((f"hooked output of {name}", coef, lambda: tap[key]))
        elif kind == "hook(scale)":
            layer.register_forward_hook(lambda m, args, output: output * scale)
        elif kind == "pre-hook(scale)":
            layer.register_forward_pre_hook(lambda m, args: (args[0] * scale,))
        elif kind == "global-hook(store)":

            def store(m: nn.Module, args: Any, output: Any) -> None:
                if m is layer:
                    tap[key] = output

            self.global_hooks.append(store)
            self.penalties.append((f"globally hooked output of {name}", coef, lambda: tap[key]))
        elif kind == "global-hook(scale)":

            def rescale(m: nn.Module, args: Any, output: Any) -> Any:
                return output * scale if m is layer else None

            self.global_hooks.append(rescale)
        elif kind == "cache(self)":
            self.penalties.append((f"self-cached output of {name}", coef, lambda: layer.cache))
        else:
            module = Cache(layer)
            self.penalties.append((f"cached output of {name}", coef, lambda: module.cache))
        text = f"{name} with {kind}" + (f" x{scale:.2f}" if "scale" in kind else "")
        made = self._add(module, shape, text, kind, name.split("(")[0])
        self.fresh = True
        return made

    def _subclass(self, shape: Shape) -> Made:
        """A layer subclass that is nearly, but not exactly, its base layer on tiny values."""
        d = self.draw
        width = shape[-1]
        if len(shape) == 1 and d.coin(0.5):
            norm = SiluBatchNorm1d(width)

            def tiny() -> None:
                norm.weight.mul_(1e-4)
                norm.bias.mul_(1e-8)
                norm.running_mean.mul_(1e-4)

            self.small.append(tiny)
            body = nn.Sequential(
                Fn("x * 1e-4", lambda x: x * 1e-4), norm, Fn("x * 1e4", lambda x: x * 1e4)
            )
            text = f"1e-4 * x > SiluBatchNorm1d({width},eval, 1e-4 weights) > 1e4 * x"
            return self._add(body, shape, text, "SiluBatchNorm1d", "BatchNorm1d(eval)")
        if self.family in ("cnn1d", "cnn2d") and d.coin(0.6):
            channels, out = shape[0], d.int(1, 4)
            conv = (ExpConv2d if len(shape) == 3 else ExpConv1d)(channels, out, 1)
            self.small.append(lambda: conv.weight.mul_(1e-4))
            text = f"{type(conv).__name__}({channels},{out},k1, 1e-4 weights)"
            return self._add(conv, (out, *shape[1:]), text, "ExpConv")
        out = d.int(2, 5)
        layer = ExpLinear(width, out)
        self.small.append(lambda: layer.weight.mul_(1e-4))
        text = f"ExpLinear({width},{out}, 1e-4 weights)"
        return self._add(layer, (*shape[:-1], out), text, "ExpLinear")

    def _attention(self, shape: Shape) -> Made:
        """Attention over the tokens (axis 1), or over time (axis 0) in a sequence-first model."""
        d = self.draw
        width = shape[-1]
        first = shape[0] is None
        kind = d.choice(["MultiheadAttention", "attention(softmax)", "attention(linear)"])
        if first or kind == "MultiheadAttention":
            heads = d.choice([h for h in (1, 2) if width % h == 0])
            causal = d.coin(0.3)
            attention = nn.MultiheadAttention(width, heads, bias=d.coin(0.7), batch_first=not first)
            self.sequential = True
            text = f"MultiheadAttention({width},{heads} heads{',causal' if causal else ''})"
            return self._add(SelfAttention(attention, causal), shape, text, "MultiheadAttention")
        if kind == "attention(softmax)" and d.coin(0.4) and width % 2 == 0:
            layer = nn.TransformerEncoderLayer(width, 2, 2 * width, 0.0, batch_first=True)
            self.sequential = True
            return self._add(
                layer, shape, f"TransformerEncoderLayer({width})", "TransformerEncoderLayer"
            )
        softmax, causal = kind == "attention(softmax)", d.coin(0.3)
        text = f"{kind}({width}{',causal' if causal else ''})"
        return self._add(Attention(width, softmax, causal), shape, text, kind)

    def _token_op(self, shape: Shape) -> Made:
        """Positions reading each other: along axis 1 (tokens), or axis 0 when that is time."""
        if shape[0] is None:
            return self._batch_coupling(shape)
        kind = self.draw.choice(
            ["token-0-added", "roll(tokens)", "cumsum(tokens)", "x-mean(tokens)"]
        )
        fns = {
            "token-0-added": (lambda x: x + x[:, :1], "x + x[:, :1]"),
            "roll(tokens)": (lambda x: x + torch.roll(x, 1, 1), "x + roll(x, 1, tokens)"),
            "cumsum(tokens)": (lambda x: x.cumsum(1), "cumsum(tokens)"),
            "x-mean(tokens)": (lambda x: x - x.mean(1, keepdim=True), "x - mean(tokens)"),
        }
        fn, text = fns[kind]
        return self._add(Fn(text, fn), shape, text, kind)

    def _rnn_op(self, shape: Shape) -> Made:
        module, hidden = self._recurrent(shape[-1], batch_first=True)
        text = self.parts.pop()
        return self._add(module, (*shape[:-1], hidden), text)

    # ------------------------------------------------------------------------- images

    def _conv(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        transposed = d.coin(0.15)
        groups = d.choice([g for g in (1, 1, 2, channels) if channels % g == 0])
        out = groups * d.int(1, max(1, 4 // groups))
        kernel = d.int(1, 3)
        stride = d.choice([1, 1, 2])
        dilation = d.choice([1, 1, 2])
        bias = d.coin(0.8)
        name = ("ConvTranspose" if transposed else "Conv") + f"{dims}d"
        tags = [name] + (["grouped-conv"] if groups > 1 else [])
        tags += ["strided-conv"] if stride > 1 else []
        tags += ["dilated-conv"] if dilation > 1 else []
        if transposed:
            kernel = max(kernel, 2)
            module = getattr(nn, name)(
                channels, out, kernel, stride=stride, groups=groups, bias=bias, dilation=dilation
            )
            size = [(s - 1) * stride + dilation * (kernel - 1) + 1 for s in spatial]
            if math.prod(size) > (30 if dims == 2 else 10):
                return None
            text = f"{name}({channels},{out},k{kernel},s{stride},d{dilation},g{groups})"
            made = self._add(module, (out, *size), text, *tags)
            self.fresh = True
            return made
        padding: int | str = d.choice([0, 1, 1, "same", "valid"])
        if padding == "same" and stride > 1:
            padding = 1
        mode = d.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        reach = dilation * (kernel - 1)
        pads = [reach // 2 + reach % 2] * dims if padding == "same" else []
        pads = pads or [0 if padding == "valid" else padding] * dims  # type: ignore[list-item]
        if mode == "reflect" and any(p >= s for p, s in zip(pads, spatial)):
            mode = "zeros"
        if mode == "circular" and any(p > s for p, s in zip(pads, spatial)):
            mode = "zeros"
        if not any(pads):
            mode = "zeros"
        if padding == "same":
            size = list(spatial)
        else:
            size = [(s + 2 * p - reach - 1) // stride + 1 for s, p in zip(spatial, pads)]
        if min(size) < 1:
            return None
        module = getattr(nn, name)(
            channels,
            out,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=mode,
        )
        if mode != "zeros":
            tags.append(f"conv-padding({mode})")
        text = f"{name}({channels},{out},k{kernel},s{stride},d{dilation},g{groups},p{padding}"
        text += f"{'' if mode == 'zeros' else ',' + mode}{'' if bias else ',nobias'})"
        made = self._add(module, (out, *size), text, *tags)
        self.fresh = True
        return made

    def _pool(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        kind = d.choice(["MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool"])
        if kind.startswith("Adaptive"):
            size = [min(s, 2) for s in spatial]
            module = getattr(nn, f"{kind}{dims}d")(size if dims > 1 else size[0])
            return self._add(module, (channels, *size), f"{kind}{dims}d({size})", kind)
        if min(spatial) < 2:
            return None
        stride = d.choice([1, 2])
        size = [(s - 2) // stride + 1 for s in spatial]
        if kind == "LPPool":
            norm = d.choice([1, 2])  # odd powers of negative sums have no real root
            module = getattr(nn, f"LPPool{dims}d")(norm, 2, stride=stride)
            return self._add(
                module, (channels, *size), f"LPPool{dims}d(p{norm},k2,s{stride})", kind
            )
        module = getattr(nn, f"{kind}{dims}d")(2, stride=stride)
        return self._add(module, (channels, *size), f"{kind}{dims}d(k2,s{stride})", kind)

    def _resample(self, shape: Shape) -> Made:
        d = self.draw
        dims = len(shape) - 1
        channels, spatial = shape[0], list(shape[1:])
        kinds = {"nearest": 1, "linear": 1, "pad": 2}
        kind = d.weighted({**kinds, "shuffle": 1, "unshuffle": 1} if dims == 2 else kinds)
        if kind in ("nearest", "linear"):
            size = [2 * s for s in spatial]
            if math.prod(size) > (40 if dims == 2 else 14):
                return None
            mode = kind if kind == "nearest" else ("bilinear" if dims == 2 else "linear")
            corners = None if kind == "nearest" else d.coin(0.5)
            module = nn.Upsample(scale_factor=2, mode=mode, align_corners=corners)
            text = f"Upsample(x2,{mode}{',corners' if corners else ''})"
            return self._add(module, (channels, *size), text, f"Upsample({kind})")
        if kind == "shuffle":
            size = [2 * s for s in spatial]
            if math.prod(size) > 36:
                return None
            if channels % 4 == 0:
                module, text, out = nn.PixelShuffle(2), "PixelShuffle(2)", channels // 4
            else:
                module = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.PixelShuffle(2))
                text, out = f"Conv2d({channels},4,k1) > PixelShuffle(2)", 1
            return self._add(module, (out, *size), text, "PixelShuffle", "Conv2d")
        if kind == "unshuffle":
            height, width = spatial
            module = nn.PixelUnshuffle(2)
            text = "PixelUnshuffle(2)"
            if height % 2 or width % 2:
                pad = [0, width % 2, 0, height % 2]
                fn = lambda x: F.pad(x, pad, mode="replicate")  # noqa: E731
                module = nn.Sequential(Fn("pad to even", fn), module)
                text = f"F.pad({pad},replicate) > {text}"
            size = [(s + 1) // 2 for s in spatial]
            if 4 * channels * math.prod(size) > 64:
                return None
            return self._add(module, (4 * channels, *size), text, "PixelUnshuffle")
        mode = d.choice(["constant", "reflect", "replicate", "circular"])
        if mode == "reflect" and min(spatial) < 2:
            mode = "constant"
        size = [s + 2 for s in spatial]
        if math.prod(size) > (49 if dims == 2 else 14):
            return None
        value = d.uniform(-1, 1) if mode == "constant" else None
        fn = lambda x: F.pad(x, [1, 1] * dims, mode=mode, value=value)  # noqa: E731
        return self._add(
            Fn(f"pad({mode})", fn), (channels, *size), f"F.pad(1,{mode})", f"pad({mode})"
        )


_RMSNORM = getattr(nn, "RMSNorm", None)


def _base_loss(kind: str, delta: float, smoothing: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of ``kind`` between output rows ``y`` (``(R, K)``) and their targets."""
    if kind == "mse-mean":
        return F.mse_loss
    if kind == "mse-sum":
        return lambda y, t: F.mse_loss(y, t, reduction="sum")
    if kind == "huber":
        return lambda y, t: F.huber_loss(y, t, delta=delta)
    if kind == "cubic":
        return lambda y, t: ((y - t) ** 3).mean() + (y - t).pow(2).mean()
    if kind == "log-cosh":
        return lambda y, t: torch.log(torch.cosh(y - t)).mean()
    if kind == "cross-entropy":
        return lambda y, t: F.cross_entropy(y, t, label_smoothing=smoothing)
    if kind == "nll":
        return lambda y, t: F.nll_loss(F.log_softmax(y, -1), t)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits
    if kind == "covariance":

        def covariance(y: Tensor, t: Tensor) -> Tensor:
            centred = y - y.mean(0, keepdim=True)
            cov = centred.T @ centred / y.shape[0]
            return (cov - torch.eye(y.shape[1], dtype=y.dtype)).pow(2).sum() + F.mse_loss(y, t)

        return covariance

    def info_nce(y: Tensor, t: Tensor) -> Tensor:
        logits = F.normalize(y, dim=-1) @ F.normalize(t, dim=-1).T / 0.5
        return F.cross_entropy(logits, torch.arange(y.shape[0]))

    return info_nce
