"""Helpers for the core tests: random vectors, call-recording closures, model snapshots."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def like(params: Sequence[Tensor], seed: int, k: int | None = None) -> list[Tensor]:
    """A random vector like ``params`` (with a leading ``k`` when given), from ``seed``."""
    g = torch.Generator(device=params[0].device).manual_seed(seed)
    lead = () if k is None else (k,)
    return [
        torch.randn((*lead, *p.shape), generator=g, dtype=p.dtype, device=p.device) for p in params
    ]


class Recorder:
    """A closure (or a loss function) that counts its calls."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: object) -> Tensor:
        self.calls += 1
        return self.fn(*args)


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything a call must leave unchanged: values, ``.grad``, flags, buffers, modes, RNG."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_ids": {n: id(b) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(before: dict[str, object], model: nn.Module) -> None:
    """Compare a model (and the global RNG) with a :func:`snapshot`, exactly."""
    after = snapshot(model)
    for name, value in before["params"].items():
        torch.testing.assert_close(after["params"][name], value, rtol=0, atol=0)
    for name, grad in before["grads"].items():
        assert after["grads"][name] is grad, f".grad of {name} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        torch.testing.assert_close(after["buffers"][name], value, rtol=0, atol=0)
    assert after["buffer_ids"] == before["buffer_ids"]
    assert after["training"] == before["training"]
    assert torch.equal(after["rng"], before["rng"]), "the global RNG was advanced"


def tensors_of(result: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The tensors of a result: a tensor or a list of tensors."""
    return [result] if isinstance(result, Tensor) else list(result)
