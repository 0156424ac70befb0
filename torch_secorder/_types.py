"""Type aliases shared across the package."""

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

LossClosure = Callable[[], Tensor]
"""A zero-argument callable returning a scalar loss."""

TensorList = list[Tensor]
"""One tensor per parameter, with the parameters' shapes ("like params")."""

Vector = Tensor | Sequence[Tensor]
"""A flat 1-D tensor of length ``P`` or a sequence of tensors like params."""

Params = Iterable[Tensor]
"""Any iterable of tensors to differentiate with respect to."""

ParamSelection = str | Iterable[str] | None
"""Parameter names or glob patterns selecting parameters of a model (``None``: trainable)."""
