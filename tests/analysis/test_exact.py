"""``method="auto"``: the exact trace or diagonal wherever it costs no more than the budget."""

import torch
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts
from tests.core.structured.helpers import CE, F64, labels, oracle, randn
from torch_secorder.core._model import batch_loss


def _relu_net():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 9, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return model.to(F64).eval()


def _tanh_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    ).to(F64)


def _trace(model, loss_fn, inputs, targets):
    return sum(d.sum() for d in oracle(model, loss_fn, inputs, targets))


def test_the_default_trace_of_a_relu_network_is_exact():
    model, data = _relu_net(), (randn(6, 2, 6, 6), labels(6, 3))
    result = ts.model_hessian_trace(model, CE, data)
    plan = ts.diagonal_plan(model, CE, *data)
    assert result.method == "exact"
    assert_close(result.value, _trace(model, CE, *data))
    assert float(result.stderr) == 0
    assert result.num_matvecs == plan.num_matvecs < 100


def test_the_default_falls_back_to_hutch_plus_plus_where_exact_costs_more():
    model, data = _tanh_net(), (randn(32, 20), labels(32, 10))
    assert ts.diagonal_plan(model, CE, *data).num_matvecs > 100
    result = ts.model_hessian_trace(model, CE, data)
    explicit = ts.model_hessian_trace(model, CE, data, method="hutch++")
    assert result.method == explicit.method == "hutch++"
    assert torch.equal(result.value, explicit.value)  # planning drew nothing at random
    assert result.num_matvecs == explicit.num_matvecs <= 100
    exact = ts.model_hessian_trace(model, CE, data, num_matvecs=1000)
    assert exact.method == "exact"  # a larger budget buys the exact trace
    assert_close(exact.value, _trace(model, CE, *data))


def test_each_group_takes_the_cheaper_method():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 200), nn.Tanh(), nn.Linear(200, 2)).to(F64)
    data = (randn(16, 3), labels(16, 2))
    results = ts.model_hessian_trace(model, CE, data, groups="module")
    assert {name: r.method for name, r in results.items()} == {"0": "hutch++", "2": "exact"}
    diagonal = oracle(model, CE, *data)
    assert_close(results["2"].value, diagonal[2].sum() + diagonal[3].sum())
    plan = {
        layer.module: layer for layer in ts.diagonal_plan(model, CE, *data, params="2.*").layers
    }
    assert results["2"].num_matvecs == plan["2"].num_matvecs


def test_a_group_is_exact_only_where_its_own_plan_fits_the_budget():
    # In the whole model's plan the head costs 2 products (its products serve the first layer's
    # rule too); planned alone it costs 12: at a budget of 3 it is estimated, not exact at 12.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    data, mse = (randn(12, 3), randn(12, 2, seed=1)), nn.MSELoss()
    whole = {
        layer.module: layer.num_matvecs for layer in ts.diagonal_plan(model, mse, *data).layers
    }
    alone = ts.diagonal_plan(model, mse, *data, params="2.*").num_matvecs
    assert whole["2"] <= 3 < alone
    for budget in (3, 8):
        for analysis in (ts.model_hessian_trace, ts.model_hessian_diagonal_estimate):
            for groups in ("module", "parameter"):
                results = analysis(model, mse, data, groups=groups, num_matvecs=budget)
                for name, result in results.items():
                    assert result.num_matvecs <= budget, (analysis, groups, name)
    traces = ts.model_hessian_trace(model, mse, data, groups="parameter", num_matvecs=3)
    assert traces["2.bias"].method == "exact"  # 2 products, alone too
    assert_close(traces["2.bias"].value, oracle(model, mse, *data)[3].sum())
    assert {traces[name].method for name in ("0.weight", "0.bias", "2.weight")} == {"hutch++"}


def test_an_operator_over_a_model_gives_the_exact_trace_when_cheaper():
    model, data = _relu_net(), (randn(6, 2, 6, 6), labels(6, 3))
    operator = ts.HessianOperator.from_model(model, CE, data)
    result = ts.hessian_trace(operator)
    assert result.method == "exact"
    assert result.num_matvecs == operator.num_matvecs < 100
    assert_close(result.value, _trace(model, CE, *data))


def test_a_closure_small_enough_is_exact_and_a_large_one_estimated():
    model, data = _relu_net(), (randn(6, 2, 6, 6), labels(6, 3))
    params = list(model.parameters())
    func = batch_loss(model, CE, *data)
    small = ts.hessian_trace(func, params[-1:])  # the head's bias: 3 products
    assert small.method == "exact"
    assert small.num_matvecs == 3
    large = ts.hessian_trace(func, params)  # 347 elements: one product each would pass 100
    assert large.method == "hutch++"
    assert large.num_matvecs <= 100


def test_the_default_diagonal_estimate_is_exact_when_cheaper():
    model, data = _relu_net(), (randn(6, 2, 6, 6), labels(6, 3))
    result = ts.model_hessian_diagonal_estimate(model, CE, data)
    assert result.method == "exact"
    for d, e, s in zip(result.diagonal, oracle(model, CE, *data), result.stderr):
        assert_close(d, e)
        assert torch.equal(s, torch.zeros_like(e))
    estimate = ts.model_hessian_diagonal_estimate(_tanh_net(), CE, (randn(32, 20), labels(32, 10)))
    assert estimate.method == "xdiag"


def test_auto_leaves_no_trace():
    from tests.core.helpers import assert_unchanged, snapshot

    for model, data in ((_relu_net(), (randn(6, 2, 6, 6), labels(6, 3))),
                        (_tanh_net(), (randn(32, 20), labels(32, 10)))):  # fmt: skip
        before = snapshot(model)
        first = ts.model_hessian_trace(model, CE, data)
        assert_unchanged(before, model)
        assert torch.equal(first.value, ts.model_hessian_trace(model, CE, data).value)


def test_progress_of_the_exact_trace_counts_products_over_the_batches(monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.counts = total, desc, []
            bars.append(self)

        def update(self, n):
            self.counts.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = _relu_net()
    data = [(randn(4, 2, 6, 6), labels(4, 3)), (randn(4, 2, 6, 6, seed=3), labels(4, 3, seed=4))]
    result = ts.model_hessian_trace(model, CE, data, progress=True)
    assert result.method == "exact"
    (bar,) = bars
    assert bar.desc == "model_hessian_trace"
    per_batch = ts.diagonal_plan(model, CE, *data[0]).num_matvecs
    assert bar.total == 2 * per_batch  # the first batch's plan, for both
    assert len(bar.counts) == 2  # one update per batch
