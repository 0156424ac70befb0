"""CurvatureMonitor: checks against dense Hessians, warm starts, no trace on training, errors."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from tests import reference as ref
from tests.core.helpers import assert_unchanged, snapshot
from torch_secorder import CurvatureHistory, CurvatureMonitor, CurvatureRecord, HessianOperator

F64 = torch.float64


def regression(seed=0, n=24, width=6, depth=1):
    """A tanh MLP 3-width-...-width-2 (``depth`` hidden layers) in float64, a batch of ``n``."""
    torch.manual_seed(seed)
    hidden = [nn.Linear(3, width), nn.Tanh()]
    for _ in range(depth - 1):
        hidden += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*hidden, nn.Linear(width, 2)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randn(n, 2, generator=g, dtype=F64)
    return model, nn.MSELoss(), (x, y)


def dense_hessian(model, loss_fn, data, names=None):
    """The dense Hessian of the mean loss over ``data`` (one batch or a list), by torch.func."""
    batches = [data] if isinstance(data, tuple) else list(data)
    names = [n for n, _ in model.named_parameters()] if names is None else names
    params = dict(model.named_parameters())
    constants = {n: p.detach() for n, p in params.items() if n not in names}
    total = sum(b[0].shape[0] for b in batches)

    def fn(*tensors):
        values = {**constants, **dict(zip(names, tensors))}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        return (
            sum(
                x.shape[0] * loss_fn(functional_call(model, (values, buffers), (x,)), y)
                for x, y in batches
            )
            / total
        )

    return ref.hessian(fn, [params[n] for n in names])


def train(model, loss_fn, data, optimizer, steps, monitors=(), on_check=None):
    x, y = data
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        for monitor in monitors:
            records = monitor.step()
            if records and on_check is not None:
                on_check(monitor, records)


def top(H, k=1):
    return torch.linalg.eigvalsh(H).flip(0)[:k]


# ----------------------------------------------------------------------------- eigenvalues


def test_recorded_eigenvalues_match_the_dense_hessian_at_every_check():
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor = CurvatureMonitor(model, loss_fn, data, every=3, k=3, tol=1e-10)
    checked = []

    def compare(monitor, records):
        eigen = [r for r in records if r.quantity == "eigenvalue"]
        assert [r.index for r in eigen] == [0, 1, 2]
        values = torch.tensor([r.value for r in eigen], dtype=F64)
        assert_close(values, top(dense_hessian(model, loss_fn, data), 3))
        assert all(r.converged and r.residual <= 1e-10 * abs(r.value) for r in eigen)
        checked.append(monitor.steps)

    train(model, loss_fn, data, optimizer, 10, [monitor], compare)
    assert checked == [3, 6, 9]
    assert [r.step for r in monitor.history] == [3] * 3 + [6] * 3 + [9] * 3


def test_default_tolerance_bounds_the_error_by_the_residual():
    model, loss_fn, data = regression(seed=3)
    monitor = CurvatureMonitor(model, loss_fn, data, k=2)
    records = monitor.check()
    exact = top(dense_hessian(model, loss_fn, data), 2)
    for record, value in zip(records, exact.tolist()):
        assert record.converged
        assert abs(record.value - value) <= record.residual + 1e-12
        assert record.residual <= 1e-4 * abs(record.value)


def test_check_records_the_current_step_and_step_checks_every_n():
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CurvatureMonitor(model, loss_fn, data, every=4)
    assert monitor.check()[0].step == 0
    returned = []
    for _ in range(9):
        returned.append(bool(monitor.step()))
    assert returned == [False, False, False, True, False, False, False, True, False]
    assert monitor.steps == 9
    assert [r.step for r in monitor.history] == [0, 4, 8]
    assert monitor.num_matvecs == monitor.history.num_matvecs > 0
    assert monitor.seconds > 0
    assert "steps=9" in repr(monitor)
    del optimizer


def test_products_are_counted_once_per_computation():
    model, loss_fn, data = regression()
    monitor = CurvatureMonitor(model, loss_fn, data, k=3)
    records = monitor.check()
    assert [r.num_matvecs > 0 for r in records] == [True, False, False]
    assert len({r.seconds for r in records}) == 1


def test_a_fixed_loader_is_the_hessian_of_the_whole_data_set():
    model, loss_fn, (x, y) = regression(n=30)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    monitor = CurvatureMonitor(model, loss_fn, loader, tol=1e-10)
    value = monitor.check()[0].value
    assert_close(torch.tensor(value, dtype=F64), top(dense_hessian(model, loss_fn, (x, y)))[0])


def test_groups_record_each_blocks_top_eigenvalue_and_trace():
    model, loss_fn, data = regression()
    monitor = CurvatureMonitor(
        model, loss_fn, data, groups="module", trace=True, trace_method="exact", tol=1e-10
    )
    records = monitor.check()
    H = dense_hessian(model, loss_fn, data)
    params = list(model.parameters())
    assert [(r.quantity, r.group) for r in records] == [
        ("eigenvalue", None),
        ("eigenvalue", "0"),
        ("eigenvalue", "2"),
        ("trace", None),
        ("trace", "0"),
        ("trace", "2"),
    ]
    blocks = {"0": [0, 1], "2": [2, 3]}
    value = {(r.quantity, r.group): torch.tensor(r.value, dtype=F64) for r in records}
    assert_close(value["eigenvalue", None], top(H)[0])
    assert_close(value["trace", None], H.trace())
    for name, members in blocks.items():
        block = ref.block(H, params, members, members)
        assert_close(value["eigenvalue", name], top(block)[0])
        assert_close(value["trace", name], block.trace())
    assert monitor.history.groups == ["0", "2"]


def test_params_restrict_the_monitored_hessian():
    model, loss_fn, data = regression()
    monitor = CurvatureMonitor(model, loss_fn, data, params="2.*", tol=1e-10)
    H = dense_hessian(model, loss_fn, data, ["2.weight", "2.bias"])
    assert_close(torch.tensor(monitor.check()[0].value, dtype=F64), top(H)[0])


# ----------------------------------------------------------------------------- warm starts


def test_warm_checks_use_fewer_products_than_cold_ones_for_the_same_values():
    # 17,282 parameters: a random start is far from the top eigenvector (about sqrt(P) in
    # tangent), the warm start's random half keeps it within a tangent of about 1
    model, loss_fn, data = regression(n=64, width=128, depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    warm = CurvatureMonitor(model, loss_fn, data, every=5)
    cold = CurvatureMonitor(model, loss_fn, data, every=5, warm_start=False)
    train(model, loss_fn, data, optimizer, 60, [warm, cold])
    warm_counts = [r.num_matvecs for r in warm.history][1:]  # the first check starts cold
    cold_counts = [r.num_matvecs for r in cold.history][1:]
    assert sum(warm_counts) < 0.9 * sum(cold_counts), (warm_counts, cold_counts)
    for a, b in zip(warm.history, cold.history):
        assert a.converged
        assert b.converged
        assert abs(a.value - b.value) <= a.residual + b.residual + 1e-12


def test_warm_start_finds_a_new_top_eigenvector_after_the_spectrum_changes():
    """The weights jump between checks so that another direction becomes the sharpest."""
    model, loss_fn, data = regression(seed=5)
    monitor = CurvatureMonitor(model, loss_fn, data, tol=1e-10)
    monitor.check()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.7).add_(0.3)
    value = monitor.check()[0].value
    assert_close(torch.tensor(value, dtype=F64), top(dense_hessian(model, loss_fn, data))[0])


def test_checks_are_reproducible_bitwise():
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    a = CurvatureMonitor(model, loss_fn, data, every=2, k=2)
    b = CurvatureMonitor(model, loss_fn, data, every=2, k=2)
    train(model, loss_fn, data, optimizer, 6, [a, b])
    assert [r.value for r in a.history] == [r.value for r in b.history]
    assert [r.num_matvecs for r in a.history] == [r.num_matvecs for r in b.history]


def test_numpy_scalars_work_as_python_numbers():
    np = pytest.importorskip("numpy")
    model, loss_fn, data = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"every": 2, "k": 2, "tol": 1e-5, "max_matvecs": 40, "trace": True}
    a = CurvatureMonitor(model, loss_fn, data, **options, trace_num_matvecs=12)
    as_numpy = {
        name: value if isinstance(value, bool) else np.asarray(value)[()]
        for name, value in options.items()
    }
    b = CurvatureMonitor(model, loss_fn, data, **as_numpy, trace_num_matvecs=np.int64(12))
    train(model, loss_fn, data, optimizer, 4, [a, b])
    assert [r.value for r in a.history] == [r.value for r in b.history]
    assert [r.num_matvecs for r in a.history] == [r.num_matvecs for r in b.history]
    assert (b.every, b.k, b.tol) == (2, 2, 1e-5)
    assert (type(b.every), type(b.k), type(b.tol)) == (int, int, float)


def test_an_exhausted_budget_warns_and_records_not_converged():
    model, loss_fn, data = regression(width=12)
    monitor = CurvatureMonitor(model, loss_fn, data, max_matvecs=3, tol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"CurvatureMonitor: the eigenvalues at step 0 did"):
        records = monitor.check()
    assert records[0].converged is False
    assert records[0].num_matvecs <= 3


# ----------------------------------------------------------------------------- no trace


class Net(nn.Module):
    """Linear, BatchNorm (train mode), Dropout, tanh: a forward pass that changes buffers and
    draws from the global RNG."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
        )

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
def test_training_with_the_monitor_is_bitwise_the_training_without_it(optimizer_kind):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def run(monitored):
        torch.manual_seed(0)
        model = Net()
        if optimizer_kind == "sgd":
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        monitor = None
        if monitored:
            monitor = CurvatureMonitor(
                model,
                loss_fn,
                [(x[:16], y[:16]), (x[16:], y[16:])],
                every=2,
                k=2,
                groups="module",
                trace=True,
                optimizer=optimizer,
            )
            monitor.check()
        for _ in range(6):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if monitor is not None:
                before = snapshot(model)
                state = {
                    k: v.clone() if isinstance(v, torch.Tensor) else v
                    for s in optimizer.state.values()
                    for k, v in s.items()
                }
                records = monitor.step()
                assert_unchanged(before, model)
                after = {
                    k: v.clone() if isinstance(v, torch.Tensor) else v
                    for s in optimizer.state.values()
                    for k, v in s.items()
                }
                assert state.keys() == after.keys()
                for key in state:
                    assert torch.equal(torch.as_tensor(state[key]), torch.as_tensor(after[key]))
                if monitor.steps % 2 == 0:
                    assert records
        return model, optimizer, torch.get_rng_state(), monitor

    plain, plain_optimizer, plain_rng, _ = run(False)
    watched, watched_optimizer, watched_rng, monitor = run(True)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bitwise
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a.grad, b.grad)
    for a, b in zip(plain_optimizer.state.values(), watched_optimizer.state.values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert torch.equal(plain_rng, watched_rng)
    quantities = {r.quantity for r in monitor.history}
    assert {"eigenvalue", "trace", "threshold"} <= quantities


def test_a_check_under_no_grad_works_and_changes_nothing():
    model, loss_fn, data = regression()
    before = snapshot(model)
    with torch.no_grad():
        records = CurvatureMonitor(model, loss_fn, data).check()
    assert records[0].value > 0
    assert_unchanged(before, model)


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    model, loss_fn, data = regression()
    CurvatureMonitor(model, loss_fn, data, progress=True).check()
    assert "CurvatureMonitor" in capsys.readouterr().err


# ----------------------------------------------------------------------------- history


def test_history_is_a_curvature_history_that_round_trips(tmp_path):
    model, loss_fn, data = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor = CurvatureMonitor(
        model, loss_fn, data, every=2, k=2, groups="parameter", optimizer=optimizer, trace=True
    )
    train(model, loss_fn, data, optimizer, 4, [monitor])
    history = monitor.history
    assert isinstance(history, CurvatureHistory)
    assert all(isinstance(r, CurvatureRecord) for r in history)
    for suffix in ("csv", "json"):
        history.to_csv(tmp_path / "h.csv") if suffix == "csv" else history.to_json(
            tmp_path / "h.json"
        )
        assert CurvatureHistory.load(tmp_path / f"h.{suffix}") == history


# ----------------------------------------------------------------------------- errors


def errors_case():
    model, loss_fn, data = regression()
    return model, loss_fn, data


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"every": 0}, ValueError, r"CurvatureMonitor: every must be at least 1; got 0\."),
        ({"every": 1.5}, TypeError, r"CurvatureMonitor: every must be an int; got float\."),
        ({"k": 0}, ValueError, r"CurvatureMonitor: k must be at least 1; got 0\."),
        ({"k": 100}, ValueError, r"CurvatureMonitor: k must be at most P=38; got k=100\."),
        ({"tol": -1.0}, ValueError, r"CurvatureMonitor: tol must be a finite positive number"),
        (
            {"k": 2, "max_matvecs": 1},
            ValueError,
            r"CurvatureMonitor: max_matvecs must be at least 2 \(Lanczos needs k=2 products\)",
        ),
        ({"trace": 1}, TypeError, r"CurvatureMonitor: trace must be a bool; got int\."),
        ({"warm_start": None}, TypeError, r"CurvatureMonitor: warm_start must be a bool"),
        ({"progress": "yes"}, TypeError, r"CurvatureMonitor: progress must be a bool"),
        ({"generator": 0}, TypeError, r"CurvatureMonitor: generator must be None or a torch"),
        (
            {"trace": True, "trace_method": "fast"},
            ValueError,
            r"CurvatureMonitor: trace_method must be one of 'auto'",
        ),
        (
            {"trace": True, "trace_num_matvecs": 2},
            ValueError,
            r"CurvatureMonitor: trace_num_matvecs must be at least 3 \(trace_method='auto' needs",
        ),
        ({"params": "nothing*"}, ValueError, r"CurvatureMonitor: .*nothing\*"),
        ({"groups": "layer"}, ValueError, r"CurvatureMonitor: groups must be None, 'module'"),
        (
            {"groups": "parameter", "k": 3},
            ValueError,
            r"CurvatureMonitor: k must be at most the size of group '[\w.]+'=2; got k=3\.",
        ),
        (
            {"optimizer": "adam"},
            TypeError,
            r"CurvatureMonitor: optimizer must be None or a torch\.optim\.Optimizer "
            r"\(torch\.optim\.SGD, .*\); got str\.",
        ),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_argument_errors(options, error, message):
    model, loss_fn, data = errors_case()
    with pytest.raises(error, match=message):
        CurvatureMonitor(model, loss_fn, data, **options)


def test_data_errors_are_the_operators():
    model, loss_fn, (x, y) = errors_case()
    with pytest.raises(ValueError, match=r"CurvatureMonitor: data is empty"):
        CurvatureMonitor(model, loss_fn, [])
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True
    )
    with pytest.raises(ValueError, match=r"CurvatureMonitor: data is a DataLoader whose Random"):
        CurvatureMonitor(model, loss_fn, shuffled)
    with pytest.raises(TypeError, match=r"CurvatureMonitor: loss_fn must be callable"):
        CurvatureMonitor(model, None, (x, y))


def test_an_unsupported_optimizer_is_refused():
    model, loss_fn, data = errors_case()
    optimizer = torch.optim.NAdam(model.parameters())
    with pytest.raises(
        TypeError,
        match=r"CurvatureMonitor: optimizer must be one of torch\.optim\.SGD, torch\.optim\.Adam, "
        r"torch\.optim\.AdamW, torch\.optim\.RMSprop, torch\.optim\.Adagrad, whose stability "
        r"threshold is known; got NAdam\. Pass optimizer=None",
    ):
        CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)


def test_a_monitored_parameter_outside_the_optimizer_is_refused():
    model, loss_fn, data = errors_case()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"CurvatureMonitor: params\[0\] \('0\.weight'\) is not optimized by the "
        r"optimizer; expected every monitored parameter in its param_groups\.",
    ):
        CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    CurvatureMonitor(model, loss_fn, data, optimizer=optimizer, params="2.*")  # a subset is fine


def test_groups_with_different_learning_rates_are_refused():
    model, loss_fn, data = errors_case()
    optimizer = torch.optim.Adam(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], lr=0.01
    )
    with pytest.raises(
        ValueError,
        match=r"CurvatureMonitor: the optimizer's parameter groups of '0\.weight' and '2\.weight' "
        r"differ in lr \(0\.1 and 0\.01\); expected one lr for all monitored parameters",
    ):
        CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    CurvatureMonitor(model, loss_fn, data, optimizer=optimizer, params="0.*")


def test_a_schedule_that_splits_the_groups_is_refused_at_the_check(monkeypatch):
    model, loss_fn, data = errors_case()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1
    )
    monitor = CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    optimizer.param_groups[1]["lr"] = 0.05
    products = count_products(monkeypatch)
    with pytest.raises(ValueError, match=r"differ in lr \(0\.1 and 0\.05\)"):
        monitor.check()
    assert products == [0]  # refused before the check's work


def count_products(monkeypatch):
    """Count the columns asked of any HessianOperator from now on: ``[count]``."""
    counted = [0]
    matmat = HessianOperator.matmat

    def counting(self, V, **kwargs):
        counted[0] += V.shape[1]
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(HessianOperator, "matmat", counting)
    return counted


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adagrad"])
def test_a_learning_rate_of_zero_has_an_infinite_threshold(name):
    # a schedule may reach lr = 0 (cosine annealing to eta_min=0, a warmup from 0): no step
    # is taken, so no curvature is unstable
    model, loss_fn, data = errors_case()
    optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
    loss_fn(model(data[0]), data[1]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optimizer.param_groups[0]["lr"] = 0.0
    monitor = CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    records = {r.quantity: r for r in monitor.check()}
    assert records["threshold"].value == math.inf
    assert records["eigenvalue"].converged


def test_a_negative_learning_rate_is_refused_before_the_check(monkeypatch):
    model, loss_fn, data = errors_case()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    optimizer.param_groups[0]["lr"] = -0.1
    products = count_products(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"CurvatureMonitor: the optimizer's learning rate must not be negative for a "
        r"stability threshold; got lr=-0\.1\.",
    ):
        monitor.check()
    assert products == [0]
    assert len(monitor.history) == 0


def test_errors_leave_no_trace():
    model, loss_fn, data = errors_case()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"k must be at least 1"):
        CurvatureMonitor(model, loss_fn, data, k=0)
    optimizer = torch.optim.NAdam(model.parameters())
    with pytest.raises(TypeError, match=r"got NAdam"):
        CurvatureMonitor(model, loss_fn, data, optimizer=optimizer)
    assert_unchanged(before, model)
