"""The model forms' plumbing: inputs, the loss closure, and restoring model state."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import assert_unchanged, like, snapshot
from torch_secorder import hessian_matrix, model_hessian_matrix, model_hvp
from torch_secorder.core._model import (
    batch_loss,
    call_model,
    model_objective,
    preserved_state,
    private_buffers,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- inputs


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x, y=None):
        out = torch.tanh(self.a(x))
        return out if y is None else out * torch.tanh(self.b(y))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_inputs_as_arguments(form):
    model = _Keywords().to(F64)
    x, y = _data()
    inputs = {"tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y}}[form]
    targets = torch.zeros(4, 2, dtype=F64)
    loss_fn = nn.MSELoss()
    expected = hessian_matrix(lambda: loss_fn(model(x, y), targets), list(model.parameters()))
    assert_close(model_hessian_matrix(model, loss_fn, inputs, targets), expected)


def test_single_tensor_input_is_one_argument():
    model = _Keywords().to(F64)
    x, _ = _data()
    assert_close(call_model(model, x), model(x))
    assert_close(call_model(model, {"x": x}), model(x))


def test_multi_input_case_matches_reference():
    built = build(case_by_id("multi-input"))
    assert isinstance(built.inputs, tuple)
    v = like(built.params, seed=1)
    result = model_hvp(built.model, built.loss_fn, built.inputs, built.targets, v)
    expected = ref.unflat(ref.case_hessian(built) @ ref.flat(v), built.params)
    for r, e in zip(result, expected):
        assert_close(r, e)


def test_targets_are_passed_through_unchanged():
    model = nn.Linear(2, 1).to(F64)
    x, _ = _data()
    seen = []

    def loss_fn(out, targets):
        seen.append(targets)
        return (out**2).mean() * targets["scale"]

    targets = {"scale": 3.0}
    batch_loss(model, loss_fn, x, targets)()
    assert seen == [targets]
    assert seen[0] is targets


def test_batch_loss_is_the_loss_of_the_batch(case):
    func = batch_loss(case.model, case.loss_fn, case.inputs, case.targets)
    with torch.random.fork_rng():
        value = func()
    with torch.random.fork_rng():
        expected = case.func()
    assert_close(value, expected)


# ----------------------------------------------------------------------------- state


class _Mischief(nn.Module):
    """A forward pass that touches every kind of state a model has."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(2))

    def forward(self, x):
        self.calls += 1  # in place
        self.scratch = torch.ones(2, dtype=self.scratch.dtype)  # replaces the buffer object
        out = self.bn(self.lin(x))
        self.lin.train(not self.lin.training)  # flips a submodule's mode
        return out


def test_private_buffers_leave_the_models_buffers_untouched():
    model = _Mischief().to(F64)
    model.bn.eval()  # mixed modes
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    model.bn.train()
    buffers = dict(model.named_buffers())
    versions = {n: b._version for n, b in buffers.items()}
    before = snapshot(model)
    x, _ = _data()
    with preserved_state(model), private_buffers(model):
        assert all(buffers[n] is not b for n, b in model.named_buffers())  # copies
        model(x)
        model(x)
    assert_unchanged(before, model)
    assert all(buffers[n] is b for n, b in model.named_buffers())  # the user's tensors
    assert {n: b._version for n, b in model.named_buffers()} == versions  # never written


def test_private_buffers_share_one_copy_of_a_shared_buffer():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    model[1].running_mean = model[0].running_mean
    with private_buffers(model):
        assert model[1].running_mean is model[0].running_mean
    assert model[1].running_mean is model[0].running_mean


def test_preserved_state_restores_modes_and_buffer_objects_on_exceptions():
    model = _Mischief().to(F64)
    before = snapshot(model)
    x, _ = _data()

    def run():
        with preserved_state(model), private_buffers(model):
            model(x)
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run()
    assert_unchanged(before, model)


def test_model_forms_restore_state_touched_by_the_forward():
    model = _Mischief().to(F64)
    x, _ = _data()
    before = snapshot(model)
    H = model_hessian_matrix(model, lambda out, t: (out**3).mean(), x, None)
    assert_unchanged(before, model)
    assert H.shape == (4 + 2 + 2 + 2, 4 + 2 + 2 + 2)


def test_model_objective_selects_and_names():
    built = build(case_by_id("mlp-tanh-ce"))
    with model_objective(
        "f", built.model, built.loss_fn, built.inputs, built.targets, "*.bias"
    ) as objective:
        assert objective.fname == "f"
        assert objective.names == ["0.bias", "2.bias"]
        assert objective.params == built.select(["0.bias", "2.bias"])
        assert objective.source == "loss_fn"
        assert_close(objective.func(), built.func())


def test_model_form_runs_in_the_models_mode():
    # eval mode uses the running statistics, train mode the batch's: different Hessians
    train = build(case_by_id("cnn-bn-train"))
    evaluation = build(case_by_id("cnn-bn-train"))
    evaluation.model.eval()
    H_train = model_hessian_matrix(train.model, train.loss_fn, train.inputs, train.targets)
    H_eval = model_hessian_matrix(
        evaluation.model, evaluation.loss_fn, evaluation.inputs, evaluation.targets
    )
    assert_close(H_train, ref.case_hessian(train))
    assert_close(H_eval, ref.hessian(ref.case_loss(evaluation), evaluation.params))
    assert not torch.allclose(H_train, H_eval)
    assert train.model.training
    assert not evaluation.model.training
