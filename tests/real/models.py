"""Tiny versions of the architectures users bring, with their data, built in float64.

* :class:`ResNet`: a CIFAR-style ResNet (BatchNorm, basic blocks with an in-place residual
  add and ``ReLU(inplace=True)``, a strided block with a 1x1 convolution shortcut), as
  torchvision's ``BasicBlock``.
* :class:`VisionTransformer`: a patch convolution, a class token, learned position
  embeddings and ``nn.TransformerEncoder`` (pre-norm LayerNorm, GELU, dropout everywhere).
* :class:`LSTMLanguageModel`: PyTorch's word-language-model example in small: embedding,
  two-layer LSTM with dropout between the layers, a decoder whose weight is the embedding's;
  :class:`PackedLanguageModel` runs it on packed sequences of unequal lengths
  (``model(tokens, lengths)``, :func:`make_packed`).
* :class:`MobileNet`: a MobileNetV3-style CNN: GroupNorm, Hardswish, an inverted residual
  block with a depthwise convolution and squeeze-excite gated by ``nn.Hardsigmoid`` (as
  torchvision's ``SqueezeExcitation`` in MobileNetV3), a classifier with dropout.

:func:`build` makes an :class:`Arch` in train or eval mode: the model, its loss function, a
data set of several batches of different sizes (the first is also the one batch), the names
of a parameter subset (the last layer, a normalization layer or the tied embedding, and a
convolution or linear layer inside a block) small enough for a dense oracle, and a smaller
part of it for the analyses. Everything is drawn from fixed seeds in a forked RNG,
so building never touches the global RNG.

The ``make_*`` and ``*_data`` functions take no arguments, for the report command
(``--model tests.real.models:make_resnet --data tests.real.models:resnet_data``).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "ARCHS",
    "MODES",
    "Arch",
    "LSTMLanguageModel",
    "MobileNet",
    "PackedLanguageModel",
    "ResNet",
    "VisionTransformer",
    "build",
    "make_data",
    "make_model",
    "make_packed",
    "sequence_loss",
]

DTYPE = torch.float64
CLASSES = 5
IMAGE = (3, 8, 8)
VOCAB = 11
LENGTH = 6
DATA_SIZES = (6, 3, 5)
"""Samples in each batch of the data set (unequal, so the weighting by size matters); the
first is also the one batch of the one-batch tests (seed 0 in both)."""


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions, in-place residual add and ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, a block at width 4, a strided block at width 6."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(4, 4))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------- ViT


class VisionTransformer(nn.Module):
    """Patch convolution, class token, position embeddings, a pre-norm transformer encoder."""

    def __init__(
        self, dim: int = 8, depth: int = 1, heads: int = 2, patch: int = 4, dropout: float = 0.2
    ) -> None:
        super().__init__()
        patches = (IMAGE[1] // patch) * (IMAGE[2] // patch)
        self.patch_embed = nn.Conv2d(IMAGE[0], dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=2 * dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        return self.head(self.encoder(x)[:, 0])


# ----------------------------------------------------------------------------- LSTM LM


class LSTMLanguageModel(nn.Module):
    """Embedding, LSTM, decoder tied to the embedding (PyTorch's word-language-model example)."""

    def __init__(self, dim: int = 4, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(VOCAB, dim)
        self.rnn = nn.LSTM(dim, dim, layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(dim, VOCAB)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(out))


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the positions of a ``(batch, length)`` target
    (those with target ``-100``, padding, left out)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class PackedLanguageModel(LSTMLanguageModel):
    """The language model on padded sequences of different lengths: ``model(tokens, lengths)``.

    The embeddings are packed (unsorted lengths) before the LSTM and padded again after it.
    """

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # type: ignore[override]
        emb = self.drop(self.encoder(tokens))
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.decoder(self.drop(out))


def make_packed(mode: str) -> tuple[nn.Module, list]:
    """The packed language model (the LSTM's weights) and its data set of padded batches.

    Each batch is ``((tokens, lengths), targets)`` with targets ``-100`` past each length.
    """
    with torch.random.fork_rng():
        torch.manual_seed(SPECS["lstm"][0])
        model = _perturbed(PackedLanguageModel().to(DTYPE))
    batches = []
    g = torch.Generator().manual_seed(50)
    for tokens, targets in make_data("lstm"):
        lengths = torch.randint(2, LENGTH + 1, (tokens.shape[0],), generator=g)
        padding = torch.arange(LENGTH)[None, :] >= lengths[:, None]
        batches.append(((tokens, lengths), targets.masked_fill(padding, -100)))
    return model.train(mode == "train"), batches


# ----------------------------------------------------------------------------- MobileNet


class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` as MobileNetV3 uses it: ReLU, then a hardsigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


def conv_norm_act(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` with GroupNorm and an in-place Hardswish."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.GroupNorm(2, cout),
    ]
    if act:
        layers.append(nn.Hardswish(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), squeeze-excite, project (1x1), residual add."""

    def __init__(self, channels: int, hidden: int, squeeze: int) -> None:
        super().__init__()
        self.expand = conv_norm_act(channels, hidden, 1)
        self.dw = conv_norm_act(hidden, hidden, 3, groups=hidden)
        self.se = SqueezeExcitation(hidden, squeeze)
        self.project = conv_norm_act(hidden, channels, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class MobileNet(nn.Module):
    """A strided stem, one inverted residual block, pooling, a classifier with dropout."""

    def __init__(self, width: int = 8, hidden: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = conv_norm_act(IMAGE[0], width, 3, stride=2)
        self.block = InvertedResidual(width, hidden, squeeze=4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(width, hidden),
            nn.Hardswish(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.block(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Arch:
    """One architecture in one mode, with its data and the oracle's parameter subset.

    Attributes:
        name: ``"resnet"``, ``"vit"``, ``"lstm"`` or ``"mobilenet"``.
        mode: ``"train"`` or ``"eval"``.
        model: The model (float64, in ``mode``); its last parameter has a ``.grad``, the
            others have none.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batch: One ``(inputs, targets)`` batch, the first of ``batches``.
        batches: A data set: a list of batches of :data:`DATA_SIZES` samples.
        subset: Names of the parameters of the dense oracle (model order).
        small: A part of ``subset`` for the analyses (model order).
        stochastic: Whether the forward pass draws random numbers (dropout in train mode).
    """

    name: str
    mode: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch: tuple[Tensor, Tensor]
    batches: list[tuple[Tensor, Tensor]]
    subset: list[str]
    small: list[str]
    stochastic: bool

    @property
    def id(self) -> str:
        return f"{self.name}-{self.mode}"

    def modules(self, names: list[str]) -> list[str]:
        """The modules owning the named parameters, in model order (``groups="module"``)."""
        return list(dict.fromkeys(n.rpartition(".")[0] for n in names))

    def data(self, kind: str) -> list[tuple[Tensor, Tensor]]:
        """The batches of ``kind`` (``"batch"``: the one batch, ``"batches"``: the data set)."""
        return [self.batch] if kind == "batch" else self.batches

    def library_data(self, kind: str) -> object:
        """``data`` as the analyses take it: the one batch itself, or the list of batches."""
        return self.batch if kind == "batch" else self.batches


def _perturbed(model: nn.Module) -> nn.Module:
    """Move what starts at a constant (norm affine, running statistics, tokens) off it."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                module.weight.uniform_(0.6, 1.4)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed"):
                p.normal_(0.0, 0.5)
    return model


def _images(n: int) -> tuple[Tensor, Tensor]:
    return torch.randn(n, *IMAGE, dtype=DTYPE), torch.randint(0, CLASSES, (n,))


def _tokens(n: int) -> tuple[Tensor, Tensor]:
    text = torch.randint(0, VOCAB, (n, LENGTH + 1))
    return text[:, :-1], text[:, 1:]


SPECS: dict[
    str, tuple[int, Callable[[], nn.Module], Callable[[int], tuple], list[str], list[str]]
] = {
    "resnet": (
        10,
        ResNet,
        _images,
        [
            "layer1.0.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.bn2.weight",
            "layer2.0.bn2.bias",
            "fc.weight",
            "fc.bias",
        ],
        ["layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.downsample.0.weight", "fc.bias"],
    ),
    "vit": (
        20,
        VisionTransformer,
        _images,
        [
            "cls_token",
            "encoder.layers.0.self_attn.out_proj.weight",
            "encoder.layers.0.self_attn.out_proj.bias",
            "encoder.layers.0.norm1.weight",
            "encoder.layers.0.norm1.bias",
            "head.weight",
            "head.bias",
        ],
        [
            "cls_token",
            "encoder.layers.0.self_attn.out_proj.bias",
            "encoder.layers.0.norm1.weight",
            "encoder.layers.0.norm1.bias",
            "head.bias",
        ],
    ),
    "lstm": (
        30,
        LSTMLanguageModel,
        _tokens,
        ["encoder.weight", "rnn.bias_hh_l0", "rnn.weight_ih_l1", "decoder.bias"],
        ["rnn.bias_hh_l0", "decoder.bias"],
    ),
    "mobilenet": (
        40,
        MobileNet,
        _images,
        [
            "block.dw.0.weight",
            "block.dw.1.weight",
            "block.dw.1.bias",
            "block.se.fc1.weight",
            "block.se.fc1.bias",
            "classifier.3.weight",
            "classifier.3.bias",
        ],
        ["block.dw.1.weight", "block.dw.1.bias", "block.se.fc1.bias", "classifier.3.bias"],
    ),
}
"""Per architecture: seed, model class, data factory ``f(n) -> (inputs, targets)``, the
oracle's subset, and a smaller part of it for the analyses (a few dozen parameters of two to
four modules, so that Lanczos runs to exactness, and Hutch++ and XDiag sketches span the
block, within a few dozen products over the data set)."""

ARCHS = tuple(SPECS)
MODES = ("train", "eval")


def make_model(name: str, mode: str = "train") -> nn.Module:
    """The model of architecture ``name`` (float64, in ``mode``), from its fixed seed."""
    seed, cls, *_ = SPECS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _perturbed(cls().to(DTYPE))
    return model.train(mode == "train")


def make_data(name: str) -> list[tuple[Tensor, Tensor]]:
    """The data set of architecture ``name``: batches of :data:`DATA_SIZES` samples."""
    seed, _, draw, *_ = SPECS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        return [draw(n) for n in DATA_SIZES]


@functools.cache
def build(name: str, mode: str) -> Arch:
    """Architecture ``name`` in ``mode`` (cached: tests share it and must leave it unchanged)."""
    model = make_model(name, mode)
    last = list(model.parameters())[-1]
    last.grad = torch.full_like(last, 0.25)  # a .grad must stay; the others must stay None
    batches = make_data(name)
    order = [n for n, _ in model.named_parameters()]
    subset = sorted(SPECS[name][3], key=order.index)  # a selection keeps model order
    small = sorted(SPECS[name][4], key=order.index)
    stochastic = mode == "train" and any(isinstance(m, nn.Dropout) for m in model.modules())
    loss_fn = sequence_loss if name == "lstm" else nn.CrossEntropyLoss()
    return Arch(name, mode, model, loss_fn, batches[0], batches, subset, small, stochastic)


# ----------------------------------------------------------------------------- report CLI


def make_resnet() -> nn.Module:
    """The ResNet in train mode (for ``--model``)."""
    return make_model("resnet", "train")


def make_vit() -> nn.Module:
    """The ViT in train mode, dropout active (for ``--model``)."""
    return make_model("vit", "train")


def make_lstm() -> nn.Module:
    """The LSTM language model in train mode (for ``--model``)."""
    return make_model("lstm", "train")


def make_mobilenet() -> nn.Module:
    """The MobileNet-style CNN in train mode (for ``--model``)."""
    return make_model("mobilenet", "train")


def resnet_data() -> tuple[Tensor, Tensor]:
    """One batch (for ``--data``): a one-batch data set through BatchNorm in train mode."""
    return make_data("resnet")[0]


def vit_data() -> list[tuple[Tensor, Tensor]]:
    """Several batches (for ``--data``)."""
    return make_data("vit")


def lstm_data() -> list[tuple[Tensor, Tensor]]:
    """Several batches of token sequences (for ``--data``)."""
    return make_data("lstm")


def mobilenet_data() -> tuple[Tensor, Tensor]:
    """One batch (for ``--data``)."""
    return make_data("mobilenet")[0]
