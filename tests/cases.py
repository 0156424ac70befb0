"""The model zoo shared by the test suite: small lazy cases built in float64.

Each :class:`Case` holds factories (called only when a test builds the case) for a model, a
loss function, inputs and targets, plus a seed and what a test needs to know about it (which
parameters are frozen or unused, whether the forward pass draws random numbers). The models
are tiny (tens to low hundreds of parameters) so a dense reference Hessian is cheap.

:func:`build` turns a case into a :class:`Built` with the model, its data, the default
parameter selection (all trainable parameters, in model order, with their names) and the loss
closure, created with a fixed seed, in the requested dtype, without touching the global RNG
or the default dtype.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CASES", "Built", "Case", "build", "case_by_id", "closure", "default_dtype"]


@dataclass(frozen=True)
class Case:
    """A lazily built test problem.

    Attributes:
        id: Readable test id.
        model: Factory for the model (set to its train/eval mode).
        loss_fn: Factory for ``loss_fn(outputs, targets)``.
        inputs: Factory for the model's input: a tensor or a tuple of positional arguments.
        targets: Factory for the targets.
        seed: Seed of everything the factories draw.
        frozen: Names of parameters with ``requires_grad=False`` (left out by default).
        unused: Names of parameters the loss does not depend on.
        stochastic: Whether the forward pass draws random numbers (dropout in train mode).
    """

    id: str
    model: Callable[[], nn.Module]
    loss_fn: Callable[[], Callable[[object, object], Tensor]]
    inputs: Callable[[], Tensor | tuple[Tensor, ...]]
    targets: Callable[[], Tensor]
    seed: int
    frozen: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    stochastic: bool = False


@dataclass
class Built:
    """A case built in one dtype: the model, its data and the default parameter selection.

    Attributes:
        case: The case it was built from.
        model: The model.
        loss_fn: The loss function.
        inputs: The model's input (tensor or tuple).
        targets: The targets.
        names: Names of the trainable parameters, in model order.
        params: The trainable parameters, in model order.
        func: The loss closure ``loss_fn(model(*inputs), targets)``.
    """

    case: Case
    model: nn.Module
    loss_fn: Callable[[object, object], Tensor]
    inputs: Tensor | tuple[Tensor, ...]
    targets: Tensor
    names: list[str]
    params: list[Tensor]
    func: Callable[[], Tensor]

    def select(self, names: Sequence[str]) -> list[Tensor]:
        """The parameters with the given names, in the order given."""
        named = dict(self.model.named_parameters())
        return [named[name] for name in names]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set the default dtype for the block, restoring the previous one after."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def call_model(model: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Call the model on a tensor or on a tuple of positional arguments."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def closure(
    model: nn.Module,
    loss_fn: Callable[[object, object], Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
) -> Callable[[], Tensor]:
    """The loss closure of a model on one batch."""
    return lambda: loss_fn(call_model(model, inputs), targets)


def build(
    case: Case, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> Built:
    """Build a case with its seed in float64 on the CPU, then move it to ``dtype`` and ``device``.

    A case built in float32 (or on a GPU) is its float64 CPU build rounded, so the builds are
    comparable. Integer inputs and targets (class labels, token indices) keep their integer
    dtype. The global RNG and the default dtype are left alone.
    """
    with torch.random.fork_rng(), default_dtype(torch.float64):
        torch.manual_seed(case.seed)
        model = case.model().to(device, dtype)
        inputs = _cast(case.inputs(), dtype, device)
        targets = _cast(case.targets(), dtype, device)
    loss_fn = case.loss_fn()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return Built(
        case=case,
        model=model,
        loss_fn=loss_fn,
        inputs=inputs,
        targets=targets,
        names=[n for n, _ in named],
        params=[p for _, p in named],
        func=closure(model, loss_fn, inputs, targets),
    )


def _cast(
    data: Tensor | tuple[Tensor, ...], dtype: torch.dtype, device: torch.device | str
) -> Tensor | tuple[Tensor, ...]:
    if isinstance(data, tuple):
        return tuple(_cast(t, dtype, device) for t in data)  # type: ignore[misc]
    return data.to(device, dtype if data.is_floating_point() else data.dtype)


# ----------------------------------------------------------------------------- models


def _mlp(*sizes: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh())
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _cnn(train: bool) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )
    bn = model[1]
    with torch.no_grad():  # running statistics away from their initial values
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
    bn.num_batches_tracked.fill_(3)
    return model.train(train)


class _GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


class _Attention(nn.Module):
    """Self-attention through ``scaled_dot_product_attention`` (``need_weights=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(a.mean(dim=1))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


class _SharedTwice(nn.Module):
    """One ``Linear`` applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _TiedEmbedding(nn.Module):
    """A language-model-style tie: the output layer reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight  # named_parameters lists it once, as embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(tokens)))


class _Temperature(nn.Module):
    """Logits scaled by a learnable 0-d parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp(3, 4, 3)
        self.log_temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * torch.exp(self.log_temperature)


class _Unused(nn.Module):
    """A registered module that the forward pass never calls, between two used ones."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.unused = nn.Linear(4, 1)
        self.second = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


def _frozen() -> nn.Module:
    model = _mlp(3, 4, 2)
    model[0].bias.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- data


def _randn(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape)


def _labels(n: int, classes: int) -> Callable[[], Tensor]:
    return lambda: torch.randint(classes, (n,))


def _cross_entropy() -> Callable[[object, object], Tensor]:
    return nn.CrossEntropyLoss()


def _mse(reduction: str) -> Callable[[], Callable[[object, object], Tensor]]:
    return lambda: nn.MSELoss(reduction=reduction)


CASES: list[Case] = [
    Case("mlp-tanh-ce", lambda: _mlp(4, 5, 3), _cross_entropy, _randn(6, 4), _labels(6, 3), 0),
    Case("mse-mean", lambda: _mlp(3, 4, 2), _mse("mean"), _randn(6, 3), _randn(6, 2), 1),
    Case("mse-sum", lambda: _mlp(3, 4, 2), _mse("sum"), _randn(6, 3), _randn(6, 2), 2),
    Case("cnn-bn-train", lambda: _cnn(True), _cross_entropy, _randn(4, 1, 5, 5), _labels(4, 3), 3),
    Case("cnn-bn-eval", lambda: _cnn(False), _cross_entropy, _randn(4, 1, 5, 5), _labels(4, 3), 4),
    Case("gru", _GRUClassifier, _cross_entropy, _randn(3, 4, 3), _labels(3, 2), 5),
    Case("attention", _Attention, _cross_entropy, _randn(3, 5, 4), _labels(3, 3), 6),
    Case("transformer", _Transformer, _cross_entropy, _randn(3, 5, 4), _labels(3, 3), 7),
    Case(
        "multi-input",
        _TwoInputs,
        _cross_entropy,
        lambda: (torch.randn(5, 3), torch.randn(5, 2)),
        _labels(5, 2),
        8,
    ),
    Case("shared-twice", _SharedTwice, _cross_entropy, _randn(5, 3), _labels(5, 2), 9),
    Case(
        "tied-embedding",
        _TiedEmbedding,
        _cross_entropy,
        lambda: torch.randint(5, (6,)),
        _labels(6, 5),
        10,
    ),
    Case("scalar-param", _Temperature, _cross_entropy, _randn(5, 3), _labels(5, 3), 14),
    Case("frozen", _frozen, _mse("mean"), _randn(5, 3), _randn(5, 2), 11, frozen=("0.bias",)),
    Case(
        "unused",
        _Unused,
        _mse("mean"),
        _randn(5, 3),
        _randn(5, 2),
        12,
        unused=("unused.weight", "unused.bias"),
    ),
    Case(
        "dropout",
        lambda: _mlp(4, 6, 3, dropout=0.3),
        _cross_entropy,
        _randn(6, 4),
        _labels(6, 3),
        13,
        stochastic=True,
    ),
]
"""Every case of the zoo, in a fixed order."""


def case_by_id(case_id: str) -> Case:
    """The case with the given id."""
    for case in CASES:
        if case.id == case_id:
            return case
    raise KeyError(case_id)
