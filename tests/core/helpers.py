"""Helpers for the core tests: random vectors, call-recording closures, model snapshots, and a
model PyTorch cannot differentiate twice."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import torch_secorder as ts
from torch_secorder import flatten


def like(params: Sequence[Tensor], seed: int, k: int | None = None) -> list[Tensor]:
    """A random vector like ``params`` (with a leading ``k`` when given), from ``seed``.

    Drawn in float64 on the CPU, then cast to each parameter's dtype and device, so the same
    seed gives the same vector (up to rounding) in every dtype.
    """
    g = torch.Generator().manual_seed(seed)
    lead = () if k is None else (k,)
    return [
        torch.randn((*lead, *p.shape), generator=g, dtype=torch.float64).to(p.device, p.dtype)
        for p in params
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
        "grads": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "buffer_ids": {n: id(b) for n, b in model.named_buffers()},
        "versions": {n: t._version for n, t in (*model.named_parameters(), *model.named_buffers())},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(before: dict[str, object], model: nn.Module) -> None:
    """Compare a model (and the global RNG) with a :func:`snapshot`, exactly."""
    after = snapshot(model)
    for name, value in before["params"].items():
        torch.testing.assert_close(after["params"][name], value, rtol=0, atol=0)
    for name, (grad, value) in before["grads"].items():
        assert after["grads"][name][0] is grad, f".grad of {name} was replaced"
        if grad is not None:
            torch.testing.assert_close(grad, value, rtol=0, atol=0)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, value in before["buffers"].items():
        torch.testing.assert_close(after["buffers"][name], value, rtol=0, atol=0)
    assert after["buffer_ids"] == before["buffer_ids"]
    assert after["versions"] == before["versions"], "a parameter or buffer was written in place"
    assert after["training"] == before["training"]
    assert torch.equal(after["rng"], before["rng"]), "the global RNG was advanced"


def assert_like(result: object, expected: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """``result`` is a list like ``expected`` (shapes, params' dtypes) and close to it."""
    assert type(result) is list
    assert len(result) == len(params)
    for r, e, p in zip(result, expected, params):
        assert r.shape == e.shape
        assert r.dtype == p.dtype
        torch.testing.assert_close(r, e)


def tensors_of(result: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The tensors of a result: a tensor or a list of tensors."""
    return [result] if isinstance(result, Tensor) else list(result)


CALLS: dict[str, Callable[..., object]] = {
    "hvp": lambda b: ts.hvp(b.func, b.params, like(b.params, seed=0)),
    "hvp-flat": lambda b: ts.hvp(b.func, b.params, flatten(like(b.params, seed=0))),
    "batched_hvp": lambda b: ts.batched_hvp(b.func, b.params, like(b.params, seed=0, k=3)),
    "model_hvp": lambda b: ts.model_hvp(
        b.model, b.loss_fn, b.inputs, b.targets, like(b.params, seed=0)
    ),
    "hessian_diagonal": lambda b: ts.hessian_diagonal(b.func, b.params),
    "hessian_diagonal-v": lambda b: ts.hessian_diagonal(b.func, b.params, like(b.params, seed=0)),
    "model_hessian_diagonal": lambda b: ts.model_hessian_diagonal(
        b.model, b.loss_fn, b.inputs, b.targets
    ),
    "hessian_block": lambda b: ts.hessian_block(b.func, b.params[:1], b.params[1:]),
    "hessian_blocks": lambda b: ts.hessian_blocks(b.func, b.params),
    "hessian_matrix": lambda b: ts.hessian_matrix(b.func, b.params),
    "model_hessian_matrix": lambda b: ts.model_hessian_matrix(
        b.model, b.loss_fn, b.inputs, b.targets
    ),
}
"""Every core function, called on a built case with valid arguments."""

MODEL_FORMS = [name for name in CALLS if name.startswith("model_")]
CLOSURE_FORMS = [name for name in CALLS if not name.startswith("model_")]


class _Distances(nn.Module):
    """Distances to learned centres through ``torch.cdist``, which has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cdist(x, self.centres)


def cdist_model() -> nn.Module:
    """Linear, tanh, then :class:`_Distances` (module ``'2'``), float64, seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Tanh(), _Distances()).to(torch.float64)
