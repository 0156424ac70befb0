"""The oracle itself: finite differences, symmetry, its two halves agreeing, and sensitivity.

The sensitivity tests make sure the comparisons of the tier can fail: the modes, the dropout
masks and the data set each change the matrices the library is compared with.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tests.real import oracle
from tests.real.models import ARCHS, MODES, build

ALL = [pytest.param(name, mode, id=f"{name}-{mode}") for name in ARCHS for mode in MODES]


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-6 * float(a.abs().max()))


def test_hardsigmoid_twin_matches_pytorch():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    z = x[(x.abs() - 3).abs() > 1e-9].requires_grad_(True)  # the kinks aside
    (expected,) = torch.autograd.grad(F.hardsigmoid(z).sum(), z)
    (got,) = torch.autograd.grad(oracle.hardsigmoid(z).sum(), z)
    assert_close(oracle.hardsigmoid(z), F.hardsigmoid(z), rtol=0, atol=0)
    # PyTorch's hardsigmoid backward scales by 1/6 rounded to float32 (3e-8 relative) also in
    # float64; the twin's 1/6 is float64's: equal at the default rtol
    assert_close(got, expected)
    # twice differentiable: d2/dx2 hardsigmoid(x^2) = 2 hardsigmoid'(x^2), hardsigmoid'' = 0
    x = x[(x.abs() - 3**0.5).abs() > 1e-9].requires_grad_(True)
    (first,) = torch.autograd.grad(oracle.hardsigmoid(x * x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    squared = (x * x).detach().requires_grad_(True)
    (slope,) = torch.autograd.grad(F.hardsigmoid(squared).sum(), squared)
    assert_close(second, 2 * slope)


@pytest.mark.parametrize(("name", "mode"), ALL)
def test_hessian_against_finite_differences(name, mode):
    arch = build(name, mode)
    H = oracle.arch_hessian(name, mode, "batches")
    assert_close(H, H.T)
    named = dict(arch.model.named_parameters())
    like = [named[n] for n in arch.subset]
    g = torch.Generator().manual_seed(3)
    eps = 1e-5
    for i in torch.randperm(H.shape[0], generator=g)[:3].tolist():
        e = torch.zeros(H.shape[0], dtype=torch.float64)
        e[i] = eps
        plus = oracle.gradient(
            arch.model, arch.loss_fn, arch.batches, arch.subset, oracle.unflat(e, like)
        )
        minus = oracle.gradient(
            arch.model, arch.loss_fn, arch.batches, arch.subset, oracle.unflat(-e, like)
        )
        # central differences: truncation O(eps^2), rounding O(1e-16 / eps) relative to |g|
        assert_close((plus - minus) / (2 * eps), H[i], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("name", "mode"), ALL)
def test_hvp_matches_dense_hessian(name, mode):
    arch = build(name, mode)
    H = oracle.arch_hessian(name, mode, "batches")
    named = dict(arch.model.named_parameters())
    v = oracle.random_like(arch.model, arch.subset, seed=4)
    got = oracle.hvp(arch.model, arch.loss_fn, arch.batches, v, arch.subset)
    assert [t.shape for t in got] == [named[n].shape for n in arch.subset]
    assert_close(oracle.flat(got), H @ oracle.flat(v))


@pytest.mark.parametrize("name", ARCHS)
def test_the_mode_changes_the_matrix(name):
    assert _differ(
        oracle.arch_hessian(name, "train", "batch"), oracle.arch_hessian(name, "eval", "batch")
    )


@pytest.mark.parametrize("name", [n for n in ARCHS if build(n, "train").stochastic])
def test_dropout_masks_change_the_matrix(name):
    arch = build(name, "train")
    seed0 = oracle.arch_hessian(name, "train", "batch")
    seed1 = oracle.hessian(arch.model, arch.loss_fn, [arch.batch], arch.subset, seeds=[1])
    assert _differ(seed0, seed1)


@pytest.mark.parametrize(("name", "mode"), ALL)
def test_the_data_set_changes_the_matrix(name, mode):
    assert _differ(
        oracle.arch_hessian(name, mode, "batch"), oracle.arch_hessian(name, mode, "batches")
    )


def test_the_resnet_is_stochastic_only_through_batchnorm():
    assert not build("resnet", "train").stochastic
    assert all(build(name, "train").stochastic for name in ("vit", "lstm", "mobilenet"))
