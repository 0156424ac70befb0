"""Data sets as users pass them: DataLoaders, shuffled ones, random augmentation; no_grad.

A DataLoader with a fixed order gives the oracle's data-set Hessian. Data whose passes differ
(a shuffling DataLoader, augmentation drawing fresh noise on every pass) is refused with an
error that says so, and the refusal leaves the model as it was, like every other call.
Iterating a DataLoader draws its base seed from the global RNG; the library's passes over
data must not let that show (:func:`test_dataloaders_leave_the_global_rng`).
"""

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import arch_params, checked
from tests.real.models import build


def _dataset(arch):
    inputs = torch.cat([x for x, _ in arch.batches])
    targets = torch.cat([y for _, y in arch.batches])
    return TensorDataset(inputs, targets)


def test_dataloader_in_a_fixed_order(arch):
    sizes = [x.shape[0] for x, _ in arch.batches]
    starts = [sum(sizes[:b]) for b in range(len(sizes))]
    order = [list(range(start, start + n)) for start, n in zip(starts, sizes)]
    loader = DataLoader(_dataset(arch), batch_sampler=order)
    H = oracle.arch_hessian(arch.name, arch.mode, "batches")
    operator = checked(
        arch.model,
        ts.HessianOperator.from_model,
        arch.model,
        arch.loss_fn,
        loader,
        params=arch.subset,
    )
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(7), dtype=H.dtype)
    assert_close(checked(arch.model, operator.matmat, V), H @ V)


def test_shuffling_dataloader_is_refused(arch):
    loader = DataLoader(_dataset(arch), batch_size=5, shuffle=True)
    with pytest.raises(ValueError, match=r"RandomSampler draws another order.*shuffle=False"):
        checked(arch.model, ts.HessianOperator.from_model, arch.model, arch.loss_fn, loader)
    with pytest.raises(ValueError, match=r"model_top_eigenvalues: data is a DataLoader whose"):
        checked(arch.model, ts.model_top_eigenvalues, arch.model, arch.loss_fn, loader)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloaders_leave_the_global_rng(shuffle):
    arch = build("resnet", "train")
    loader = DataLoader(_dataset(arch), batch_size=5, shuffle=shuffle)
    model, loss_fn = arch.model, arch.loss_fn
    if shuffle:
        with pytest.raises(ValueError, match="shuffle=False"):
            checked(model, ts.HessianOperator.from_model, model, loss_fn, loader)
        return
    operator = checked(model, ts.HessianOperator.from_model, model, loss_fn, loader)
    checked(model, operator.matvec, torch.ones(operator.shape[0], dtype=torch.float64))
    checked(model, ts.model_hessian_trace, model, loss_fn, loader, params="fc.*", method="exact")


class Augmented:
    """Batches with fresh noise added to the inputs on every pass (its own generator)."""

    def __init__(self, batches):
        self.batches = batches
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):
        for x, y in self.batches:
            yield x + 0.1 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype), y


@pytest.mark.parametrize("arch", arch_params(["resnet", "vit", "mobilenet"]), indirect=True)
def test_random_augmentation_is_refused(arch):
    data = Augmented(arch.batches)
    operator = checked(
        arch.model, ts.HessianOperator.from_model, arch.model, arch.loss_fn, data, params="*bias"
    )
    v = torch.ones(operator.shape[0], dtype=torch.float64)
    checked(arch.model, operator.matvec, v)  # the first pass defines the data
    with pytest.raises(ValueError, match=r"data batch 0 differs between passes over the data"):
        checked(arch.model, operator.matvec, v)
    with pytest.raises(ValueError, match=r"model_hessian_trace: data batch 0 differs"):
        checked(arch.model, ts.model_hessian_trace, arch.model, arch.loss_fn, data)


def test_calls_under_no_grad_and_inference_mode(arch):
    x, y = arch.batch
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(8), dtype=H.dtype)
    with torch.no_grad():
        product = checked(
            arch.model, ts.model_hvp, arch.model, arch.loss_fn, x, y, v, params=arch.subset
        )
    assert_close(product, H @ v)
    with torch.inference_mode():
        trace = checked(
            arch.model,
            ts.model_hessian_trace,
            arch.model,
            arch.loss_fn,
            arch.batch,
            params=arch.small,
            method="exact",
        )
    rows = torch.cat([torch.arange(H.shape[0])[_rows(arch, n)] for n in arch.small])
    assert_close(trace.value, H[rows][:, rows].trace())


def _rows(arch, name):
    named = dict(arch.model.named_parameters())
    start = 0
    for n in arch.subset:
        if n == name:
            return slice(start, start + named[n].numel())
        start += named[n].numel()
    raise KeyError(name)
