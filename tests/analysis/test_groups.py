import pytest
import torch
from torch import nn

import torch_secorder as ts
from tests.analysis.operators import DTYPE, tanh_mlp
from torch_secorder.analysis._groups import resolve_groups, rows_of
from torch_secorder.core._model import model_params


class Nested(nn.Module):
    """A root-owned parameter, a nested block, a shared layer and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, dtype=DTYPE))
        self.body = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
        self.shared = self.body[0]
        self.frozen = nn.Linear(2, 2).to(DTYPE)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.body(x * self.scale))


def groups_of(model, groups, params=None):
    names, tensors = model_params("test", model, params)
    resolved = resolve_groups("test", model, names, tensors, groups)
    return None if resolved is None else {k: [names[i] for i in v] for k, v in resolved.items()}


def test_module_groups_follow_named_modules():
    assert groups_of(Nested(), "module") == {
        "": ["scale"],
        "body.0": ["body.0.weight", "body.0.bias"],
        "body.2": ["body.2.weight", "body.2.bias"],
    }


def test_module_groups_within_a_selection():
    model = Nested()
    assert groups_of(model, "module", params="*.weight") == {  # explicit: frozen too
        "body.0": ["body.0.weight"],
        "body.2": ["body.2.weight"],
        "frozen": ["frozen.weight"],
    }
    assert groups_of(model, "module", params=["frozen.*"]) == {
        "frozen": ["frozen.weight", "frozen.bias"]
    }


def test_parameter_and_dict_groups():
    model = Nested()
    assert list(groups_of(model, "parameter")) == [
        "scale",
        "body.0.weight",
        "body.0.bias",
        "body.2.weight",
        "body.2.bias",
    ]
    assert groups_of(model, {"weights": "*.weight", "mixed": ["scale", "body.2.*"]}) == {
        "weights": ["body.0.weight", "body.2.weight"],
        "mixed": ["scale", "body.2.weight", "body.2.bias"],
    }
    assert groups_of(model, None) is None


def test_rows_are_slices_when_contiguous():
    sizes = [2, 6, 3, 6, 2]
    assert rows_of([1, 2], sizes, torch.device("cpu")) == slice(2, 11)
    rows = rows_of([0, 3], sizes, torch.device("cpu"))
    assert torch.equal(rows, torch.tensor([0, 1, 11, 12, 13, 14, 15, 16]))


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        (
            "layer",
            ValueError,
            r"test: groups must be None, 'module', 'parameter' or a dict of name -> parameter "
            r"names "
            r"or patterns; got 'layer'\.",
        ),
        (
            ["body.*"],
            TypeError,
            r"test: groups must be None, 'module', 'parameter' or a dict .*; "
            r"got list\.",
        ),
        ({}, ValueError, r"test: groups is an empty dict; expected at least one group\."),
        ({1: "scale"}, TypeError, r"test: groups keys must be str; got int\."),
        (
            {"a": 3},
            TypeError,
            r"test: groups\['a'\] must be a parameter name or pattern or a list "
            r"of them; got int\.",
        ),
        ({"a": []}, ValueError, r"test: groups\['a'\] is empty; expected names or patterns\."),
        (
            {"a": ["scale", "head.*"]},
            ValueError,
            r"test: groups\['a'\] entry 'head\.\*' matches no selected parameter; the selected "
            r"parameters are: scale, body\.0\.weight, body\.0\.bias, body\.2\.weight, "
            r"body\.2\.bias\.",
        ),
        (
            {"a": "frozen.weight"},
            ValueError,
            r"entry 'frozen\.weight' matches no selected parameter",
        ),
    ],
)
def test_bad_groups(groups, error, match):
    with pytest.raises(error, match=match):
        groups_of(Nested(), groups)


def test_operator_spans_only_the_grouped_parameters():
    model, loss_fn, inputs, targets = tanh_mlp()
    named = dict(model.named_parameters())
    exact = ts.model_hessian_diagonal(model, loss_fn, inputs, targets)
    results = ts.model_hessian_trace(
        model,
        loss_fn,
        (inputs, targets),
        groups={"outer": ["0.weight", "4.bias"]},
        method="exact",
    )
    result = results["outer"]
    assert result.num_matvecs == named["0.weight"].numel() + named["4.bias"].numel()
    torch.testing.assert_close(result.value, exact[0].sum() + exact[5].sum())


def test_each_group_draws_from_its_own_generator():
    model, loss_fn, inputs, targets = tanh_mlp()
    data = (inputs, targets)
    one = ts.model_hessian_trace(model, loss_fn, data, groups={"a": "0.*"}, method="hutchinson")
    two = ts.model_hessian_trace(
        model, loss_fn, data, groups={"a": "0.*", "b": "2.*"}, method="hutchinson"
    )
    torch.testing.assert_close(one["a"].value, two["a"].value)
    seeded = ts.model_hessian_trace(
        model,
        loss_fn,
        data,
        groups={"a": "0.*"},
        method="hutchinson",
        generator=torch.Generator().manual_seed(4),
    )
    assert float(seeded["a"].value) != float(one["a"].value)


def test_whole_model_form_equals_the_operator_form():
    model, loss_fn, inputs, targets = tanh_mlp()
    data = [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]
    by_model = ts.model_hessian_trace(model, loss_fn, data, params="*.weight")
    operator = ts.HessianOperator.from_model(model, loss_fn, data, params="*.weight")
    by_operator = ts.hessian_trace(operator)
    torch.testing.assert_close(by_model.value, by_operator.value)
    assert by_model.num_matvecs == by_operator.num_matvecs == operator.num_matvecs


def test_model_errors_come_before_any_forward_pass():
    model, loss_fn, inputs, targets = tanh_mlp()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"model_top_eigenvalues: params entry 'head\.\*' "):
        ts.model_top_eigenvalues(model, loss_fn, (inputs, targets), params="head.*")
    with pytest.raises(
        TypeError,
        match=r"model_spectral_density: model must be a "
        r"torch\.nn\.Module; got str\.",
    ):
        ts.model_spectral_density("model", loss_fn, (inputs, targets))
    with pytest.raises(ValueError, match=r"model_hessian_trace: data is empty"):
        ts.model_hessian_trace(model, loss_fn, [], groups="module")
    assert calls == []
