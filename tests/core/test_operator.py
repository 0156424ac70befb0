import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from tests import reference as ref
from torch_secorder import HessianOperator, hessian_matrix
from torch_secorder.core.params import select_params, unflatten

DTYPE = torch.float64


def make_mlp(seed=0, dropout=0.0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5), nn.Tanh()]
    if batchnorm:
        layers.append(nn.BatchNorm1d(5))
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 2))
    return nn.Sequential(*layers).to(DTYPE)


def make_batches(sizes, seed=1, classes=None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        x = torch.randn(n, 3, generator=g, dtype=DTYPE)
        if classes:
            y = torch.randint(0, classes, (n,), generator=g)
        else:
            y = torch.randn(n, 2, generator=g, dtype=DTYPE)
        batches.append((x, y))
    return batches


def dense_batch_hessian(model, loss_fn, inputs, targets, names):
    """Hessian of loss_fn(model(inputs), targets) w.r.t. the named parameters, via torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    shapes = [params[n] for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def loss(vector, buffers):
        full = dict(params)
        full.update(zip(names, unflatten(vector, shapes)))
        return loss_fn(functional_call(model, (full, buffers), args), targets)

    # buffers are an explicit argument: BatchNorm in train mode updates them in place
    return torch.func.hessian(loss)(flat, buffers)


def dense_data_hessian(model, loss_fn, batches, names=None):
    """Sum_b n_b H_b / N: the mean-loss Hessian over the batches."""
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [(x[0] if isinstance(x, tuple) else x).shape[0] for x, _ in batches]
    total = sum(
        n * dense_batch_hessian(model, loss_fn, x, y, names) for n, (x, y) in zip(sizes, batches)
    )
    return total / sum(sizes)


def columns(P, k, seed=3):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


class CountingClosure:
    def __init__(self, func):
        self.func = func
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.func()


@pytest.fixture
def mlp_problem():
    model = make_mlp()
    ((x, y),) = make_batches([7])
    params = list(model.parameters())
    func = CountingClosure(lambda: nn.functional.mse_loss(model(x), y))
    dense = dense_batch_hessian(
        model, nn.functional.mse_loss, x, y, [n for n, _ in model.named_parameters()]
    )
    return func, params, dense


def test_closure_products_match_dense(mlp_problem):
    func, params, dense = mlp_problem
    H = HessianOperator(func, params)
    P = dense.shape[0]
    assert H.shape == (P, P)
    assert H.dtype == DTYPE
    assert H.device == params[0].device
    V = columns(P, 4)
    assert_close(H.matmat(V), dense @ V)
    assert_close(H.matvec(V[:, 0]), dense @ V[:, 0])
    assert_close(H @ V, dense @ V)
    assert_close(H @ V[:, 1], dense @ V[:, 1])


def test_closure_graph_built_once_and_rebuilt_after_release(mlp_problem):
    func, params, dense = mlp_problem
    V = columns(dense.shape[0], 3)
    H = HessianOperator(func, params)
    assert func.calls == 0  # nothing runs before the first product
    for _ in range(3):
        H.matmat(V)
    H.matvec(V[:, 0])
    assert func.calls == 1
    H.release()
    assert_close(H @ V, dense @ V)
    assert func.calls == 2
    with H:
        H @ V
    assert H._source.graph is None


@pytest.mark.parametrize("source", ["closure", "one batch", "batches"])
def test_products_are_written_into_out(mlp_problem, source):
    func, params, dense = mlp_problem
    if source == "closure":
        H = HessianOperator(func, params)
    else:
        model = make_mlp()
        batches = make_batches([4] if source == "one batch" else [4, 3])
        H = HessianOperator.from_model(model, nn.MSELoss(), batches)
        dense = dense_data_hessian(model, nn.functional.mse_loss, batches)
    P = dense.shape[0]
    V = columns(P, 3)
    rows = torch.full((5, P), 7.0, dtype=DTYPE)  # the products into rows 1 and 3 of 5
    out = rows[1::2][:2].T
    assert H.matmat(V[:, :2], out=out) is out
    assert_close(rows[[1, 3]], (dense @ V[:, :2]).T)
    assert bool((rows[[0, 2, 4]] == 7).all())
    # bitwise the products written into new memory, and counted alike
    assert torch.equal(out, H.matmat(V[:, :2]))
    assert H.num_matvecs == 4
    # rows of the same matrix as V, below it (not overlapping)
    both = torch.zeros(4, P, dtype=DTYPE)
    both[:2] = V[:, :2].T
    H.matmat(both[:2].T, out=both[2:].T)
    assert_close(both[2:], (dense @ V[:, :2]).T)


def test_out_is_checked(mlp_problem):
    func, params, dense = mlp_problem
    H = HessianOperator(func, params)
    P = dense.shape[0]
    V = columns(P, 2)
    with pytest.raises(ValueError, match=rf"HessianOperator.matmat: out has shape \({P}, 3\); "):
        H.matmat(V, out=torch.zeros(P, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"matmat: out is torch.float32 on cpu; expected torch.f"):
        H.matmat(V, out=torch.zeros(P, 2))
    with pytest.raises(ValueError, match=r"out has strides \(2, 1\); expected contiguous columns"):
        H.matmat(V, out=torch.zeros(P, 2, dtype=DTYPE))
    columnwise = V.T.contiguous().T
    with pytest.raises(ValueError, match=r"matmat: out overlaps V in memory; expected separate"):
        H.matmat(columnwise, out=columnwise)
    rows = torch.zeros(3, P, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"out overlaps V"):
        H.matmat(rows[:2].T, out=rows[1:].T)
    with pytest.raises(TypeError, match=r"HessianOperator.matmat: out must be a Tensor; got list"):
        H.matmat(V, out=[0.0])
    assert func.calls == 0


def test_counts_every_product(mlp_problem):
    func, params, dense = mlp_problem
    H = HessianOperator(func, params)
    V = columns(dense.shape[0], 5)
    H.matmat(V)
    H.matvec(V[:, 0])
    H @ V[:, :2]
    assert H.num_matvecs == 8
    empty = H.matmat(V[:, :0])
    assert empty.shape == (dense.shape[0], 0)
    assert H.num_matvecs == 8


def test_from_model_is_mean_loss_hessian_over_batches():
    model = make_mlp()
    batches = make_batches([4, 7, 1, 5])
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    dense = dense_data_hessian(model, nn.functional.mse_loss, batches)
    V = columns(dense.shape[0], 3)
    assert_close(H @ V, dense @ V)
    assert H.num_samples == 17
    # mean-loss convention: the Hessian of the mean loss over the concatenated data
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    whole = hessian_matrix(lambda: nn.functional.mse_loss(model(x), y), model.parameters())
    assert_close(H @ V, whole @ V)
    # with a loss averaging over samples, N * H is the Hessian of the summed loss
    per_sample = HessianOperator.from_model(model, squared_error, batches)
    product = per_sample @ V
    summed = hessian_matrix(lambda: (model(x) - y).pow(2).sum(), model.parameters())
    assert_close(per_sample.num_samples * product, summed @ V)


def squared_error(out, target):
    return (out - target).pow(2).sum(dim=1).mean()


def test_from_model_cross_entropy_and_param_selection():
    model = make_mlp()
    batches = make_batches([6, 3], classes=2)
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), batches, params="*.weight")
    assert H.names == ["0.weight", "2.weight"]
    dense = dense_data_hessian(model, nn.functional.cross_entropy, batches, names=H.names)
    V = columns(dense.shape[0], 2)
    assert_close(H @ V, dense @ V)


def test_from_model_single_batch_and_dataloader_agree():
    model = make_mlp()
    ((x, y),) = make_batches([12])
    single = HessianOperator.from_model(model, nn.MSELoss(), (x, y))
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)  # batches of 5, 5, 2
    streamed = HessianOperator.from_model(model, nn.MSELoss(), loader)
    V = columns(single.shape[0], 3)
    assert_close(single @ V, streamed @ V)
    assert streamed.num_samples == 12


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x1, x2):
        return torch.tanh(self.a(x1)) * self.b(x2)


def test_multi_input_tuple_and_dict_batches():
    torch.manual_seed(0)
    model = TwoInputs().to(DTYPE)
    g = torch.Generator().manual_seed(2)
    x1, x2 = (
        torch.randn(6, 3, generator=g, dtype=DTYPE),
        torch.randn(6, 4, generator=g, dtype=DTYPE),
    )
    y = torch.randn(6, 2, generator=g, dtype=DTYPE)
    H = HessianOperator.from_model(
        model, nn.MSELoss(), [((x1[:4], x2[:4]), y[:4]), ((x1[4:], x2[4:]), y[4:])]
    )
    H_dict = HessianOperator.from_model(model, nn.MSELoss(), ({"x1": x1, "x2": x2}, y))
    names = [n for n, _ in model.named_parameters()]
    dense = dense_batch_hessian(model, nn.functional.mse_loss, (x1, x2), y, names)
    V = columns(dense.shape[0], 2)
    assert_close(H @ V, dense @ V)
    assert_close(H_dict @ V, dense @ V)


def test_each_batch_runs_once_per_matmat():
    model = make_mlp()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    batches = make_batches([3, 4, 5])
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    H.matmat(columns(H.shape[0], 6))
    assert calls == [3, 4, 5]
    H.matvec(columns(H.shape[0], 1)[:, 0])
    assert calls == [3, 4, 5, 3, 4, 5]


def test_single_batch_graph_is_reused_until_release():
    model = make_mlp()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    H = HessianOperator.from_model(model, nn.MSELoss(), make_batches([5])[0])
    V = columns(H.shape[0], 2)
    first = H @ V
    assert_close(H @ V, first)
    assert len(calls) == 1
    H.release()
    assert_close(H @ V, first)
    assert len(calls) == 2


def test_dropout_operator_is_one_fixed_symmetric_matrix():
    model = make_mlp(dropout=0.5).train()
    batches = make_batches([8, 8])
    state = torch.get_rng_state()
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    P = H.shape[0]
    dense = H @ torch.eye(P, dtype=DTYPE)
    assert_close(dense, dense.T)
    V = columns(P, 3)
    assert_close(H @ V, dense @ V)
    assert_close(H @ V[:, 0], dense @ V[:, 0])
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    # another seed draws other masks
    other = HessianOperator.from_model(model, nn.MSELoss(), batches, seed=1)
    assert not torch.allclose(other @ V, dense @ V)


def test_batchnorm_buffers_and_mode_restored():
    model = make_mlp(batchnorm=True).train()
    bn = model[2]
    before = {n: b.clone() for n, b in model.named_buffers()}
    batches = make_batches([6, 5])
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    result = H @ columns(H.shape[0], 2)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert bn.training
    # torch.func's Hessian through train-mode BatchNorm is wrong (asymmetric; autograd agrees
    # with finite differences), so the per-batch reference is the library's exact matrix
    dense = (
        sum(
            x.shape[0]
            * hessian_matrix(
                lambda x=x, y=y: nn.functional.mse_loss(model(x), y), model.parameters()
            )
            for x, y in batches
        )
        / 11
    )
    assert_close(result, dense @ columns(H.shape[0], 2))


def test_no_side_effects_and_no_grad():
    model = make_mlp()
    values = [p.detach().clone() for p in model.parameters()]
    batches = make_batches([4, 4])
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    with torch.no_grad():
        result = H @ columns(H.shape[0], 2)
    assert not result.requires_grad
    for p, value in zip(model.parameters(), values):
        assert p.grad is None
        assert torch.equal(p, value)


def test_frozen_parameter_selected_by_name_stays_frozen():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    batches = make_batches([5])
    H = HessianOperator.from_model(model, nn.MSELoss(), batches, params=["0.weight"])
    dense = dense_data_hessian(model, nn.functional.mse_loss, batches, names=["0.weight"])
    V = columns(H.shape[0], 2)
    assert_close(H @ V, dense @ V)
    assert not model[0].weight.requires_grad
    default = HessianOperator.from_model(model, nn.MSELoss(), batches)
    assert default.names == ["0.bias", "2.weight", "2.bias"]


def test_float32_keeps_dtype():
    model = make_mlp().float()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    H = HessianOperator.from_model(model, nn.MSELoss(), (x, y))
    assert H.dtype == torch.float32
    out = H @ torch.randn(H.shape[0], 2)
    assert out.dtype == torch.float32


def test_batches_moved_to_parameter_device():
    model = make_mlp().float()
    x, y = torch.randn(4, 3, device="meta"), torch.randn(4, 2, device="meta")
    moved = HessianOperator.from_model(model, nn.MSELoss(), [(x, y)])
    assert moved.device == torch.device("cpu")
    with pytest.raises(NotImplementedError):  # meta tensors carry no data to copy
        moved @ torch.randn(moved.shape[0], 1)


def test_progress_bar(capsys):
    model = make_mlp()
    H = HessianOperator.from_model(model, nn.MSELoss(), make_batches([3, 3]), progress=True)
    H @ columns(H.shape[0], 1)
    assert "batch" in capsys.readouterr().err


def test_to_scipy_eigenvalues_match_dense(mlp_problem):
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    func, params, dense = mlp_problem
    H = HessianOperator(func, params)
    linear_operator = H.to_scipy()
    assert linear_operator.shape == H.shape
    top = scipy_linalg.eigsh(linear_operator, k=3, which="LA", return_eigenvectors=False)
    expected = torch.linalg.eigvalsh(dense)[-3:]
    assert_close(torch.as_tensor(sorted(top), dtype=DTYPE), expected)
    v = columns(H.shape[0], 1).numpy()
    assert_close(torch.as_tensor(linear_operator @ v), dense @ torch.as_tensor(v))


def test_to_scipy_takes_any_numpy_array(mlp_problem):
    # a complex array lost its imaginary part (with only a warning of torch's); an array of
    # negative strides raised in torch.as_tensor
    pytest.importorskip("scipy")
    func, params, dense = mlp_problem
    H = HessianOperator(func, params)
    linear_operator = H.to_scipy()
    V = columns(H.shape[0], 2).numpy()
    expected = (dense @ torch.as_tensor(V)).numpy()
    z = V[:, 0] + 1j * V[:, 1]
    assert_close(torch.as_tensor(linear_operator @ z), torch.as_tensor(expected @ [1, 1j]))
    assert_close(
        torch.as_tensor(linear_operator @ V[:, ::-1]), torch.as_tensor(expected[:, ::-1].copy())
    )
    assert_close(
        torch.as_tensor(linear_operator @ V[::-1, 0]),
        dense @ torch.as_tensor(V[::-1, 0].copy()),
    )


def test_to_scipy_without_scipy(monkeypatch, mlp_problem):
    import sys

    func, params, _ = mlp_problem
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match=r"to_scipy needs SciPy.*torch-secorder\[scipy\]"):
        HessianOperator(func, params).to_scipy()


class RecordingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, out, target):
        self.calls += 1
        return nn.functional.mse_loss(out, target)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], ValueError, r"from_model: data is empty; expected at least one"),
        ((b for b in make_batches([2])), TypeError, r"data must be re-iterable"),
        (iter(make_batches([2])), TypeError, r"data must be re-iterable"),
        (42, TypeError, r"data must be an \(inputs, targets\) batch or an iterable"),
        (torch.ones(3), TypeError, r"data must be an \(inputs, targets\) batch"),
        (
            [torch.ones(2, 3)],
            TypeError,
            r"data batch 0 must be a pair \(inputs, targets\); got a Tensor",
        ),
        (
            [(torch.ones(2, 3),)],
            TypeError,
            r"data batch 0 must be a pair .* got a tuple of length 1",
        ),
        ([("x", torch.ones(2))], TypeError, r"the inputs of data batch 0 must be a Tensor"),
        ([((), torch.ones(2))], ValueError, r"data batch 0 hold no tensor with a batch dimension"),
    ],
)
def test_from_model_bad_data(data, error, match):
    loss = RecordingLoss()
    with pytest.raises(error, match=match):
        HessianOperator.from_model(make_mlp(), loss, data)
    assert loss.calls == 0


def test_from_model_bad_arguments():
    model = make_mlp()
    batches = make_batches([2])
    with pytest.raises(TypeError, match=r"from_model: model must be a torch.nn.Module; got str"):
        HessianOperator.from_model("model", nn.MSELoss(), batches)
    with pytest.raises(TypeError, match=r"from_model: loss_fn must be callable; got int"):
        HessianOperator.from_model(model, 3, batches)
    with pytest.raises(ValueError, match=r"from_model: params entry 'nope' matches no parameter"):
        HessianOperator.from_model(model, nn.MSELoss(), batches, params="nope")
    with pytest.raises(TypeError, match=r"from_model: seed must be an int; got float"):
        HessianOperator.from_model(model, nn.MSELoss(), batches, seed=0.5)
    with pytest.raises(TypeError, match=r"from_model: progress must be a bool; got str"):
        HessianOperator.from_model(model, nn.MSELoss(), batches, progress="yes")


def test_non_scalar_loss_raises_at_first_batch():
    model = make_mlp()
    loss = RecordingLoss()
    H = HessianOperator.from_model(model, lambda out, y: (out - y) ** 2, make_batches([2, 3]))
    with pytest.raises(
        ValueError,
        match=r"from_model: loss_fn must return a scalar loss; got a tensor of shape \(2, 2\)",
    ):
        H @ columns(H.shape[0], 1)
    assert loss.calls == 0


def test_closure_bad_arguments(mlp_problem):
    func, params, _ = mlp_problem
    with pytest.raises(TypeError, match=r"HessianOperator: func must be callable; got int"):
        HessianOperator(1, params)
    with pytest.raises(ValueError, match=r"HessianOperator: params is empty"):
        HessianOperator(func, [])
    mixed = [params[0], params[1].float()]
    with pytest.raises(
        ValueError, match=r"needs params of one dtype and device.*params\[1\] is torch.float32"
    ):
        HessianOperator(func, mixed)
    H = HessianOperator(func, params)
    P = H.shape[0]
    with pytest.raises(
        ValueError, match=rf"HessianOperator.matvec: v has shape \({P}, 1\); expected \({P},\)"
    ):
        H.matvec(torch.zeros(P, 1, dtype=DTYPE))
    with pytest.raises(
        ValueError, match=rf"HessianOperator.matmat: V has shape \({P},\); expected \({P}, k\)"
    ):
        H.matmat(torch.zeros(P, dtype=DTYPE))
    with pytest.raises(
        ValueError, match=r"matmat: V is torch.float32 on cpu; expected torch.float64 on cpu"
    ):
        H.matmat(torch.zeros(P, 2))
    with pytest.raises(TypeError, match=r"HessianOperator.matmat: V must be a Tensor; got list"):
        H @ [1.0]
    assert func.calls == 0


def test_names_follow_model_order():
    model = make_mlp()
    H = HessianOperator.from_model(model, nn.MSELoss(), make_batches([2]), params=["2.*", "0.bias"])
    assert H.names == list(select_params(model, ["2.*", "0.bias"]))
    assert H.names == ["0.bias", "2.weight", "2.bias"]


def test_streamed_graphs_are_freed():
    import weakref

    model = make_mlp()
    activations = []  # tanh outputs are saved for backward by the graph of every batch
    model[1].register_forward_hook(lambda module, args, out: activations.append(weakref.ref(out)))
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), make_batches([3, 4, 5], classes=2))
    H @ columns(H.shape[0], 8)  # single and batched products
    H @ columns(H.shape[0], 1)
    assert len(activations) == 6
    assert all(ref() is None for ref in activations)  # freed by reference counting, no cycle


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_one_batch_operator_keeps_its_graph_valid_across_products(mode):
    # the graph of a lone batch is kept; restoring the model's state must not invalidate the
    # buffers it saved (BatchNorm's running statistics), in either mode
    model = make_mlp(batchnorm=True)
    getattr(model, mode)()
    loss_fn = nn.MSELoss()
    (batch,) = make_batches([6])
    H = HessianOperator.from_model(model, loss_fn, batch)
    with ref.oracle_context():  # torch.func is wrong through train-mode F.batch_norm
        expected = dense_data_hessian(model, loss_fn, [batch])
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    first = H.matvec(eye[0])
    assert_close(H.matmat(eye), expected)
    assert torch.equal(H.matvec(eye[0]), first)


# ----------------------------------------------------------------------------- repeatable passes


class _Reordered:
    """A re-iterable data set whose order changes with every pass (a shuffle of its own)."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        shift = self.passes % len(self.batches)
        return iter(self.batches[shift:] + self.batches[:shift])


class _NoisyModel(nn.Module):
    """A forward pass random beyond torch's RNG (Python's), which the library cannot fix."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp()
        self.rng = __import__("random").Random(0)

    def forward(self, x):
        return self.net(x) * (1 + 0.1 * self.rng.random())


def test_a_shuffling_dataloader_is_refused_before_any_work():
    x, y = make_batches([12])[0]
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="RandomSampler draws another order on every pass"):
        HessianOperator.from_model(make_mlp(), nn.MSELoss(), loader)
    fixed = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4, shuffle=False)
    HessianOperator.from_model(make_mlp(), nn.MSELoss(), fixed)


def test_passes_that_see_other_batches_are_named():
    H = HessianOperator.from_model(make_mlp(), nn.MSELoss(), _Reordered(make_batches([3, 5])))
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    with pytest.raises(ValueError, match="data batch 0 differs between passes.*shuffle=False"):
        H @ v


def test_passes_with_a_random_forward_are_named():
    H = HessianOperator.from_model(_NoisyModel().to(DTYPE), nn.MSELoss(), make_batches([3, 5]))
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    with pytest.raises(ValueError, match="the loss of data batch 0 was .* in the first pass"):
        H @ v


def test_passes_with_another_number_of_batches_are_named():
    batches = make_batches([3, 5])

    class Growing:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches[: 1 + self.passes % 2])  # 1 or 2 batches, alternating

    H = HessianOperator.from_model(make_mlp(), nn.MSELoss(), Growing())
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    match = r"gave \d batches in the first pass and \d in a later one"
    with pytest.raises(ValueError, match=match):
        H @ v


@pytest.mark.parametrize("sizes", [[7], [3, 5]])
def test_release_takes_the_parameters_as_they_are_then(sizes):
    # a training step between products: refused (a pass that differs) until release(), after
    # which the operator is the Hessian at the new parameters; the batches are still checked
    model, batches = make_mlp(), make_batches(sizes)
    H = HessianOperator.from_model(model, nn.MSELoss(), batches)
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    # (a lone batch's kept graph sees the parameters' versions, several batches their losses)
    match = "model .* changed since" if len(sizes) == 1 else "loss of data batch 0"
    with pytest.raises(ValueError, match=f"{match} .* call release"):
        H @ v
    H.release()
    assert_close(H @ v, HessianOperator.from_model(model, nn.MSELoss(), batches) @ v)
    H @ v  # the new losses are the reference now
    batches[0] = make_batches(sizes, seed=2)[0]
    H.release()
    with pytest.raises(ValueError, match="data batch 0 differs between passes"):
        H @ v


@pytest.mark.parametrize("form", ["closure", "batch", "activations"])
@pytest.mark.parametrize("step", ["in place", "data"])
def test_a_kept_graph_refuses_parameters_changed_since(form, step):
    # it gave the Hessian at the old parameters (a linear model: silently), or PyTorch's
    # error on a tensor it saved; after release() the Hessian at the new ones
    model, (inputs, targets) = make_mlp(), make_batches([7])[0]
    loss_fn = nn.MSELoss()

    def build():
        if form == "closure":
            return HessianOperator(lambda: loss_fn(model(inputs), targets), model.parameters())
        if form == "batch":
            return HessianOperator.from_model(model, loss_fn, (inputs, targets))
        return HessianOperator.from_model(
            model, loss_fn, (inputs, targets), wrt="activations", modules=["0"]
        )

    H = build()
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    with torch.no_grad():
        for p in model.parameters():
            if step == "in place":
                p.mul_(1.1)
            else:
                p.data = p.data * 1.1
    with pytest.raises(
        ValueError,
        match=r"(the parameters|the model \(its parameters or mode\)) changed since the "
        r"operator built its gradient graph \(a training step\?\); call release\(\) first",
    ):
        H @ v
    H.release()
    assert_close(H @ v, build() @ v)


@pytest.mark.parametrize("change", ["mode", "another layer"])
def test_a_kept_graph_over_data_refuses_a_changed_model(change):
    # the Hessian depends on the whole model: its modes, every parameter
    model = make_mlp(batchnorm=True)
    H = HessianOperator.from_model(model, nn.MSELoss(), make_batches([7])[0], params="0.*")
    v = torch.ones(H.shape[0], dtype=DTYPE)
    H @ v
    if change == "mode":
        model.eval()
    else:
        with torch.no_grad():
            list(model.parameters())[-1].add_(1.0)
    with pytest.raises(ValueError, match=r"the model \(its parameters or mode\) changed"):
        H @ v


def test_a_kept_graph_of_a_renorming_embedding_is_reused():
    # its forward renorms the weights in place and the model's state is restored after the
    # pass: not a change of the parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Flatten(), nn.Linear(8, 1))
    model = model.to(DTYPE)
    inputs, targets = torch.randint(0, 10, (6, 2)), torch.randn(6, 1, dtype=DTYPE)
    H = HessianOperator.from_model(model, nn.MSELoss(), (inputs, targets))
    v = torch.ones(H.shape[0], dtype=DTYPE)
    first = H @ v
    assert torch.equal(H @ v, first)
    # the exact diagonal's own forward passes (its plan, its pass) beside the kept graph
    H.diagonal()
    assert torch.equal(H @ v, first)


def test_repeatable_passes_with_dropout_in_train_mode_are_accepted():
    model = make_mlp(dropout=0.5)
    H = HessianOperator.from_model(model, nn.MSELoss(), make_batches([3, 5]))
    eye = torch.eye(H.shape[0], dtype=DTYPE)
    first = H @ eye
    assert torch.equal(H @ eye, first)
    assert_close(first, first.T)


def test_analyses_report_passes_that_differ_not_asymmetry():
    from torch_secorder import model_top_eigenvalues

    with pytest.raises(ValueError, match="model_top_eigenvalues: data batch 0 differs"):
        model_top_eigenvalues(make_mlp(), nn.MSELoss(), _Reordered(make_batches([3, 5])))


def test_an_operator_keeps_its_graph_for_a_closure_and_one_batch():
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = torch.nn.MSELoss()
    params = list(model.parameters())
    assert HessianOperator(lambda: loss_fn(model(x), y), params).keeps_graph
    assert HessianOperator.from_model(model, loss_fn, (x, y)).keeps_graph
    assert HessianOperator.from_model(model, loss_fn, [(x, y)]).keeps_graph
    assert not HessianOperator.from_model(
        model, loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])]
    ).keeps_graph


def test_one_batch_gives_the_products_of_its_own_hessian_exactly():
    # (no weighting by the batch size and division by the sample count: H = H_b)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    loss_fn = nn.MSELoss()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3)
    closure = HessianOperator(lambda: loss_fn(model(x), y), list(model.parameters()))
    data = HessianOperator.from_model(model, loss_fn, (x, y))
    assert torch.equal(data.matmat(V), closure.matmat(V))
    assert torch.equal(data.matmat(V), closure.matmat(V))  # the kept graph too


def test_kept_gradient_is_the_loss_gradient_of_the_kept_graph():
    from torch_secorder.core.operator import kept_gradient

    model = make_mlp()
    ((x, y),) = make_batches([6])
    loss_fn = nn.functional.mse_loss
    params = list(model.parameters())
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(x), y), params)])
    func = CountingClosure(lambda: loss_fn(model(x), y))
    closure = HessianOperator(func, params)
    for operator in (
        closure,
        HessianOperator.from_model(model, loss_fn, (x, y)),
        HessianOperator.from_model(model, loss_fn, [(x, y)]),
    ):
        gradient = kept_gradient(operator)
        assert not gradient.requires_grad
        assert_close(gradient, truth, rtol=1e-14, atol=0)
        operator.matmat(columns(truth.numel(), 2))  # the products reuse the graph built
        assert operator.num_matvecs == 2
    assert func.calls == 1
    assert all(p.grad is None for p in params)
    # no graph kept: several batches, several processes, other operators
    assert kept_gradient(HessianOperator.from_model(model, loss_fn, make_batches([3, 3]))) is None
    assert kept_gradient(torch.eye(3)) is None
    # (several processes: tests/core/test_operator_distributed.py); none to sum over here
    with pytest.raises(ValueError, match=r"distributed=True .* torch\.distributed is not init"):
        HessianOperator.from_model(model, loss_fn, (x, y), distributed=True)


def test_kept_gradient_is_zero_where_the_gradient_is_constant():
    from torch_secorder.core.operator import kept_gradient

    a = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    b = torch.tensor([3.0], dtype=DTYPE, requires_grad=True)  # enters linearly
    unused = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    operator = HessianOperator(lambda: (a**3).sum() + 5 * b.sum(), [a, b, unused])
    assert torch.equal(
        kept_gradient(operator), torch.tensor([3.0, 12.0, 0.0, 0.0, 0.0], dtype=DTYPE)
    )


class _SequenceFirst(nn.Module):
    """A GRU on ``(T, B, F)`` inputs (PyTorch's default layout): samples in dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def test_batch_size_fn_counts_samples_outside_the_leading_dimension():
    torch.manual_seed(0)
    model = _SequenceFirst().double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, n, 2, generator=g, dtype=torch.float64) for n in (3, 1)]
    ys = [torch.randn(n, 1, generator=g, dtype=torch.float64) for n in (3, 1)]
    loss_fn = nn.MSELoss()
    x, y = torch.cat(xs, dim=1), torch.cat(ys)  # the mean loss over all 4 samples
    expected = ref.double_backward_hessian(lambda: loss_fn(model(x), y), list(model.parameters()))
    data = list(zip(xs, ys))
    H = HessianOperator.from_model(model, loss_fn, data, batch_size_fn=lambda x: x.shape[1])
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    assert_close(H @ eye, expected)
    assert H.num_samples == 4
    np = pytest.importorskip("numpy")  # (a count from NumPy counts as well)
    as_numpy = HessianOperator.from_model(
        model, loss_fn, data, batch_size_fn=lambda x: np.int64(x.shape[1])
    )
    assert torch.equal(as_numpy @ eye, H @ eye)
    assert type(as_numpy.num_samples) is int
    by_leading = HessianOperator.from_model(model, loss_fn, data)  # the leading 4 and 4
    assert not torch.allclose(by_leading @ eye, expected)
    assert by_leading.num_samples == 8
    # the inputs' Hessian: each batch's block weighted by its share of the 4 samples
    inputs = HessianOperator.from_model(
        model, loss_fn, data, wrt="inputs", batch_size_fn=lambda x: x.shape[1]
    )
    assert inputs.num_samples == 4
    first = ref.double_backward_hessian(
        lambda: loss_fn(model(xs[0]), ys[0]), [xs[0].requires_grad_()]
    )
    assert_close(
        (inputs @ torch.eye(inputs.shape[0], dtype=torch.float64))[:24, :24], first * 3 / 4
    )


@pytest.mark.parametrize(
    ("batch_size_fn", "error", "match"),
    [
        (3, TypeError, "batch_size_fn must be callable; got int"),
        (lambda x: 0, ValueError, "batch_size_fn returned 0 for data batch 0; expected"),
        (lambda x: 2.0, ValueError, "batch_size_fn returned 2.0 for data batch 0"),
    ],
)
def test_batch_size_fn_errors(batch_size_fn, error, match):
    model = _SequenceFirst().double()
    batch = (torch.zeros(4, 2, 2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    with pytest.raises(error, match=rf"HessianOperator.from_model: {match}"):
        HessianOperator.from_model(model, nn.MSELoss(), [batch], batch_size_fn=batch_size_fn)


def _small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 4, generator=g, dtype=torch.float64), torch.arange(8) % 3


def test_nan_in_the_data_is_not_taken_for_a_changing_pass():
    model, x, y = _small_mlp()
    x[0, 0] = float("nan")
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
    v = torch.ones(H.shape[0], dtype=torch.float64)
    H.matvec(v)
    assert torch.isnan(H.matvec(v)).all()  # (NaN propagates; the passes are the same)


def test_a_summed_loss_over_several_batches_warns():
    model, x, y = _small_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with pytest.warns(RuntimeWarning, match=r"loss_fn sums over its batch \(reduction='sum'\)"):
        HessianOperator.from_model(model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])])
    HessianOperator.from_model(model, loss_fn, (x, y))  # one batch: the summed loss's Hessian


def test_parameters_of_two_dtypes_are_named_with_a_fix():
    model, x, y = _small_mlp()
    model[2].float()
    with pytest.raises(
        ValueError,
        match=r"an operator on flat vectors needs params of one dtype and device, but "
        r"params\[0\] \('0.weight'\) is torch.float64 on cpu and params\[2\] \('2.weight'\) is "
        r"torch.float32 on cpu; convert the model to one dtype and device",
    ):
        HessianOperator.from_model(model, nn.CrossEntropyLoss(), (x, y))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (torch.compile's own imports)
def test_a_compiled_model_is_refused_before_any_compilation():
    model, x, y = _small_mlp()
    with pytest.raises(ValueError, match=r"model is compiled by torch.compile.*model\._orig_mod"):
        HessianOperator.from_model(torch.compile(model), nn.CrossEntropyLoss(), (x, y))


def test_a_sparse_gradient_is_refused_with_its_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).double()
    x, y = torch.tensor([[1, 2], [3, 1]]), torch.tensor([0, 1])
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match=r"gradient of params\[0\] \('0.weight'\) is sparse"):
        H.matvec(torch.ones(H.shape[0], dtype=torch.float64))


class _Stream(torch.utils.data.IterableDataset):
    """Samples from a fixed generator: a DataLoader over it has no length."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            yield (
                torch.randn(4, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (), generator=g),
            )


def test_a_loader_without_length_streams_every_batch():
    model, _, _ = _small_mlp()
    loader = torch.utils.data.DataLoader(_Stream(), batch_size=5)
    H = HessianOperator.from_model(model, nn.CrossEntropyLoss(), loader)
    x = torch.stack([s[0] for s in _Stream()])
    y = torch.stack([s[1] for s in _Stream()])
    whole = HessianOperator.from_model(model, nn.CrossEntropyLoss(), (x, y))
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    assert_close(H @ eye, whole @ eye)
    assert H.num_samples == 12
    with pytest.warns(RuntimeWarning, match="reduction='sum'"):  # (several batches, or unknown)
        HessianOperator.from_model(model, nn.CrossEntropyLoss(reduction="sum"), loader)
