"""No side effects: parameters, .grad, requires_grad, buffers, modes and the global RNG.

Model forms restore everything, also the buffers their forward pass updates (BatchNorm in train
mode). Closure forms cannot know the buffers a closure updates (that is the closure's own
effect), so they are checked on cases whose forward leaves buffers alone.
"""

import copy

import pytest
import torch

from tests import reference as ref
from tests.cases import build, case_by_id
from tests.core.helpers import CALLS, CLOSURE_FORMS, MODEL_FORMS, assert_unchanged, like, snapshot
from torch_secorder import (
    HessianOperator,
    hessian_diagonal,
    hvp,
    model_hessian_diagonal,
    model_hessian_matrix,
    model_hvp,
)


@pytest.mark.parametrize("case_id", ["cnn-bn-train", "cnn-bn-eval", "dropout", "frozen"])
@pytest.mark.parametrize("name", MODEL_FORMS)
def test_model_forms_leave_no_trace(name, case_id):
    built = build(case_by_id(case_id))
    before = snapshot(built.model)
    CALLS[name](built)
    assert_unchanged(before, built.model)


@pytest.mark.parametrize("case_id", ["cnn-bn-eval", "dropout", "frozen", "transformer"])
@pytest.mark.parametrize("name", CLOSURE_FORMS)
def test_closure_forms_leave_no_trace(name, case_id):
    built = build(case_by_id(case_id))
    before = snapshot(built.model)
    CALLS[name](built)
    assert_unchanged(before, built.model)


def test_model_form_restores_batchnorm_statistics_it_updated():
    # the forward pass does update the running statistics; the call puts them back
    built = build(case_by_id("cnn-bn-train"))
    bn = built.model[1]
    mean, count = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    built.func()
    assert not torch.equal(bn.running_mean, mean)
    assert bn.num_batches_tracked == count + 1
    before = snapshot(built.model)
    model_hessian_matrix(built.model, built.loss_fn, built.inputs, built.targets)
    assert_unchanged(before, built.model)


@pytest.mark.parametrize("name", list(CALLS))
def test_existing_grad_is_left_alone(name):
    built = build(case_by_id("mlp-tanh-ce"))
    for p in built.params:
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(built.model)
    CALLS[name](built)
    assert_unchanged(before, built.model)


@pytest.mark.parametrize("name", list(CALLS))
def test_frozen_parameter_stays_frozen(name):
    built = build(case_by_id("frozen"))
    built.params = [p for _, p in built.model.named_parameters()]  # the frozen bias included
    built.model.requires_grad_(False)
    before = snapshot(built.model)
    if name.startswith("model_"):
        with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
            CALLS[name](built)
    else:
        CALLS[name](built)
    assert_unchanged(before, built.model)


def test_vectors_and_data_are_not_modified():
    built = build(case_by_id("cnn-bn-eval"))
    v = like(built.params, seed=1)
    saved = [t.clone() for t in v]
    inputs, targets = built.inputs.clone(), built.targets.clone()
    hvp(built.func, built.params, v)
    hessian_diagonal(built.func, built.params, v)
    model_hvp(built.model, built.loss_fn, built.inputs, built.targets, v)
    for t, s in zip(v, saved):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    torch.testing.assert_close(built.inputs, inputs, rtol=0, atol=0)
    torch.testing.assert_close(built.targets, targets, rtol=0, atol=0)


def test_dropout_masks_do_not_advance_the_rng_and_repeat():
    built = build(case_by_id("dropout"))
    v = like(built.params, seed=2)
    first = hvp(built.func, built.params, v)
    second = hvp(built.func, built.params, v)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another RNG state draws other masks: the products really depend on the state
    torch.manual_seed(1)
    other = hvp(built.func, built.params, v)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


# ----------------------------------------------------------------------------- raising calls


class _Boom(Exception):
    pass


def _raising_loss(loss_fn):
    def fn(outputs, targets):
        loss_fn(outputs, targets)
        raise _Boom

    return fn


@pytest.mark.parametrize("case_id", ["cnn-bn-train", "dropout", "frozen"])
@pytest.mark.parametrize("name", MODEL_FORMS)
def test_model_forms_leave_no_trace_when_the_loss_raises(name, case_id):
    built = build(case_by_id(case_id))
    built.loss_fn = _raising_loss(built.loss_fn)
    before = snapshot(built.model)
    with pytest.raises(_Boom):
        CALLS[name](built)
    assert_unchanged(before, built.model)


@pytest.mark.parametrize("name", CLOSURE_FORMS)
def test_closure_forms_leave_no_trace_when_the_closure_raises(name):
    built = build(case_by_id("dropout"))  # draws dropout masks before raising
    frozen = built.model[0].bias
    frozen.requires_grad_(False)
    built.params = [p for _, p in built.model.named_parameters()]
    func = built.func

    def raising():
        func()
        raise _Boom

    built.func = raising
    before = snapshot(built.model)
    with pytest.raises(_Boom):
        CALLS[name](built)
    assert_unchanged(before, built.model)


def test_model_form_leaves_no_trace_after_a_strict_violation():
    built = build(case_by_id("unused"))
    built.model.train()
    before = snapshot(built.model)
    with pytest.raises(ValueError, match=r"does not depend on params\[2\] \('unused\.weight'\)"):
        model_hvp(
            built.model,
            built.loss_fn,
            built.inputs,
            built.targets,
            like(built.params, seed=3),
            strict=True,
        )
    assert_unchanged(before, built.model)


def test_model_form_leaves_no_trace_after_a_non_scalar_loss():
    built = build(case_by_id("cnn-bn-train"))
    before = snapshot(built.model)
    with pytest.raises(
        ValueError, match=r"^model_hessian_matrix: loss_fn must return a scalar loss; "
    ):
        model_hessian_matrix(built.model, lambda out, t: out, built.inputs, built.targets)
    assert_unchanged(before, built.model)


def _renorming_embedding():
    """An embedding with ``max_norm`` whose rows are too long: its forward shortens them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(6, 3, max_norm=1.0), torch.nn.Flatten(), torch.nn.Linear(6, 2)
    ).double()
    with torch.no_grad():
        model[0].weight.mul_(3)
    return model, torch.tensor([[1, 2], [3, 1], [4, 4]]), torch.tensor([0, 1, 1])


def test_weights_an_embedding_renormalises_are_restored():
    model, x, y = _renorming_embedding()
    loss_fn = torch.nn.CrossEntropyLoss()
    # the oracle: the Hessian where the forward evaluates the loss, at the renormed rows
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.embedding_renorm_(twin[0].weight, x.reshape(-1), 1.0, 2.0)
    twin[0].max_norm = None
    expected = ref.double_backward_hessian(lambda: loss_fn(twin(x), y), twin.parameters())
    # (the values are put back; the forward's renormalisation counts as an in-place write)
    before = [p.detach().clone() for p in model.parameters()]
    got = model_hessian_matrix(model, loss_fn, x, y)
    torch.testing.assert_close(got, expected)
    operator = HessianOperator.from_model(model, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])])
    operator.matvec(torch.ones(len(expected), dtype=torch.float64))
    diagonal = model_hessian_diagonal(model, loss_fn, x, y)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in diagonal]), expected.diagonal())
    for p, value in zip(model.parameters(), before):
        assert torch.equal(p, value)
    assert all(p.grad is None for p in model.parameters())
