"""The random draw of a case, and the state the parts of its builder share."""

import random
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

F64 = torch.float64


class Draw:
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


class BuilderBase:
    """The state of one case being drawn, shared by the operation builders.

    Each subclass draws one family of operations; ``Builder`` combines them, so they call
    each other's methods and read what the stems set (``_stem_text``, ``embedding``).
    """

    def __init__(self, draw: Draw) -> None:
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

    def _add(self, module: nn.Module, shape: Shape, text: str, *tags: str) -> Made:
        self.parts.append(text)
        self.tags.update(tags)
        self.fresh = False
        return module, shape
