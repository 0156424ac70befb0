"""The optimizers' stability thresholds and preconditioners, through CurvatureMonitor.

The preconditioned sharpness is compared with the top eigenvalue of an explicit
P^{-1/2} H P^{-1/2} built from the optimizer's state and a dense torch.func Hessian; SGD's
thresholds with PyTorch's SGD run on one-dimensional quadratics.
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests.analysis.test_monitor import F64, dense_hessian, regression, train
from torch_secorder import CurvatureMonitor


def adam_preconditioner(optimizer, p, amsgrad=False):
    """P = (1 - beta1^t) diag(sqrt(v / (1 - beta2^t)) + eps) from Adam's state (Cohen et al.)."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    state = optimizer.state[p]
    t = float(state["step"])
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    return (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + group["eps"])


def explicit_preconditioned(model, loss_fn, data, P):
    """Eigenvalues of P^{-1/2} H P^{-1/2} from the dense Hessian, descending."""
    H = dense_hessian(model, loss_fn, data)
    s = torch.cat([d.reshape(-1) for d in P]).rsqrt()
    return torch.linalg.eigvalsh(s[:, None] * H * s[None, :]).flip(0)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-3, amsgrad=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["adam", "adam-amsgrad", "adamw"],
)
def test_preconditioned_sharpness_matches_the_explicit_matrix_for_adam(make):
    model, loss_fn, data = regression()
    params = list(model.parameters())
    optimizer = make(params)
    monitor = CurvatureMonitor(model, loss_fn, data, every=3, optimizer=optimizer, tol=1e-10)
    amsgrad = optimizer.param_groups[0]["amsgrad"]
    seen = []

    def compare(monitor, records):
        by = {r.quantity: r for r in records}
        P = [adam_preconditioner(optimizer, p, amsgrad) for p in params]
        exact = explicit_preconditioned(model, loss_fn, data, P)[0]
        assert_close(torch.tensor(by["preconditioned_eigenvalue"].value, dtype=F64), exact)
        lr, (beta1, _) = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"]
        assert by["threshold"].value == pytest.approx((2 + 2 * beta1) / (lr * (1 - beta1)))
        seen.append(monitor.steps)

    train(model, loss_fn, data, optimizer, 7, [monitor], compare)
    assert seen == [3, 6]


def test_adams_threshold_is_38_over_eta_and_its_preconditioner_is_that_of_its_last_step():
    model, loss_fn, (x, y) = regression()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01)
    monitor = CurvatureMonitor(model, loss_fn, (x, y), optimizer=optimizer)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        for p, old in zip(params, before):  # the step is -eta P^{-1} m, m = exp_avg
            P = adam_preconditioner(optimizer, p)
            assert_close(p.detach() - old, -0.01 * optimizer.state[p]["exp_avg"] / P)
    records = monitor.check()
    assert records[-1].quantity == "threshold"
    assert records[-1].value == pytest.approx(38 / 0.01)


def test_adam_before_its_first_step_records_the_threshold_only():
    model, loss_fn, data = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    records = CurvatureMonitor(model, loss_fn, data, optimizer=optimizer).check()
    assert [r.quantity for r in records] == ["eigenvalue", "threshold"]
    assert records[1].value == pytest.approx(38 / 0.1)


@pytest.mark.parametrize("centered", [False, True])
def test_preconditioned_sharpness_of_rmsprop(centered):
    model, loss_fn, data = regression()
    params = list(model.parameters())
    optimizer = torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=centered, eps=1e-4)
    monitor = CurvatureMonitor(model, loss_fn, data, every=4, optimizer=optimizer, tol=1e-10)
    train(model, loss_fn, data, optimizer, 4, [monitor])
    by = {r.quantity: r.value for r in monitor.history}
    P = []
    for p in params:
        v = optimizer.state[p]["square_avg"]
        if centered:
            v = v - optimizer.state[p]["grad_avg"] ** 2
        P.append(v.sqrt() + 1e-4)
    exact = explicit_preconditioned(model, loss_fn, data, P)[0]
    assert_close(torch.tensor(by["preconditioned_eigenvalue"], dtype=F64), exact)
    assert by["threshold"] == pytest.approx((2 + 2 * 0.5) / 0.01)


def test_preconditioned_sharpness_of_adagrad_with_a_decaying_rate():
    model, loss_fn, data = regression()
    params = list(model.parameters())
    optimizer = torch.optim.Adagrad(params, lr=0.1, lr_decay=0.5, eps=1e-6)
    monitor = CurvatureMonitor(model, loss_fn, data, every=3, optimizer=optimizer, tol=1e-10)
    train(model, loss_fn, data, optimizer, 3, [monitor])
    by = {r.quantity: r.value for r in monitor.history}
    P = [optimizer.state[p]["sum"].sqrt() + 1e-6 for p in params]
    exact = explicit_preconditioned(model, loss_fn, data, P)[0]
    assert_close(torch.tensor(by["preconditioned_eigenvalue"], dtype=F64), exact)
    assert by["threshold"] == pytest.approx(2 / (0.1 / (1 + 3 * 0.5)))  # the 4th step's rate


def test_a_parameter_without_optimizer_state_takes_no_step():
    """A parameter that never had a gradient has no Adam state: its rows of P^{-1} are 0."""
    model, loss_fn, (x, y) = regression()
    extra = nn.Parameter(torch.ones(2, dtype=F64))
    model.register_parameter("extra", extra)  # unused by the forward pass
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=0.01)
    monitor = CurvatureMonitor(model, loss_fn, (x, y), optimizer=optimizer, tol=1e-10)
    train(model, loss_fn, (x, y), optimizer, 2)
    assert extra not in optimizer.state or not optimizer.state[extra]
    records = monitor.check()
    P = [
        torch.full((2,), torch.inf) if p is extra else adam_preconditioner(optimizer, p)
        for p in params
    ]
    exact = explicit_preconditioned(model, loss_fn, (x, y), P)
    assert_close(torch.tensor(records[1].value, dtype=F64), exact[0])


@pytest.mark.parametrize(
    ("options", "threshold"),
    [
        ({}, 2 / 0.1),
        ({"momentum": 0.9}, (2 + 2 * 0.9) / 0.1),
        ({"momentum": 0.9, "dampening": 0.5}, (2 + 2 * 0.9) / (0.1 * 0.5)),
        ({"momentum": 0.9, "nesterov": True}, (2 + 2 * 0.9) / (0.1 * (1 + 2 * 0.9))),
    ],
    ids=["plain", "heavy-ball", "dampening", "nesterov"],
)
def test_sgd_thresholds(options, threshold):
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **options)
    records = CurvatureMonitor(model, loss_fn, data, optimizer=optimizer).check()
    assert [r.quantity for r in records] == ["eigenvalue", "threshold"]
    assert records[1].value == pytest.approx(threshold)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.5, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True},
    ],
    ids=["plain", "heavy-ball", "dampening", "nesterov"],
)
def test_sgd_thresholds_separate_stable_from_divergent_quadratics(options):
    """PyTorch's SGD on f(x) = lambda/2 x^2: bounded just below the threshold, diverging above."""
    lr = 0.1
    x = nn.Parameter(torch.ones(1, dtype=F64))
    optimizer = torch.optim.SGD([x], lr=lr, **options)
    data = (torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64))
    model = nn.Module()
    model.x = x
    model.forward = lambda inputs: inputs * x
    threshold = CurvatureMonitor(model, lambda o, t: 0.5 * (o**2).sum(), data, optimizer=optimizer)
    threshold = threshold.check()[-1].value

    def final(curvature):
        with torch.no_grad():
            x.fill_(1.0)
        state = torch.optim.SGD([x], lr=lr, **options)
        for _ in range(3000):
            state.zero_grad()
            (0.5 * curvature * x**2).sum().backward()
            state.step()
        return float(x.detach().abs())

    assert final(0.99 * threshold) < 1.0
    assert final(1.01 * threshold) > 1e3


def test_the_threshold_follows_a_learning_rate_schedule():
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    monitor = CurvatureMonitor(model, loss_fn, data, every=2, optimizer=optimizer)
    x, y = data
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        monitor.step()
    assert monitor.history.series("threshold") == ([2, 4], [40.0, 80.0])
